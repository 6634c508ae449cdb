"""The bus contract, run against both implementations: the embedded log (in ``tmp_path``) and
Kafka (the real Kafka-protocol test broker from ``tests/fixtures/kafka.py``); plus the
embedded log's own durability, recovery and multi-process behaviour."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.bus.embedded import EmbeddedBus, segment_name
from agent.bus.factory import open_bus
from agent.bus.interface import Bus, Consumer, Message
from agent.bus.kafka import KafkaBus, crc32c_is_native
from schemas.errors import BusError
from schemas.topics import ALL_TOPICS
from tests.fixtures.dicom import drain
from tests.fixtures.kafka import kafka_test_overrides, run_test_broker
from tests.fixtures.paths import REPO

ONE_MB = 1024 * 1024
BusFactory = tuple[str, Callable[[], Bus]]


def _new_bus(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Bus:
    if kind == "embedded":
        return EmbeddedBus(tmp_path / "bus")
    url: str = request.getfixturevalue("kafka_broker")
    return KafkaBus([url.removeprefix("kafka://")], **kafka_test_overrides())


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BusFactory]:
    """``(kind, open)``: ``open()`` returns a new connection to the same bus (closed at the
    end), so a test can "restart" a process by opening another one."""
    opened: list[Bus] = []

    def factory() -> Bus:
        bus = _new_bus(request.param, tmp_path, request)
        opened.append(bus)
        return bus

    yield request.param, factory
    for bus in opened:
        bus.close()


def _topic(bus: Bus, partitions: int = 1) -> str:
    topic = f"test-{uuid.uuid4().hex[:12]}"
    if isinstance(bus, KafkaBus):
        bus.ensure_topics([topic], num_partitions=partitions)
    else:
        bus.ensure_topics([topic])
    return topic


def _quiet(consumer: Consumer, wait_s: float) -> list[Message]:
    """Whatever arrives within ``wait_s`` (used to show that nothing is redelivered)."""
    out: list[Message] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        out += consumer.poll(0.5, 500)
    return out


# -- the shared contract -------------------------------------------------------------------

def test_keyed_order_values_and_headers_round_trip(bus_factory: BusFactory) -> None:
    _kind, factory = bus_factory
    bus = factory()
    topic = _topic(bus, partitions=3)
    big = os.urandom(ONE_MB + 17)  # over kafka-python's default 1 MiB max_request_size
    sent: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    producer = bus.producer()
    for i in range(30):
        key = f"1.2.826.0.1.{i % 3}".encode()
        value = big if i == 7 else f"value-{i}".encode() + bytes([i % 256]) * i
        headers = [("series_uid", key), ("n", str(i).encode()), ("bin", bytes([0, 255, i]))]
        producer.send(topic, key, value, headers)
        sent.append((key, value, headers))
    producer.send(topic, None, b"no key")
    producer.flush()
    producer.close()

    consumer = bus.consumer(None, [topic])
    got = drain(consumer, 31)
    consumer.close()
    assert len(got) == 31
    by_key: dict[bytes | None, list[Message]] = defaultdict(list)
    for m in got:
        by_key[m.key].append(m)
        assert m.topic == topic
        assert m.timestamp_ms > 0
    for key in {k for k, _, _ in sent}:
        expected = [(v, h) for k, v, h in sent if k == key]
        assert [(m.value, m.headers) for m in by_key[key]] == expected
        assert len({m.partition for m in by_key[key]}) == 1  # a key stays on one partition
    assert by_key[None][0].value == b"no key"
    assert next(m for m in got if m.value == big).header("n") == "7"


@pytest.mark.slow
def test_uncommitted_messages_are_redelivered_committed_ones_are_not(
        bus_factory: BusFactory) -> None:
    _kind, factory = bus_factory
    bus = factory()
    topic = _topic(bus, partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = bus.producer()
    for i in range(6):
        producer.send(topic, b"k", f"m{i}".encode())
    producer.close()

    first = bus.consumer(group, [topic])
    seen = drain(first, 6)
    assert [m.value for m in seen] == [f"m{i}".encode() for i in range(6)]
    first.close()  # no commit: a crash after the work started

    restarted = factory()
    second = restarted.consumer(group, [topic])
    again = drain(second, 6)
    assert [m.value for m in again] == [m.value for m in seen]
    done = again[3]
    second.commit({(done.topic, done.partition): done.offset + 1})
    second.close()

    third = factory().consumer(group, [topic])
    rest = drain(third, 2)
    rest += _quiet(third, 1.0)
    third.close()
    assert [m.value for m in rest] == [b"m4", b"m5"]


def test_group_none_reads_from_the_beginning_and_cannot_commit(
        bus_factory: BusFactory) -> None:
    _kind, factory = bus_factory
    bus = factory()
    topic = _topic(bus)
    producer = bus.producer()
    producer.send(topic, b"k", b"a")
    producer.send(topic, b"k", b"b")
    producer.flush()
    for _ in range(2):  # twice: nothing was committed by the first reader
        reader = bus.consumer(None, [topic])
        assert [m.value for m in drain(reader, 2)] == [b"a", b"b"]
        with pytest.raises(BusError):
            reader.commit({(topic, 0): 2})
        reader.close()


def test_describe_and_ping(bus_factory: BusFactory) -> None:
    kind, factory = bus_factory
    bus = factory()
    bus.ping()
    text = bus.describe()
    assert ("embedded durable log" in text and "one box" in text) if kind == "embedded" \
        else ("Kafka at 127.0.0.1:" in text and "acks=all" in text)


def test_open_bus_selects_the_implementation(tmp_path: Path) -> None:
    assert isinstance(open_bus("embedded", tmp_path), EmbeddedBus)
    kafka = open_bus("kafka://127.0.0.1:9,127.0.0.1:10", tmp_path, compression="zstd")
    assert isinstance(kafka, KafkaBus)
    assert kafka.servers == ["127.0.0.1:9", "127.0.0.1:10"]
    assert kafka.producer_config()["compression_type"] == "zstd"


# -- Kafka only ------------------------------------------------------------------------------

@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_group_members_split_partitions_and_see_each_message_once(
        fresh_kafka_broker: str) -> None:
    """Two members of one group, each polled by its own thread (as two workers would be: a
    member that cannot poll while the other waits in its JoinGroup stalls the rebalance)."""
    bus = KafkaBus([fresh_kafka_broker.removeprefix("kafka://")], **kafka_test_overrides())
    topic = _topic(bus, partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    every = {(topic, p) for p in range(4)}
    stop = threading.Event()
    lock = threading.Lock()
    owned: dict[int, set[tuple[str, int]]] = {0: set(), 1: set()}
    got: list[tuple[int, Message]] = []
    errors: list[BaseException] = []

    def member(idx: int) -> None:
        consumer = bus.consumer(group, [topic])
        try:
            while not stop.is_set():
                batch = consumer.poll(0.2, 100)
                assignment = consumer.assignment()
                with lock:
                    owned[idx] = assignment
                    for m in batch:
                        assert (m.topic, m.partition) in assignment
                        got.append((idx, m))
        except BaseException as exc:
            errors.append(exc)
        finally:
            consumer.close()

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90  # a rebalance on a loaded 2-core box
        while time.monotonic() < deadline:
            with lock:
                a, b = owned[0], owned[1]
            if a and b and not a & b and a | b == every:
                break
            time.sleep(0.2)
        assert a and b and not a & b and a | b == every, (a, b)
        with lock:
            assert got == []  # nothing produced yet

        producer = bus.producer()
        keys = [f"series-{k}".encode() for k in range(8)]
        for i in range(80):
            producer.send(topic, keys[i % 8], f"{i}".encode())
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                if len(got) >= 80:
                    break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        bus.close()
    assert not errors, errors
    assert len(got) == 80
    assert len({(m.partition, m.offset) for _, m in got}) == 80  # each exactly once
    assert {idx for idx, _ in got} == {0, 1}  # both members worked
    for key in keys:
        values = [int(m.value) for _, m in got if m.key == key]
        assert values == sorted(values) and len(values) == 10


def test_kafka_uses_native_crc32c_and_safe_producer_settings() -> None:
    assert crc32c_is_native()
    cfg = KafkaBus(["127.0.0.1:9"]).producer_config()
    assert cfg["acks"] == "all" and cfg["enable_idempotence"] is True
    assert cfg["max_request_size"] == 64 * ONE_MB


def test_kafka_client_settings_from_env_and_kwargs() -> None:
    env = {"HUST19_KAFKA_SESSION_TIMEOUT_MS": "6000", "HUST19_KAFKA_PARTITIONS": "2"}
    bus = KafkaBus(["h:1"], environ=env, max_poll_interval_ms=5000)
    cfg = bus.consumer_config("g")
    assert cfg["session_timeout_ms"] == 6000 and cfg["max_poll_interval_ms"] == 5000
    assert cfg["enable_auto_commit"] is False and cfg["auto_offset_reset"] == "earliest"
    assert "session_timeout_ms" not in bus.producer_config()
    assert bus.partitions == 2


def test_kafka_group_settings_are_chosen_for_the_edge(tmp_path: Path) -> None:
    """Issue 20, item 8: kafka-python's 45 s session made a dead worker's series wait 69 s;
    the agent's own defaults, and the settings it passes through open_bus."""
    from agent.bus.factory import open_bus
    from agent.bus.kafka import EDGE_GROUP_SETTINGS
    from agent.config import load_settings

    cfg = KafkaBus(["h:1"], environ={}).consumer_config("g")
    assert {k: cfg[k] for k in EDGE_GROUP_SETTINGS} == {
        "session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "max_poll_interval_ms": 30000}
    settings = load_settings(environ={}, overrides={"kafka_instance_id": "worker-7",
                                                    "kafka_session_timeout_ms": 8000})
    bus = open_bus("kafka://h:1", tmp_path, kafka_client=settings.kafka_client_settings)
    assert isinstance(bus, KafkaBus)
    cfg = bus.consumer_config("g")
    assert cfg["group_instance_id"] == "worker-7" and cfg["session_timeout_ms"] == 8000
    assert "static member worker-7" in bus.describe() and "session 8000 ms" in bus.describe()


@pytest.mark.kafka
def test_kafka_producer_is_idempotent_on_the_test_broker(kafka_broker: str,
                                                         unique_topic: str) -> None:
    bus = KafkaBus([kafka_broker.removeprefix("kafka://")], **kafka_test_overrides())
    bus.ensure_topics([unique_topic])
    producer = bus.producer()
    try:
        producer.send(unique_topic, b"k", b"v")
        producer.flush()
        assert producer.producer_id is not None  # the broker gave it a producer id
    finally:
        producer.close()
        bus.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_group_failover_and_join_stall_are_bounded() -> None:
    """bench/kafka_group.py with the default group settings, as processes on the test broker:
    a SIGKILLed member's partitions move within 15 s (issue 20's target for the series
    result, which also needs the redo), and a joining member stalls the others a few
    seconds, not 24 s."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kafka_group.py"),
                           "--session-ms", "6000", "--heartbeat-ms", "500",
                           "--max-poll-ms", "30000"], capture_output=True, text=True,
                          timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["failover_s"] < 15
    assert max(report["join"]["stall_s"].values()) < 8  # measured 3.0-4.2 s; was 24 s


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_flush_raises_bus_error_when_the_broker_is_gone() -> None:
    with run_test_broker() as url:
        bus = KafkaBus([url.removeprefix("kafka://")], **kafka_test_overrides())
        producer = bus.producer()
        producer.send("gone", b"k", b"acknowledged")
        producer.flush()
    producer.send("gone", b"k", b"never acknowledged")  # the broker has stopped
    with pytest.raises(BusError, match="flush did not finish"):
        producer.flush(timeout_s=2.0)
    with pytest.raises(BusError):
        producer.close()
    bus.close()


def test_kafka_unreachable_broker_is_a_bus_error() -> None:
    bus = KafkaBus(["127.0.0.1:1"])
    with pytest.raises(BusError, match=r"127\.0\.0\.1:1"):
        bus.ping(1.0)
    bus.close()


# -- embedded only ---------------------------------------------------------------------------

def _fill(bus: EmbeddedBus, topic: str, n: int) -> None:
    producer = bus.producer()
    for i in range(n):
        producer.send(topic, b"k", f"record-{i}".encode(), [("i", str(i).encode())])
    producer.flush()


def _values(bus: EmbeddedBus, topic: str) -> list[bytes]:
    reader = bus.consumer(None, [topic])
    out = [m.value for m in drain(reader, 10_000, timeout_s=0.5)]
    reader.close()
    return out


def test_embedded_messages_survive_close_and_reopen(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path)
    _fill(bus, "t", 5)
    bus.close()
    reopened = EmbeddedBus(tmp_path)
    assert _values(reopened, "t") == [f"record-{i}".encode() for i in range(5)]
    assert reopened.topics() == ["t"]
    reopened.close()


@pytest.mark.parametrize("damage", ["half_record", "garbage", "bad_crc"])
def test_embedded_torn_tail_is_truncated_and_appends_continue(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    bus = EmbeddedBus(tmp_path)
    _fill(bus, "t", 4)
    bus.close()
    log_file = tmp_path / "topics" / "t" / segment_name(0)
    data = log_file.read_bytes()
    if damage == "half_record":  # a crash in the middle of appending a fifth record
        one = data[: len(data) // 4]
        log_file.write_bytes(data + one[: len(one) // 2])
    elif damage == "garbage":
        log_file.write_bytes(data + b"\x00\x13garbage")
    else:  # the last record's bytes changed after its frame was written
        log_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

    with caplog.at_level(logging.WARNING, logger="agent.bus.embedded"):
        reopened = EmbeddedBus(tmp_path)
        _fill(reopened, "t", 1)  # opening the topic recovers it, then appends
    assert "truncating" in caplog.text
    kept = 3 if damage == "bad_crc" else 4
    assert _values(reopened, "t") == [f"record-{i}".encode() for i in range(kept)] + \
        [b"record-0"]
    reopened.close()


def test_embedded_64_mb_value(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path)
    value = os.urandom(64 * ONE_MB)
    producer = bus.producer()
    producer.send("big", b"k", value)
    producer.flush()
    reader = bus.consumer(None, ["big"])
    [m] = drain(reader, 1)
    assert m.value == value
    bus.close()


def test_embedded_second_group_member_waits_then_takes_over(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path)
    _fill(bus, "t", 3)
    owner = bus.consumer("g", ["t"])
    standby = bus.consumer("g", ["t"])
    assert owner.assignment() == {("t", 0)}
    assert standby.assignment() == set()
    assert len(drain(owner, 3)) == 3
    assert standby.poll(0.1) == []
    owner.commit({("t", 0): 2})
    with pytest.raises(BusError):
        standby.commit({("t", 0): 3})
    owner.close()
    assert [m.value for m in drain(standby, 1)] == [b"record-2"]
    standby.close()
    bus.close()


COMMITTER = """
import os, sys
from pathlib import Path
from agent.bus.embedded import EmbeddedBus, EmbeddedConsumer
bus = EmbeddedBus(Path(sys.argv[1]))
consumer = bus.consumer("g", ["a", "b"])
assert consumer.assignment() == {("a", 0), ("b", 0)}
write = EmbeddedConsumer._write_offset
written = []
def write_then_die(self, topic, offset):
    if written:  # killed between the two offset files
        os._exit(9)
    write(self, topic, offset)
    written.append(topic)
EmbeddedConsumer._write_offset = write_then_die
consumer.commit({("a", 0): 3, ("b", 0): 2})
"""


def test_embedded_commit_of_two_topics_is_all_or_nothing_across_a_crash(
        tmp_path: Path) -> None:
    """The process dies after the first of two offset files: the next member of the group
    finds both topics committed (what the worker needs: a series' instances and its completion
    event committed together, or neither)."""
    bus = EmbeddedBus(tmp_path)
    _fill(bus, "a", 4)
    _fill(bus, "b", 4)
    crashed = subprocess.run([sys.executable, "-c", COMMITTER, str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 9, crashed.stderr
    files = {p.name for p in (tmp_path / "groups" / "g").iterdir()}
    assert "commit-a+b.json" in files and len({"a.offset.json", "b.offset.json"} & files) == 1
    member = bus.consumer("g", ["a", "b"])
    assert member.assignment() == {("a", 0), ("b", 0)}
    assert member.positions() == {("a", 0): 3, ("b", 0): 2}
    assert not (tmp_path / "groups" / "g" / "commit-a+b.json").exists()
    assert sorted(m.value for m in drain(member, 3)) == [b"record-2", b"record-3", b"record-3"]
    member.commit({("a", 0): 4, ("b", 0): 4})
    assert not list((tmp_path / "groups" / "g").glob("commit-*.json"))
    member.close()
    again = bus.consumer("g", ["a", "b"])
    again.assignment()
    assert again.positions() == {("a", 0): 4, ("b", 0): 4}
    again.close()
    bus.close()


WRITER = """
import sys
from pathlib import Path
from agent.bus.embedded import EmbeddedBus
bus = EmbeddedBus(Path(sys.argv[1]))
producer = bus.producer()
name = sys.argv[2]
for i in range(int(sys.argv[3])):
    producer.send("shared", name.encode(), (name + ":" + str(i)).encode() + b"." * (i * 97))
    if i % 50 == 0:
        producer.flush()
producer.flush()
"""


@pytest.mark.slow
def test_embedded_two_writer_processes_append_whole_records(tmp_path: Path) -> None:
    n = 300
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(n)])
             for name in ("ingest", "worker")]
    for p in procs:
        assert p.wait(60) == 0
    bus = EmbeddedBus(tmp_path)
    msgs = drain(bus.consumer(None, ["shared"]), 2 * n, timeout_s=2)
    assert len(msgs) == 2 * n
    assert [m.offset for m in msgs] == list(range(2 * n))
    for name in ("ingest", "worker"):
        mine = [m.value.split(b".")[0].decode() for m in msgs if m.key == name.encode()]
        assert mine == [f"{name}:{i}" for i in range(n)]
    bus.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def test_dump_in_another_process_sees_messages_while_they_are_written(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    bus = _new_bus(kind, tmp_path / "data" if kind == "embedded" else tmp_path, request)
    topic = _topic(bus)
    producer = bus.producer()
    producer.send(topic, b"first", b"x")
    producer.flush()
    where = (["--data-dir", str(tmp_path / "data")] if kind == "embedded"
             else ["--bus", request.getfixturevalue("kafka_broker")])
    dump = subprocess.Popen([sys.executable, "-m", "agent.cli", "bus", "dump", "--topic", topic,
                             "--follow", *where], stdout=subprocess.PIPE, text=True)
    try:
        assert dump.stdout is not None
        lines = [json.loads(dump.stdout.readline())]
        for i in range(5):  # written while the reader runs
            producer.send(topic, f"k{i}".encode(), bytes(1000 * i), [("i", str(i).encode())])
            producer.flush()
            lines.append(json.loads(dump.stdout.readline()))
    finally:
        dump.terminate()
        dump.wait(10)
        bus.close()
    assert [line["key"] for line in lines] == ["first"] + [f"k{i}" for i in range(5)]
    assert [line["value_size"] for line in lines[1:]] == [1000 * i for i in range(5)]
    assert lines[3]["headers"] == {"i": "2"}


@pytest.mark.kafka
def test_kafka_ensure_topics_creates_the_product_topics_once(fresh_kafka_broker: str) -> None:
    bus = KafkaBus([fresh_kafka_broker.removeprefix("kafka://")], **kafka_test_overrides())
    try:
        assert not any(bus.topic_exists(t) for t in ALL_TOPICS)  # an empty broker
        bus.ensure_topics(ALL_TOPICS)
        bus.ensure_topics(ALL_TOPICS)  # existing topics are left alone
        for topic in ALL_TOPICS:
            assert bus.describe_topic(topic) == list(range(bus.partitions))
    finally:
        bus.close()
