"""The PACS sender against dcmtk ``storescp`` as the PACS: delivery, outage and recovery,
a refusing destination, restart, C-ECHO.

The ``storescp`` fixture below is local to this module (tests/fixtures/dicom.py offered none
when this was written); it can move there."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from highdicom.sr import MeasurementReport, srread
from pydicom import Dataset

from agent.bus.embedded import EmbeddedBus
from agent.config import PacsDestination, load_settings
from agent.ops.metrics import Metrics
from agent.triage.pacs import (
    MAX_RETRY_S,
    OBJECTS_DIR,
    OUTBOX_SUBDIR,
    PROBE_INTERVAL_S,
    REFUSED_DIR,
    BusDeadLetters,
    DimseStatus,
    PacsSender,
    destination_key,
    echo,
    is_delivered,
    status_meaning,
    verify,
)
from agent.triage.sr import CATEGORY_CODES, TRIAGE_CATEGORY, SrSource, build_sr
from schemas.errors import ConfigError, InputError, PacsError
from schemas.messages import DeadLetter
from tests.agent.triage.test_sr import VERSION, dsrdump, make_result, source_from
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
        return self.start_with()

    def start_with(self, *extra: str) -> StoreScp:
        """Start it with ``extra`` storescp options (e.g. ``--sleep-during 2``)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [dcmtk("storescp"), "--aetitle", PACS_AET, "--output-directory", str(self.out_dir),
               "+uf", "--filename-extension", ".dcm", "+xa", *extra]
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
    caplog.set_level(logging.INFO, logger="agent.triage.pacs")
    pacs = storescp(start=False)  # down
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET,
                        retry_base_s=0.2, retry_max_s=0.4, timeout_s=5, poll_s=0.2)
    sender.start()
    try:
        sender.enqueue(sr)
        assert wait_for(lambda: "no connection" in caplog.text, 10)
        assert sr.SOPInstanceUID in caplog.text and sr.StudyInstanceUID in caplog.text
        assert wait_for(lambda: caplog.text.count("next attempt in") >= 2, 10)  # backoff
        assert sender.pending_count() == 1
        pacs.start()  # up
        assert wait_for(lambda: sender.pending_count() == 0)
    finally:
        assert sender.stop(10)  # no pass after this: what arrived is all that will
    (arrived,) = pacs.received()  # +uf: a duplicate arrival would be a second file
    assert pydicom.dcmread(arrived).SOPInstanceUID == sr.SOPInstanceUID
    assert caplog.text.count("next attempt in") >= 2


def test_refusing_destination_goes_to_the_dlq_once_others_still_get_it(
        storescp: Callable[..., StoreScp], sr: Dataset, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """dcmtk ``storescp --refuse`` rejects every association permanently: the SR goes to the
    dead-letter topic for that destination (not endless retry), the good one gets it once.
    pynetdicom sometimes sees only the closed connection (transient): then the next pass
    sees the rejection."""
    caplog.set_level(logging.INFO, logger="agent.triage.pacs")
    refusing, good = storescp(refuse=True), storescp()
    bus = EmbeddedBus(tmp_path / "bus")
    metrics = Metrics()
    sender = PacsSender([refusing.destination, good.destination], tmp_path / "outbox",
                        CALLING_AET, timeout_s=5, metrics=metrics,
                        dead_letter=BusDeadLetters(bus, metrics))
    sender.enqueue(sr)
    assert sender.pending_count() == 2
    assert sender.send_pending_once() == 1
    _send_until_settled(sender)
    assert sender.pending_count() == 0
    (dead,) = _dead_letters(bus)
    assert str(refusing.destination) in dead.reason and "rejected" in dead.reason
    assert dead.study_uid == sr.StudyInstanceUID and dead.headers["sop_instance_uid"] == \
        sr.SOPInstanceUID
    assert pydicom.dcmread(BytesIO(base64.b64decode(dead.value_b64))).SOPInstanceUID == \
        sr.SOPInstanceUID
    kept = tmp_path / "outbox" / REFUSED_DIR / destination_key(refusing.destination)
    assert (kept / f"{sr.SOPInstanceUID}.dcm").is_file()
    assert "rejected" in json.loads((kept / f"{sr.SOPInstanceUID}.json").read_text())["reason"]
    assert metrics.registry.get_sample_value("hust19_sr_refused_total", {
        "destination": str(refusing.destination), "reason": "association_rejected"}) == 1
    refusals = [r.getMessage() for r in caplog.records if "for good" in r.getMessage()]
    assert len(refusals) == 1 and sr.StudyInstanceUID in refusals[0]
    assert len(good.received()) == 1  # the good one got it once, and not again
    assert refusing.received() == []
    bus.close()


def test_a_refused_sr_is_sent_once_the_pacs_is_fixed_by_dlq_retry(
        storescp: Callable[..., StoreScp], sr: Dataset, tmp_path: Path) -> None:
    """The IT side of a refusal: ``hust19 dlq list`` shows the dead letter with its retry
    command; after the PACS is fixed (here: the refusing storescp replaced by one that
    accepts, same address), ``hust19 dlq retry`` puts the SR back in the outbox for that PACS
    and the running sender delivers it. A wrong offset is a clear error."""
    import sys

    data = tmp_path / "data"
    refusing = storescp(refuse=True)
    bus = EmbeddedBus(data / "bus")
    sender = PacsSender([refusing.destination], data / "sr-outbox", CALLING_AET, timeout_s=5,
                        dead_letter=BusDeadLetters(bus))
    sender.enqueue(sr)
    _send_until_settled(sender)
    assert sender.pending_count() == 0 and len(_dead_letters(bus)) == 1

    def hust19(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", "dlq", *args, "--data-dir",
                               str(data)], capture_output=True, text=True, timeout=60)

    listed = hust19("list")
    assert listed.returncode == 0, listed.stderr
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["retry"] == f"hust19 dlq retry {entry['offset']}"
    assert str(refusing.destination) in entry["reason"]
    wrong = hust19("retry", str(entry["offset"] + 7))
    assert wrong.returncode != 0 and "no dead letter at triage.dlq[0]@" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    refusing.stop()
    fixed = storescp(port=refusing.port)
    done = hust19("retry", str(entry["offset"]))
    assert done.returncode == 0, done.stderr
    assert f"SR {sr.SOPInstanceUID} queued again for {refusing.destination}" in done.stdout
    assert sender.pending_count() == 1
    sender.send_pending_once()
    assert sender.pending_count() == 0
    (got,) = fixed.received()
    assert pydicom.dcmread(got).SOPInstanceUID == sr.SOPInstanceUID
    refused_dir = data / "sr-outbox" / REFUSED_DIR / destination_key(refusing.destination)
    assert not list(refused_dir.iterdir())  # the kept copy went back into the outbox
    bus.close()


