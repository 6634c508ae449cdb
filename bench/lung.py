"""Lung-extraction throughput on a real series: OpenCV path vs the NumPy array-module path.

Usage: ``.venv/bin/python bench/lung.py [--series DIR] [--repeat N]``; prints JSON. Decoding and
windowing are done once before timing; the timings cover lung extraction only (crop, mask,
200x200 resize) of the whole series, single process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom

# The repository first: run as `python bench/lung.py`, this folder's engines.py (the network
# benchmark) would otherwise shadow the engines package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.lung import extract_batch
from engines.lung_xp import extract_batch_xp
from engines.preprocess import dataset_to_u8
from engines.series import order_slices

DEFAULT_SERIES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct-series" / "P002"
)


def _best_rate(run: object, count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--series", type=Path, default=DEFAULT_SERIES)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    files = sorted(args.series.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    order = order_slices(datasets).indices
    images = np.stack([dataset_to_u8(datasets[k]) for k in order])
    count = len(images)
    opencv = _best_rate(lambda: extract_batch(images), count, args.repeat)
    numpy_xp = _best_rate(lambda: extract_batch_xp(images), count, args.repeat)
    print(
        json.dumps(
            {
                "series": args.series.name,
                "slices": count,
                "shape": list(images.shape[1:]),
                "opencv_slices_per_s": round(opencv, 1),
                "numpy_xp_batch_slices_per_s": round(numpy_xp, 1),
                "repeat_best_of": args.repeat,
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "opencv_threads": cv2.getNumThreads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
