"""Pixel pre-processing: DICOM slice -> Hounsfield units -> lung window -> 8-bit grey.

HUST-19 (Ning et al., Nat. Biomed. Eng. 2020) was trained on 8-bit JPEG slices exported from the
hospitals' PACS. The agent receives DICOM, so each slice is first turned into Hounsfield units
(HU) and then windowed to 8 bits with a fixed lung window, so that DICOM series and the public
PNG/JPEG slices the slice network is trained on look alike (docs/models/slice.md,
"Pre-processing", has the measured comparison that chose the window).

Public functions:

- :func:`to_hu`: stored values -> float32 HU (rescale slope/intercept; padding and
  out-of-field-of-view markers -> air).
- :func:`window`: HU -> uint8 with a window centre/width (default: the lung window below).
- :func:`dataset_to_u8`: both in one.
- :func:`load_image_u8`: a public PNG/JPEG slice (grey, RGB or RGBA) -> uint8 grey, read the
  way the original HUST-19 code read its slices (OpenCV, grey).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import pydicom

from schemas.errors import DicomInputError, InputError

__all__ = [
    "AIR_HU",
    "LUNG_WINDOW_CENTER",
    "LUNG_WINDOW_WIDTH",
    "MIN_PHYSICAL_HU",
    "dataset_to_u8",
    "load_image_u8",
    "to_hu",
    "window",
]

logger = logging.getLogger(__name__)

#: Lung window centre (HU). -600 / 1200 is the lung window the scanners of both DICOM sources here
#: store in (0028,1050)/(0028,1051) as their second preset, and it made the lung-region grey levels
#: of the DICOM series closest to the public COVID-CT slices among the windows compared (see
#: docs/models/slice.md, "Pre-processing").
LUNG_WINDOW_CENTER: Final[float] = -600.0
#: Lung window width (HU): the window spans [-1200, 0] HU.
LUNG_WINDOW_WIDTH: Final[float] = 1200.0

#: Air in HU; what padding pixels become.
AIR_HU: Final[float] = -1000.0
#: Lowest HU that is physical (air is about -1000; -1024 is the usual stored minimum). Scanners
#: mark pixels outside the reconstructed field of view with values such as -2048 or -3024 without
#: always declaring Pixel Padding Value; those are clamped to this value so they window like air.
MIN_PHYSICAL_HU: Final[float] = -1024.0

_U8_MAX: Final[int] = 255
_PIXEL_DATA: Final[str] = "PixelData (7FE0,0010)"
_SIGNED: Final[int] = 1  # Pixel Representation 1 = two's complement


def _uid(ds: pydicom.Dataset) -> str:
    """The SOP Instance UID for messages, or a placeholder when the dataset has none."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    return uid or "<no SOPInstanceUID>"


def _as_signed(value: int, bits: int) -> int:
    """Reinterpret an unsigned read of a padding value as two's complement of ``bits`` bits."""
    if value >= 1 << (bits - 1):
        return value - (1 << bits)
    return value


def _padding_mask(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels equal to Pixel Padding Value, or within [value, range limit] when a limit is given.

    The comparison is on stored values (before rescale), as PS3.3 C.7.5.1.1.2 defines it. A padding
    value read as unsigned for a signed image (VR US/SS ambiguity) is reinterpreted as signed.
    """
    if "PixelPaddingValue" not in ds:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == _SIGNED
    bits = int(ds.get("BitsAllocated", 16))
    pad = int(ds.PixelPaddingValue)
    if signed:
        pad = _as_signed(pad, bits)
    if "PixelPaddingRangeLimit" in ds:
        limit = int(ds.PixelPaddingRangeLimit)
        if signed:
            limit = _as_signed(limit, bits)
        low, high = min(pad, limit), max(pad, limit)
        return (stored >= low) & (stored <= high)
    return stored == pad


def to_hu(ds: pydicom.Dataset) -> np.ndarray:
    """Decode one CT slice and return it in Hounsfield units (float32, 2-D).

    HU = stored * RescaleSlope + RescaleIntercept (defaults 1 and 0 when absent). Pixels marked by
    Pixel Padding Value (and Pixel Padding Range Limit) become air (:data:`AIR_HU`); anything below
    :data:`MIN_PHYSICAL_HU` (undeclared out-of-field markers) is clamped to it.

    Raises:
        DicomInputError: no pixel data, pixel data that cannot be decoded, more than one frame,
            or an unusable rescale value; the message names the SOP Instance UID and the field.
    """
    uid = _uid(ds)
    if "PixelData" not in ds:
        raise DicomInputError(f"SOP Instance {uid}: missing {_PIXEL_DATA}")
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types (ValueError, RuntimeError, plugin errors)
        raise DicomInputError(f"SOP Instance {uid}: cannot decode {_PIXEL_DATA}: {exc}") from exc
    if stored.ndim == 3 and stored.shape[0] == 1:
        stored = stored[0]
    if stored.ndim != 2:
        raise DicomInputError(
            f"SOP Instance {uid}: {_PIXEL_DATA} has shape {stored.shape}; one 2-D slice expected"
        )
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise DicomInputError(
            f"SOP Instance {uid}: unusable RescaleSlope (0028,1053) / RescaleIntercept (0028,1052)"
        ) from exc
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = _padding_mask(ds, stored)
    if padding is not None:
        hu[padding] = AIR_HU
    np.maximum(hu, np.float32(MIN_PHYSICAL_HU), out=hu)
    return hu


def window(
    hu: np.ndarray,
    center: float = LUNG_WINDOW_CENTER,
    width: float = LUNG_WINDOW_WIDTH,
) -> np.ndarray:
    """Map HU linearly onto 0..255: ``center - width/2`` -> 0, ``center + width/2`` -> 255, clipped.

    Works on any shape (one slice or a stack). Rounds to nearest.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(_U8_MAX / width)
    return np.clip(np.rint(scaled), 0, _U8_MAX).astype(np.uint8)


def dataset_to_u8(ds: pydicom.Dataset) -> np.ndarray:
    """:func:`to_hu` then :func:`window` with the lung window: the network's grey slice."""
    return window(to_hu(ds))


def load_image_u8(path: Path) -> np.ndarray:
    """Read a public PNG/JPEG CT slice as uint8 grey (H, W).

    Grey, RGB and RGBA files are converted the way the original HUST-19 code read its slices
    (``cv2.imdecode(..., IMREAD_GRAYSCALE)``: luminance of RGB, alpha ignored); 16-bit files are
    scaled to 8 bits by OpenCV.

    Raises:
        InputError: the file cannot be read or is not an image; the message names the file.
    """
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"{path}: cannot read image file: {exc}") from exc
    image = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE) if raw.size else None
    if image is None:
        raise InputError(f"{path}: not a readable PNG/JPEG image")
    return np.ascontiguousarray(image, dtype=np.uint8)
