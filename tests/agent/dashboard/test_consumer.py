"""The dashboard's consumer on real buses (embedded, and the Kafka-protocol test broker): what
is published lands in the store, offsets are committed only after the store, a redelivery
after a crash is harmless, invalid messages are skipped without their content in the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bus.embedded import EmbeddedBus
from agent.bus.kafka import KafkaBus
from agent.dashboard.consumer import TOPICS, DashboardConsumer
from agent.dashboard.store import Store, StoreError, WorklistFilter
from agent.dashboard.synthetic import (
    make_evidence,
    make_result,
    publish_evidence,
    publish_result,
)
from schemas import topics
from tests.fixtures.kafka import kafka_test_overrides


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'dashboard.sqlite'}")
    s.create()
    yield s
    s.close()


def drain(consumer: DashboardConsumer, want: int, timeout_s: float = 20.0) -> int:
    """Run the consumer until it has handled ``want`` messages (or fail)."""
    got, deadline = 0, time.monotonic() + timeout_s
    while got < want:
        assert time.monotonic() < deadline, f"only {got} of {want} messages arrived"
        got += consumer.run_once(0.2)
    return got


def test_results_evidence_and_garbage_on_the_embedded_bus(
        tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    bus = EmbeddedBus(tmp_path / "bus")
    producer = bus.producer()
    results = [make_result(n) for n in range(5)]
    for r in results:
        publish_result(producer, r)
    publish_evidence(producer, make_evidence(results[0]))
    producer.send(topics.TRIAGE_RESULTS, b"k", b'{"schema": "hust19.triage.result/2", '
                  b'"patient_id": "SECRET-PATIENT"}')
    producer.send(topics.TRIAGE_EVIDENCE, b"k", b"not json at all")
    producer.flush()
    changes: list[int] = []
    consumer = DashboardConsumer(bus, store, "dash-test", on_change=lambda: changes.append(1))
    with caplog.at_level(logging.DEBUG):
        drain(consumer, 8)
    assert store.worklist(WorklistFilter()).total == 5
    detail = store.detail(results[0].result_id)
    assert detail is not None and detail.evidence is not None
    assert consumer.status().skipped == 2 and changes
    assert "SECRET-PATIENT" not in caplog.text  # invalid messages are named, not printed
    assert "triage.results[0]@5 skipped" in caplog.text
    consumer.stop()

    # committed: a new member of the group starts after them
    again = DashboardConsumer(bus, store, "dash-test")
    assert again.run_once(0.3) == 0
    again.stop()
    bus.close()


def test_a_crash_before_the_commit_redelivers_harmlessly(tmp_path: Path, store: Store) -> None:
    bus = EmbeddedBus(tmp_path / "bus")
    producer = bus.producer()
    for n in range(3):
        publish_result(producer, make_result(n))
    producer.flush()
    consumer = DashboardConsumer(bus, store, "dash-crash")
    consumer.open()
    assert consumer._consumer is not None
    polled = consumer._consumer.poll(1.0, 100)
    store.apply([consumer._decode(polled)[0][0]])  # stored, then "crash": no commit
    consumer._consumer.close()
    consumer._consumer = None

    again = DashboardConsumer(bus, store, "dash-crash")
    assert drain(again, 3) == 3  # delivered again ...
    assert store.worklist(WorklistFilter()).total == 3  # ... and stored once
    again.stop()
    bus.close()


def test_a_store_outage_keeps_the_batch(tmp_path: Path, store: Store,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    bus = EmbeddedBus(tmp_path / "bus")
    producer = bus.producer()
    publish_result(producer, make_result(1))
    producer.flush()
    consumer = DashboardConsumer(bus, store, "dash-outage")
    real_apply = store.apply

    def down(*_args: object, **_kw: object) -> object:
        raise StoreError("database down")

    monkeypatch.setattr(store, "apply", down)
    with pytest.raises(StoreError):
        consumer.run_once(1.0)
    monkeypatch.setattr(store, "apply", real_apply)
    assert consumer.run_once(0.1) == 1  # the kept batch, not a new poll
    assert store.worklist(WorklistFilter()).total == 1
    consumer.stop()
    bus.close()


@pytest.mark.kafka
def test_on_the_kafka_test_broker(fresh_kafka_broker: str, store: Store) -> None:
    servers = [fresh_kafka_broker.removeprefix("kafka://")]
    bus = KafkaBus(servers, **kafka_test_overrides())
    try:
        bus.ensure_topics(list(TOPICS))
        producer = bus.producer()
        results = [make_result(n) for n in range(4)]
        for r in results:
            publish_result(producer, r)
        publish_result(producer, make_result(0, revision=2, flag="type2"))
        publish_evidence(producer, make_evidence(results[1]))
        producer.flush()
        producer.close()
        consumer = DashboardConsumer(bus, store, "dash-kafka")
        drain(consumer, 6, timeout_s=60)
        consumer.stop()
        page = store.worklist(WorklistFilter())
        assert page.total == 4
        row = store.row(results[0].result_id)
        assert row is not None and (row.revision, row.flag) == (2, "type2")
    finally:
        bus.close()


def test_a_failed_commit_does_not_block_the_consumer(tmp_path: Path, store: Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit refused (e.g. the partitions moved to another member on Kafka) must not make
    the consumer retry the same batch for ever: it is stored, and a redelivery is harmless."""
    from schemas.errors import BusError

    bus = EmbeddedBus(tmp_path / "bus")
    producer = bus.producer()
    publish_result(producer, make_result(1))
    producer.flush()
    changes: list[int] = []
    consumer = DashboardConsumer(bus, store, "dash-commit", on_change=lambda: changes.append(1))
    consumer.open()
    assert consumer._consumer is not None

    def refuse(_offsets: object) -> None:
        raise BusError("not assigned to this member")

    monkeypatch.setattr(consumer._consumer, "commit", refuse)
    with pytest.raises(BusError):
        consumer.run_once(1.0)
    assert store.worklist(WorklistFilter()).total == 1 and changes == [1]
    publish_result(producer, make_result(2))
    producer.flush()
    monkeypatch.undo()
    assert drain(consumer, 1) == 1  # the next message, not the old batch again
    assert store.worklist(WorklistFilter()).total == 2
    consumer.stop()
    bus.close()


