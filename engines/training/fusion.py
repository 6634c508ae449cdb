"""Write the fusion document: the stated rule (shipped), or the paper's PLR fitted on a site's
paired CT + lab scores.

Usage::

    hust19 train fusion --rule [--out DIR]
    hust19 train fusion --paired CSV [--out DIR] [--folds 10] [--target-sn 0.95] [--seed 0]

``--rule`` writes the shipped document (``engines/models/fusion.json``): the ``rule`` mode of
:mod:`engines.fusion` for patients with both sides, each side's own scores otherwise. Nothing
is fitted; the sensitive cuts are the CF model's (``"cf"``) and, for CT alone,
:data:`CT_ONLY_SENSITIVE_CUT`.

``--paired CSV`` is for a site that has patients with *both* a CT series and lab values and
their outcome: one row per patient, ``patient_id,label,ct_control,ct_type1,ct_type2,
cf_control,cf_type1,cf_type2`` with ``label`` control / type1 / type2, the scores being what
the agent's CT side and CF model gave (out-of-fold scores if the site also retrained those
models on the same patients). It fits the paper's L2-penalised logistic regression (PLR),
choosing C by stratified k-fold cross-validated log-loss, and reports on the same folds the
out-of-fold PLR against the rule, so the site sees whether the fitted fusion beats the stated
one before using it. The document keeps the rule and makes PLR the mode for patients with
both sides. Outputs in ``--out``: ``fusion.json``, ``fusion-report.json``, ``fusion-roc.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines.fusion import (
    CLASSES,
    CUT_FROM_CF,
    FEATURE_ORDER,
    MODELS_DIR,
    TRANSFORM_IDENTITY,
    TRANSFORM_PLR,
    TRANSFORM_RULE,
    rule,
)
from engines.metrics import binary_measures, multiclass_report, plot_roc, threshold_for_sensitivity
from engines.training.provenance import training_platform
from schemas.errors import InputError

DEFAULT_TARGET_SN: Final = 0.95
DEFAULT_FOLDS: Final = 10
C_GRID: Final[tuple[float, ...]] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
RULE_VERSION: Final = "fusion-rule-1"
CT_ONLY_SENSITIVE_CUT: Final = 0.2
"""Sensitive cut on P(pneumonia) for CT alone: with the CT stage's rule, involvement of about
0.19 % (the general cut, 0.5, is at 0.3 %); normal001 measures 0.09 %."""
MIN_PER_CLASS: Final = 2


def rule_document() -> dict[str, Any]:
    """The shipped document: the rule, and each side alone."""
    return {
        "model": "fusion",
        "version": RULE_VERSION,
        "classes": list(CLASSES),
        "feature_order": list(FEATURE_ORDER),
        "both": "rule",
        "thresholds": {"general": "argmax",
                       "sensitive": "per mode: modes.<mode>.sensitive.covid_probability "
                                    "('cf' = the CF model's cut)"},
        "modes": {
            "rule": {"transform": TRANSFORM_RULE, "inputs": list(FEATURE_ORDER),
                     "description": "CF decides COVID-19 (P(control) = CF's), the CT the "
                                    "severity (share of type2 = CT's type2 / (type1 + type2))",
                     "sensitive": {"covid_probability": CUT_FROM_CF,
                                   "chosen_on": "the CF model's out-of-fold scores"}},
            "ct_only": {"transform": TRANSFORM_IDENTITY, "inputs": list(FEATURE_ORDER[:3]),
                        "sensitive": {"covid_probability": CT_ONLY_SENSITIVE_CUT,
                                      "chosen_on": "stated: P(pneumonia) 0.2, involvement "
                                                   "about 0.19 %"}},
            "cf_only": {"transform": TRANSFORM_IDENTITY, "inputs": list(FEATURE_ORDER[3:]),
                        "sensitive": {"covid_probability": CUT_FROM_CF,
                                      "chosen_on": "the CF model's out-of-fold scores"}},
        },
        "training": {"description": "nothing fitted: a stated rule (docs/models/fusion.md)"},
    }


def read_paired(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, y (n,), x (n, 6))`` from a paired CSV (module docstring)."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            need = ["patient_id", "label", *FEATURE_ORDER]
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
            ids, ys, xs = [], [], []
            for line, row in enumerate(reader, start=2):
                label = row["label"].strip().lower()
                if label not in CLASSES:
                    raise InputError(f"{path} line {line}: label {label!r} is not one of "
                                     f"{', '.join(CLASSES)}")
                try:
                    values = [float(row[c]) for c in FEATURE_ORDER]
                except ValueError as exc:
                    raise InputError(f"{path} line {line}: a score is not a number") from exc
                for side, part in (("CT", values[:3]), ("CF", values[3:])):
                    if min(part) < 0 or abs(sum(part) - 1.0) > 1e-3:
                        raise InputError(f"{path} line {line}: {side} scores are not "
                                         "probabilities summing to 1")
                ids.append(row["patient_id"])
                ys.append(CLASSES.index(label))
                xs.append(values)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    y = np.asarray(ys, dtype=np.int64)
    counts = np.bincount(y, minlength=len(CLASSES))
    if counts.min() < MIN_PER_CLASS:
        raise InputError(f"{path}: every class needs at least {MIN_PER_CLASS} patients "
                         f"(has {dict(zip(CLASSES, counts.tolist(), strict=True))})")
    return ids, y, np.asarray(xs, dtype=np.float64)


def _plr(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    # L2 penalty; lbfgs on 3 classes fits the multinomial (softmax) model engines.fusion applies.
    return LogisticRegression(C=c, solver="lbfgs", max_iter=5000)


def choose_c(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float, np.ndarray]:
    """The C of :data:`C_GRID` with the lowest cross-validated log-loss, and the out-of-fold
    probabilities at that C."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    k = min(folds, int(np.bincount(y).min()))
    cv = StratifiedKFold(n_splits=max(k, 2), shuffle=True, random_state=seed)
    best: tuple[float, float, np.ndarray] | None = None
    for c in C_GRID:
        oof = cross_val_predict(_plr(c), x, y, cv=cv, method="predict_proba")
        loss = float(log_loss(y, oof, labels=list(range(len(CLASSES)))))
        if best is None or loss < best[1]:
            best = (c, loss, oof)
    assert best is not None
    return best[0], best[2]


