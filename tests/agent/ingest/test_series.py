"""Series completion: one event per quiet series, after its instances; a late instance
re-completes with generation 2; the state survives a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from agent.app import Agent
from agent.bus.embedded import EmbeddedBus
from agent.ingest.series import RELEASED_FILE, SeriesTracker
from agent.ingest.spool import InstanceInfo, Spool, StoreOutcome
from schemas import topics
from schemas.messages import SeriesEvent
from tests.agent.ingest.test_ingest import SAMPLE, read_topic
from tests.fixtures.dicom import associate, run_storescu, wait_for


def _info(series: str, sop: str, at: float) -> InstanceInfo:
    return InstanceInfo(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        study_uid="1.2.3", series_uid=series,
                        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="T",
                        received_at=at)


def test_tracker_waits_for_release_quiet_and_publication(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    tracker = SeriesTracker(spool, quiet_s=2.0, max_quiet_s=10.0)
    for i in range(3):
        info = _info("1.2.3.4", f"1.2.3.4.{i}", 100.0 + i)
        spool.store(info, [b"x" * 10])
        tracker.instance_stored(7, info, StoreOutcome.STORED)
    assert tracker.due(now=105.0) == []  # association still open, not yet max quiet
    tracker.association_closed(7, 106.0)
    assert tracker.due(now=107.0) == []  # released only 1 s ago
    assert tracker.due(now=108.5) == []  # quiet, but nothing is on the bus yet
    spool.mark_published([p.id for p in spool.pending()])
    (event,) = tracker.due(now=108.5)
    assert (event.reason, event.instance_count, event.generation) == \
        ("quiet_after_release", 3, 1)
    tracker.completed(event)
    assert tracker.due(now=200.0) == []
    # a late instance on an association that stays open: completes by max_quiet
    late = _info("1.2.3.4", "1.2.3.4.99", 300.0)
    spool.store(late, [b"y"])
    tracker.instance_stored(8, late, StoreOutcome.STORED)
    spool.mark_published([p.id for p in spool.pending()])
    assert tracker.due(now=305.0) == []
    (again,) = tracker.due(now=310.0)
    assert (again.reason, again.instance_count, again.generation) == ("max_quiet", 4, 2)
    spool.close()


def _series_events(agent: Agent, count: int, timeout_s: float = 30.0) -> list[SeriesEvent]:
    return [SeriesEvent.model_validate_json(m.value)
            for m in read_topic(agent.bus, topics.DICOM_SERIES, count, timeout_s)]


def test_series_event_once_then_late_instance_regenerates(
        running_agent: Callable[..., Agent], tmp_path: Path) -> None:
    files = sorted(SAMPLE.glob("*.dcm"))
    data_dir = tmp_path / "data"
    agent = running_agent(data_dir=data_dir, series_quiet_s=0.5)
    assert run_storescu(files, agent.port, "HUST19").returncode == 0
    (event,) = _series_events(agent, 1)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert (event.series_uid, event.instance_count, event.generation, event.reason) == \
        (series_uid, 30, 1, "quiet_after_release")
    assert event.modality == "CT" and event.first_received_at <= event.last_received_at
    # the event follows its instances: all 30 were on the bus before it
    instances = read_topic(agent.bus, topics.DICOM_INSTANCES, 30, timeout_s=1)
    assert all(m.timestamp_ms <= int(event.completed_at.timestamp() * 1000) + 1
               for m in instances)
    assert agent.tracker is not None
    assert agent.tracker.due(now=time.time() + 3600) == []  # completed: never due again

    late = dcmread(files[0])
    late.SOPInstanceUID = generate_uid()
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path, enforce_file_format=True)
    assert run_storescu([late_path], agent.port, "HUST19").returncode == 0
    events = _series_events(agent, 2)
    assert [(e.generation, e.instance_count) for e in events] == [(1, 30), (2, 31)]

    # restart: completion state survives, nothing is re-emitted
    agent.stop()
    again = running_agent(data_dir=data_dir, series_quiet_s=0.5)
    assert again.tracker is not None and again.tracker.due(now=time.time() + 3600) == []
    assert len(read_topic(again.bus, topics.DICOM_SERIES, 2, timeout_s=0.5)) == 2


def test_open_series_completes_after_restart(running_agent: Callable[..., Agent],
                                             tmp_path: Path) -> None:
    """Received and released before a clean stop, not yet complete: the stop writes it down
    as released, so after the restart it completes after series_quiet_s, once (not after
    series_aborted_quiet_s, which is for series that may be resent)."""
    files = sorted(SAMPLE.glob("*.dcm"))[:5]
    data_dir = tmp_path / "data"
    agent = running_agent(data_dir=data_dir, series_quiet_s=30.0)
    assert run_storescu(files, agent.port, "HUST19").returncode == 0
    agent.stop()
    assert (data_dir / RELEASED_FILE).is_file()
    bus = EmbeddedBus(data_dir / "bus")
    assert not bus.topic_exists(topics.DICOM_SERIES) or \
        bus.log(topics.DICOM_SERIES).refresh() == 0
    bus.close()
    restarted = running_agent(data_dir=data_dir, series_quiet_s=0.5,
                              series_aborted_quiet_s=600.0)
    (event,) = _series_events(restarted, 1)
    assert event.instance_count == 5 and event.generation == 1
    assert not (data_dir / RELEASED_FILE).exists()  # read once


def test_after_a_crash_an_open_series_counts_as_interrupted(tmp_path: Path) -> None:
    """No clean stop wrote the series down (kill -9, power loss): it may be resent, so it
    waits aborted_quiet_s; with the file of a clean stop it waits quiet_s only."""
    spool = Spool(tmp_path)
    info = _info("1.2.3.4", "1.2.3.4.1", 100.0)
    spool.store(info, [b"x"])
    spool.mark_published([p.id for p in spool.pending()])
    crashed = SeriesTracker(spool, quiet_s=2.0, max_quiet_s=10.0, aborted_quiet_s=60.0)
    assert crashed.due(now=150.0) == []
    assert [e.reason for e in crashed.due(now=160.5)] == ["max_quiet"]
    crashed.save_released(tmp_path / RELEASED_FILE)  # a clean stop now: it is not released
    assert json.loads((tmp_path / RELEASED_FILE).read_text()) == []
    (tmp_path / RELEASED_FILE).write_text(json.dumps(["1.2.3.4"]))
    clean = SeriesTracker(spool, quiet_s=2.0, max_quiet_s=10.0, aborted_quiet_s=60.0,
                          released_file=tmp_path / RELEASED_FILE)
    assert [e.reason for e in clean.due(now=102.5)] == ["quiet_after_release"]
    spool.close()


def test_tracker_holds_an_aborted_series_until_its_resend_is_released(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    tracker = SeriesTracker(spool, quiet_s=2.0, max_quiet_s=10.0, aborted_quiet_s=60.0)
    for i in range(3):
        info = _info("1.2.3.4", f"1.2.3.4.{i}", 100.0 + i)
        spool.store(info, [b"x" * 10])
        tracker.instance_stored(7, info, StoreOutcome.STORED)
    tracker.association_closed(7, 103.0, aborted=True)
    spool.mark_published([p.id for p in spool.pending()])
    assert tracker.due(now=110.0) == []  # past quiet_s and max_quiet_s: waits for a resend
    # the sender resends everything (duplicates) and the rest, then releases
    for i in range(5):
        info = _info("1.2.3.4", f"1.2.3.4.{i}", 120.0 + i)
        outcome = spool.store(info, [b"x" * 10])
        tracker.instance_stored(8, info, outcome)
    tracker.association_closed(8, 125.0)
    spool.mark_published([p.id for p in spool.pending()])
    assert tracker.due(now=126.0) == []
    (event,) = tracker.due(now=127.5)
    assert (event.reason, event.instance_count) == ("quiet_after_release", 5)
    tracker.completed(event)
    # never resent: completes once quiet for aborted_quiet_s
    info = _info("1.2.3.9", "1.2.3.9.1", 200.0)
    spool.store(info, [b"x"])
    tracker.instance_stored(9, info, StoreOutcome.STORED)
    tracker.association_closed(9, 200.5, aborted=True)
    spool.mark_published([p.id for p in spool.pending()])
    assert tracker.due(now=259.0) == []
    (late,) = tracker.due(now=260.5)
    assert (late.series_uid, late.reason, late.instance_count) == ("1.2.3.9", "max_quiet", 1)
    spool.close()


def test_an_aborted_then_resent_series_completes_once_with_every_instance(
        running_agent: Callable[..., Agent]) -> None:
    """Issue 20, item 6: a sender aborted after 10 of 30 instances and sent the series again
    on a new association: one completion event, counting 30 (was: one for the 10 after the
    quiet time, another after the resend)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    files = sorted(SAMPLE.glob("*.dcm"))
    agent = running_agent(series_quiet_s=0.5, series_aborted_quiet_s=60.0)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = associate(ae, agent.port)
    for path in files[:10]:
        assert assoc.send_c_store(path).Status == 0
    assoc.abort()
    assert agent.spool is not None and agent.tracker is not None
    wait_for(lambda: agent.spool is not None and agent.spool.pending_count() == 0,
             "the 10 instances on the bus")
    assert agent.tracker.due(now=time.time() + 30) == []  # held: waits for the resend
    assert run_storescu(files, agent.port, "HUST19").returncode == 0
    (event,) = _series_events(agent, 1)
    assert event.instance_count == 30 and event.reason == "quiet_after_release"
    # the outbox records the completion just after the event is on the bus
    wait_for(lambda: agent.spool is not None and all(
        s.series_uid != event.series_uid for s in agent.spool.open_series()),
        "the completion recorded")
    assert agent.tracker.due(now=time.time() + 3600) == []
