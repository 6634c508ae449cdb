"""``hust19 train patient`` (``engines.training.patient``): pseudo-patients through the run-time
selection, the exported model, the out-of-fold scores for the fusion, resuming."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.backends import OnnxRuntimeBackend
from engines.inference import file_sha256
from engines.networks import PATIENT_CLASSES
from engines.slice_model import MODELS_DIR
from engines.training import common
from engines.training.patient import OOF_CSV, SERIES_LABELS
from tests.fixtures.site import Site

PER_SERIES = 2
PER_PUBLIC_CLASS = 3
FOLDS = 2


def _train(shared_data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "agent.cli", "train", "patient", "--data", str(shared_data),
           "--out", str(out), "--limit", "12", "--per-series", str(PER_SERIES),
           "--per-public-class", str(PER_PUBLIC_CLASS), "--folds", str(FOLDS),
           "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@dataclass(frozen=True)
class FirstRun:
    """One tiny training (one epoch), as written before any test touched its folder."""

    out: Path
    onnx: bytes
    oof: str


@pytest.fixture(scope="module")
def first_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    out = tmp_path_factory.mktemp("patient")
    run = _train(shared_data, out, "--epochs", "1")
    assert run.returncode == 0, run.stderr
    return FirstRun(out, (out / "patient.onnx").read_bytes(), (out / OOF_CSV).read_text())


def test_tiny_run_exports_and_scores_out_of_fold(first_run: FirstRun) -> None:
    """One epoch on 12 slices per source: a 10-channel ONNX model tied to the slice model that
    selected its inputs; one out-of-fold row per pseudo-patient, every series' pseudo-patients
    in one fold (a fold model never saw a run of the series it scores)."""
    out = first_run.out
    meta = json.loads((out / "patient.json").read_text())
    assert meta["slice_model"]["sha256"] == file_sha256(MODELS_DIR / "slice.onnx")
    assert meta["export_check_max_abs_diff"] < common.EXPORT_TOLERANCE
    assert meta["training"]["platform"]["libraries"]["torch"] == torch.__version__
    assert OnnxRuntimeBackend(out / "patient.onnx").inputs[0].shape == (-1, 10, 200, 200)

    rows = list(csv.DictReader(io.StringIO(first_run.oof)))
    counts = meta["training"]["pseudo_patients"]
    assert len(rows) == sum(counts.values())
    assert {lab: sum(r["label"] == lab for r in rows) for lab in counts} == counts
    proba = np.array([[float(r[c]) for c in PATIENT_CLASSES] for r in rows])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    series_folds: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        series_folds[r["pseudo_patient_id"].split("-")[0]].add(r["fold"])
    assert {name: len(series_folds[name]) for name in SERIES_LABELS} == \
        dict.fromkeys(SERIES_LABELS, 1)
    assert sum(r["pseudo_patient_id"].startswith(tuple(SERIES_LABELS)) for r in rows) == \
        PER_SERIES * len(SERIES_LABELS)
    assert {r["label"] for r in rows if r["pseudo_patient_id"].startswith("P002")} == {"covid"}


def test_resume_continues_the_checkpoint(shared_data: Path, first_run: FirstRun,
                                         tmp_path: Path) -> None:
    """A resumed run to epoch 2 continues the first run's checkpoint (on a copy of it)."""
    out = tmp_path / "resumed"
    shutil.copytree(first_run.out, out)
    run = _train(shared_data, out, "--epochs", "2", "--resume")
    assert run.returncode == 0, run.stderr
    assert "resuming" in run.stderr
    state = json.loads((out / "final" / common.CHECKPOINT_JSON).read_text())
    assert state["epoch"] == 2 and len(state["losses"]) == 2


def test_a_data_folder_without_the_series_is_a_one_line_error(tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    run = _train(empty, tmp_path / "out", "--epochs", "1")
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("hust19: error:")]
    assert len(errors) == 1 and "P002-slices.csv" in errors[0]
    assert "Traceback" not in run.stderr


def _weights(model: bytes) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t)
            for t in onnx.load_from_string(model).graph.initializer}


def test_training_twice_on_one_machine_gives_the_same_model(shared_data: Path,
                                                            first_run: FirstRun,
                                                            tmp_path: Path) -> None:
    """Same data, seed and machine: the same graph, weights and out-of-fold scores to float
    rounding (usually the same bytes; once, on CI, one weight differed in its last bit; across
    CPUs the rounding differs more, ``docs/models/cf.md``)."""
    run = _train(shared_data, tmp_path, "--epochs", "1")
    assert run.returncode == 0, run.stderr
    again, first = _weights((tmp_path / "patient.onnx").read_bytes()), _weights(first_run.onnx)
    assert again.keys() == first.keys() and len(first) > 4
    for name, array in first.items():
        np.testing.assert_allclose(again[name], array, rtol=1e-5, atol=1e-7, err_msg=name)
    again_rows, first_rows = (list(csv.DictReader(io.StringIO(text))) for text in
                              ((tmp_path / OOF_CSV).read_text(), first_run.oof))
    keys = ("pseudo_patient_id", "label", "fold")
    assert [[r[k] for k in keys] for r in again_rows] == [[r[k] for k in keys] for r in first_rows]
    np.testing.assert_allclose([[float(r[c]) for c in PATIENT_CLASSES] for r in again_rows],
                               [[float(r[c]) for c in PATIENT_CLASSES] for r in first_rows],
                               atol=2e-6)  # the CSV keeps 6 decimals


def test_site_patients_train_with_out_of_fold_report_and_card(tiny_site: Site,
                                                              tmp_path: Path) -> None:
    """Each site series with a class is one patient; the out-of-fold report, its plots and
    the card are written; the out-of-fold CSV is what ``train fusion --paired`` pairs with."""
    out = tmp_path / "site-patient"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "train", "patient",
                           "--series-dir", str(tiny_site.series_dir), "--labels",
                           str(tiny_site.labels), "--epochs", "1", "--folds", "2",
                           "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "oof-report.json").read_text())
    assert report["patients"] == 3
    assert report["class_counts"] == {"control": 2, "type1": 1, "type2": 0}
    assert "Out-of-fold" in (out / "card.md").read_text()
    for png in ("oof-roc.png", "oof-confusion.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    with (out / "patient_scores_oof.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["pseudo_patient_id"] for r in rows} == {"P002", "cap002", "normal001"}
