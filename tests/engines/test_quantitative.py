"""Lung segmentation and quantitative CT in HU (engines.lung_segmentation,
engines.quantitative, engines.ct_analysis): phantoms of known volume and density, the bad
series the method must refuse or qualify, and every shared series within stated bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines import ct_analysis, lung_segmentation, quantitative
from engines.evidence import EvidenceModel
from engines.lung_segmentation import LEFT, RIGHT
from engines.training.series_data import LabelledSeries, load_volume
from engines.volume import SeriesVolume
from tests.fixtures.phantoms import PIXEL_MM, SLICE_MM, Phantom, Sphere, chest_phantom

PX = (PIXEL_MM, PIXEL_MM)


def measure(ph: Phantom, **kwargs: object) -> quantitative.Quantification:
    seg = lung_segmentation.segment(ph.hu, PX, SLICE_MM)
    return quantitative.quantify(ph.hu, seg, SLICE_MM, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clear() -> Phantom:
    return chest_phantom()


def test_phantom_lungs_are_found_with_their_volume_and_side(clear: Phantom) -> None:
    seg = lung_segmentation.segment(clear.hu, PX, SLICE_MM)
    assert seg.reason is None and seg.warnings == () and not seg.partial_coverage
    full = seg.full(np)
    for painted, label in ((clear.right, RIGHT), (clear.left, LEFT)):
        found = full == label
        overlap = float((found & painted).sum()) / float(painted.sum())
        assert overlap > 0.97, f"lung {label}: {overlap:.3f} of the painted lung found"
        assert float((found & ~painted).sum()) / float(painted.sum()) < 0.03
    assert not (full[:, :, :] > 0)[:, 190:210, 246:266].any(), "the trachea is not lung"
    flipped = lung_segmentation.segment(clear.hu, PX, SLICE_MM, left_at_higher_columns=False)
    assert ((flipped.full(np) == LEFT) == (full == RIGHT)).all()
    q = quantitative.quantify(clear.hu, seg, SLICE_MM)
    assert q.lungs is not None and q.right is not None and q.left is not None
    assert q.lungs.volume_ml == pytest.approx(clear.lung_ml, rel=0.03)
    assert q.right.volume_ml == pytest.approx(float(clear.right.sum()) * clear.voxel_ml,
                                              rel=0.03)
    assert q.lungs.involvement_percent is not None and q.lungs.involvement_percent < 0.05, \
        "the 3 mm vessels are not opacities"
    assert q.lungs.well_aerated_percent is not None and q.lungs.well_aerated_percent > 95


@pytest.mark.parametrize(("hu", "pattern"), [(-550, "ground_glass_percent"),
                                            (-20, "consolidation_percent")])
def test_an_opacity_of_known_size_and_density_is_measured(hu: int, pattern: str) -> None:
    ph = chest_phantom(spheres=(Sphere((24, 250, 150), 14.0, hu),
                                Sphere((24, 250, 360), 11.0, hu)))
    q = measure(ph)
    assert q.lungs is not None and q.right is not None and q.left is not None
    truth = ph.involvement_percent
    assert q.lungs.involvement_percent == pytest.approx(truth, rel=0.15)
    assert getattr(q.lungs, pattern) == pytest.approx(truth, rel=0.15)
    other = "consolidation_percent" if pattern == "ground_glass_percent" else \
        "ground_glass_percent"
    assert getattr(q.lungs, other) < 0.15 * truth
    right_truth = 100.0 * float((ph.opacity & ph.right).sum()) / float(ph.right.sum())
    assert q.right.involvement_percent == pytest.approx(right_truth, rel=0.15)


def test_thick_slices_gaps_and_partial_coverage_give_no_wrong_number(clear: Phantom) -> None:
    thick = measure(clear, slice_thickness_mm=8.0)
    assert thick.lungs is not None and thick.lungs.involvement_percent is None
    assert thick.lungs.volume_ml is not None
    assert any("8 mm thick" in w for w in thick.warnings)
    gaps = measure(clear, missing_slices=2)
    assert gaps.lungs is not None and gaps.lungs.volume_ml is None
    assert gaps.lungs.involvement_percent is not None
    partial = chest_phantom(lung_slices=(-12, 36))  # the apex above the first slice
    seg = lung_segmentation.segment(partial.hu, PX, SLICE_MM)
    assert seg.partial_coverage and "apex" in seg.warnings[0]
    q = quantitative.quantify(partial.hu, seg, SLICE_MM)
    assert q.lungs is not None and q.lungs.volume_ml is None


def test_no_lungs_or_no_spacing_is_a_reason(clear: Phantom) -> None:
    abdomen = clear.hu[:4]  # above the lungs: body and a trachea only
    seg = lung_segmentation.segment(abdomen, PX, SLICE_MM)
    assert seg.reason is not None and "no lungs in view" in seg.reason
    q = quantitative.quantify(abdomen, seg, SLICE_MM)
    assert q.lungs is None and q.reason == seg.reason
    unknown = lung_segmentation.segment(clear.hu, PX, None)
    assert unknown.reason is not None and "slice spacing unknown" in unknown.reason


def test_many_missing_slices_are_not_measured(clear: Phantom) -> None:
    from engines import series

    order = series.SeriesOrder(indices=tuple(range(len(clear.hu))),
                               positions=tuple(range(len(clear.hu))), spacing=SLICE_MM,
                               gaps=(series.SliceGap(10, 8, 18.0),))
    vol = SeriesVolume(clear.hu, tuple(f"s{i}" for i in range(len(clear.hu))), PX, SLICE_MM,
                       None, 8, True, order)
    analysis = ct_analysis.analyse(vol, EvidenceModel.load())
    assert analysis.stage is None and analysis.reason is not None
    assert "missing" in analysis.reason


# --- the shared series ------------------------------------------------------------------------
BOUNDS = {  # series: (lung volume ml low, high, involvement % low, high)
    "P002": (3500, 4500, 2.0, 6.0),
    "cap002": (3500, 4500, 0.5, 3.0),
    "normal001": (3000, 4000, 0.0, 0.5),
}


@pytest.fixture(scope="module")
def shared_analyses(chest_series: Path, shared_data: Path) -> dict[str, ct_analysis.CtAnalysis]:
    model = EvidenceModel.load()
    out = {}
    for name in (*BOUNDS, "lung-pet-ct-dx"):
        folder = (shared_data / "lung-pet-ct-dx" / "Lung_Dx-A0002-B40f"
                  if name == "lung-pet-ct-dx" else chest_series / name)
        volume, _ = load_volume(LabelledSeries(name, folder, name != "normal001"))
        out[name] = ct_analysis.analyse(volume, model, series_uid=name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BOUNDS))
def test_shared_series_measure_within_the_stated_bounds(
        shared_analyses: dict[str, ct_analysis.CtAnalysis], name: str) -> None:
    analysis = shared_analyses[name]
    low, high, inv_low, inv_high = BOUNDS[name]
    q = analysis.quant
    assert q.lungs is not None and q.right is not None and q.left is not None
    assert q.lungs.volume_ml is not None and low <= q.lungs.volume_ml <= high
    assert q.right.volume_ml is not None and q.left.volume_ml is not None
    assert 0.35 < q.left.volume_ml / q.lungs.volume_ml < 0.55
    assert analysis.stage is not None
    assert inv_low <= analysis.stage.involvement_percent <= inv_high
    expected = "CT-0" if name == "normal001" else "CT-1"
    assert analysis.stage.severity == expected
    assert len(analysis.top) == 10


@pytest.mark.slow
def test_involvement_is_where_the_readers_marked_it(
        shared_analyses: dict[str, ct_analysis.CtAnalysis]) -> None:
    """P002's readers marked only left lobes (LLL, LUL): its left lung carries the opacities;
    cap002 has both lower lobes marked: both lungs above the normal series'."""
    p002, cap002, normal = (shared_analyses[n].quant for n in ("P002", "cap002", "normal001"))
    assert p002.left is not None and p002.right is not None
    assert p002.left.involvement_percent > 5 * p002.right.involvement_percent  # type: ignore[operator]
    assert normal.lungs is not None and normal.lungs.involvement_percent is not None
    for side in ("left", "right"):
        figures = getattr(cap002, side)
        assert figures.involvement_percent > 2 * normal.lungs.involvement_percent


