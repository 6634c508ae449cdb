"""Slice evidence: how likely each slice of a series shows pneumonia, from the quantitative CT.

A scorer with two fitted numbers over one feature, so that three labelled series can fit it
without learning them by heart (a six-feature regression overfitted: the issue's probe):

- **feature**: the opacity area of the slice (``core``: the opacity cores of
  :mod:`engines.quantitative`, or ``opacity``: the whole opacities) divided by the slice's lung
  area, where that area is floored at ``area_floor`` times the series' largest lung section.
  The floor normalises by the patient's own lung size (lungs differ by 50 % between patients)
  and stops the small sections at the apex and the bases, where a few partial-volume pixels
  are a large share, from scoring high;
- optionally averaged over ``smoothing`` neighbouring slices (opacities span several slices);
- **score**: ``sigmoid(intercept + coef * log(feature + epsilon))``, fitted by logistic
  regression on labelled slices (``hust19 train evidence``); a slice is evidence when its
  score is at least ``threshold``.

The shipped numbers and what they were fitted and evaluated on are in
``engines/models/evidence.json`` and ``docs/models/evidence.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines import MODELS_DIR
from engines.quantitative import Quantification
from schemas.errors import EngineError

__all__ = ["DEFAULT_JSON", "TOP_K", "EvidenceModel", "FeatureSpec", "features", "top_slices"]

DEFAULT_JSON: Final = MODELS_DIR / "evidence.json"
TOP_K: Final = 10
"""Evidence slices per series in the SR and the result, as the paper's top-10 selection."""
FEATURE_KINDS: Final = ("core", "opacity")


@dataclass(frozen=True)
class FeatureSpec:
    """How the per-slice feature is computed (see the module docstring)."""

    kind: str = "core"
    area_floor: float = 0.5
    smoothing: int = 3
    epsilon: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise EngineError(f"evidence feature kind {self.kind!r} is not one of "
                              f"{', '.join(FEATURE_KINDS)}")
        if not 0.0 <= self.area_floor <= 1.0 or self.smoothing < 1 or self.epsilon <= 0:
            raise EngineError(f"evidence feature settings out of range: {self}")


def features(lung_px: np.ndarray, opacity_px: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """The per-slice feature ``log(normalised opacity share + epsilon)``, shape (n,)."""
    lung = np.asarray(lung_px, np.float64)
    opacity = np.asarray(opacity_px, np.float64)
    if lung.size == 0:
        return np.zeros(0)
    share = opacity / np.maximum(np.maximum(lung, spec.area_floor * lung.max()), 1.0)
    if spec.smoothing > 1:
        share = np.convolve(share, np.ones(spec.smoothing) / spec.smoothing, mode="same")
    return np.asarray(np.log(share + spec.epsilon))


def quantification_features(quant: Quantification, spec: FeatureSpec) -> np.ndarray:
    """:func:`features` of a series' quantification."""
    source = quant.core_px if spec.kind == "core" else quant.opacity_px
    return features(quant.lung_px, source, spec)


def top_slices(scores: np.ndarray, lung_px: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of the ``k`` slices with lung and the highest score (ties: the more cranial),
    returned in slice order."""
    candidates = np.flatnonzero(np.asarray(lung_px) > 0)
    if candidates.size == 0:
        return candidates
    order = candidates[np.lexsort((candidates, -np.asarray(scores)[candidates]))]
    return np.sort(order[:k])


class EvidenceModel:
    """The slice evidence scorer, from its JSON document."""

    def __init__(self, doc: Mapping[str, Any], source: str = "<memory>") -> None:
        try:
            f = doc["feature"]
            self.spec = FeatureSpec(str(f["kind"]), float(f["area_floor"]),
                                    int(f["smoothing"]), float(f["epsilon"]))
            self.coef = float(doc["coef"])
            self.intercept = float(doc["intercept"])
            self.threshold = float(doc["threshold"])
            self.version = str(doc["version"])
            self.method = str(doc["method"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{source}: not an evidence model document ({exc!r})") from exc
        self.doc = dict(doc)

    @classmethod
    def load(cls, path: Path = DEFAULT_JSON) -> EvidenceModel:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot read evidence model {path}: {exc}") from exc
        return cls(doc, str(path))

    def score_features(self, x: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] for feature values ``x``."""
        z = self.intercept + self.coef * np.asarray(x, np.float64)
        return np.asarray(1.0 / (1.0 + np.exp(-z)))

    def score(self, quant: Quantification) -> np.ndarray:
        """Per-slice evidence scores of a series (0 where the slice has no lung)."""
        scores = self.score_features(quantification_features(quant, self.spec))
        return np.where(quant.lung_px > 0, scores, 0.0)
