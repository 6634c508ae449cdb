"""The fast dataset walk must read exactly what pydicom reads, on real and re-encoded data."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from agent.ingest import instance
from agent.ingest.element_scan import MAX_DEPTH, PIXEL_DATA, ScanError, scan
from agent.ingest.spool import Padding
from agent.ingest.status import StoreStatus
from tests.fixtures.dicom import SAMPLE, dataset_offset


def _split(raw: bytes) -> tuple[bytes, bytes, str]:
    """(preamble + File Meta, dataset, transfer syntax) of a Part-10 file."""
    offset = dataset_offset(raw)
    return raw[:offset], raw[offset:], str(dcmread(BytesIO(raw)).file_meta.TransferSyntaxUID)


def _facts_both_ways(raw: bytes) -> tuple[instance._Facts, instance._Facts]:
    _head, dataset, ts = _split(raw)
    return instance._facts_from_scan(memoryview(dataset), ts), instance._facts_from_pydicom(raw, ts)


def _reencoded(source: Path, syntax: str, *, nested: bool = False) -> bytes:
    ds = dcmread(source)
    if nested:  # undefined-length sequences two levels deep, as scanners write them
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D3000", "SRT", "Chest"
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        item.PurposeOfReferenceCodeSequence = Sequence([inner])
        ds.ReferencedImageSequence = Sequence([item, item])
        for seq in (ds.ReferencedImageSequence, item.PurposeOfReferenceCodeSequence):
            seq.is_undefined_length = True
            for each in seq:
                each.is_undefined_length_sequence_item = True
    ds.file_meta.TransferSyntaxUID = syntax
    out = BytesIO()
    ds.save_as(out, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    return out.getvalue()


def test_real_series_read_the_same_as_with_pydicom(shared_data: Path) -> None:
    files = sorted(shared_data.glob("**/*.dcm")) + sorted(SAMPLE.glob("*.dcm"))
    assert len(files) > 400, "the shared data's CT series are missing"
    syntaxes = set()
    for path in files:
        raw = path.read_bytes()
        syntaxes.add(_split(raw)[2])
        fast, slow = _facts_both_ways(raw)
        assert fast == slow, path
    # native and JPEG Lossless SV1 (encapsulated pixel data) both walked
    assert {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70"} <= syntaxes


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("nested", [False, True])
def test_reencoded_instances_read_the_same(syntax: str, nested: bool) -> None:
    raw = _reencoded(sorted(SAMPLE.glob("*.dcm"))[0], syntax, nested=nested)
    fast, slow = _facts_both_ways(raw)
    assert fast == slow
    assert fast.geometry is not None and fast.geometry[:2] == (512, 512)  # type: ignore[attr-defined]


def test_undefined_length_sequences_are_walked_to_their_end() -> None:
    raw = _reencoded(sorted(SAMPLE.glob("*.dcm"))[0], ExplicitVRLittleEndian, nested=True)
    _head, dataset, _ts = _split(raw)
    assert b"\xfe\xff\xdd\xe0" in dataset  # a Sequence Delimitation Item is really there
    walked = scan(dataset, explicit_vr=True, wanted=frozenset({PIXEL_DATA}))
    pixel = walked.elements[PIXEL_DATA]
    assert pixel.offset + pixel.length == len(dataset)


def test_truncated_dataset_is_a_scan_error_naming_the_element() -> None:
    _head, dataset, _ts = _split(sorted(SAMPLE.glob("*.dcm"))[0].read_bytes())
    with pytest.raises(ScanError, match=r"\(7FE0,0010\).*truncated"):
        scan(dataset[:-1000], explicit_vr=True, wanted=frozenset())
    with pytest.raises(ScanError, match="truncated"):
        scan(dataset[:5], explicit_vr=True, wanted=frozenset())


def test_garbage_is_a_scan_error() -> None:
    with pytest.raises(ScanError, match="unknown value representation"):
        scan(b"\x08\x00\x16\x00zz\x02\x001.", explicit_vr=True, wanted=frozenset())
    with pytest.raises(ScanError):
        scan(b"\xff\xff\xff\xff" * 64, explicit_vr=True, wanted=frozenset())


def test_sequence_nesting_is_bounded() -> None:
    open_sq = struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF)
    open_item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    with pytest.raises(ScanError, match=f"deeper than {MAX_DEPTH}"):
        scan((open_sq + open_item) * (MAX_DEPTH + 1), explicit_vr=True, wanted=frozenset())


def test_what_the_walk_refuses_is_left_to_pydicom() -> None:
    """A dataset the walk cannot read is judged by pydicom, with pydicom's words."""
    raw = sorted(SAMPLE.glob("*.dcm"))[0].read_bytes()
    head, dataset, ts = _split(raw)
    ds = dcmread(BytesIO(raw))
    with pytest.raises(instance.Rejection, match="cannot be parsed") as refused:
        instance.check_dataset(b"\xff\xff\xff\xff" * 64, file_meta=head,
                             sop_class_uid=str(ds.SOPClassUID),
                             sop_instance_uid=str(ds.SOPInstanceUID), transfer_syntax_uid=ts,
                             calling_ae="SCU", received_at=0.0)
    assert refused.value.status == StoreStatus.CANNOT_PARSE
    checked = instance.check_dataset(dataset, file_meta=head, sop_class_uid=str(ds.SOPClassUID),
                                   sop_instance_uid=str(ds.SOPInstanceUID),
                                   transfer_syntax_uid=ts, calling_ae="SCU", received_at=0.0)
    assert checked.info.series_uid == ds.SeriesInstanceUID


def _checked(raw: bytes) -> instance.CheckedInstance:
    head, dataset, ts = _split(raw)
    ds = dcmread(BytesIO(raw))
    return instance.check_dataset(memoryview(dataset), file_meta=head,
                                sop_class_uid=str(ds.SOPClassUID),
                                sop_instance_uid=str(ds.SOPInstanceUID), transfer_syntax_uid=ts,
                                calling_ae="SCU", received_at=0.0)


@pytest.mark.parametrize(("syntax", "padding"), [
    (ExplicitVRLittleEndian, Padding.EXPLICIT_VR), (ImplicitVRLittleEndian, Padding.IMPLICIT_VR),
    (DeflatedExplicitVRLittleEndian, None)])
def test_the_spool_may_close_a_dataset_with_padding_in_its_own_encoding(
        syntax: str, padding: Padding | None) -> None:
    assert _checked(_reencoded(sorted(SAMPLE.glob("*.dcm"))[0], syntax)).padding is padding


def test_a_dataset_with_trailing_padding_of_its_own_is_not_padded_again(tmp_path: Path) -> None:
    source = tmp_path / "padded.dcm"
    ds = dcmread(sorted(SAMPLE.glob("*.dcm"))[0])
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 6)
    ds.save_as(source, enforce_file_format=True)
    raw = source.read_bytes()
    from_scan, from_pydicom = _facts_both_ways(raw)
    assert from_scan == from_pydicom and from_scan.padded is True
    assert _checked(raw).padding is None
