"""HUST-19 lung extraction on the CPU with OpenCV: a faithful port of the original code.

Source. The HUST-19 code distributed with the iCTCF resource (https://ngdc.cncb.ac.cn/ictcf/HUST-19.php,
Ning et al., Nat. Biomed. Eng. 2020) pre-processes every slice with ``split_lung_parenchyma`` and
``fill_water`` and then reads the result with ``cv2.resize(img, (200, 200))``. Public GitHub
copies of that script (the demo ``Demo_Patient_324`` pipeline and its pre-processing script) were
read for this port; the square crop ``crop_margin`` comes from a public adaptation that credits
the same HUST-19 code. The steps, in the original's order:

1. Square crop (``crop_margin``): rows / columns whose grey-level sum exceeds 30 bound the
   content; the shorter side is widened about its centre to a square.
2. ``cv2.adaptiveThreshold(img, 255, ADAPTIVE_THRESH_MEAN_C, THRESH_BINARY_INV, 15599, -96)``
   then inverted: a pixel is "body" when it is brighter than its (huge, border-replicated) box
   mean + 96. The block (15599 px) is larger than any slice, so the mean is dominated by the
   replicated border: in effect a global threshold relative to the image's edge.
3. Keep the largest 4-connected body component (``skimage.measure.label(connectivity=1)``).
4. ``fill_water``: flood fill (4-connected) from the border of a 10-px zero frame: the outside
   air. What is neither body nor outside is the dark parenchyma (the holes of the body).
5. ``cv2.connectedComponentsWithStats`` (8-connected) on the holes; of the three most common
   labels (background included) the smallest id is dropped: in practice the two largest holes,
   the two lungs, stay.
6. ``dilate`` 5x5 x3, ``erode`` 5x5 x2, ``MORPH_CLOSE`` 10x10 rect x2, ``medianBlur`` 21.
7. Mask the slice (``img * mask``) and resize to 200x200 with ``INTER_LINEAR``.

Deviations, all deliberate: the original wrote the masked slice as JPEG and read it back before
resizing (lossy); here the masked array is resized directly. The original crashed on a slice
with no body pixel (``np.argmax([])``); here such a slice gets an empty mask. The original's
``crop_margin`` could return a non-square or one-pixel-off crop near the image edge; here the
crop is always square (zero-padded when the content is wider than the image is high).

The same algorithm against an array module (NumPy or CuPy, whole batches at once) is in
:mod:`engines.lung_xp`; it matches this module mask-for-mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np

__all__ = [
    "INPUT_SIZE",
    "NICT_AREA_FRACTION",
    "LungExtraction",
    "content_box",
    "crop_square",
    "extract",
    "extract_batch",
    "is_informative",
    "lung_mask",
    "lung_mask_reference",
    "square_box",
]

logger = logging.getLogger(__name__)

#: Side of the slice network's input (pixels).
INPUT_SIZE: Final = 200

#: Below this lung-area fraction of the square frame a slice has no lung parenchyma: the derived
#: NiCT (non-informative CT) label. Chosen on the real series in ``../shared/data`` (see
#: docs/models/slice.md, "Pre-processing"): slices above the apices measure
#: 0.001-0.010 (the trachea), slices through the lungs 0.02-0.29; the original method also
#: keeps gastric gas below the left hemidiaphragm, which measured 0.013-0.020 in P002, so
#: the cut sits at 0.02. The first slices through the apices (0.010-0.020) fall under it
#: too: too little parenchyma to be informative.
NICT_AREA_FRACTION: Final[float] = 0.02

# Parameters of the original code (names say what they are).
CROP_ROW_SUM_THRESHOLD: Final[int] = 30
"""crop_margin: a row/column belongs to the content when its grey-level sum exceeds this."""
THRESHOLD_BLOCK: Final[int] = 15599
"""adaptiveThreshold block size (pre-processing script; the demo used 10999, same effect)."""
THRESHOLD_C: Final[int] = -96
"""adaptiveThreshold C: body = brighter than the box mean + 96."""
FLOOD_PAD: Final[int] = 10
"""fill_water's zero frame around the slice, so every border pixel reaches the flood seed."""
KEEP_TOP_LABELS: Final[int] = 3
"""Three most common labels (background included); the smallest id of them is dropped."""
DILATE_SIZE: Final[int] = 5
DILATE_ITERATIONS: Final[int] = 3
ERODE_SIZE: Final[int] = 5
ERODE_ITERATIONS: Final[int] = 2
CLOSE_SIZE: Final[int] = 10
CLOSE_ITERATIONS: Final[int] = 2
MEDIAN_SIZE: Final[int] = 21

