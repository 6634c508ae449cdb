"""PLR fusion of the CT and CF scores, applied with NumPy from JSON coefficients.

The paper fuses the patient CNN's three CT scores and the CF network's three scores with a
penalised (L2) logistic regression (PLR) into three scores (control, type1, type2). Training
(``engines.training.fusion``) fits scikit-learn's ``LogisticRegression`` and stores only its
numbers in ``engines/models/fusion.json``; here they are applied as
``softmax(coef @ x + intercept)``: no scikit-learn object and no pickle at run time.

Modes: ``plr`` when both sides are present (while no CT out-of-fold scores exist to fit it, an
interim document may carry the untrained mean of the two modalities instead, flagged
``interim``); when one is missing the other modality's own scores
are used unchanged (``ct_only`` / ``cf_only``), and the mode says so. Each mode has its own
sensitive threshold: the cut on P(COVID-19) = P(type1) + P(type2) that reached the stated
sensitivity on out-of-fold training scores. Under it the flag is the larger of type1 / type2
when P(COVID-19) >= cut, else control. The general flag is the arg-max.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from engines import MODELS_DIR
from schemas.errors import EngineError, InputError

DEFAULT_JSON: Final = MODELS_DIR / "fusion.json"
CLASSES: Final[tuple[str, str, str]] = ("control", "type1", "type2")
FEATURE_ORDER: Final[tuple[str, ...]] = (
    "ct_control", "ct_type1", "ct_type2", "cf_control", "cf_type1", "cf_type2")

Mode = Literal["plr", "ct_only", "cf_only"]
MODES: Final[tuple[Mode, ...]] = ("plr", "ct_only", "cf_only")
#: Inputs each mode reads, in ``FEATURE_ORDER`` naming.
MODE_INPUTS: Final[Mapping[str, tuple[str, ...]]] = {
    "plr": FEATURE_ORDER, "ct_only": FEATURE_ORDER[:3], "cf_only": FEATURE_ORDER[3:]}
TRANSFORM_PLR: Final = "plr"
TRANSFORM_IDENTITY: Final = "identity"
#: Interim rule while no CT scores exist to fit the PLR: the mean of the two modalities'
#: probabilities (untrained; the document says so in ``modes.plr.interim``).
TRANSFORM_MEAN: Final = "mean"
#: Tolerance on a score vector's sum (scores are probabilities).
SUM_TOLERANCE: Final = 1e-3


@dataclass(frozen=True)
class FusionOutput:
    """Fused (or single-modality) class probabilities and the flags under both thresholds."""

    proba: np.ndarray
    mode: Mode
    flag_general: str
    flag_sensitive: str
    classes: tuple[str, ...] = CLASSES

    @property
    def covid_probability(self) -> float:
        return float(self.proba[1] + self.proba[2])


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(n, k)`` logits."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def sensitive_flags(proba: np.ndarray, cut: float) -> list[str]:
    """Flags under the sensitive threshold for ``(n, 3)`` probabilities."""
    p = np.asarray(proba, dtype=np.float64)
    covid = p[:, 1] + p[:, 2]
    return [(CLASSES[2] if row[2] > row[1] else CLASSES[1]) if c >= cut else CLASSES[0]
            for row, c in zip(p, covid, strict=True)]


def _check_scores(name: str, x: np.ndarray | None) -> np.ndarray | None:
    if x is None:
        return None
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.shape != (len(CLASSES),):
        raise InputError(f"{name} scores must be 3 numbers (control, type1, type2), got "
                         f"shape {np.shape(x)}")
    if not np.all(np.isfinite(a)) or np.any(a < 0) or abs(a.sum() - 1.0) > SUM_TOLERANCE:
        raise InputError(f"{name} scores must be probabilities summing to 1, got {a.tolist()}")
    return a


class FusionModel:
    """The fusion, from its JSON document (see ``docs/models/fusion.md``)."""

    def __init__(self, doc: Mapping[str, Any], source: str = "<memory>") -> None:
        try:
            if tuple(doc["classes"]) != CLASSES or tuple(doc["feature_order"]) != FEATURE_ORDER:
                raise EngineError(f"{source}: classes or feature order differ from "
                                  f"{CLASSES} / {FEATURE_ORDER}")
            self._modes: dict[str, dict[str, Any]] = {}
            for mode in MODES:
                m = doc["modes"][mode]
                entry: dict[str, Any] = {"transform": m["transform"],
                                         "cut": float(m["sensitive"]["covid_probability"])}
                if m["transform"] == TRANSFORM_PLR:
                    coef = np.asarray(m["coef"], dtype=np.float64)
                    intercept = np.asarray(m["intercept"], dtype=np.float64)
                    n_in = len(MODE_INPUTS[mode])
                    if coef.shape != (len(CLASSES), n_in) or intercept.shape != (len(CLASSES),):
                        raise EngineError(f"{source}: mode {mode}: coef {coef.shape} / "
                                          f"intercept {intercept.shape} do not fit")
                    entry.update(coef=coef, intercept=intercept)
                elif m["transform"] == TRANSFORM_MEAN and mode != "plr":
                    raise EngineError(f"{source}: mode {mode}: 'mean' needs both modalities")
                elif m["transform"] not in (TRANSFORM_IDENTITY, TRANSFORM_MEAN):
                    raise EngineError(f"{source}: mode {mode}: unknown transform "
                                      f"{m['transform']!r}")
                self._modes[mode] = entry
            self.version = str(doc["version"])
            self.interim = bool(doc.get("interim", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{source}: not a fusion model document ({exc!r})") from exc
        self.doc = dict(doc)

    @classmethod
    def load(cls, path: Path) -> FusionModel:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot read fusion model {path}: {exc}") from exc
        return cls(doc, str(path))

    @classmethod
    def load_default(cls) -> FusionModel:
        """The shipped ``engines/models/fusion.json``."""
        return cls.load(DEFAULT_JSON)

    def sensitive_cut(self, mode: Mode) -> float:
        """The P(COVID-19) cut of the sensitive threshold in ``mode``."""
        return float(self._modes[mode]["cut"])

    def apply(self, mode: Mode, x: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, 3)`` for inputs ``(n, len(MODE_INPUTS[mode]))``."""
        m = self._modes[mode]
        a = np.asarray(x, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != len(MODE_INPUTS[mode]):
            raise InputError(f"fusion mode {mode} takes (n, {len(MODE_INPUTS[mode])}) inputs, "
                             f"got {a.shape}")
        if m["transform"] == TRANSFORM_IDENTITY:
            return np.asarray(a / a.sum(axis=1, keepdims=True))
        if m["transform"] == TRANSFORM_MEAN:
            k = len(CLASSES)
            return np.asarray((a[:, :k] + a[:, k:]) / 2.0)
        return softmax(a @ m["coef"].T + m["intercept"])

    def combine(self, ct: np.ndarray | None, cf: np.ndarray | None) -> FusionOutput:
        """Fuse one patient's CT and CF scores (each ``(3,)`` or ``None``)."""
        ct_a, cf_a = _check_scores("CT", ct), _check_scores("CF", cf)
        mode: Mode
        if ct_a is not None and cf_a is not None:
            mode, x = "plr", np.concatenate([ct_a, cf_a])
        elif ct_a is not None:
            mode, x = "ct_only", ct_a
        elif cf_a is not None:
            mode, x = "cf_only", cf_a
        else:
            raise InputError("neither CT nor CF scores: nothing to fuse")
        proba = self.apply(mode, x[None, :])[0]
        return FusionOutput(proba=proba, mode=mode,
                            flag_general=CLASSES[int(np.argmax(proba))],
                            flag_sensitive=sensitive_flags(proba[None, :],
                                                           self.sensitive_cut(mode))[0])
