"""engines.lung on the real series: lung slices have lungs, slices above the apices and below the
diaphragm do not, runs repeat exactly, and the fast exact steps equal the original OpenCV calls."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from engines import lung
from engines.lung import (
    INPUT_SIZE,
    NICT_AREA_FRACTION,
    crop_square,
    extract,
    extract_batch,
    is_informative,
    lung_mask,
    lung_mask_reference,
)
from engines.preprocess import dataset_to_u8, load_image_u8
from engines.series import order_slices

CRANIAL = 8  # the first slices of each series lie above the lung apices (checked visually)
CAUDAL = 8  # the last slices of P002 and normal001 lie below the diaphragm
MIDDLE = (50, 60, 70)


def ordered_u8(folder: Path, picks: list[int]) -> np.ndarray:
    """Windowed uint8 slices at cranio-caudal positions ``picks`` (negative = from the end)."""
    files = sorted(folder.glob("*.dcm"))
    order = order_slices([pydicom.dcmread(f, stop_before_pixels=True) for f in files]).indices
    return np.stack([dataset_to_u8(pydicom.dcmread(files[order[k]])) for k in picks])


def _picks() -> list[int]:
    return list(range(CRANIAL)) + list(MIDDLE) + list(range(-CAUDAL, 0))


@pytest.fixture(scope="session")
def p002_slices(chest_series: Path) -> np.ndarray:
    """P002: 8 cranial, 3 middle and 8 caudal slices (decoded once per session)."""
    return ordered_u8(chest_series / "P002", _picks())


@pytest.fixture(scope="session")
def normal_slices(chest_series: Path) -> np.ndarray:
    return ordered_u8(chest_series / "normal001", _picks())


@pytest.mark.parametrize("series", ["p002_slices", "normal_slices"])
def test_lungs_only_where_lungs_are(series: str, request: pytest.FixtureRequest) -> None:
    slices = request.getfixturevalue(series)
    results = extract_batch(slices)
    fractions = [r.area_fraction for r in results]
    cranial, middle, caudal = (
        fractions[:CRANIAL],
        fractions[CRANIAL : CRANIAL + len(MIDDLE)],
        fractions[-CAUDAL:],
    )
    assert all(f < NICT_AREA_FRACTION for f in cranial), cranial
    assert all(f < NICT_AREA_FRACTION for f in caudal), caudal
    assert all(f > 0.15 for f in middle), middle
    assert [is_informative(r) for r in results] == [f >= NICT_AREA_FRACTION for f in fractions]
    for r in results[CRANIAL : CRANIAL + len(MIDDLE)]:
        assert r.crop.shape == (INPUT_SIZE, INPUT_SIZE) and r.crop.dtype == np.uint8
        assert r.mask.dtype == bool and r.mask.shape == (512, 512)
        assert r.area == int(r.mask.sum()) and r.area_fraction == r.area / r.mask.size
        # Outside the lungs the crop is black; inside it keeps the slice's grey levels.
        small = cv2.resize(
            r.mask.astype(np.uint8), (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_NEAREST
        ).astype(bool)
        eroded = cv2.erode(small.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (
            r.crop[
                ~cv2.dilate(small.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            ].max()
            == 0
        )
        assert r.crop[eroded].min() > 0


def test_repeated_runs_are_identical(p002_slices: np.ndarray) -> None:
    first = extract_batch(p002_slices[CRANIAL : CRANIAL + 2])
    second = extract_batch(list(p002_slices[CRANIAL : CRANIAL + 2]))
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.crop, b.crop)
        assert a.area == b.area


def test_fast_steps_equal_original_opencv_calls(p002_slices: np.ndarray, shared_data: Path) -> None:
    """The closed-form threshold and the majority median give the original's masks exactly."""
    images = [p002_slices[k] for k in (CRANIAL - 1, CRANIAL, CRANIAL + 2, len(p002_slices) - 1)]
    for name in ("COVID/2020.01.24.919183-p27-132.png", "NonCOVID/0.jpg"):
        path = shared_data / "covid-ct" / name
        if path.exists():
            images.append(crop_square(load_image_u8(path)))
    assert len(images) >= 5
    for image in images:
        image = np.ascontiguousarray(image)
        expected = (
            cv2.adaptiveThreshold(
                image,
                255,
                cv2.ADAPTIVE_THRESH_MEAN_C,
                cv2.THRESH_BINARY_INV,
                lung.THRESHOLD_BLOCK,
                lung.THRESHOLD_C,
            )
            == 0
        )
        assert np.array_equal(lung._body_threshold(image), expected)
        assert np.array_equal(lung_mask(image), lung_mask_reference(image))


def test_crop_square_and_blank_slices() -> None:
    image = np.zeros((300, 500), dtype=np.uint8)
    image[100:200, 150:400] = 200  # content 100 x 250
    square = crop_square(image)
    assert square.shape == (250, 250)
    assert square.sum() == image.sum()
    wide = np.full((100, 300), 120, dtype=np.uint8)  # content wider than the image is high
    assert crop_square(wide).shape == (300, 300)
    blank = extract(np.zeros((256, 256), dtype=np.uint8))
    assert blank.area == 0 and not blank.mask.any() and not blank.crop.any()
    assert not is_informative(blank)
    with pytest.raises(ValueError):
        extract(np.zeros((4, 4, 3), dtype=np.uint8))
