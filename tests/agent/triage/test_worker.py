"""The triage worker end to end with real peers: dcmtk storescu -> agent -> dcmtk storescp as
PACS; the embedded bus and the Kafka-protocol test broker (two workers in one group); SQLite
and PostgreSQL as the LIS; kill -9 of a worker mid-series."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from agent.app import ALL_ROLES, ROLE_INGEST, ROLE_WORKER, Agent
from agent.cli.commands.lis import import_ictcf
from schemas import topics
from schemas.messages import DeadLetter, EvidenceThumbnails, TriageResult
from tests.fixtures.dicom import (
    LINKED_ICTCF_PATIENT,
    SAMPLE,
    SAMPLE_PATIENT,
    copy_series,
    dcmtk,
    free_port,
    linked_lis,
    read_topic,
    run_storescu,
    stop_process,
)
from tests.fixtures.faults import wait_metric
from tests.fixtures.kafka import kafka_test_overrides

pytestmark = pytest.mark.slow

NORMAL_PATIENT = "99C628-ASAD"
SR_WAIT_S = 90.0


def _sample_files() -> list[Path]:
    return sorted(SAMPLE.glob("*.dcm"))


def _normal_files(chest_series: Path) -> list[Path]:
    """normal001: 154 slices of 2 mm, JPEG Lossless, valid UIDs (send with ``-xs``)."""
    return sorted((chest_series / "normal001").iterdir())


def _sr_files(pacs_dir: Path, timeout_s: float = SR_WAIT_S, count: int = 1) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(p for p in pacs_dir.iterdir() if p.name.startswith("SR"))
        if len(found) >= count:
            return found
        time.sleep(0.25)
    pytest.fail(f"{count} SR(s) expected at the PACS within {timeout_s} s, found "
                f"{[p.name for p in pacs_dir.iterdir()]}")


def _results(agent: Agent, count: int) -> list[TriageResult]:
    return [TriageResult.model_validate_json(m.value)
            for m in read_topic(agent.bus, topics.TRIAGE_RESULTS, count, SR_WAIT_S)]


def _dsrdump_ok(path: Path) -> str:
    proc = subprocess.run([dcmtk("dsrdump"), "-Ee", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _check_sr(path: Path, result: TriageResult) -> None:
    """The SR at the PACS is the result's: same UID, same study, references the source series
    and exactly the top-10 evidence slices."""
    dump = _dsrdump_ok(path)
    assert "Imaging Measurement Report" in dump and "COVID-19" in dump
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == result.sr_sop_instance_uid
    assert ds.StudyInstanceUID == result.study_uid
    assert ds.Modality == "SR"
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == result.study_uid
    series = {s.SeriesInstanceUID: s for s in evidence.ReferencedSeriesSequence}
    assert result.series_uid in series
    referenced = {i.ReferencedSOPInstanceUID
                  for i in series[result.series_uid].ReferencedSOPSequence}
    assert referenced == set(result.top_slices)
    assert len(result.top_slices) == 10


def test_series_to_sr_at_pacs_on_embedded_bus_with_sqlite_lis(
        running_agent: Callable[..., Agent], storescp: Callable[..., tuple[int, Path]],
        tmp_path: Path, shared_data: Path, chest_series: Path) -> None:
    """normal001 (JPEG Lossless) with labs: the quantitative CT, the patient CNN beside it,
    the CF model and the fusion rule in the result, the measurements in the SR, the evidence
    thumbnails on their topic."""
    pacs_port, pacs_dir = storescp(aet="PACS")
    lis = linked_lis(f"sqlite:///{tmp_path / 'lis.sqlite'}", shared_data, NORMAL_PATIENT)
    agent = running_agent(roles=ALL_ROLES, pacs=[f"127.0.0.1:{pacs_port}:PACS"], lis=lis,
                          allow_ae=["STORESCU"], series_quiet_s=1.0)
    files = _normal_files(chest_series)
    assert run_storescu(files, agent.port, "HUST19", extra=["-xs"]).returncode == 0

    (sr,) = _sr_files(pacs_dir)
    (result,) = _results(agent, 1)
    assert result.status == "triaged" and result.flag in ("control", "type1", "type2")
    assert result.revision == 1 and result.supersedes_sr_sop_instance_uid is None
    assert result.instance_count == len(files)
    assert result.patient_id == NORMAL_PATIENT
    assert result.availability is not None
    assert result.availability.ct and result.availability.cf
    assert result.availability.fusion == "rule"
    assert result.availability.ct_source == "quantitative"
    assert result.scores.ct and result.scores.cf and result.scores.fused and result.scores.ct_cnn
    assert result.scores.fused.control == pytest.approx(result.scores.cf.control)
    assert result.scores.ct.control > 0.5, "normal lungs on CT"
    quant = result.quantitative_ct
    assert quant is not None and quant.severity == "CT-0"
    assert quant.lungs.volume_ml is not None and 3000 < quant.lungs.volume_ml < 4000
    assert quant.lungs.involvement_percent is not None and quant.lungs.involvement_percent < 0.5
    assert set(result.model_versions) == {"slice", "patient", "cf", "fusion", "evidence"}
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert result.patient_name == (str(header.get("PatientName", "")) or None)
    assert result.study_date == header.StudyDate and len(result.study_date) == 8
    assert result.sr_destinations == [f"PACS@127.0.0.1:{pacs_port}"]
    codes = {v.code for v in result.lab_values}
    assert len(codes) == len(result.lab_values) > 10 and {"AGE", "ALB"} <= codes
    t = result.timings
    assert t.first_instance_received and t.last_instance_received and t.series_complete
    assert t.first_instance_received <= t.last_instance_received <= t.series_complete \
        <= t.result_ready
    sop_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert set(result.top_slices) <= sop_uids
    _check_sr(sr, result)
    dump = _dsrdump_ok(sr)
    assert "Lung involvement" in dump and '(mL,UCUM,"milliliter")' in dump
    (evidence,) = [EvidenceThumbnails.model_validate_json(m.value)
                   for m in read_topic(agent.bus, topics.TRIAGE_EVIDENCE, 1, SR_WAIT_S)]
    assert (evidence.result_id, evidence.revision) == (result.result_id, result.revision)
    assert [s.sop_instance_uid for s in evidence.slices] == result.top_slices
    assert all(base64.b64decode(s.png_b64).startswith(b"\x89PNG") for s in evidence.slices)


def test_thick_sample_series_is_triaged_on_labs_saying_why_ct_was_not(
        running_agent: Callable[..., Agent], storescp: Callable[..., tuple[int, Path]],
        tmp_path: Path, shared_data: Path) -> None:
    """The repository's 8 mm sample: lungs measured, no involvement (slices too thick), the
    flag from the labs, the patient CNN still reported."""
    pacs_port, pacs_dir = storescp(aet="PACS")
    lis = linked_lis(f"sqlite:///{tmp_path / 'lis.sqlite'}", shared_data)
    agent = running_agent(roles=ALL_ROLES, pacs=[f"127.0.0.1:{pacs_port}:PACS"], lis=lis,
                          series_quiet_s=1.0)
    assert run_storescu(_sample_files(), agent.port, "HUST19").returncode == 0
    (sr,) = _sr_files(pacs_dir)
    (result,) = _results(agent, 1)
    assert result.status == "triaged" and result.availability is not None
    assert not result.availability.ct and result.availability.cf
    assert result.availability.fusion == "cf_only"
    assert "8 mm thick" in (result.availability.ct_reason or "")
    assert result.scores.ct is None and result.scores.ct_cnn is not None
    quant = result.quantitative_ct
    assert quant is not None and quant.severity is None
    assert quant.lungs.volume_ml is not None and quant.lungs.involvement_percent is None
    _check_sr(sr, result)


def test_bad_input_is_skipped_or_dead_lettered_and_the_pipeline_goes_on(
        running_agent: Callable[..., Agent], storescp: Callable[..., tuple[int, Path]],
        tmp_path: Path) -> None:
    """Not chest, too short, undecodable bytes on the bus, LIS down: each gets its reason,
    and a good series after them is still triaged (CT-only, saying why)."""
    pacs_port, pacs_dir = storescp(aet="PACS")
    agent = running_agent(roles=ALL_ROLES, pacs=[f"127.0.0.1:{pacs_port}:PACS"],
                          lis="postgresql+psycopg://nobody@127.0.0.1:1/none",
                          series_quiet_s=1.0)
    garbage = b"this is not DICOM at all"
    raw = _sample_files()[0].read_bytes()
    modality = raw.find(b"\x08\x00\x60\x00CS")  # (0008,0060) Modality, explicit VR
    unknown_vr = raw[:modality + 4] + b"ZZ" + raw[modality + 6:]
    producer = agent.bus.producer()
    producer.send(topics.DICOM_INSTANCES, b"1.2.3.4", garbage,
                  [(topics.H_SERIES_UID, b"1.2.3.4")])
    producer.send(topics.DICOM_INSTANCES, b"1.2.3.5", unknown_vr,
                  [(topics.H_SERIES_UID, b"1.2.3.5")])
    producer.flush()
    producer.close()
    head = copy_series(tmp_path / "head", BodyPartExamined="HEAD")
    short = copy_series(tmp_path / "short", limit=5)
    for files in (head, short, _sample_files()):
        assert run_storescu(files, agent.port, "HUST19").returncode == 0

    dead, unreadable = [DeadLetter.model_validate_json(m.value)
                        for m in read_topic(agent.bus, topics.TRIAGE_DLQ, 2, SR_WAIT_S)]
    assert "not readable DICOM" in dead.reason
    assert base64.b64decode(dead.value_b64) == garbage
    assert dead.source_topic == topics.DICOM_INSTANCES
    assert "cannot be read: NotImplementedError" in unreadable.reason
    assert "'ZZ'" in unreadable.reason

    results = {r.series_uid: r for r in _results(agent, 3)}
    head_uid = pydicom.dcmread(head[0], stop_before_pixels=True).SeriesInstanceUID
    short_uid = pydicom.dcmread(short[0], stop_before_pixels=True).SeriesInstanceUID
    assert results[head_uid].status == "skipped"
    assert "not a chest series (BodyPartExamined HEAD)" in (results[head_uid].skip_reason or "")
    assert results[short_uid].status == "skipped"
    assert "too short to triage: 5" in (results[short_uid].skip_reason or "")
    sample_uid = pydicom.dcmread(_sample_files()[0], stop_before_pixels=True).SeriesInstanceUID
    last = results[sample_uid]  # 8 mm slices: no involvement; LIS down: no labs
    assert last.status == "skipped" and last.quantitative_ct is not None
    assert "8 mm thick" in (last.skip_reason or "")
    assert "LIS unreachable" in (last.skip_reason or "")
    assert not list(pacs_dir.iterdir()), "no SR for skipped series"


@pytest.mark.kafka
def test_two_workers_in_one_group_on_kafka_with_postgres_lis(
        running_agent: Callable[..., Agent], storescp: Callable[..., tuple[int, Path]],
        fresh_kafka_broker: str, postgres_url: str, shared_data: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in kafka_test_overrides().items():
        monkeypatch.setenv(f"HUST19_KAFKA_{key.upper()}", str(value))
    pacs_port, pacs_dir = storescp(aet="PACS")
    lis = linked_lis(postgres_url, shared_data)
    common = {"bus": fresh_kafka_broker, "lis": lis, "pacs": [f"127.0.0.1:{pacs_port}:PACS"],
              "series_quiet_s": 1.0}
    workers = [running_agent(roles=frozenset({ROLE_WORKER}), **common) for _ in range(2)]
    ingest = running_agent(roles=frozenset({ROLE_INGEST}), **common)
    deadline = time.monotonic() + 60
    while True:  # the group has settled: both workers own partitions, none twice
        owned = [w.worker.assignment if w.worker is not None else set() for w in workers]
        if all(owned) and not owned[0] & owned[1]:
            break
        assert time.monotonic() < deadline, f"both workers own partitions: {owned}"
        time.sleep(0.2)
    series = [_sample_files(), copy_series(tmp_path / "copy1"), copy_series(tmp_path / "copy2")]
    for files in series:
        assert run_storescu(files, ingest.port, "HUST19").returncode == 0

    results = _results(ingest, 3)
    by_series = {r.series_uid: r for r in results}
    assert len(by_series) == 3 and all(r.status == "triaged" for r in results)
    srs = _sr_files(pacs_dir, count=3)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in srs} == \
        {r.sr_sop_instance_uid for r in by_series.values()}
    sample_result = next(r for r in results if r.patient_id == SAMPLE_PATIENT
                         and r.series_uid == pydicom.dcmread(series[0][0]).SeriesInstanceUID)
    assert sample_result.availability is not None and sample_result.availability.cf


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_log(log: Path, needle: bytes, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in log.read_bytes():
        assert time.monotonic() < deadline, f"{needle!r} not in {log}: {log.read_text()}"
        time.sleep(0.1)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        stop_process(p, timeout_s=15)


def test_kill9_worker_mid_series_gives_exactly_one_sr(
        storescp: Callable[..., tuple[int, Path]], tmp_path: Path, shared_data: Path,
        processes: list[subprocess.Popen[bytes]]) -> None:
    pacs_port, pacs_dir = storescp(aet="PACS")
    data = tmp_path / "data"
    port = free_port()
    processes.append(_spawn(["ingest", "--data-dir", str(data), "--port", str(port),
                             "--host", "127.0.0.1", "--series-quiet-s", "3"],
                            tmp_path / "ingest.log"))
    lis = linked_lis(f"sqlite:///{tmp_path / 'lis.sqlite'}", shared_data)  # the SR needs labs
    worker_args = ["worker", "--data-dir", str(data), "--pacs", f"127.0.0.1:{pacs_port}:PACS",
                   "--lis", lis, "--log-level", "DEBUG"]
    http = free_port()
    first = _spawn([*worker_args, "--http-port", str(http)], tmp_path / "worker1.log")
    processes.append(first)
    _wait_log(tmp_path / "worker1.log", b"partitions assigned to this worker")  # joined
    assert run_storescu(_sample_files(), port, "HUST19").returncode == 0
    # mid-series: instances consumed and scored, the series not yet complete (3 s quiet)
    wait_metric(http, 'hust19_stage_seconds_count{stage="slice_inference"}', 1.0)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    assert not list(pacs_dir.iterdir()), "the series completed before the kill"

    second = _spawn(worker_args, tmp_path / "worker2.log")
    processes.append(second)
    (sr,) = _sr_files(pacs_dir)
    stop_process(second, timeout_s=30)  # stopped: nothing can arrive after this
    srs = sorted(p for p in pacs_dir.iterdir() if p.name.startswith("SR"))
    assert [p.name for p in srs] == [sr.name]  # +uf: a second arrival is a second file
    dump = subprocess.run([sys.executable, "-m", "agent.cli", "bus", "dump", "--topic",
                           topics.TRIAGE_RESULTS, "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert len(dump.stdout.splitlines()) == 1, "exactly one result on triage.results"
    _dsrdump_ok(sr)


def test_labs_that_arrive_later_are_a_new_revision_with_a_new_sr_naming_the_first(
        running_agent: Callable[..., Agent], storescp: Callable[..., tuple[int, Path]],
        tmp_path: Path, shared_data: Path, chest_series: Path) -> None:
    """Unknown patient at completion: a CT-only result saying so, and its SR. With
    lis_retry_s the lookup is retried; once the labs are in the LIS the result is re-issued
    fused as revision 2, with a NEW SR UID whose Predecessor Documents Sequence names the
    first SR (a PACS keeps the first copy of a UID, so one UID never carries two contents)."""
    pacs_port, pacs_dir = storescp(aet="PACS")
    lis = f"sqlite:///{tmp_path / 'lis.sqlite'}"
    import_ictcf(shared_data / "ictcf", lis, patient_ids=[LINKED_ICTCF_PATIENT])  # no alias yet
    agent = running_agent(roles=ALL_ROLES, pacs=[f"127.0.0.1:{pacs_port}:PACS"], lis=lis,
                          series_quiet_s=1.0, lis_retry_s=3.0)
    assert run_storescu(_normal_files(chest_series), agent.port, "HUST19",
                        extra=["-xs"]).returncode == 0
    (first,) = _results(agent, 1)
    assert first.availability is not None and not first.availability.cf
    assert first.availability.cf_reason == "patient not found in the LIS"
    assert first.revision == 1 and first.sr_sop_instance_uid is not None
    linked_lis(lis, shared_data, NORMAL_PATIENT)  # the labs (the alias) arrive
    first_again, second = _results(agent, 2)
    assert first_again == first
    assert second.result_id == first.result_id and second.revision == 2
    assert second.availability is not None and second.availability.cf
    assert second.availability.fusion == "rule"
    assert second.sr_sop_instance_uid not in (None, first.sr_sop_instance_uid)
    assert second.supersedes_sr_sop_instance_uid == first.sr_sop_instance_uid
    assert second.scores.ct == first.scores.ct
    assert second.quantitative_ct == first.quantitative_ct
    srs = {pydicom.dcmread(p).SOPInstanceUID: p for p in _sr_files(pacs_dir, count=2)}
    assert set(srs) == {first.sr_sop_instance_uid, second.sr_sop_instance_uid}
    replacing = pydicom.dcmread(srs[second.sr_sop_instance_uid])
    (study,) = replacing.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        first.sr_sop_instance_uid
    replaced = pydicom.dcmread(srs[first.sr_sop_instance_uid])
    assert series.SeriesInstanceUID == replaced.SeriesInstanceUID  # the ledger's, not derived
    assert "HUST-19 clinical-feature model" in _dsrdump_ok(srs[second.sr_sop_instance_uid])


def _series_event_committed(data: Path) -> Path:
    """The embedded bus's offset file of ``dicom.series``, once the worker committed the first
    completion event there (the series finished)."""
    groups, deadline = data / "bus" / "groups", time.monotonic() + SR_WAIT_S
    while not [p for p in groups.glob("*/dicom.series.offset.json")
               if b'"next_offset": 1' in p.read_bytes()]:
        assert time.monotonic() < deadline, "the worker never committed the series event"
        time.sleep(0.1)
    (series_offset,) = groups.glob("*/dicom.series.offset.json")
    return series_offset


def _triaged_then_stopped(running_agent: Callable[..., Agent],
                          storescp: Callable[..., tuple[int, Path]], tmp_path: Path,
                          shared_data: Path, monkeypatch: pytest.MonkeyPatch
                          ) -> tuple[dict[str, Any], TriageResult, Path]:
    """The sample series sent to a whole agent (a PACS, a linked LIS, a 0.5 s completion
    grace), triaged once, the series event committed, the agent stopped: the settings to start
    it again, the first result and the committed series offset file."""
    from agent.triage import worker as worker_module

    monkeypatch.setattr(worker_module, "EVENT_GRACE_S", 0.5)
    pacs_port, _ = storescp(aet="PACS")
    data = tmp_path / "data"
    settings = {"roles": ALL_ROLES, "data_dir": data, "pacs": [f"127.0.0.1:{pacs_port}:PACS"],
                "lis": linked_lis(f"sqlite:///{tmp_path / 'lis.sqlite'}", shared_data),
                "series_quiet_s": 1.0}
    agent = running_agent(**settings)
    files = _sample_files()
    assert run_storescu(files, agent.port, "HUST19").returncode == 0
    (first,) = _results(agent, 1)
    assert first.status == "triaged" and first.instance_count == len(files)
    series_offset = _series_event_committed(data)
    agent.stop(timeout_s=10.0)
    return settings, first, series_offset


def test_a_completion_event_read_again_without_its_instances_leaves_the_result_standing(
        running_agent: Callable[..., Agent], storescp: Callable[..., tuple[int, Path]],
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The group's commit is on ``dicom.instances`` but not on ``dicom.series`` (a crash between
    the two, or a bus that commits topics one by one): the restarted worker reads the series'
    completion event again without any of its instances. The published result stands; no
    "skipped: no instance of the series could be read" revision replaces it (seen on CI)."""
    settings, _first, series_offset = _triaged_then_stopped(
        running_agent, storescp, tmp_path, shared_data, monkeypatch)
    series_offset.unlink()  # the series topic's commit lost, the instances' kept
    caplog.set_level("WARNING", logger="agent.triage.worker")
    again = running_agent(**settings)
    deadline = time.monotonic() + SR_WAIT_S
    while "read again without any of its instances" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text[-2000:]
        time.sleep(0.1)
    results = [TriageResult.model_validate_json(m.value)
               for m in read_topic(again.bus, topics.TRIAGE_RESULTS, 1)]
    assert [(r.revision, r.status) for r in results] == [(1, "triaged")]


