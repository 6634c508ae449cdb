"""The pre-written pool and seals in the data: an instance written into a file whose blocks
are already written costs one ``fdatasync``, the file stays a valid Part-10 file (the seal
rides in a Data Set Trailing Padding element), and recovery checks such seals as strictly as
extended attributes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian

from agent.ingest import spool as spool_module
from agent.ingest.spool import (
    POOL_BATCH,
    POOL_LOW_WATER,
    RECEIVING_GAP_S,
    SEAL_BLOCK,
    SEAL_XATTR,
    InstanceInfo,
    Padding,
    Spool,
    SpoolError,
    StoreOutcome,
    fits_pool_file,
    spool_disk_bytes,
)
from tests.fixtures.dicom import SAMPLE, dataset_offset, dcmtk, stored_spool_files, wait_for
from tests.fixtures.filesystems import xattr_folder
from tests.fixtures.syncs import SyncLog, record_syncs

SERIES = "1.2.3.4"
CAPACITY = 64 * 1024
TRAILING_PADDING_TAG = 0xFFFCFFFC


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """A folder that keeps user.* extended attributes (sealed mode needs them): pytest's
    tmp_path, or a tmpfs mounted in it. Where neither works the test fails, it does not skip
    (issue 20: these tests used to skip silently there)."""
    with xattr_folder(tmp_path) as folder:
        yield folder


def _info(sop: str, ts: str = "1.2.840.10008.1.2.1") -> InstanceInfo:
    return InstanceInfo(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        study_uid="1.2.3", series_uid=SERIES, transfer_syntax_uid=ts,
                        calling_ae="CT1", received_at=1.0, patient_id="P1", modality="CT")


def _stocked(tmp_path: Path, pool_files: int = 4, capacity: int = CAPACITY) -> Spool:
    spool = Spool(tmp_path, pool_files=pool_files, pool_file_bytes=capacity)
    wait_for(lambda: len(spool._ready) == pool_files, f"{pool_files} pre-written pool files")
    return spool


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> SyncLog:
    """Every fsync / fdatasync / ftruncate this thread makes from now on (not the pool
    thread's); the stores' own are ``.of("file")``."""
    return record_syncs(monkeypatch, ("fsync", "fdatasync", "ftruncate"),
                        thread=threading.current_thread())


def _sample() -> tuple[bytes, bytes]:
    """(preamble + File Meta, dataset) of a real CT instance from the repository's sample."""
    raw = sorted(SAMPLE.glob("*.dcm"))[0].read_bytes()
    offset = dataset_offset(raw)
    return raw[:offset], raw[offset:]


def test_a_pre_written_file_takes_an_instance_with_one_fdatasync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = _stocked(tmp_path)
    calls = _count_syncs(monkeypatch)
    parts = [b"h" * 132, os.urandom(40_000)]
    assert spool.store(_info("1.1"), parts, padding=Padding.EXPLICIT_VR) is StoreOutcome.STORED
    assert calls.of("file") == ["fdatasync"]  # no truncate, no fsync: only data blocks change
    (row,) = spool.pending()
    assert row.size == 40_132 and row.path.stat().st_size == CAPACITY
    assert spool.read(row) == b"".join(parts)  # the instance as received, not the padding
    with pytest.raises(OSError):
        os.getxattr(row.path, SEAL_XATTR)
    spool.close()


def test_instances_that_do_not_fit_get_a_file_of_their_own_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = _stocked(tmp_path)
    calls = _count_syncs(monkeypatch)
    big, small = [b"b" * (CAPACITY - 10)], [b"s" * 100]
    assert not fits_pool_file(len(big[0]) + 12, CAPACITY)
    assert not fits_pool_file(len(small[0]) + 12, CAPACITY)
    spool.store(_info("1.1"), big, padding=Padding.EXPLICIT_VR)
    spool.store(_info("1.2"), small, padding=Padding.IMPLICIT_VR)
    files = calls.of("file")
    assert files.count("fdatasync") == 2 and "fsync" not in files  # size changes, data flush
    sizes = {r.sop_instance_uid: (r.size, r.path.stat().st_size) for r in spool.pending()}
    assert sizes == {"1.1": (CAPACITY - 10, CAPACITY - 10 + 12 + SEAL_BLOCK),
                     "1.2": (100, 100 + 8 + SEAL_BLOCK)}
    spool.close()


def test_datasets_that_must_not_grow_are_sealed_with_an_extended_attribute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = _stocked(tmp_path)
    calls = _count_syncs(monkeypatch)
    spool.store(_info("1.1"), [b"deflated"], padding=None)
    spool.store(_info("1.2"), [b"odd length"[:9]], padding=Padding.EXPLICIT_VR)
    files = calls.of("file")
    assert files.count("fsync") == 2 and "fdatasync" not in files
    for row in spool.pending():
        assert row.path.stat().st_size == row.size
        assert os.getxattr(row.path, SEAL_XATTR)
    spool.close()


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_a_padded_spool_file_is_a_valid_part10_file(tmp_path: Path, implicit: bool) -> None:
    head, dataset = _sample()
    original = dcmread(BytesIO(head + dataset))
    padding = Padding.EXPLICIT_VR
    if implicit:  # the same dataset re-encoded Implicit VR Little Endian
        original.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, original.file_meta)
        body = DicomBytesIO()
        body.is_little_endian, body.is_implicit_VR = True, True
        write_dataset(body, original)
        head, dataset = b"\0" * 128 + b"DICM" + meta.getvalue(), body.getvalue()
        padding = Padding.IMPLICIT_VR
    spool = _stocked(tmp_path, capacity=576 * 1024)
    ts = str(original.file_meta.TransferSyntaxUID)
    spool.store(_info(str(original.SOPInstanceUID), ts), [head, dataset], padding=padding)
    (row,) = spool.pending()
    assert row.path.stat().st_size == 576 * 1024
    on_disk = dcmread(row.path)
    assert on_disk[TRAILING_PADDING_TAG].VR == "OB"
    del on_disk[TRAILING_PADDING_TAG]
    sent = dcmread(BytesIO(head + dataset))  # read the same way as the spool file
    assert on_disk == sent and on_disk.PixelData == original.PixelData
    dump = subprocess.run([dcmtk("dcmdump"), "-q", str(row.path)], capture_output=True,
                          text=True, check=False)
    assert dump.returncode == 0 and "E:" not in dump.stderr and "W:" not in dump.stderr, \
        dump.stderr
    assert "(fffc,fffc) OB" in dump.stdout
    spool.close()