def _send_until_settled(sender: PacsSender, passes: int = 40) -> None:
    """Sending passes until nothing is pending: a pass that saw a refusing storescp only as a
    closed connection (``REFUSED``: about half of them) takes it as transient and retries."""
    for _ in range(passes):
        if sender.pending_count() == 0:
            return
        sender.send_pending_once()


def _dead_letters(bus: EmbeddedBus) -> list[DeadLetter]:
    from agent.ops.dlq import read_entries

    return [entry.letter for entry in read_entries(bus)]


@dataclass
class PynetdicomPacs:
    """A pynetdicom Storage SCP as a PACS that refuses in ways dcmtk ``storescp`` cannot: a
    calling-AE allow-list without us, no SR presentation context, a failure status."""

    port: int
    received: list[str]
    server: Any

    @property
    def destination(self) -> PacsDestination:
        return PacsDestination(host="127.0.0.1", port=self.port, ae_title=PACS_AET)


@pytest.fixture
def pynetdicom_pacs() -> Iterator[Callable[..., PynetdicomPacs]]:
    servers: list[Any] = []

    def start(*, status: int = 0, allow: list[str] | None = None,
              sr_context: bool = True) -> PynetdicomPacs:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            ComprehensiveSRStorage,
            CTImageStorage,
            Verification,
        )

        received: list[str] = []

        def on_store(event: Any) -> int:
            received.append(str(event.request.AffectedSOPInstanceUID))
            return status

        ae = AE(ae_title=PACS_AET)
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage)
        if sr_context:
            ae.add_supported_context(ComprehensiveSRStorage)
        if allow:
            ae.require_calling_aet = allow
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)])
        servers.append(server)
        return PynetdicomPacs(port, received, server)

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize(("kind", "reason"), [
    ("not_authorised", "0x0124"), ("rejects_our_ae", "association_rejected"),
    ("no_sr_context", "association_rejected")])
def test_permanent_refusals_go_to_the_dlq_not_into_endless_retry(
        pynetdicom_pacs: Callable[..., PynetdicomPacs], sr: Dataset, tmp_path: Path,
        kind: str, reason: str) -> None:
    pacs = pynetdicom_pacs(status=DimseStatus.REFUSED_NOT_AUTHORISED) if kind == \
        "not_authorised" else pynetdicom_pacs(allow=["SOMEONE"]) if kind == \
        "rejects_our_ae" else pynetdicom_pacs(sr_context=False)
    bus = EmbeddedBus(tmp_path / "bus")
    metrics = Metrics()
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET, timeout_s=5,
                        metrics=metrics, dead_letter=BusDeadLetters(bus, metrics))
    sender.enqueue(sr)
    assert sender.send_pending_once() == 0
    assert sender.pending_count() == 0  # not retried
    (dead,) = _dead_letters(bus)
    assert dead.error_type == "PacsError" and sr.SOPInstanceUID in dead.reason
    expected = {"not_authorised": "0x0124 Failure: Refused: Not Authorised",
                "rejects_our_ae": "Calling AE title not recognised",
                "no_sr_context": "does not store this SOP class"}[kind]
    assert expected.lower() in dead.reason.lower(), dead.reason
    assert metrics.registry.get_sample_value("hust19_sr_refused_total", {
        "destination": str(pacs.destination), "reason": reason}) == 1
    with pytest.raises(PacsError, match=r"refuses|not Comprehensive SR") if kind != \
            "not_authorised" else contextlib.nullcontext():
        verify(pacs.destination, CALLING_AET, timeout_s=5)
    bus.close()


