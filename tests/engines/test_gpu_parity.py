"""GPU-only checks of the TensorRT backend and the CuPy lung extraction (skipped elsewhere).

Each test says in its skip reason what it would check. They need an NVIDIA GPU with the
``gpu`` extra (tensorrt + pycuda, and cupy for the lung tests); none of them has been run in
the session that wrote them (no GPU was lent), see the README, "GPU path".

- engine cache round trip: build -> cached -> loaded without a build -> a corrupted engine is
  rebuilt, not trusted;
- dynamic batch: batch sizes 1..max and above max (chunked) agree with ONNX Runtime;
- device input: CuPy arrays run by pointer give the same answer as host arrays;
- parity on real data: slice-network probabilities on real lung crops from
  ``../shared/data/chest-ct-series`` within 0.01 of ONNX Runtime (FP32 and FP16 engines);
- CuPy lung masks: IoU >= 0.99 per lung slice against the CPU (NumPy) path, and the whole
  GPU series path (extraction + TensorRT) within 0.01 of the CPU pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from engines import MODELS_DIR
from engines.backends import OnnxRuntimeBackend
from engines.lung import NICT_AREA_FRACTION
from engines.lung_gpu import cupy_available
from engines.preprocess import dataset_to_u8
from engines.tensorrt_backend import probe
from tests.engines.test_fp16 import tiny_model

GPU_OK, GPU_WHY = probe()
CUPY_OK, CUPY_WHY = cupy_available()
PROB_TOL = 0.01
IOU_MIN = 0.99
SERIES = ("P002", "normal001")

pytestmark = pytest.mark.gpu


def needs_gpu(what: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not GPU_OK, reason=f"needs an NVIDIA GPU with TensorRT + pycuda ({GPU_WHY}): would "
                           f"check {what}")


def needs_gpu_and_cupy(what: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not (GPU_OK and CUPY_OK),
        reason=f"needs an NVIDIA GPU with TensorRT + pycuda + CuPy ({GPU_WHY}; {CUPY_WHY}): "
               f"would check {what}")


def _series_u8(folder: Path) -> np.ndarray:
    """A real series as windowed uint8 slices (N, H, W) (order irrelevant for parity)."""
    slices = [dataset_to_u8(pydicom.dcmread(p)) for p in sorted(folder.glob("*.dcm"))]
    return np.stack(slices)


def _slice_model() -> Path:
    path = MODELS_DIR / "slice.onnx"
    if not path.is_file():
        pytest.fail(f"shipped slice model missing: {path}")
    return path


@pytest.fixture(scope="module")
def real_series(chest_series: Path) -> dict[str, np.ndarray]:
    return {name: _series_u8(chest_series / name) for name in SERIES}


def _backend(model: Path, cache: Path, **kw: Any) -> Any:
    from engines.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(model, cache_dir=cache, **kw)


@needs_gpu("that an engine is built once, cached, reloaded without a build, and rebuilt "
           "when the cached file is corrupted")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_cache_round_trip(tmp_path: Path, precision: str,
                                 caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(tmp_path / "tiny.onnx", side=32)
    cache = tmp_path / "engines"
    x = np.random.default_rng(0).random((9, 1, 32, 32), dtype=np.float32)
    ref = OnnxRuntimeBackend(model).run1(x)
    first = _backend(model, cache, precision=precision, max_batch=16)
    assert first.build_seconds is not None and first.build_seconds > 0
    engine = first.cache.engine_path(first.key)
    assert engine.is_file() and first.cache.entries()[0].problem is None
    p1 = first.run1(x)
    first.close()
    np.testing.assert_allclose(p1, ref, atol=1e-3 if precision == "fp32" else PROB_TOL)
    second = _backend(model, cache, precision=precision, max_batch=16)
    assert second.build_seconds is None  # loaded, not built
    np.testing.assert_array_equal(second.run1(x), p1)
    second.close()
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="engines.engine_cache"):
        third = _backend(model, cache, precision=precision, max_batch=16)
    assert "corrupt" in caplog.text and third.build_seconds is not None
    np.testing.assert_allclose(third.run1(x), p1, atol=1e-6)
    third.close()


@needs_gpu("batch sizes 1, 7, 16, 64 and 130 (chunked above max_batch=64) against ONNX Runtime")
def test_dynamic_batch_and_chunking(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "tiny.onnx", side=32)
    ort_backend = OnnxRuntimeBackend(model)
    trt = _backend(model, tmp_path / "engines", precision="fp32", max_batch=64)
    rng = np.random.default_rng(1)
    for n in (1, 7, 16, 64, 130):
        x = rng.random((n, 1, 32, 32), dtype=np.float32)
        got = trt.run1(x)
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, ort_backend.run1(x), atol=1e-3)
    assert trt.run1(np.zeros((0, 1, 32, 32), np.float32)).shape == (0, 3)
    trt.close()


@needs_gpu_and_cupy("that CuPy inputs run by device pointer (run_device) give the host result")
def test_run_device_matches_host(tmp_path: Path) -> None:
    import cupy as cp

    model = tiny_model(tmp_path / "tiny.onnx", side=32)
    trt = _backend(model, tmp_path / "engines", precision="fp32", max_batch=64)
    x = np.random.default_rng(2).random((100, 1, 32, 32), dtype=np.float32)
    host = trt.run1(x)
    device = trt.run_device({"image": cp.asarray(x)})["proba"]
    np.testing.assert_array_equal(device, host)
    trt.close()


@pytest.mark.slow
@needs_gpu("slice-network probabilities of the TensorRT FP32 and FP16 engines on real lung "
           "crops (P002, normal001) within 0.01 of ONNX Runtime")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_slice_network_parity_on_real_crops(tmp_path: Path, precision: str,
                                            real_series: dict[str, np.ndarray]) -> None:
    from engines.lung_xp import extract_batch_xp

    model = _slice_model()
    ort_backend = OnnxRuntimeBackend(model)
    trt = _backend(model, tmp_path / "engines", precision=precision)
    for name, images in real_series.items():
        crops = np.asarray(extract_batch_xp(images).crops)
        x = crops[:, None].astype(np.float32) / 255.0
        diff = float(np.max(np.abs(trt.run1(x) - ort_backend.run1(x))))
        assert diff <= PROB_TOL, f"{name} {precision}: max |p_trt - p_ort| = {diff:.4f}"
    trt.close()


@pytest.mark.slow
@needs_gpu_and_cupy("CuPy lung masks against the CPU path on real series: IoU >= 0.99 per lung "
                    "slice, equal areas within 1%, crops within 1 grey level")
def test_cupy_lung_masks_match_cpu(real_series: dict[str, np.ndarray]) -> None:
    import cupy as cp

    from engines.lung_gpu import extract_series_gpu
    from engines.lung_xp import extract_batch_xp

    for name, images in real_series.items():
        cpu = extract_batch_xp(images)
        gpu = extract_series_gpu(images)
        lung = np.flatnonzero(np.asarray(cpu.area_fractions) >= NICT_AREA_FRACTION)
        assert lung.size > 0, name
        for k in lung:
            a = np.asarray(cpu.masks[k])
            b = cp.asnumpy(gpu.raw.masks[k])
            iou = np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())
            assert iou >= IOU_MIN, f"{name} slice {k}: IoU {iou:.4f}"
        np.testing.assert_allclose(gpu.areas, np.asarray(cpu.areas), rtol=0.01)
        crops = cp.asnumpy(gpu.crops).astype(np.int16)
        assert np.max(np.abs(crops - np.asarray(cpu.crops).astype(np.int16))) <= 1, name


@pytest.mark.slow
@needs_gpu_and_cupy("the whole GPU slice path (CuPy extraction -> TensorRT FP16 by device "
                    "pointer) within 0.01 of the CPU path (NumPy extraction -> ONNX Runtime)")
def test_gpu_series_path_matches_cpu(tmp_path: Path, real_series: dict[str, np.ndarray]) -> None:
    from engines.lung_gpu import score_series_gpu
    from engines.lung_xp import extract_batch_xp

    model = _slice_model()
    ort_backend = OnnxRuntimeBackend(model)
    trt = _backend(model, tmp_path / "engines", precision="fp16")
    for name, images in real_series.items():
        probs, _ = score_series_gpu(images, trt)
        crops = np.asarray(extract_batch_xp(images).crops)
        ref = ort_backend.run1(crops[:, None].astype(np.float32) / 255.0)
        diff = float(np.max(np.abs(probs - ref)))
        assert diff <= PROB_TOL, f"{name}: max |p_gpu - p_cpu| = {diff:.4f}"
    trt.close()


def needs_cupy_gpu(what: str) -> pytest.MarkDecorator:
    """The quantitative CT needs CuPy and a CUDA device, not TensorRT."""
    ok = False
    why = CUPY_WHY
    if CUPY_OK:
        try:
            import cupy

            ok = cupy.cuda.runtime.getDeviceCount() > 0
            why = "CuPy sees a CUDA device" if ok else "CuPy sees no CUDA device"
        except Exception as exc:  # CUDA driver errors of every kind
            why = f"CuPy cannot reach a GPU: {exc}"
    return pytest.mark.skipif(not ok, reason=f"needs CuPy and an NVIDIA GPU ({why}): would "
                                             f"check {what}")


@needs_cupy_gpu("the quantitative CT (lung segmentation, bands, opacities) on CuPy gives "
                "the NumPy path's lung volume, involvement and per-slice counts")
@pytest.mark.parametrize("series", SERIES)
def test_quantitative_ct_on_cupy_equals_numpy(chest_series: Path, series: str) -> None:
    import cupy

    from engines import ct_analysis
    from engines.evidence import EvidenceModel
    from engines.training.series_data import LabelledSeries, load_volume

    volume, _ = load_volume(LabelledSeries(series, chest_series / series, True))
    model = EvidenceModel.load()
    cpu = ct_analysis.analyse(volume, model, xp=np)
    gpu = ct_analysis.analyse(volume, model, xp=cupy)
    np.testing.assert_array_equal(cpu.quant.lung_px, gpu.quant.lung_px)
    np.testing.assert_array_equal(cpu.quant.opacity_px, gpu.quant.opacity_px)
    assert cpu.involvement_percent == pytest.approx(gpu.involvement_percent, abs=1e-9)
    assert cpu.top == gpu.top
