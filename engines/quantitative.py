"""Quantitative lung CT: lung volume and the share of each density pattern, per slice, per lung
and for the series, in Hounsfield units.

Written once against an array module (NumPy on the CPU, CuPy on the GPU), like
:mod:`engines.lung_segmentation`, whose lung mask it measures. It runs on the full-resolution HU
volume in chunks of :data:`CHUNK_SLICES` slices cropped to the lungs, so its working memory is
bounded whatever the series length.

**Density bands** (HU, lower bound included, upper excluded; the sources):

- below :data:`WELL_AERATED_HU` (-950): hyperinflated, the emphysema index LAA-950
  (Gevenois P.A. et al., Am. J. Respir. Crit. Care Med. 154, 187-192, 1996);
- -950..-700 **well aerated**: the band of Colombi D. et al., "Well-aerated lung on admitting
  chest CT to predict adverse outcome in COVID-19 pneumonia", Radiology 296, E86-E96 (2020);
- -700..-300 **ground glass**: from Colombi's upper bound to -300 HU, the split between ground
  glass and consolidation that separated COVID-19 pneumonia best among eight thresholds in
  "Quantitative CT for detecting COVID-19 pneumonia in suspected cases", BMC Infect. Dis.
  (2021), doi:10.1186/s12879-021-06556-z;
- -300..+100 **consolidation**: to the upper bound of non-aerated lung of Gattinoni L. et al.,
  "Lung recruitment in patients with the acute respiratory distress syndrome", N. Engl. J. Med.
  354, 1775-1786 (2006).

**Involvement** is ground glass plus consolidation that belongs to an opacity, not to a vessel
or a lung surface. A raw band count is not that: in a normal lung 13 % of the voxels are in
-700..+100 HU (vessels, their partial-volume rims, airway walls; measured on normal001), as
much as in the COVID-19 series P002. So, within each slice of the lung mask:

1. *Surfaces out* (partial volume with the chest wall, the diaphragm domes, the apices): a
   voxel counts only when the lung mask also covers it on both neighbouring slices.
2. *Vessels and airway walls out*: everything at or above -300 HU (solid) is dilated by
   :data:`RIM_MM` (their partial-volume halo); the ground-glass candidates are
   :data:`LESION_LOW_HU`..-300 HU voxels outside that halo.
3. *Opacities, not strands*: the candidates are opened by a :data:`CORE_MM` square, which
   keeps patches at least that wide in both directions (ground-glass opacities are
   centimetres wide, vessel halos a pixel or two): the opacity **cores**. Solid tissue
   (-300..+100 HU) is a core too where it is at least :data:`CONSOLIDATION_CORE_MM` wide in
   both directions: a consolidation, since the vessels inside the lung are narrower (the
   hilar vessels, wider, are outside the lung mask). Measured on the dev series: 0.00-0.04 %
   of the lung, so a consolidation without a ground-glass rim is still counted.
4. *Whole opacities*: each core is grown by :data:`GROW_MM` into the -750..+100 HU voxels
   around it, which puts back its edges and the consolidation inside it.

Dependent density (the gravity-dependent, denser posterior lung of a supine patient) is
handled by the same steps: it is a thin band at the posterior surface, which the surface and
opening steps remove; a dependent band thicker than :data:`CORE_MM` is counted, and the card
says so. Ground glass and consolidation are then reported *within* the opacities, so
``involvement = ground glass + consolidation``; well-aerated is the band's share of the whole
lung mask. The steps and their sizes were chosen on the three labelled series (see
``docs/models/quantitative.md`` for what each step changed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import numpy as np

from engines import morphology as mo
from engines.lung_segmentation import BOTH, LEFT, RIGHT, LungSegmentation

__all__ = [
    "CONSOLIDATION_HU",
    "GROUND_GLASS_HU",
    "WELL_AERATED_HU",
    "LungFigures",
    "Quantification",
    "opacities",
    "quantify",
]

log = logging.getLogger(__name__)

WELL_AERATED_HU: Final = -950.0
GROUND_GLASS_HU: Final = -700.0
CONSOLIDATION_HU: Final = -300.0
CONSOLIDATION_MAX_HU: Final = 100.0
LESION_LOW_HU: Final = -750.0
"""Lowest HU of an opacity's core: faint ground glass of -750..-700 is part of the opacities
found in the labelled series; reported ground glass still starts at -700."""
RIM_MM: Final = 1.8
CORE_MM: Final = 4.2
GROW_MM: Final = 2.4
CONSOLIDATION_CORE_MM: Final = 10.0
CHUNK_SLICES: Final = 24
MAX_SLICE_MM: Final = 5.0
"""Thicker slices are not measured for patterns: a vessel running through an 8 mm slab is
averaged with the air around it into a band of -700..-300 HU wider than :data:`CORE_MM`, so
it looks like ground glass (measured on the 8 mm lung-cancer series: 4 % "involvement" from
vessels), and nothing here was validated on such series. Volumes are still measured."""
METHOD: Final = "qct-1"
"""Version of the measurement method; any change of a threshold or step is a new version."""

_SIDES: Final = (("lungs", None), ("right", RIGHT), ("left", LEFT))


def _odd(pixels: float) -> int:
    """The odd window width nearest to ``pixels`` (at least 1)."""
    n = max(1, round(pixels))
    return n if n % 2 else n + 1


@dataclass(frozen=True)
class LungFigures:
    """Measurements of one lung, or of both."""

    volume_ml: float | None
    mean_hu: float | None
    well_aerated_percent: float | None
    ground_glass_percent: float | None
    consolidation_percent: float | None
    involvement_percent: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if v is None else round(float(v), 3)) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Quantification:
    """Quantitative CT of one series.

    Per-slice arrays (host NumPy, slice order) feed the slice evidence; ``lungs`` / ``right`` /
    ``left`` are the series figures (``right``/``left`` None when the lungs could not be told
    apart). ``reason`` is set, and the figures are None, when nothing could be measured.
    """

    method: str
    lung_px: np.ndarray
    core_px: np.ndarray
    opacity_px: np.ndarray
    lungs: LungFigures | None
    right: LungFigures | None
    left: LungFigures | None
    slice_mm: float | None
    reason: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def involvement_percent(self) -> float | None:
        return None if self.lungs is None else self.lungs.involvement_percent

    @property
    def slices_with_lung(self) -> int:
        return int(np.count_nonzero(self.lung_px))

    def slice_involvement(self) -> np.ndarray:
        """Per slice, opacity share of that slice's lung (0 where there is no lung)."""
        return np.where(self.lung_px > 0, self.opacity_px / np.maximum(self.lung_px, 1), 0.0)


