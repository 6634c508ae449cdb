"""Series assembly: put the slices of one CT series in cranio-caudal order.

File names and Instance Numbers do not reliably follow anatomy, so the order comes from geometry:
each slice's Image Position (Patient) projected on the slice normal (the cross product of the two
Image Orientation (Patient) direction cosines). Index 0 is the most cranial slice (patient +z in
DICOM's LPS frame is superior), the convention of the slice labels in ``../shared/data``.

The function never raises on odd geometry; it reports it:

- gantry tilt (the slice-to-slice step is not along the normal, or Gantry/Detector Tilt is set):
  ordering along the normal is still right; ``tilt`` is True and a warning says so;
- missing slices (a step clearly larger than the typical spacing): listed in ``gaps``;
- duplicate positions: kept, ordered by Instance Number, with a warning;
- missing or inconsistent geometry: falls back to Slice Location, then Instance Number, then
  the input order, and says which in ``method`` and ``warnings``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pydicom

__all__ = ["SeriesOrder", "SliceGap", "order_slices"]

logger = logging.getLogger(__name__)

METHOD_GEOMETRY: Final = "geometry"
METHOD_SLICE_LOCATION: Final = "slice_location"
METHOD_INSTANCE_NUMBER: Final = "instance_number"
METHOD_INPUT_ORDER: Final = "input_order"

#: Two slices closer than this (mm) along the normal share a position (duplicates).
DUPLICATE_TOLERANCE_MM: Final[float] = 1e-3
#: A step longer than this many typical spacings means slices are missing.
GAP_FACTOR: Final[float] = 1.5
#: Sine of the largest angle between the slice step and the normal still counted as no tilt.
TILT_SINE_TOLERANCE: Final[float] = 0.01
#: Direction cosines of two slices that differ by more than this are not the same orientation.
ORIENTATION_TOLERANCE: Final[float] = 1e-3
#: Gantry/Detector Tilt (degrees) above this is reported.
GANTRY_TILT_TOLERANCE_DEG: Final[float] = 0.01


@dataclass(frozen=True)
class SliceGap:
    """Slices missing between ordered positions ``after`` and ``after + 1``."""

    after: int
    missing: int
    step_mm: float


@dataclass(frozen=True)
class SeriesOrder:
    """Cranio-caudal order of a series' slices.

    Attributes:
        indices: indices into the input, most cranial first.
        positions: each ordered slice's position along the ordering axis (mm for geometry and
            Slice Location; the Instance Number or input index otherwise).
        spacing: typical (median) distance between neighbouring positions, mm; None when unknown.
        gaps: where slices are missing.
        tilt: gantry tilt detected.
        method: what the order is based on (``geometry``, ``slice_location``,
            ``instance_number``, ``input_order``).
        warnings: human-readable findings (fallbacks, tilt, gaps, duplicates).
    """

    indices: tuple[int, ...]
    positions: tuple[float, ...]
    spacing: float | None
    gaps: tuple[SliceGap, ...] = ()
    tilt: bool = False
    method: str = METHOD_GEOMETRY
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _floats(ds: pydicom.Dataset, keyword: str, count: int) -> np.ndarray | None:
    """A multi-valued numeric attribute as floats, or None when absent or malformed."""
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        return None
    return values


def _number(ds: pydicom.Dataset, keyword: str) -> float | None:
    """A single numeric attribute as float, or None."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _instance_numbers(datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Instance Numbers (missing -> +inf, so those sort last but stably)."""
    numbers = [_number(ds, "InstanceNumber") for ds in datasets]
    return np.array([np.inf if n is None else n for n in numbers], dtype=np.float64)


