"""engines.preprocess on real DICOM (chest-ct-series, lungmask-samples) and public PNG slices."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engines.preprocess import (
    AIR_HU,
    LUNG_WINDOW_CENTER,
    LUNG_WINDOW_WIDTH,
    MIN_PHYSICAL_HU,
    dataset_to_u8,
    load_image_u8,
    to_hu,
    window,
)
from schemas.errors import DicomInputError, InputError


@pytest.fixture(scope="module")
def chest_slice(chest_series: Path) -> pydicom.Dataset:
    return pydicom.dcmread(chest_series / "normal001" / "99C628-ASAD_1.dcm")


@pytest.fixture(scope="module")
def signed_slice(shared_data: Path) -> pydicom.Dataset:
    return pydicom.dcmread(shared_data / "lungmask-samples" / "0.dcm")


def test_to_hu_applies_rescale_on_jpeg_lossless_series(chest_slice: pydicom.Dataset) -> None:
    hu = to_hu(chest_slice)
    stored = chest_slice.pixel_array.astype(np.float32)
    assert hu.dtype == np.float32 and hu.shape == (512, 512)
    expected = np.maximum(
        stored * float(chest_slice.RescaleSlope) + float(chest_slice.RescaleIntercept),
        MIN_PHYSICAL_HU,
    )
    np.testing.assert_array_equal(hu, expected)
    # Air around the patient is about -1000 HU.
    assert -1030 < np.median(hu[:20, :20]) < -900


def test_to_hu_signed_pixels(signed_slice: pydicom.Dataset) -> None:
    assert int(signed_slice.PixelRepresentation) == 1
    stored = signed_slice.pixel_array
    assert stored.min() < 0  # really signed
    hu = to_hu(signed_slice)
    expected = np.maximum(
        stored.astype(np.float32) * float(signed_slice.RescaleSlope)
        + float(signed_slice.RescaleIntercept),
        MIN_PHYSICAL_HU,
    )
    np.testing.assert_array_equal(hu, expected)


def test_padding_value_becomes_air(chest_slice: pydicom.Dataset) -> None:
    ds = copy.deepcopy(chest_slice)
    stored = ds.pixel_array
    pad = int(stored.min())
    assert pad == 0  # outside the field of view is stored 0 (-1024 HU) in this series
    ds.PixelPaddingValue = pad
    hu = to_hu(ds)
    assert np.all(hu[stored == pad] == AIR_HU)
    assert np.all(hu[stored != pad] == to_hu(chest_slice)[stored != pad])


def test_signed_padding_value_read_unsigned_and_range_limit(signed_slice: pydicom.Dataset) -> None:
    ds = copy.deepcopy(signed_slice)
    stored = ds.pixel_array
    low = int(stored.min())
    # A padding value written as US for a signed image reads as its unsigned twin.
    ds.add_new("PixelPaddingValue", "US", low + 65536)
    hu = to_hu(ds)
    assert np.all(hu[stored == low] == AIR_HU)
    ds.add_new("PixelPaddingRangeLimit", "SS", low + 100)
    hu = to_hu(ds)
    in_range = (stored >= low) & (stored <= low + 100)
    assert np.all(hu[in_range] == AIR_HU)
    assert np.array_equal(hu[~in_range], to_hu(signed_slice)[~in_range])


def test_missing_pixel_data_names_uid_and_field(chest_slice: pydicom.Dataset) -> None:
    ds = copy.deepcopy(chest_slice)
    del ds.PixelData
    with pytest.raises(DicomInputError) as info:
        to_hu(ds)
    assert "PixelData" in str(info.value)
    assert str(chest_slice.SOPInstanceUID) in str(info.value)


def test_undecodable_pixel_data_is_dicom_input_error(chest_slice: pydicom.Dataset) -> None:
    ds = copy.deepcopy(chest_slice)
    ds.PixelData = b"\x00\x01"  # truncated compressed stream
    with pytest.raises(DicomInputError, match="PixelData"):
        to_hu(ds)


def test_window_maps_edges_and_clips() -> None:
    low = LUNG_WINDOW_CENTER - LUNG_WINDOW_WIDTH / 2
    high = LUNG_WINDOW_CENTER + LUNG_WINDOW_WIDTH / 2
    hu = np.array([low - 500, low, LUNG_WINDOW_CENTER, high, high + 500], dtype=np.float32)
    assert window(hu).tolist() == [0, 0, 128, 255, 255]
    assert window(np.array([-1000.0]), center=-500, width=1000).tolist() == [0]
    with pytest.raises(ValueError):
        window(hu, width=0)


def test_dataset_to_u8_lung_contrast(chest_slice: pydicom.Dataset) -> None:
    image = dataset_to_u8(chest_slice)
    assert image.dtype == np.uint8 and image.shape == (512, 512)
    # Air (-1000 HU) is dark grey, not black, in the -600/1200 window: (1200-1000)/1200*255.
    assert abs(int(np.median(image[:20, :20])) - 42) <= 3


@pytest.mark.parametrize(
    "name",
    ["COVID/2020.01.24.919183-p27-132.png", "COVID/2020.03.13.20035212-p23-152.png"],
)
def test_load_image_u8_rgba_and_grey(shared_data: Path, name: str) -> None:
    image = load_image_u8(shared_data / "covid-ct" / name)
    assert image.dtype == np.uint8 and image.ndim == 2 and image.size > 0


def test_load_image_u8_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"plain text")
    with pytest.raises(InputError, match=r"not-an-image\.png"):
        load_image_u8(bad)
    with pytest.raises(InputError, match=r"missing\.png"):
        load_image_u8(tmp_path / "missing.png")
