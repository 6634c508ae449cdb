"""Fusion of the CT and clinical-feature (CF) scores into the triage scores, from JSON.

Two ways to combine a patient's CT scores and CF scores (each: control, type1, type2):

- ``rule`` (the shipped default): **the CF model decides COVID-19, the CT decides severity.**
  ``P(control) = CF's P(control)``; of the rest, the share that is Type II is the CT's
  ``P(type2) / (P(type1) + P(type2))``: its probability of severe involvement (CT-3 or more,
  :mod:`engines.ct_stage`). CT cannot tell COVID-19 from another pneumonia (the CAP series
  cap002 is "pneumonia" on CT), and the iCTCF controls include community-acquired pneumonia,
  so the CT side must not raise P(COVID-19); the lab model, trained on 977 patients, carries
  that, and the CT, which measures how much lung is affected, carries the severity. No number
  is fitted: there is no cohort with both CT and labs here, and coefficients fitted on invented
  pairings would describe the invention.
- ``plr``: the paper's penalised (L2) logistic regression over the six scores,
  ``softmax(coef @ x + intercept)``, fitted by a site on *paired* CT + lab data
  (``hust19 train fusion --paired CSV``); a document with it uses it when both sides exist.

With one side missing, that side's own scores are used unchanged (``ct_only`` / ``cf_only``)
and the mode says so. Each mode has its sensitive threshold, a cut on P(COVID-19) =
P(type1) + P(type2); for ``rule`` and ``cf_only`` it is the CF model's own cut (``"cf"`` in the
document: read from the CF model's metadata), since P(COVID-19) is the CF model's. Under it the
flag is the larger of type1 / type2 when P(COVID-19) >= cut, else control; the general flag is
the arg-max. No scikit-learn object and no pickle at run time.
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
CF_JSON: Final = MODELS_DIR / "cf.json"
CLASSES: Final[tuple[str, str, str]] = ("control", "type1", "type2")
FEATURE_ORDER: Final[tuple[str, ...]] = (
    "ct_control", "ct_type1", "ct_type2", "cf_control", "cf_type1", "cf_type2")

Mode = Literal["rule", "plr", "ct_only", "cf_only"]
MODES: Final[tuple[Mode, ...]] = ("rule", "plr", "ct_only", "cf_only")
BOTH_MODES: Final[tuple[Mode, ...]] = ("rule", "plr")
#: Inputs each mode reads, in ``FEATURE_ORDER`` naming.
MODE_INPUTS: Final[Mapping[str, tuple[str, ...]]] = {
    "rule": FEATURE_ORDER, "plr": FEATURE_ORDER, "ct_only": FEATURE_ORDER[:3],
    "cf_only": FEATURE_ORDER[3:]}
TRANSFORM_RULE: Final = "rule"
TRANSFORM_PLR: Final = "plr"
TRANSFORM_IDENTITY: Final = "identity"
CUT_FROM_CF: Final = "cf"
"""A sensitive cut given as this string is the CF model's own cut (``cf.json``)."""
SUM_TOLERANCE: Final = 1e-3
"""Tolerance on a score vector's sum (scores are probabilities)."""
_TINY: Final = 1e-12


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


def rule(x: np.ndarray) -> np.ndarray:
    """The ``rule`` fusion of ``(n, 6)`` inputs (CT then CF scores): CF decides COVID-19, the CT
    its severity (module docstring)."""
    a = np.asarray(x, dtype=np.float64)
    ct, cf = a[:, :3], a[:, 3:]
    covid = cf[:, 1] + cf[:, 2]
    ct_disease = ct[:, 1] + ct[:, 2]
    severe = np.where(ct_disease > _TINY, ct[:, 2] / np.maximum(ct_disease, _TINY), 0.0)
    return np.stack([1.0 - covid, covid * (1.0 - severe), covid * severe], axis=1)


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


def cf_sensitive_cut(path: Path = CF_JSON) -> float:
    """The CF model's sensitive cut on P(COVID-19), from its metadata."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return float(doc["thresholds"]["sensitive"]["covid_probability"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"cannot read the CF model's sensitive cut from {path}: {exc}") from exc


class FusionModel:
    """The fusion, from its JSON document (see ``docs/models/fusion.md``).

    ``cf_cut`` resolves cuts written as ``"cf"`` (default: read from ``cf.json`` when needed).
    """

    def __init__(self, doc: Mapping[str, Any], source: str = "<memory>",
                 cf_cut: float | None = None) -> None:
        try:
            if tuple(doc["classes"]) != CLASSES or tuple(doc["feature_order"]) != FEATURE_ORDER:
                raise EngineError(f"{source}: classes or feature order differ from "
                                  f"{CLASSES} / {FEATURE_ORDER}")
            self._modes: dict[str, dict[str, Any]] = {}
            for mode, m in doc["modes"].items():
                if mode not in MODES:
                    raise EngineError(f"{source}: unknown mode {mode!r}")
                cut = m["sensitive"]["covid_probability"]
                if cut == CUT_FROM_CF:
                    cut = cf_sensitive_cut() if cf_cut is None else cf_cut
                entry: dict[str, Any] = {"transform": m["transform"], "cut": float(cut)}
                if m["transform"] == TRANSFORM_PLR:
                    coef = np.asarray(m["coef"], dtype=np.float64)
                    intercept = np.asarray(m["intercept"], dtype=np.float64)
                    n_in = len(MODE_INPUTS[mode])
                    if coef.shape != (len(CLASSES), n_in) or intercept.shape != (len(CLASSES),):
                        raise EngineError(f"{source}: mode {mode}: coef {coef.shape} / "
                                          f"intercept {intercept.shape} do not fit")
                    entry.update(coef=coef, intercept=intercept)
                elif m["transform"] == TRANSFORM_RULE and mode not in BOTH_MODES:
                    raise EngineError(f"{source}: mode {mode}: 'rule' needs both modalities")
                elif m["transform"] not in (TRANSFORM_IDENTITY, TRANSFORM_RULE):
                    raise EngineError(f"{source}: mode {mode}: unknown transform "
                                      f"{m['transform']!r}")
                self._modes[mode] = entry
            self.both: Mode = doc.get("both", "rule")
            for needed in (self.both, "ct_only", "cf_only"):
                if needed not in self._modes:
                    raise EngineError(f"{source}: mode {needed!r} is missing")
            self.version = str(doc["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{source}: not a fusion model document ({exc!r})") from exc
        self.doc = dict(doc)

    @classmethod
    def load(cls, path: Path, cf_cut: float | None = None) -> FusionModel:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot read fusion model {path}: {exc}") from exc
        return cls(doc, str(path), cf_cut)

    @classmethod
    def load_default(cls, cf_cut: float | None = None) -> FusionModel:
        """The shipped ``engines/models/fusion.json``."""
        return cls.load(DEFAULT_JSON, cf_cut)

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
        if m["transform"] == TRANSFORM_RULE:
            return rule(a)
        return softmax(a @ m["coef"].T + m["intercept"])

    def combine(self, ct: np.ndarray | None, cf: np.ndarray | None) -> FusionOutput:
        """Fuse one patient's CT and CF scores (each ``(3,)`` or ``None``)."""
        ct_a, cf_a = _check_scores("CT", ct), _check_scores("CF", cf)
        mode: Mode
        if ct_a is not None and cf_a is not None:
            mode, x = self.both, np.concatenate([ct_a, cf_a])
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
