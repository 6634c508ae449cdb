"""Train the PLR fusion from out-of-fold CT and CF scores.

Usage: ``hust19 train fusion --cf-scores CSV --ct-scores CSV [--out DIR] [--target-sn 0.95]
[--pairs-per-patient N] [--seed S]``.

The paper fits an L2-penalised logistic regression (PLR) on the CT and CF scores of patients who
have both. No public cohort here has both (``../shared/data/README.md``), so the fusion is
trained on a *synthetic, label-matched pairing*: every CF patient (out-of-fold CF scores,
``cf_scores_oof.csv``: ``patient_id,label,control,type1,type2``) is paired with CT pseudo-
patients drawn at random, with replacement, among those of a matching label (out-of-fold CT
scores, ``patient_scores_oof.csv``: ``pseudo_patient_id,label,control,type1,type2[,fold]``; a CT
label ``covid`` matches both type1 and type2, since the CT data have no severity grade). The
pairs are not clinical data: the fused figures measure how the two score sets combine, not
clinical performance.

Protocol: the penalty C is chosen by stratified k-fold cross-validated log-loss over a grid;
out-of-fold fused probabilities at that C give the sensitive threshold of the ``plr`` mode;
the final coefficients are fitted on all pairs. The ``ct_only`` and ``cf_only`` modes use each
modality's scores unchanged; their sensitive thresholds come from the same out-of-fold files.

Without ``--ct-scores`` (no CT out-of-fold scores exist yet) an *interim* document is written:
``cf_only`` as above; ``plr`` is the untrained mean of the two modalities with, as its
sensitive cut, the ``cf_only`` cut; ``ct_only`` passes the CT scores through with the
general cut of 0.5 on P(COVID-19). The document says ``"interim": true``; re-run with
``--ct-scores`` once the patient CNN's ``patient_scores_oof.csv`` exists.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines.fusion import (
    CLASSES,
    FEATURE_ORDER,
    MODELS_DIR,
    TRANSFORM_IDENTITY,
    TRANSFORM_MEAN,
    TRANSFORM_PLR,
)
from engines.metrics import binary_measures, multiclass_report, threshold_for_sensitivity
from engines.training.provenance import training_platform
from schemas.errors import InputError

DEFAULT_TARGET_SN: Final = 0.95
DEFAULT_FOLDS: Final = 10
C_GRID: Final[tuple[float, ...]] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
#: CT label that stands for both COVID-19 classes (the CT data have no severity grade).
CT_COVID: Final = "covid"
ID_COLUMNS: Final = ("patient_id", "pseudo_patient_id")


@dataclass(frozen=True)
class ScoreTable:
    """Ids, labels and ``(n, 3)`` probabilities read from an out-of-fold score CSV."""

    ids: list[str]
    labels: list[str]
    proba: np.ndarray


def read_scores(path: Path) -> ScoreTable:
    """Read ``<id>,label,control,type1,type2[,...]``; the id column is ``patient_id`` or
    ``pseudo_patient_id``."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            id_col = next((c for c in ID_COLUMNS if c in cols), None)
            missing = [c for c in ("label", *CLASSES) if c not in cols]
            if id_col is None or missing:
                raise InputError(f"{path}: needs columns patient_id (or pseudo_patient_id), "
                                 f"label, {', '.join(CLASSES)}")
            ids, labels, rows = [], [], []
            for i, row in enumerate(reader, start=2):
                try:
                    rows.append([float(row[c]) for c in CLASSES])
                except ValueError as exc:
                    raise InputError(f"{path} line {i}: non-numeric score") from exc
                ids.append(row[id_col])
                labels.append(row["label"].strip().lower())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    if not rows:
        raise InputError(f"{path}: no rows")
    return ScoreTable(ids, labels, np.asarray(rows, dtype=np.float64))


def ct_label_for(label: str, ct_labels: set[str]) -> str:
    """The CT label a CF label is paired with: the same label when the CT table has it, else
    ``covid`` for type1 / type2."""
    if label in ct_labels:
        return label
    if label in CLASSES[1:] and CT_COVID in ct_labels:
        return CT_COVID
    raise InputError(f"no CT score with a label matching {label!r} "
                     f"(CT labels: {', '.join(sorted(ct_labels))})")


