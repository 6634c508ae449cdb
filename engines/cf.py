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

:class:`CfModel` runs the shipped ONNX network (``engines/models/cf.onnx``) through the
inference-backend interface; its JSON sidecar (``cf.json``) fixes the feature order (the
catalogue codes and version it was trained with) and the thresholds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
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


class CfModel:
    """The CF network behind the inference-backend interface, with its JSON metadata."""

    def __init__(self, path: Path, *, backend: BackendName = "onnxruntime") -> None:
        meta_path = path.with_suffix(".json")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot read CF model metadata {meta_path}: {exc}") from exc
        if self.meta.get("feature_order") != feature_order():
            raise EngineError(f"{meta_path}: feature order differs from the clinical-feature "
                              f"catalogue {CATALOGUE_VERSION}; retrain the CF model")
        self.path = path
        self._backend: InferenceBackend = create_backend(path, backend)

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
        """``general`` (``"argmax"``) and ``sensitive`` (COVID-probability cut and the
        sensitivity it was chosen to reach)."""
        return dict(self.meta["thresholds"])

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, 3)`` (control, type1, type2) for input vectors
        ``(n, d)``."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != len(catalogue()):
            raise InputError(f"CF vectors of shape {x.shape}; expected (n, {len(catalogue())})")
        if x.shape[0] == 0:
            return np.zeros((0, len(CLASSES)), dtype=np.float32)
        return np.asarray(self._backend.run1(x), dtype=np.float32)

    def predict_values(self, rows: Sequence[Mapping[str, LabValue]]) -> np.ndarray:
        """:meth:`predict` of :func:`vectorise_many` of the rows."""
        return self.predict(vectorise_many(rows))

    def close(self) -> None:
        self._backend.close()