def test_lost_index_rows_are_rebuilt_from_seals_in_the_data(tmp_path: Path) -> None:
    spool = _stocked(tmp_path)
    payloads = {"1.1": [b"a" * 40_000], "1.2": [b"b" * 100], "1.3": [b"c" * 70_000]}
    for sop, parts in payloads.items():
        spool.store(_info(sop), parts, padding=Padding.EXPLICIT_VR)
    with spool._tx() as db:  # every index commit was lost, the flushed files are there
        db.execute("DELETE FROM instances")
        db.execute("DELETE FROM series")
    assert spool.recover() == 0
    got = {row.sop_instance_uid: spool.read(row) for row in spool.pending()}
    assert got == {sop: b"".join(parts) for sop, parts in payloads.items()}
    state = spool.series(SERIES)
    assert state is not None and state.instance_count == 3 and state.patient_id == "P1"
    spool.close()


@pytest.mark.parametrize("damage", ["flipped", "short", "header", "no seal", "bad seal"])
def test_a_torn_padded_file_is_not_taken_as_an_instance(tmp_path: Path, damage: str) -> None:
    spool = _stocked(tmp_path)
    spool.store(_info("1.1"), [b"x" * 40_000], padding=Padding.EXPLICIT_VR)
    (row,) = spool.pending()
    with spool._tx() as db:
        db.execute("DELETE FROM instances")
    data = bytearray(row.path.read_bytes())
    if damage == "flipped":  # an instance page that did not reach the disk
        data[20_000] ^= 0xFF
    elif damage == "short":  # the file ends early: the seal is not where it should be
        data = data[:-2]
    elif damage == "header":  # the padding header's length does not reach the end
        data[40_000 + 8:40_000 + 12] = (1234).to_bytes(4, "little")
    elif damage == "no seal":  # crash before the seal block was written
        data[-SEAL_BLOCK:] = bytes(SEAL_BLOCK)
    else:  # a seal that fails its own CRC: quarantined, never deleted
        data[-SEAL_BLOCK + 5] ^= 0xFF
    row.path.write_bytes(bytes(data))
    if damage == "bad seal":
        assert spool.recover() == 0
        assert (spool.quarantine_dir / f"spool-{row.path.name}").exists()
    else:
        assert spool.recover() == 1
    assert not row.path.exists() and spool.pending() == []
    spool.close()


def test_pre_written_pool_files_left_by_a_crash_are_removed_quietly(tmp_path: Path) -> None:
    spool = _stocked(tmp_path)
    with spool._pool_lock:  # what a crash leaves behind (close() removes the pool)
        left = list(spool._ready)
        spool._ready.clear()
        spool._pool_wake.notify()
    assert left and all(p.stat().st_size == CAPACITY for p in left)
    assert spool.recover() == 0  # not counted as interrupted stores
    assert not any(p.exists() for p in left)
    wait_for(lambda: len(spool._ready) == 4, "the pool stocked again")
    spool.close()
    assert stored_spool_files(spool) == [] and not list(spool.root.glob("*/*.dcm"))


