"""Lung extraction on the GPU with CuPy, feeding the TensorRT slice engine without a host trip.

A thin driver: the algorithm itself is :mod:`engines.lung_xp` (the HUST-19 extraction written
once against an array module: NumPy + SciPy on the CPU, CuPy + ``cupyx.scipy.ndimage`` on the
GPU), so CPU and GPU masks come from the same code. This module

1. uploads a whole windowed series (N, H, W) uint8 to the device once,
2. runs ``lung_xp.extract_batch_xp(images, xp=cupy)`` on it,
3. turns the crops into the slice network's input, float32 (N, 1, 200, 200) in [0, 1], still
   on the device, and
4. hands that to :meth:`engines.tensorrt_backend.TensorRTBackend.run_device` by pointer.

CuPy is imported lazily (inside the functions): importing this module on a CPU box loads
nothing GPU-related. Everything runs on CuPy's current stream; :func:`score_series_gpu`
synchronises it before the engine reads, so the TensorRT stream never races the extraction.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from schemas.errors import BackendUnavailable, EngineError

log = logging.getLogger(__name__)

U8_SCALE: Final = 255.0
CROP_SIZE: Final = 200


@dataclass(frozen=True)
class GpuLungBatch:
    """Lung extraction of a series on the device.

    ``crops`` is a CuPy uint8 array (N, 200, 200) (the network's input before scaling);
    ``areas`` / ``area_fractions`` are host arrays (N,) for the NiCT rule; ``raw`` is what
    :func:`engines.lung_xp.extract_batch_xp` returned (masks included), for parity checks."""

    crops: Any
    areas: np.ndarray
    area_fractions: np.ndarray
    raw: Any


def cupy_available() -> tuple[bool, str]:
    """Whether CuPy is installed (the GPU itself is :mod:`engines.gpu_probe`'s question)."""
    if importlib.util.find_spec("cupy") is None:
        return False, "cupy not installed: install the 'gpu' extra (cupy-cuda12x)"
    return True, "cupy installed"


def _cupy() -> Any:
    try:
        import cupy
    except Exception as exc:  # ImportError, or CUDA errors raised while CuPy loads
        raise BackendUnavailable(f"CuPy unavailable: {exc}") from exc
    return cupy


def extract_series_gpu(images_u8: Any) -> GpuLungBatch:
    """Lung extraction of a windowed series, (N, H, W) uint8 host or CuPy array, on the GPU.

    The upload (if the series is on the host) happens once, for the whole series."""
    cp = _cupy()
    from engines import lung_xp

    images = cp.asarray(images_u8)
    if images.ndim != 3 or images.dtype != cp.uint8:
        raise EngineError(f"expected an (N, H, W) uint8 series, got {images.dtype} "
                          f"{images.shape}")
    raw = lung_xp.extract_batch_xp(images, xp=cp)
    crops = raw.crops
    if crops.shape != (images.shape[0], CROP_SIZE, CROP_SIZE):
        raise EngineError(f"lung_xp returned crops of shape {crops.shape}")
    areas = np.asarray(cp.asnumpy(cp.asarray(raw.areas)), dtype=np.int64)
    fractions = np.asarray(cp.asnumpy(cp.asarray(raw.area_fractions)), dtype=np.float64)
    return GpuLungBatch(crops=crops, areas=areas, area_fractions=fractions, raw=raw)


def crops_to_input(crops: Any) -> Any:
    """uint8 (N, 200, 200) -> float32 (N, 1, 200, 200) / 255, C-contiguous, on the crops' device
    (the same scaling as :meth:`engines.slice_model.SliceModel.score`)."""
    cp = _cupy()
    x = crops[:, None].astype(cp.float32) / cp.float32(U8_SCALE)
    return cp.ascontiguousarray(x)


def score_series_gpu(images_u8: Any, backend: Any) -> tuple[np.ndarray, GpuLungBatch]:
    """Extract the lungs of a series and score every slice with ``backend`` (a
    :class:`~engines.tensorrt_backend.TensorRTBackend`), crops staying on the device.

    Returns the (N, 3) probabilities (host) and the extraction."""
    cp = _cupy()
    batch = extract_series_gpu(images_u8)
    x = crops_to_input(batch.crops)
    cp.cuda.get_current_stream().synchronize()  # extraction done before TensorRT reads x
    name = backend.inputs[0].name
    out = backend.run_device({name: x})
    return out[backend.outputs[0].name], batch


def array_module(on_gpu: bool) -> Any:
    """The array module the quantitative CT runs on (:mod:`engines.ct_analysis`): CuPy when
    the models run on the GPU and CuPy imports, else NumPy (said in the log)."""
    if not on_gpu:
        return np
    ok, why = cupy_available()
    if not ok:
        log.warning("quantitative CT on the CPU: %s", why)
        return np
    try:
        return _cupy()
    except BackendUnavailable as exc:
        log.warning("quantitative CT on the CPU: %s", exc.message)
        return np
