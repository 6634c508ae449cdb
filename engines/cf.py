"""Clinical-feature (CF) vectors and the CF network at run time.

:func:`vectorise` turns one patient's values (catalogue code -> :class:`LabValue`) into the
network input, in catalogue order, with the paper's normalisation F = (f - Min) / (Max - Min)
over the normal range, missing = 0.5, gender and Udis 0/1 (``Feature.normalise``).

Which range: the range the hospital printed with the result, when it has one. A printed range
is in the result's own unit, so each result is normalised by its own hospital's range and unit
differences between hospitals cancel (prealbumin in g/L at Union and mg/L at Liyuan, PDW in %
and fl). Without a printed range the catalogue range is used, provided the result is in the
catalogue's unit (or states none); a result in another unit of the same quantity (mg/L vs g/L,
ug/L vs ng/mL) is converted; one in an unconvertible unit is treated as missing (0.5) and
logged, rather than normalised against a range in the wrong unit.

:class:`CfModel` runs the shipped ONNX model (``engines/models/cf.onnx``) through the
inference-backend interface; its JSON sidecar (``cf.json``) fixes the feature order (the
catalogue codes and version it was trained with), the thresholds and the calibration.

The shipped model is an ensemble of the K networks of one stratified K-fold cross-fitting
(``hust19 train cf``): output ``proba`` (n, 3) is the mean of the members' probabilities, output
``members`` (n, K, 3) each member's. Every training patient was held out of exactly one member
(``cf.json`` ``training.held_out_by``), so :meth:`CfModel.predict_out_of_fold` can score a
training patient with the member that never saw it: the quality gate and ``hust19 evaluate cf``
use that to measure the shipped weights on data they were not fitted on.

Calibration (:class:`Calibration`, JSON numbers in ``cf.json`` ``calibration``, applied by
:meth:`CfModel.predict`): p' = softmax((log p + log(prior / trained_prior)) / T). The networks
are trained with the cross-entropy weighted by inverse class frequency, so their scores are
posteriors for equal class frequencies (``trained_prior``, 1/3 each); multiplying by the
training cohort's class frequencies (``prior``) and renormalising undoes exactly that weighting
(no parameter is fitted). ``T`` is a temperature; the shipped model has T = 1 because a
temperature fitted on out-of-fold scores made the ensemble worse (``docs/models/cf.md``). A
single-network model without ``members`` or ``calibration`` (the format before 2026-12) still
loads, uncalibrated and without out-of-fold scoring.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines import MODELS_DIR
from engines.backends import BackendName, InferenceBackend, create_backend
from schemas.errors import EngineError, InputError
from schemas.features import CATALOGUE_VERSION, Feature, LabValue, catalogue

log = logging.getLogger(__name__)

DEFAULT_ONNX: Final = MODELS_DIR / "cf.onnx"
MISSING: Final = 0.5
CLASSES: Final[tuple[str, str, str]] = ("control", "type1", "type2")
#: ONNX output names: the ensemble mean and the per-member probabilities.
PROBA_OUTPUT: Final = "proba"
MEMBERS_OUTPUT: Final = "members"
#: Probabilities are floored here before the logarithm of temperature scaling (a softmax in
#: float32 can return exact zeros).
PROBA_FLOOR: Final = 1e-7

# Units written differently for the same thing, and mass-per-volume units with their factor to
# g/L. Keys are canonical spellings (see _canon_unit).
_SAME_UNIT: Final = {"umol/l": "umol/l", "ng/ml": "ug/l", "iu/l": "u/l"}
_TO_G_PER_L: Final = {"g/l": 1.0, "mg/l": 1e-3, "ug/l": 1e-6, "pg/ml": 1e-9, "mg/dl": 1e-2}


def _canon_unit(unit: str | None) -> str:
    u = (unit or "").strip().lower().replace("μ", "u").replace("µ", "u").replace(" ", "")
    return _SAME_UNIT.get(u, u)


def unit_factor(unit: str | None, target: str | None) -> float | None:
    """Multiplier taking a value in ``unit`` into ``target``: 1.0 when they are the same unit
    (or either is not stated), the ratio for convertible mass concentrations, else ``None``."""
    a, b = _canon_unit(unit), _canon_unit(target)
    if not a or not b or a == b:
        return 1.0
    if a in _TO_G_PER_L and b in _TO_G_PER_L:
        return _TO_G_PER_L[a] / _TO_G_PER_L[b]
    return None


def normalise_value(feature: Feature, v: LabValue | None) -> float:
    """One catalogue feature's network input from a value (see the module docstring)."""
    if v is None or v.value is None:
        return MISSING
    if feature.kind == "binary":
        return feature.normalise(v.value)
    if v.high is not None:  # printed range, in the result's own unit
        return feature.normalise(v.value, v.low if v.low is not None else 0.0, v.high)
    factor = unit_factor(v.unit, feature.unit)
    if factor is None:
        log.warning("%s in %r cannot be compared with the catalogue range in %r and has no "
                    "printed range: treated as missing", feature.code, v.unit, feature.unit)
        return MISSING
    return feature.normalise(v.value * factor)


