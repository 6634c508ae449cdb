"""engines.fusion (NumPy PLR from JSON) and engines.training.fusion (pairing, thresholds)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import sklearn

from engines import fusion
from engines.training import fusion as training
from schemas.errors import EngineError, InputError


@pytest.fixture(scope="module")
def cf_oof(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A CF score file in the training format (patient_id,label,control,type1,type2): the
    shipped CF model's scores of the scored iCTCF patients. The real out-of-fold file stays
    out of the repository (it carries iCTCF labels); its format is what matters here."""
    from engines.cf import CfModel
    from engines.ictcf import load_cohort
    from engines.training.cf import write_scores

    scored = [p for p in load_cohort(shared_data / "ictcf").patients if p.scored]
    proba = CfModel.load_default().predict_values([p.values for p in scored])
    path = tmp_path_factory.mktemp("cf") / "cf_scores_oof.csv"
    write_scores(path, [p.patient_id for p in scored], [p.label for p in scored], proba)
    return path


@pytest.fixture(scope="module")
def ct_scores(tmp_path_factory: pytest.TempPathFactory, cf_oof: Path) -> Path:
    """A CT score file in the patient-CNN format (pseudo_patient_id,label,...,fold) with the
    CT data's labels (control / covid). Its scores are real out-of-fold scores (those of the
    shipped CF model, relabelled): a stand-in with the right format and label scheme, so that
    these tests do not depend on the patient-CNN training having run."""
    path = tmp_path_factory.mktemp("ct") / "patient_scores_oof.csv"
    with cf_oof.open() as src, path.open("w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["pseudo_patient_id", "label", "control", "type1", "type2", "fold"])
        for i, r in enumerate(list(csv.DictReader(src))[::4]):
            w.writerow([f"pp{i:03d}", "control" if r["label"] == "control" else "covid",
                        r["control"], r["type1"], r["type2"], i % 5])
    return path


@pytest.fixture(scope="module")
def trained(ct_scores: Path, cf_oof: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fusion")
    args = argparse.Namespace(cf_scores=cf_oof, ct_scores=ct_scores, out=out, target_sn=0.95,
                              pairs_per_patient=2, folds=5, seed=0)
    assert training.main(args) == 0
    return out / "fusion.json"


def test_pairing_is_label_matched(ct_scores: Path, cf_oof: Path) -> None:
    cf, ct = training.read_scores(cf_oof), training.read_scores(ct_scores)
    x, y, pairs = training.pair_by_label(cf, ct, 3, seed=1)
    assert x.shape == (3 * len(cf.ids), 6) and len(pairs) == len(y)
    ct_label = dict(zip(ct.ids, ct.labels, strict=True))
    for (_, ct_id), yi in zip(pairs, y, strict=True):
        assert ct_label[ct_id] == ("control" if yi == 0 else "covid")
    x2, _, _ = training.pair_by_label(cf, ct, 3, seed=1)
    np.testing.assert_array_equal(x, x2)  # seeded: reproducible
    with pytest.raises(InputError, match="matching"):
        only_covid = training.ScoreTable(ct.ids[:1], ["covid"], ct.proba[:1])
        training.pair_by_label(cf, only_covid, 1, seed=0)


def test_json_round_trip_matches_sklearn(trained: Path, ct_scores: Path, cf_oof: Path) -> None:
    doc = json.loads(trained.read_text())
    assert "SYNTHETIC" in doc["training"]["description"]
    assert doc["training"]["platform"]["libraries"]["scikit-learn"] == sklearn.__version__
    model = fusion.FusionModel.load(trained)
    cf, ct = training.read_scores(cf_oof), training.read_scores(ct_scores)
    x, y, _ = training.pair_by_label(cf, ct, 2, seed=0)
    ref = training._plr(doc["modes"]["plr"]["C"]).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(model.apply("plr", x), ref, atol=1e-6)
    again = fusion.FusionModel(json.loads(json.dumps(model.doc)))
    assert again.version == model.version


def test_thresholds_reach_target_sensitivity(trained: Path, ct_scores: Path,
                                             cf_oof: Path) -> None:
    doc = json.loads(trained.read_text())
    model = fusion.FusionModel.load(trained)
    modes: tuple[tuple[fusion.Mode, Path], ...] = (("cf_only", cf_oof), ("ct_only", ct_scores))
    for mode, path in modes:
        t = training.read_scores(path)
        covid = t.proba[:, 1] + t.proba[:, 2]
        pos = np.array([lab != "control" for lab in t.labels])
        assert np.mean(covid[pos] >= model.sensitive_cut(mode)) >= 0.95
    oof = doc["modes"]["plr"]["out_of_fold"]["covid_vs_control_at_sensitive"]
    assert oof["sn"] >= 0.95


def test_combine_modes_and_flags(trained: Path) -> None:
    model = fusion.FusionModel.load(trained)
    ct = np.array([0.1, 0.6, 0.3])
    cf = np.array([0.2, 0.3, 0.5])
    both = model.combine(ct, cf)
    assert both.mode == "plr" and both.proba.shape == (3,)
    assert both.proba.sum() == pytest.approx(1.0)
    assert both.flag_general == fusion.CLASSES[int(np.argmax(both.proba))]
    ct_only = model.combine(ct, None)
    assert ct_only.mode == "ct_only"
    np.testing.assert_allclose(ct_only.proba, ct)
    assert ct_only.flag_general == "type1"
    cf_only = model.combine(None, cf)
    assert cf_only.mode == "cf_only" and cf_only.flag_general == "type2"
    with pytest.raises(InputError):
        model.combine(None, None)
    with pytest.raises(InputError):
        model.combine(np.array([0.5, 0.5]), None)
    with pytest.raises(InputError):
        model.combine(np.array([0.9, 0.9, 0.9]), None)


def test_sensitive_flag_rule(trained: Path) -> None:
    model = fusion.FusionModel.load(trained)
    cut = model.sensitive_cut("cf_only")
    # COVID probability just above the cut: sensitive flag is the larger COVID class
    c = min(cut + 1e-6, 1.0)
    assert model.combine(None, np.array([1 - c, 0.4 * c, 0.6 * c])).flag_sensitive == "type2"
    assert model.combine(None, np.array([1 - c, 0.6 * c, 0.4 * c])).flag_sensitive == "type1"
    c = cut / 2  # below the cut: control, whatever the arg-max among the COVID classes
    assert model.combine(None, np.array([1 - c, 0.5 * c, 0.5 * c])).flag_sensitive == "control"
    assert fusion.sensitive_flags(np.array([[0.5, 0.3, 0.2]]), 0.4) == ["type1"]


def test_bad_document_is_engine_error(trained: Path) -> None:
    doc = json.loads(trained.read_text())
    doc["modes"]["plr"]["coef"] = [[0.0] * 5] * 3
    with pytest.raises(EngineError):
        fusion.FusionModel(doc)
    with pytest.raises(EngineError):
        fusion.FusionModel({"classes": ["a"]})


def test_shipped_fusion_loads() -> None:
    model = fusion.FusionModel.load_default()
    out = model.combine(None, np.array([0.2, 0.5, 0.3]))
    assert out.mode == "cf_only" and out.flag_general == "type1"


def test_interim_document_without_ct_scores(tmp_path: Path, cf_oof: Path) -> None:
    args = argparse.Namespace(cf_scores=cf_oof, ct_scores=None, out=tmp_path, target_sn=0.9,
                              pairs_per_patient=1, folds=5, seed=0)
    assert training.main(args) == 0
    model = fusion.FusionModel.load(tmp_path / "fusion.json")
    assert model.interim
    ct, cf = np.array([0.2, 0.6, 0.2]), np.array([0.6, 0.2, 0.2])
    np.testing.assert_allclose(model.combine(ct, cf).proba, [0.4, 0.4, 0.2])
    assert model.sensitive_cut("plr") == model.sensitive_cut("cf_only")
