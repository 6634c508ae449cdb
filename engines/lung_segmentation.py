"""Lung segmentation of a CT series volume in Hounsfield units: right and left lung, airways out.

Written once against an array module (``xp``: NumPy + SciPy on the CPU, CuPy +
``cupyx.scipy.ndimage`` on the GPU), like :mod:`engines.lung_xp`. It works on the whole series,
``(slices, rows, columns)`` in cranio-caudal order (:func:`engines.series.order_slices`), on a
working grid of about :data:`WORK_PIXEL_MM` per pixel (the 512 x 512 slices of a chest CT are
averaged 2 x 2), because connectivity across slices is what separates the lungs from bowel gas
and the trachea from the bronchi, and a per-slice 8-bit method cannot see it.

Steps (every threshold is a named constant below, with its reason):

1. **Air inside the body.** Pixels below :data:`AIR_HU` that are not 4-connected, within their
   slice, to the edge of the image (the air around the patient and under the table).
2. **Airways and gas out.** Within each slice, a small component (below
   :data:`AIRWAY_MAX_AREA_MM2`) of which at least :data:`AIRWAY_DARK_FRACTION` lies below
   :data:`AIRWAY_LUMEN_HU` is an airway lumen (trachea, main bronchi) or gas, not lung
   parenchyma, which is -950..-700 HU on average. In the slices above the hilum this removes
   the trachea and the main bronchi, which would otherwise join the two lungs.
3. **The lungs.** 3-D components (6-connected) of what is left; the largest, and the second
   when it holds at least :data:`SECOND_LUNG_FRACTION` of the first. Smaller ones (bowel gas,
   the oesophagus, cavities of the table) are dropped.
4. **Right and left.** Two components are the two lungs. One component (lungs touching at the
   anterior junction line or through a bronchus) is eroded within each slice until it splits
   into two parts of at least :data:`SECOND_LUNG_FRACTION` of the whole; the rest of the mask
   is then grown back from both parts inside the mask. The side comes from Image Orientation
   (Patient): the lung at higher columns is the patient's left when the row direction points
   to the patient's left (+x in DICOM's LPS frame).
5. **Each lung closed on its own, then holes filled.** A square closing of
   :data:`CLOSE_MM` puts back vessels and opacities that touch the lung border and the bays
   between them; holes (vessels, opacities inside the lung) are filled slice by slice. Closing
   both lungs together would bridge the mediastinum and take the heart and the aorta in
   (measured: 8 % "consolidation" in a normal series).

Bad series are refused with a reason instead of a wrong number (:class:`LungSegmentation`
``reason``): no lungs in view (below :data:`MIN_LUNG_ML`), slice spacing unknown. Partial
coverage (lung on the first or last slice) and gaps are *warnings*: the lung mask is right, the
volume is not the whole lung's, and :mod:`engines.quantitative` reports no volume then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import numpy as np

from engines import morphology as mo

__all__ = [
    "BOTH",
    "LEFT",
    "RIGHT",
    "LungSegmentation",
    "segment",
    "working_factor",
]

log = logging.getLogger(__name__)

RIGHT: Final = 1
"""Label of the patient's right lung."""
LEFT: Final = 2
"""Label of the patient's left lung."""
BOTH: Final = 3
"""Label of lungs that could not be told apart (per-lung figures are then missing)."""

