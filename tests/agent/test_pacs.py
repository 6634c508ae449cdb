"""The PACS sender against dcmtk ``storescp`` as the PACS: delivery, outage and recovery,
a refusing destination, restart, C-ECHO.

The ``storescp`` fixture below is local to this module (tests/fixtures/dicom.py offered none
when this was written); it can move there."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from highdicom.sr import MeasurementReport, srread
from pydicom import Dataset

from agent.config import PacsDestination, load_settings
from agent.pacs import (
    OBJECTS_DIR,
    OUTBOX_SUBDIR,
    DimseStatus,
    PacsSender,
    echo,
    is_delivered,
    status_meaning,
)
from agent.sr import CATEGORY_CODES, TRIAGE_CATEGORY, SrSource, build_sr
from schemas.errors import InputError, PacsError
from tests.agent.test_sr import VERSION, dsrdump, make_result, source_from
from tests.fixtures.dicom import dcmtk, free_port, is_listening, stop_process

PACS_AET = "PACS"
CALLING_AET = "HUST19"
REFUSED = re.compile(r"association rejected|no connection")
"""What a refusing dcmtk storescp looks like from pynetdicom: it sends A-ASSOCIATE-RJ and
closes at once, and pynetdicom sees either the rejection or (in about half of the tries
measured here) only the closed connection."""


@dataclass
class StoreScp:
    """A dcmtk ``storescp`` on localhost writing every received object to its own file
    (``+uf``: a second arrival of the same SOP Instance is a second file, so counting files
    counts arrivals)."""

    port: int
    out_dir: Path
    refuse: bool = False
    abort_after: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def destination(self) -> PacsDestination:
        return PacsDestination(host="127.0.0.1", port=self.port, ae_title=PACS_AET)

    def start(self) -> StoreScp:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [dcmtk("storescp"), "--aetitle", PACS_AET, "--output-directory", str(self.out_dir),
               "+uf", "--filename-extension", ".dcm", "+xa"]
        if self.refuse:
            cmd.append("--refuse")
        if self.abort_after:
            cmd.append("--abort-after")
        self.proc = subprocess.Popen([*cmd, str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until it listens
            if self.proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {self.proc.returncode}")
            if is_listening(self.port):
                return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def received(self) -> list[Path]:
        return sorted(self.out_dir.glob("*.dcm"))


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreScp]]:
    """Factory: ``storescp(start=True, refuse=False, abort_after=False, port=None)``; all
    stopped at teardown. ``refuse``: rejects every association; ``abort_after``: aborts after
    receiving the C-STORE request, before answering it."""
    started: list[StoreScp] = []

    def make(*, start: bool = True, refuse: bool = False, abort_after: bool = False,
             port: int | None = None) -> StoreScp:
        scp = StoreScp(port=port or free_port(), out_dir=tmp_path / f"pacs{len(started)}",
                       refuse=refuse, abort_after=abort_after)
        started.append(scp)
        return scp.start() if start else scp

    yield make
    for scp in started:
        scp.stop()


@pytest.fixture(scope="module")
def source(chest_series: Path) -> SrSource:
    return source_from(chest_series / "normal001")


@pytest.fixture(scope="module")
def sr(source: SrSource) -> Dataset:
    return build_sr(make_result(source, "type2", cf=True), source, algorithm_version=VERSION)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_sr_arrives_and_reads_back(storescp: Callable[..., StoreScp], sr: Dataset,
                                   source: SrSource, tmp_path: Path) -> None:
    pacs = storescp()
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET)
    assert sender.enqueue(sr) == sr.SOPInstanceUID
    assert sender.pending_count() == 1
    assert sender.send_pending_once() == 1
    assert sender.pending_count() == 0
    assert list((tmp_path / "outbox" / OBJECTS_DIR).iterdir()) == []  # nothing left behind

    (arrived,) = pacs.received()
    dump = dsrdump(arrived)
    assert '(TYPE2,99HUST19,"Type II (severe or critically ill COVID-19)")' in dump
    assert all(f'(CT image,"{uid}")' in dump for _, uid in source.evidence)
    back = srread(arrived)
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    assert back.StudyInstanceUID == source.study_uid
    assert {e[1] for e in back.get_evidence()} == {source.series_uid}
    report = back.content
    assert isinstance(report, MeasurementReport)  # TID 1500 recognised on read
    (group,) = report.get_image_measurement_groups()
    (category,) = group.get_qualitative_evaluations(name=TRIAGE_CATEGORY)
    assert category.value == CATEGORY_CODES["type2"]
    assert pydicom.dcmread(arrived).ContentSequence == sr.ContentSequence


def test_pacs_down_then_up_the_sr_arrives_once(storescp: Callable[..., StoreScp], sr: Dataset,
                                               tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.pacs")
    pacs = storescp(start=False)  # down
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET,
                        retry_base_s=0.2, retry_max_s=0.4, timeout_s=5, poll_s=0.2)
    sender.start()
    try:
        sender.enqueue(sr)
        assert wait_for(lambda: "no connection" in caplog.text, 10)
        assert sr.SOPInstanceUID in caplog.text and sr.StudyInstanceUID in caplog.text
        time.sleep(1.0)  # several failed attempts with backoff
        assert sender.pending_count() == 1
        pacs.start()  # up
        assert wait_for(lambda: sender.pending_count() == 0)
        time.sleep(1.0)  # no late duplicate
    finally:
        assert sender.stop(10)
    (arrived,) = pacs.received()
    assert pydicom.dcmread(arrived).SOPInstanceUID == sr.SOPInstanceUID
    assert caplog.text.count("next attempt in") >= 2


def test_refusing_destination_is_logged_and_retried_others_still_get_it(
        storescp: Callable[..., StoreScp], sr: Dataset, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.pacs")
    refusing, good = storescp(refuse=True), storescp()
    sender = PacsSender([refusing.destination, good.destination], tmp_path / "outbox",
                        CALLING_AET, timeout_s=5)
    sender.enqueue(sr)
    assert sender.pending_count() == 2
    assert sender.send_pending_once() == 1
    assert sender.pending_count() == 1  # still pending for the refusing one
    refusals = [r for r in caplog.records if r.levelno >= logging.ERROR
                and REFUSED.search(r.getMessage())]
    assert len(refusals) == 1
    message = refusals[0].getMessage()
    assert str(refusing.destination) in message
    assert sr.SOPInstanceUID in message and sr.StudyInstanceUID in message

    assert sender.send_pending_once() == 0  # retried, refused again
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR
                and REFUSED.search(r.getMessage())]) == 2
    assert len(good.received()) == 1  # the good one got it once, and not again
    assert refusing.received() == []


def test_restarted_sender_resumes_from_the_outbox(storescp: Callable[..., StoreScp],
                                                  sr: Dataset, tmp_path: Path) -> None:
    pacs = storescp(start=False)
    first = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET, timeout_s=5)
    first.enqueue(sr)
    assert first.send_pending_once() == 0  # PACS down
    del first  # "crash"

    pacs.start()
    second = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET, timeout_s=5)
    assert second.pending_count() == 1
    assert second.send_pending_once() == 1
    assert second.pending_count() == 0
    assert len(pacs.received()) == 1


def test_reenqueue_is_idempotent(storescp: Callable[..., StoreScp], sr: Dataset,
                                 tmp_path: Path) -> None:
    pacs = storescp()
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET)
    sender.enqueue(sr)
    sender.enqueue(sr)  # a redo of the same series: same UID, replaces the queued one
    assert sender.pending_count() == 1
    assert len(list((tmp_path / "outbox" / OBJECTS_DIR).iterdir())) == 1
    assert sender.send_pending_once() == 1
    (arrived,) = pacs.received()
    assert pydicom.dcmread(arrived).SOPInstanceUID == sr.SOPInstanceUID


def test_echo(storescp: Callable[..., StoreScp], tmp_path: Path) -> None:
    pacs = storescp()
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET, timeout_s=5)
    assert sender.echo(pacs.destination) is True
    down = PacsDestination(host="127.0.0.1", port=free_port(), ae_title=PACS_AET)
    assert sender.echo(down) is False
    assert sender.echo(storescp(refuse=True).destination) is False


def test_module_echo_raises_pacs_error_with_the_reason(storescp: Callable[..., StoreScp]) -> None:
    echo(storescp().destination, CALLING_AET, timeout_s=5)  # Success: returns
    with pytest.raises(PacsError, match=REFUSED):
        echo(storescp(refuse=True).destination, CALLING_AET, timeout_s=5)
    down = PacsDestination(host="127.0.0.1", port=free_port(), ae_title=PACS_AET)
    with pytest.raises(PacsError, match="no connection"):
        echo(down, CALLING_AET, timeout_s=5)


def test_enqueue_refuses_a_dataset_without_valid_uids(tmp_path: Path) -> None:
    sender = PacsSender([], tmp_path / "outbox", CALLING_AET)
    bad = Dataset()
    bad.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    bad.SOPInstanceUID = "09bc8aea-ff9c-4106-8514-294cbcf9a082"
    bad.StudyInstanceUID = "1.2.3"
    with pytest.raises(InputError, match="SOPInstanceUID"):
        sender.enqueue(bad)


def test_abort_before_the_response_keeps_the_sr_pending(storescp: Callable[..., StoreScp],
                                                       sr: Dataset, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.pacs")
    pacs = storescp(abort_after=True)
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET, timeout_s=5)
    sender.enqueue(sr)
    assert sender.send_pending_once() == 0
    assert sender.pending_count() == 1  # no Success seen: it will be sent again (same UID)
    (record,) = [r for r in caplog.records if "no C-STORE response" in r.getMessage()]
    assert sr.SOPInstanceUID in record.getMessage()
    assert sr.StudyInstanceUID in record.getMessage()


def test_status_codes_are_named() -> None:
    assert status_meaning(DimseStatus.SUCCESS) == "0x0000 Success: Success"
    assert status_meaning(0xA701) == "0xA701 Failure: Refused: Out of Resources"
    assert status_meaning(DimseStatus.WARNING_COERCION_OF_DATA_ELEMENTS) == \
        "0xB000 Warning: Coercion of Data Elements"
    assert status_meaning(DimseStatus.REFUSED_NOT_AUTHORISED) == \
        "0x0124 Failure: Refused: Not Authorised"


@pytest.mark.parametrize(("code", "delivered"), [
    (DimseStatus.SUCCESS, True), (DimseStatus.WARNING_ELEMENTS_DISCARDED, True),
    (DimseStatus.DUPLICATE_SOP_INSTANCE, True), (0xA700, False), (0xC000, False),
    (DimseStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED, False), (DimseStatus.PROCESSING_FAILURE, False),
])
def test_which_statuses_count_as_delivered(code: int, delivered: bool) -> None:
    assert is_delivered(code) is delivered


def test_from_settings_uses_the_data_dir_outbox(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={
        "data_dir": tmp_path, "pacs": ["127.0.0.1:11112:PACS", "pacs2:104:ARCHIVE"]})
    sender = PacsSender.from_settings(settings)
    assert (tmp_path / OUTBOX_SUBDIR / OBJECTS_DIR).is_dir()
    assert sender.pending_count() == 0
    assert len(list((tmp_path / OUTBOX_SUBDIR / "pending").iterdir())) == 2
