"""Benchmark of the triage dashboard against the issue's targets; prints one JSON object.

    .venv/bin/python bench/dashboard.py [--results 10000] [--db URL] [--out FILE]

What it does, on a fresh data folder (a temporary one unless ``--data-dir``):

1. publishes ``--results`` synthetic results (``agent.dashboard.synthetic``, made-up
   patients) and an evidence set for every ``--evidence-every``-th one on the embedded bus;
2. starts ``hust19 dashboard --auth proxy`` as a process of its own and times how long it
   takes to consume them all (read from its committed offsets);
3. times the worklist's first page and each filter ``--repeat`` times over HTTP: the server's
   own time from the ``Server-Timing`` header (the target's "server time") and the client's
   wall time;
4. opens the worklist in Debian's Chromium (Playwright) and times ``--live`` results from the
   producer's flush to the row in the page (published -> visible);
5. reads the dashboard process's resident memory (``VmRSS``) and its peak (``VmHWM``).

Targets (issue 18): first page < 300 ms and a filter < 500 ms server time with 10,000 results;
published -> visible < 1 s on the embedded bus; process memory < 300 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.bus.embedded import EmbeddedBus  # noqa: E402
from agent.dashboard.synthetic import (  # noqa: E402
    make_evidence,
    make_result,
    publish_evidence,
    publish_result,
)
from schemas import topics  # noqa: E402

TARGETS = {"first_page_ms": 300.0, "filter_ms": 500.0, "published_to_visible_ms": 1000.0,
           "memory_mib": 300.0}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
FILTERS = {
    "flag=type2": {"flag": "type2"},
    "modalities=ct": {"avail": "ct"},
    "not acknowledged": {"ack": "no"},
    "search patient ID": {"q": "SYN-004242"},
    "search accession substring": {"q": "00777"},
    "study date range": {"from": "2026-11-01", "to": "2026-11-15"},
    "flag+modalities+ack+range": {"flag": "type1", "avail": "both", "ack": "no",
                                  "from": "2026-10-01", "to": "2026-12-31"},
    "last page": {"page": "200"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 1),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
            "max": round(ordered[-1], 1), "n": len(ordered)}


def server_ms(response: httpx.Response) -> float:
    timing = response.headers["server-timing"]
    return float(timing.split("dur=")[1])


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def committed(data_dir: Path, topic: str) -> int:
    path = data_dir / "bus" / "groups" / "hust19-dashboard" / f"{topic}.offset.json"
    try:
        return int(json.loads(path.read_text())["next_offset"])
    except (OSError, ValueError, KeyError):
        return 0


def publish_all(bus: EmbeddedBus, count: int, evidence_every: int) -> dict[str, Any]:
    producer = bus.producer()
    now = datetime.now(UTC)
    started = time.perf_counter()
    evidence_pool = [make_evidence(make_result(i), seed=i) for i in range(20)]
    sent_evidence = 0
    for n in range(count):
        result = make_result(n, ready=now - timedelta(minutes=7 * (count - n)),
                             status="skipped" if n % 23 == 0 else "triaged")
        publish_result(producer, result)
        if evidence_every and n % evidence_every == 0 and result.status == "triaged":
            pool = evidence_pool[n % len(evidence_pool)]
            publish_evidence(producer, pool.model_copy(update={
                "result_id": result.result_id, "series_uid": result.series_uid,
                "study_uid": result.study_uid}))
            sent_evidence += 1
        if n % 1000 == 999:
            producer.flush()
    producer.flush()
    return {"results": count, "evidence_sets": sent_evidence,
            "publish_s": round(time.perf_counter() - started, 1)}


def time_pages(base: str, repeat: int) -> dict[str, Any]:
    headers = {"X-Forwarded-User": "bench"}
    out: dict[str, Any] = {}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        for _ in range(3):  # warm up (first queries, template compilation)
            c.get("/")
        server, wall = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            r = c.get("/")
            wall.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.status_code
            server.append(server_ms(r))
        out["first_page"] = {"server_ms": summary(server), "wall_ms": summary(wall),
                             "bytes": len(r.content)}
        filters = {}
        for name, params in FILTERS.items():
            c.get("/", params=params)
            server, wall = [], []
            for _ in range(repeat):
                t = time.perf_counter()
                r = c.get("/", params=params)
                wall.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200
                server.append(server_ms(r))
            filters[name] = {"server_ms": summary(server), "wall_ms": summary(wall)}
        out["filters"] = filters
        t = time.perf_counter()
        r = c.get("/worklist")
        out["live_fragment_server_ms"] = server_ms(r)
        t = time.perf_counter()
        csv_text = c.get("/export.csv").text
        out["csv_export_all"] = {"rows": csv_text.count("\n") - 1,
                                 "wall_ms": round((time.perf_counter() - t) * 1000, 1)}
    return out


def time_live(base: str, bus: EmbeddedBus, count: int, first: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    producer = bus.producer()
    took: list[float] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1366, "height": 768},
                                      extra_http_headers={"X-Forwarded-User": "bench"})
        page = context.new_page()
        page.goto(base + "/")
        page.wait_for_selector("#live[data-state=live]")
        for i in range(count):
            n = first + i
            result = make_result(n, flag="type2", ready=datetime.now(UTC))
            started = time.perf_counter()
            publish_result(producer, result)
            producer.flush()
            page.wait_for_selector(f'tr[id="row-{result.result_id}"]', timeout=10_000)
            took.append((time.perf_counter() - started) * 1000)
            time.sleep(0.3)  # apart, so each is measured on its own
        browser.close()
    return summary(took)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=int, default=10_000)
    parser.add_argument("--evidence-every", type=int, default=1,
                        help="publish an evidence set for every N-th result (0: none)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--live", type=int, default=10)
    parser.add_argument("--db", help="dashboard database URL (default: SQLite in the folder)")
    parser.add_argument("--data-dir", type=Path, help="keep the data here")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    tmp = None if args.data_dir else tempfile.mkdtemp(prefix="hust19-bench-dashboard-")
    data_dir = Path(args.data_dir or tmp)  # type: ignore[arg-type]
    data_dir.mkdir(parents=True, exist_ok=True)
    bus = EmbeddedBus(data_dir / "bus")
    report: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version()},
        "database": args.db or "sqlite (data folder)"}
    report["published"] = publish_all(bus, args.results, args.evidence_every)
    port = free_port()
    cmd = [str(REPO / ".venv" / "bin" / "hust19"), "dashboard", "--data-dir", str(data_dir),
           "--port", str(port), "--auth", "proxy", "--log-level", "WARNING"]
    if args.db:
        cmd += ["--db", args.db]
    log = (data_dir / "dashboard.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        want = {topics.TRIAGE_RESULTS: args.results,
                topics.TRIAGE_EVIDENCE: report["published"]["evidence_sets"]}
        while any(committed(data_dir, t) < n for t, n in want.items()):
            if proc.poll() is not None:
                raise SystemExit(f"dashboard exited: {(data_dir / 'dashboard.log').read_text()}")
            time.sleep(0.1)
        ingest_s = time.perf_counter() - started
        report["ingest"] = {"seconds_from_start": round(ingest_s, 1),
                            "messages_per_s": round(sum(want.values()) / ingest_s)}
        report["memory_after_ingest_mib"] = memory_mib(proc.pid)
        report["pages"] = time_pages(base, args.repeat)
        report["published_to_visible_ms"] = time_live(base, bus, args.live, args.results)
        report["memory_mib"] = memory_mib(proc.pid)
        db_file = data_dir / "dashboard.sqlite"
        if db_file.exists():
            report["sqlite_bytes"] = sum(p.stat().st_size for p in data_dir.glob(
                "dashboard.sqlite*"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        bus.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    pages = report["pages"]
    worst_filter = max(f["server_ms"]["p95"] for f in pages["filters"].values())
    report["targets"] = {
        "first_page_ms": {"target": TARGETS["first_page_ms"],
                          "p95": pages["first_page"]["server_ms"]["p95"]},
        "filter_ms": {"target": TARGETS["filter_ms"], "worst_p95": worst_filter},
        "published_to_visible_ms": {"target": TARGETS["published_to_visible_ms"],
                                    "max": report["published_to_visible_ms"]["max"]},
        "memory_mib": {"target": TARGETS["memory_mib"], "peak": report["memory_mib"]["peak"]},
    }
    for t in report["targets"].values():
        measured = next(v for k, v in t.items() if k != "target")
        t["met"] = measured < t["target"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(t["met"] for t in report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
