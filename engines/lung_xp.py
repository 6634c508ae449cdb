"""HUST-19 lung extraction written once against an array module: NumPy on CPU, CuPy on GPU.

The algorithm is the one in :mod:`engines.lung` (the port of the original HUST-19 code); this
module runs it on a whole batch ``(N, H, W)`` at once with ``xp`` (``numpy`` or ``cupy``) and
``xp``'s ``ndimage`` (``scipy.ndimage`` or ``cupyx.scipy.ndimage``, imported lazily), so that
on a GPU the slices stay in device memory and the 200x200 crops feed the network without a
host round trip. Every stage is built to equal OpenCV's, not merely resemble it:

- adaptive mean threshold: OpenCV's box mean with a replicated border, as exact integer box sums
  (cumulative sums, any block size) rounded like OpenCV's ``saturate_cast`` (half to even);
- largest body component and the two largest holes: connected-component labelling with
  per-slice 4-/8-connectivity (a 3-D structure with no link between slices), the original's tie
  rules reproduced by sorting (area descending, label ascending);
- ``fill_water``'s flood fill: the background components that touch the slice border (labelling,
  not ``binary_fill_holes``);
- dilate/erode/close: rectangular max/min filters with OpenCV's anchor (offsets -5..4 for the
  10x10 kernel) and border rules (outside = 0 for dilation, 1 for erosion);
- ``medianBlur(21)`` of a two-valued mask: the majority of the 21x21 window (replicated border);
- ``resize(INTER_LINEAR)``: OpenCV's fixed-point bilinear (11-bit coefficients) reproduced.

``tests/engines/test_lung_xp.py`` checks it mask-for-mask against :mod:`engines.lung` on the
real series.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

import numpy as np

from engines.lung import (
    CLOSE_ITERATIONS,
    CLOSE_SIZE,
    CROP_ROW_SUM_THRESHOLD,
    DILATE_ITERATIONS,
    DILATE_SIZE,
    ERODE_ITERATIONS,
    ERODE_SIZE,
    INPUT_SIZE,
    MEDIAN_SIZE,
    THRESHOLD_BLOCK,
    THRESHOLD_C,
    LungExtraction,
    square_box,
)

__all__ = ["XpExtraction", "extract_batch_xp", "ndimage_for", "resize_tables", "to_extractions"]

logger = logging.getLogger(__name__)

_RESIZE_BITS: Final[int] = 11  # OpenCV INTER_RESIZE_COEF_BITS
_RESIZE_SCALE: Final[int] = 1 << _RESIZE_BITS
_U8_MAX: Final[int] = 255


@dataclass(frozen=True)
class XpExtraction:
    """Lung extraction of a batch, left in the array module it was computed with.

    Attributes:
        crops: uint8 (N, 200, 200) masked, resized slices: the network input.
        masks: per slice, the bool mask in its square-cropped frame (views into per-size stacks).
        areas: int64 (N,) lung pixels per slice.
        area_fractions: float64 (N,) ``areas / mask.size``.
        xp: the array module (``numpy`` or ``cupy``).
    """

    crops: Any
    masks: list[Any]
    areas: Any
    area_fractions: Any
    xp: ModuleType


def ndimage_for(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy (imported on first use)."""
    if xp is np:
        return importlib.import_module("scipy.ndimage")
    return importlib.import_module("cupyx.scipy.ndimage")


