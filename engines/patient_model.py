"""The patient CNN at run time, and the paper's slice selection that feeds it.

Selection (Ning et al. 2020): keep the slices whose NiCT score is <= 0.5, take the 10 with the
highest pCT score, put them back in slice order and stack them as a 10x200x200 input. When fewer
than 10 slices survive, the stack is padded with blank (all-zero) slices at the end, the same
rule the training used. The network then gives control / type1 / type2 probabilities.

``engines/models/patient.json`` says what the outputs mean for the shipped weights (see
``docs/models/patient.md``: type1 vs type2 could not be learned from the public data).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines.backends import create_backend
from engines.inference import BackendName, InferenceBackend
from engines.slice_model import MODELS_DIR, NICT, PCT, U8_SCALE, load_metadata
from schemas.errors import EngineError

log = logging.getLogger(__name__)

TOP_K: Final = 10
NICT_MAX: Final = 0.5
CROP_SIZE: Final = 200
CLASSES: Final = ("control", "type1", "type2")


def select_top(scores: np.ndarray, order_keys: Sequence[float] | np.ndarray | None = None,
               *, k: int = TOP_K, nict_max: float = NICT_MAX) -> np.ndarray:
    """Indices of the selected slices, in slice order.

    ``scores`` is (N, 3) slice-CNN output (NiCT, pCT, nCT); ``order_keys`` sorts the slices
    into slice order (ascending; default: the given order). Slices with NiCT > ``nict_max``
    are dropped; of the rest the ``k`` highest pCT are kept (ties: earlier slice first) and
    returned sorted by ``order_keys``.
    """
    scores = np.asarray(scores)
    n = scores.shape[0]
    keys = np.arange(n, dtype=np.float64) if order_keys is None else np.asarray(order_keys,
                                                                                 np.float64)
    if keys.shape != (n,):
        raise EngineError(f"{keys.size} order keys for {n} slices")
    slice_rank = np.argsort(keys, kind="stable")
    rank_of = np.empty(n, np.int64)
    rank_of[slice_rank] = np.arange(n)
    candidates = np.flatnonzero(scores[:, NICT] <= nict_max)
    if candidates.size == 0:
        return candidates
    by_pct = candidates[np.lexsort((rank_of[candidates], -scores[candidates, PCT]))]
    chosen = by_pct[:k]
    return chosen[np.argsort(rank_of[chosen], kind="stable")]


def stack(crops: Sequence[np.ndarray] | np.ndarray, k: int = TOP_K) -> np.ndarray:
    """uint8 (k, 200, 200): the crops in the given order, zero-padded to ``k``."""
    out = np.zeros((k, CROP_SIZE, CROP_SIZE), np.uint8)
    if len(crops) > k:
        raise EngineError(f"{len(crops)} crops for a {k}-slice stack")
    for i, c in enumerate(crops):
        out[i] = c
    return out


class PatientModel:
    """Scores 10-slice stacks (uint8 (N, 10, 200, 200) or (10, 200, 200)) with the patient CNN."""

    def __init__(self, backend: InferenceBackend, meta: dict[str, Any]) -> None:
        self.backend = backend
        self.meta = meta
        self.classes: tuple[str, ...] = tuple(meta.get("classes", CLASSES))
        self.version: str = str(meta.get("version", "unknown"))

    @classmethod
    def load(cls, onnx_path: Path | None = None,
             backend: BackendName = "auto") -> PatientModel:
        """Load the shipped model (or ``onnx_path``) on the chosen backend."""
        path = onnx_path or MODELS_DIR / "patient.onnx"
        return cls(create_backend(path, backend), load_metadata(path))

    def score(self, stacks: np.ndarray) -> np.ndarray:
        """Probabilities over (control, type1, type2): (3,) for one stack, (N, 3) for N."""
        x = np.asarray(stacks)
        single = x.ndim == 3
        if single:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != (TOP_K, CROP_SIZE, CROP_SIZE):
            raise EngineError(f"patient stacks must be (N, {TOP_K}, {CROP_SIZE}, {CROP_SIZE}), "
                              f"got {np.asarray(stacks).shape}")
        proba = np.asarray(self.backend.run1(x.astype(np.float32) / U8_SCALE), np.float32)
        return proba[0] if single else proba

    def close(self) -> None:
        self.backend.close()
