"""Fusion (engines.fusion) and its training (engines.training.fusion): the stated rule that is
shipped, the PLR a site fits on paired data, and the single-modality modes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines import fusion
from engines.training import fusion as training
from schemas.errors import EngineError, InputError

CT_NO_PNEUMONIA = np.array([0.97, 0.03, 0.0])
CT_MILD = np.array([0.01, 0.95, 0.04])
CT_SEVERE = np.array([0.0, 0.1, 0.9])
CF_CONTROL = np.array([0.8, 0.15, 0.05])
CF_COVID = np.array([0.1, 0.6, 0.3])


@pytest.fixture(scope="module")
def shipped() -> fusion.FusionModel:
    return fusion.FusionModel.load_default()


def test_shipped_document_is_the_rule_written_by_the_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "train", "fusion", "--rule",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "fusion.json").read_text()) == json.loads(
        fusion.DEFAULT_JSON.read_text())


def test_cf_decides_covid_and_ct_decides_severity(shipped: fusion.FusionModel) -> None:
    out = shipped.combine(CT_SEVERE, CF_CONTROL)
    assert out.mode == "rule"
    assert out.proba[0] == pytest.approx(CF_CONTROL[0])  # a severe CT does not make COVID-19
    assert out.flag_general == "control"
    covid_mild = shipped.combine(CT_MILD, CF_COVID)
    covid_severe = shipped.combine(CT_SEVERE, CF_COVID)
    assert covid_mild.covid_probability == pytest.approx(0.9)
    assert covid_severe.covid_probability == pytest.approx(0.9)
    assert covid_mild.flag_general == "type1" and covid_severe.flag_general == "type2"
    assert covid_severe.proba[2] == pytest.approx(0.9 * 0.9)
    clear_ct = shipped.combine(CT_NO_PNEUMONIA, CF_COVID)
    assert clear_ct.flag_general == "type1"  # COVID-19 without CT signs is not severe
    for out in (covid_mild, covid_severe, clear_ct):
        assert out.proba.sum() == pytest.approx(1.0)


def test_one_side_missing_uses_the_other_unchanged(shipped: fusion.FusionModel) -> None:
    ct = shipped.combine(CT_MILD, None)
    assert ct.mode == "ct_only" and np.allclose(ct.proba, CT_MILD)
    cf = shipped.combine(None, CF_COVID)
    assert cf.mode == "cf_only" and np.allclose(cf.proba, CF_COVID)
    with pytest.raises(InputError):
        shipped.combine(None, None)
    with pytest.raises(InputError, match="summing to 1"):
        shipped.combine(np.array([0.5, 0.5, 0.5]), None)


def test_sensitive_cuts_come_from_the_cf_model(shipped: fusion.FusionModel) -> None:
    cf_cut = fusion.cf_sensitive_cut()
    assert shipped.sensitive_cut("rule") == shipped.sensitive_cut("cf_only") == cf_cut
    assert shipped.sensitive_cut("ct_only") == training.CT_ONLY_SENSITIVE_CUT
    given = fusion.FusionModel.load_default(cf_cut=0.42)
    assert given.sensitive_cut("rule") == 0.42
    just_below = np.array([1 - (cf_cut - 0.01), cf_cut - 0.02, 0.01])
    assert shipped.combine(CT_MILD, just_below).flag_sensitive == "control"
    just_above = np.array([1 - (cf_cut + 0.01), cf_cut, 0.01])
    assert shipped.combine(CT_MILD, just_above).flag_sensitive == "type1"


def _paired_csv(path: Path, n: int = 90, seed: int = 1) -> Path:
    """Patients whose CT and CF scores both carry their class (with noise)."""
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "label", *fusion.FEATURE_ORDER])
        for i in range(n):
            label = i % 3
            ct = rng.dirichlet(np.ones(3) + 4 * np.eye(3)[label])
            cf = rng.dirichlet(np.ones(3) + 3 * np.eye(3)[label])
            w.writerow([f"p{i}", fusion.CLASSES[label], *ct.round(6), *cf.round(6)])
    return path


def test_plr_from_paired_data_is_used_when_both_sides_exist(tmp_path: Path) -> None:
    paired = _paired_csv(tmp_path / "paired.csv")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "train", "fusion", "--paired",
                           str(paired), "--out", str(tmp_path / "out"), "--folds", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = fusion.FusionModel.load(tmp_path / "out" / "fusion.json", cf_cut=0.2)
    assert model.both == "plr"
    report = json.loads((tmp_path / "out" / "fusion-report.json").read_text())
    assert report["plr_out_of_fold"]["auc"]["covid_vs_control"] > 0.8
    assert "rule_same_patients" in report
    assert (tmp_path / "out" / "fusion-roc.png").stat().st_size > 1000
    out = model.combine(np.array([0.05, 0.9, 0.05]), np.array([0.05, 0.9, 0.05]))
    assert out.mode == "plr" and out.flag_general == "type1"
    assert model.combine(CT_MILD, None).mode == "ct_only"


def test_bad_paired_files_and_documents_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,label,ct_control\np1,type1,1\n")
    with pytest.raises(InputError, match="missing column"):
        training.read_paired(bad)
    one_class = _paired_csv(tmp_path / "paired.csv", n=3)
    with pytest.raises(InputError, match="at least 2"):
        training.read_paired(one_class)
    doc = training.rule_document()
    doc["modes"]["ct_only"]["transform"] = "rule"
    with pytest.raises(EngineError, match="needs both"):
        fusion.FusionModel(doc, cf_cut=0.2)
    with pytest.raises(EngineError):
        fusion.FusionModel({"classes": ["a"]})
    doc = training.rule_document()
    doc["both"] = "plr"  # no plr mode in the document
    with pytest.raises(EngineError, match="missing"):
        fusion.FusionModel(doc, cf_cut=0.2)
