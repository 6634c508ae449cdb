"""Lung-extraction throughput on a real series: OpenCV path vs the NumPy array-module path.

Usage: ``.venv/bin/python bench/lung.py [--series DIR] [--repeat N]``; prints JSON. Decoding and
windowing are done once before timing; the timings cover lung extraction only (crop, mask,
200x200 resize) of the whole series. Three OpenCV figures: one process with OpenCV on one thread
(the per-core rate), one process with OpenCV's default threads, and one forked process per core
each taking a share of the slices (how the rate scales over the cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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


_IMAGES: np.ndarray | None = None  # set before forking the pool: the children inherit it


def _extract_share(bounds: tuple[int, int]) -> int:
    cv2.setNumThreads(1)
    assert _IMAGES is not None
    return len(extract_batch(_IMAGES[bounds[0] : bounds[1]]))


def _pool_rate(images: np.ndarray, processes: int, repeat: int) -> float:
    global _IMAGES
    _IMAGES = images
    step = -(-len(images) // processes)
    shares = [(k, min(k + step, len(images))) for k in range(0, len(images), step)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_extract_share, shares)  # warm: workers started and imports done
        return _best_rate(lambda: pool.map(_extract_share, shares), len(images), repeat)


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
    cores = os.cpu_count() or 1
    # the pool first: forking after OpenCV has started its worker threads can deadlock a child
    pool = _pool_rate(images, cores, args.repeat)
    default_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    one_thread = _best_rate(lambda: extract_batch(images), count, args.repeat)
    cv2.setNumThreads(default_threads)
    opencv = _best_rate(lambda: extract_batch(images), count, args.repeat)
    numpy_xp = _best_rate(lambda: extract_batch_xp(images), count, args.repeat)
    print(
        json.dumps(
            {
                "series": args.series.name,
                "slices": count,
                "shape": list(images.shape[1:]),
                "opencv_1_thread_slices_per_s": round(one_thread, 1),
                "opencv_slices_per_s": round(opencv, 1),
                "opencv_process_per_core_slices_per_s": round(pool, 1),
                "numpy_xp_batch_slices_per_s": round(numpy_xp, 1),
                "repeat_best_of": args.repeat,
                "cpu_count": cores,
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "opencv_threads": default_threads,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
