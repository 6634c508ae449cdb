"""Fault and hostile-peer figures of issue 20, printed as JSON (not a test: the tests run a
seeded subset, ``tests/agent/test_faults.py`` and ``tests/agent/ingest/test_hostile_peers.py``).

Real processes on loopback: ``hust19 serve|ingest|worker``, dcmtk ``storescu``/``storescp``
(``+uf``), the Kafka-protocol test broker (tansu). Sections (``--only a,b``):

* ``fuzz``: ``--fuzz`` seeded mutants of the sample (bytes flipped, cut, huge lengths, moved,
  the other VR encoding declared, 5,000-deep sequences) sent to ``hust19 serve`` (listener and
  worker): the answers, process exits (target 0), dead letters, peak memory.
* ``header``: 12 connections each sending a 6-byte A-ASSOCIATE-RQ header declaring 4 GiB
  (0xFFFFFFFF) to ``hust19 ingest``: resident memory before and after (target < 10 MiB).
* ``legit``: a legitimate sender's associate + C-ECHO + release beside 12 idle and 12 hostile
  connections, without and with TLS (target < 1 s); and beside a flood larger than
  ``max_associations`` from 40 addresses (no per-address limit helps there: the oldest idle
  connection is evicted).
* ``kafka``: two ``hust19 worker`` processes on Kafka; the one owning the series' partition is
  SIGKILLed mid-series; seconds until the series' result is on ``triage.results`` (target
  <= 15 s), and results per series.
* ``parallel``: 10 dcmtk storescu associations x ``--instances`` instances (each its own series)
  into ``hust19 ingest``: lost, duplicates, peak memory, aggregate instances/s against one
  association.
* ``kill``: ``--runs`` SIGKILLs each of ``serve``, ``ingest`` (beside a running worker) and
  ``worker`` at seeded random points over two series each, then restart and resend: lost,
  duplicates on the bus, results per series, SR copies per UID.
* ``pacs``: PACS down 20 s then up (seconds from up to the SR), refusing (dead letters),
  slow (2 s per C-STORE; SR arrivals).
* ``broker``: the Kafka broker SIGSTOPped ``--pause`` s mid-series: lost, duplicates.

    .venv/bin/python bench/faults.py [--only fuzz,header] [--fuzz 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.dicom import copy_series, free_port, run_storescu, stop_process  # noqa: E402
from tests.fixtures.faults import (  # noqa: E402
    AgentProcess,
    bus_at,
    bus_census,
    demo_lis,
    duplicate_results,
    processes,
    read_all,
    results_census,
    rss_mib,
    send_series,
    sop_uid,
    sr_census,
    start_storescp,
    wait_metric,
)
from tests.fixtures.fuzz import mutants, send_raw  # noqa: E402
from tests.fixtures.hostile import (  # noqa: E402
    client_tls,
    idle_connections,
    make_tls_files,
    oversized_header,
    timed_echo,
)
from tests.fixtures.paths import SHARED_DATA  # noqa: E402

SEED: Final = 20
RESULT_WAIT_S: Final = 180.0
SECTIONS: Final = ("fuzz", "header", "legit", "kafka", "parallel", "kill", "pacs", "broker")


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = RESULT_WAIT_S) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what} after {timeout_s} s")
        time.sleep(0.1)
    return round(time.monotonic() - started, 2)


def _agent_args(data: Path, port: int | None = None, **extra: str) -> list[str]:
    args = ["--data-dir", str(data), "--log-level", "INFO"]
    if port is not None:
        args += ["--port", str(port), "--host", "127.0.0.1"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


# -- sections ---------------------------------------------------------------------------------


def fuzz(work: Path, count: int) -> dict[str, Any]:
    files = []
    kinds = collections.Counter()
    for i, mutant in enumerate(mutants(count, seed=SEED)):
        path = work / "mutants" / f"m{i:05d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mutant.data)
        files.append(path)
        kinds[mutant.kind] += 1
    data, port = work / "fuzz-data", free_port()
    with processes() as running:
        serve = AgentProcess("serve", _agent_args(data, port, series_quiet_s="1"), work)
        running.append(serve.start())
        started = time.perf_counter()
        statuses = send_raw(files, port)
        seconds = time.perf_counter() - started
        alive_after_send = serve.alive()
        with contextlib.suppress(TimeoutError):  # the accepted ones complete one series
            _wait(lambda: b" of study " in serve.log.read_bytes() or not serve.alive(),
                  "the worker to finish the accepted series", 120)
        alive = serve.alive()
        peak = rss_mib(serve.proc.pid) if serve.proc else 0.0
        serve.stop()
    bus = bus_at("embedded", data)
    try:
        dead_letters = len(read_all(bus, "triage.dlq"))
        results = len(read_all(bus, "triage.results"))
    finally:
        bus.close()
    log = serve.log.read_text(errors="replace")
    tracebacks = [block.split("\n\n")[0][-600:] for block in log.split("Traceback")[1:]]
    return {"tracebacks": tracebacks[:3], "datasets": count, "seed": SEED,
            "mutations": dict(kinds),
            "answers": {f"0x{s:04X}" if s is not None else "no answer": n
                        for s, n in collections.Counter(statuses).items()},
            "process_exits": int(not alive_after_send) + int(not alive),
            "tracebacks_in_log": log.count("Traceback"), "dead_letters": dead_letters,
            "results": results, "send_s": round(seconds, 1),
            "datasets_per_s": round(count / seconds, 1), "peak_rss_mib": round(peak, 1)}


def header(work: Path) -> dict[str, Any]:
    data, port = work / "header-data", free_port()
    with processes() as running:
        ingest = AgentProcess("ingest", _agent_args(data, port), work)
        running.append(ingest.start())
        time.sleep(2)  # the pre-written pool settles (its page cache is not ours to count)
        assert ingest.proc is not None
        before = rss_mib(ingest.proc.pid, "VmRSS"), rss_mib(ingest.proc.pid)
        with idle_connections(port, 12, send=oversized_header()):
            time.sleep(2)  # held open: the header's cost, if any, is held now
            during = rss_mib(ingest.proc.pid, "VmRSS"), rss_mib(ingest.proc.pid)
        legit = timed_echo(port)
    return {"connections": 12, "declared_bytes_each": 0xFFFFFFFF,
            "rss_mib_before": before[0], "rss_mib_during": during[0],
            "rss_growth_mib": round(during[0] - before[0], 2),
            "peak_growth_mib": round(during[1] - before[1], 2), "target_mib": 10,
            "legit_after_ok": legit.established}


def legit(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    files = make_tls_files(work / "tls")
    for tls in (False, True):
        data, port = work / f"legit-{tls}", free_port()
        extra = {"tls_cert": str(files["server_cert"]), "tls_key": str(files["server_key"]),
                 "tls_ca": str(files["ca"])} if tls else {}
        ctx = client_tls(files) if tls else None
        with processes() as running:
            ingest = AgentProcess("ingest", _agent_args(data, port, **extra), work)
            running.append(ingest.start())
            alone = timed_echo(port, tls=ctx)
            with idle_connections(port, 12), idle_connections(
                    port, 12, first=20, send=oversized_header(length=1 << 20)):
                time.sleep(0.5)
                beside = [timed_echo(port, tls=ctx) for _ in range(5)]
            with idle_connections(port, 40, first=100):
                time.sleep(0.5)
                flood = timed_echo(port, tls=ctx, timeout_s=3)
        out["tls" if tls else "plain"] = {
            "alone_s": round(alone.seconds, 3),
            "beside_12_idle_12_hostile_s": [round(t.seconds, 3) for t in beside],
            "all_established": all(t.established for t in beside), "target_s": 1.0,
            "beside_40_idle_from_40_addresses": {
                "established": flood.established, "seconds": round(flood.seconds, 3),
                "note": "40 > max_associations (32): the oldest idle connection is closed "
                        "to make room (evicted)"}}
    return out


def _partition_of(key: bytes, partitions: int) -> int:
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _assigned(log: Path) -> set[int]:
    """The dicom.instances partitions a worker owns by its latest assignment line."""
    owned: set[int] = set()
    for line in log.read_text(errors="replace").splitlines():
        if "partitions assigned to this worker" in line:
            owned = {int(p) for p in re.findall(r"dicom\.instances\[(\d+)\]", line)}
    return owned


def kafka(work: Path, shared: Path) -> dict[str, Any]:
    from pydicom import dcmread

    from agent.bus.kafka import DEFAULT_PARTITIONS, KafkaBus
    from tests.fixtures.kafka import run_test_broker

    files = copy_series(work / "kafka-series")
    series = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    partition = _partition_of(series.encode(), DEFAULT_PARTITIONS)
    lis = demo_lis(f"sqlite:///{work / 'kafka-lis.sqlite'}", shared)
    with run_test_broker() as url, processes() as running:
        data, port = work / "kafka-data", free_port()
        common = _agent_args(data, None, bus=url, lis=lis, series_quiet_s="5")
        running.append(AgentProcess("ingest", [*common, "--port", str(port), "--host",
                                               "127.0.0.1"], work).start())
        workers: list[tuple[AgentProcess, int]] = []
        for i in range(2):
            http = free_port()
            log_dir = work / f"kafka-worker{i}"
            log_dir.mkdir(parents=True, exist_ok=True)
            w = AgentProcess("worker", [*common, "--http-port", str(http)], log_dir)
            running.append(w.start())
            workers.append((w, http))
        _wait(lambda: all(_assigned(w.log) for w, _ in workers) and sorted(
            p for w, _ in workers for p in _assigned(w.log)) == list(range(DEFAULT_PARTITIONS)),
            "the partitions shared by both workers", 120)
        owner, http = next((w, h) for w, h in workers if partition in _assigned(w.log))
        sent = send_series(files, port)
        # mid-series: the owner has scored slices of it; the series completes only 5 s after
        # the release (series_quiet_s), so it is not finished yet
        wait_metric(http, 'hust19_stage_seconds_count{stage="slice_inference"}', 1.0)
        owner.kill9()
        killed = time.monotonic()
        survivor = next(w for w, _ in workers if w is not owner)
        taken_over = _wait(lambda: partition in _assigned(survivor.log),
                           "the survivor to take the partition", 120)
        bus = KafkaBus([url.removeprefix("kafka://")])
        try:
            _wait(lambda: any(r.series_uid == series for r in results_census(bus)),
                  "the series' result", 120)
            took = round(time.monotonic() - killed, 2)
            time.sleep(5)  # a second result would be on its way now (bench only)
            results = [r for r in results_census(bus) if r.series_uid == series]
        finally:
            bus.close()
    return {"acknowledged": len(sent.acknowledged), "killed_worker_owned_partition": partition,
            "partition_taken_over_after_s": taken_over, "result_after_kill_s": took,
            "target_s": 15, "results_for_the_series": len(results),
            "duplicate_results": duplicate_results(results)}


def parallel(work: Path, instances: int) -> dict[str, Any]:
    copies = max(1, instances // 30)
    baseline = copy_series(work / "par-one", copies=copies)
    series = [copy_series(work / f"par-{i}", copies=copies) for i in range(10)]
    data, port = work / "par-data", free_port()
    out: dict[str, Any] = {"associations": 10, "instances_each": len(baseline)}
    total = len(baseline) + sum(len(s) for s in series)
    with processes() as running:
        ingest = AgentProcess("ingest", _agent_args(data, port), work)
        running.append(ingest.start())
        started = time.perf_counter()
        one = run_storescu(baseline, port, "HUST19")
        assert one.returncode == 0, one.stderr
        out["one_association_per_s"] = round(len(baseline) / (time.perf_counter() - started),
                                             1)
        codes: list[int] = []
        threads = [threading.Thread(target=lambda f=files: codes.append(
            run_storescu(f, port, "HUST19").returncode)) for files in series]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        out["storescu_exit_codes"] = sorted(codes)
        out["ten_associations_per_s"] = round(sum(len(s) for s in series) / seconds, 1)
        bus = bus_at("embedded", data)
        try:
            out["all_on_bus_after_s"] = _wait(lambda: len(bus_census(bus)) >= total,
                                              "every instance on the bus", 600)
        finally:
            bus.close()
        assert ingest.proc is not None
        out["peak_rss_mib"] = round(rss_mib(ingest.proc.pid), 1)
        ingest.stop()
    bus = bus_at("embedded", data)
    try:
        census = bus_census(bus)
    finally:
        bus.close()
    expected = {sop_uid(f) for s in [baseline, *series] for f in s}
    out["on_bus"] = len(census)
    out["lost"] = len(expected - set(census))
    out["duplicates"] = sum(n - 1 for n in census.values())
    return out


def _kill_run(role: str, work: Path, shared: Path, rng: random.Random) -> dict[str, Any]:
    pacs_port, pacs_dir = free_port(), work / "pacs"
    storescp = start_storescp(pacs_dir, pacs_port)
    data, port = work / "data", free_port()
    lis = demo_lis(f"sqlite:///{work / 'lis.sqlite'}", shared)
    common = _agent_args(data, None, lis=lis, pacs=f"127.0.0.1:{pacs_port}:PACS",
                         series_quiet_s="1")
    series = [copy_series(work / f"s{i}", copies=2) for i in range(2)]
    acknowledged: set[str] = set()
    try:
        with processes() as running:
            if role == "serve":
                victim = AgentProcess("serve", [*common, "--port", str(port), "--host",
                                                "127.0.0.1"], work)
                running.append(victim.start())
            else:
                ingest = AgentProcess("ingest", [*common, "--port", str(port), "--host",
                                                 "127.0.0.1"], work)
                worker = AgentProcess("worker", common, work)
                running += [ingest.start(), worker.start()]
                victim = ingest if role == "ingest" else worker
            delay = rng.uniform(0.2, 6.0)
            killer = threading.Timer(delay, victim.kill9)
            killer.start()
            for files in series:
                acknowledged |= send_series(files, port).acknowledged
            killer.join()
            victim.start()
            for files in series:  # the scanner resends what it could not finish
                acknowledged |= send_series(files, port).acknowledged
            _wait(lambda: len(sr_census(pacs_dir)) >= len(series), "the SRs", RESULT_WAIT_S)
            time.sleep(3)  # a redo would be under way now (bench only: the tests wait exactly)
            for p in reversed(running):
                p.stop()
    finally:
        stop_process(storescp)
    bus = bus_at("embedded", data)
    try:
        census = bus_census(bus)
        results = results_census(bus)
    finally:
        bus.close()
    srs = sr_census(pacs_dir)
    return {"kill_after_s": round(delay, 2), "acknowledged": len(acknowledged),
            "lost": len(acknowledged - set(census)),
            "duplicates_on_bus": sum(n - 1 for n in census.values()),
            "results": len(results), "duplicate_results": duplicate_results(results),
            "sr_uids": len(srs), "byte_different_sr_copies": sum(len(c) - 1
                                                                  for c in srs.values())}


def kill(work: Path, shared: Path, runs: int) -> dict[str, Any]:
    rng = random.Random(SEED)
    out: dict[str, Any] = {}
    for role in ("serve", "ingest", "worker"):
        out[role] = []
        for i in range(runs):
            run_dir = work / f"kill-{role}-{i}"
            run_dir.mkdir(parents=True)
            try:
                out[role].append(_kill_run(role, run_dir, shared, rng))
            except Exception as exc:  # one broken run must not hide the others
                out[role].append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def pacs(work: Path, shared: Path) -> dict[str, Any]:
    from agent.bus.embedded import EmbeddedBus
    from agent.config import PacsDestination
    from agent.triage.pacs import BusDeadLetters, PacsSender
    from agent.triage.sr import build_sr
    from tests.agent.triage.test_sr import VERSION, make_result, source_from

    out: dict[str, Any] = {}
    source = source_from(shared / "chest-ct-series" / "normal001")

    # down 20 s, then up
    port = free_port()
    dest = PacsDestination(host="127.0.0.1", port=port, ae_title="PACS")
    sender = PacsSender([dest], work / "pacs-down-outbox", "HUST19", timeout_s=10)
    sender.start()
    sender.enqueue(build_sr(make_result(source, "type2", cf=True), source,
                            algorithm_version=VERSION))
    time.sleep(20)  # the outage
    proc = start_storescp(work / "pacs-down", port)
    up = time.monotonic()
    try:
        _wait(lambda: sender.pending_count() == 0, "the SR after the PACS came back", 120)
        out["down_20s_then_up_sr_after_s"] = round(time.monotonic() - up, 2)
        out["target_s"] = "<= 30 s backoff cap; about 1 s with the probe"
    finally:
        sender.stop(10)
        stop_process(proc)
    # refusing: dead letters, not endless retry
    port = free_port()
    proc = start_storescp(work / "pacs-refusing", port, "--refuse")
    bus = EmbeddedBus(work / "pacs-bus")
    sender = PacsSender([PacsDestination(host="127.0.0.1", port=port, ae_title="PACS")],
                        work / "pacs-refusing-outbox", "HUST19", timeout_s=10,
                        dead_letter=BusDeadLetters(bus))
    sender.enqueue(build_sr(make_result(source, "type1", cf=True), source,
                            algorithm_version=VERSION))
    passes = 0
    while sender.pending_count() and passes < 5:
        sender.send_pending_once()
        passes += 1
    out["refusing"] = {"passes_until_dead_letter": passes,
                       "dead_letters": len(read_all(bus, "triage.dlq")),
                       "still_pending": sender.pending_count()}
    bus.close()
    stop_process(proc)
    # slow: 2 s inside each C-STORE
    port = free_port()
    proc = start_storescp(work / "pacs-slow", port, "--sleep-during", "2")
    sender = PacsSender([PacsDestination(host="127.0.0.1", port=port, ae_title="PACS")],
                        work / "pacs-slow-outbox", "HUST19", timeout_s=10)
    sender.enqueue(build_sr(make_result(source, "control", cf=True), source,
                            algorithm_version=VERSION))
    started = time.monotonic()
    delivered = sender.send_pending_once()
    out["slow"] = {"delivered": delivered, "seconds": round(time.monotonic() - started, 2)}
    stop_process(proc)
    out["slow"]["arrivals"] = sum(1 for p in (work / "pacs-slow").iterdir()
                                  if p.name.startswith("SR"))
    return out


def broker(work: Path, pause_s: float) -> dict[str, Any]:
    from tests.agent.test_faults import _listener_pid
    from tests.fixtures.kafka import run_test_broker

    files = copy_series(work / "broker-series", copies=2)
    data, port = work / "broker-data", free_port()
    with run_test_broker() as url, processes() as running:
        pid = _listener_pid(int(url.rsplit(":", 1)[1]))
        ingest = AgentProcess("ingest", _agent_args(data, port, bus=url), work)
        running.append(ingest.start())
        half = len(files) // 2
        acknowledged = send_series(files[:half], port).acknowledged
        os.kill(pid, signal.SIGSTOP)
        try:
            acknowledged |= send_series(files[half:], port).acknowledged
            time.sleep(pause_s)  # the pause (the fault)
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        bus = bus_at(url, data)
        try:
            caught_up = _wait(lambda: len(bus_census(bus)) >= len(files), "caught up", 300)
            time.sleep(5)  # a duplicate would be on its way now (bench only)
            census = bus_census(bus)
        finally:
            bus.close()
        ingest.stop()
    return {"pause_s": pause_s, "acknowledged": len(acknowledged),
            "lost": len(acknowledged - set(census)),
            "duplicates": sum(n - 1 for n in census.values()),
            "caught_up_after_resume_s": caught_up,
            "resumed_to_census_s": round(time.monotonic() - resumed, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--fuzz", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--pause", type=float, default=30.0)
    args = parser.parse_args()
    wanted = [s for s in args.only.split(",") if s]
    shared = SHARED_DATA
    report: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="hust19-faults-") as tmp:
        work = Path(tmp)
        jobs: dict[str, Callable[[], dict[str, Any]]] = {
            "fuzz": lambda: fuzz(work / "fuzz", args.fuzz),
            "header": lambda: header(work / "header"),
            "legit": lambda: legit(work / "legit"),
            "kafka": lambda: kafka(work / "kafka", shared),
            "parallel": lambda: parallel(work / "parallel", args.instances),
            "kill": lambda: kill(work / "kill", shared, args.runs),
            "pacs": lambda: pacs(work / "pacs", shared),
            "broker": lambda: broker(work / "broker", args.pause),
        }
        for name in wanted:
            (work / name).mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            try:
                report[name] = jobs[name]()
            except Exception as exc:
                report[name] = {"error": f"{type(exc).__name__}: {exc}",
                                "trace": traceback.format_exc()[-1500:]}
            report[name + "_wall_s"] = round(time.monotonic() - started, 1)
            print(f"{name}: {json.dumps(report[name])[:400]}", file=sys.stderr, flush=True)
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
