"""The slice evidence scorer: its run-time pieces, and the gate of the shipped model.

The gate recomputes, from the shared series, the leave-one-series-out figures the card reports
(each series scored by a scorer chosen and fitted without it) with floors a little below them,
beside the position-only baseline it must beat; and it checks that the shipped coefficients
are the ones this training gives (an inverted, random or stale ``evidence.json`` fails)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.evidence import DEFAULT_JSON, EvidenceModel, FeatureSpec, features, top_slices
from engines.training import evidence as training
from engines.training.series_data import shared_series
from schemas.errors import EngineError

FLOORS = {"P002": 0.93, "cap002": 0.90}
"""Measured 0.968 and 0.945 (docs/models/evidence.md); the issue's target is 0.90 each."""
NORMAL_MAX_POSITIVE_SHARE = 0.05


def test_feature_normalises_by_the_series_largest_lung_section() -> None:
    lung = np.array([0, 100, 1000, 1000, 100, 0])
    opacity = np.array([0, 50, 50, 0, 0, 0])
    spec = FeatureSpec("core", area_floor=0.5, smoothing=1, epsilon=1e-3)
    x = np.exp(features(lung, opacity, spec)) - spec.epsilon
    # the small apical section is divided by half the largest section, not by its own area
    np.testing.assert_allclose(x, [0, 0.1, 0.05, 0, 0, 0], atol=1e-12)
    smoothed = np.exp(features(lung, opacity, FeatureSpec("core", 0.5, 3))) - 1e-3
    assert smoothed[3] == pytest.approx(0.05 / 3)
    with pytest.raises(EngineError):
        FeatureSpec("vessels")


def test_top_slices_are_the_highest_with_lung_in_slice_order() -> None:
    scores = np.array([0.9, 0.2, 0.8, 0.8, 0.1, 0.95])
    lung = np.array([0, 5, 5, 5, 5, 5])  # slice 0 has no lung
    assert top_slices(scores, lung, k=3).tolist() == [2, 3, 5]
    assert top_slices(scores, np.zeros(6), k=3).size == 0


def test_a_broken_document_is_an_engine_error(tmp_path: Path) -> None:
    doc = json.loads(DEFAULT_JSON.read_text())
    del doc["coef"]
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="not an evidence model"):
        EvidenceModel.load(path)


@pytest.fixture(scope="module")
def measured(shared_data: Path) -> list[training.SeriesFeatures]:
    items = shared_series(shared_data, training.DEFAULT_SERIES)
    return training.measure(items, cache=None, progress=False)


@pytest.mark.slow
def test_gate_leave_one_series_out_beats_the_floors_and_the_position_baseline(
        measured: list[training.SeriesFeatures]) -> None:
    reports = {r["series"]: r for r in training.leave_one_series_out(measured)}
    for name, floor in FLOORS.items():
        r = reports[name]
        auc = r["measures"]["auc"]
        assert auc >= floor, f"{name}: held-out AUC {auc:.3f} below {floor}"
        assert auc > r["position_baseline_auc"], f"{name}: not above the fitted position baseline"
        assert auc > r["position_raw_auc_best_direction"], f"{name}: not above raw position"
    assert reports["normal001"]["positive_lung_share"] <= NORMAL_MAX_POSITIVE_SHARE


@pytest.mark.slow
def test_gate_the_shipped_coefficients_are_what_the_training_gives(
        measured: list[training.SeriesFeatures]) -> None:
    doc = training.train(measured, "test")
    shipped = EvidenceModel.load()
    assert doc["feature"] == shipped.doc["feature"]
    assert doc["coef"] == pytest.approx(shipped.coef, rel=1e-6)
    assert doc["intercept"] == pytest.approx(shipped.intercept, rel=1e-6)
    assert shipped.coef > 0, "more opacity must mean more evidence"
    assert shipped.doc["evaluation"]["leave_one_series_out"] == \
        doc["evaluation"]["leave_one_series_out"]


def test_train_evidence_cli_from_a_site_folder_writes_model_card_and_plots(
        tmp_path: Path, chest_series: Path) -> None:
    """A site's layout (folder of series + labels CSV + slice labels CSV) through the CLI, on
    two series cut short to stay fast."""
    import csv
    import shutil

    site = tmp_path / "site"
    labels = [("P002", 1), ("normal001", 0)]
    with (tmp_path / "slice-labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["series", "file", "infection"])
        rows = list(csv.DictReader((chest_series / "P002-slices.csv").open()))
        keep = sorted(rows, key=lambda r: int(r["label_index"]))[60:100]
        (site / "P002").mkdir(parents=True)
        for r in keep:
            shutil.copy(chest_series / "P002" / r["file"], site / "P002" / r["file"])
            w.writerow(["P002", r["file"], r["infection"]])
    (site / "normal001").mkdir()
    normal = sorted(csv.DictReader((chest_series / "normal001-slices.csv").open()),
                    key=lambda r: int(r["label_index"]))[50:90]  # file names are not in order
    for r in normal:
        shutil.copy(chest_series / "normal001" / r["file"], site / "normal001" / r["file"])
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["series", "pneumonia"])
        w.writerows(labels)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "train", "evidence",
                           "--series-dir", str(site), "--labels", str(tmp_path / "labels.csv"),
                           "--slice-labels", str(tmp_path / "slice-labels.csv"),
                           "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr  # one series with both classes: no LOSO fit
    assert "hust19: error:" in proc.stderr and "Traceback" not in proc.stderr
    with (tmp_path / "labels.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow(["P002b", 1])
    shutil.copytree(site / "P002", site / "P002b")
    with (tmp_path / "slice-labels.csv").open("a", newline="") as fh:
        w = csv.writer(fh)
        for r in keep:
            w.writerow(["P002b", r["file"], r["infection"]])
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "train", "evidence",
                           "--series-dir", str(site), "--labels", str(tmp_path / "labels.csv"),
                           "--slice-labels", str(tmp_path / "slice-labels.csv"),
                           "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    model = EvidenceModel.load(out / "evidence.json")
    assert model.doc["training"]["series"] == ["P002", "normal001", "P002b"]
    assert "Leave one series out" in (out / "card.md").read_text()
    for png in ("roc-loso.png", "profile-P002.png", "profile-normal001.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
