"""Operations: /healthz, /readyz and /metrics scraped during an end-to-end run (counters match
what was sent), ``hust19 doctor`` on a working and on broken setups, SIGTERM during a series,
JSON logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.app import ALL_ROLES, ROLE_WORKER, Agent
from schemas import topics
from tests.fixtures.dicom import (
    SAMPLE,
    dcmtk,
    free_port,
    linked_lis,
    read_topic,
    run_storescu,
    wait_for,
)

pytestmark = pytest.mark.slow

WAIT_S = 90.0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str, labels: str = "") -> float:
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{wanted} not in /metrics")


def test_health_ready_and_metrics_during_an_end_to_end_run(
        running_agent: Callable[..., Agent], storescp: Callable[..., tuple[int, Path]],
        tmp_path: Path, shared_data: Path) -> None:
    pacs_port, pacs_dir = storescp(aet="PACS")
    http = free_port()
    agent = running_agent(roles=ALL_ROLES, pacs=[f"127.0.0.1:{pacs_port}:PACS"],
                          http_port=http, series_quiet_s=1.0,
                          lis=linked_lis(f"sqlite:///{tmp_path / 'lis.sqlite'}", shared_data))
    base = f"http://127.0.0.1:{http}"
    assert _get(base + "/healthz") == (200, '{"status":"ok"}\n')
    files = sorted(SAMPLE.glob("*.dcm"))
    assert run_storescu(files, agent.port, "HUST19").returncode == 0
    read_topic(agent.bus, topics.TRIAGE_RESULTS, 1, WAIT_S)
    sr_sent = ("hust19_sr_sent_total", f'destination="127.0.0.1:{pacs_port}:PACS"')
    # the SR counted as sent once the PACS answered (the file arrives a moment before that)
    wait_for(lambda: f'{sr_sent[0]}{{{sr_sent[1]}}} 1.0' in _get(base + "/metrics")[1],
             "the SR to be sent", WAIT_S)
    assert any(p.name.startswith("SR") for p in pacs_dir.iterdir())

    status, text = _get(base + "/metrics")
    assert status == 200
    assert _metric(text, "hust19_instances_received_total") == len(files)
    assert _metric(text, "hust19_series_completed_total") == 1
    assert _metric(text, "hust19_associations_total", 'outcome="accepted"') == 1
    flags = sum(_metric(text, "hust19_results_total", f'flag="{f}"') for f in
                ("control", "type1", "type2") if f'flag="{f}"' in text)
    assert flags == 1
    assert _metric(text, "hust19_sr_sent_total",
                   f'destination="127.0.0.1:{pacs_port}:PACS"') == 1
    assert _metric(text, "hust19_backend_info", 'backend="onnxruntime"') == 1
    for stage in ("ingest", "slice_inference", "fusion", "sr_send"):
        assert _metric(text, "hust19_stage_seconds_count", f'stage="{stage}"') >= 1
    assert _metric(text, "hust19_stage_seconds_count", 'stage="ingest"') == len(files)

    status, body = _get(base + "/readyz")
    report = json.loads(body)
    assert status == 200, report
    assert set(report) >= {"bus", "spool", "lis", f"pacs 127.0.0.1:{pacs_port}:PACS", "models"}
    text = _get(base + "/metrics")[1]
    assert _metric(text, "hust19_spool_depth") == 0
    # computed when scraped: the stocked pool at least, and the data folder's free space
    assert _metric(text, "hust19_spool_bytes") >= agent.settings.spool_pool_file_bytes
    free = shutil.disk_usage(agent.settings.data_dir).free
    assert abs(_metric(text, "hust19_data_disk_free_bytes") - free) < 0.05 * free


def test_a_worker_only_process_reports_the_data_folder_too(
        running_agent: Callable[..., Agent], tmp_path: Path) -> None:
    http = free_port()
    agent = running_agent(roles=frozenset({ROLE_WORKER}), http_port=http,
                          lis=f"sqlite:///{tmp_path / 'lis.sqlite'}")
    text = _get(f"http://127.0.0.1:{http}/metrics")[1]
    free = shutil.disk_usage(agent.settings.data_dir).free
    assert abs(_metric(text, "hust19_data_disk_free_bytes") - free) < 0.05 * free
    assert _metric(text, "hust19_spool_bytes") == 0  # no ingest ever spooled in this folder


def test_readyz_names_an_unreachable_pacs(running_agent: Callable[..., Agent],
                                          tmp_path: Path) -> None:
    http = free_port()
    dead = free_port()
    running_agent(roles=ALL_ROLES, pacs=[f"127.0.0.1:{dead}:NOPE"], http_port=http,
                  lis=f"sqlite:///{tmp_path / 'lis.sqlite'}")
    status, body = _get(f"http://127.0.0.1:{http}/readyz")
    report = json.loads(body)
    assert status == 503
    assert report[f"pacs 127.0.0.1:{dead}:NOPE"] != "ok"
    assert report["bus"] == "ok" and report["lis"].startswith("warning: ")  # an empty LIS


def test_readyz_fails_for_a_pacs_that_answers_echo_but_refuses_our_ae(
        running_agent: Callable[..., Agent], tmp_path: Path) -> None:
    """Issue 20, item 7: a PACS whose modality list lacks our AE title answered C-ECHO to
    nobody in particular and looked healthy; /readyz now associates as the agent, proposing
    Comprehensive SR Storage, and says why it cannot send."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        ComprehensiveSRStorage,
        Verification,
    )

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(Verification)
    pacs.add_supported_context(ComprehensiveSRStorage)
    pacs.require_calling_aet = ["SOMEONE"]
    port, http = free_port(), free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False)
    try:
        running_agent(roles=ALL_ROLES, pacs=[f"127.0.0.1:{port}:PACS"], http_port=http,
                      lis=f"sqlite:///{tmp_path / 'lis.sqlite'}")
        status, body = _get(f"http://127.0.0.1:{http}/readyz")
    finally:
        server.shutdown()
    report = json.loads(body)
    assert status == 503
    assert "refuses AE 'HUST19'" in report[f"pacs 127.0.0.1:{port}:PACS"]
    assert "Calling AE title not recognised" in report[f"pacs 127.0.0.1:{port}:PACS"]