def _geometry(datasets: Sequence[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray] | str:
    """(positions (N, 3), common normal (3,)), or the reason geometry cannot be used."""
    positions, orientations = [], []
    for k, ds in enumerate(datasets):
        ipp = _floats(ds, "ImagePositionPatient", 3)
        iop = _floats(ds, "ImageOrientationPatient", 6)
        if ipp is None or iop is None:
            return f"slice {k} lacks ImagePositionPatient/ImageOrientationPatient"
        positions.append(ipp)
        orientations.append(iop)
    iops = np.stack(orientations)
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOLERANCE:
        return "ImageOrientationPatient differs between slices"
    normal = np.cross(iops[0, :3], iops[0, 3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        return "ImageOrientationPatient row and column are not orthogonal unit vectors"
    return np.stack(positions), normal / norm


def _cranial_first(keys: np.ndarray, tie: np.ndarray, descending: bool) -> np.ndarray:
    """Indices sorted by ``keys`` (descending if asked), ties by ``tie`` ascending, stable."""
    primary = -keys if descending else keys
    return np.lexsort((np.arange(keys.size), tie, primary))


def _gaps(positions: np.ndarray) -> tuple[float | None, tuple[SliceGap, ...], int]:
    """Typical spacing, gaps and the number of duplicate neighbours of ordered positions."""
    if positions.size < 2:
        return None, (), 0
    steps = np.abs(np.diff(positions))
    duplicates = int(np.count_nonzero(steps <= DUPLICATE_TOLERANCE_MM))
    distinct = steps[steps > DUPLICATE_TOLERANCE_MM]
    if distinct.size == 0:
        return None, (), duplicates
    spacing = float(np.median(distinct))
    gaps = tuple(
        SliceGap(
            after=int(k), missing=round(float(steps[k]) / spacing) - 1, step_mm=float(steps[k])
        )
        for k in np.flatnonzero(steps > GAP_FACTOR * spacing)
    )
    return spacing, gaps, duplicates


def order_slices(datasets: Sequence[pydicom.Dataset]) -> SeriesOrder:
    """Order the slices of one series cranio-caudally (index 0 = most cranial). Never raises."""
    count = len(datasets)
    if count == 0:
        return SeriesOrder(indices=(), positions=(), spacing=None, method=METHOD_INPUT_ORDER)
    warnings: list[str] = []
    instance = _instance_numbers(datasets)
    geometry = _geometry(datasets)
    tilt = False
    if isinstance(geometry, tuple):
        ipp, normal = geometry
        along = ipp @ normal
        # +z (LPS) is superior: cranial first means descending along a normal that points up.
        descending = normal[2] >= 0
        if abs(normal[2]) < TILT_SINE_TOLERANCE:
            warnings.append("slices are not axial: cranio-caudal order is order along the normal")
        order = _cranial_first(along, instance, descending)
        positions = along[order]
        method = METHOD_GEOMETRY
        steps = np.diff(ipp[order], axis=0)
        lengths = np.linalg.norm(steps, axis=1)
        moving = lengths > DUPLICATE_TOLERANCE_MM
        if np.any(moving):
            across = np.linalg.norm(np.cross(steps[moving], normal), axis=1) / lengths[moving]
            if float(across.max()) > TILT_SINE_TOLERANCE:
                tilt = True
                warnings.append(
                    "gantry tilt: slice positions step off the slice normal by up to "
                    f"{np.degrees(np.arcsin(min(float(across.max()), 1.0))):.1f} degrees; "
                    "ordered along the normal"
                )
        tilts = [_number(ds, "GantryDetectorTilt") for ds in datasets]
        declared = max((abs(t) for t in tilts if t is not None), default=0.0)
        if declared > GANTRY_TILT_TOLERANCE_DEG:
            if not tilt:
                warnings.append(f"gantry tilt: GantryDetectorTilt is {declared:g} degrees")
            tilt = True
    else:
        warnings.append(f"geometry unusable ({geometry})")
        locations = [_number(ds, "SliceLocation") for ds in datasets]
        if all(loc is not None for loc in locations):
            keys = np.array(locations, dtype=np.float64)
            order = _cranial_first(keys, instance, descending=True)
            positions = keys[order]
            method = METHOD_SLICE_LOCATION
            warnings.append("ordered by SliceLocation (descending = cranial first)")
        elif np.all(np.isfinite(instance)):
            order = _cranial_first(instance, instance, descending=False)
            positions = instance[order]
            method = METHOD_INSTANCE_NUMBER
            warnings.append("ordered by InstanceNumber (ascending assumed cranial first)")
        else:
            order = np.arange(count)
            positions = order.astype(np.float64)
            method = METHOD_INPUT_ORDER
            warnings.append("no SliceLocation or InstanceNumber either: input order kept")
    spacing, gaps, duplicates = _gaps(positions) if method != METHOD_INPUT_ORDER else (None, (), 0)
    if method == METHOD_INSTANCE_NUMBER:
        spacing, gaps = None, ()  # instance numbers carry no distance
    if duplicates:
        warnings.append(f"{duplicates} slice(s) share a position with a neighbour")
    if gaps:
        missing = sum(g.missing for g in gaps)
        warnings.append(f"about {missing} slice(s) missing in {len(gaps)} gap(s)")
    series_uid = str(datasets[0].get("SeriesInstanceUID", "") or "<no SeriesInstanceUID>")
    for message in warnings:
        logger.warning("series %s (%d slices): %s", series_uid, count, message)
    return SeriesOrder(
        indices=tuple(int(i) for i in order),
        positions=tuple(float(p) for p in positions),
        spacing=spacing,
        gaps=gaps,
        tilt=tilt,
        method=method,
        warnings=tuple(warnings),
    )
