"""``hust19 evaluate slices``: CSV checks, path resolution, the report and its plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines.evaluation import slices
from schemas.errors import InputError

HUST19 = [sys.executable, "-m", "agent.cli"]


def _val_rows(shared_data: Path, n_each: int) -> list[dict[str, str]]:
    rows = list(csv.DictReader((shared_data / "covid-ct/splits/val.csv").open()))
    covid = [r for r in rows if r["label"] == "COVID"][:n_each]
    non = [r for r in rows if r["label"] == "NonCOVID"][:n_each]
    return covid + non


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_relative_paths_resolve_from_the_csv_folder_or_its_parent(shared_data: Path) -> None:
    # the official split file lives in covid-ct/splits/ and its paths are relative to covid-ct/
    rows = slices.read_csv(shared_data / "covid-ct/splits/val.csv")
    assert len(rows) == 118
    assert all(r.path.is_file() for r in rows)
    assert rows[0].path.parent.parent == shared_data / "covid-ct"


def test_bad_csv_is_an_input_error_naming_file_and_row(tmp_path: Path, shared_data: Path) -> None:
    good = str(shared_data / "covid-ct" / _val_rows(shared_data, 1)[0]["path"])
    with pytest.raises(InputError, match="missing column"):
        slices.read_csv(_write(tmp_path / "a.csv", ["file", "label"], [[good, "COVID"]]))
    with pytest.raises(InputError, match=r"row 2: unknown label 'covid19'"):
        slices.read_csv(_write(tmp_path / "b.csv", ["path", "label"], [[good, "covid19"]]))
    with pytest.raises(InputError, match=r"row 3: image .*nope.png not found"):
        slices.read_csv(_write(tmp_path / "c.csv", ["path", "label"],
                               [[good, "pCT"], ["nope.png", "nCT"]]))


@pytest.mark.slow
def test_cli_reports_measures_and_writes_plots(tmp_path: Path, shared_data: Path) -> None:
    rows = [[str(shared_data / "covid-ct" / r["path"]), r["label"]]
            for r in _val_rows(shared_data, 4)]
    csv_path = _write(tmp_path / "val.csv", ["path", "label"], rows)
    out = tmp_path / "plots"
    proc = subprocess.run([*HUST19, "evaluate", "slices", "--csv", str(csv_path), "--out",
                           str(out), "--backend", "onnxruntime", "--no-progress"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("auc", "sn", "sp", "ac", "ppv", "npv", "mcc", "f1", "confusion"):
        assert key in report
    assert 0.0 <= report["auc"] <= 1.0
    (tn, fp), (fn, tp) = report["confusion"]
    assert tn + fp == 4 and fn + tp == 4
    assert (out / "slice-roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "slice-confusion.png").is_file()
    assert report["model"]["version"].startswith("slice-")


def test_cli_unreadable_image_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    csv_path = _write(tmp_path / "x.csv", ["path", "label"], [["broken.png", "NiCT"]])
    proc = subprocess.run([*HUST19, "evaluate", "slices", "--csv", str(csv_path),
                           "--no-progress"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "broken.png" in proc.stderr


@pytest.mark.slow
def test_cv_slice_runs_every_fold_and_summarises(tmp_path: Path, shared_data: Path) -> None:
    """A feasibility-sized CV (2 folds x 1 repeat, 1 epoch, a few slices per source): every
    fold is scored and every measure gets mean/std/min/max."""
    out = tmp_path / "cv.json"
    proc = subprocess.run([*HUST19, "evaluate", "cv", "slice", "--data", str(shared_data),
                           "--limit", "4", "--folds", "2", "--repeats", "1", "--epochs", "1",
                           "--batch-size", "8", "--cache", str(tmp_path), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)["summary"]
    for key in ("auc", "sn", "sp", "ac", "f1", "mcc"):
        assert set(summary[key]) >= {"mean", "std", "min", "max"}
    folds = json.loads(out.read_text())["folds"]
    assert [(f["repeat"], f["fold"]) for f in folds] == [(0, 0), (0, 1)]


def test_cv_slice_with_too_few_groups_is_a_clear_error(tmp_path: Path, shared_data: Path) -> None:
    """Series only (``--public none``) gives two groups: 10 grouped folds cannot be made, and the
    user is told so (exit 2, the flags named, no traceback) before any training."""
    proc = subprocess.run([*HUST19, "evaluate", "cv", "slice", "--data", str(shared_data),
                           "--public", "none", "--cache", str(tmp_path),
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "only 2 group(s)" in proc.stderr and "--public train" in proc.stderr
    assert not list(tmp_path.iterdir())  # stopped before pre-processing anything
