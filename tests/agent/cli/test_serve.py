"""``hust19 serve`` / ``hust19 ingest`` as processes: clean stop on SIGTERM, a kill -9 in the
middle of a series loses nothing that got Success, a bus outage is caught up."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread

from agent.app import Agent
from agent.bus.embedded import EmbeddedBus
from agent.bus.kafka import KafkaBus
from schemas import topics
from tests.fixtures.dicom import SAMPLE, copy_series, dcmtk, free_port, read_topic, wait_port
from tests.fixtures.kafka import MEMORY_STORAGE, kafka_test_overrides, tansu_binary

HUST19 = [sys.executable, "-m", "agent.cli"]


@contextmanager
def hust19(*args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``hust19 ARGS`` with output to ``log``; killed at exit if still running."""
    with log.open("ab") as out:
        proc = subprocess.Popen([*HUST19, *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_logs_its_setup_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    with hust19("serve", "--data-dir", str(tmp_path / "d"), "--port", str(port),
                "--ae-title", "EDGE1", "--allow-ae", "STORESCU", "--allow-ae", "CT2",
                log=log) as proc:
        wait_port(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    text = log.read_text()
    assert "embedded durable log" in text and "ONE box" in text
    assert "AE title EDGE1" in text and "TLS off" in text and "STORESCU, CT2" in text
    assert "received SIGTERM" in text and "outbox stopped" in text


def _stored(data_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{data_dir / 'spool.sqlite'}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_kill_9_mid_series_loses_nothing_that_got_success(tmp_path: Path) -> None:
    src = tmp_path / "series"
    src.mkdir()
    files = copy_series(src, copies=4)
    data_dir, port = tmp_path / "d", free_port()
    args = ("ingest", "--data-dir", str(data_dir), "--port", str(port))
    with hust19(*args, log=tmp_path / "1.log") as proc:
        wait_port(port)
        scu = subprocess.Popen([dcmtk("storescu"), "-v", "-aec", "HUST19", "127.0.0.1",
                                str(port), *map(str, files)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while _stored(data_dir) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        output, _ = scu.communicate(timeout=60)
    successes = len(re.findall(r"Received Store Response \(Success\)", output))
    assert 0 < successes < len(files), output[-2000:]  # killed mid-series
    acknowledged = {f.name for f in files[:successes]}  # storescu sends in order
    with hust19(*args, log=tmp_path / "2.log") as proc:
        wait_port(port)
        bus = EmbeddedBus(data_dir / "bus")
        messages = read_topic(bus, topics.DICOM_INSTANCES, successes, timeout_s=60)
        bus.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    by_sop = {m.header(topics.H_SOP_INSTANCE_UID) for m in messages}
    sent = {str(dcmread(src / name, stop_before_pixels=True).SOPInstanceUID)
            for name in acknowledged}
    assert sent <= by_sop


@pytest.mark.slow
@pytest.mark.kafka
def test_bus_down_while_series_arrives_then_caught_up(
        running_agent: Callable[..., Agent], tmp_path: Path) -> None:
    # the broker's port stays bound (not listening: the agent's connections are refused, as
    # with a broker down) until the broker starts, so nothing else can take it meanwhile
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    kport = int(holder.getsockname()[1])
    url = f"kafka://127.0.0.1:{kport}"
    agent = running_agent(bus=url, series_quiet_s=0.5)
    files = sorted(SAMPLE.glob("*.dcm"))
    result = subprocess.run([dcmtk("storescu"), "-aec", "HUST19", "127.0.0.1",
                             str(agent.port), *map(str, files)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # every instance answered Success
    assert agent.spool is not None and agent.spool.pending_count() == 30
    listen = f"tcp://127.0.0.1:{kport}"
    holder.close()
    broker = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", listen,
                               "--advertised-listener-url", listen, "--storage-engine",
                               MEMORY_STORAGE], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_port(kport)
        assert broker.poll() is None, "the broker did not start on its port"
        deadline = time.monotonic() + 90
        while agent.spool.pending_count() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert agent.spool.pending_count() == 0
        bus = KafkaBus([f"127.0.0.1:{kport}"], **kafka_test_overrides())
        assert len(read_topic(bus, topics.DICOM_INSTANCES, 30)) == 30
        assert len(read_topic(bus, topics.DICOM_SERIES, 1)) == 1
        bus.close()
        agent.stop()
    finally:
        broker.send_signal(signal.SIGINT)
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(10)


@pytest.mark.slow
def test_demo_triages_the_sample_and_shows_the_sr(tmp_path: Path) -> None:
    result = subprocess.run([*HUST19, "demo", "--data-dir", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "sending 30 files" in out
    assert "linked to iCTCF patient 778 (a demo link, not the same person)" in out
    assert "=== triage result (topic triage.results) ===" in out
    assert "(30 instances)" in out
    assert re.search(r"FLAG: (control|Type I|Type II)", out)
    # 8 mm slices: lungs measured, no involvement; the flag from the labs, saying why
    assert "quantitative CT (29 slices with lung; severity not measured)" in out
    assert "modalities: CT no (slices 8 mm thick" in out and "labs yes" in out
    assert "fusion cf_only" in out and "patient CNN" in out
    assert "=== the SR that arrived at the PACS" in out
    assert "Comprehensive SR Document" in out and "HUST-19 triage category" in out
