"""The paper's repeated k-fold cross-validation of the CF network on the iCTCF cohort.

Usage: ``hust19 evaluate cv cf --ictcf DIR [--folds 10] [--repeats 10] [--out DIR]``.

Each repeat is a fresh stratified k-fold split (its own seed); in each fold a network is trained
from scratch on the other folds (the shipped training configuration) and scored on the held-out
fold. Measures per fold: one-vs-rest AUC and the paper's measures for control, type1 and type2
(class score at 0.5), COVID-19 vs control (P(type1) + P(type2)) at 0.5, and arg-max accuracy;
``summarise_runs`` gives mean, std, min and max of each over the ``folds x repeats`` runs. The
out-of-fold scores of the first repeat can be written for training the fusion.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from engines import ictcf
from engines.cf import CLASSES
from engines.metrics import binary_measures, multiclass_report, summarise_runs
from engines.training import cf as training
from schemas.errors import InputError

PAPER_CF_AUC_COVID_VS_CONTROL = 0.882  # Ning et al. 2020, CF-only model


def fold_measures(y: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Measures of one held-out fold."""
    rep = multiclass_report(y, proba, CLASSES)
    covid = binary_measures(y > 0, training.covid_score(proba), 0.5)
    per_class = {c: {k: v for k, v in rep["per_class"][c].items()
                     if k not in ("confusion", "threshold")} for c in CLASSES}
    return {"auc": {**{c: per_class[c]["auc"] for c in CLASSES},
                    "covid_vs_control": covid["auc"]},
            "per_class": per_class,
            "covid_vs_control": {k: v for k, v in covid.items()
                                 if k not in ("confusion", "threshold")},
            "accuracy_argmax": rep["accuracy"]}


def cross_validate(data: training.Dataset, config: training.TrainConfig, folds: int,
                   repeats: int, *, show_progress: bool = True,
                   oof_path: Path | None = None) -> dict[str, Any]:
    """Run the repeated CV; returns the per-run measures' summary plus the pooled
    out-of-fold AUCs of each repeat."""
    from tqdm import tqdm

    runs: list[dict[str, Any]] = []
    pooled: list[dict[str, Any]] = []
    bar = tqdm(total=folds * repeats, desc="cv cf", unit="fold", disable=not show_progress)
    for r in range(repeats):
        oof = np.zeros((len(data.y), len(CLASSES)), dtype=np.float32)
        for k, (tr, te) in enumerate(training.stratified_folds(data.y, folds, seed=1000 + r)):
            cfg = training.TrainConfig(**{**asdict(config), "seed": 1000 * (r + 1) + k})
            net = training.fit(data.x[tr], data.y[tr], cfg)
            oof[te] = training.predict_torch(net, data.x[te])
            runs.append(fold_measures(data.y[te], oof[te]))
            bar.update(1)
            bar.set_postfix(auc=f"{runs[-1]['auc']['covid_vs_control']:.3f}")
        pooled.append(fold_measures(data.y, oof)["auc"])
        if r == 0 and oof_path is not None:
            training.write_scores(oof_path, data.ids, [CLASSES[i] for i in data.y], oof)
    bar.close()
    return {"per_fold": summarise_runs(runs), "pooled_oof_auc_per_repeat": summarise_runs(pooled)}


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 evaluate cv cf``."""
    parser.add_argument("--ictcf", type=Path, required=True,
                        help="folder with the iCTCF patients.csv and lab_results.csv")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=training.TrainConfig.epochs)
    parser.add_argument("--limit", type=int, default=None,
                        help="use a stratified subset of N scored patients (quick runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for cv_cf.json and the first repeat's out-of-fold scores "
                             "(cf_scores_oof.csv)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Entry point; prints the JSON report. Exit 2 on bad input."""
    training._torch().set_num_threads(1)
    started = time.monotonic()
    try:
        if args.folds < 2 or args.repeats < 1:
            raise InputError("--folds must be >= 2 and --repeats >= 1")
        data = training.scored_dataset(ictcf.load_cohort(args.ictcf))
        if args.limit is not None and args.limit < len(data.y):
            from sklearn.model_selection import train_test_split

            keep, _ = train_test_split(np.arange(len(data.y)), train_size=args.limit,
                                       stratify=data.y, random_state=0)
            keep = np.sort(keep)
            data = training.Dataset(data.x[keep], data.y[keep], [data.ids[i] for i in keep])
        config = training.TrainConfig(epochs=args.epochs)
        oof_path = args.out / training.OOF_FILE if args.out else None
        result = cross_validate(data, config, args.folds, args.repeats,
                                show_progress=not args.no_progress, oof_path=oof_path)
    except InputError as exc:
        print(f"hust19 evaluate cv cf: {exc.message}", file=sys.stderr)
        return 2
    counts = {c: int(np.sum(data.y == i)) for i, c in enumerate(CLASSES)}
    mean_auc = {k: v["mean"] for k, v in result["per_fold"]["auc"].items()}
    report = {
        "model": "cf", "protocol": f"stratified {args.folds}-fold CV repeated {args.repeats} "
        "times; a network trained from scratch per fold (shipped configuration)",
        "patients": len(data.y), "class_counts": counts,
        "config": {**asdict(config), "hidden": list(config.hidden)},
        "auc": mean_auc,
        "paper": {"cf_only_auc_covid_vs_control": PAPER_CF_AUC_COVID_VS_CONTROL,
                  "note": "paper: full iCTCF cohort; here the 80% of iCTCF in ../shared/data"},
        **result,
        "seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cv_cf.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