@pytest.mark.slow
def test_the_thick_lung_cancer_series_has_lungs_but_no_involvement(
        shared_analyses: dict[str, ct_analysis.CtAnalysis]) -> None:
    analysis = shared_analyses["lung-pet-ct-dx"]
    assert analysis.quant.lungs is not None and analysis.quant.lungs.volume_ml is not None
    assert 2300 <= analysis.quant.lungs.volume_ml <= 3200
    assert analysis.stage is None and analysis.reason is not None
    assert "8 mm thick" in analysis.reason


def test_a_tilted_series_is_ordered_along_the_normal_and_measured_with_a_warning(
        clear: Phantom) -> None:
    """Gantry tilt: the slice positions step off the slice normal; the order is along the
    normal, the volume is right under the shear, and the result says the series was tilted."""
    import pydicom

    from engines import volume as volume_mod

    headers, pixels, keys = [], [], []
    order = np.random.default_rng(5).permutation(len(clear.hu))
    for i in order:  # any arrival order
        ds = pydicom.Dataset()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.35 * i, -SLICE_MM * i]  # 10 degrees of shear
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.SliceThickness = SLICE_MM
        headers.append(ds)
        pixels.append(clear.hu[i])
        keys.append(f"s{i}")
    vol = volume_mod.assemble(headers, pixels, keys, "tilted")
    assert vol.order.tilt and any("gantry tilt" in w for w in vol.warnings)
    assert vol.keys == tuple(f"s{i}" for i in range(len(clear.hu)))
    assert vol.slice_mm == pytest.approx(SLICE_MM)
    analysis = ct_analysis.analyse(vol, EvidenceModel.load())
    assert analysis.stage is not None and analysis.quant.lungs is not None
    assert analysis.quant.lungs.volume_ml == pytest.approx(clear.lung_ml, rel=0.03)
    assert any("gantry tilt" in w for w in analysis.warnings)
