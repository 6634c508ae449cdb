"""A full data disk, for real: a tmpfs of a few MiB (tests/fixtures/filesystems.py).

Issue 20, item 9: the pre-written spool pool took 91 % of a small data disk at start; the
embedded bus called a write that failed on a full disk "a write interrupted by a crash". And
the disk-full run of the issue (0xA700, /readyz 503, recovered with 0 lost) as a test."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.app import Agent
from agent.bus.embedded import EmbeddedBus
from agent.ingest.spool import POOL_FILE_BYTES, POOL_MAX_FREE_SHARE, Spool
from agent.ingest.status import StoreStatus
from schemas import topics
from schemas.errors import BusError
from tests.fixtures.dicom import associate, copy_series, free_port, read_topic, wait_for
from tests.fixtures.faults import readyz
from tests.fixtures.filesystems import tmpfs

MIB = 1 << 20


def test_the_pre_written_pool_takes_a_bounded_share_of_a_small_disk(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.ingest.spool")
    with tmpfs(tmp_path / "small", 20) as disk:
        spool = Spool(disk, pool_files=256, pool_file_bytes=POOL_FILE_BYTES)
        try:
            wait_for(lambda: "pre-written pool files" in caplog.text, "the bound to be logged")
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            wait_for(lambda: len(spool._ready) * POOL_FILE_BYTES >= POOL_MAX_FREE_SHARE * free
                     - POOL_FILE_BYTES, "the bounded pool to be written")
            total = os.statvfs(disk).f_blocks * os.statvfs(disk).f_frsize
            used_by_pool = len(spool._ready) * POOL_FILE_BYTES
            assert 0 < used_by_pool <= POOL_MAX_FREE_SHARE * total + POOL_FILE_BYTES
            assert len(spool._ready) < 256  # 256 x 576 KiB would not even fit
        finally:
            spool.close()


def test_a_bus_write_that_fails_on_a_full_disk_is_cut_and_not_called_a_crash(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.bus.embedded")
    with tmpfs(tmp_path / "small", 4) as disk:
        bus = EmbeddedBus(disk / "bus")
        producer = bus.producer()
        sent = 0
        with pytest.raises(BusError, match="No space left"):
            for _ in range(64):
                producer.send("t", b"k", os.urandom(256 * 1024))
                sent += 1
        producer.close()
        bus.close()
        assert any("a write failed" in r.getMessage() and "was cut off" in r.getMessage()
                   for r in caplog.records)
        caplog.clear()
        again = EmbeddedBus(disk / "bus")  # reopened: nothing left to recover
        assert again.log("t").count() == sent
        again.close()
        assert "interrupted" not in caplog.text and "truncating" not in caplog.text


def test_full_disk_answers_out_of_resources_and_loses_nothing_acknowledged(
        running_agent: Callable[..., Agent], tmp_path: Path) -> None:
    """The agent on a 64 MiB data disk, 48 MiB of it taken by a filler file: a 40-instance
    series (~21 MB, twice that once spooled and on the embedded bus) fills it. Instances
    that fit are answered Success, then 0xA700 Out of Resources (never Success for an
    instance not on disk), /readyz says 503; with the filler removed the sender resends what
    failed: every instance on the bus exactly once."""
    files = copy_series(tmp_path / "series", copies=2, limit=20)
    http = free_port()
    with tmpfs(tmp_path / "disk", 64) as disk:
        filler = disk / "filler"
        filler.write_bytes(bytes(48 * MIB))
        agent = running_agent(data_dir=disk / "data", http_port=http, spool_pool_files=4,
                              series_quiet_s=0.5)
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
        assoc = associate(ae, agent.port)
        statuses = [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
        assoc.release()
        ok = [f for f, s in zip(files, statuses, strict=True) if s == StoreStatus.SUCCESS]
        refused = [f for f, s in zip(files, statuses, strict=True) if s != StoreStatus.SUCCESS]
        assert ok and refused, statuses
        assert {s for s in statuses if s} == {StoreStatus.OUT_OF_RESOURCES}
        status, report = readyz(http)
        assert status == 503 and report["spool"] != "ok"
        filler.unlink()
        assoc = associate(ae, agent.port)
        again = [int(assoc.send_c_store(dcmread(f)).Status) for f in refused]
        assoc.release()
        assert set(again) == {0}
        messages = read_topic(agent.bus, topics.DICOM_INSTANCES, len(files), timeout_s=60)
        sops = [m.header(topics.H_SOP_INSTANCE_UID) for m in messages]
        assert len(sops) == len(set(sops)) == len(files)  # every one, once
        wait_for(lambda: readyz(http)[0] == 200, "/readyz to recover", 20)
