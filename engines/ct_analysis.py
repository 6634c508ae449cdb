"""The quantitative CT of one series, end to end: volume -> lungs -> patterns -> slice evidence
-> CT stage.

:func:`analyse` is what ``hust19 predict`` and the worker call once a series is complete; it
never raises for a series the method cannot measure: the result says why (``reason``), and the
CT side of the triage is then missing rather than wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import numpy as np

from engines import ct_stage, lung_segmentation, quantitative
from engines.ct_stage import CtStage
from engines.evidence import EvidenceModel, top_slices
from engines.quantitative import Quantification
from engines.volume import SeriesVolume

__all__ = ["MAX_MISSING_FRACTION", "CtAnalysis", "analyse"]

log = logging.getLogger(__name__)

MAX_MISSING_FRACTION: Final = 0.1
"""A series with more slices missing in gaps than this share of the slices present is not
measured: which part of the lung is missing decides the involvement, and that is not known.
Fewer are measured, without a volume (the involvement is a share of the lung present)."""


@dataclass(frozen=True)
class CtAnalysis:
    """Quantitative CT of a series.

    Attributes:
        keys: slice ids in slice order (index 0 = most cranial).
        quant: the measurements (per slice and per lung).
        evidence: per-slice evidence score, slice order.
        top: indices (slice order) of the evidence slices, at most
            :data:`engines.evidence.TOP_K`, sorted cranio-caudally.
        stage: the CT stage, None when involvement could not be measured.
        reason: why there is no stage, or None.
        evidence_version: the evidence model's version.
        warnings: what limits the figures.
    """

    keys: tuple[str, ...]
    quant: Quantification
    evidence: np.ndarray
    top: tuple[int, ...]
    stage: CtStage | None
    reason: str | None
    evidence_version: str
    slice_mm: float | None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def top_keys(self) -> tuple[str, ...]:
        return tuple(self.keys[i] for i in self.top)

    @property
    def involvement_percent(self) -> float | None:
        return None if self.stage is None else self.stage.involvement_percent

    def summary(self) -> dict[str, Any]:
        """The measurements in the shape of the result schema's ``quantitative_ct``
        (:class:`schemas.messages.QuantitativeCt`)."""
        q = self.quant
        return {
            "method": f"{q.method}+{ct_stage.METHOD}+{self.evidence_version}",
            "lungs": q.lungs.as_dict() if q.lungs is not None else {},
            "right": q.right.as_dict() if q.right is not None else None,
            "left": q.left.as_dict() if q.left is not None else None,
            "severity": None if self.stage is None else self.stage.severity,
            "slices_with_lung": q.slices_with_lung,
            "slice_spacing_mm": None if self.slice_mm is None else round(self.slice_mm, 4),
            "warnings": list(self.warnings),
        }


def analyse(volume: SeriesVolume, evidence_model: EvidenceModel, *, xp: ModuleType = np,
            series_uid: str = "") -> CtAnalysis:
    """Segment, measure, score the slices and stage the series ``volume``."""
    n = len(volume.keys)
    if volume.missing_slices > MAX_MISSING_FRACTION * n:
        reason = (f"about {volume.missing_slices} slice(s) missing in "
                  f"{len(volume.order.gaps)} gap(s) of a {n}-slice series: not measured")
        log.warning("series %s: %s", series_uid, reason)
        empty = np.zeros(n, np.int64)
        quant = Quantification(quantitative.METHOD, empty, empty, empty, None, None, None,
                               volume.slice_mm, reason=reason)
        return CtAnalysis(volume.keys, quant, np.zeros(n), (), None, reason,
                          evidence_model.version, volume.slice_mm, volume.warnings)
    hu: Any = xp.asarray(volume.hu)
    segmentation = lung_segmentation.segment(
        hu, volume.pixel_mm, volume.slice_mm,
        left_at_higher_columns=volume.left_at_higher_columns, xp=xp, series_uid=series_uid)
    quant = quantitative.quantify(hu, segmentation, volume.slice_mm,
                                  slice_thickness_mm=volume.thickness_mm,
                                  missing_slices=volume.missing_slices, xp=xp,
                                  series_uid=series_uid)
    warnings = tuple(dict.fromkeys((*volume.warnings, *quant.warnings)))
    if quant.reason is not None:
        return CtAnalysis(volume.keys, quant, np.zeros(n), (), None, quant.reason,
                          evidence_model.version, volume.slice_mm, warnings)
    scores = evidence_model.score(quant)
    top = tuple(int(i) for i in top_slices(scores, quant.lung_px))
    involvement = quant.involvement_percent
    if involvement is None:
        reason = next((w for w in quant.warnings if "thick" in w),
                      "involvement could not be measured")
        return CtAnalysis(volume.keys, quant, scores, top, None, reason,
                          evidence_model.version, volume.slice_mm, warnings)
    result = ct_stage.stage(involvement)
    log.info("series %s: CT stage %s (involvement %.2f %%), %d evidence slice(s) of %d",
             series_uid, result.severity, involvement,
             int(np.count_nonzero(scores >= evidence_model.threshold)), n)
    return CtAnalysis(volume.keys, quant, scores, top, result, None, evidence_model.version,
                      volume.slice_mm, warnings)
