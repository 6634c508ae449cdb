"""Fault runs (issue 20), a fast seeded subset: real ``hust19`` processes on loopback, dcmtk
``storescp +uf`` as the PACS, killed with SIGKILL at seeded random points, a paused broker
(a slow PACS: ``test_pacs.py``). ``bench/faults.py`` runs the long versions (more kill points,
a slower PACS, longer pauses) and prints the figures.

Each run checks what the issue's targets say: 0 acknowledged instances lost and 0 duplicate
instances on the bus, exactly one result per series (per result_id/revision) and exactly one
current SR per series (0 byte-different copies of one UID at the PACS).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.fixtures.dicom import copy_series, free_port, stop_process
from tests.fixtures.faults import (
    AgentProcess,
    bus_at,
    bus_census,
    demo_lis,
    duplicate_results,
    processes,
    results_census,
    send_series,
    sop_uid,
    sr_census,
    start_storescp,
)

pytestmark = pytest.mark.slow

SEED = 20
RESULT_WAIT_S = 120.0


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = RESULT_WAIT_S) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def _kill_during_send(agent: AgentProcess, files: list[Path], port: int,
                      rng: random.Random) -> set[str]:
    """Send ``files`` and SIGKILL the agent in the middle of the send (0-10 ms after a random
    answer, so usually while the next instance is on its way, whatever the machine's speed);
    what it acknowledged before it died."""
    after, delay = rng.randint(1, len(files) - 2), rng.uniform(0.0, 0.01)
    killer = threading.Timer(delay, agent.kill9)

    def answered(n: int) -> None:
        if n == after:
            killer.start()

    sent = send_series(files, port, on_answer=answered)
    if killer.ident is not None:  # started
        killer.join()
    assert not agent.alive()
    return sent.acknowledged


def _checks(bus_url: str, data: Path, pacs_dir: Path, series: list[list[Path]],
            acknowledged: set[str]) -> None:
    bus = bus_at(bus_url, data)
    try:
        census = bus_census(bus)
        results = results_census(bus)
    finally:
        bus.close()
    lost = acknowledged - set(census)
    assert not lost, f"{len(lost)} acknowledged instances not on the bus"
    assert [uid for uid, n in census.items() if n > 1] == [], "duplicate instances on the bus"
    everything = {sop_uid(f) for files in series for f in files}
    assert set(census) == everything  # the resend completed every series
    assert duplicate_results(results) == 0, "a result published twice"
    series_uids = {str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                   for files in series}
    assert {r.series_uid for r in results} == series_uids
    assert len(results) == len(series), [(r.series_uid, r.revision) for r in results]
    srs = sr_census(pacs_dir)
    assert all(len(contents) == 1 for contents in srs.values()), \
        "byte-different copies of one SR UID at the PACS"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, out = free_port(), tmp_path / "pacs"
    proc = start_storescp(out, port)
    yield port, out
    stop_process(proc)


@pytest.mark.parametrize("role", ["serve", "ingest"])
def test_kill9_mid_send_then_resend_loses_nothing_and_triages_once(
        role: str, tmp_path: Path, shared_data: Path, pacs: tuple[int, Path]) -> None:
    """SIGKILL of ``serve`` (or of ``ingest`` beside a running worker) while a 60-instance
    series streams in; restarted, the sender resends the series (what a scanner does with a
    failed transfer): nothing acknowledged is lost, nothing is twice on the bus, and the
    series is triaged once (the partial series is held, not triaged: item 6)."""
    rng = random.Random(f"{SEED}-{role}")
    pacs_port, pacs_dir = pacs
    data, port = tmp_path / "data", free_port()
    lis = demo_lis(f"sqlite:///{tmp_path / 'lis.sqlite'}", shared_data)
    common = ["--data-dir", str(data), "--lis", lis, "--pacs", f"127.0.0.1:{pacs_port}:PACS",
              "--series-quiet-s", "1"]
    files = copy_series(tmp_path / "series", copies=2)
    with processes() as running:
        if role == "serve":
            agent = AgentProcess("serve", [*common, "--port", str(port), "--host",
                                           "127.0.0.1"], tmp_path)
        else:
            running.append(AgentProcess("worker", common, tmp_path).start())
            agent = AgentProcess("ingest", [*common, "--port", str(port), "--host",
                                            "127.0.0.1"], tmp_path)
        running.append(agent.start())
        acknowledged = _kill_during_send(agent, files, port, rng)
        agent.start()  # restarted on the same data
        again = send_series(files, port)
        assert again.acknowledged == {sop_uid(f) for f in files} and not again.refused, (
            f"resend: {len(again.acknowledged)} acknowledged, refused {again.refused}, "
            f"{again.broken} unanswered; {agent.role} log:\n"
            f"{agent.log.read_text(errors='replace')[-3000:]}")
        _wait(lambda: any(p.name.startswith("SR") for p in pacs_dir.iterdir()), "the SR")
        for p in reversed(running):
            p.stop()
    _checks("embedded", data, pacs_dir, [files], acknowledged | again.acknowledged)


@pytest.mark.kafka
def test_a_paused_broker_loses_nothing_and_duplicates_nothing(
        tmp_path: Path) -> None:
    """The Kafka broker frozen (SIGSTOP) for 8 s while a series arrives: the listener keeps
    answering Success into the spool; once the broker runs again every instance is on the
    bus, once."""
    from tests.fixtures.kafka import run_test_broker

    files = copy_series(tmp_path / "series")
    data, port = tmp_path / "data", free_port()
    with run_test_broker() as url, processes() as running:
        broker_pid = _listener_pid(int(url.rsplit(":", 1)[1]))
        ingest = AgentProcess("ingest", ["--data-dir", str(data), "--bus", url, "--port",
                                         str(port), "--host", "127.0.0.1"], tmp_path)
        running.append(ingest.start())
        half = len(files) // 2
        first = send_series(files[:half], port)
        os.kill(broker_pid, signal.SIGSTOP)
        try:
            second = send_series(files[half:], port)
            time.sleep(8)  # the pause itself: the fault being injected, not a wait
        finally:
            os.kill(broker_pid, signal.SIGCONT)
        acknowledged = first.acknowledged | second.acknowledged
        assert len(acknowledged) == len(files)
        bus = bus_at(url, data)
        try:
            _wait(lambda: len(bus_census(bus)) == len(files), "every instance on the bus", 90)
            census = bus_census(bus)
        finally:
            bus.close()
        ingest.stop()
    assert set(census) == acknowledged
    assert [uid for uid, n in census.items() if n > 1] == []


def _listener_pid(port: int) -> int:
    """The pid of the process listening on ``port`` (from /proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inode = fields[9]
    assert inode is not None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process listens on {port}")


@pytest.mark.parametrize("after_ms", [0])
def test_kill9_of_the_worker_once_its_sr_is_queued_gives_one_sr_and_one_result(
        after_ms: int, tmp_path: Path, shared_data: Path, pacs: tuple[int, Path]) -> None:
    """SIGKILL of the worker ``after_ms`` after it queued the series' SR (before or after its
    result went out and its offsets were committed), then a new worker: exactly one current
    SR per series at the PACS (0 byte-different copies of one UID: issue 20 measured 2
    arrivals with different times) and one result per series (per result_id/revision)."""
    pacs_port, pacs_dir = pacs
    data, port = tmp_path / "data", free_port()
    lis = demo_lis(f"sqlite:///{tmp_path / 'lis.sqlite'}", shared_data)
    common = ["--data-dir", str(data), "--lis", lis, "--pacs", f"127.0.0.1:{pacs_port}:PACS",
              "--series-quiet-s", "1"]
    files = copy_series(tmp_path / "series")
    with processes() as running:
        running.append(AgentProcess("ingest", [*common, "--port", str(port), "--host",
                                               "127.0.0.1"], tmp_path).start())
        worker = AgentProcess("worker", common, tmp_path)
        running.append(worker.start())
        assert send_series(files, port).acknowledged == {sop_uid(f) for f in files}
        worker.wait_log(b"queued for 1 PACS destination", RESULT_WAIT_S)
        time.sleep(after_ms / 1000)  # the kill point (the fault), not a wait for something
        worker.kill9()
        worker.start()
        _wait(lambda: _all_work_done(data), "the worker to finish (offsets at the end, the SR "
              "delivered)")
        for p in reversed(running):
            p.stop()
    _checks("embedded", data, pacs_dir, [files], {sop_uid(f) for f in files})


def _all_work_done(data: Path) -> bool:
    """The worker group committed both topics to their ends (offsets only after durable
    work) and the SR outbox has nothing pending: nothing is left to redo or to send."""
    from agent.bus.embedded import EmbeddedBus
    from schemas import topics

    pending = list((data / "sr-outbox" / "pending").rglob("*.json"))
    bus = EmbeddedBus(data / "bus")
    try:
        done = all(bus.topic_exists(t) and bus.log(t).count() > 0
                   and bus.committed_offsets(t).get("hust19-worker") == bus.log(t).count()
                   for t in (topics.DICOM_INSTANCES, topics.DICOM_SERIES))
    finally:
        bus.close()
    return done and not pending
