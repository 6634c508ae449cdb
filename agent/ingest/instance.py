"""What the Storage SCP accepts in an instance, the checks it makes, and the file it writes.

* What is accepted: the storage SOP classes (:data:`STORAGE_SOP_CLASSES`) and the transfer
  syntaxes, taken as received, nothing transcoded (:data:`ACCEPTED_SYNTAXES`).
* :func:`check_dataset`: what triage needs of a received dataset (UIDs present and matching
  the request, pixel data present, native pixel data as long as its geometry says), read by
  the fast element walk (``agent.ingest.element_scan``) and, where that walk cannot read the
  bytes, by pydicom. A refusal is a :class:`Rejection`: the status to answer
  (``agent.ingest.status``) and the reason.
* :func:`encode_file_meta`: the Part-10 File Meta Information written before the dataset
  bytes, which are stored exactly as they came off the wire.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from io import BytesIO
from typing import Final

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
)

from agent.ingest.element_scan import (
    PIXEL_DATA,
    UNDEFINED_LENGTH,
    ScanError,
    StructureError,
    inflate,
    scan,
)
from agent.ingest.spool import TRAILING_PADDING, InstanceInfo, Padding
from agent.ingest.status import StoreStatus
from schemas.uids import is_valid_uid

STORAGE_SOP_CLASSES: Final = (CTImageStorage, EnhancedCTImageStorage)
"""What the agent triages: single-frame CT and Enhanced (multi-frame) CT."""

NATIVE_SYNTAXES: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                          DeflatedExplicitVRLittleEndian)
ENCAPSULATED_SYNTAXES: Final = (
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLossless,  # 1.2.840.10008.1.2.4.57 (Process 14)
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    JPEG2000,  # 1.2.840.10008.1.2.4.91
    RLELossless,  # 1.2.840.10008.1.2.5
)
ACCEPTED_SYNTAXES: Final = (*NATIVE_SYNTAXES, *ENCAPSULATED_SYNTAXES)
"""Accepted as received, in this order of preference when a context offers several."""

PREAMBLE: Final = b"\x00" * 128 + b"DICM"
FILE_META_VERSION: Final = b"\x00\x01"
"""(0002,0001) File Meta Information Version."""

_PIXEL_TAGS: Final = (Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))
_UID_TAGS: Final = {"StudyInstanceUID": Tag(0x0020, 0x000D),
                    "SeriesInstanceUID": Tag(0x0020, 0x000E),
                    "SOPInstanceUID": Tag(0x0008, 0x0018)}
_LABELS: Final = {"StudyInstanceUID": "Study Instance UID (0020,000D)",
                  "SeriesInstanceUID": "Series Instance UID (0020,000E)",
                  "SOPInstanceUID": "SOP Instance UID (0008,0018)"}
_SOP_CLASS_TAG: Final = Tag(0x0008, 0x0016)
_TAG_CHARSET: Final = 0x00080005
_TAG_SAMPLES: Final = 0x00280002
_TAG_NUMBER_OF_FRAMES: Final = 0x00280008
_TAG_ROWS: Final = 0x00280010
_TAG_COLUMNS: Final = 0x00280011
_TAG_BITS_ALLOCATED: Final = 0x00280100
_TAG_TRAILING_PADDING: Final = TRAILING_PADDING << 16 | TRAILING_PADDING
_HINT_TAGS: Final = {"PatientID": Tag(0x0010, 0x0020), "AccessionNumber": Tag(0x0008, 0x0050),
                     "Modality": Tag(0x0008, 0x0060)}
_SCAN_TAGS: Final = frozenset({
    *(int(t) for t in (*_UID_TAGS.values(), _SOP_CLASS_TAG, *_PIXEL_TAGS,
                       *_HINT_TAGS.values())),
    _TAG_CHARSET, _TAG_SAMPLES, _TAG_NUMBER_OF_FRAMES, _TAG_ROWS, _TAG_COLUMNS,
    _TAG_BITS_ALLOCATED, _TAG_TRAILING_PADDING})

class Rejection(Exception):
    """A dataset the SCP refuses: the status to answer and the reason to log and keep."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class CheckedInstance:
    """The facts taken from an accepted dataset."""

    info: InstanceInfo
    warnings: list[str] = field(default_factory=list)
    padding: Padding | None = None
    """How the spool may close the dataset with a trailing padding element (``None``: it may
    not: deflated, big endian, or padded already)."""