WORK_PIXEL_MM: Final = 1.25
"""Target pixel size of the working grid: 512 x 512 slices of 0.6-0.8 mm pixels are averaged
2 x 2. Lungs and airways are many millimetres wide; connectivity and closing need no more."""
AIR_HU: Final = -450.0
"""Air-containing lung vs soft tissue. Aerated lung is -950..-700 HU, soft tissue and blood
+20..+60; -320 sits between, on the tissue side of the lung's partial-volume edge (the
threshold of the issue's probe). What this choice changes is measured in the card."""
AIRWAY_LUMEN_HU: Final = -950.0
"""Airway lumen is air (about -1000 HU); lung parenchyma averages about -850 (LAA-950, the
emphysema index, counts lung below -950 as abnormal)."""
AIRWAY_DARK_FRACTION: Final = 0.1
"""A small 2-D component is an airway when at least this share of it is below
:data:`AIRWAY_LUMEN_HU`: trachea sections measure 0.13-0.70 on the working grid, apical lung
sections 0.00-0.03 (the three labelled series)."""
AIRWAY_MAX_AREA_MM2: Final = 2500.0
"""Larger 2-D components are lung (the trachea is 150-300 mm2 in cross-section)."""
SECOND_LUNG_FRACTION: Final = 0.15
"""The second 3-D component is the other lung when it holds at least this share of the first
(the left lung is about 45 % of both, a stomach bubble a few per cent)."""
MIN_LUNG_ML: Final = 50.0
"""Less lung than this in the series is no lungs in view (an abdomen or a head series)."""
CLOSE_MM: Final = 10.0
"""Side of the square closing of each lung."""
MAX_HOLE_MM2: Final = 2000.0
"""Holes of a lung section up to this area are filled (vessels, opacities inside the lung);
larger ones are what the lung wraps around, such as the diaphragm dome with the stomach or
the liver below it (seen in the 8 mm lung-cancer series)."""
MAX_SPLIT_EROSIONS: Final = 12
"""Erosions (one working pixel each) tried to split lungs that touch, about 15 mm."""
PARTIAL_COVERAGE_FRACTION: Final = 0.1
"""Lung on the first or last slice larger than this share of the largest lung section means
the series does not cover the whole lung."""


@dataclass(frozen=True)
class LungSegmentation:
    """The lungs of one series.

    Attributes:
        labels: uint8 ``(slices, rows // factor, cols // factor)`` on the working grid:
            0 outside, :data:`RIGHT`, :data:`LEFT` (or :data:`BOTH` when they could not be
            told apart); in the array module it was computed with.
        factor: working grid = full grid / factor (2 for 512 x 512 chest CT).
        shape: the full-resolution volume's shape.
        pixel_mm: (row, column) spacing of the full grid, mm.
        reason: why the series has no usable lungs, or None.
        warnings: what limits the numbers (partial coverage, one lung only, ...).
        partial_coverage: the lungs reach the first or the last slice.
    """

    labels: Any
    factor: int
    shape: tuple[int, int, int]
    pixel_mm: tuple[float, float]
    reason: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    partial_coverage: bool = False

    def full(self, xp: ModuleType, start: int = 0, stop: int | None = None) -> Any:
        """Labels of slices ``start:stop`` on the full grid (nearest neighbour; edge rows and
        columns beyond the working grid are outside)."""
        part = self.labels[start:stop]
        if self.factor > 1:
            part = xp.repeat(xp.repeat(part, self.factor, axis=1), self.factor, axis=2)
        rows, cols = self.shape[1], self.shape[2]
        if part.shape[1:] != (rows, cols):
            out = xp.zeros((part.shape[0], rows, cols), dtype=part.dtype)
            out[:, : part.shape[1], : part.shape[2]] = part
            part = out
        return part


def working_factor(pixel_mm: float) -> int:
    """Integer pooling factor that brings ``pixel_mm`` near :data:`WORK_PIXEL_MM`."""
    return max(1, int(np.floor(WORK_PIXEL_MM / pixel_mm + 0.5)))


def _pool(xp: ModuleType, volume: Any, factor: int) -> Any:
    """Sums over ``factor x factor`` blocks of each slice (int32; compare with thresholds
    times ``factor ** 2``); rows and columns that do not fill a block are dropped."""
    _, rows, cols = volume.shape
    r, c = rows // factor * factor, cols // factor * factor
    v = volume[:, :r, :c]
    sums = v[:, :, 0::factor].astype(xp.int32)
    for j in range(1, factor):
        sums += v[:, :, j::factor]
    total = sums[:, 0::factor].copy()
    for i in range(1, factor):
        total += sums[:, i::factor]
    return total