def test_disk_bytes_counts_the_stocked_pool_and_the_quarantine(tmp_path: Path) -> None:
    spool = _stocked(tmp_path)
    pool = 4 * CAPACITY
    assert pool <= spool_disk_bytes(tmp_path) < pool + CAPACITY
    (spool.quarantine_dir / "bad.dcm").write_bytes(b"\x01" * 10_000)
    os.sync()
    assert spool_disk_bytes(tmp_path) >= pool + 10_000
    spool.close()
    # the pool is removed at close
    assert 10_000 <= spool_disk_bytes(tmp_path) < 10_000 + CAPACITY


def test_the_pool_is_pre_written_only_while_no_instance_arrives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool_files = POOL_BATCH + POOL_LOW_WATER
    spool = _stocked(tmp_path, pool_files=pool_files, capacity=16 * 1024)
    batches: list[tuple[bool, float]] = []  # (pre-written, seconds since the last store)
    real = spool._add_pool_batch

    def traced(*, prewrite: bool) -> bool:
        with spool._pool_lock:
            batches.append((prewrite, time.monotonic() - spool._last_store))
        return real(prewrite=prewrite)

    monkeypatch.setattr(spool, "_add_pool_batch", traced)
    for i in range(POOL_LOW_WATER):  # a stream: one instance every 20 ms
        spool.store(_info(f"1.{i}"), [b"x" * 12_000], padding=Padding.EXPLICIT_VR)
        time.sleep(0.02)
    wait_for(lambda: len(spool._ready) == pool_files, "the pool stocked after the stream")
    assert batches and all(prewrite for prewrite, _ in batches)  # no empty files were needed
    assert all(since >= RECEIVING_GAP_S for _, since in batches), batches
    spool.close()


def test_a_pre_write_batch_stops_when_an_instance_arrives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh agent pre-writes its pool while the first series may already arrive: the batch
    being written stops after its current file, and pre-writing resumes only once the stream
    pauses (``RECEIVING_GAP_S``), so the instances' flushes do not queue behind the pool's."""
    writing, go_on = threading.Event(), threading.Event()
    filler_writes: list[float] = []
    real = spool_module.write_all

    def held(fd: int, parts: list[bytes]) -> int:
        if threading.current_thread().name == "hust19-spool-pool":
            filler_writes.append(time.monotonic())
            writing.set()
            go_on.wait(10)
        return real(fd, parts)

    monkeypatch.setattr(spool_module, "write_all", held)
    spool = Spool(tmp_path, pool_files=POOL_BATCH, pool_file_bytes=CAPACITY)
    try:
        assert writing.wait(10), "the filler started pre-writing"
        assert spool.store(_info("1.1"), [b"x" * 12_000],
                           padding=Padding.EXPLICIT_VR) is StoreOutcome.STORED
        arrived = spool._last_store
        go_on.set()
        wait_for(lambda: len(spool._ready) >= POOL_BATCH - 1, "the pool stocked afterwards")
        early = [t - arrived for t in filler_writes[1:] if t < arrived + RECEIVING_GAP_S]
        assert not early, f"{len(early)} pool files pre-written while the instance arrived"
    finally:
        go_on.set()
        spool.close()


def test_an_answered_instance_whose_index_row_fails_is_kept_and_indexed_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sealed: Success may be answered between ``write`` and ``index``. A failed index row
    after the answer keeps the file and is retried (``index_unindexed``) until it works; one
    before the answer removes the file (the sender is told the store failed)."""
    spool = _stocked(tmp_path)
    assert spool.durable_before_index
    failures = [sqlite3.OperationalError("database or disk is full")] * 2
    real = Spool._index_locked

    def flaky(db: sqlite3.Connection, info: InstanceInfo, rel: str, size: int) -> bool:
        if failures:
            raise failures.pop()
        return real(db, info, rel, size)

    monkeypatch.setattr(Spool, "_index_locked", staticmethod(flaky))
    head, body = _sample()
    written = spool.write(_info("1.1"), [head, body], padding=Padding.EXPLICIT_VR)
    assert written is not None
    with pytest.raises(SpoolError, match="the sealed file is kept"):
        spool.index(written, answered=True)
    assert written.path.exists() and spool.instance_count() == 0
    with pytest.raises(SpoolError):
        spool.index_unindexed()  # still failing: kept for the next call
    assert spool.index_unindexed() == 1
    assert spool.index_unindexed() == 0
    assert spool.read(spool.pending()[0]) == head + body

    failures.append(sqlite3.OperationalError("disk I/O error"))
    before = spool.write(_info("1.2"), [head, body], padding=Padding.EXPLICIT_VR)
    assert before is not None
    with pytest.raises(SpoolError):
        spool.index(before, answered=False)
    assert not before.path.exists() and spool.index_unindexed() == 0
    assert spool.write(_info("1.1"), [head, body], padding=Padding.EXPLICIT_VR) is None
    spool.close()
