"""The outbox's background thread: publishing to the embedded bus, then spool retention."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.bus.factory import open_bus
from agent.bus.interface import Bus
from agent.ingest.outbox import YIELD_MAX_S, Outbox
from agent.ingest.spool import RECEIVING_GAP_S, InstanceInfo, Spool
from schemas import topics
from tests.fixtures.dicom import read_topic, stored_spool_files, wait_for

WAIT_S = 20.0


def _info(sop: str) -> InstanceInfo:
    return InstanceInfo(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        study_uid="1.2.3", series_uid="1.2.3.4",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="T",
                        received_at=time.time())


@contextlib.contextmanager
def _running(tmp_path: Path, **kwargs: Any) -> Iterator[tuple[Spool, Bus, Outbox]]:
    """A spool, an embedded bus and an outbox between them (started), closed afterwards."""
    spool = Spool(tmp_path / "data")
    bus = open_bus("embedded", tmp_path / "bus")
    outbox = Outbox(spool, bus, **kwargs)
    try:
        outbox.start()
        yield spool, bus, outbox
    finally:
        outbox.stop()
        bus.close()
        spool.close()


def test_published_files_are_deleted_after_the_retention(tmp_path: Path) -> None:
    payloads = {f"9.{i}": f"instance {i}".encode() * 100 for i in range(3)}
    with _running(tmp_path, retention_s=0.2) as (spool, bus, outbox):
        for sop, value in payloads.items():
            spool.store(_info(sop), [value])
        outbox.wake()
        wait_for(lambda: outbox.published == 3, "3 instances published", WAIT_S)
        assert outbox.published == 3
        wait_for(lambda: outbox.pruned == 3, "3 spool files pruned", WAIT_S)
        assert outbox.pruned == 3 and len(stored_spool_files(spool)) == 0
        # the bytes are on the bus, and the spool still knows the instances
        messages = read_topic(bus, topics.DICOM_INSTANCES, 3)
        got = {dict(m.headers)[topics.H_SOP_INSTANCE_UID].decode(): m.value for m in messages}
        assert got == payloads
        assert all(spool.contains(sop) for sop in payloads)


def test_retention_zero_keeps_every_file(tmp_path: Path) -> None:
    with _running(tmp_path) as (spool, _bus, outbox):
        spool.store(_info("8.1"), [b"kept"])
        outbox.wake()
        wait_for(lambda: outbox.published == 1, "the instance published", WAIT_S)
        assert outbox.published == 1
        seen = outbox.passes
        wait_for(lambda: outbox.passes >= seen + 3, "three more passes of the thread", WAIT_S)
        assert outbox.pruned == 0 and len(stored_spool_files(spool)) == 1


def _stream(spool: Spool, outbox: Outbox, prefix: str, seconds: float) -> float:
    """Spool an instance every 50 ms for ``seconds`` (as a sending association does); the
    time the last one was spooled."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        spool.store(_info(f"{prefix}.{n}"), [b"streamed"])
        outbox.wake()
        n += 1
        time.sleep(0.05)
    return time.monotonic()


def test_publishing_waits_for_a_stream_to_pause(tmp_path: Path) -> None:
    with _running(tmp_path) as (spool, _bus, outbox):
        wait_for(lambda: outbox.passes >= 1, "the thread's first pass (topics, nothing "
                 "pending)", WAIT_S)
        last = _stream(spool, outbox, "7", 1.0)
        assert outbox.published == 0  # nothing published while the stream was arriving
        wait_for(lambda: spool.pending_count() == 0, "the stream published", WAIT_S)
        waited = time.monotonic() - last
        assert spool.pending_count() == 0 and waited < RECEIVING_GAP_S + 1.0


def test_a_long_stream_is_published_while_it_arrives(tmp_path: Path) -> None:
    with _running(tmp_path) as (spool, _bus, outbox):
        _stream(spool, outbox, "6", YIELD_MAX_S + 1.5)
        # the stream never paused, yet the outbox published after at most YIELD_MAX_S
        assert outbox.published > 0


