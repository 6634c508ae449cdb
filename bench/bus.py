"""Bus throughput for DICOM-instance-sized messages (530 KB, random bytes), printed as JSON.

For each bus: produce N messages with one key per 100 (a series) and flush (fsync / acks=all),
then read them all back with a group consumer and commit. The Kafka numbers use the
Kafka-protocol test broker (tansu, in-memory storage) started here on a free port, so they
measure the client and the loopback path, not a production cluster.

    .venv/bin/python bench/bus.py [--count 400] [--size 530000] [--skip-kafka]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.bus.embedded import EmbeddedBus  # noqa: E402
from agent.bus.interface import Bus  # noqa: E402
from agent.bus.kafka import KafkaBus, crc32c_is_native  # noqa: E402
from tests.fixtures.kafka import kafka_test_overrides, run_test_broker  # noqa: E402

SERIES_SIZE = 100
FLUSH_EACH_COUNT = 100
MB = 1_000_000


def measure(bus: Bus, count: int, size: int) -> dict[str, Any]:
    """Produce+flush then consume+commit ``count`` messages of ``size`` bytes."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    bus.ensure_topics([topic])
    payloads = [os.urandom(size) for _ in range(8)]
    producer = bus.producer()
    t0 = time.perf_counter()
    for i in range(count):
        key = f"1.2.826.0.1.{i // SERIES_SIZE}".encode()
        producer.send(topic, key, payloads[i % len(payloads)],
                      [("sop_instance_uid", f"1.2.3.{i}".encode())])
    producer.flush(timeout_s=300)
    produce_s = time.perf_counter() - t0
    producer.close()

    # The ingest path may flush after every instance (C-STORE success only once durable).
    each_topic = topic + "-each"
    bus.ensure_topics([each_topic])
    each = min(count, FLUSH_EACH_COUNT)
    producer = bus.producer()
    t2 = time.perf_counter()
    for i in range(each):
        producer.send(each_topic, b"each", payloads[i % len(payloads)])
        producer.flush(timeout_s=60)
    flush_each_s = time.perf_counter() - t2
    producer.close()

    consumer = bus.consumer(f"bench-{uuid.uuid4().hex[:6]}", [topic])
    got = 0
    nbytes = 0
    first_at: float | None = None
    t1 = time.perf_counter()
    deadline = t1 + 300
    while got < count and time.perf_counter() < deadline:
        batch = consumer.poll(1.0, 100)
        if batch and first_at is None:
            first_at = time.perf_counter()
        got += len(batch)
        nbytes += sum(len(m.value) for m in batch)
        if batch:
            last: dict[tuple[str, int], int] = {}
            for m in batch:
                last[(m.topic, m.partition)] = m.offset + 1
            consumer.commit(last)
    consume_s = time.perf_counter() - t1
    consumer.close()
    if got != count:
        raise SystemExit(f"read {got} of {count} messages")
    steady_s = consume_s - ((first_at or t1) - t1)
    total_mb = count * size / MB
    return {
        "messages": count, "message_bytes": size,
        "produce_flush_s": round(produce_s, 3),
        "produce_msgs_per_s": round(count / produce_s, 1),
        "produce_MB_per_s": round(total_mb / produce_s, 1),
        "flush_each_msgs_per_s": round(each / flush_each_s, 1),
        "consume_commit_s": round(consume_s, 3),
        "consume_msgs_per_s": round(count / consume_s, 1),
        "consume_MB_per_s": round(nbytes / MB / consume_s, 1),
        "consume_after_first_message_MB_per_s": round(nbytes / MB / steady_s, 1)
        if steady_s > 0 else None,
        "time_to_first_message_s": round((first_at or t1) - t1, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--size", type=int, default=530_000)
    parser.add_argument("--skip-kafka", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(),
                           "kafka_python_native_crc32c": crc32c_is_native()}
    with tempfile.TemporaryDirectory(prefix="hust19-bench-", dir=REPO) as tmp:
        embedded = EmbeddedBus(Path(tmp) / "bus")
        out["embedded"] = measure(embedded, args.count, args.size)
        embedded.close()
    if not args.skip_kafka:
        with run_test_broker() as url:
            kafka = KafkaBus([url.removeprefix("kafka://")], **kafka_test_overrides())
            out["kafka_test_broker"] = measure(kafka, args.count, args.size)
            kafka.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
