"""Inference backends behind one small interface, chosen by a factory.

A backend runs one ONNX model: ``run(inputs) -> outputs`` on NumPy arrays, with a dynamic
batch dimension. ONNX Runtime on CPU is the default and always available; the TensorRT backend
(``engines.tensorrt_backend``) implements the same interface on NVIDIA GPUs and is imported
lazily so that nothing GPU-related is loaded on a CPU box.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from schemas.errors import BackendUnavailable, EngineError

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}

BackendName = Literal["auto", "onnxruntime", "tensorrt"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``-1`` for dynamic) and NumPy dtype of a model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class InferenceBackend(ABC):
    """One loaded model. Thread-compatible, not thread-safe: one instance per worker."""

    name: str = "abstract"

    @property
    @abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def outputs(self) -> list[TensorSpec]: ...

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch; raises :class:`EngineError` on failure."""

    def run1(self, x: np.ndarray) -> np.ndarray:
        """Convenience for single-input, single-output models."""
        return self.run({self.inputs[0].name: x})[self.outputs[0].name]

    def close(self) -> None:
        """Release resources (device memory, sessions)."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (model checksums, engine cache keys)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