def _host(xp: ModuleType, a: Any) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a)


def _bbox(xp: ModuleType, labels: Any, factor: int, rows: int, cols: int) -> tuple[slice, slice]:
    """Rows and columns of the full grid that hold lung (plus one working pixel)."""
    any_row = _host(xp, (labels > 0).any(axis=(0, 2)))
    any_col = _host(xp, (labels > 0).any(axis=(0, 1)))
    r = np.flatnonzero(any_row)
    c = np.flatnonzero(any_col)
    r0, r1 = max(0, (int(r[0]) - 1) * factor), min(rows, (int(r[-1]) + 2) * factor)
    c0, c1 = max(0, (int(c[0]) - 1) * factor), min(cols, (int(c[-1]) + 2) * factor)
    return slice(r0, r1), slice(c0, c1)


# Voxel categories of one bincount: side (2 bits) + 4 x (aerated, opacity, ground glass,
# consolidation, core) bits; every count the figures need is a sum over some of the codes.
_AERATED: Final = 1
_OPACITY: Final = 2
_GROUND_GLASS: Final = 4
_CONSOLIDATION: Final = 8
_CORE: Final = 16
_CODES: Final = 128


def _coded_counts(xp: ModuleType, code: Any, lung: Any, hu: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per slice, the voxel count of each code and the HU sum per side: ((n, 64), (n, 4))."""
    n = code.shape[0]
    offset = xp.arange(n, dtype=xp.int32).reshape(-1, 1, 1)
    index = (code.astype(xp.int32) + _CODES * offset)[lung]
    counts = xp.bincount(index, minlength=_CODES * n)
    side = (code & 3).astype(xp.int32) + 4 * offset
    hu_sum = xp.bincount(side[lung], weights=hu[lung].astype(xp.float64), minlength=4 * n)
    return (_host(xp, counts).reshape(n, _CODES).astype(np.int64),
            _host(xp, hu_sum).reshape(n, 4))


def _select(counts: np.ndarray, sides: list[int], bits: int = 0) -> np.ndarray:
    """Per slice, the voxels of the given sides that have all ``bits`` set."""
    codes = [c for c in range(_CODES) if (c & 3) in sides and (c >> 2) & bits == bits]
    return counts[:, codes].sum(axis=1)


def opacities(hu: Any, lung: Any, pixel_mm: float, *, xp: ModuleType = np,
              top_open: bool = False, bottom_open: bool = False) -> tuple[Any, Any, Any]:
    """Steps 1-4 of the module docstring on a stack: (cores, opacities, solid) boolean masks.

    ``lung`` is the lung mask of the same stack; the first and last slices count as lung
    surfaces unless ``top_open`` / ``bottom_open`` say the stack continues beyond them."""
    rim, core_size = _odd(RIM_MM / pixel_mm), _odd(CORE_MM / pixel_mm)
    grow, dense_size = _odd(2 * GROW_MM / pixel_mm), _odd(CONSOLIDATION_CORE_MM / pixel_mm)
    inner = lung.copy()
    inner[1:] &= lung[:-1]
    inner[:-1] &= lung[1:]
    if not top_open:
        inner[0] = False  # the first slice's cranial neighbour is unknown
    if not bottom_open:
        inner[-1] = False
    solid = hu >= CONSOLIDATION_HU
    candidate = (hu >= LESION_LOW_HU) & ~solid & inner & ~mo.dilate(xp, solid, rim)
    dense = solid & (hu <= CONSOLIDATION_MAX_HU) & inner
    core = mo.open_(xp, candidate, core_size) | mo.open_(xp, dense, dense_size)
    opacity = mo.dilate(xp, core, grow) & (hu >= LESION_LOW_HU) & (
        hu <= CONSOLIDATION_MAX_HU) & inner
    return core, opacity, solid


def quantify(volume_hu: Any, segmentation: LungSegmentation, slice_mm: float | None, *,
             slice_thickness_mm: float | None = None, missing_slices: int = 0,
             xp: ModuleType = np, series_uid: str = "") -> Quantification:
    """Measure the lungs of ``segmentation`` in ``volume_hu`` ((slices, rows, cols) HU).

    ``slice_mm`` is the spacing between slices along the normal (volumes need it);
    ``slice_thickness_mm`` the reconstructed thickness (Slice Thickness; the spacing when
    absent); ``missing_slices`` how many slices gaps in the series leave out (no volume then).
    """
    n = segmentation.shape[0]
    empty = np.zeros(n, np.int64)
    if segmentation.reason is not None:
        return Quantification(METHOD, empty, empty, empty, None, None, None, slice_mm,
                              reason=segmentation.reason)
    volume = xp.asarray(volume_hu)
    rows, cols = segmentation.shape[1], segmentation.shape[2]
    px = float(min(segmentation.pixel_mm))
    counts = np.zeros((n, _CODES), np.int64)
    hu_sums = np.zeros((n, 4), np.float64)
    for start in range(0, n, CHUNK_SLICES):
        stop = min(n, start + CHUNK_SLICES)
        lo, hi = max(0, start - 1), min(n, stop + 1)
        if not bool((segmentation.labels[lo:hi] > 0).any()):
            continue  # no lung in these slices: all counts stay 0
        rr, cc = _bbox(xp, segmentation.labels[lo:hi], segmentation.factor, rows, cols)
        sides = segmentation.full(xp, lo, hi)[:, rr, cc]
        hu = volume[lo:hi, rr, cc]
        lung = sides > 0
        core, opacity, solid = opacities(hu, lung, px, xp=xp, top_open=lo > 0,
                                         bottom_open=hi < n)
        aerated = (hu >= WELL_AERATED_HU) & (hu < GROUND_GLASS_HU)
        ground_glass = opacity & (hu >= GROUND_GLASS_HU) & ~solid
        code = (sides.astype(xp.uint8)
                | (aerated.astype(xp.uint8) << 2) | (opacity.astype(xp.uint8) << 3)
                | (ground_glass.astype(xp.uint8) << 4) | ((opacity & solid).astype(xp.uint8) << 5)
                | (core.astype(xp.uint8) << 6))
        keep = slice(start - lo, start - lo + (stop - start))
        counts[start:stop], hu_sums[start:stop] = _coded_counts(xp, code[keep], lung[keep],
                                                                hu[keep])
    all_sides = [RIGHT, LEFT, BOTH]
    warnings = list(segmentation.warnings)
    voxel_ml = None if slice_mm is None else (
        segmentation.pixel_mm[0] * segmentation.pixel_mm[1] * slice_mm / 1000.0)
    if segmentation.partial_coverage:
        voxel_ml = None  # the mask is right, the whole lung's volume is not in the series
    if missing_slices:
        voxel_ml = None
        warnings.append(f"about {missing_slices} slice(s) missing in gaps: no volume reported")
    thickness = slice_thickness_mm or slice_mm
    patterns = thickness is None or thickness <= MAX_SLICE_MM
    if not patterns:
        warnings.append(f"slices {thickness:g} mm thick (more than {MAX_SLICE_MM:g}): partial "
                        "volume makes vessels look like ground glass, so no pattern shares or "
                        "involvement are reported")

    def figures(sides: list[int]) -> LungFigures | None:
        lung = float(_select(counts, sides).sum())
        if lung <= 0:
            return None

        def pct(bits: int) -> float:
            return 100.0 * float(_select(counts, sides, bits).sum()) / lung

        ggo, cons = pct(_GROUND_GLASS), pct(_CONSOLIDATION)
        return LungFigures(
            volume_ml=None if voxel_ml is None else lung * voxel_ml,
            mean_hu=float(hu_sums[:, sides].sum()) / lung,
            well_aerated_percent=pct(_AERATED),
            ground_glass_percent=ggo if patterns else None,
            consolidation_percent=cons if patterns else None,
            involvement_percent=ggo + cons if patterns else None)

    lungs = figures(all_sides)
    result = Quantification(
        METHOD,
        lung_px=_select(counts, all_sides),
        core_px=_select(counts, all_sides, _CORE),
        opacity_px=_select(counts, all_sides, _OPACITY),
        lungs=lungs, right=figures([RIGHT]), left=figures([LEFT]), slice_mm=slice_mm,
        warnings=tuple(warnings))
    if lungs is not None:
        log.info("series %s: lungs %s ml, involvement %s %%", series_uid,
                 "n/a" if lungs.volume_ml is None else f"{lungs.volume_ml:.0f}",
                 "n/a" if lungs.involvement_percent is None else
                 f"{lungs.involvement_percent:.2f}")
    for message in warnings[len(segmentation.warnings):]:
        log.warning("series %s: %s", series_uid, message)
    return result
