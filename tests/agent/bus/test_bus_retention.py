"""The embedded bus's segments and retention, on real files: rolling at the size limit,
reading across segments, reopening, torn-tail recovery in the active segment, the retention
rule (old, closed, read by every group), readers that fall behind it, the single-file layout
of earlier versions, several processes, and ``hust19 bus dump`` across segments."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.bus.embedded import EmbeddedBus, encode_record, segment_name
from agent.bus.factory import open_bus
from agent.bus.interface import Consumer, Message
from agent.cli.commands.common import add_settings_args, settings_from_args
from agent.config import load_settings
from schemas.errors import BusError
from tests.fixtures.dicom import drain

SEGMENT = 4096
"""Segment size used here: a few records of ~500 bytes each."""
VALUE = 480
HOUR_MS = 3_600_000


def _send(bus: EmbeddedBus, topic: str, start: int, n: int, size: int = VALUE) -> None:
    producer = bus.producer()
    for i in range(start, start + n):
        producer.send(topic, b"k", f"r{i}:".encode().ljust(size, b"."), [("i", str(i).encode())])
    producer.flush()


def _index(m: Message) -> int:
    return int(m.value.split(b":")[0][1:])


def _drain(consumer: Consumer, want: int, timeout_s: float = 5.0) -> list[Message]:
    return drain(consumer, want, timeout_s, poll_s=0.05, max_records=1000)


def _read_all(bus: EmbeddedBus, topic: str) -> list[Message]:
    reader = bus.consumer(None, [topic])
    try:
        log = bus.log(topic)
        return _drain(reader, log.refresh() - log.earliest(), timeout_s=2.0)
    finally:
        reader.close()


def _segment_bases(root: Path, topic: str) -> list[int]:
    return sorted(int(p.stem) for p in (root / "topics" / topic).glob("*.log"))


def test_rolls_at_the_size_limit_and_reads_across_segments_in_order(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)
    _send(bus, "t", 0, 40)
    _send(bus, "t", 40, 1, size=3 * SEGMENT)  # larger than a segment: one of its own
    _send(bus, "t", 41, 3)
    paths = bus.log("t").segment_paths()
    bases = _segment_bases(tmp_path, "t")
    assert len(bases) > 5 and bases[0] == 0
    assert [p.name for p in paths] == [segment_name(b) for b in bases]
    sizes = [p.stat().st_size for p in paths]
    big = bases.index(40)
    assert bases[big + 1] == 41  # the big record alone in its segment
    assert all(s <= SEGMENT for i, s in enumerate(sizes) if i != big)
    got = _read_all(bus, "t")
    assert [m.offset for m in got] == list(range(44))
    assert [_index(m) for m in got] == list(range(44))
    assert got[40].header("i") == "40" and len(got[40].value) == 3 * SEGMENT
    bus.close()


def test_reopen_with_several_segments_resumes_reads_commits_and_appends(
        tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)
    _send(bus, "t", 0, 30)
    worker = bus.consumer("g", ["t"])
    assert len(_drain(worker, 30)) == 30
    worker.commit({("t", 0): 17})
    worker.close()
    bus.close()

    reopened = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)
    assert reopened.topics() == ["t"] and reopened.topic_exists("t")
    assert [_index(m) for m in _read_all(reopened, "t")] == list(range(30))
    _send(reopened, "t", 30, 10)  # continues in the active segment, then rolls
    worker = reopened.consumer("g", ["t"])
    rest = _drain(worker, 23)
    assert [m.offset for m in rest] == list(range(17, 40))
    assert [_index(m) for m in rest] == list(range(17, 40))
    worker.close()
    reopened.close()
    again = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)
    assert [m.offset for m in _read_all(again, "t")] == list(range(40))
    again.close()


def test_a_torn_tail_in_the_active_segment_is_recovered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bus = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)
    _send(bus, "t", 0, 20)
    active = bus.log("t").segment_paths()[-1]
    bus.close()
    assert active.name != segment_name(0)
    data = active.read_bytes()
    active.write_bytes(data + data[: VALUE // 2])  # a crash in the middle of an append

    with caplog.at_level(logging.WARNING, logger="agent.bus.embedded"):
        reopened = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)
        _send(reopened, "t", 20, 10)
    assert "truncating" in caplog.text and active.name in caplog.text
    got = _read_all(reopened, "t")
    assert [m.offset for m in got] == list(range(30))
    assert [_index(m) for m in got] == list(range(30))
    reopened.close()


def test_retention_deletes_only_old_closed_segments_never_the_active_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bus = EmbeddedBus(tmp_path, segment_bytes=SEGMENT, retention_h=1)
    _send(bus, "t", 0, 30)
    time.sleep(0.01)
    middle_ms = int(time.time() * 1000)
    time.sleep(0.01)
    _send(bus, "t", 30, 30)
    log = bus.log("t")
    before = log.segment_paths()

    assert bus.enforce_retention() == 0  # nothing is an hour old
    with caplog.at_level(logging.INFO, logger="agent.bus.embedded"):
        deleted = bus.enforce_retention(now_ms=middle_ms + HOUR_MS)
    kept = log.segment_paths()
    assert deleted == len(before) - len(kept) > 0
    assert all(not p.exists() for p in before[:deleted]) and all(p.exists() for p in kept)
    earliest = log.earliest()
    assert int(kept[0].stem) == earliest <= 30  # what has records of the second batch stays
    assert "deleted segment" in caplog.text
    got = _read_all(bus, "t")
    assert [m.offset for m in got] == list(range(earliest, 60))
    assert [_index(m) for m in got] == list(range(earliest, 60))

    assert bus.enforce_retention(now_ms=int(time.time() * 1000) + 100 * HOUR_MS) > 0
    assert log.segment_paths() == [before[-1]]  # everything old is gone but the active one
    assert [m.offset for m in _read_all(bus, "t")] == list(range(log.earliest(), 60))
    bus.close()

    keep_all = EmbeddedBus(tmp_path, segment_bytes=SEGMENT, retention_h=0)
    _send(keep_all, "t", 60, 30)
    assert keep_all.enforce_retention(now_ms=int(time.time() * 1000) + 1000 * HOUR_MS) == 0
    keep_all.close()


def test_retention_keeps_what_a_group_has_not_committed_and_says_which_group(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bus = EmbeddedBus(tmp_path, segment_bytes=SEGMENT, retention_h=1)
    _send(bus, "t", 0, 40)
    for group, offset in (("hust19-worker", 40), ("weekend worker", 9)):
        member = bus.consumer(group, ["t"])
        assert member.assignment() == {("t", 0)}
        member.commit({("t", 0): offset})
        member.close()
    later = int(time.time() * 1000) + 2 * HOUR_MS

    with caplog.at_level(logging.WARNING, logger="agent.bus.embedded"):
        bus.enforce_retention(now_ms=later)
    log = bus.log("t")
    assert log.earliest() <= 9  # offset 9, the slow group's next one, is still there
    assert "weekend worker has committed only up to offset 9" in caplog.text
    assert "hust19-worker" not in caplog.text
    assert [_index(m) for m in _read_all(bus, "t")][9 - log.earliest()] == 9

    member = bus.consumer("weekend worker", ["t"])
    assert [m.offset for m in _drain(member, 31)] == list(range(9, 40))
    member.commit({("t", 0): 40})
    member.close()
    assert bus.enforce_retention(now_ms=later) > 0
    assert log.earliest() > 9 and len(log.segment_paths()) == 1
    bus.close()


def test_a_consumer_behind_the_earliest_retained_offset_continues_from_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    owner = EmbeddedBus(tmp_path, segment_bytes=SEGMENT, retention_h=1)
    _send(owner, "t", 0, 40)
    other_process = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)  # its own index and fds
    reader = other_process.consumer(None, ["t"])
    first = reader.poll(0.5, 3)  # holds the first segment open
    assert [m.offset for m in first] == [0, 1, 2]
    deleted = owner.enforce_retention(now_ms=int(time.time() * 1000) + 2 * HOUR_MS)
    earliest = owner.log("t").earliest()
    assert deleted > 0 and earliest > 3

    with caplog.at_level(logging.INFO, logger="agent.bus.embedded"):
        rest = _drain(reader, 40 - earliest)
    assert [m.offset for m in rest] == list(range(earliest, 40))
    assert [_index(m) for m in rest] == list(range(earliest, 40))
    assert f"offset 3 is no longer on disk (retention); continuing from offset {earliest}" \
        in caplog.text
    assert other_process.log("t").segment_paths() == owner.log("t").segment_paths()
    reader.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.bus.embedded"):
        fresh = other_process.consumer("new-group", ["t"])  # no committed offset: starts at 0
        got = _drain(fresh, 40 - earliest)
    assert got[0].offset == earliest
    assert "group new-group: topic t offset 0 is no longer on disk" in caplog.text
    fresh.close()
    other_process.close()
    owner.close()


def test_the_single_file_layout_of_earlier_versions_is_read_and_continued(
        tmp_path: Path) -> None:
    topic_dir = tmp_path / "topics" / "t"
    topic_dir.mkdir(parents=True)
    (tmp_path / "groups").mkdir()
    with (topic_dir / "0.log").open("wb") as f:  # as the single-file version wrote it
        for i in range(12):
            frame, body = encode_record(b"k", f"r{i}:".encode().ljust(VALUE, b"."), [],
                                        int(time.time() * 1000) - 3 * HOUR_MS)
            f.write(frame + body)

    bus = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)  # no retention: flush keeps 0.log
    assert bus.topics() == ["t"]
    assert [_index(m) for m in _read_all(bus, "t")] == list(range(12))
    _send(bus, "t", 12, 8)  # 0.log is over the limit already: the next segment is rolled
    assert bus.log("t").segment_paths()[:2] == [topic_dir / "0.log",
                                                topic_dir / segment_name(12)]
    bus.close()
    reopened = EmbeddedBus(tmp_path, segment_bytes=SEGMENT, retention_h=1)
    assert [_index(m) for m in _read_all(reopened, "t")] == list(range(20))
    assert (topic_dir / "0.log").exists()
    assert reopened.enforce_retention() == 1  # the old file is three hours old
    assert not (topic_dir / "0.log").exists()
    assert [m.offset for m in _read_all(reopened, "t")] == list(range(12, 20))
    reopened.close()


def test_two_segments_with_the_same_base_offset_are_refused_unless_one_is_empty(
        tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path)
    _send(bus, "t", 0, 2)
    bus.close()
    legacy = tmp_path / "topics" / "t" / "0.log"
    legacy.write_bytes(b"")  # as a reader of the single-file version would create it
    again = EmbeddedBus(tmp_path)
    assert [_index(m) for m in _read_all(again, "t")] == [0, 1]
    again.close()
    legacy.write_bytes((tmp_path / "topics" / "t" / segment_name(0)).read_bytes())
    with pytest.raises(BusError, match="two segments with base offset 0"):
        EmbeddedBus(tmp_path).log("t")


def test_producer_flush_applies_the_retention_at_most_every_interval(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path, segment_bytes=SEGMENT, retention_h=1,
                      retention_check_interval_s=3600)
    _send(bus, "t", 0, 30)  # the first flush checks: nothing is an hour old
    bus.retention_h = 0.001 / 3600  # 1 ms: everything closed is old now
    time.sleep(0.01)
    _send(bus, "t", 30, 1)  # within the interval: no check
    assert bus.log("t").earliest() == 0
    bus.retention_check_interval_s = 0
    _send(bus, "t", 31, 1)
    assert bus.log("t").earliest() > 0
    assert len(bus.log("t").segment_paths()) == 1
    bus.close()


def test_the_retention_setting_reaches_the_embedded_bus(tmp_path: Path) -> None:
    assert load_settings(environ={}).bus_retention_h == 168.0
    assert load_settings(environ={"HUST19_BUS_RETENTION_H": "0"}).bus_retention_h == 0
    parser = argparse.ArgumentParser()
    add_settings_args(parser)
    args = parser.parse_args(["--bus-retention-h", "36", "--data-dir", str(tmp_path)])
    settings = settings_from_args(args, configure_logging=False)
    assert settings.bus_retention_h == 36.0
    bus = open_bus("embedded", tmp_path, retention_h=settings.bus_retention_h)
    assert isinstance(bus, EmbeddedBus) and bus.retention_h == 36.0
    assert "kept 36 h" in bus.describe()
    bus.close()


WRITER = """
import sys
from pathlib import Path
from agent.bus.embedded import EmbeddedBus
bus = EmbeddedBus(Path(sys.argv[1]), segment_bytes=int(sys.argv[4]))
producer = bus.producer()
name = sys.argv[2]
for i in range(int(sys.argv[3])):
    producer.send("shared", name.encode(), (name + ":" + str(i)).encode() + b"." * (i % 7 * 97))
    if i % 20 == 0:
        producer.flush()
