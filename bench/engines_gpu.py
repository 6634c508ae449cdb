"""GPU benchmark of the TensorRT slice engine (and CuPy lung extraction), printed as JSON.

The ``--backend tensorrt`` side of the engine benchmark contract: slices/s at batch 1, 16 and
64 (host arrays in and out, copies included; and from CuPy device arrays when CuPy is
installed), the engine build time (a fresh cache unless ``--cache-dir`` points at a warm one),
GPU memory taken by the loaded engine, and with ``--series`` the CuPy lung extraction rate and
the time of a whole series through the GPU slice path (extraction + slice network).

Without a usable GPU it prints ``{"error": ..., "probe": ...}`` and exits with status 2.

    .venv/bin/python bench/engines_gpu.py [--precision fp16] [--seconds 3]
        [--series ../shared/data/chest-ct-series/P002] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from engines import MODELS_DIR  # noqa: E402
from engines.gpu_probe import gpu_status  # noqa: E402
from engines.tensorrt_backend import probe  # noqa: E402
from schemas.errors import Hust19Error  # noqa: E402

EXIT_NO_GPU = 2
EXIT_FAILED = 1
WARMUP_RUNS = 5
BATCHES = (1, 16, 64)
U8_SCALE = 255.0


def _rate(fn: Any, batch: int, seconds: float) -> dict[str, float]:
    """Call ``fn`` repeatedly for about ``seconds``; slices/s and mean latency."""
    for _ in range(WARMUP_RUNS):
        fn()
    runs = 0
    started = time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    return {"slices_per_s": round(batch * runs / elapsed, 1),
            "latency_ms": round(1000 * elapsed / runs, 3), "runs": runs}


def _series_u8(folder: Path) -> np.ndarray:
    import pydicom

    from engines.preprocess import dataset_to_u8

    return np.stack([dataset_to_u8(pydicom.dcmread(p)) for p in sorted(folder.glob("*.dcm"))])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import pycuda.autoprimaryctx  # noqa: F401  (after probe(): primary context on this thread)
    import pycuda.driver as cuda

    from engines.tensorrt_backend import TensorRTBackend

    out: dict[str, Any] = {"backend": "tensorrt", "precision": args.precision,
                           "model": args.model.name, "gpu": gpu_status().as_dict()}
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="hust19-bench-engines-"))
    free_before, total = cuda.mem_get_info()
    backend = TensorRTBackend(args.model, cache_dir=cache_dir, precision=args.precision,
                              max_batch=max(BATCHES))
    free_after, _ = cuda.mem_get_info()
    out.update({"tensorrt": backend.key.trt_version, "build_seconds": backend.build_seconds,
                "loaded_from_cache": backend.build_seconds is None,
                "engine": str(backend.cache.engine_path(backend.key)),
                "gpu_memory": {"total_bytes": total,
                               "used_by_backend_bytes": free_before - free_after}})
    spec = backend.inputs[0]
    rng = np.random.default_rng(0)
    host: dict[str, Any] = {}
    for batch in BATCHES:
        x = rng.random((batch, *spec.shape[1:]), dtype=np.float32)
        host[str(batch)] = _rate(lambda x=x: backend.run({spec.name: x}), batch, args.seconds)
    out["host_arrays"] = host
    try:
        import cupy as cp
    except ImportError:
        out["device_arrays"] = "cupy not installed"
    else:
        device: dict[str, Any] = {}
        for batch in BATCHES:
            xd = cp.asarray(rng.random((batch, *spec.shape[1:]), dtype=np.float32))
            device[str(batch)] = _rate(lambda xd=xd: backend.run_device({spec.name: xd}), batch,
                                       args.seconds)
        out["device_arrays"] = device
        if args.series is not None:
            out["series"] = _series_bench(args.series, backend, cp)
    backend.close()
    return out


def _series_bench(folder: Path, backend: Any, cp: Any) -> dict[str, Any]:
    from engines.lung_gpu import extract_series_gpu, score_series_gpu

    images = _series_u8(folder)
    n = images.shape[0]
    extract_series_gpu(images)  # warm-up: CuPy kernels compile on first use
    cp.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    extract_series_gpu(images)
    cp.cuda.get_current_stream().synchronize()
    lung_s = time.perf_counter() - t0
    score_series_gpu(images, backend)
    t0 = time.perf_counter()
    score_series_gpu(images, backend)
    whole_s = time.perf_counter() - t0
    return {"series": folder.name, "slices": n, "lung_gpu_slices_per_s": round(n / lung_s, 1),
            "slice_path_seconds": round(whole_s, 4),
            "note": "slice path = host uint8 series -> CuPy lung extraction -> TensorRT slice "
                    "network; patient CNN, CF DNN and fusion are not included"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["tensorrt"], default="tensorrt")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    parser.add_argument("--model", type=Path, default=MODELS_DIR / "slice.onnx")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per batch size")
    parser.add_argument("--cache-dir", type=Path, help="engine cache (default: a fresh one, so "
                        "the build time is measured)")
    parser.add_argument("--series", type=Path, help="a DICOM series folder for the lung and "
                        "whole-series timings")
    args = parser.parse_args(argv)
    ok, why = probe()
    if not ok:
        print(json.dumps({"error": f"no TensorRT GPU backend here: {why}",
                          "backend": args.backend, "probe": gpu_status().as_dict()}))
        return EXIT_NO_GPU
    if not args.model.is_file():
        print(json.dumps({"error": f"model not found: {args.model}"}))
        return EXIT_FAILED
    try:
        result = run(args)
    except Hust19Error as exc:
        print(json.dumps({"error": exc.message, "backend": args.backend}))
        return EXIT_FAILED
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
