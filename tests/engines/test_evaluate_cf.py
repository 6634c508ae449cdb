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
    # the shipped model was trained on these patients: the output must say so
    assert report["data_overlap"]["scored_patients_in_training_set"] == 75
    assert "training-set" in report["data_overlap"]["note"]
    for name in ("cf-roc.png", "cf-confusion.png", "cf_eval.json"):
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


@pytest.mark.slow
def test_cv_cf_tiny(shared_data: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(ictcf=shared_data / "ictcf", folds=3, repeats=2, epochs=3,
                              limit=90, out=tmp_path, no_progress=True)
    assert cv_cf.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["auc"]) == set(CLASS_KEYS)
    stats = report["per_fold"]["auc"]["covid_vs_control"]
    assert stats["n"] == 6 and stats["min"] <= stats["mean"] <= stats["max"]
    assert report["pooled_oof_auc_per_repeat"]["control"]["n"] == 2
    assert (tmp_path / "cv_cf.json").is_file()
    with (tmp_path / "cf_scores_oof.csv").open() as fh:
        assert sum(1 for _ in fh) == 91
