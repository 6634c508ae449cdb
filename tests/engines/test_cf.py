"""engines.ictcf loading, engines.cf vectorising and the CF model (ONNX vs torch, training)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from engines import cf, ictcf
from engines.training import cf as training
from schemas.errors import InputError
from schemas.features import LabValue, by_code, catalogue

ICTCF = "ictcf"


@pytest.fixture(scope="module")
def cohort(shared_data: Path) -> ictcf.Cohort:
    return ictcf.load_cohort(shared_data / ICTCF)


def _index(code: str) -> int:
    return [f.code for f in catalogue()].index(code)


def test_parse_range_and_value() -> None:
    assert ictcf.parse_range("316-354 g/L") == (316.0, 354.0, "g/L")
    assert ictcf.parse_range("<15 mm/h") == (0.0, 15.0, "mm/h")
    assert ictcf.parse_range("1.003-1.030") == (1.003, 1.03, "")
    assert ictcf.parse_range("") == (None, None, "")
    assert ictcf.parse_value("<0.13") == (0.13, "<")
    assert ictcf.parse_value(">8.00") == (8.0, ">")
    assert ictcf.parse_value("-0.17") == (-0.17, "")
    with pytest.raises(InputError):
        ictcf.parse_value("positive")


def test_cohort_counts_and_outcomes_kept_out(cohort: ictcf.Cohort) -> None:
    assert len(cohort.patients) == 1276
    assert len(cohort.scored) == 977 and len(cohort.suspected) == 299
    codes = set(by_code())
    for p in cohort.patients:
        assert set(p.values) <= codes  # no outcome column (morbidity, ct_finding...) leaks in


def test_demographics_and_censoring(cohort: ictcf.Cohort) -> None:
    p1 = next(p for p in cohort.patients if p.patient_id == "1")
    assert p1.label == "type1" and p1.values["AGE"].value == 81.0
    assert p1.values["GENDER"].value == 1.0  # Male
    assert p1.values["UDIS"].value == 1.0  # "Hypertension, Thyroidectomy"
    assert p1.values["TEMP"].value == 36.6
    pct = p1.values["PCT"]  # printed "<0.13" with range "<0.5 ng/ml"
    assert (pct.value, pct.qualifier, pct.low, pct.high) == (0.13, "<", 0.0, 0.5)
    x = cf.vectorise(p1.values)
    assert x[_index("PCT")] == pytest.approx(0.13 / 0.5)
    no_udis = next(p for p in cohort.patients if p.values.get("UDIS") is not None
                   and p.values["UDIS"].value == 0.0)
    assert cf.vectorise(no_udis.values)[_index("UDIS")] == 0.0


def test_vectorise_missing_binary_and_catalogue_range() -> None:
    x = cf.vectorise({})
    assert x.dtype == np.float32 and x.shape == (len(catalogue()),)
    assert np.all(x == 0.5)  # everything missing
    x = cf.vectorise({"GENDER": LabValue("GENDER", 0.0), "UDIS": LabValue("UDIS", 3.0),
                      "TEMP": LabValue("TEMP", 38.6, unit="Cel"),
                      "MCHC": LabValue("MCHC", 335.0)})
    assert x[_index("GENDER")] == 0.0 and x[_index("UDIS")] == 1.0
    assert x[_index("TEMP")] == pytest.approx((38.6 - 36.0) / (37.3 - 36.0))
    assert x[_index("MCHC")] == pytest.approx((335 - 316) / (354 - 316))  # catalogue range


def test_printed_range_wins_over_catalogue() -> None:
    v = LabValue("MCHC", 335.0, unit="g/L", low=300.0, high=350.0)
    assert cf.vectorise({"MCHC": v})[_index("MCHC")] == pytest.approx(35 / 50)


def test_pa_in_mg_per_l_at_liyuan_uses_its_own_range(cohort: ictcf.Cohort) -> None:
    p = next(p for p in cohort.patients if p.patient_id == "782")
    pa = p.values["PA"]
    assert (pa.value, pa.unit, pa.low, pa.high) == (284.4, "mg/L", 180.0, 350.0)
    x = cf.vectorise(p.values)[_index("PA")]
    assert x == pytest.approx((284.4 - 180) / (350 - 180))
    # the same prealbumin at Union (g/L, its own range) lands at the same place
    union = LabValue("PA", 0.2844, unit="g/L", low=0.18, high=0.35)
    assert cf.vectorise({"PA": union})[_index("PA")] == pytest.approx(x, rel=1e-5)
    # no printed range: converted into the catalogue's g/L rather than compared raw
    bare = LabValue("PA", 284.4, unit="mg/L")
    assert cf.vectorise({"PA": bare})[_index("PA")] == pytest.approx(
        (0.2844 - 0.17) / (0.42 - 0.17), rel=1e-5)
    # an unconvertible unit without a printed range is treated as missing, not mis-scaled
    odd = LabValue("PDW", 15.9, unit="fl")
    assert cf.vectorise({"PDW": odd})[_index("PDW")] == 0.5


def test_all_pa_values_are_on_a_common_scale(cohort: ictcf.Cohort) -> None:
    """Whatever the hospital's unit, normalised prealbumin stays within a plausible band."""
    i = _index("PA")
    xs = np.array([cf.vectorise(p.values)[i] for p in cohort.patients if "PA" in p.values])
    hospitals = {p.values["PA"].unit for p in cohort.patients if "PA" in p.values}
    assert hospitals == {"g/L", "mg/L"}
    assert np.percentile(xs, 99) < 3.0 and np.percentile(xs, 1) > -3.0