def summary(y: np.ndarray, proba: np.ndarray, cut: float) -> dict[str, Any]:
    """Per-class AUCs, COVID-19 vs control AUC and measures at ``cut``, arg-max accuracy."""
    rep = multiclass_report(y, proba, CLASSES)
    covid = binary_measures(y > 0, proba[:, 1] + proba[:, 2], cut)
    return {"auc": {**{c: rep["per_class"][c]["auc"] for c in CLASSES},
                    "covid_vs_control": covid["auc"]},
            "accuracy_argmax": rep["accuracy"], "confusion_argmax": rep["confusion"],
            "covid_vs_control_at_sensitive": {k: covid[k] for k in ("sn", "sp", "ppv", "npv")}}


Curves = dict[str, tuple[np.ndarray, np.ndarray]]


def paired_document(path: Path, *, folds: int, target_sn: float,
                    seed: int) -> tuple[dict[str, Any], dict[str, Any], Curves]:
    """The PLR document, its report and the COVID-19 vs control curves to plot (module
    docstring)."""
    ids, y, x = read_paired(path)
    c, oof = choose_c(x, y, folds, seed)
    model = _plr(c).fit(x, y)
    covid = y > 0
    cut = threshold_for_sensitivity(covid, oof[:, 1] + oof[:, 2], target_sn)
    ruled = rule(x)
    rule_cut = threshold_for_sensitivity(covid, ruled[:, 1] + ruled[:, 2], target_sn)
    report = {"patients": len(ids),
              "class_counts": dict(zip(CLASSES, np.bincount(y, minlength=3).tolist(),
                                       strict=True)),
              "plr_out_of_fold": summary(y, oof, cut),
              "rule_same_patients": summary(y, ruled, rule_cut),
              "note": "the rule has no fitted number, so its figures on these patients are "
                      "not optimistic; the PLR's are out-of-fold at the chosen C"}
    doc = rule_document()
    doc.update(version=f"fusion-{datetime.now(UTC):%Y%m%d%H%M%S}", both="plr")
    doc["modes"]["plr"] = {
        "transform": TRANSFORM_PLR, "inputs": list(FEATURE_ORDER),
        "coef": model.coef_.tolist(), "intercept": model.intercept_.tolist(),
        "C": c, "penalty": "l2",
        "sensitive": {"covid_probability": cut, "target_sensitivity": target_sn,
                      "chosen_on": f"out-of-fold fused probabilities ({folds}-fold)"}}
    doc["training"] = {"description": f"PLR fitted on the paired CT + lab scores of "
                                      f"{len(ids)} patients ({path.name})",
                       "c_grid": list(C_GRID), "seed": seed, "platform": training_platform(),
                       "report": report}
    curves = {"PLR (out-of-fold)": (covid, oof[:, 1] + oof[:, 2]),
              "rule": (covid, ruled[:, 1] + ruled[:, 2])}
    return doc, report, curves


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 train fusion``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--rule", action="store_true",
                      help="write the stated rule (the shipped document)")
    what.add_argument("--paired", type=Path, metavar="CSV",
                      help="fit the PLR on a site's paired CT + lab scores")
    parser.add_argument("--out", type=Path, default=MODELS_DIR,
                        help="folder for fusion.json (default: the package's models folder)")
    parser.add_argument("--target-sn", type=float, default=DEFAULT_TARGET_SN)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    """Entry point; writes fusion.json (and the report with ``--paired``). Exit 2 on bad
    input."""
    try:
        report: dict[str, Any] | None = None
        if args.rule:
            doc = rule_document()
        else:
            doc, report, curves = paired_document(args.paired, folds=args.folds,
                                                  target_sn=args.target_sn, seed=args.seed)
    except InputError as exc:
        print(f"hust19: error: {exc.message}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fusion.json"
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if report is not None:
        (args.out / "fusion-report.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_roc(curves, args.out / "fusion-roc.png", "Fusion: COVID-19 vs control")
    print(json.dumps({"written": str(path), "version": doc["version"], "both": doc["both"],
                      "report": report}, indent=1))
    return 0


__all__ = ["choose_c", "paired_document", "read_paired", "rule_document", "summary"]
