"""engines.metrics against hand-computed small cases and scikit-learn."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from engines import metrics
from schemas.errors import InputError


def test_binary_measures_hand_computed() -> None:
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.05]
    m = metrics.binary_measures(y, s, threshold=0.5)
    # predictions >= 0.5: 1,1,0,1,0,0,0 -> tp=2 fn=1 fp=1 tn=3
    assert m["confusion"] == [[3, 1], [1, 2]]
    assert m["sn"] == pytest.approx(2 / 3)
    assert m["sp"] == pytest.approx(3 / 4)
    assert m["ac"] == pytest.approx(5 / 7)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["mcc"] == pytest.approx((2 * 3 - 1 * 1) / math.sqrt(3 * 3 * 4 * 4))
    # AUC: pairs (pos, neg) ranked correctly: 0.9 beats 4, 0.6 beats 3, 0.2 beats 2 -> 9/12
    assert m["auc"] == pytest.approx(9 / 12)
    assert m["n"] == 7 and m["threshold"] == 0.5


def test_binary_measures_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(bool)
    s = np.round(rng.random(300) * 0.6 + y * 0.3, 2)  # rounded: ties exercise the AUC
    m = metrics.binary_measures(y, s, threshold=0.45)
    pred = s >= 0.45
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert m["sn"] == pytest.approx(skm.recall_score(y, pred))
    assert m["sp"] == pytest.approx(skm.recall_score(~y, ~pred))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["ac"] == pytest.approx(skm.accuracy_score(y, pred))


def test_undefined_measures_are_null_in_json() -> None:
    m = metrics.binary_measures([0, 0, 1], [0.1, 0.2, 0.3], threshold=0.9)
    assert m["ppv"] is None and m["mcc"] is None
    one_class = metrics.binary_measures([1, 1], [0.2, 0.8])
    assert one_class["auc"] is None and one_class["sp"] is None
    text = json.dumps(m)
    assert "NaN" not in text and '"ppv": null' in text


def test_length_mismatch_is_input_error() -> None:
    with pytest.raises(InputError):
        metrics.binary_measures([0, 1], [0.5])


def test_multiclass_report() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.4, .5, .1], [.1, .7, .2], [.2, .3, .5], [.1, .1, .8],
                  [.1, .2, .7]])
    r = metrics.multiclass_report(y, p, ["a", "b", "c"])
    assert r["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    for i, c in enumerate("abc"):
        assert r["per_class"][c]["auc"] == pytest.approx(skm.roc_auc_score(y == i, p[:, i]))
    with pytest.raises(InputError):
        metrics.multiclass_report(y, p[:, :2], ["a", "b", "c"])


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_threshold_for_sensitivity_reaches_target_and_is_tightest(target: float) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200).astype(bool)
    s = np.round(rng.random(200) * 0.7 + y * 0.3, 2)
    t = metrics.threshold_for_sensitivity(y, s, target)
    assert metrics.binary_measures(y, s, t)["sn"] >= target
    higher = np.unique(s[s > t])
    if higher.size:  # the next distinct cut above must miss the target
        assert metrics.binary_measures(y, s, higher[0])["sn"] < target


def test_summarise_runs() -> None:
    runs: list[dict[str, Any]] = [{"auc": {"x": 0.8}, "ppv": None, "confusion": [[1]]},
                                  {"auc": {"x": 0.9}, "ppv": 0.5}]
    s = metrics.summarise_runs(runs)
    assert s["auc"]["x"]["mean"] == pytest.approx(0.85)
    assert s["auc"]["x"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert s["auc"]["x"]["min"] == 0.8 and s["auc"]["x"]["max"] == 0.9
    assert s["ppv"] == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    assert "confusion" not in s


def test_plots_write_png(tmp_path: Path) -> None:
    metrics.plot_roc({"a": ([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.4])}, tmp_path / "roc.png", "t")
    metrics.plot_confusion([[3, 1], [0, 2]], ["n", "p"], tmp_path / "cm.png", "t")
    for name in ("roc.png", "cm.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