_U8_MAX: Final[int] = 255


@dataclass(frozen=True)
class LungExtraction:
    """What lung extraction gives for one slice.

    Attributes:
        crop: uint8 (200, 200): the square-cropped slice with everything outside the lungs set to
            0, resized bilinearly: the slice network's input.
        mask: bool, the lung mask in the square-cropped frame (before resizing).
        area: lung pixels in ``mask``.
        area_fraction: ``area / mask.size``; compare with :data:`NICT_AREA_FRACTION`.
    """

    crop: np.ndarray
    mask: np.ndarray
    area: int
    area_fraction: float


def square_box(
    rows: tuple[int, int], cols: tuple[int, int], height: int, width: int
) -> tuple[int, int, int, int, int]:
    """Content box ``[r0, r1) x [c0, c1)`` widened to a square: ``(r0, r1, c0, c1, side)``.

    The shorter side is widened about its centre and shifted to stay inside the image; when the
    square does not fit along an axis the box keeps the image's extent there and the caller pads.
    """
    side = max(rows[1] - rows[0], cols[1] - cols[0])
    r0, r1 = _widen(rows[0], rows[1], side, height)
    c0, c1 = _widen(cols[0], cols[1], side, width)
    return r0, r1, c0, c1, side


def content_box(image_u8: np.ndarray) -> tuple[int, int, int, int, int]:
    """:func:`square_box` of ``crop_margin``'s content box (row/column sums above 30)."""
    image = np.asarray(image_u8)
    height, width = image.shape
    row_on = np.flatnonzero(image.sum(axis=1, dtype=np.int64) > CROP_ROW_SUM_THRESHOLD)
    col_on = np.flatnonzero(image.sum(axis=0, dtype=np.int64) > CROP_ROW_SUM_THRESHOLD)
    if row_on.size == 0 or col_on.size == 0:
        return square_box((0, height), (0, width), height, width)
    rows = (int(row_on[0]), int(row_on[-1]) + 1)
    cols = (int(col_on[0]), int(col_on[-1]) + 1)
    return square_box(rows, cols, height, width)


def crop_square(image_u8: np.ndarray) -> np.ndarray:
    """Square content crop (``crop_margin``): content box by row/column sums, widened to a square.

    An image with no content row or column (all near black) keeps its full extent. Where the
    square is larger than the image along one axis the rest is zero padding (centred).
    """
    image = np.asarray(image_u8)
    r0, r1, c0, c1, side = content_box(image)
    crop = image[r0:r1, c0:c1]
    if crop.shape == (side, side):
        return crop
    square = np.zeros((side, side), dtype=image.dtype)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return square


def _widen(start: int, stop: int, side: int, limit: int) -> tuple[int, int]:
    """Widen [start, stop) to ``side`` about its centre, shifted to fit in [0, limit) if it can."""
    if stop - start >= side:
        return start, stop
    side = min(side, limit)
    new_start = (start + stop - side) // 2
    new_start = min(max(new_start, 0), limit - side)
    return new_start, new_start + side


def _largest_component(binary_u8: np.ndarray) -> np.ndarray:
    """The largest 4-connected non-zero component (lowest label wins a tie), as a 0/255 mask.

    Areas come from a ``bincount`` of the labels: ``connectedComponentsWithStats`` gives the same
    labels but its statistics pass costs more than the labelling itself on these slices.
    """
    count, labels = cv2.connectedComponents(binary_u8, connectivity=4)
    if count <= 1:
        return np.zeros(binary_u8.shape, dtype=np.uint8)
    sizes = np.bincount(labels.ravel(), minlength=count)
    biggest = 1 + int(np.argmax(sizes[1:]))
    return np.asarray(cv2.compare(labels, np.array([biggest], np.float64), cv2.CMP_EQ))


