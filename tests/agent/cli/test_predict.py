"""``hust19 predict``: offline triage of a real series folder, and its bad-input exits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HUST19 = [sys.executable, "-m", "agent.cli"]


def _predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HUST19, "predict", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_empty_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = _predict(str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "empty folder" in proc.stderr


def test_folder_without_dicom_exits_2(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a CT slice")
    proc = _predict(str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "no CT image among 1 file(s) (1 not DICOM)" in proc.stderr
    assert "notes.txt: skipped, not a DICOM file" in proc.stderr
    assert "force" not in proc.stderr  # pydicom's hint is not for a CLI user


@pytest.mark.slow
def test_p002_subset_with_junk_file(tmp_path: Path, chest_series: Path) -> None:
    """40 slices of P002 (empty SOP Instance UIDs) plus a non-DICOM file: the junk file is
    skipped with a warning, ids fall back to file names, the JSON carries the contract."""
    src = sorted((chest_series / "P002").iterdir())[30:70]
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "README.txt").write_text("junk")
    proc = _predict(str(tmp_path), "--threshold", "sensitive", "--backend", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    assert "README.txt" in proc.stderr and "file names" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["flag"] in ("control", "type1", "type2")
    assert out["flag"] == out["flags"]["sensitive"]
    assert set(out["scores"]) == {"control", "type1", "type2"}
    assert out["modalities"] == {"ct": True, "cf": False, "missing": ["cf"]}
    assert out["mode"] == "ct_only"
    top = out["top10_sop_instance_uids"]
    assert 1 <= len(top) <= 10
    assert all(u.startswith("file:IM") for u in top)
    assert out["ct"]["n_slices"] == 40
    assert out["models"]["slice"].startswith("slice-")
    assert out["models"]["patient"].startswith("patient-")
    assert out["models"]["evidence"].startswith("evidence-")
    # 40 mid-chest slices: the lungs run past both ends, so there is no lung volume, but the
    # involvement (a share of the lung present) is measured
    assert isinstance(out["lung_involvement_percent"], float)
    quant = out["quantitative_ct"]
    assert quant["lungs"]["volume_ml"] is None
    assert any("does not cover the whole lungs" in w for w in quant["warnings"])
    assert out["ct"]["source"] == "quantitative" and out["ct"]["cnn_scores"] is not None


@pytest.mark.slow
def test_normal_series_is_control_with_its_measurements_and_labs_fuse_by_the_rule(
        tmp_path: Path, chest_series: Path) -> None:
    proc = _predict(str(chest_series / "normal001"), "--backend", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["flag"] == "control" and out["mode"] == "ct_only"
    assert 0.0 <= out["lung_involvement_percent"] < 0.5
    quant = out["quantitative_ct"]
    assert quant["severity"] == "CT-0" and quant["slices_with_lung"] > 100
    assert 3000 < quant["lungs"]["volume_ml"] < 4000
    assert quant["right"]["volume_ml"] > quant["left"]["volume_ml"] > 0
    assert len(out["top10_sop_instance_uids"]) == 10
    labs = tmp_path / "labs.json"
    labs.write_text(json.dumps({"CRP": 80.0, "LYP": 9.0, "AGE": 67, "GENDER": 1}))
    fused = _predict(str(chest_series / "normal001"), "--backend", "onnxruntime",
                     "--labs", str(labs))
    assert fused.returncode == 0, fused.stderr
    both = json.loads(fused.stdout)
    assert both["mode"] == "rule" and both["modalities"]["missing"] == []
    cf = both["cf"]["scores"]
    assert both["scores"]["control"] == pytest.approx(cf["control"])


@pytest.mark.slow
def test_threshold_from_the_settings_file(tmp_path: Path, chest_series: Path) -> None:
    """Without --threshold the settings decide (as for serve); the flag still wins over them."""
    series = tmp_path / "series"
    series.mkdir()
    for f in sorted((chest_series / "P002").iterdir())[40:60]:
        shutil.copy(f, series / f.name)
    config = tmp_path / "hust19.toml"
    config.write_text('[hust19]\nthreshold = "sensitive"\nbackend = "onnxruntime"\n')
    from_file = _predict(str(series), "--config", str(config))
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["threshold"] == "sensitive"
    flag_wins = _predict(str(series), "--config", str(config), "--threshold", "general")
    assert flag_wins.returncode == 0, flag_wins.stderr
    assert json.loads(flag_wins.stdout)["threshold"] == "general"


def test_bad_settings_file_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    """A settings error is a configuration failure (exit 1, as for every command), not a
    traceback."""
    config = tmp_path / "bad.toml"
    config.write_text('[hust19]\nthreshold = "lenient"\n')
    proc = _predict(str(tmp_path), "--config", str(config))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "'threshold'" in proc.stderr