def vectorise(values: Mapping[str, LabValue]) -> np.ndarray:
    """The CF network input (float32, ``len(catalogue())``) for one patient. Codes outside
    the catalogue are ignored."""
    feats = catalogue()
    return np.fromiter((normalise_value(f, values.get(f.code)) for f in feats),
                       dtype=np.float32, count=len(feats))


def vectorise_many(rows: Sequence[Mapping[str, LabValue]]) -> np.ndarray:
    """Stacked :func:`vectorise` of many patients, shape ``(n, len(catalogue()))``."""
    if not rows:
        return np.zeros((0, len(catalogue())), dtype=np.float32)
    return np.stack([vectorise(r) for r in rows])


def feature_order() -> list[str]:
    """The catalogue codes in network input order."""
    return [f.code for f in catalogue()]


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of class probabilities along the last axis: softmax(log p / T).

    Equal to dividing the network's logits by T (log p differs from the logits by a constant
    per row). T > 1 softens over-confident scores, T = 1 leaves them unchanged; the arg-max
    class never changes."""
    return Calibration(temperature=temperature).apply(proba)


#: Equal class frequencies: what a network trained with inverse-frequency class weights fits.
UNIFORM_PRIOR: Final = (1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0)
#: How far a prior may sum from 1 (JSON round trip of three frequencies).
PRIOR_SUM_TOLERANCE: Final = 1e-6


@dataclass(frozen=True)
class Calibration:
    """p' = softmax((log p + log(prior / trained_prior)) / temperature), row-wise over the
    last axis (see the module docstring). The default is the identity."""

    prior: tuple[float, ...] = UNIFORM_PRIOR
    trained_prior: tuple[float, ...] = UNIFORM_PRIOR
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name, prior in (("prior", self.prior), ("trained_prior", self.trained_prior)):
            if (len(prior) != len(CLASSES) or min(prior) <= 0.0
                    or abs(sum(prior) - 1.0) > PRIOR_SUM_TOLERANCE):
                raise EngineError(f"calibration {name} must be {len(CLASSES)} positive class "
                                  f"frequencies summing to 1, got {prior}")
        if not self.temperature > 0.0:
            raise EngineError(f"calibration temperature must be positive, got "
                              f"{self.temperature}")

    @property
    def is_identity(self) -> bool:
        return self.prior == self.trained_prior and self.temperature == 1.0

    def apply(self, proba: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float32), same shape as ``proba`` (``(..., 3)``)."""
        p = np.asarray(proba, dtype=np.float64)
        if self.is_identity:
            return np.asarray(p, dtype=np.float32)
        shift = np.log(np.asarray(self.prior)) - np.log(np.asarray(self.trained_prior))
        z = (np.log(np.clip(p, PROBA_FLOOR, 1.0)) + shift) / self.temperature
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"prior": list(self.prior), "trained_prior": list(self.trained_prior),
                "temperature": self.temperature}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> Calibration:
        """From ``cf.json`` ``calibration`` (absent: the identity)."""
        if not doc:
            return cls()
        try:
            return cls(tuple(float(v) for v in doc.get("prior", UNIFORM_PRIOR)),
                       tuple(float(v) for v in doc.get("trained_prior", UNIFORM_PRIOR)),
                       float(doc.get("temperature", 1.0)))
        except (TypeError, ValueError) as exc:
            raise EngineError(f"unreadable CF calibration {doc!r}: {exc}") from exc


