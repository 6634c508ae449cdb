"""A CT series as one volume in Hounsfield units, in cranio-caudal order, with its geometry.

The quantitative CT (:mod:`engines.lung_segmentation`, :mod:`engines.quantitative`) needs the
series as a volume; the worker receives it one instance at a time and ``hust19 predict`` reads
a folder. Both keep, per slice, the int16 HU pixels and a pixel-free header
(:func:`geometry_header`), and build the volume once with :func:`assemble` when the series is
complete: 2 bytes per pixel (0.5 MiB per 512 x 512 slice) is the memory a series costs, and
no instance copies what came before it.

Geometry comes from :func:`engines.series.order_slices` (Image Position/Orientation
(Patient), falling back to Slice Location): slice spacing, gaps, tilt. Slices of different
sizes or pixel spacings in one series are refused with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pydicom

from engines import preprocess, series
from schemas.errors import InputError

__all__ = ["GEOMETRY_KEYWORDS", "SeriesVolume", "assemble", "geometry_header", "hu_int16",
           "to_hu_int16"]

log = logging.getLogger(__name__)

GEOMETRY_KEYWORDS: Final = (
    "SOPInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
    "SliceLocation", "InstanceNumber", "PixelSpacing", "SliceThickness", "GantryDetectorTilt",
    "Rows", "Columns",
)
"""What :func:`geometry_header` keeps of an instance: enough to order and measure it."""
HU_MIN: Final = -1024
HU_MAX: Final = 32767


def geometry_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A small pixel-free copy of the attributes that place a slice in the series."""
    header = pydicom.Dataset()
    for keyword in GEOMETRY_KEYWORDS:
        if keyword in ds:
            setattr(header, keyword, ds[keyword].value)
    return header


def hu_int16(hu: np.ndarray) -> np.ndarray:
    """HU (float) rounded to int16, the form a volume keeps."""
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def to_hu_int16(ds: pydicom.Dataset) -> np.ndarray:
    """One slice in HU as int16 (:func:`engines.preprocess.to_hu`, rounded)."""
    return hu_int16(preprocess.to_hu(ds))


@dataclass(frozen=True)
class SeriesVolume:
    """The series in cranio-caudal order.

    Attributes:
        hu: int16 ``(slices, rows, columns)``.
        keys: the slice ids (SOP Instance UIDs, or what the caller passed) in the same order.
        pixel_mm: Pixel Spacing (row, column), mm.
        slice_mm: spacing between neighbouring slices along the normal, mm; None if unknown.
        thickness_mm: Slice Thickness, mm, when the instances state it.
        missing_slices: slices that the gaps in the series leave out.
        left_at_higher_columns: the row direction points to the patient's left.
        order: the full ordering result (method, gaps, tilt, warnings).
    """

    hu: np.ndarray
    keys: tuple[str, ...]
    pixel_mm: tuple[float, float]
    slice_mm: float | None
    thickness_mm: float | None
    missing_slices: int
    left_at_higher_columns: bool
    order: series.SeriesOrder
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _pixel_spacing(header: pydicom.Dataset) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in header.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def assemble(headers: Sequence[pydicom.Dataset], pixels: Sequence[np.ndarray],
             keys: Sequence[str], series_uid: str = "") -> SeriesVolume:
    """Order the slices and stack them into one volume.

    ``headers`` are the slices' datasets or :func:`geometry_header` copies, ``pixels`` their
    int16 HU arrays, ``keys`` their ids, all in the same (any) order.

    Raises:
        InputError: no slice, slices of different sizes or pixel spacings, no pixel spacing.
    """
    if not headers:
        raise InputError(f"series {series_uid}: no slice to assemble")
    if not len(headers) == len(pixels) == len(keys):
        raise InputError(f"series {series_uid}: {len(headers)} headers, {len(pixels)} pixel "
                         f"arrays, {len(keys)} keys")
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) != 1:
        raise InputError(f"series {series_uid}: slices of different sizes {sorted(shapes)}")
    spacings = {_pixel_spacing(h) for h in headers}
    if len(spacings) != 1 or None in spacings:
        raise InputError(f"series {series_uid}: Pixel Spacing (0028,0030) missing or not the "
                         f"same on every slice ({sorted(map(str, spacings))})")
    pixel_mm = next(iter(spacings))
    assert pixel_mm is not None
    order = series.order_slices(headers)
    volume = np.empty((len(pixels), *next(iter(shapes))), dtype=np.int16)
    for out_index, in_index in enumerate(order.indices):
        volume[out_index] = pixels[in_index]
    thickness = {float(h.SliceThickness) for h in headers
                 if h.get("SliceThickness") not in (None, "")}
    try:
        iop = [float(v) for v in headers[0].ImageOrientationPatient]
        left_at_higher = iop[0] >= 0
    except (AttributeError, TypeError, ValueError, IndexError):
        left_at_higher = True  # the usual axial orientation; said in the warnings
    slice_mm = order.spacing if order.method in (series.METHOD_GEOMETRY,
                                                 series.METHOD_SLICE_LOCATION) else None
    warnings = list(order.warnings)
    if "ImageOrientationPatient" not in headers[0]:
        warnings.append("no Image Orientation (Patient): the patient's left is assumed at "
                        "higher columns")
    return SeriesVolume(
        hu=volume, keys=tuple(keys[i] for i in order.indices), pixel_mm=pixel_mm,
        slice_mm=slice_mm, thickness_mm=max(thickness) if thickness else None,
        missing_slices=sum(g.missing for g in order.gaps),
        left_at_higher_columns=left_at_higher, order=order, warnings=tuple(warnings))