producer.flush()
"""


@pytest.mark.slow
def test_two_writer_processes_roll_the_same_segments_while_a_reader_follows(
        tmp_path: Path) -> None:
    n = 200
    reader_bus = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)
    reader = reader_bus.consumer(None, ["shared"])
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(n),
                               str(SEGMENT)]) for name in ("ingest", "worker")]
    msgs = _drain(reader, 2 * n, timeout_s=60)
    for p in procs:
        assert p.wait(60) == 0
    assert [m.offset for m in msgs] == list(range(2 * n))
    for name in ("ingest", "worker"):
        mine = [m.value.split(b".")[0].decode() for m in msgs if m.key == name.encode()]
        assert mine == [f"{name}:{i}" for i in range(n)]
    reader.close()
    reader_bus.close()
    bases = _segment_bases(tmp_path, "shared")
    assert len(bases) > 5
    reopened = EmbeddedBus(tmp_path, segment_bytes=SEGMENT)
    log = reopened.log("shared")
    assert [int(p.stem) for p in log.segment_paths()] == bases
    assert log.refresh() == 2 * n
    assert all(p.stat().st_size <= SEGMENT for p in log.segment_paths())
    reopened.close()


def test_bus_dump_reads_across_segments_from_the_earliest_retained_offset(
        tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", segment_bytes=SEGMENT, retention_h=1)
    _send(bus, "t", 0, 30)
    bus.enforce_retention(now_ms=int(time.time() * 1000) + 2 * HOUR_MS)
    earliest = bus.log("t").earliest()
    _send(bus, "t", 30, 10)
    bus.close()
    assert earliest > 0
    files = sorted(os.listdir(tmp_path / "bus" / "topics" / "t"))
    out = subprocess.run([sys.executable, "-m", "agent.cli", "bus", "dump", "--topic", "t",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["offset"] for line in lines] == list(range(earliest, 40))
    assert [line["headers"]["i"] for line in lines] == [str(i) for i in range(earliest, 40)]
    assert sorted(os.listdir(tmp_path / "bus" / "topics" / "t")) == files  # dump deletes nothing
