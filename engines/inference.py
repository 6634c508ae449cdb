"""The interface every inference backend implements, and what the backends share.

A backend runs one ONNX model: ``run(inputs) -> outputs`` on NumPy arrays, with a dynamic
batch dimension. The implementations (``engines.backends.OnnxRuntimeBackend``,
``engines.tensorrt_backend.TensorRTBackend``) import this module; the factory
``engines.backends.create_backend`` chooses between them. Nothing here imports a backend.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

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