def test_a_late_instance_after_a_restart_does_not_replace_the_series_result(
        running_agent: Callable[..., Agent], storescp: Callable[..., tuple[int, Path]],
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One more slice of a triaged series arrives after the worker restarted: the new worker
    holds only that slice, not the 30 the published result was made from. No revision is made
    of it (it would replace the whole series' result); a dead letter says so, and retrying it
    triages the whole series again from the spool: revision 2, all 31 slices."""
    from agent.ops.dlq import read_entries, retry

    settings, first, _ = _triaged_then_stopped(running_agent, storescp, tmp_path, shared_data,
                                               monkeypatch)
    files = _sample_files()

    late = pydicom.dcmread(files[-1])
    late.SOPInstanceUID = pydicom.uid.generate_uid()
    late.InstanceNumber = int(late.InstanceNumber) + 1
    late.ImagePositionPatient[2] = float(late.ImagePositionPatient[2]) + float(
        late.SliceThickness)
    late.save_as(tmp_path / "late.dcm")
    again = running_agent(**settings)
    assert run_storescu([tmp_path / "late.dcm"], again.port, "HUST19").returncode == 0
    (letter,) = [DeadLetter.model_validate_json(m.value)
                 for m in read_topic(again.bus, topics.TRIAGE_DLQ, 1, SR_WAIT_S)]
    assert letter.series_uid == first.series_uid
    assert f"counts {len(files) + 1} instances; this worker read 1" in letter.reason
    assert "revision 1 before it started" in letter.reason
    assert [(r.revision, r.instance_count) for r in _results(again, 1)] == [(1, len(files))]

    (entry,) = read_entries(again.bus)
    assert "queued to be published again" in retry(entry, settings["data_dir"])
    revised = _results(again, 2)[-1]
    assert (revised.revision, revised.instance_count) == (2, len(files) + 1)
    assert revised.supersedes_sr_sop_instance_uid == first.sr_sop_instance_uid
