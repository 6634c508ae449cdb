"""``hust19 evaluate cf`` and ``hust19 evaluate cv cf`` on subsets of the real iCTCF tables."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import pytest

from engines.evaluation import cf as evaluate_cf
from engines.evaluation import cv_cf

CLASS_KEYS = ("control", "type1", "type2", "covid_vs_control")


def _subset(shared_data: Path, folder: Path, per_label: int, *, with_labs: bool) -> Path:
    """``per_label`` patients of each label (suspected included) in ``folder``, with the wide
    features, and the long lab table beside it when ``with_labs``."""
    src = shared_data / "ictcf"
    rows = list(csv.DictReader((src / "patients.csv").open()))
    keep: list[dict[str, str]] = []
    for label in ("control", "type1", "type2", "suspected"):
        keep += [r for r in rows if r["label"] == label][:per_label]
    ids = {r["patient_id"] for r in keep}
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "patients.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    names = ["clinical_features.csv"] + (["lab_results.csv"] if with_labs else [])
    for name in names:
        lines = (src / name).read_text().splitlines(keepends=True)
        (folder / name).write_text(lines[0] + "".join(
            ln for ln in lines[1:] if ln.split(",", 1)[0] in ids))
    return folder


def _run(folder: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    args = argparse.Namespace(patients=folder / "patients.csv",
                              features=folder / "clinical_features.csv", out=out, model=None)
    assert evaluate_cf.main(args) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def test_evaluate_cf_shape_suspected_and_overlap(shared_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = _subset(shared_data, tmp_path / "d", 25, with_labs=True)
    report = _run(folder, tmp_path / "out", capsys)
    assert set(report["auc"]) == set(CLASS_KEYS)
    assert all(0.0 <= float(report["auc"][k]) <= 1.0 for k in CLASS_KEYS)
    counts = report["counts"]
    assert counts["patients"] == 100 and counts["scored"] == 75
    assert counts["suspected_predicted_not_scored"] == 25
    assert sum(report["suspected_predicted"].values()) == 25
    assert sum(map(sum, report["confusion_argmax"]["matrix"])) == 75  # suspected not scored
    assert report["per_class"]["type1"]["n"] == 75
    assert report["range_source"] == "lab_results"
    # the shipped model was developed on these patients: each is scored by the ensemble
    # member that did not see it, and the output says so
    assert report["data_overlap"]["scored_patients_in_training_set"] == 75
    assert report["scoring"]["out_of_fold"] == 75
    assert report["data_overlap"]["scored_in_training_set_not_out_of_fold"] == 0
    assert "out-of-fold" in report["data_overlap"]["note"]
    assert report["scoring"]["ensemble"] == 0  # every scored patient here is a dev patient
    cal = report["calibration"]
    assert len(cal["prior"]) == 3 and 0.0 <= cal["after"]["ece_covid"] <= 1.0
    assert sum(b["n"] for b in cal["reliability_covid"]) == 75
    assert set(report["by_hospital"]) <= {"HUST-Union Hospital", "HUST-Liyuan Hospital"}
    for name in ("cf-roc.png", "cf-confusion.png", "cf-reliability.png", "cf_eval.json"):
        assert (tmp_path / "out" / name).is_file()


def test_evaluate_cf_catalogue_ranges_are_reported(shared_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = _subset(shared_data, tmp_path / "d", 10, with_labs=False)
    report = _run(folder, tmp_path / "out", capsys)
    assert report["range_source"] == "catalogue"


def test_evaluate_cf_bad_input_exit_2(tmp_path: Path, shared_data: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(patients=tmp_path / "nope.csv",
                              features=shared_data / "ictcf" / "clinical_features.csv",
                              out=None, model=None)
    assert evaluate_cf.main(args) == 2
    err = capsys.readouterr().err
    assert "nope.csv" in err and "Traceback" not in err


def _cv_args(shared_data: Path, out: Path, **kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"ictcf": shared_data / "ictcf", "folds": 3, "repeats": 2,
                            "members": 2, "group": None, "epochs": 3, "limit": 90,
                            "out": out, "no_progress": True}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.slow
def test_cv_cf_tiny(shared_data: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cv_cf.main(_cv_args(shared_data, tmp_path)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["members"] == 2 and "ensemble of 2" in report["recipe"]
    assert set(report["auc"]) == set(CLASS_KEYS)
    stats = report["per_fold"]["auc"]["covid_vs_control"]
    assert stats["n"] == 6 and stats["min"] <= stats["mean"] <= stats["max"]
    assert report["pooled_oof_auc_per_repeat"]["control"]["n"] == 2
    cal = report["calibration_per_repeat"]
    for way in ("uncalibrated", "shipped", "temperature"):
        assert cal[way]["ece_covid"]["n"] == 2 and cal[way]["log_loss"]["n"] == 2
    assert report["temperature_alternative"]["n"] == 6
    held_out = report["sensitive_cut_held_out_per_repeat"]
    assert held_out["sn"]["n"] == 2 and 0.0 <= held_out["sn"]["mean"] <= 1.0
    assert (tmp_path / "cv_cf.json").is_file()
    with (tmp_path / "cf_scores_oof.csv").open() as fh:
        assert sum(1 for _ in fh) == 91


def test_cv_cf_single_network_is_the_old_protocol(shared_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--members 1: one network per split, uncalibrated (shipped = uncalibrated), no
    temperature alternative (no inner out-of-fold scores to fit it on)."""
    assert cv_cf.main(_cv_args(shared_data, tmp_path, repeats=1, members=1, epochs=2)) == 0
    report = json.loads(capsys.readouterr().out)
    assert "one network" in report["recipe"]
    cal = report["calibration_per_repeat"]
    assert cal["uncalibrated"]["log_loss"]["mean"] == pytest.approx(
        cal["shipped"]["log_loss"]["mean"])
    assert "temperature" not in cal and report["temperature_alternative"] is None


def test_cv_cf_by_hospital(shared_data: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """--group hospital: one direction per hospital, trained on it alone and tested on the
    other, each with its ROC PNG."""
    assert cv_cf.main(_cv_args(shared_data, tmp_path, group="hospital", limit=300,
                               epochs=2)) == 0
    report = json.loads(capsys.readouterr().out)
    directions = report["directions"]
    assert set(directions) == {"HUST-Liyuan Hospital -> HUST-Union Hospital",
                               "HUST-Union Hospital -> HUST-Liyuan Hospital"}
    for d in directions.values():
        assert d["train"]["hospital"] != d["test"]["hospital"]
        assert d["train"]["patients"] + d["test"]["patients"] == 300
        assert set(d["auc"]) == set(CLASS_KEYS)
        assert 0.0 <= d["sensitive_cut_from_training_hospital"]["sn"] <= 1.0
        assert set(d["calibration"]) == {"uncalibrated", "shipped", "temperature"}
        assert Path(d["figure"]).is_file()
    assert (tmp_path / "cv_cf_hospital.json").is_file()
    probe = report["missingness_probe"]
    assert probe["hospital_from_mask"] > 0.95  # the test menus differ between the hospitals
    assert set(probe["inputs_measured_at_one_hospital_only"]) == {
        "HUST-Liyuan Hospital", "HUST-Union Hospital"}


def test_cv_cf_bad_flags_exit_2(shared_data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cv_cf.main(_cv_args(shared_data, tmp_path, members=0)) == 2
    assert "--members" in capsys.readouterr().err