def _outside(body_u8: np.ndarray) -> np.ndarray:
    """``fill_water``: the non-body pixels 4-connected to the border (flood from a zero frame),
    as a 0/255 mask."""
    framed = cv2.copyMakeBorder(
        body_u8, FLOOD_PAD, FLOOD_PAD, FLOOD_PAD, FLOOD_PAD, cv2.BORDER_CONSTANT, value=0
    )
    flood = np.zeros((framed.shape[0] + 2, framed.shape[1] + 2), dtype=np.uint8)
    fill_flags = 4 | cv2.FLOODFILL_MASK_ONLY | (_U8_MAX << 8)
    cv2.floodFill(framed, flood, (0, 0), 1, 0, 0, fill_flags)
    return flood[1 + FLOOD_PAD : -1 - FLOOD_PAD, 1 + FLOOD_PAD : -1 - FLOOD_PAD]


def _two_largest_holes(holes_u8: np.ndarray) -> np.ndarray:
    """Step 5: of the three most common 8-connected labels, drop the smallest id, keep the rest
    (0/255 mask).

    ``Counter.most_common`` breaks ties by first occurrence, which for raster-ordered labels is the
    lower id; the sort below does the same.
    """
    count, labels = cv2.connectedComponents(holes_u8, connectivity=8)
    sizes = np.bincount(labels.ravel(), minlength=count)
    order = np.lexsort((np.arange(count), -sizes))[:KEEP_TOP_LABELS]
    kept = np.zeros(holes_u8.shape, dtype=np.uint8)
    for label in np.sort(order)[1:]:
        is_label = cv2.compare(labels, np.array([label], np.float64), cv2.CMP_EQ)
        cv2.bitwise_or(kept, is_label, dst=kept)
    return kept


def _replicated_box_mean(image: np.ndarray) -> np.ndarray:
    """OpenCV's rounded box mean (block :data:`THRESHOLD_BLOCK`, border replicated), float64.

    With the window wider than the slice, a window centred on ``j`` covers the whole row plus
    ``radius - j`` copies of its first and ``j + radius - (n - 1)`` copies of its last pixel, so
    the 1-D box sum is linear in ``j`` and the 2-D sum is bilinear: ``P + Q*j + i*(U + V*j)``.
    The coefficients are exact integers and every product stays far below 2**53, so the float64
    sums equal OpenCV's double sums; the rounding is then OpenCV's (``rint`` of sum / block**2).
    """
    height, width = image.shape
    radius = THRESHOLD_BLOCK // 2
    values = image.astype(np.int64)
    first, last = values[:, 0], values[:, width - 1]
    # row pass: a_i + b_i * j
    a = values.sum(axis=1) + radius * first + (radius - (width - 1)) * last
    b = last - first
    # column pass over the linear row sums
    far = radius - (height - 1)
    p = a.sum() + radius * a[0] + far * a[height - 1]
    q = b.sum() + radius * b[0] + far * b[height - 1]
    j = np.arange(width, dtype=np.int64)
    along_j = (p + q * j).astype(np.float64)
    per_i = ((a[height - 1] - a[0]) + (b[height - 1] - b[0]) * j).astype(np.float64)
    sums = np.arange(height, dtype=np.float64)[:, None] * per_i
    sums += along_j
    sums *= 1.0 / (THRESHOLD_BLOCK * THRESHOLD_BLOCK)
    np.rint(sums, out=sums)
    return np.minimum(sums, _U8_MAX, out=sums)


def _literal_body(image: np.ndarray) -> np.ndarray:
    """Step 2 as the original wrote it: 255 - adaptiveThreshold(BINARY_INV), a 0/255 body."""
    inverse = cv2.adaptiveThreshold(
        image,
        _U8_MAX,
        cv2.ADAPTIVE_THRESH_MEAN_C,
        cv2.THRESH_BINARY_INV,
        THRESHOLD_BLOCK,
        THRESHOLD_C,
    )
    return np.asarray(_U8_MAX - inverse)


def _body_threshold(image: np.ndarray) -> np.ndarray:
    """Step 2, exactly as ``255 - adaptiveThreshold(..., MEAN_C, BINARY_INV, 15599, -96)`` > 0.

    OpenCV's mean is ``boxFilter(BORDER_REPLICATE)`` summed in double (the block is too large for
    int sums) and rounded to uint8; with a block wider than the slice that sum has a closed form
    (:func:`_replicated_box_mean`), O(H*W) instead of OpenCV's O(H*W*block) (53 ms -> well under
    1 ms per 512x512 slice). ``tests/engines/test_lung.py`` checks it against
    ``cv2.adaptiveThreshold``.
    """
    if max(image.shape) > THRESHOLD_BLOCK // 2:
        return np.asarray(_literal_body(image) > 0)
    threshold = _replicated_box_mean(image)
    threshold -= THRESHOLD_C
    return np.asarray(image > threshold)