def test_the_retention_runs_at_start_and_then_every_interval(tmp_path: Path,
                                                              store: Store) -> None:
    """With a retention, results older than it are deleted when the consumer starts and at
    each interval after; the on_change hook tells open browsers."""
    from datetime import UTC, datetime, timedelta

    from agent.dashboard.consumer import PRUNE_INTERVAL_S

    bus = EmbeddedBus(tmp_path / "bus")
    producer = bus.producer()
    now = datetime.now(UTC)
    publish_result(producer, make_result(1, ready=now - timedelta(days=40)))
    publish_result(producer, make_result(2, ready=now - timedelta(hours=1)))
    producer.flush()
    changes: list[int] = []
    consumer = DashboardConsumer(bus, store, "dash-retention", on_change=lambda: changes.append(1),
                                 retention=timedelta(days=30))
    drain(consumer, 2)  # the first pass pruned an empty store, then the two arrived
    assert store.worklist(WorklistFilter()).total == 2
    assert consumer.prune_due(time.monotonic()) == 0, "not due again before the interval"
    assert consumer.prune_due(time.monotonic() + PRUNE_INTERVAL_S + 1) == 1
    page = store.worklist(WorklistFilter())
    assert page.total == 1 and page.rows[0].result_id == make_result(2).result_id
    assert changes
    keep_all = DashboardConsumer(bus, store, "dash-keep")
    assert keep_all.prune_due() == 0
    consumer.stop()
    keep_all.stop()
    bus.close()