def _internal_air(xp: ModuleType, grid: Any, scale: int,
                  pixel_area: float) -> tuple[Any, Any]:
    """Steps 1-2: (air inside the body without airway lumens and gas, air outside the body).
    ``grid`` holds sums of ``scale`` full-grid pixels. One in-plane labelling serves both: a
    component touching the slice edge is outside air, a small dark one an airway or gas."""
    air = grid < AIR_HU * scale
    labels, count = mo.label(xp, air)
    outside_label = mo.border_labels(xp, labels, count)
    flat = labels.ravel()
    size = xp.bincount(flat, minlength=count + 1)
    dark = xp.bincount(labels[grid < AIRWAY_LUMEN_HU * scale], minlength=count + 1)
    airway = (size * pixel_area < AIRWAY_MAX_AREA_MM2) & (
        dark >= AIRWAY_DARK_FRACTION * xp.maximum(size, 1))
    # label 0 is the tissue (border_labels marks it), so "kind" is 0 there: neither set
    kind = xp.where(outside_label, 1, xp.where(airway, 0, 2)).astype(xp.uint8)
    kind[0] = 0
    per_voxel = kind[labels]
    return per_voxel == 2, per_voxel == 1


def _largest(xp: ModuleType, mask: Any) -> tuple[list[Any], Any]:
    """Boolean masks of the 3-D components of ``mask`` by decreasing size, and their sizes."""
    labels, count = mo.label(xp, mask, mo.SPACE6)
    if count == 0:
        return [], xp.zeros(0)
    size = xp.bincount(labels.ravel(), minlength=count + 1)
    size[0] = 0
    order = xp.argsort(-size)
    top = [int(k) for k in order[:2].tolist() if int(size[int(k)]) > 0]
    return [labels == k for k in top], size[order[: len(top)]]


def _split(xp: ModuleType, lungs: Any) -> tuple[Any, Any] | None:
    """Step 4 for one component holding both lungs: two seeds by erosion (on a grid twice as
    coarse, which halves the erosions and the labelling), grown back inside the mask."""
    coarse = lungs[:, ::2, ::2]
    seeds: tuple[Any, Any] | None = None
    steps = 0
    while seeds is None and steps < MAX_SPLIT_EROSIONS // 2:
        steps += 1
        coarse = mo.erode(xp, coarse, 3)
        parts, sizes = _largest(xp, coarse)
        if len(parts) == 2 and float(sizes[1]) >= SECOND_LUNG_FRACTION * float(sizes[0]):
            seeds = (parts[0], parts[1])
    if seeds is None:
        return None
    rows, cols = lungs.shape[1], lungs.shape[2]

    def fine(seed: Any) -> Any:
        up = xp.repeat(xp.repeat(seed, 2, axis=1), 2, axis=2)[:, :rows, :cols]
        return up & lungs

    a, b = fine(seeds[0]), fine(seeds[1])
    for _ in range(2 * steps + 2):
        grow_a = mo.dilate(xp, a, 3) & lungs & ~b
        grow_b = mo.dilate(xp, b, 3) & lungs & ~a
        contested = grow_a & grow_b
        a, b = (grow_a & ~contested) | a, (grow_b & ~contested) | b
    rest = lungs & ~a & ~b
    if bool(rest.any()):
        # What growing did not reach (thin strands): the side of the nearer seed's centre.
        col = xp.arange(cols, dtype=xp.float32)
        nearer_a = xp.abs(col - _centre_column(xp, a)) <= xp.abs(col - _centre_column(xp, b))
        a = a | (rest & nearer_a[None, None, :])
        b = b | (rest & ~nearer_a[None, None, :])
    return a, b


def _box(xp: ModuleType, mask: Any, margin: int) -> tuple[slice, slice, slice]:
    """The rows and columns that hold ``mask``, widened by ``margin`` pixels (all slices)."""
    rows = np.flatnonzero(np.asarray(_host(xp, mask.any(axis=(0, 2)))))
    cols = np.flatnonzero(np.asarray(_host(xp, mask.any(axis=(0, 1)))))
    r0, r1 = max(0, int(rows[0]) - margin), min(mask.shape[1], int(rows[-1]) + 1 + margin)
    c0, c1 = max(0, int(cols[0]) - margin), min(mask.shape[2], int(cols[-1]) + 1 + margin)
    return slice(None), slice(r0, r1), slice(c0, c1)


def _host(xp: ModuleType, a: Any) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a)


def _centre_column(xp: ModuleType, mask: Any) -> float:
    cols = xp.arange(mask.shape[2], dtype=xp.float32)
    return float((mask.sum(axis=(0, 1)) * cols).sum() / max(int(mask.sum()), 1))


