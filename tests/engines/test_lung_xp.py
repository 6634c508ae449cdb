"""engines.lung_xp (array-module batch path) against engines.lung (OpenCV), on real series.

On NumPy the two paths are bit-exact: same masks and same 200x200 crops. The CuPy run needs a GPU
and CuPy (the ``gpu`` extra) and is skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.lung import extract
from engines.lung_xp import _resize, extract_batch_xp, resize_tables, to_extractions
from tests.engines.test_lung import CRANIAL, normal_slices, ordered_u8, p002_slices  # noqa: F401


@pytest.fixture(scope="session")
def pet_ct_slices(shared_data: Path) -> np.ndarray:
    """All 30 slices of the uncompressed lung-pet-ct-dx series (8 mm)."""
    return ordered_u8(shared_data / "lung-pet-ct-dx" / "Lung_Dx-A0002-B40f", list(range(30)))


@pytest.mark.parametrize("series", ["p002_slices", "normal_slices", "pet_ct_slices"])
def test_numpy_batch_is_bit_exact(series: str, request: pytest.FixtureRequest) -> None:
    slices = request.getfixturevalue(series)
    batch = extract_batch_xp(slices)
    assert batch.crops.shape == (len(slices), 200, 200) and batch.crops.dtype == np.uint8
    got = to_extractions(batch)
    for k, image in enumerate(slices):
        want = extract(image)
        assert np.array_equal(got[k].mask, want.mask), k
        assert np.array_equal(got[k].crop, want.crop), k
        assert got[k].area == want.area and got[k].area_fraction == want.area_fraction


def test_mixed_crop_sizes_group_and_match(p002_slices: np.ndarray) -> None:  # noqa: F811
    """Slices whose square crops differ (black margins) are grouped by size; still exact."""
    base = p002_slices[CRANIAL + 1]
    framed = np.zeros_like(base)
    framed[56:456, 56:456] = cv2.resize(base, (400, 400), interpolation=cv2.INTER_AREA)
    shifted = np.zeros_like(base)
    shifted[:, :400] = base[:, 56:456]
    stack = np.stack([base, framed, shifted, np.zeros_like(base)])
    got = to_extractions(extract_batch_xp(list(stack)))
    for k, image in enumerate(stack):
        want = extract(image)
        assert got[k].mask.shape == want.mask.shape
        assert np.array_equal(got[k].mask, want.mask) and np.array_equal(got[k].crop, want.crop)
    assert got[3].area == 0


@pytest.mark.parametrize("side", [512, 333, 999, 200, 150, 115])
def test_resize_matches_opencv_inter_linear(side: int) -> None:
    """Down-scaling (DICOM slices) is bit-exact; up-scaling (small PNGs) within 1 grey level."""
    rng = np.random.default_rng(side)
    images = rng.integers(0, 256, size=(2, side, side), dtype=np.uint8)
    ours = _resize(np, images)
    for k in range(2):
        want = cv2.resize(images[k], (200, 200), interpolation=cv2.INTER_LINEAR)
        diff = np.abs(ours[k].astype(int) - want)
        if side >= 200:
            assert diff.max() == 0
        else:
            assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
    index, weight = resize_tables(side)
    assert index.min() >= 0 and index.max() <= side - 1 and weight.max() <= 2048


@pytest.mark.gpu
def test_cupy_matches_cpu(p002_slices: np.ndarray) -> None:  # noqa: F811
    """With a GPU: the CuPy run matches the NumPy run (mask IoU >= 0.99 on every lung slice)."""
    cupy = pytest.importorskip("cupy", reason="CuPy absent: would check GPU/CPU mask parity")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device: would check GPU/CPU mask parity")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA runtime: would check GPU/CPU mask parity")
    gpu = extract_batch_xp(cupy.asarray(p002_slices), xp=cupy)
    assert isinstance(gpu.crops, cupy.ndarray)
    host = to_extractions(gpu)
    for k, image in enumerate(p002_slices):
        want = extract(image)
        if want.area == 0:
            assert host[k].area == 0
            continue
        inter = np.logical_and(host[k].mask, want.mask).sum()
        union = np.logical_or(host[k].mask, want.mask).sum()
        assert inter / union >= 0.99, k
