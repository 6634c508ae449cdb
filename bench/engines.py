"""Speed of the HUST-19 CNNs through an inference backend, printed as JSON.

- slice CNN: slices/s and achieved GFLOP/s at batch 1, 16 and 64 (random crops; the cost does
  not depend on the pixels);
- patient CNN: latency of one 10x200x200 stack;
- lung extraction (OpenCV path) of the series' 512x512 slices on one thread: the per-core rate
  (``bench/lung.py`` adds the multi-thread, process-per-core and array-module figures);
- a whole real series (default normal001, 154 slices): time from decoded 8-bit pixels to the CT
  result (lung extraction + slice CNN in micro-batches of 16 + top-10 + patient CNN), i.e.
  :class:`engines.triage.SeriesScorer` as the worker runs it. DICOM decoding is timed apart.

    .venv/bin/python bench/engines.py --backend onnxruntime [--repeats 3] [--series normal001]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines import lung  # noqa: E402
from engines.patient_model import PatientModel  # noqa: E402
from engines.slice_model import SliceModel  # noqa: E402
from engines.triage import SeriesScorer, SliceInput  # noqa: E402

SLICE_GFLOP = 3.584004288  # engines.networks.flops_per_sample(1) / 1e9 (torch-free here)
PATIENT_GFLOP = 3.998724288  # engines.networks.flops_per_sample(10) / 1e9
BATCHES = (1, 16, 64)


def _best(fn: Any, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_slice(model: SliceModel, repeats: int) -> dict[str, Any]:
    out = {}
    rng = np.random.default_rng(0)
    for b in BATCHES:
        x = rng.random((b, 1, 200, 200), dtype=np.float32)
        t = _best(lambda x=x: model.backend.run1(x), repeats)
        out[f"batch_{b}"] = {"seconds": round(t, 4), "slices_per_s": round(b / t, 2),
                             "gflop_per_s": round(b * SLICE_GFLOP / t, 2)}
    return out


def bench_series(slice_model: SliceModel, patient_model: PatientModel, folder: Path,
                 repeats: int) -> dict[str, Any]:
    import pydicom

    from engines import preprocess, series

    t0 = time.perf_counter()
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    order = series.order_slices(datasets)
    images = [preprocess.dataset_to_u8(ds) for ds in datasets]
    decode_s = time.perf_counter() - t0
    rank = np.empty(len(datasets))
    rank[list(order.indices)] = np.arange(len(datasets))
    items = [SliceInput(f"s{i}", float(rank[i]), img) for i, img in enumerate(images)]
    result: dict[str, Any] = {}

    def run() -> None:
        scorer = SeriesScorer(slice_model, patient_model, folder.name)
        for start in range(0, len(items), 16):
            scorer.add_slices(items[start:start + 16])
        result["ct"] = scorer.finish()

    t = _best(run, repeats)
    ct = result["ct"]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    lung_s = _best(lambda: lung.extract_batch(images), repeats)
    cv2.setNumThreads(threads)
    return {"series": folder.name, "slices": len(items),
            "lung_extraction_1_thread_slices_per_s": round(len(images) / lung_s, 1),
            "decode_and_window_s": round(decode_s, 3),
            "pixels_to_result_s": round(t, 3), "slices_per_s": round(len(items) / t, 2),
            "ct_scores": None if ct.proba is None else [round(float(v), 4) for v in ct.proba]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"],
                        default="onnxruntime")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--series", default="normal001")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    slice_model = SliceModel.load(backend=args.backend)
    patient_model = PatientModel.load(backend=args.backend)
    stack = np.random.default_rng(1).integers(0, 256, (10, 200, 200), dtype=np.uint8)
    patient_s = _best(lambda: patient_model.score(stack), args.repeats)
    report = {
        "backend": slice_model.backend.name,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                    platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "slice_cnn": bench_slice(slice_model, args.repeats),
        "patient_cnn": {"latency_s": round(patient_s, 4),
                        "gflop_per_s": round(PATIENT_GFLOP / patient_s, 2)},
        "whole_series": bench_series(slice_model, patient_model,
                                     args.data / "chest-ct-series" / args.series,
                                     args.repeats),
        "repeats": args.repeats, "timing": "best of repeats after one warm-up run",
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
