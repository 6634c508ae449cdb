"""engines.series: real series against the README's label order, and synthetic odd geometry."""

from __future__ import annotations

import copy
import csv
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engines.series import (
    METHOD_GEOMETRY,
    METHOD_INPUT_ORDER,
    METHOD_INSTANCE_NUMBER,
    METHOD_SLICE_LOCATION,
    order_slices,
)


def _headers(folder: Path) -> tuple[list[Path], list[pydicom.Dataset]]:
    files = sorted(folder.glob("*.dcm"))
    return files, [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


@pytest.fixture(scope="module")
def normal_headers(chest_series: Path) -> list[pydicom.Dataset]:
    """normal001 headers in cranio-caudal order (by the label index of its slices CSV)."""
    files, datasets = _headers(chest_series / "normal001")
    rows = {
        r["file"]: int(r["label_index"])
        for r in csv.DictReader((chest_series / "normal001-slices.csv").open())
    }
    return [
        ds for _, ds in sorted(zip(files, datasets, strict=True), key=lambda p: rows[p[0].name])
    ]


@pytest.mark.parametrize("series", ["P002", "cap002", "normal001"])
def test_real_series_follow_label_order(chest_series: Path, series: str) -> None:
    files, datasets = _headers(chest_series / series)
    labels = {
        r["file"]: int(r["label_index"])
        for r in csv.DictReader((chest_series / f"{series}-slices.csv").open())
    }
    result = order_slices(datasets)
    assert result.method == METHOD_GEOMETRY
    assert [labels[files[i].name] for i in result.indices] == list(range(len(files)))
    # The README: label order = descending SliceLocation = ascending InstanceNumber here.
    ordered = [datasets[i] for i in result.indices]
    assert [int(ds.InstanceNumber) for ds in ordered] == sorted(
        int(ds.InstanceNumber) for ds in ordered
    )
    assert result.spacing == pytest.approx(2.0, abs=1e-3)
    assert result.gaps == () and not result.tilt and result.warnings == ()


def test_lung_pet_ct_dx_is_cranial_first(shared_data: Path) -> None:
    _, datasets = _headers(shared_data / "lung-pet-ct-dx" / "Lung_Dx-A0002-B40f")
    result = order_slices(datasets)
    z = [float(datasets[i].ImagePositionPatient[2]) for i in result.indices]
    assert z == sorted(z, reverse=True)
    assert result.spacing == pytest.approx(8.0, abs=1e-3)


def _tilted(headers: list[pydicom.Dataset], degrees: float) -> list[pydicom.Dataset]:
    """Copies re-written as a gantry-tilted acquisition: plane tilted about x, table along z."""
    t = np.radians(degrees)
    out = []
    for ds in headers:
        c = copy.deepcopy(ds)
        c.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t))]
        c.GantryDetectorTilt = degrees
        out.append(c)
    return out


def test_tilted_shuffled_series_orders_and_reports_tilt(
    normal_headers: list[pydicom.Dataset],
) -> None:
    tilted = _tilted(normal_headers[:30], 20.0)
    shuffled = list(range(len(tilted)))
    random.Random(4).shuffle(shuffled)
    result = order_slices([tilted[i] for i in shuffled])
    assert [shuffled[i] for i in result.indices] == list(range(len(tilted)))
    assert result.tilt
    assert any("tilt" in w for w in result.warnings)
    # Positions are along the tilted normal: the 2 mm table step projects to 2 cos(20 deg).
    assert result.spacing == pytest.approx(2.0 * np.cos(np.radians(20.0)), abs=1e-3)


def test_tilt_found_from_geometry_without_the_tilt_tag(
    normal_headers: list[pydicom.Dataset],
) -> None:
    tilted = _tilted(normal_headers[:10], 15.0)
    for ds in tilted:
        del ds.GantryDetectorTilt
    assert order_slices(tilted).tilt


def test_gap_and_duplicate_reported(normal_headers: list[pydicom.Dataset]) -> None:
    kept = normal_headers[:10] + normal_headers[13:20] + [copy.deepcopy(normal_headers[5])]
    result = order_slices(list(reversed(kept)))
    assert len(result.indices) == len(kept)
    assert len(result.gaps) == 1
    gap = result.gaps[0]
    assert gap.missing == 3 and gap.step_mm == pytest.approx(8.0)
    # The gap sits after the 11th ordered slice (10 slices + the duplicate of slice 5).
    assert gap.after == 10
    assert any("share a position" in w for w in result.warnings)
    assert any("missing" in w for w in result.warnings)


def test_fallbacks_when_geometry_is_missing(normal_headers: list[pydicom.Dataset]) -> None:
    subset = [copy.deepcopy(ds) for ds in normal_headers[:8]]
    rng = random.Random(1)
    order = list(range(8))
    rng.shuffle(order)
    shuffled = [subset[i] for i in order]
    del shuffled[3].ImagePositionPatient
    result = order_slices(shuffled)
    assert result.method == METHOD_SLICE_LOCATION
    assert [order[i] for i in result.indices] == list(range(8))
    assert any("SliceLocation" in w for w in result.warnings)
    for ds in shuffled:
        del ds.SliceLocation
    result = order_slices(shuffled)
    assert result.method == METHOD_INSTANCE_NUMBER
    assert [order[i] for i in result.indices] == list(range(8))
    for ds in shuffled:
        del ds.InstanceNumber
    result = order_slices(shuffled)
    assert result.method == METHOD_INPUT_ORDER and result.indices == tuple(range(8))


def test_empty_and_single() -> None:
    assert order_slices([]).indices == ()
    ds = pydicom.Dataset()
    assert order_slices([ds]).indices == (0,)
