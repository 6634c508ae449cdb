"""Speed and memory of the quantitative CT (segmentation + measurement) on the shared series.

Usage: ``python bench/quantitative.py [--data ../shared/data] [--repeat 3]``; prints JSON.

For each series: slices per second of :func:`engines.lung_segmentation.segment` +
:func:`engines.quantitative.quantify` on the decoded HU volume (decoding is the worker's
per-instance work and is timed apart), the best of ``--repeat`` runs, and the peak extra
memory of one run (tracemalloc: NumPy allocations), next to the volume's own size. The issue's
target: >= 100 slices/s for a 512 x 512 series on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

# The repository first: run as `python bench/<name>.py`, this folder's engines.py (the network
# benchmark) would otherwise shadow the engines package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import lung_segmentation, quantitative
from engines.training.series_data import LabelledSeries, load_volume

SERIES = {"P002": "chest-ct-series/P002", "cap002": "chest-ct-series/cap002",
          "normal001": "chest-ct-series/normal001",
          "lung-pet-ct-dx": "lung-pet-ct-dx/Lung_Dx-A0002-B40f"}


def run(hu: object, pixel_mm: tuple[float, float], slice_mm: float | None) -> float:
    started = time.perf_counter()
    seg = lung_segmentation.segment(hu, pixel_mm, slice_mm)
    quantitative.quantify(hu, seg, slice_mm)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "load_average_1min": os.getloadavg()[0], "series": {}}
    for name, rel in SERIES.items():
        started = time.perf_counter()
        volume, _ = load_volume(LabelledSeries(name, args.data / rel, True))
        decode_s = time.perf_counter() - started
        n = len(volume.keys)
        run(volume.hu, volume.pixel_mm, volume.slice_mm)  # warm: imports, page faults
        best = min(run(volume.hu, volume.pixel_mm, volume.slice_mm) for _ in range(args.repeat))
        tracemalloc.start()
        run(volume.hu, volume.pixel_mm, volume.slice_mm)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["series"][name] = {
            "slices": n, "shape": list(volume.hu.shape),
            "segment_and_quantify_s": round(best, 3),
            "slices_per_s": round(n / best, 1),
            "decode_s_per_slice": round(decode_s / n, 4),
            "volume_mib": round(volume.hu.nbytes / 2**20, 1),
            "peak_extra_mib": round(peak / 2**20, 1),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
