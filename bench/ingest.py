"""Ingest benchmark (JSON out; not a test).

Sends the same 300-slice 512x512 uncompressed series (10 stacked copies of the repository's
sample with new UIDs) with dcmtk ``storescu`` in one association to
(a) dcmtk ``storescp`` (writes files, no fsync), (b) pynetdicom's example
``python -m pynetdicom storescp``, (c) ``hust19 ingest`` (fsync of file and directory, SQLite
index, publishing to the embedded bus), and reports instances/s, the ratios, and the peak
resident memory of each listener (``VmHWM``) for a 30-slice and the 300-slice series, to see
whether the listener's memory grows with the series.

    .venv/bin/python bench/ingest.py [--copies 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.dicom import (  # noqa: E402
    copy_series,
    dcmtk,
    free_port,
    stop_process,
    wait_port,
)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _listener(kind: str, port: int, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"}
    if kind == "dcmtk storescp":
        cmd = [dcmtk("storescp"), "-od", str(out), "+xa", str(port)]
    elif kind == "pynetdicom storescp":
        cmd = [sys.executable, "-m", "pynetdicom", "storescp", "-od", str(out), "-q", str(port)]
    else:
        cmd = [sys.executable, "-m", "agent.cli", "ingest", "--data-dir", str(out), "--port",
               str(port), "--host", "127.0.0.1", "--log-level", "WARNING"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=REPO)


def _run(kind: str, files: list[Path], work: Path) -> dict[str, float]:
    port = free_port()
    out = Path(tempfile.mkdtemp(dir=work))
    proc = _listener(kind, port, out)
    try:
        wait_port(port, 60)
        start = time.perf_counter()
        subprocess.run([dcmtk("storescu"), "-aec", "HUST19", "127.0.0.1", str(port),
                        *map(str, files)], check=True, capture_output=True,
                       env={**os.environ, "TCP_NODELAY": "1"})
        seconds = time.perf_counter() - start
        return {"seconds": round(seconds, 3),
                "instances_per_s": round(len(files) / seconds, 1),
                "peak_rss_mib": round(_peak_rss_kib(proc.pid) / 1024, 1)}
    finally:
        stop_process(proc, timeout_s=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kinds = ("dcmtk storescp", "pynetdicom storescp", "hust19 ingest")
    with tempfile.TemporaryDirectory(prefix="hust19-bench-") as tmp:
        work = Path(tmp)
        big = copy_series(work / "big", copies=args.copies)
        small = copy_series(work / "small")
        report: dict[str, object] = {"instances": len(big), "bytes": sum(
            f.stat().st_size for f in big), "repeats": args.repeats, "cpus": os.cpu_count()}
        best: dict[str, dict[str, float]] = {}
        for kind in kinds:
            runs = [_run(kind, big, work) for _ in range(args.repeats)]
            best[kind] = max(runs, key=lambda r: r["instances_per_s"])
            best[kind]["peak_rss_mib_30_slices"] = _run(kind, small, work)["peak_rss_mib"]
        report["listeners"] = best
        ours = best["hust19 ingest"]["instances_per_s"]
        report["ratio_vs_dcmtk_storescp"] = round(ours / best["dcmtk storescp"]
                                                  ["instances_per_s"], 3)
        report["ratio_vs_pynetdicom_storescp"] = round(
            ours / best["pynetdicom storescp"]["instances_per_s"], 3)
        report["targets"] = {"vs_dcmtk": ">= 0.5", "vs_pynetdicom": ">= 2"}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
