"""Kafka consumer-group behaviour with the Kafka-protocol test broker (tansu), printed as JSON:
how long a killed member's partitions wait for another member (failover), and how long a
member joining the group stalls the members already there (join stall), for the group
settings given.

Members are separate processes (``member`` mode of this script): each consumes a 6-partition
topic through :class:`agent.bus.kafka.KafkaBus` and prints one JSON line per poll (time,
assignment, records read). A producer writes one message to every partition every 100 ms.

* failover: members A and B settle (3 + 3 partitions); B is killed with SIGKILL; the time
  until A owns all 6 partitions and reads from B's;
* join stall: A and B settle; C starts; for A and B, the longest time between two polls that
  returned records, over the 20 s after C started (the messages keep coming every 100 ms, so
  a gap is a stall).

    .venv/bin/python bench/kafka_group.py [--strategy cooperative|eager] [--session-ms 10000]
        [--heartbeat-ms 1000] [--static]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.bus.kafka import KafkaBus  # noqa: E402
from tests.fixtures.kafka import run_test_broker  # noqa: E402

PARTITIONS: Final = 6
PRODUCE_EVERY_S: Final = 0.1
SETTLE_TIMEOUT_S: Final = 60.0
WATCH_S: Final = 20.0
POLL_S: Final = 0.2


def member(url: str, topic: str, group: str, overrides: dict[str, Any]) -> None:
    """One group member: poll and report, until killed."""
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

    strategy = overrides.pop("strategy", None)
    if strategy is not None:
        overrides["partition_assignment_strategy"] = (
            (CooperativeStickyAssignor,) if strategy == "cooperative"
            else (RangePartitionAssignor, RoundRobinPartitionAssignor))
    bus = KafkaBus([url.removeprefix("kafka://")], **overrides)
    consumer = bus.consumer(group, [topic])
    while True:
        got = consumer.poll(POLL_S, max_records=500)
        mine = sorted(p for _, p in consumer.assignment())
        print(json.dumps({"t": time.time(), "assigned": mine, "got": len(got),
                          "partitions": sorted({m.partition for m in got})}), flush=True)
        if got:
            consumer.commit({(m.topic, m.partition): m.offset + 1 for m in got})


class Member:
    """A member process and what it reported."""

    def __init__(self, name: str, url: str, topic: str, group: str,
                 overrides: dict[str, Any]) -> None:
        self.name = name
        self.lines: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "member", url, topic, group, json.dumps(overrides)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                continue

    def assigned(self) -> list[int]:
        return self.lines[-1]["assigned"] if self.lines else []

    def max_gap(self, since: float, until: float) -> float:
        """The longest time between two polls that returned records in [since, until]."""
        times = [since] + [x["t"] for x in self.lines if x["got"] and since <= x["t"] <= until]
        times.append(until)
        return max(b - a for a, b in itertools.pairwise(times))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _wait(condition: Any, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
    started = time.time()
    while not condition():
        if time.time() - started > timeout_s:
            raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
    return time.time() - started


def run(overrides: dict[str, Any], static: bool) -> dict[str, Any]:
    with run_test_broker() as url:
        bus = KafkaBus([url.removeprefix("kafka://")])
        topic, group = f"grp-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:6]}"
        bus.ensure_topics([topic], num_partitions=PARTITIONS)
        producer = bus.producer()
        stop = threading.Event()

        def produce() -> None:
            n = 0
            while not stop.is_set():
                for p in range(PARTITIONS):
                    producer._producer.send(topic, value=b"x", partition=p)
                n += 1
                stop.wait(PRODUCE_EVERY_S)

        threading.Thread(target=produce, daemon=True).start()

        def start(name: str) -> Member:
            extra = {"group_instance_id": f"{group}-{name}"} if static else {}
            return Member(name, url, topic, group, {**overrides, **extra})

        members = [start("a"), start("b")]
        report: dict[str, Any] = {}
        try:
            first = _wait(lambda: sorted(members[0].assigned() + members[1].assigned())
                          == list(range(PARTITIONS)) and all(m.assigned() for m in members),
                          "A and B to share the partitions")
            report["first_settle_s"] = round(first, 2)
            # join stall
            joined = time.time()
            members.append(start("c"))
            settle = _wait(lambda: all(m.assigned() for m in members) and sorted(
                p for m in members for p in m.assigned()) == list(range(PARTITIONS)),
                "C to get partitions")
            time.sleep(max(0.0, WATCH_S - (time.time() - joined)))
            report["join"] = {"c_has_partitions_after_s": round(settle, 2), "stall_s": {
                m.name: round(m.max_gap(joined, joined + WATCH_S), 2) for m in members[:2]}}
            # failover: kill C, then B
            members[2].kill()
            killed = time.time()
            took = _wait(lambda: sorted(members[0].assigned() + members[1].assigned())
                         == list(range(PARTITIONS)), "A and B to take C's partitions")
            report["failover_s"] = round(took, 2)
            report["failover_stall_s"] = {m.name: round(m.max_gap(killed, time.time()), 2)
                                          for m in members[:2]}
        finally:
            stop.set()
            for m in members:
                m.kill()
            producer.close()
            bus.close()
    return report


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "member":
        member(sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["cooperative", "eager"], default="eager",
                        help="eager: what the agent uses")
    parser.add_argument("--session-ms", type=int, default=6000)
    parser.add_argument("--heartbeat-ms", type=int, default=500)
    parser.add_argument("--max-poll-ms", type=int, default=30000)
    parser.add_argument("--static", action="store_true", help="static membership")
    args = parser.parse_args()
    overrides: dict[str, Any] = {"session_timeout_ms": args.session_ms,
                                 "heartbeat_interval_ms": args.heartbeat_ms,
                                 "max_poll_interval_ms": args.max_poll_ms,
                                 "strategy": args.strategy}
    report = {"settings": {**overrides, "static": args.static}, "cpus": os.cpu_count(),
              **run(overrides, args.static)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