def _plane(connectivity: int) -> np.ndarray:
    """A (3, 3, 3) structure linking pixels within a slice only (4- or 8-connected)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    if connectivity == 4:
        structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    else:
        structure[1] = True
    return structure


def _box_sum_replicate(xp: ModuleType, values: Any, radius: int, axis: int) -> Any:
    """Sums over ``[j - radius, j + radius]`` along ``axis`` with a replicated border (exact).

    A window at least as wide as the axis covers the whole axis plus ``radius - j`` copies of
    the first and ``j + radius - (n - 1)`` copies of the last element: a closed form, linear in
    ``j`` (the 15599 threshold block). Narrower windows are an integer correlation with ones and
    ``mode='nearest'`` (OpenCV's ``BORDER_REPLICATE``).
    """
    n = values.shape[axis]
    if radius < n:
        weights = xp.ones(2 * radius + 1, dtype=xp.int32)
        return ndimage_for(xp).correlate1d(
            values.astype(xp.int32), weights, axis=axis, mode="nearest"
        )
    wide = values.astype(xp.int64)
    shape = [1] * wide.ndim
    shape[axis] = n
    j = xp.arange(n, dtype=xp.int64).reshape(shape)
    first = xp.take(wide, xp.asarray([0]), axis=axis)
    last = xp.take(wide, xp.asarray([n - 1]), axis=axis)
    total = wide.sum(axis=axis, keepdims=True)
    return total + (radius - j) * first + (j + radius - (n - 1)) * last


def _body(xp: ModuleType, images: Any) -> Any:
    """Step 2: ``255 - adaptiveThreshold(MEAN_C, BINARY_INV, 15599, -96)`` as bool.

    OpenCV sums the block in double (too large for int sums) and rounds the mean to uint8
    (``saturate_cast``: half to even); the same here from exact integer sums. With the block wider
    than the slice the 2-D replicated box sum is bilinear in (i, j) and is built from 1-D sums
    (rows, first/last column, first/last row) instead of two passes over the image.
    """
    radius = THRESHOLD_BLOCK // 2
    _, height, width = images.shape
    if radius < max(height, width):
        sums = _box_sum_replicate(xp, _box_sum_replicate(xp, images, radius, 2), radius, 1)
    else:
        wide = images.astype(xp.int64)
        j = xp.arange(width, dtype=xp.int64).reshape(1, -1)
        left = radius - j  # copies of column 0 in the window at column j
        right = j + radius - (width - 1)  # copies of the last column
        row_sums = wide.sum(axis=2)  # (N, H)
        # Row-box at rows 0 and H-1, and summed over all rows: (N, W) each.
        top = row_sums[:, :1] + left * wide[:, 0, :1] + right * wide[:, 0, -1:]
        bottom = row_sums[:, -1:] + left * wide[:, -1, :1] + right * wide[:, -1, -1:]
        col_total = (
            row_sums.sum(axis=1, keepdims=True)
            + left * wide[:, :, 0].sum(axis=1, keepdims=True)
            + right * wide[:, :, -1].sum(axis=1, keepdims=True)
        )
        i = xp.arange(height, dtype=xp.int64).reshape(1, -1, 1)
        sums = (
            col_total[:, None, :]
            + (radius - i) * top[:, None, :]
            + (i + radius - (height - 1)) * bottom[:, None, :]
        )
    mean = xp.rint(sums.astype(xp.float64) * (1.0 / (THRESHOLD_BLOCK * THRESHOLD_BLOCK)))
    return images > xp.minimum(mean, _U8_MAX) - THRESHOLD_C


def _label_slices(xp: ModuleType, nd: ModuleType, mask: Any, connectivity: int) -> tuple[Any, int]:
    """Per-slice connected components of an (N, H, W) bool stack, one label space."""
    labels, count = nd.label(mask, structure=xp.asarray(_plane(connectivity)))
    return labels, int(count)


def _slice_of_labels(xp: ModuleType, labels: Any, count: int) -> Any:
    """For each label 0..count, the slice it lies in (components never cross slices).

    Label ``l`` of slice ``z`` covers ``size`` pixels all at depth ``z``, so the depth-weighted
    count over the plain count is ``z`` exactly (label 0 spans slices and is never used).
    """
    n = labels.shape[0]
    per_slice = labels.reshape(n, -1)
    weights = xp.broadcast_to(xp.arange(n, dtype=xp.float64).reshape(-1, 1), per_slice.shape)
    sizes = xp.bincount(per_slice.ravel(), minlength=count + 1)
    depth = xp.bincount(per_slice.ravel(), weights=weights.ravel(), minlength=count + 1)
    return xp.rint(depth / xp.maximum(sizes, 1)).astype(xp.int64)


def _ranked(xp: ModuleType, sizes: Any, slice_of: Any) -> tuple[Any, Any, Any]:
    """Labels 1..L sorted by (slice, size descending, label): (labels, slices, rank in slice)."""
    ids = xp.arange(1, sizes.shape[0], dtype=xp.int64)
    order = xp.lexsort(xp.stack([ids, -sizes[1:], slice_of[1:]]))
    ranked_ids = ids[order]
    ranked_slices = slice_of[1:][order]
    position = xp.arange(ranked_ids.shape[0], dtype=xp.int64)
    starts = xp.searchsorted(ranked_slices, ranked_slices, side="left")
    return ranked_ids, ranked_slices, position - starts


def _largest_body(xp: ModuleType, nd: ModuleType, body: Any) -> Any:
    """Step 3: the largest 4-connected body component of each slice (lower label wins ties)."""
    labels, count = _label_slices(xp, nd, body, 4)
    if count == 0:
        return xp.zeros(body.shape, dtype=bool)
    sizes = xp.bincount(labels.ravel(), minlength=count + 1)
    ids, _, rank = _ranked(xp, sizes, _slice_of_labels(xp, labels, count))
    keep = xp.zeros(count + 1, dtype=bool)
    keep[ids[rank == 0]] = True
    return keep[labels]


def _holes(xp: ModuleType, nd: ModuleType, body: Any) -> Any:
    """Step 4 (``fill_water``): background not 4-connected to the slice border."""
    labels, count = _label_slices(xp, nd, ~body, 4)
    outside = xp.zeros(count + 1, dtype=bool)
    outside[0] = True  # label 0 = body pixels
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge.ravel()] = True
    return ~outside[labels]


def _two_largest(xp: ModuleType, nd: ModuleType, holes: Any) -> Any:
    """Step 5: per slice, of the three most common labels (0 included) drop the smallest id.

    Label 0 (everything not a hole) ranks before a hole of equal size, like the original's
    ``Counter.most_common`` on raster-ordered labels. When 0 is among the three, the two largest
    holes stay; otherwise the three largest holes minus the one with the lowest label.
    """
    labels, count = _label_slices(xp, nd, holes, 8)
    n_slices = holes.shape[0]
    if count == 0:
        return xp.zeros(holes.shape, dtype=bool)
    sizes = xp.bincount(labels.ravel(), minlength=count + 1)
    slice_of = _slice_of_labels(xp, labels, count)
    ids, slices, rank = _ranked(xp, sizes, slice_of)
    background = holes.shape[1] * holes.shape[2] - holes.reshape(n_slices, -1).sum(axis=1)
    bigger = xp.bincount(
        slices[sizes[ids] > background[slices]], minlength=n_slices
    )  # holes larger than label 0
    zero_in_top = bigger[slices] < 3
    keep_entry = xp.where(zero_in_top, rank < 2, rank < 3)
    if not bool(xp.all(zero_in_top)):
        # Three holes outrank label 0: drop the lowest label id among them.
        top3 = xp.where(rank < 3, ids, xp.iinfo(xp.int64).max)
        lowest = xp.full(n_slices, xp.iinfo(xp.int64).max, dtype=xp.int64)
        for r in range(3):
            pick = rank == r
            lowest[slices[pick]] = xp.minimum(lowest[slices[pick]], top3[pick])
        keep_entry &= zero_in_top | (ids != lowest[slices])
    keep = xp.zeros(count + 1, dtype=bool)
    keep[ids[keep_entry]] = True
    return keep[labels]


def _dilate(nd: ModuleType, mask: Any, size: int, origin: int) -> Any:
    """OpenCV ``dilate`` with a size x size rect (outside ignored) on an (N, H, W) 0/1 stack."""
    return nd.maximum_filter(
        mask, size=(1, size, size), mode="constant", cval=0, origin=(0, origin, origin)
    )


def _erode(nd: ModuleType, mask: Any, size: int, origin: int) -> Any:
    """OpenCV ``erode`` with a size x size rect (outside counts as foreground)."""
    return nd.minimum_filter(
        mask, size=(1, size, size), mode="constant", cval=1, origin=(0, origin, origin)
    )


def _morphology(xp: ModuleType, nd: ModuleType, mask: Any) -> Any:
    """Step 6: dilate 5x5 x3, erode 5x5 x2, close 10x10 x2, median 21 (as majority).

    Repeated rectangular dilations/erosions equal one with the summed extent (OpenCV merges them
    the same way); an even kernel's anchor is at ``size // 2``, so offsets run ``-5..4`` and two
    passes ``-10..8``: a 19-wide filter shifted by one (``origin=1``).
    """
    m = mask.astype(xp.uint8)
    m = _dilate(nd, m, DILATE_ITERATIONS * (DILATE_SIZE - 1) + 1, 0)
    m = _erode(nd, m, ERODE_ITERATIONS * (ERODE_SIZE - 1) + 1, 0)
    close = CLOSE_ITERATIONS * (CLOSE_SIZE - 1) + 1
    close_origin = CLOSE_ITERATIONS * (CLOSE_SIZE // 2) - close // 2
    m = _dilate(nd, m, close, close_origin)
    m = _erode(nd, m, close, close_origin)
    radius = MEDIAN_SIZE // 2
    counts = _box_sum_replicate(xp, _box_sum_replicate(xp, m, radius, 2), radius, 1)
    return counts > (MEDIAN_SIZE * MEDIAN_SIZE) // 2


def resize_tables(source: int, target: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV ``INTER_LINEAR`` tables for one axis: (source index, 11-bit weight of that index).

    As in OpenCV's ``resize``: ``f = (d + 0.5) * source / target - 0.5`` in float, index
    ``floor(f)`` clamped to the axis with the fraction set to 0 at the clamps, weights
    ``saturate_cast<short>((1 - f) * 2048)`` and ``2048 -`` that.
    """
    scale = source / target
    f = ((np.arange(target, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    index = np.floor(f).astype(np.int64)
    frac = (f - index.astype(np.float32)).astype(np.float32)
    low = index < 0
    frac[low], index[low] = 0.0, 0
    high = index >= source - 1
    frac[high], index[high] = 0.0, source - 1
    weight = np.rint((np.float32(1.0) - frac) * np.float32(_RESIZE_SCALE)).astype(np.int64)
    return index, weight


def _resize(xp: ModuleType, images: Any, target: int = INPUT_SIZE) -> Any:
    """Bilinear resize of an (N, S, S) uint8 stack to (N, target, target), OpenCV fixed point.

    Horizontal pass in integers (weights sum to 2048), vertical pass as OpenCV's SIMD path
    computes it: ``((w0 * (r0 >> 4)) >> 16) + ((w1 * (r1 >> 4)) >> 16) + 2) >> 2``.
    """
    side = images.shape[-1]
    if side == target:
        return images.copy()
    index, weight = resize_tables(side, target)
    nxt = np.minimum(index + 1, side - 1)
    ix, ixn = xp.asarray(index), xp.asarray(nxt)
    w0 = xp.asarray(weight)
    w1 = _RESIZE_SCALE - w0
    w0 = w0.astype(xp.int32)
    w1 = w1.astype(xp.int32)
    src = images.astype(xp.int32)
    rows = xp.take(src, ix, axis=2) * w0 + xp.take(src, ixn, axis=2) * w1
    r0 = xp.take(rows, ix, axis=1) >> 4
    r1 = xp.take(rows, ixn, axis=1) >> 4
    w0y = w0.reshape(1, -1, 1)
    w1y = w1.reshape(1, -1, 1)
    out = (((w0y * r0) >> 16) + ((w1y * r1) >> 16) + 2) >> 2
    return xp.clip(out, 0, _U8_MAX).astype(xp.uint8)


def _square_stacks(xp: ModuleType, images: Any) -> list[tuple[list[int], Any]]:
    """Square-crop each slice (``crop_margin``); group equal sizes: [(slice indices, stack)]."""
    n, height, width = images.shape
    rows_on = images.astype(xp.int64).sum(axis=2) > CROP_ROW_SUM_THRESHOLD
    cols_on = images.astype(xp.int64).sum(axis=1) > CROP_ROW_SUM_THRESHOLD
    first_row = xp.argmax(rows_on, axis=1)
    last_row = height - xp.argmax(rows_on[:, ::-1], axis=1)
    first_col = xp.argmax(cols_on, axis=1)
    last_col = width - xp.argmax(cols_on[:, ::-1], axis=1)
    any_on = rows_on.any(axis=1) & cols_on.any(axis=1)
    bounds = xp.stack([first_row, last_row, first_col, last_col, any_on.astype(xp.int64)], axis=1)
    host = np.asarray(bounds.get() if hasattr(bounds, "get") else bounds)  # (N, 5), tiny
    boxes = []
    for r0, r1, c0, c1, on in host.tolist():
        rows, cols = ((r0, r1), (c0, c1)) if on else ((0, height), (0, width))
        boxes.append(square_box(rows, cols, height, width))
    if all(box == (0, height, 0, width, height) for box in boxes):
        return [(list(range(n)), images)]  # the usual DICOM case: already square, no copy
    groups: dict[int, list[int]] = {}
    for k, box in enumerate(boxes):
        groups.setdefault(box[4], []).append(k)
    stacks = []
    for side, members in groups.items():
        stack = xp.zeros((len(members), side, side), dtype=xp.uint8)
        for j, k in enumerate(members):
            r0, r1, c0, c1, _ = boxes[k]
            top, left = (side - (r1 - r0)) // 2, (side - (c1 - c0)) // 2
            stack[j, top : top + r1 - r0, left : left + c1 - c0] = images[k, r0:r1, c0:c1]
        stacks.append((members, stack))
    return stacks


def _extract_square(xp: ModuleType, nd: ModuleType, squares: Any) -> tuple[Any, Any]:
    """Steps 2-7 on an (N, S, S) uint8 stack: (bool masks, uint8 crops (N, 200, 200))."""
    body = _largest_body(xp, nd, _body(xp, squares))
    holes = _holes(xp, nd, body)
    masks = _morphology(xp, nd, _two_largest(xp, nd, holes))
    masks &= body.reshape(body.shape[0], -1).any(axis=1).reshape(-1, 1, 1)  # no body: empty
    crops = _resize(xp, xp.where(masks, squares, xp.uint8(0)).astype(xp.uint8))
    return masks, crops


def extract_batch_xp(images: Sequence[Any] | Any, xp: ModuleType | None = None) -> XpExtraction:
    """Lung extraction of a batch of windowed uint8 slices with ``xp`` (default NumPy).

    ``images``: an (N, H, W) uint8 array (NumPy or ``xp``) or a sequence of equal-size 2-D
    slices. With ``xp=cupy`` the work and the results stay on the GPU.
    """
    xp = np if xp is None else xp
    nd = ndimage_for(xp)
    stack = (
        xp.asarray(images)
        if not isinstance(images, list | tuple)
        else xp.stack([xp.asarray(image) for image in images])
    )
    if stack.ndim != 3 or stack.dtype != xp.uint8:
        raise ValueError(f"expected (N, H, W) uint8 slices, got {stack.dtype} {stack.shape}")
    n = stack.shape[0]
    crops = xp.zeros((n, INPUT_SIZE, INPUT_SIZE), dtype=xp.uint8)
    masks: list[Any] = [None] * n
    areas = xp.zeros(n, dtype=xp.int64)
    fractions = xp.zeros(n, dtype=xp.float64)
    for members, squares in _square_stacks(xp, stack):
        group_masks, group_crops = _extract_square(xp, nd, squares)
        index = xp.asarray(members)
        crops[index] = group_crops
        group_areas = group_masks.reshape(len(members), -1).sum(axis=1)
        areas[index] = group_areas
        fractions[index] = group_areas / float(squares.shape[1] * squares.shape[2])
        for j, k in enumerate(members):
            masks[k] = group_masks[j]
    return XpExtraction(crops=crops, masks=masks, areas=areas, area_fractions=fractions, xp=xp)


def to_extractions(batch: XpExtraction) -> list[LungExtraction]:
    """Copy a batch to the host as :class:`engines.lung.LungExtraction` objects."""

    def host(array: Any) -> np.ndarray:
        return np.asarray(array.get() if hasattr(array, "get") else array)

    crops, areas, fractions = host(batch.crops), host(batch.areas), host(batch.area_fractions)
    return [
        LungExtraction(
            crop=crops[k], mask=host(mask), area=int(areas[k]), area_fraction=float(fractions[k])
        )
        for k, mask in enumerate(batch.masks)
    ]
