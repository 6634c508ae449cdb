"""Series triage: slices in, CT scores out; then the fused decision.

Built for both callers: ``hust19 predict`` (a whole folder at once) and the streaming worker
(slices arrive one micro-batch at a time, in any order). :class:`SeriesScorer` keeps only what
the final step needs: the three slice scores of every slice and the (at most 10) candidate
200x200 crops with the highest pCT among slices whose NiCT score is <= 0.5, never the series.

- ``add_slices([SliceInput(uid, order_key, image_u8), ...])`` (8-bit windowed images) or
  ``add_datasets([...])`` (pydicom datasets; the lung window is applied here);
  ``order_key`` sorts slices into slice order (ascending = cranio-caudal), see
  :func:`order_key`.
- ``finish() -> CtResult``: top-10 in slice order -> patient CNN -> (control, type1, type2),
  or ``proba=None`` with the reason when no slice is usable.
- :func:`decide(ct, cf, threshold)`: fusion (``engines.fusion``) of the CT and CF scores, either
  side may be missing, and the flag under the configured threshold.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import pydicom

from engines import lung, preprocess
from engines.patient_model import TOP_K, PatientModel, stack
from engines.slice_model import NCT, NICT, PCT, SliceModel
from schemas.errors import InputError

log = logging.getLogger(__name__)

Threshold = Literal["general", "sensitive"]
CLASSES: Final = ("control", "type1", "type2")
NO_USABLE_SLICE: Final = "no slice with NiCT score <= 0.5 (no lung parenchyma found)"


@dataclass(frozen=True)
class SliceInput:
    """One slice for :meth:`SeriesScorer.add_slices`: id, order key and 8-bit image."""

    uid: str
    order_key: float
    image_u8: np.ndarray


@dataclass(frozen=True)
class SliceScore:
    """What is kept of every slice: id, order key, lung area and the slice-CNN scores."""

    uid: str
    order_key: float
    lung_fraction: float
    nict: float
    pct: float
    nct: float


@dataclass(frozen=True)
class CtResult:
    """The CT side of one series. ``proba`` is None when the series has no usable slice."""

    series_uid: str
    proba: np.ndarray | None
    n_slices: int
    n_usable: int
    top_uids: tuple[str, ...]
    top_pct: tuple[float, ...]
    slice_model_version: str
    patient_model_version: str
    reason: str | None = None
    slices: tuple[SliceScore, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": None if self.proba is None else dict(zip(CLASSES, map(float, self.proba),
                                                               strict=True)),
            "n_slices": self.n_slices,
            "n_usable_slices": self.n_usable,
            "top_slices": [{"uid": u, "pct": round(p, 6)}
                           for u, p in zip(self.top_uids, self.top_pct, strict=True)],
            "reason": self.reason,
        }


def order_key(ds: pydicom.Dataset) -> float | None:
    """Slice-order key of a dataset (ascending = cranio-caudal): minus the position along the
    slice normal (Image Position (Patient) . (row x column cosines)); falls back to minus
    Slice Location; None when neither is present (the caller then uses another order)."""
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], np.float64)
        if iop.size == 6 and ipp.size == 3:
            normal = np.cross(iop[:3], iop[3:])
            if np.linalg.norm(normal) > 0:
                return -float(ipp @ normal)
    except (AttributeError, TypeError, ValueError):
        pass
    try:
        return -float(ds.SliceLocation)
    except (AttributeError, TypeError, ValueError):
        return None


class SeriesScorer:
    """Incremental CT scoring of one series (see the module docstring)."""

    def __init__(self, slice_model: SliceModel, patient_model: PatientModel,
                 series_uid: str = "", k: int = TOP_K) -> None:
        self.slice_model = slice_model
        self.patient_model = patient_model
        self.series_uid = series_uid
        self.k = k
        self._scores: list[SliceScore] = []
        # min-heap of the k best candidates: (pct, -order_key, seq, uid, order_key, crop)
        self._heap: list[tuple[float, float, int, str, float, np.ndarray]] = []
        self._seq = 0

    @property
    def n_slices(self) -> int:
        return len(self._scores)

    def add_slices(self, items: Sequence[SliceInput]) -> list[SliceScore]:
        """Lung-extract and score one micro-batch of 8-bit slices; returns their scores."""
        if not items:
            return []
        extractions = [lung.extract(it.image_u8) for it in items]
        proba = self.slice_model.score(np.stack([e.crop for e in extractions]))
        out = []
        for it, ext, p in zip(items, extractions, proba, strict=True):
            s = SliceScore(it.uid, float(it.order_key), float(ext.area_fraction),
                           float(p[NICT]), float(p[PCT]), float(p[NCT]))
            out.append(s)
            if s.nict <= self.slice_model.nict_max:
                # ties on pCT: the earlier slice (smaller order key) ranks higher
                entry = (s.pct, -s.order_key, self._seq, s.uid, s.order_key, ext.crop)
                self._seq += 1
                if len(self._heap) < self.k:
                    heapq.heappush(self._heap, entry)
                elif entry[:2] > self._heap[0][:2]:
                    heapq.heapreplace(self._heap, entry)
        self._scores.extend(out)
        return out

    def add_datasets(self, datasets: Sequence[pydicom.Dataset],
                     uids: Sequence[str] | None = None,
                     order_keys: Sequence[float] | None = None) -> list[SliceScore]:
        """Window (HU, lung window) and score pydicom datasets; ids default to the SOP
        Instance UIDs and keys to :func:`order_key` (both must then be present)."""
        items = []
        for i, ds in enumerate(datasets):
            uid = uids[i] if uids is not None else str(ds.get("SOPInstanceUID", "") or "")
            key = order_keys[i] if order_keys is not None else order_key(ds)
            if not uid or key is None:
                raise InputError(f"series {self.series_uid}: slice {uid or '#' + str(i)} lacks "
                                 "a SOP Instance UID or a position; pass uids/order_keys")
            items.append(SliceInput(uid, float(key), preprocess.dataset_to_u8(ds)))
        return self.add_slices(items)

    def finish(self) -> CtResult:
        """Top-k usable slices in slice order -> patient CNN -> CT scores."""
        chosen = sorted(self._heap, key=lambda e: e[4])
        common = {"series_uid": self.series_uid, "n_slices": len(self._scores),
                  "n_usable": sum(s.nict <= self.slice_model.nict_max for s in self._scores),
                  "slice_model_version": self.slice_model.version,
                  "patient_model_version": self.patient_model.version,
                  "slices": tuple(sorted(self._scores, key=lambda s: s.order_key))}
        if not chosen:
            log.warning("series %s: %s", self.series_uid, NO_USABLE_SLICE)
            return CtResult(proba=None, top_uids=(), top_pct=(), reason=NO_USABLE_SLICE,
                            **common)  # type: ignore[arg-type]
        proba = self.patient_model.score(stack([e[5] for e in chosen], self.k))
        log.info("series %s: CT scores %s from %d of %d slices", self.series_uid,
                 np.round(proba, 4).tolist(), len(chosen), len(self._scores))
        return CtResult(proba=proba, top_uids=tuple(e[3] for e in chosen),
                        top_pct=tuple(float(e[0]) for e in chosen), **common)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Decision:
    """The fused result and the flags under both thresholds."""

    flag: str
    flag_general: str
    flag_sensitive: str
    proba: np.ndarray
    mode: str  # "plr" (CT + CF), "ct_only" or "cf_only"
    threshold: str
    fusion_version: str

    def to_dict(self) -> dict[str, Any]:
        return {"flag": self.flag, "threshold": self.threshold,
                "flags": {"general": self.flag_general, "sensitive": self.flag_sensitive},
                "scores": dict(zip(CLASSES, map(float, self.proba), strict=True)),
                "mode": self.mode, "fusion_version": self.fusion_version}


def decide(ct: np.ndarray | None, cf: np.ndarray | None, threshold: Threshold = "general",
           fusion: Any = None) -> Decision:
    """Fuse CT and CF scores (either may be None) and flag under ``threshold``.

    ``fusion`` is an ``engines.fusion.FusionModel`` (default: the shipped one).
    """
    if ct is None and cf is None:
        raise InputError("neither usable CT nor lab values: nothing to triage")
    if fusion is None:
        from engines.fusion import FusionModel

        fusion = FusionModel.load_default()
    out = fusion.combine(ct, cf)
    flag = out.flag_sensitive if threshold == "sensitive" else out.flag_general
    return Decision(flag=str(flag), flag_general=str(out.flag_general),
                    flag_sensitive=str(out.flag_sensitive),
                    proba=np.asarray(out.proba, np.float64), mode=str(out.mode),
                    threshold=threshold, fusion_version=str(getattr(fusion, "version", "")))