def test_load_tables_wide_matches_long(shared_data: Path, cohort: ictcf.Cohort,
                                       tmp_path: Path) -> None:
    d = shared_data / ICTCF
    wide = ictcf.load_tables(d / "patients.csv", d / "clinical_features.csv")
    assert wide.range_source == "lab_results"
    a = cf.vectorise_many([p.values for p in cohort.patients[:200]])
    b = cf.vectorise_many([p.values for p in wide.patients[:200]])
    np.testing.assert_array_equal(a, b)
    # alone (no lab_results.csv / reference_ranges.csv beside it): catalogue ranges
    (tmp_path / "clinical_features.csv").write_text(
        "".join((d / "clinical_features.csv").open().readlines()[:40]))
    alone = ictcf.load_tables(d / "patients.csv", tmp_path / "clinical_features.csv")
    assert alone.range_source == "catalogue"


def test_unknown_label_is_input_error(tmp_path: Path, shared_data: Path) -> None:
    src = (shared_data / ICTCF / "patients.csv").read_text().splitlines()
    bad = tmp_path / "patients.csv"
    bad.write_text("\n".join([src[0], src[1].replace(",type1", ",maybe")]) + "\n")
    with pytest.raises(InputError, match="line 2"):
        ictcf.load_patients(bad)


@pytest.mark.slow
def test_train_cli_tiny_run(shared_data: Path, tmp_path: Path, cohort: ictcf.Cohort) -> None:
    """End to end through the CLI function: a few epochs on a subset; the exported ONNX runs
    through the backend interface and the sensitive threshold reaches its target on the
    out-of-fold scores it was chosen on."""
    args = argparse.Namespace(ictcf=shared_data / ICTCF, out=tmp_path, epochs=3, folds=3,
                              target_sn=0.9, seed=0, limit=120, no_progress=True)
    assert training.main(args) == 0
    meta = json.loads((tmp_path / "cf.json").read_text())
    assert meta["feature_order"] == [f.code for f in catalogue()]
    assert meta["training"]["patients"] == 120
    assert meta["training"]["platform"]["torch_threads"] == 1  # train cf runs on one thread
    model = cf.CfModel(tmp_path / "cf.onnx")
    x = cf.vectorise_many([p.values for p in cohort.patients[:37]])
    proba = model.predict(x)
    assert proba.shape == (37, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    # the OOF file holds the subset used; the sensitive threshold reaches 0.9 on it
    with (tmp_path / training.OOF_FILE).open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 120
    covid = np.array([float(r["type1"]) + float(r["type2"]) for r in rows])
    y = np.array([r["label"] != "control" for r in rows])
    cut = meta["thresholds"]["sensitive"]["covid_probability"]
    assert np.mean(covid[y] >= cut) >= 0.9


def test_training_twice_gives_the_same_model(shared_data: Path, tmp_path: Path) -> None:
    """Same data, same seed, same machine: byte-identical ONNX weights and out-of-fold
    scores. (Across machines the rounding differs: measured, ``hust19 train cf`` gave two
    different cf.onnx files on two CPUs; ``docs/models/cf.md``.)"""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = argparse.Namespace(ictcf=shared_data / ICTCF, out=out, epochs=3, folds=3,
                                  target_sn=0.9, seed=0, limit=120, no_progress=True)
        assert training.main(args) == 0
        runs.append(((out / "cf.onnx").read_bytes(), (out / training.OOF_FILE).read_text()))
    assert runs[0] == runs[1]


def test_onnx_export_matches_torch(tmp_path: Path, cohort: ictcf.Cohort) -> None:
    data = training.scored_dataset(cohort)
    cfg = training.TrainConfig(epochs=2, seed=3)
    net = training.fit(data.x[:150], data.y[:150], cfg)
    training.export_onnx(net, data.x.shape[1], tmp_path / "m.onnx")
    (tmp_path / "m.json").write_text(json.dumps({
        "version": "t", "feature_order": cf.feature_order(),
        "thresholds": {"general": "argmax", "sensitive": {"covid_probability": 0.5}}}))
    model = cf.CfModel(tmp_path / "m.onnx")
    x = data.x[150:260]
    np.testing.assert_allclose(model.predict(x), training.predict_torch(net, x), atol=1e-5)
    assert model.predict(x[:1]).shape == (1, 3)  # dynamic batch


def test_shipped_model_loads_and_predicts(cohort: ictcf.Cohort) -> None:
    model = cf.CfModel.load_default()
    assert model.version.startswith("cf-")
    assert 0.0 < model.thresholds["sensitive"]["covid_probability"] < 1.0
    proba = model.predict_values([p.values for p in cohort.patients[:5]])
    assert proba.shape == (5, 3)
    with pytest.raises(InputError):
        model.predict(np.zeros((2, 5), np.float32))
