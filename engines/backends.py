"""Inference backends behind one small interface, chosen by a factory.

A backend runs one ONNX model: ``run(inputs) -> outputs`` on NumPy arrays, with a dynamic
batch dimension. The interface (:class:`InferenceBackend`, :class:`TensorSpec`) lives in
``engines.inference``, which every backend imports; this module holds the ONNX Runtime backend
(CPU, the default, always available) and the factory :func:`create_backend`. The TensorRT
backend (``engines.tensorrt_backend``) implements the same interface on NVIDIA GPUs and is
imported lazily, by the factory only, so that nothing GPU-related is loaded on a CPU box and
no backend imports this module (no import circle).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from engines.inference import BackendName, InferenceBackend, TensorSpec
from schemas.errors import BackendUnavailable, EngineError

__all__ = ["BackendName", "InferenceBackend", "OnnxRuntimeBackend", "create_backend",
           "tensorrt_usable"]
"""The interface's names stay importable from here: the models import them with the factory."""

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


class OnnxRuntimeBackend(InferenceBackend):
    """ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
            raise EngineError(f"cannot load model {model_path}: {exc}") from exc
        self.model_path = Path(model_path)

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        dtype = _ORT_DTYPES.get(arg.type, str(arg.type))
        return TensorSpec(str(arg.name), shape, dtype)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self._spec(a) for a in self._session.get_inputs()]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self._spec(a) for a in self._session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._session.get_outputs()]
        try:
            values = self._session.run(names, inputs)
        except Exception as exc:
            raise EngineError(f"inference failed for {self.model_path.name}: {exc}") from exc
        return dict(zip(names, values, strict=True))


def tensorrt_usable() -> tuple[bool, str]:
    """Whether the TensorRT backend can run here, and why not. Never touches the GPU in this
    process when the ``gpu`` extra is absent."""
    try:
        from engines import tensorrt_backend
    except ImportError as exc:
        return False, f"TensorRT backend not importable: {exc}"
    return tensorrt_backend.probe()


def create_backend(model_path: Path, backend: BackendName = "auto", *,
                   cache_dir: Path | None = None) -> InferenceBackend:
    """The backend for ``model_path``. ``auto`` takes TensorRT when usable, else ONNX Runtime;
    a TensorRT failure falls back to ONNX Runtime with a warning (never a crash loop)."""
    if backend in ("auto", "tensorrt"):
        ok, why = tensorrt_usable()
        if ok:
            try:
                from engines.tensorrt_backend import TensorRTBackend

                trt_backend = TensorRTBackend(model_path, cache_dir=cache_dir)
                log.info("model %s runs on TensorRT", model_path.name)
                return trt_backend
            except BackendUnavailable as exc:
                log.warning("TensorRT backend failed for %s, falling back to ONNX Runtime: %s",
                            model_path.name, exc)
        elif backend == "tensorrt":
            log.warning("TensorRT requested but not usable (%s); using ONNX Runtime", why)
    log.info("model %s runs on ONNX Runtime (CPU)", model_path.name)
    return OnnxRuntimeBackend(model_path)