def _median_majority(mask_u8: np.ndarray) -> np.ndarray:
    """Step 6's ``medianBlur(mask, 21)`` on a 0/255 mask: on when at least 221 of 441 are on.

    The median of a two-valued window is its majority; a box sum with the same replicated border
    gives it exactly and about 10x faster than ``medianBlur`` (checked in the tests).
    """
    sums = cv2.boxFilter(
        mask_u8,
        cv2.CV_32S,
        (MEDIAN_SIZE, MEDIAN_SIZE),
        normalize=False,
        borderType=cv2.BORDER_REPLICATE,
    )
    return np.asarray(sums > (MEDIAN_SIZE * MEDIAN_SIZE) // 2 * _U8_MAX)


def _morphology(mask_u8: np.ndarray) -> np.ndarray:
    """Step 6 without the median: dilate 5x5 x3, erode 5x5 x2, close 10x10 x2 (OpenCV)."""
    mask = cv2.dilate(
        mask_u8, np.ones((DILATE_SIZE, DILATE_SIZE), np.uint8), iterations=DILATE_ITERATIONS
    )
    mask = cv2.erode(mask, np.ones((ERODE_SIZE, ERODE_SIZE), np.uint8), iterations=ERODE_ITERATIONS)
    return np.asarray(
        cv2.morphologyEx(
            mask,
            cv2.MORPH_CLOSE,
            cv2.getStructuringElement(cv2.MORPH_RECT, (CLOSE_SIZE, CLOSE_SIZE)),
            iterations=CLOSE_ITERATIONS,
        )
    )


def _mask_after_body(body_u8: np.ndarray) -> np.ndarray:
    """Steps 4-5 and the morphology of step 6 on a 0/255 body, as a 0/255 mask before the median."""
    holes = cv2.bitwise_not(cv2.bitwise_or(body_u8, _outside(body_u8)))
    return _morphology(_two_largest_holes(holes))


def lung_mask(square_u8: np.ndarray) -> np.ndarray:
    """Steps 2-6 on a square uint8 slice: the bool lung mask in the same frame.

    Masks travel as 0/255 uint8 between the OpenCV calls (no bool round trips).
    """
    image = np.ascontiguousarray(square_u8, dtype=np.uint8)
    body = _largest_component(_body_threshold(image).view(np.uint8))
    if not cv2.countNonZero(body):
        return np.zeros(image.shape, dtype=bool)
    return _median_majority(_mask_after_body(body))


def lung_mask_reference(square_u8: np.ndarray) -> np.ndarray:
    """:func:`lung_mask` with the original's literal OpenCV calls (slow; for checking only).

    ``cv2.adaptiveThreshold`` with the 15599 block and ``cv2.medianBlur`` in place of the exact
    closed-form equivalents used by :func:`lung_mask`.
    """
    image = np.ascontiguousarray(square_u8, dtype=np.uint8)
    body = _largest_component(_literal_body(image))
    if not cv2.countNonZero(body):
        return np.zeros(image.shape, dtype=bool)
    return np.asarray(cv2.medianBlur(_mask_after_body(body), MEDIAN_SIZE) > 0)


def extract(image_u8: np.ndarray) -> LungExtraction:
    """Lung extraction for one windowed uint8 slice (any size, grey): crop, mask, 200x200 input."""
    image = np.asarray(image_u8)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 slice, got {image.dtype} {image.shape}")
    square = crop_square(image)
    mask = lung_mask(square)
    mask_u8 = mask.view(np.uint8)
    masked = cv2.bitwise_and(square, square, mask=mask_u8)
    crop = cv2.resize(masked, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    area = cv2.countNonZero(mask_u8)
    return LungExtraction(crop=crop, mask=mask, area=area, area_fraction=area / mask.size)


def extract_batch(images: Sequence[np.ndarray] | np.ndarray) -> list[LungExtraction]:
    """:func:`extract` for each slice of a sequence or an (N, H, W) stack, in order."""
    return [extract(np.asarray(image)) for image in images]


def is_informative(ext: LungExtraction) -> bool:
    """True when the slice shows lung parenchyma (area fraction >= :data:`NICT_AREA_FRACTION`)."""
    return ext.area_fraction >= NICT_AREA_FRACTION
