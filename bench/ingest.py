"""Ingest benchmark (JSON out; not a test).

Sends the same 300-slice 512x512 uncompressed series (10 stacked copies of the repository's
sample with new UIDs) with dcmtk ``storescu`` in one association to
(a) dcmtk ``storescp`` (writes files, no fsync), (b) pynetdicom's example
``python -m pynetdicom storescp``, (c) ``hust19 ingest`` (one flush per instance into its sealed
spool, the SQLite index, publishing to the embedded bus; a fresh data directory per run, whose
pool of pre-written spool files the agent writes in the background from its start), runs
them interleaved (``--repeats`` rounds of each, all listed), and reports for each listener
instances/s (the best run and the median), its CPU time per instance (user + system from
``/proc`` before and after the send: steadier than the rate on a shared machine), and its
peak resident memory (``VmHWM``) for a 30-slice and the 300-slice series, to see whether the
listener's memory grows with the series; then the ratios of the best runs and of the
medians. ``--baseline PATH`` adds ``hust19 ingest`` from another checkout with its own
``.venv`` (e.g. a ``git worktree`` of an earlier commit) to the interleaved rounds: an A/B of
two versions under the same conditions. For ``hust19 ingest`` it also reports
``published_s``: from the start of the send until every instance could be read back from the
embedded bus (the outbox publishes while the series streams in). The load averages at the
start and the end say how busy the machine was (ratios are taken within one run). Before each
run the page cache is written back (``sync``), so that what one listener left unwritten
(dcmtk's and pynetdicom's examples do not fsync) is not flushed during the next one's run, and
after each run its files are deleted, so that every run starts from the same disk state.

    .venv/bin/python bench/ingest.py [--copies 10] [--repeats 3] [--baseline PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.dicom import (  # noqa: E402
    copy_series,
    dcmtk,
    free_port,
    stop_process,
    wait_port,
)

HUST19: Final = "hust19 ingest"
BASELINE: Final = "hust19 ingest (baseline)"
PUBLISH_TIMEOUT_S: Final = 120.0
POLL_RECORDS: Final = 500


def _published_after(out: Path, count: int, start: float) -> float:
    """Seconds from ``start`` until ``count`` instances can be read from the embedded bus of
    the agent whose data directory is ``out``."""
    from agent.bus.factory import open_bus
    from schemas import topics

    bus = open_bus("embedded", out)
    consumer = bus.consumer(None, [topics.DICOM_INSTANCES])
    seen = 0
    deadline = time.monotonic() + PUBLISH_TIMEOUT_S
    try:
        while seen < count and time.monotonic() < deadline:
            seen += len(consumer.poll(timeout_s=0.1, max_records=POLL_RECORDS))
    finally:
        consumer.close()
        bus.close()
    if seen < count:
        raise RuntimeError(f"only {seen} of {count} instances on the bus after "
                           f"{PUBLISH_TIMEOUT_S} s")
    return time.perf_counter() - start


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _listener(kind: str, port: int, out: Path,
              baseline: Path | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"}
    tree = baseline if kind == BASELINE and baseline is not None else REPO
    if kind == "dcmtk storescp":
        cmd = [dcmtk("storescp"), "-od", str(out), "+xa", str(port)]
    elif kind == "pynetdicom storescp":
        cmd = [sys.executable, "-m", "pynetdicom", "storescp", "-od", str(out), "-q", str(port)]
    else:
        python = str(tree / ".venv" / "bin" / "python") if kind == BASELINE else sys.executable
        cmd = [python, "-m", "agent.cli", "ingest", "--data-dir", str(out), "--port",
               str(port), "--host", "127.0.0.1", "--log-level", "WARNING"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=tree)


def _run(kind: str, files: list[Path], work: Path,
         baseline: Path | None = None) -> dict[str, float]:
    port = free_port()
    out = Path(tempfile.mkdtemp(dir=work))
    os.sync()  # the files the previous listener wrote without fsync are not flushed in this run
    proc = _listener(kind, port, out, baseline)
    try:
        wait_port(port, 60)
        cpu = _cpu_s(proc.pid)
        start = time.perf_counter()
        subprocess.run([dcmtk("storescu"), "-aec", "HUST19", "127.0.0.1", str(port),
                        *map(str, files)], check=True, capture_output=True,
                       env={**os.environ, "TCP_NODELAY": "1"})
        seconds = time.perf_counter() - start
        result = {"seconds": round(seconds, 3),
                  "instances_per_s": round(len(files) / seconds, 1),
                  "cpu_ms_per_instance": round((_cpu_s(proc.pid) - cpu) / len(files) * 1e3, 2),
                  "peak_rss_mib": round(_peak_rss_kib(proc.pid) / 1024, 1)}
        if kind in (HUST19, BASELINE):
            result["published_s"] = round(_published_after(out, len(files), start), 3)
        return result
    finally:
        stop_process(proc, timeout_s=30)
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout of the agent (with its .venv) to run beside")
    args = parser.parse_args()
    baseline: Path | None = args.baseline.resolve() if args.baseline else None
    if baseline is not None and not (baseline / ".venv" / "bin" / "python").exists():
        parser.error(f"--baseline {baseline}: no .venv/bin/python there")
    kinds = ("dcmtk storescp", "pynetdicom storescp", HUST19,
             *((BASELINE,) if baseline is not None else ()))
    with tempfile.TemporaryDirectory(prefix="hust19-bench-") as tmp:
        work = Path(tmp)
        big = copy_series(work / "big", copies=args.copies)
        small = copy_series(work / "small")
        report: dict[str, object] = {"instances": len(big), "bytes": sum(
            f.stat().st_size for f in big), "repeats": args.repeats, "cpus": os.cpu_count(),
            "loadavg_start": _loadavg()}
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
        for _ in range(args.repeats):  # interleaved: a slow spell of the disk hits every kind
            for kind in kinds:
                runs[kind].append(_run(kind, big, work, baseline))
        best: dict[str, dict[str, Any]] = {}
        for kind in kinds:
            best[kind] = max(runs[kind], key=lambda r: r["instances_per_s"])
            best[kind]["all_instances_per_s"] = [r["instances_per_s"] for r in runs[kind]]
            best[kind]["median_instances_per_s"] = round(statistics.median(
                r["instances_per_s"] for r in runs[kind]), 1)
            best[kind]["median_cpu_ms_per_instance"] = round(statistics.median(
                r["cpu_ms_per_instance"] for r in runs[kind]), 2)
            best[kind]["peak_rss_mib_30_slices"] = _run(kind, small, work,
                                                        baseline)["peak_rss_mib"]
        report["listeners"] = best
        report["loadavg_end"] = _loadavg()
        for kind in kinds[2:]:
            suffix = "" if kind == HUST19 else "_baseline"
            for measure, key in (("", "instances_per_s"), ("_median", "median_instances_per_s")):
                ours = best[kind][key]
                report[f"ratio{measure}_vs_dcmtk_storescp{suffix}"] = round(
                    ours / best["dcmtk storescp"][key], 3)
                report[f"ratio{measure}_vs_pynetdicom_storescp{suffix}"] = round(
                    ours / best["pynetdicom storescp"][key], 3)
        report["targets"] = {"vs_dcmtk": ">= 0.5", "vs_pynetdicom": ">= 2"}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