@pytest.mark.parametrize("bus_kind", ["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def test_a_batch_flushed_but_not_marked_is_not_published_twice(
        tmp_path: Path, bus_kind: str, request: pytest.FixtureRequest) -> None:
    """What a kill -9 between the outbox's flush and its mark leaves (issue 20: 31 instances
    twice on the bus): the next outbox finds them among the bus's newest records and marks
    them instead of sending them again; the rest is published once."""
    from agent.ingest.outbox import instance_headers

    spool = Spool(tmp_path / "data")
    if bus_kind == "embedded":
        bus: Bus = open_bus("embedded", tmp_path / "bus")
    else:
        from agent.bus.kafka import KafkaBus
        from tests.fixtures.kafka import kafka_test_overrides

        url = str(request.getfixturevalue("fresh_kafka_broker"))
        bus = KafkaBus([url.removeprefix("kafka://")], **kafka_test_overrides())
    try:
        for i in range(5):
            spool.store(_info(f"5.{i}"), [f"instance {i}".encode()])
        bus.ensure_topics([topics.DICOM_INSTANCES, topics.DICOM_SERIES])
        producer = bus.producer()
        for instance in spool.pending(3):  # the "previous run": flushed, then killed
            producer.send(topics.DICOM_INSTANCES, instance.series_uid.encode(),
                          spool.read(instance), instance_headers(instance))
        producer.flush()
        producer.close()
        outbox = Outbox(spool, bus)
        assert outbox.publish_pending() == 2  # only the two never sent
        assert spool.pending_count() == 0
        from tests.fixtures.faults import read_all

        sops = [m.header(topics.H_SOP_INSTANCE_UID)
                for m in read_all(bus, topics.DICOM_INSTANCES)]
        assert sorted(sops) == [f"5.{i}" for i in range(5)]  # each once
        outbox.stop()
    finally:
        bus.close()
        spool.close()


def test_a_requeued_series_is_published_again_with_a_new_completion_event(
        tmp_path: Path) -> None:
    """``hust19 dlq retry`` of a series: its spooled instances go to the bus again, then a
    completion event of the next generation; a pruned series cannot be requeued."""
    from agent.ingest.series import SeriesTracker
    from agent.ingest.spool import SpoolError, requeue_series
    from schemas.messages import SeriesEvent

    spool = Spool(tmp_path / "data")
    bus = open_bus("embedded", tmp_path / "bus")
    tracker = SeriesTracker(spool, quiet_s=0.2, max_quiet_s=5.0)
    outbox = Outbox(spool, bus, tracker)
    try:
        outbox.start()
        for i in range(3):
            spool.store(_info(f"7.{i}"), [b"x" * 100])
        outbox.wake()
        first = read_topic(bus, topics.DICOM_SERIES, 1)
        assert SeriesEvent.model_validate_json(first[0].value).generation == 1
        with pytest.raises(SpoolError, match="not received"):
            requeue_series(tmp_path / "data", "1.2.999")
        assert requeue_series(tmp_path / "data", "1.2.3.4") == 3
        outbox.wake()
        events = read_topic(bus, topics.DICOM_SERIES, 2)
        again = SeriesEvent.model_validate_json(events[1].value)
        assert again.generation == 2 and again.instance_count == 3
        instances = read_topic(bus, topics.DICOM_INSTANCES, 6)
        assert sorted(dict(m.headers)[topics.H_SOP_INSTANCE_UID].decode()
                      for m in instances) == ["7.0", "7.0", "7.1", "7.1", "7.2", "7.2"]
        assert spool.prune(time.time() + 1) == 3
        with pytest.raises(SpoolError, match="deleted by the spool retention"):
            requeue_series(tmp_path / "data", "1.2.3.4")
    finally:
        outbox.stop()
        bus.close()
        spool.close()