def _hust19(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_doctor_on_a_working_setup(storescp: Callable[..., tuple[int, Path]],
                                   tmp_path: Path, shared_data: Path) -> None:
    from agent.cli.commands.lis import import_ictcf

    pacs_port, _ = storescp(aet="PACS")
    lis = f"sqlite:///{tmp_path / 'lis.db'}"
    import_ictcf(shared_data / "ictcf", lis, limit=2)  # a LIS with patients
    proc = _hust19("doctor", "--data-dir", str(tmp_path / "d"), "--pacs",
                   f"127.0.0.1:{pacs_port}:PACS", "--lis", lis)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[ ok ] model files" in out and "[ ok ] bus" in out and "[ ok ] lis" in out
    assert (f"[ ok ] pacs 127.0.0.1:{pacs_port}:PACS: accepts Comprehensive SR Storage from "
            "AE 'HUST19'; C-ECHO answered Success") in out
    assert "backend onnxruntime" in out  # no GPU here: said plainly
    assert "the spool uses 0.0 MiB" in out  # a new data folder: nothing spooled yet
    warned = out.count("[warn]")  # here: no TensorRT (optional packages, backend)
    assert out.rstrip().endswith(
        f"No problem stops the agent; read the {warned} warning(s) above: not everything is "
        "in place." if warned else "Everything needed is in place.")


def test_doctor_reports_lis_down_pacs_down_and_no_gpu(tmp_path: Path) -> None:
    dead = free_port()
    proc = _hust19("doctor", "--json", "--data-dir", str(tmp_path / "d"), "--pacs",
                   f"127.0.0.1:{dead}:NOPE", "--lis", "postgresql://nobody@127.0.0.1:1/none",
                   "--backend", "tensorrt")
    assert proc.returncode == 1
    findings = {f["check"]: f for f in map(json.loads, proc.stdout.splitlines())}
    assert findings["lis"]["level"] == "fail" and "not reachable" in findings["lis"]["message"]
    assert "***" not in findings["lis"]["message"] or "nobody" in findings["lis"]["message"]
    pacs = findings[f"pacs 127.0.0.1:{dead}:NOPE"]
    assert pacs["level"] == "fail" and "cannot be used by AE 'HUST19'" in pacs["message"]
    assert "no connection" in pacs["message"]
    gpu = findings["gpu / backend"]
    assert gpu["level"] == "warn" and "fall back to ONNX Runtime" in gpu["message"]
    assert findings["model files"]["level"] == "ok"


def _doctor_findings(data: Path) -> dict[str, dict[str, str]]:
    proc = _hust19("doctor", "--json", "--data-dir", str(data))
    return {f["check"]: f for f in map(json.loads, proc.stdout.splitlines())}


def test_doctor_warns_when_no_group_consumes_what_retention_will_delete(
        tmp_path: Path) -> None:
    """Instances on the embedded bus that no consumer group has committed on are deleted
    unread once past the retention: doctor says so; once a group commits it says where."""
    from agent.bus.factory import open_bus

    data = tmp_path / "d"
    bus = open_bus("embedded", data)
    try:
        producer = bus.producer()
        for n in range(3):
            producer.send(topics.DICOM_INSTANCES, b"1.2.3", f"instance {n}".encode(), [])
        producer.flush()
        producer.close()
        warned = _doctor_findings(data)["bus retention"]
        assert warned["level"] == "warn"
        assert "3 instances" in warned["message"] and "deleted unread" in warned["message"]
        consumer = bus.consumer("hust19-workers", [topics.DICOM_INSTANCES])
        try:
            assert len(consumer.poll(timeout_s=5.0, max_records=2)) == 2
            consumer.commit({(topics.DICOM_INSTANCES, 0): 2})
        finally:
            consumer.close()
    finally:
        bus.close()
    settled = _doctor_findings(data)["bus retention"]
    assert settled["level"] == "ok"
    assert "ends at offset 3" in settled["message"] and "hust19-workers at 2" in settled["message"]


def test_sigterm_during_a_series_loses_nothing_and_sends_one_sr(
        storescp: Callable[..., tuple[int, Path]], tmp_path: Path, shared_data: Path) -> None:
    pacs_port, pacs_dir = storescp(aet="PACS")
    data, port = tmp_path / "data", free_port()
    lis = linked_lis(f"sqlite:///{tmp_path / 'lis.sqlite'}", shared_data)  # the SR needs labs
    args = ["serve", "--data-dir", str(data), "--port", str(port), "--host", "127.0.0.1",
            "--series-quiet-s", "4", "--pacs", f"127.0.0.1:{pacs_port}:PACS", "--lis", lis,
            "--log-json"]
    log1 = tmp_path / "serve1.log"
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], stdout=log1.open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ,
                                                           "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while b"agent running" not in log1.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log1.read_text()
            time.sleep(0.2)
        files = sorted(SAMPLE.glob("*.dcm"))
        assert run_storescu(files, port, "HUST19").returncode == 0  # all answered Success
        stopped = time.monotonic()  # mid-series: stored, not complete (4 s quiet)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert time.monotonic() - stopped < 45, "stop took too long"
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in log1.read_text().splitlines() if line.startswith("{")]
    assert any("received SIGTERM" in line["message"] for line in lines)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert not [p for p in pacs_dir.iterdir() if p.name.startswith("SR")]

    log2 = tmp_path / "serve2.log"
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], stdout=log2.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while not [p for p in pacs_dir.iterdir() if p.name.startswith("SR")]:
            assert proc.poll() is None and time.monotonic() < deadline, log2.read_text()
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)  # stopped: whatever it would send twice has been sent by now
    srs = [p for p in pacs_dir.iterdir() if p.name.startswith("SR")]
    assert len(srs) == 1  # +uf: a second arrival of the SR would be a second file
    dump = _hust19("bus", "dump", "--topic", topics.DICOM_INSTANCES, "--data-dir", str(data))
    assert len(dump.stdout.splitlines()) == len(files)
    results = _hust19("bus", "dump", "--topic", topics.TRIAGE_RESULTS, "--data-dir", str(data))
    assert len(results.stdout.splitlines()) == 1
    subprocess.run([dcmtk("dsrdump"), str(srs[0])], check=True, capture_output=True)
