"""Binary morphology on slice stacks, written once against an array module (NumPy or CuPy).

The quantitative lung CT (:mod:`engines.lung_segmentation`, :mod:`engines.quantitative`) works
on whole series, ``(slices, rows, columns)`` boolean stacks, always *within* each slice: the
structuring elements are rectangles of ``(1, height, width)``. SciPy's ``maximum_filter`` does
that at about 14 ns per voxel and pass on this machine's CPU, too slow for 100 slices/s at
512 x 512, so the filters here are built from shifted boolean ``or`` / ``and`` of the stack with
itself: a window of width ``w`` is the combination of two windows of width ``w/2``, so a
``k``-wide filter costs about ``log2(k)`` vectorised passes per axis. The same code runs on the
GPU with ``xp = cupy``.

Borders: outside the image counts as background (``False``) for dilation *and* erosion, so an
erosion never grows a structure that touches the image edge.

Connected components use ``scipy.ndimage`` / ``cupyx.scipy.ndimage`` (:func:`ndimage_for`)
with in-plane structures (:data:`PLANE4`), so labels never link two slices unless asked.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Final

import numpy as np

__all__ = [
    "PLANE4",
    "close",
    "dilate",
    "erode",
    "fill_holes",
    "label",
    "ndimage_for",
    "open_",
]

#: In-plane 4-connectivity as a 3-D structure: components never link two slices.
PLANE4: Final = np.zeros((3, 3, 3), dtype=bool)
PLANE4[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
#: 3-D 6-connectivity (faces only).
SPACE6: Final = np.zeros((3, 3, 3), dtype=bool)
SPACE6[1] = PLANE4[1]
SPACE6[0, 1, 1] = SPACE6[2, 1, 1] = True


def ndimage_for(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy (imported on first use)."""
    return importlib.import_module("scipy.ndimage" if xp is np else "cupyx.scipy.ndimage")


def _window(xp: ModuleType, a: Any, size: int, axis: int, union: bool) -> Any:
    """``or`` (``union``) or ``and`` of ``a`` over a centred window of ``size`` along ``axis``;
    outside the array counts as ``False``."""
    if size <= 1:
        return a
    radius = size // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius, size - 1 - radius)
    out = xp.pad(a, pad, mode="constant", constant_values=False)
    # out[j] holds the window [j, j + width) of the padded array; each pass doubles the width
    # (at most) and shortens the array by the step, ending at the input's length exactly.
    width = 1
    head = [slice(None)] * a.ndim
    tail = [slice(None)] * a.ndim
    while width < size:
        step = min(width, size - width)
        head[axis] = slice(0, out.shape[axis] - step)
        tail[axis] = slice(step, None)
        out = out[tuple(head)] | out[tuple(tail)] if union else (
            out[tuple(head)] & out[tuple(tail)])
        width += step
    return out


def dilate(xp: ModuleType, mask: Any, height: int, width: int | None = None) -> Any:
    """Dilation of each slice of a boolean ``(n, rows, cols)`` stack by a ``height x width``
    rectangle centred on the pixel (odd sizes; even sizes extend one more pixel down/right)."""
    width = height if width is None else width
    return _window(xp, _window(xp, mask, height, 1, True), width, 2, True)


def erode(xp: ModuleType, mask: Any, height: int, width: int | None = None) -> Any:
    """Erosion of each slice by a ``height x width`` rectangle (outside the image = False)."""
    width = height if width is None else width
    return _window(xp, _window(xp, mask, height, 1, False), width, 2, False)


def open_(xp: ModuleType, mask: Any, size: int) -> Any:
    """Opening (erosion then dilation) by a ``size x size`` square: removes every part of the
    mask narrower than ``size`` pixels in both directions of the slice."""
    return dilate(xp, erode(xp, mask, size), size)


def close(xp: ModuleType, mask: Any, size: int) -> Any:
    """Closing (dilation then erosion) by a ``size x size`` square: fills gaps and bays
    narrower than ``size`` pixels."""
    return erode(xp, dilate(xp, mask, size), size)


def label(xp: ModuleType, mask: Any, structure: np.ndarray = PLANE4) -> tuple[Any, int]:
    """Connected components of a boolean stack (default: within each slice)."""
    labels, count = ndimage_for(xp).label(mask, structure=xp.asarray(structure))
    return labels, int(count)


def border_labels(xp: ModuleType, labels: Any, count: int) -> Any:
    """Boolean ``(count + 1,)``: which labels touch the edge of their slice (label 0 too)."""
    touching = xp.zeros(count + 1, dtype=bool)
    touching[0] = True
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        touching[edge.ravel()] = True
    return touching


def fill_holes(xp: ModuleType, mask: Any, max_area: int | None = None) -> Any:
    """Each slice's mask with its holes filled: background not 4-connected to the slice edge,
    only holes of at most ``max_area`` pixels when given."""
    labels, count = label(xp, ~mask)
    hole = ~border_labels(xp, labels, count)
    if max_area is not None:
        hole &= xp.bincount(labels.ravel(), minlength=count + 1) <= max_area
    return mask | hole[labels]
