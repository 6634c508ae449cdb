"""Series triage: slices in, CT scores out; then the fused decision.

Built for both callers: ``hust19 predict`` (a whole folder at once) and the streaming worker
(slices arrive one micro-batch at a time, in any order). :class:`SeriesScorer` keeps, per
slice, its int16 HU pixels and a pixel-free geometry header (for the quantitative CT, which
needs the volume), the three slice-CNN scores, and the (at most 10) 200x200 crops with the
highest pCT among slices whose NiCT score is <= 0.5 (the paper's selection for the patient
CNN). Nothing is copied per slice beyond that slice.

- ``add_slices([SliceInput(uid, order_key, image_u8, hu, header), ...])`` or
  ``add_datasets([...])`` (pydicom datasets: HU and the lung window are computed here);
  ``order_key`` sorts slices into slice order (ascending = cranio-caudal), see
  :func:`order_key`.
- ``finish() -> CtResult``: the quantitative CT of the series (:mod:`engines.ct_analysis`:
  lungs, patterns, slice evidence, CT stage) and the paper's CNN path (top-10 pCT slices ->
  patient CNN). ``ct_source`` says which of the two gives the CT scores that the fusion
  uses (default ``quantitative``: the patient CNN is reported beside it, see
  ``docs/models/patient.md``); the evidence slices are the quantitative top-10 when measured.
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

from engines import lung, preprocess, thumbnails, volume
from engines.ct_analysis import CtAnalysis, analyse
from engines.evidence import EvidenceModel
from engines.patient_model import TOP_K, PatientModel, stack
from engines.slice_model import NCT, NICT, PCT, SliceModel
from schemas.errors import InputError

log = logging.getLogger(__name__)

Threshold = Literal["general", "sensitive"]
CtSource = Literal["quantitative", "patient_cnn"]
CT_SOURCES: Final[tuple[CtSource, ...]] = ("quantitative", "patient_cnn")
CLASSES: Final = ("control", "type1", "type2")
NO_USABLE_SLICE: Final = "no slice with NiCT score <= 0.5 (no lung parenchyma found)"


@dataclass(frozen=True)
class SliceInput:
    """One slice for :meth:`SeriesScorer.add_slices`: id, order key, 8-bit image and, for the
    quantitative CT, its int16 HU pixels and geometry header (:func:`engines.volume.
    geometry_header`)."""

    uid: str
    order_key: float
    image_u8: np.ndarray
    hu: np.ndarray | None = None
    header: pydicom.Dataset | None = None


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
    """The CT side of one series.

    ``proba`` is the CT scores the fusion uses (from ``source``), None with ``reason`` when
    the series gives none; ``cnn_proba`` is the patient CNN's output, reported in any case when
    it ran; ``analysis`` the quantitative CT (None when no HU slices were given);
    ``top_uids`` the evidence slices (quantitative top-10 when measured, else the CNN's)."""

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
    source: CtSource = "quantitative"
    cnn_proba: np.ndarray | None = None
    cnn_top_uids: tuple[str, ...] = ()
    analysis: CtAnalysis | None = field(default=None, repr=False)
    thumbnails: tuple[tuple[str, bytes, int, int], ...] = field(default=(), repr=False)
    """(uid, PNG, width, height) of each evidence slice (lung window), when HU was given."""

    def involvement_percent(self) -> float | None:
        """Lung involvement (%) of the quantitative CT, when it was measured."""
        return None if self.analysis is None else self.analysis.involvement_percent

    def to_dict(self) -> dict[str, Any]:
        def scores(p: np.ndarray | None) -> dict[str, float] | None:
            return None if p is None else dict(zip(CLASSES, map(float, p), strict=True))

        evidence: dict[str, float] = {}
        if self.analysis is not None:
            evidence = dict(zip(self.analysis.keys, map(float, self.analysis.evidence),
                                strict=True))
        return {
            "source": self.source,
            "scores": scores(self.proba),
            "cnn_scores": scores(self.cnn_proba),
            "n_slices": self.n_slices,
            "n_usable_slices": self.n_usable,
            "top_slices": [{"uid": u, "evidence": round(evidence.get(u, 0.0), 6)}
                           for u in self.top_uids],
            "cnn_top_slices": [{"uid": u, "pct": round(p, 6)}
                               for u, p in zip(self.cnn_top_uids, self.top_pct, strict=True)],
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
                 series_uid: str = "", k: int = TOP_K, *,
                 evidence_model: EvidenceModel | None = None,
                 ct_source: CtSource = "quantitative", xp: Any = None,
                 max_volume_bytes: int | None = None) -> None:
        if ct_source not in CT_SOURCES:
            raise InputError(f"CT source {ct_source!r} is not one of {', '.join(CT_SOURCES)}")
        self.slice_model = slice_model
        self.patient_model = patient_model
        self.evidence_model = evidence_model
        self.ct_source: CtSource = ct_source
        self.xp = np if xp is None else xp
        self.series_uid = series_uid
        self.k = k
        self._scores: list[SliceScore] = []
        # min-heap of the k best candidates: (pct, -order_key, seq, uid, order_key, crop)
        self._heap: list[tuple[float, float, int, str, float, np.ndarray]] = []
        self._seq = 0
        self._hu: list[np.ndarray] = []
        self._headers: list[pydicom.Dataset] = []
        self._hu_uids: list[str] = []
        self._result: CtResult | None = None
        self._last: CtResult | None = None
        self._released = False
        self.max_volume_bytes = max_volume_bytes
        self._too_large: str | None = None

    @property
    def n_slices(self) -> int:
        return len(self._scores)

    @property
    def volume_bytes(self) -> int:
        """Memory held by the kept HU slices."""
        return sum(int(h.nbytes) for h in self._hu)

    def _check_budget(self) -> None:
        """Past ``max_volume_bytes`` the series is not measured: its HU is dropped and the
        quantitative CT says why (memory per series stays bounded)."""
        if self.max_volume_bytes is None or self._too_large is not None:
            return
        held = self.volume_bytes
        if held > self.max_volume_bytes:
            self.drop_volume(f"series larger than the quantitative CT's memory budget "
                             f"({len(self._hu)} slices, {held / (1 << 20):.0f} MiB > "
                             f"{self.max_volume_bytes / (1 << 20):.0f} MiB): not measured")

    def drop_volume(self, reason: str) -> None:
        """Give up the quantitative CT of this series for ``reason`` (the caller's memory
        budget): its HU is dropped, the CNN path goes on, and :meth:`finish` says why."""
        if self._too_large is None:
            self._too_large = reason
            log.warning("series %s: %s", self.series_uid, reason)
        self.release()

    def release(self) -> None:
        """Drop the kept HU slices (memory). A later :meth:`finish` after more slices keeps
        the quantitative CT of the last completion and says so."""
        self._hu, self._headers, self._hu_uids = [], [], []
        self._released = True

    def add_slices(self, items: Sequence[SliceInput]) -> list[SliceScore]:
        """Lung-extract and score one micro-batch of slices; keep their HU for the series."""
        if not items:
            return []
        extractions = [lung.extract(it.image_u8) for it in items]
        proba = self.slice_model.score(np.stack([e.crop for e in extractions]))
        out = []
        self._result = None  # the series changed: the next finish() recomputes
        for it, ext, p in zip(items, extractions, proba, strict=True):
            s = SliceScore(it.uid, float(it.order_key), float(ext.area_fraction),
                           float(p[NICT]), float(p[PCT]), float(p[NCT]))
            out.append(s)
            if it.hu is not None and it.header is not None and not self._released:
                self._hu.append(it.hu)
                self._headers.append(it.header)
                self._hu_uids.append(it.uid)
                self._check_budget()
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
        """Score pydicom datasets (HU, lung window); ids default to the SOP Instance UIDs and
        keys to :func:`order_key` (both must then be present)."""
        return self.add_slices([slice_input(ds, uids[i] if uids is not None else None,
                                            order_keys[i] if order_keys is not None else None,
                                            series_uid=self.series_uid, index=i)
                                for i, ds in enumerate(datasets)])

    def _analyse(self) -> tuple[CtAnalysis | None, str | None]:
        if self._too_large is not None:
            return None, self._too_large
        if self.evidence_model is None or not self._hu:
            return None, "no quantitative CT (no HU slices or no evidence model)"
        try:
            vol = volume.assemble(self._headers, self._hu, self._hu_uids, self.series_uid)
        except InputError as exc:
            log.warning("series %s: no quantitative CT: %s", self.series_uid, exc.message)
            return None, exc.message
        analysis = analyse(vol, self.evidence_model, xp=self.xp, series_uid=self.series_uid)
        return analysis, analysis.reason

    def finish(self) -> CtResult:
        """The quantitative CT and the CNN path (module docstring) -> CT scores. Repeated
        without new slices, it returns the same result without recomputing."""
        if self._result is not None:
            return self._result
        chosen = sorted(self._heap, key=lambda e: e[4])
        previous = self._last
        if self._released and previous is not None and self._too_large is None:
            log.warning("series %s: slices arrived after the series' volume was released; "
                        "the quantitative CT of the last completion is kept", self.series_uid)
            analysis, quant_reason = previous.analysis, previous.reason
        else:
            analysis, quant_reason = self._analyse()
        cnn_proba = None
        if chosen:
            cnn_proba = self.patient_model.score(stack([e[5] for e in chosen], self.k))
        cnn_top = tuple(e[3] for e in chosen)
        stage = analysis.stage if analysis is not None else None
        if self.ct_source == "quantitative":
            proba = None if stage is None else stage.proba
            reason = None if stage is not None else quant_reason
        else:
            proba = cnn_proba
            reason = None if cnn_proba is not None else NO_USABLE_SLICE
        top = analysis.top_keys if analysis is not None and analysis.top else cnn_top
        if proba is None:
            log.warning("series %s: no CT scores: %s", self.series_uid, reason)
        else:
            log.info("series %s: CT scores %s (%s), patient CNN %s, from %d slices",
                     self.series_uid, np.round(proba, 4).tolist(), self.ct_source,
                     None if cnn_proba is None else np.round(cnn_proba, 4).tolist(),
                     len(self._scores))
        index = {uid: i for i, uid in enumerate(self._hu_uids)}
        thumbs = tuple((uid, *thumbnails.thumbnail_png(self._hu[index[uid]]))
                       for uid in top if uid in index)
        if not thumbs and previous is not None:
            thumbs = previous.thumbnails
        self._result = CtResult(
            series_uid=self.series_uid, proba=proba, n_slices=len(self._scores),
            n_usable=sum(s.nict <= self.slice_model.nict_max for s in self._scores),
            top_uids=top, top_pct=tuple(float(e[0]) for e in chosen),
            slice_model_version=self.slice_model.version,
            patient_model_version=self.patient_model.version, reason=reason,
            slices=tuple(sorted(self._scores, key=lambda s: s.order_key)),
            source=self.ct_source, cnn_proba=cnn_proba, cnn_top_uids=cnn_top,
            analysis=analysis, thumbnails=thumbs)
        self._last = self._result
        return self._result


def slice_input(ds: pydicom.Dataset, uid: str | None = None, key: float | None = None, *,
                series_uid: str = "", index: int = 0) -> SliceInput:
    """A :class:`SliceInput` of a dataset: HU once, the lung window and int16 HU from it.

    Raises :class:`InputError` (or its DICOM subclass) for a slice without a SOP Instance UID
    or a position when none is passed, or whose pixels cannot be read."""
    uid = uid if uid is not None else str(ds.get("SOPInstanceUID", "") or "")
    key = key if key is not None else order_key(ds)
    if not uid or key is None:
        raise InputError(f"series {series_uid}: slice {uid or '#' + str(index)} lacks a SOP "
                         "Instance UID or a position; pass uids/order_keys")
    hu = preprocess.to_hu(ds)
    return SliceInput(uid, float(key), preprocess.window(hu), volume.hu_int16(hu),
                      volume.geometry_header(ds))


@dataclass(frozen=True)
class Decision:
    """The fused result and the flags under both thresholds."""

    flag: str
    flag_general: str
    flag_sensitive: str
    proba: np.ndarray
    mode: str  # "rule" or "plr" (CT + CF), "ct_only" or "cf_only"
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
