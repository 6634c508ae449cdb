"""The shipped slice CNN at run time: lung crops in, NiCT / pCT / nCT probabilities out.

Runs ``engines/models/slice.onnx`` through :mod:`engines.backends` (ONNX Runtime on CPU by
default, TensorRT where usable) in micro-batches; torch is never imported. The metadata JSON
beside the ONNX file names the version, the classes and the thresholds the pipeline uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines.backends import create_backend
from engines.inference import BackendName, InferenceBackend, file_sha256
from schemas.errors import EngineError

log = logging.getLogger(__name__)

MODELS_DIR: Final = Path(__file__).resolve().parent / "models"
CROP_SIZE: Final = 200
U8_SCALE: Final = 255.0
DEFAULT_BATCH: Final = 16
NICT: Final = 0
PCT: Final = 1
NCT: Final = 2


def load_metadata(onnx_path: Path) -> dict[str, Any]:
    """The JSON written beside an exported model; checks the checksum matches the file."""
    meta_path = onnx_path.with_suffix(".json")
    if not onnx_path.is_file() or not meta_path.is_file():
        raise EngineError(f"model {onnx_path} or its metadata {meta_path.name} is missing")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"model metadata {meta_path} is unreadable: {exc}") from exc
    digest = file_sha256(onnx_path)
    if meta.get("sha256") not in (None, digest):
        raise EngineError(f"model {onnx_path.name} does not match its metadata checksum")
    meta["sha256"] = digest
    return meta


class SliceModel:
    """Scores lung crops (uint8 (N, 200, 200)) with the slice CNN."""

    def __init__(self, backend: InferenceBackend, meta: dict[str, Any],
                 batch_size: int = DEFAULT_BATCH) -> None:
        self.backend = backend
        self.meta = meta
        self.batch_size = batch_size
        self.classes: tuple[str, ...] = tuple(meta.get("classes", ("NiCT", "pCT", "nCT")))
        self.version: str = str(meta.get("version", "unknown"))
        self.nict_max: float = float(meta.get("thresholds", {}).get("nict_max", 0.5))

    @classmethod
    def load(cls, onnx_path: Path | None = None, backend: BackendName = "auto",
             batch_size: int = DEFAULT_BATCH) -> SliceModel:
        """Load the shipped model (or ``onnx_path``) on the chosen backend."""
        path = onnx_path or MODELS_DIR / "slice.onnx"
        meta = load_metadata(path)
        return cls(create_backend(path, backend), meta, batch_size)

    def score(self, crops: np.ndarray) -> np.ndarray:
        """Probabilities (N, 3) over (NiCT, pCT, nCT) for uint8 crops (N, 200, 200)."""
        crops = np.asarray(crops)
        if crops.ndim != 3 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE):
            raise EngineError(f"slice crops must be (N, {CROP_SIZE}, {CROP_SIZE}), "
                              f"got {crops.shape}")
        outs = []
        for start in range(0, crops.shape[0], self.batch_size):
            x = crops[start:start + self.batch_size, None].astype(np.float32) / U8_SCALE
            outs.append(np.asarray(self.backend.run1(x), dtype=np.float32))
        if not outs:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate(outs)

    def close(self) -> None:
        self.backend.close()
