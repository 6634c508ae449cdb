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
from schemas.errors import EngineError, InputError
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
    """End to end through the CLI function: a few epochs on a subset. The exported ensemble
    runs through the backend interface; each training patient is held out of exactly one
    member, and that member, read back from the ONNX, gives the out-of-fold scores written at
    training; the sensitive threshold reaches its target on them."""
    args = argparse.Namespace(ictcf=shared_data / ICTCF, out=tmp_path, epochs=3, folds=3,
                              target_sn=0.9, seed=0, limit=120, no_progress=True)
    assert training.main(args) == 0
    meta = json.loads((tmp_path / "cf.json").read_text())
    assert meta["feature_order"] == [f.code for f in catalogue()]
    assert meta["training"]["patients"] == 120
    assert meta["training"]["platform"]["torch_threads"] == 1  # train cf runs on one thread
    assert meta["ensemble"]["members"] == 3
    held = meta["training"]["held_out_by"]
    assert len(held) == 120 and sorted(set(held)) == [0, 1, 2]
    # calibrated from the uniform prior of the class-weighted fit to the subset's frequencies
    counts = np.array([meta["training"]["class_counts"][c] for c in cf.CLASSES])
    np.testing.assert_allclose(meta["calibration"]["prior"], counts / counts.sum())
    assert meta["calibration"]["trained_prior"] == list(cf.UNIFORM_PRIOR)
    model = cf.CfModel(tmp_path / "cf.onnx")
    assert model.member_count == 3
    assert model.calibration.prior == tuple(meta["calibration"]["prior"])
    x = cf.vectorise_many([p.values for p in cohort.patients[:37]])
    proba = model.predict(x)
    assert proba.shape == (37, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    # the OOF file holds the subset used, as the ONNX members score it
    with (tmp_path / training.OOF_FILE).open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in rows] == meta["training"]["patient_ids"]
    written = np.array([[float(r[c]) for c in cf.CLASSES] for r in rows])
    by_id = {p.patient_id: p for p in cohort.patients}
    xs = cf.vectorise_many([by_id[r["patient_id"]].values for r in rows])
    again, oof = model.predict_out_of_fold(xs, [r["patient_id"] for r in rows])
    assert oof.all()
    np.testing.assert_allclose(again, written, atol=2e-5)
    covid = written[:, 1] + written[:, 2]
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


def test_train_needs_two_folds(shared_data: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(ictcf=shared_data / ICTCF, out=tmp_path, epochs=1, folds=1,
                              target_sn=0.9, seed=0, limit=60, no_progress=True)
    assert training.main(args) == 2
    assert "--folds" in capsys.readouterr().err
    assert not (tmp_path / "cf.onnx").exists()


def test_onnx_export_matches_torch(tmp_path: Path, cohort: ictcf.Cohort) -> None:
    """The exported ensemble's ``members`` output is each torch network's softmax and its
    ``proba`` their mean; ``CfModel.predict`` applies the temperature of ``cf.json``."""
    data = training.scored_dataset(cohort)
    nets = [training.fit(data.x[:150], data.y[:150], training.TrainConfig(epochs=2, seed=s))
            for s in (3, 4)]
    training.export_onnx(nets, data.x.shape[1], tmp_path / "m.onnx")
    meta = {"version": "t", "feature_order": cf.feature_order(),
            "thresholds": {"general": "argmax", "sensitive": {"covid_probability": 0.5}}}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    model = cf.CfModel(tmp_path / "m.onnx")
    assert model.member_count == 2 and model.calibration.is_identity
    x = data.x[150:260]
    each = [training.predict_torch(n, x) for n in nets]
    np.testing.assert_allclose(model.predict(x), np.mean(each, axis=0), atol=1e-5)
    assert model.predict(x[:1]).shape == (1, 3)  # dynamic batch
    # the GPU path's FP16 variant converts and agrees (no graph output feeds another node)
    from engines.fp16 import convert_to_fp16

    assert convert_to_fp16(tmp_path / "m.onnx", tmp_path / "m.fp16.onnx").max_abs_diff < 1e-2
    # a patient listed as held out of member 1 is scored by member 1 alone
    meta["training"] = {"patient_ids": ["a", "b"], "held_out_by": [1, 0]}
    meta["calibration"] = {"prior": [0.2, 0.5, 0.3], "temperature": 2.0}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    model = cf.CfModel(tmp_path / "m.onnx")
    cal = cf.Calibration(prior=(0.2, 0.5, 0.3), temperature=2.0)
    proba, oof = model.predict_out_of_fold(x[:3], ["a", "b", "new"])
    assert oof.tolist() == [True, True, False]
    np.testing.assert_allclose(proba[0], cal.apply(each[1][0]), atol=1e-5)
    np.testing.assert_allclose(proba[1], cal.apply(each[0][1]), atol=1e-5)
    np.testing.assert_allclose(proba[2], model.predict(x[2:3])[0], atol=1e-6)
    np.testing.assert_allclose(model.predict(x), cal.apply(np.mean(each, axis=0)), atol=1e-5)
    raw, _ = model.predict_out_of_fold(x[:3], ["a", "b", "new"], calibrated=False)
    np.testing.assert_allclose(raw[0], each[1][0], atol=1e-5)
    # a member index the ONNX does not have is refused at load, not at the first patient
    meta["training"]["held_out_by"] = [2, 0]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="outside"):
        cf.CfModel(tmp_path / "m.onnx")


