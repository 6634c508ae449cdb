"""Series completion: one event per quiet series, after its instances; a late instance
re-completes with generation 2; the state survives a restart."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from agent.app import Agent
from agent.bus_embedded import EmbeddedBus
from agent.series import SeriesTracker
from agent.spool import InstanceInfo, Spool, StoreOutcome
from schemas import topics
from schemas.messages import SeriesEvent
from tests.agent.test_ingest import SAMPLE, read_topic
from tests.fixtures.dicom import run_storescu


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
    time.sleep(1.5)  # still quiet: no second event
    assert len(read_topic(agent.bus, topics.DICOM_SERIES, 1, timeout_s=0.5)) == 1

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
    time.sleep(1.5)
    assert len(read_topic(again.bus, topics.DICOM_SERIES, 2, timeout_s=0.5)) == 2


def test_open_series_completes_after_restart(running_agent: Callable[..., Agent],
                                             tmp_path: Path) -> None:
    """Received before a stop, not yet complete: completes after the restart, once."""
    files = sorted(SAMPLE.glob("*.dcm"))[:5]
    data_dir = tmp_path / "data"
    agent = running_agent(data_dir=data_dir, series_quiet_s=30.0)
    assert run_storescu(files, agent.port, "HUST19").returncode == 0
    agent.stop()
    bus = EmbeddedBus(data_dir / "bus")
    assert not bus.topic_exists(topics.DICOM_SERIES) or \
        bus.log(topics.DICOM_SERIES).refresh() == 0
    bus.close()
    restarted = running_agent(data_dir=data_dir, series_quiet_s=0.5)
    (event,) = _series_events(restarted, 1)
    assert event.instance_count == 5 and event.generation == 1