def test_out_of_resources_is_retried_with_backoff(
        pynetdicom_pacs: Callable[..., PynetdicomPacs], sr: Dataset, tmp_path: Path) -> None:
    pacs = pynetdicom_pacs(status=0xA700)
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET, timeout_s=5)
    sender.enqueue(sr)
    assert sender.send_pending_once() == 0 and sender.send_pending_once() == 0
    assert sender.pending_count() == 1 and len(pacs.received) == 2


def test_a_pacs_back_up_gets_its_sr_at_once_not_at_the_end_of_the_backoff(
        storescp: Callable[..., StoreScp], sr: Dataset, tmp_path: Path) -> None:
    """Issue 20, item 7: backoff 20 s after the first failure; the PACS comes back 1 s later
    and the probe (TCP connect every second) sends the SR within about a second."""
    pacs = storescp(start=False)
    sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET,
                        retry_base_s=20, retry_max_s=MAX_RETRY_S, timeout_s=5, poll_s=60)
    sender.start()
    try:
        sender.enqueue(sr)
        assert wait_for(lambda: sender._backoff[pacs.destination].failures == 1, 10)
        pacs.start()
        up = time.monotonic()
        assert wait_for(lambda: sender.pending_count() == 0, 10)
        assert time.monotonic() - up < PROBE_INTERVAL_S + 3
    finally:
        assert sender.stop(10)
    assert len(pacs.received()) == 1
    with pytest.raises(InputError, match="at most 30 s"):
        PacsSender([pacs.destination], tmp_path / "o2", CALLING_AET, retry_max_s=300)


def test_verify_checks_the_sr_sop_class_from_our_ae(storescp: Callable[..., StoreScp]) -> None:
    found = verify(storescp().destination, CALLING_AET, timeout_s=5)
    assert "accepts Comprehensive SR Storage from AE 'HUST19'" in found


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
    caplog.set_level(logging.INFO, logger="agent.triage.pacs")
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


def test_a_slow_pacs_gets_the_sr_once(storescp: Callable[..., StoreScp], sr: Dataset,
                                      tmp_path: Path) -> None:
    """dcmtk storescp sleeping 2 s inside the C-STORE (``--sleep-during``): the SR is stored,
    once (``+uf`` would show a second arrival), within the sender's timeout."""
    pacs = StoreScp(port=free_port(), out_dir=tmp_path / "slow")
    pacs.start_with("--sleep-during", "2")
    try:
        sender = PacsSender([pacs.destination], tmp_path / "outbox", CALLING_AET, timeout_s=10)
        sender.enqueue(sr)
        assert sender.send_pending_once() == 1
        assert sender.pending_count() == 0
    finally:
        pacs.stop()
    assert len(pacs.received()) == 1


def test_srs_go_over_tls_to_a_pacs_that_requires_it(storescp: Callable[..., StoreScp],
                                                      sr: Dataset, tmp_path: Path) -> None:
    """dcmtk storescp with TLS, trusting our CA and requiring a client certificate: with
    pacs_tls and the CA the SR arrives, the agent presenting tls_cert; without the CA (the
    system's CAs do not know the test CA) it is not sent and stays in the outbox."""
    from agent.triage.pacs import tls_context_for
    from tests.fixtures.hostile import make_tls_files

    files = make_tls_files(tmp_path / "tls")
    pacs = storescp(start=False).start_with(
        "+tls", str(files["server_key"]), str(files["server_cert"]), "+cf", str(files["ca"]))
    common = {"data_dir": tmp_path / "agent", "pacs": [str(pacs.destination)],
              "ae_title": CALLING_AET, "pacs_tls": True, "tls_cert": files["client_cert"],
              "tls_key": files["client_key"]}
    untrusted = PacsSender.from_settings(load_settings(None, common))
    untrusted.enqueue(sr)
    assert untrusted.send_pending_once() == 0 and untrusted.pending_count() == 1
    assert pacs.received() == []
    settings = load_settings(None, {**common, "pacs_tls_ca": files["ca"]})
    assert verify(pacs.destination, CALLING_AET, tls_context=tls_context_for(settings))
    sender = PacsSender.from_settings(settings)
    assert sender.send_pending_once() == 1 and sender.pending_count() == 0
    (arrived,) = pacs.received()
    assert pydicom.dcmread(arrived).SOPInstanceUID == sr.SOPInstanceUID
    assert tls_context_for(load_settings(None, {"data_dir": tmp_path})) is None
    with pytest.raises(ConfigError, match="pacs_tls_ca"):
        tls_context_for(load_settings(None, {"data_dir": tmp_path, "pacs_tls": True,
                                             "pacs_tls_ca": tmp_path / "missing.pem"}))
