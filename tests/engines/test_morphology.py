"""Binary morphology on slice stacks (engines.morphology) against a brute-force definition."""

from __future__ import annotations

import numpy as np
import pytest

from engines import morphology as mo


def brute(mask: np.ndarray, height: int, width: int, union: bool) -> np.ndarray:
    """or/and over the window [i - h//2, i + (h-1) - h//2] x (same for columns), outside = 0."""
    top, left = height // 2, width // 2
    padded = np.pad(mask, ((0, 0), (top, height - 1 - top), (left, width - 1 - left)))
    out = np.zeros_like(mask)
    for z in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            for j in range(mask.shape[2]):
                window = padded[z, i:i + height, j:j + width]
                out[z, i, j] = window.any() if union else window.all()
    return out


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 3), (3, 3), (4, 4), (5, 7), (8, 2),
                                               (15, 15)])
def test_dilate_and_erode_equal_the_window_definition(height: int, width: int) -> None:
    mask = np.random.default_rng(height * 31 + width).random((3, 23, 19)) > 0.55
    np.testing.assert_array_equal(mo.dilate(np, mask, height, width),
                                  brute(mask, height, width, True))
    np.testing.assert_array_equal(mo.erode(np, mask, height, width),
                                  brute(mask, height, width, False))


def test_opening_removes_what_is_narrower_than_the_square() -> None:
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 5:25, 5:25] = True  # a 20 x 20 patch stays
    mask[0, 30, :] = True  # a one-pixel line (a vessel rim) goes
    mask[0, 33:36, 10:38] = True  # a three-pixel strand goes under a 5 x 5 opening
    opened = mo.open_(np, mask, 5)
    assert opened[0, 5:25, 5:25].all()
    assert not opened[0, 28:40].any()


def test_closing_fills_gaps_and_fill_holes_respects_the_size_limit() -> None:
    ring = np.zeros((2, 30, 30), bool)
    ring[:, 5:25, 5:25] = True
    ring[:, 10:20, 10:20] = False  # a 10 x 10 hole (100 pixels)
    ring[1, 14, 5:10] = False  # slice 1: a channel joins the hole to the outside
    filled = mo.fill_holes(np, ring)
    assert filled[0, 10:20, 10:20].all()
    assert not filled[1, 10:20, 10:20].any()
    assert not mo.fill_holes(np, ring, max_area=99)[0, 10:20, 10:20].any()
    gap = np.zeros((1, 20, 20), bool)
    gap[0, 5:15, 5:9] = True
    gap[0, 5:15, 11:15] = True  # a two-pixel gap between two bars
    assert mo.close(np, gap, 3)[0, 10, 9:11].all()
    assert not mo.close(np, gap, 1)[0, 10, 9:11].any()


def test_labels_stay_within_their_slice_unless_asked() -> None:
    column = np.ones((3, 4, 4), bool)
    assert mo.label(np, column)[1] == 3
    assert mo.label(np, column, mo.SPACE6)[1] == 1