class CfModel:
    """The CF model behind the inference-backend interface, with its JSON metadata (see the
    module docstring for the ensemble, out-of-fold scoring and calibration)."""

    def __init__(self, path: Path, *, backend: BackendName = "onnxruntime") -> None:
        meta_path = path.with_suffix(".json")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot read CF model metadata {meta_path}: {exc}") from exc
        if self.meta.get("feature_order") != feature_order():
            raise EngineError(f"{meta_path}: feature order differs from the clinical-feature "
                              f"catalogue {CATALOGUE_VERSION}; retrain the CF model")
        self.calibration = Calibration.from_json(self.meta.get("calibration"))
        self.path = path
        self._backend: InferenceBackend = create_backend(path, backend)
        names = [o.name for o in self._backend.outputs]
        self._proba_name = PROBA_OUTPUT if PROBA_OUTPUT in names else names[0]
        self._members_name = MEMBERS_OUTPUT if MEMBERS_OUTPUT in names else None
        held = self.held_out_by
        if held and self._members_name is None:
            raise EngineError(f"{meta_path} names the held-out patients of ensemble members, "
                              f"but {path.name} has no {MEMBERS_OUTPUT!r} output")
        if held and not 0 <= min(held.values()) <= max(held.values()) < self.member_count:
            raise EngineError(f"{meta_path}: a held-out member index lies outside the "
                              f"{self.member_count} members of {path.name}")

    @classmethod
    def load_default(cls, *, backend: BackendName = "onnxruntime") -> CfModel:
        """The shipped model (``engines/models/cf.onnx``)."""
        return cls(DEFAULT_ONNX, backend=backend)

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta.get("classes", CLASSES))

    @property
    def thresholds(self) -> dict[str, Any]:
        """``general`` (``"argmax"``) and ``sensitive`` (COVID-probability cut on the
        calibrated scores and the sensitivity it was chosen to reach)."""
        return dict(self.meta["thresholds"])

    @property
    def member_count(self) -> int:
        """Networks in the ensemble (1 for a single network)."""
        if self._members_name is None:
            return 1
        spec = next(o for o in self._backend.outputs if o.name == self._members_name)
        if len(spec.shape) == 3 and spec.shape[1] > 0:
            return int(spec.shape[1])
        return int(self.meta.get("ensemble", {}).get("members", 1))

    @property
    def held_out_by(self) -> dict[str, int]:
        """Training patient id -> index of the ensemble member that never saw it (empty for
        a model without members)."""
        training = self.meta.get("training", {})
        ids, members = training.get("patient_ids", []), training.get("held_out_by")
        if not members:
            return {}
        return {str(i): int(k) for i, k in zip(ids, members, strict=True)}

    def _vectors(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != len(catalogue()):
            raise InputError(f"CF vectors of shape {x.shape}; expected (n, {len(catalogue())})")
        return x

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self._backend.run({self._backend.inputs[0].name: x})

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities ``(n, 3)`` (control, type1, type2) for input vectors
        ``(n, d)``: the ensemble mean, calibrated."""
        x = self._vectors(vectors)
        if x.shape[0] == 0:
            return np.zeros((0, len(CLASSES)), dtype=np.float32)
        return self.calibration.apply(self._run(x)[self._proba_name])

    def predict_out_of_fold(self, vectors: np.ndarray, patient_ids: Sequence[str], *,
                            calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(n, 3)`` where a training patient is scored by the one member that
        was not fitted on it, any other patient by the ensemble (calibrated unless
        ``calibrated`` is false); and the boolean mask of the rows scored out-of-fold.
        Without members, every row is the ensemble's."""
        x = self._vectors(vectors)
        if len(patient_ids) != x.shape[0]:
            raise InputError(f"{len(patient_ids)} patient ids for {x.shape[0]} CF vectors")
        held = self.held_out_by
        member = np.array([held.get(str(i), -1) for i in patient_ids], dtype=np.int64)
        oof = member >= 0
        if x.shape[0] == 0:
            return np.zeros((0, len(CLASSES)), dtype=np.float32), oof
        out = self._run(x)
        proba = np.array(out[self._proba_name], dtype=np.float32)
        if oof.any() and self._members_name is not None:
            members = out[self._members_name]
            rows = np.flatnonzero(oof)
            proba[rows] = members[rows, member[rows]]
        return (self.calibration.apply(proba) if calibrated else proba), oof

    def predict_values(self, rows: Sequence[Mapping[str, LabValue]]) -> np.ndarray:
        """:meth:`predict` of :func:`vectorise_many` of the rows."""
        return self.predict(vectorise_many(rows))

    def close(self) -> None:
        self._backend.close()
