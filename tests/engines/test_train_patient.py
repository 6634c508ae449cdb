"""``hust19 train patient`` (``engines.training.patient``): pseudo-patients through the run-time
selection, the exported model, the out-of-fold scores for the fusion, resuming."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from engines.backends import OnnxRuntimeBackend, file_sha256
from engines.slice_model import MODELS_DIR
from engines.training import common
from engines.training.patient import OOF_CSV, SERIES_LABELS

PER_SERIES = 2
PER_PUBLIC_CLASS = 3
FOLDS = 2


def _train(shared_data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "agent.cli", "train", "patient", "--data", str(shared_data),
           "--out", str(out), "--limit", "12", "--per-series", str(PER_SERIES),
           "--per-public-class", str(PER_PUBLIC_CLASS), "--folds", str(FOLDS),
           "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_tiny_run_exports_scores_out_of_fold_and_resumes(shared_data: Path,
                                                         tmp_path: Path) -> None:
    """One epoch on 12 slices per source: a 10-channel ONNX model tied to the slice model that
    selected its inputs; one out-of-fold row per pseudo-patient, every series' pseudo-patients
    in one fold (a fold model never saw a run of the series it scores); a resumed run to
    epoch 2 continues the checkpoint."""
    first = _train(shared_data, tmp_path, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    meta = json.loads((tmp_path / "patient.json").read_text())
    assert meta["slice_model"]["sha256"] == file_sha256(MODELS_DIR / "slice.onnx")
    assert meta["export_check_max_abs_diff"] < common.EXPORT_TOLERANCE
    assert meta["training"]["platform"]["libraries"]["torch"] == torch.__version__
    assert OnnxRuntimeBackend(tmp_path / "patient.onnx").inputs[0].shape == (-1, 10, 200, 200)

    with (tmp_path / OOF_CSV).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    counts = meta["training"]["pseudo_patients"]
    assert len(rows) == sum(counts.values())
    assert {lab: sum(r["label"] == lab for r in rows) for lab in counts} == counts
    proba = np.array([[float(r[c]) for c in ("control", "type1", "type2")] for r in rows])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    series_folds: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        series_folds[r["pseudo_patient_id"].split("-")[0]].add(r["fold"])
    assert {name: len(series_folds[name]) for name in SERIES_LABELS} == \
        dict.fromkeys(SERIES_LABELS, 1)
    assert sum(r["pseudo_patient_id"].startswith(tuple(SERIES_LABELS)) for r in rows) == \
        PER_SERIES * len(SERIES_LABELS)
    assert {r["label"] for r in rows if r["pseudo_patient_id"].startswith("P002")} == {"covid"}

    second = _train(shared_data, tmp_path, "--epochs", "2", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr
    state = json.loads((tmp_path / "final" / common.CHECKPOINT_JSON).read_text())
    assert state["epoch"] == 2 and len(state["losses"]) == 2


def test_a_data_folder_without_the_series_is_a_one_line_error(tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    run = _train(empty, tmp_path / "out", "--epochs", "1")
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("hust19: error:")]
    assert len(errors) == 1 and "P002-slices.csv" in errors[0]
    assert "Traceback" not in run.stderr


def test_training_twice_on_one_machine_gives_the_same_model(shared_data: Path,
                                                            tmp_path: Path) -> None:
    """Same data, seed and machine: byte-identical ONNX weights and out-of-fold scores
    (across CPUs the rounding differs, ``docs/models/cf.md``)."""
    runs = []
    for name in ("a", "b"):
        run = _train(shared_data, tmp_path / name, "--epochs", "1")
        assert run.returncode == 0, run.stderr
        runs.append(((tmp_path / name / "patient.onnx").read_bytes(),
                     (tmp_path / name / OOF_CSV).read_text()))
    assert runs[0] == runs[1]