def segment(volume_hu: Any, pixel_mm: tuple[float, float], slice_mm: float | None, *,
            left_at_higher_columns: bool = True, xp: ModuleType = np,
            series_uid: str = "") -> LungSegmentation:
    """Segment the lungs of a series.

    Args:
        volume_hu: ``(slices, rows, columns)`` HU (int16 or float), cranio-caudal order.
        pixel_mm: Pixel Spacing (row, column), mm.
        slice_mm: distance between neighbouring slices along the normal, mm (None: unknown).
        left_at_higher_columns: Image Orientation (Patient)'s row direction points to the
            patient's left (its x component is positive), as in a standard axial series.
        xp: ``numpy`` or ``cupy``; ``volume_hu`` may already live there.
        series_uid: for log messages.
    """
    volume = xp.asarray(volume_hu)
    shape = (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))
    factor = working_factor(float(min(pixel_mm)))
    grid = _pool(xp, volume, factor)
    empty = xp.zeros(grid.shape, dtype=xp.uint8)

    def refused(reason: str) -> LungSegmentation:
        log.warning("series %s: no lung segmentation: %s", series_uid, reason)
        return LungSegmentation(empty, factor, shape, pixel_mm, reason=reason)

    if slice_mm is None or not slice_mm > 0:
        return refused("slice spacing unknown (no usable Image Position (Patient) or "
                       "Slice Location): volumes cannot be measured")
    pixel_area = pixel_mm[0] * pixel_mm[1] * factor * factor
    voxel_ml = pixel_area * slice_mm / 1000.0
    scale = factor * factor
    internal, outside = _internal_air(xp, grid, scale, pixel_area)
    parts, sizes = _largest(xp, internal)
    if not parts or float(sizes[0]) * voxel_ml < MIN_LUNG_ML:
        found = float(sizes[0]) * voxel_ml if parts else 0.0
        return refused(f"no lungs in view ({found:.0f} ml of air-containing tissue inside the "
                       f"body, at least {MIN_LUNG_ML:.0f} ml needed)")
    warnings: list[str] = []
    if len(parts) == 2 and float(sizes[1]) >= SECOND_LUNG_FRACTION * float(sizes[0]):
        pair: tuple[Any, Any] | None = (parts[0], parts[1])
    else:
        pair = _split(xp, parts[0])
    if pair is None:
        warnings.append("one lung region only (the lungs could not be told apart): both are "
                        "reported together, per-lung figures are missing")
        sides = [(parts[0], BOTH)]
    else:
        a, b = pair
        a_left = (_centre_column(xp, a) > _centre_column(xp, b)) == left_at_higher_columns
        sides = [(a, LEFT if a_left else RIGHT), (b, RIGHT if a_left else LEFT)]
    close_px = max(1, round(CLOSE_MM / (min(pixel_mm) * factor)))
    max_hole = int(MAX_HOLE_MM2 / pixel_area)
    labels = xp.zeros(grid.shape, dtype=xp.uint8)
    taken = xp.zeros(grid.shape, dtype=bool)
    for mask, value in sides:
        box = _box(xp, mask, close_px)
        part = mask[box]
        closed = mo.fill_holes(xp, mo.close(xp, part, close_px) | part, max_hole) & ~taken[box] & (
            ~outside[box])
        labels[box][closed] = value
        taken[box] |= closed
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    largest = float(per_slice.max())
    partial = bool(float(per_slice[0]) > PARTIAL_COVERAGE_FRACTION * largest
                   or float(per_slice[-1]) > PARTIAL_COVERAGE_FRACTION * largest)
    if partial:
        ends = [name for name, k in (("apex (first slice)", 0), ("base (last slice)", -1))
                if float(per_slice[k]) > PARTIAL_COVERAGE_FRACTION * largest]
        warnings.append("the series does not cover the whole lungs: lung reaches the "
                        + " and the ".join(ends))
    for message in warnings:
        log.warning("series %s: %s", series_uid, message)
    return LungSegmentation(labels, factor, shape, pixel_mm, warnings=tuple(warnings),
                            partial_coverage=partial)