@dataclass(frozen=True)
class _Facts:
    """What the check needs from a dataset, however it was read."""

    uids: dict[str, str | None]
    sop_class_uid: str | None
    has_pixels: bool
    geometry: tuple[int, int, int, int, int, int] | None
    """Native Pixel Data (7FE0,0010) only: rows, columns, samples, frames, bits allocated and
    the bytes present."""
    hints: dict[str, str | None]
    padded: bool
    """The dataset ends with its own Data Set Trailing Padding (FFFC,FFFC)."""


def _padding(transfer_syntax_uid: str, padded: bool) -> Padding | None:
    """How a trailing padding element would be encoded after a dataset in this syntax."""
    uid = UID(transfer_syntax_uid)
    if padded or not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
        return None
    return Padding.IMPLICIT_VR if uid.is_implicit_VR else Padding.EXPLICIT_VR


def _ascii(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("latin-1").strip("\x00 ")


def _us(raw: bytes | None, default: int | None = None) -> int:
    if raw is None and default is not None:
        return default
    if raw is None or len(raw) != 2:
        raise ScanError("an image geometry element is not one US value")
    return int.from_bytes(raw, "little")


def _hint(raw: bytes | None, charsets: list[str]) -> str | None:
    """A text hint (Patient ID, Accession Number, Modality) decoded in the dataset's
    Specific Character Set; ``None`` if absent, empty or undecodable."""
    if not raw:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        try:
            text = decode_bytes(raw, convert_encodings(charsets or ["ISO_IR 6"]), set())
        except Exception:  # a hint only: an odd Patient ID must not refuse an image
            return None
    return text.strip("\x00 ") or None


def _facts_from_scan(dataset: bytes | memoryview, transfer_syntax_uid: str) -> _Facts:
    """The facts from a walk over the encoded dataset (:mod:`agent.ingest.element_scan`); raises
    :class:`ScanError` when the walk or a value fails (the caller then asks pydicom)."""
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        dataset = inflate(dataset)
    walked = scan(dataset, explicit_vr=transfer_syntax_uid != ImplicitVRLittleEndian,
                  wanted=_SCAN_TAGS)
    present = walked.elements
    pixel = present.get(PIXEL_DATA)
    geometry = None
    if transfer_syntax_uid in NATIVE_SYNTAXES and pixel is not None:
        if pixel.length == UNDEFINED_LENGTH:
            raise ScanError("native Pixel Data of undefined length")
        frames_text = _ascii(walked.value(_TAG_NUMBER_OF_FRAMES))
        try:
            frames = int(frames_text) if frames_text else 1
        except ValueError as exc:
            raise ScanError(f"Number of Frames {frames_text!r} is not an integer") from exc
        geometry = (_us(walked.value(_TAG_ROWS)), _us(walked.value(_TAG_COLUMNS)),
                    _us(walked.value(_TAG_SAMPLES), default=1), frames,
                    _us(walked.value(_TAG_BITS_ALLOCATED)), pixel.length)
    charsets = [c.strip() for c in (_ascii(walked.value(_TAG_CHARSET)) or "").split("\\")
                if c.strip()]
    return _Facts(
        uids={name: _ascii(walked.value(int(tag))) for name, tag in _UID_TAGS.items()},
        sop_class_uid=_ascii(walked.value(int(_SOP_CLASS_TAG))),
        has_pixels=any(int(t) in present for t in _PIXEL_TAGS), geometry=geometry,
        hints={name: _hint(walked.value(int(tag)), charsets) for name, tag in _HINT_TAGS.items()},
        padded=_TAG_TRAILING_PADDING in present)


def _syntax_mismatch(dataset: bytes | memoryview, transfer_syntax_uid: str) -> str | None:
    """When the declared transfer syntax cannot walk ``dataset``: the reason to refuse it if
    the other VR encoding can (Implicit VR bytes announced as Explicit, or the reverse);
    ``None`` otherwise. Only asked after a failed walk."""
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return None
    explicit = transfer_syntax_uid != ImplicitVRLittleEndian
    try:
        scan(dataset, explicit_vr=not explicit, wanted=frozenset())
    except ScanError:
        return None
    found, declared = ("Implicit", "Explicit") if explicit else ("Explicit", "Implicit")
    return (f"{found} VR data, transfer syntax says {declared} VR: the dataset is encoded in "
            f"{found} VR Little Endian, the negotiated transfer syntax "
            f"{UID(transfer_syntax_uid).name} ({transfer_syntax_uid}) is {declared} VR")


def _raw_text(ds: Dataset, tag: BaseTag) -> str | None:
    """The value of a text element without pydicom's VR validation (raw bytes decoded),
    ``None`` when absent. Raises ``Rejection`` if the element cannot be read."""
    try:
        elem = ds.get_item(tag)
    except Exception as exc:
        raise Rejection(StoreStatus.CANNOT_PARSE,
                        f"element {tag} cannot be read: {exc}") from exc
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return _ascii(value)
    return str(value).strip("\x00 ")


def _text(ds: Dataset, keyword: str) -> str | None:
    """A decoded text attribute for metadata hints, ``None`` if absent or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # a hint only: an odd Patient ID must not refuse an image
        return None
    return str(value) if value not in (None, "") else None


def _facts_from_pydicom(part10: bytes, transfer_syntax_uid: str) -> _Facts:
    """The facts as pydicom reads the Part-10 bytes; raises :class:`Rejection` when it cannot
    (the answer then names pydicom's complaint)."""
    try:
        ds = dcmread(BytesIO(part10), force=False)
    except Exception as exc:
        raise Rejection(StoreStatus.CANNOT_PARSE,
                        f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise Rejection(StoreStatus.CANNOT_PARSE, "dataset cannot be parsed: no data elements")
    pixel_tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    geometry = None
    if transfer_syntax_uid in NATIVE_SYNTAXES and pixel_tag == _PIXEL_TAGS[0]:
        try:
            geometry = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1),
                        int(ds.get("NumberOfFrames", 1) or 1), int(ds.BitsAllocated),
                        len(ds.PixelData))
        except Exception as exc:
            raise Rejection(StoreStatus.CANNOT_PARSE, f"image geometry cannot be read: "
                            f"{type(exc).__name__}: {exc}") from exc
    return _Facts(uids={name: _raw_text(ds, tag) for name, tag in _UID_TAGS.items()},
                  sop_class_uid=_raw_text(ds, _SOP_CLASS_TAG), has_pixels=pixel_tag is not None,
                  geometry=geometry,
                  hints={name: _text(ds, name) for name in _HINT_TAGS},
                  padded=_TAG_TRAILING_PADDING in ds)


def check_dataset(dataset: bytes | memoryview, *, file_meta: bytes, sop_class_uid: str,
                  sop_instance_uid: str, transfer_syntax_uid: str, calling_ae: str,
                  received_at: float) -> CheckedInstance:
    """Check what triage needs of a received dataset; raise :class:`Rejection`.

    ``dataset`` is the encoded dataset as received, ``file_meta`` the preamble and File Meta
    written before it. Checks, in order: it parses as DICOM; Study, Series and SOP Instance
    UIDs are present and not empty; its SOP Class and SOP Instance UIDs are those the request
    announced; it has pixel data, and native (uncompressed) pixel data is as long as its
    geometry says. Syntactically invalid (but present) UIDs are accepted with a warning: real
    scanners send them and the SeriesInstanceUID is only used as a key.

    The dataset is walked by :mod:`agent.ingest.element_scan`. Where that walk fails, the bytes are
    refused when they contradict themselves (:class:`~agent.ingest.element_scan.StructureError`: a
    declared length past the end of the data, such as Pixel Data declaring 0x7FFFFFF0 bytes;
    sequences nested too deep; a deflate bomb) or when they are encoded in the other VR
    encoding than the transfer syntax says (Explicit VR bytes announced as Implicit VR, or
    the reverse). Whatever else that walk cannot read is read by pydicom instead, so what is
    accepted or refused, and why, is pydicom's call. The extra checks run only when the walk
    failed: an ordinary instance costs nothing more.
    """
    try:
        facts = _facts_from_scan(dataset, transfer_syntax_uid)
    except ScanError as exc:
        mismatch = _syntax_mismatch(dataset, transfer_syntax_uid)
        if mismatch is not None:
            raise Rejection(StoreStatus.CANNOT_PARSE, mismatch) from exc
        if isinstance(exc, StructureError):
            raise Rejection(StoreStatus.CANNOT_PARSE, str(exc)) from exc
        facts = _facts_from_pydicom(file_meta + bytes(dataset), transfer_syntax_uid)
    uids = facts.uids
    invalid = [f"{_LABELS[name]} {value!r} is not a valid DICOM UID"
               for name, value in uids.items() if value and not is_valid_uid(value)]
    problems = [f"{_LABELS[name]} {'is empty' if value == '' else 'is missing'}"
                for name, value in uids.items() if not value]
    if problems:
        raise Rejection(StoreStatus.MISSING_UID, "; ".join(problems + invalid))
    study_uid = str(uids["StudyInstanceUID"])
    series_uid = str(uids["SeriesInstanceUID"])
    sop_uid = str(uids["SOPInstanceUID"])
    if facts.sop_class_uid != sop_class_uid:
        raise Rejection(StoreStatus.SOP_CLASS_MISMATCH,
                        f"SOP Class UID {facts.sop_class_uid!r} is not the requested "
                        f"{sop_class_uid!r}")
    if sop_uid != sop_instance_uid:
        raise Rejection(StoreStatus.UID_MISMATCH,
                        f"SOP Instance UID {sop_uid!r} differs from the request's "
                        f"{sop_instance_uid!r}")
    if not facts.has_pixels:
        raise Rejection(StoreStatus.MISSING_PIXEL_DATA,
                        "no Pixel Data (7FE0,0010): absent or truncated")
    if facts.geometry is not None:
        _check_native_length(*facts.geometry)
    info = InstanceInfo(
        sop_instance_uid=sop_uid, sop_class_uid=sop_class_uid, study_uid=study_uid,
        series_uid=series_uid, transfer_syntax_uid=transfer_syntax_uid, calling_ae=calling_ae,
        received_at=received_at, patient_id=facts.hints["PatientID"],
        accession_number=facts.hints["AccessionNumber"], modality=facts.hints["Modality"])
    return CheckedInstance(info, invalid, _padding(transfer_syntax_uid, facts.padded))


def _check_native_length(rows: int, cols: int, samples: int, frames: int, bits: int,
                         have: int) -> None:
    """Uncompressed Pixel Data must hold Rows x Columns x Samples x Frames x Bits/8 bytes."""
    need = (rows * cols * samples * frames * bits + 7) // 8
    if have < need:
        raise Rejection(StoreStatus.CANNOT_PARSE,
                        f"Pixel Data has {have} bytes, {rows}x{cols}x{samples}x{frames} at "
                        f"{bits} bits needs {need} (truncated)")


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length (or, for OB, 4 bytes)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def pad_even(text: str, pad: bytes) -> bytes:
    """``text`` as ASCII, padded with ``pad`` to an even length (DICOM values are even)."""
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     source_ae: str) -> bytes:
    """The Part-10 File Meta Information of a received instance, encoded directly.

    The same bytes pydicom's ``write_file_meta_info`` writes for pynetdicom's
    ``Event.file_meta`` plus Source Application Entity Title (a test checks that), at a
    fraction of the cost: it runs once per C-STORE. Empty UIDs are written empty (a request
    without a SOP Instance UID must still reach the quarantine as it came).
    """
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", FILE_META_VERSION),
        _element(0x0002, 0x0002, b"UI", pad_even(sop_class_uid, b"\x00")),
        _element(0x0002, 0x0003, b"UI", pad_even(sop_instance_uid, b"\x00")),
        _element(0x0002, 0x0010, b"UI", pad_even(transfer_syntax_uid, b"\x00")),
        _element(0x0002, 0x0012, b"UI", pad_even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x0002, 0x0013, b"SH", pad_even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _element(0x0002, 0x0016, b"AE", pad_even(source_ae, b" ")),
    ))
    return _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


