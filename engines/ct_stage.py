"""The CT stage of a patient: lung involvement (% of lung volume) -> control / Type I / Type II.

A documented rule, not a fitted network: the only labelled CT data here are three series, far
too few to train a patient-level model (the HUST-19 patient CNN stays as a site-trained
option, see ``docs/models/patient.md``). The rule follows the CT severity categories used in
Moscow's COVID-19 triage (Morozov S.P. et al., "Chest computed tomography for outcome
prediction in laboratory-confirmed COVID-19: a retrospective analysis of 38,051 cases",
Digital Diagnostics 1(1), 27-36, 2020): **CT-0** no signs of pneumonia, **CT-1** involvement
below 25 %, **CT-2** 25-50 %, **CT-3** 50-75 %, **CT-4** 75 % and more, CT-3 and CT-4 being the
severe and critical categories.

- ``P(pneumonia)`` rises smoothly (logistic in log10 of the involvement, width
  :data:`PNEUMONIA_WIDTH_DECADES`) through :data:`PNEUMONIA_MIN_PERCENT`: the measured
  involvement that separates "no signs" from CT-1. Vessels and surfaces are suppressed, so a
  normal lung measures near 0 % (0.14 % on normal001) but not exactly 0; the cut lies
  between that and the least involved pneumonia series here (cap002, 0.98 %), near their
  geometric mean (0.37 %). It is the one number of the rule fitted on the dev series (three
  of them); the kept-back series test it.
- ``P(severe | pneumonia)`` rises through :data:`SEVERE_PERCENT` (CT-3 and more) with width
  :data:`SEVERE_WIDTH_PERCENT` percentage points.
- Classes: ``control = 1 - P(pneumonia)``, ``type1 = P(pneumonia) (1 - P(severe))``,
  ``type2 = P(pneumonia) P(severe)``.

On CT alone "type1/type2" means "pneumonia of that extent": CT cannot tell COVID-19 from
another pneumonia (cap002, community-acquired pneumonia, is Type I on CT). The fusion lets the
lab model decide COVID-19 (:mod:`engines.fusion`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

__all__ = ["CtStage", "severity_category", "stage"]

Severity = Literal["CT-0", "CT-1", "CT-2", "CT-3", "CT-4"]

PNEUMONIA_MIN_PERCENT: Final = 0.3
PNEUMONIA_WIDTH_DECADES: Final = 0.15
"""Half a decade from the cut (0.095 % or 0.95 %) P(pneumonia) is 0.03 or 0.97."""
SEVERE_PERCENT: Final = 50.0
SEVERE_WIDTH_PERCENT: Final = 5.0
CATEGORY_BOUNDS: Final = (25.0, 50.0, 75.0)
METHOD: Final = "ct-stage-1"


@dataclass(frozen=True)
class CtStage:
    """The CT side of a patient from the quantitative CT."""

    involvement_percent: float
    severity: Severity
    p_pneumonia: float
    p_severe: float
    proba: np.ndarray  # (control, type1, type2)
    method: str = METHOD


def severity_category(involvement_percent: float) -> Severity:
    """CT-0..CT-4 of an involvement (CT-0 below :data:`PNEUMONIA_MIN_PERCENT`)."""
    if involvement_percent < PNEUMONIA_MIN_PERCENT:
        return "CT-0"
    for k, bound in enumerate(CATEGORY_BOUNDS, start=1):
        if involvement_percent < bound:
            return f"CT-{k}"  # type: ignore[return-value]
    return "CT-4"


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(z, 500.0), -500.0)))


def stage(involvement_percent: float) -> CtStage:
    """The CT stage of a measured involvement (0..100)."""
    v = min(max(float(involvement_percent), 0.0), 100.0)
    floor = 1e-3  # log10 of 0 %: far below the cut, P(pneumonia) ~ 0
    p_pneumonia = _sigmoid((math.log10(max(v, floor)) - math.log10(PNEUMONIA_MIN_PERCENT))
                           / PNEUMONIA_WIDTH_DECADES)
    p_severe = _sigmoid((v - SEVERE_PERCENT) / SEVERE_WIDTH_PERCENT)
    proba = np.array([1.0 - p_pneumonia, p_pneumonia * (1.0 - p_severe),
                      p_pneumonia * p_severe])
    return CtStage(involvement_percent=v, severity=severity_category(v),
                   p_pneumonia=p_pneumonia, p_severe=p_severe, proba=proba)