def pair_by_label(cf: ScoreTable, ct: ScoreTable, pairs_per_patient: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """The synthetic label-matched pairing: ``(X (n, 6), y (n,), [(cf_id, ct_id)])``. Each
    CF patient gets ``pairs_per_patient`` CT rows drawn with replacement among matching
    labels."""
    if pairs_per_patient < 1:
        raise InputError("--pairs-per-patient must be >= 1")
    rng = np.random.default_rng(seed)
    ct_labels = np.array(ct.labels)
    pools = {lab: np.flatnonzero(ct_labels == lab) for lab in set(ct.labels)}
    xs, ys, ids = [], [], []
    for i, label in enumerate(cf.labels):
        if label not in CLASSES:
            raise InputError(f"CF score label {label!r} is not one of {', '.join(CLASSES)}")
        pool = pools[ct_label_for(label, set(pools))]
        for j in rng.choice(pool, size=pairs_per_patient, replace=True):
            xs.append(np.concatenate([ct.proba[j], cf.proba[i]]))
            ys.append(CLASSES.index(label))
            ids.append((cf.ids[i], ct.ids[j]))
    return np.asarray(xs), np.asarray(ys, dtype=np.int64), ids


def _plr(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    # The default penalty is L2; lbfgs on 3 classes fits the multinomial (softmax) model that
    # engines.fusion applies.
    return LogisticRegression(C=c, solver="lbfgs", max_iter=5000)


def choose_c(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float, np.ndarray]:
    """The C of ``C_GRID`` with the lowest cross-validated log-loss, and the out-of-fold
    probabilities at that C."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    best: tuple[float, float, np.ndarray] | None = None
    for c in C_GRID:
        oof = cross_val_predict(_plr(c), x, y, cv=cv, method="predict_proba")
        loss = float(log_loss(y, oof, labels=list(range(len(CLASSES)))))
        if best is None or loss < best[1]:
            best = (c, loss, oof)
    assert best is not None
    return best[0], best[2]


def _mode_summary(y: np.ndarray, proba: np.ndarray, cut: float) -> dict[str, Any]:
    rep = multiclass_report(y, proba, CLASSES)
    covid = binary_measures(y > 0, proba[:, 1] + proba[:, 2], cut)
    return {"auc": {**{c: rep["per_class"][c]["auc"] for c in CLASSES},
                    "covid_vs_control": covid["auc"]},
            "accuracy_argmax": rep["accuracy"],
            "covid_vs_control_at_sensitive": {k: covid[k] for k in ("sn", "sp", "ppv", "npv")}}


def _covid_labels(labels: Sequence[str]) -> np.ndarray:
    return np.array([lab != CLASSES[0] for lab in labels], dtype=bool)


def _sensitive(y_covid: np.ndarray, proba: np.ndarray, target: float,
               chosen_on: str) -> dict[str, Any]:
    cut = threshold_for_sensitivity(y_covid, proba[:, 1] + proba[:, 2], target)
    return {"covid_probability": cut, "target_sensitivity": target, "chosen_on": chosen_on}


def train(cf_path: Path, ct_path: Path, *, target_sn: float = DEFAULT_TARGET_SN,
          pairs_per_patient: int = 1, seed: int = 0,
          folds: int = DEFAULT_FOLDS) -> dict[str, Any]:
    """Build the fusion document (see the module docstring)."""
    cf, ct = read_scores(cf_path), read_scores(ct_path)
    x, y, pairs = pair_by_label(cf, ct, pairs_per_patient, seed)
    c, oof = choose_c(x, y, folds, seed)
    model = _plr(c).fit(x, y)
    if list(model.classes_) != list(range(len(CLASSES))):
        raise InputError("the pairing lacks a class: cannot fit three outputs")
    plr_sens = _sensitive(y > 0, oof, target_sn, f"out-of-fold fused probabilities of a "
                          f"stratified {folds}-fold CV over the training pairs")
    cf_sens = _sensitive(_covid_labels(cf.labels), cf.proba, target_sn,
                         f"out-of-fold CF scores ({cf_path.name})")
    ct_sens = _sensitive(_covid_labels(ct.labels), ct.proba, target_sn,
                         f"out-of-fold CT scores ({ct_path.name})")
    counts = {lab: int(np.sum(y == i)) for i, lab in enumerate(CLASSES)}
    return {
        "model": "fusion",
        "version": f"fusion-{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}",
        "classes": list(CLASSES),
        "feature_order": list(FEATURE_ORDER),
        "thresholds": {"general": "argmax",
                       "sensitive": "per mode: modes.<mode>.sensitive.covid_probability"},
        "modes": {
            "plr": {"transform": TRANSFORM_PLR, "inputs": list(FEATURE_ORDER),
                    "coef": model.coef_.tolist(), "intercept": model.intercept_.tolist(),
                    "C": c, "penalty": "l2", "sensitive": plr_sens,
                    "out_of_fold": _mode_summary(y, oof, plr_sens["covid_probability"])},
            "ct_only": {"transform": TRANSFORM_IDENTITY, "inputs": list(FEATURE_ORDER[:3]),
                        "sensitive": ct_sens},
            "cf_only": {"transform": TRANSFORM_IDENTITY, "inputs": list(FEATURE_ORDER[3:]),
                        "sensitive": cf_sens,
                        "out_of_fold": _mode_summary(
                            np.array([CLASSES.index(lab) for lab in cf.labels]), cf.proba,
                            cf_sens["covid_probability"])},
        },
        "training": {
            "description": (
                "SYNTHETIC label-matched pairing, not clinical data: no cohort here has both CT "
                "and lab values. Each CF patient's out-of-fold CF scores are paired with "
                f"{pairs_per_patient} CT pseudo-patient score row(s) drawn with replacement "
                "among matching labels (CT 'covid' matches type1 and type2). Fused figures "
                "describe this pairing only and are not clinical performance."),
            "cf_scores": cf_path.name, "ct_scores": ct_path.name,
            "cf_patients": len(cf.ids), "ct_rows": len(ct.ids),
            "ct_labels": {lab: ct.labels.count(lab) for lab in sorted(set(ct.labels))},
            "pairs": len(pairs), "pair_class_counts": counts,
            "pairs_per_patient": pairs_per_patient, "seed": seed,
            "c_grid": list(C_GRID), "c_selection": f"stratified {folds}-fold log-loss",
            "solver": "scikit-learn LogisticRegression (lbfgs, multinomial, L2)",
            "platform": training_platform(),
        },
    }


def train_interim(cf_path: Path, *, target_sn: float = DEFAULT_TARGET_SN) -> dict[str, Any]:
    """The interim document used while no CT out-of-fold scores exist (module docstring)."""
    cf = read_scores(cf_path)
    cf_sens = _sensitive(_covid_labels(cf.labels), cf.proba, target_sn,
                         f"out-of-fold CF scores ({cf_path.name})")
    untrained = {"covid_probability": 0.5, "target_sensitivity": None,
                 "chosen_on": "not chosen: no CT out-of-fold scores (interim default)"}
    plr_sens = {**cf_sens, "chosen_on": f"interim: the cf_only cut ({cf_path.name})"}
    y = np.array([CLASSES.index(lab) for lab in cf.labels])
    return {
        "model": "fusion",
        "version": f"fusion-interim-{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}",
        "interim": True,
        "classes": list(CLASSES),
        "feature_order": list(FEATURE_ORDER),
        "thresholds": {"general": "argmax",
                       "sensitive": "per mode: modes.<mode>.sensitive.covid_probability"},
        "modes": {
            "plr": {"transform": TRANSFORM_MEAN, "inputs": list(FEATURE_ORDER),
                    "interim": "untrained mean of the CT and CF probabilities: no CT scores "
                               "to fit the PLR on", "sensitive": plr_sens},
            "ct_only": {"transform": TRANSFORM_IDENTITY, "inputs": list(FEATURE_ORDER[:3]),
                        "sensitive": untrained},
            "cf_only": {"transform": TRANSFORM_IDENTITY, "inputs": list(FEATURE_ORDER[3:]),
                        "sensitive": cf_sens,
                        "out_of_fold": _mode_summary(y, cf.proba,
                                                     cf_sens["covid_probability"])},
        },
        "training": {
            "description": (
                "INTERIM: no CT out-of-fold scores existed when this was written, so no PLR "
                "was fitted. Re-run `hust19 train fusion --cf-scores cf_scores_oof.csv "
                "--ct-scores patient_scores_oof.csv`."),
            "cf_scores": cf_path.name, "cf_patients": len(cf.ids),
        },
    }


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 train fusion``."""
    parser.add_argument("--cf-scores", type=Path, required=True,
                        help="out-of-fold CF scores (patient_id,label,control,type1,type2)")
    parser.add_argument("--ct-scores", type=Path, default=None,
                        help="out-of-fold CT scores (pseudo_patient_id,label,control,type1,"
                             "type2[,fold]); without it an INTERIM document is written")
    parser.add_argument("--out", type=Path, default=MODELS_DIR,
                        help="folder for fusion.json (default: the package's models folder)")
    parser.add_argument("--target-sn", type=float, default=DEFAULT_TARGET_SN)
    parser.add_argument("--pairs-per-patient", type=int, default=1)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    """Entry point; writes fusion.json and prints a summary. Exit 2 on bad input."""
    from tqdm import tqdm

    try:
        with tqdm(total=1, desc="train fusion", unit="fit") as bar:
            if args.ct_scores is None:
                doc = train_interim(args.cf_scores, target_sn=args.target_sn)
            else:
                doc = train(args.cf_scores, args.ct_scores, target_sn=args.target_sn,
                            pairs_per_patient=args.pairs_per_patient, seed=args.seed,
                            folds=args.folds)
            bar.update(1)
    except InputError as exc:
        print(f"hust19 train fusion: {exc.message}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fusion.json"
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    plr = doc["modes"]["plr"]
    print(json.dumps({"written": str(path), "version": doc["version"],
                      "interim": doc.get("interim", False), "C": plr.get("C"),
                      "plr_out_of_fold_auc": plr.get("out_of_fold", {}).get("auc"),
                      "sensitive": {m: doc["modes"][m]["sensitive"]["covid_probability"]
                                    for m in doc["modes"]}}, indent=1))
    return 0