def test_apply_temperature() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.05, 0.15, 0.8]], dtype=np.float32)
    np.testing.assert_array_equal(cf.apply_temperature(p, 1.0), p)
    soft = cf.apply_temperature(p, 2.0)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
    assert (soft.max(axis=1) < p.max(axis=1)).all()  # T > 1 softens
    assert (soft.argmax(axis=1) == p.argmax(axis=1)).all()  # never changes the class
    np.testing.assert_allclose(cf.apply_temperature(soft, 0.5), p, atol=1e-6)  # invertible
    # equal to dividing the logits by T
    logits = np.log(p)
    expected = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(soft, expected, atol=1e-6)
    with pytest.raises(EngineError):
        cf.apply_temperature(p, 0.0)


def test_class_prior_calibration_undoes_class_weighting() -> None:
    """Scores fitted for equal class frequencies, times the cohort's frequencies,
    renormalised: p' = p * prior / trained_prior / sum."""
    p = np.array([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]], dtype=np.float32)
    cal = cf.Calibration(prior=(0.25, 0.5, 0.25))
    expected = p * np.array([0.25, 0.5, 0.25])
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(cal.apply(p), expected, atol=1e-6)
    assert not cal.is_identity and cf.Calibration().is_identity
    np.testing.assert_array_equal(cf.Calibration().apply(p), p)
    # the members axis (n, K, 3) is calibrated member by member
    stacked = np.stack([p, p[::-1]], axis=1)
    np.testing.assert_allclose(cal.apply(stacked)[:, 0], cal.apply(p), atol=1e-6)
    assert cf.Calibration.from_json(None).is_identity
    assert cf.Calibration.from_json(cal.to_json()) == cal
    for bad in ({"prior": [0.5, 0.5]}, {"prior": [0.0, 0.5, 0.5]}, {"prior": [0.5, 0.5, 0.5]},
                {"temperature": -1}, {"prior": "abc"}):
        with pytest.raises(EngineError):
            cf.Calibration.from_json(bad)


def test_fit_temperature_recovers_an_overconfident_scale() -> None:
    """Scores twice as sharp as the truth (logits x 2) are put back by T close to 2."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 1.5, size=(4000, 3))
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in truth])
    sharp = np.exp(2 * logits) / np.exp(2 * logits).sum(axis=1, keepdims=True)
    t = training.fit_temperature(y, sharp)
    assert 1.8 < t < 2.2
    before = training.calibration_measures(y, sharp)
    after = training.calibration_measures(y, cf.apply_temperature(sharp, t))
    assert after["log_loss"] < before["log_loss"]
    assert after["ece_top_label"] < before["ece_top_label"] / 2


def test_expected_calibration_error() -> None:
    # every score 0.9, half positive: off by 0.4 everywhere
    assert training.expected_calibration_error(np.r_[np.ones(50), np.zeros(50)],
                                               np.full(100, 0.9)) == pytest.approx(0.4)
    # two bins, each exactly calibrated
    y = np.r_[np.ones(2), np.zeros(8), np.ones(8), np.zeros(2)]
    s = np.r_[np.full(10, 0.2), np.full(10, 0.8)]
    assert training.expected_calibration_error(y, s) == pytest.approx(0.0)
    assert training.expected_calibration_error(np.zeros(0), np.zeros(0)) is None
    bins = training.reliability_bins(y, s)
    assert [(b["bin"], b["n"]) for b in bins] == [(2, 10), (8, 10)]
    # a score of exactly 1.0 falls in the top bin, not past it
    assert training.reliability_bins(np.ones(1), np.ones(1))[0]["bin"] == training.ECE_BINS - 1


def test_shipped_model_loads_and_predicts(cohort: ictcf.Cohort) -> None:
    model = cf.CfModel.load_default()
    assert model.version.startswith("cf-")
    assert 0.0 < model.thresholds["sensitive"]["covid_probability"] < 1.0
    proba = model.predict_values([p.values for p in cohort.patients[:5]])
    assert proba.shape == (5, 3)
    with pytest.raises(InputError):
        model.predict(np.zeros((2, 5), np.float32))
