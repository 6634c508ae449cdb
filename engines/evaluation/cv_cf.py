"""Cross-validation of the CF model recipe on the iCTCF cohort: the paper's repeated k-fold,
and hospital-grouped validation.

Usage: ``hust19 evaluate cv cf --ictcf DIR [--folds 10] [--repeats 10] [--members 10]
[--group hospital] [--out DIR]``.

What is validated is the recipe that ``hust19 train cf`` ships: in each training split a
``--members``-fold cross-fitting (one network per inner fold), the class-prior calibration,
the sensitive threshold chosen on the inner out-of-fold scores, and the calibrated ensemble
mean scored on the held-out patients. ``--members 1`` validates a single network per split
instead, uncalibrated (the protocol of the model shipped until 2026-12).

Calibration is reported three ways, pooled over each repeat's held-out patients:
``uncalibrated`` (the ensemble mean), ``shipped`` (the class-prior correction) and
``temperature`` (the alternative not shipped: a temperature fitted on the inner out-of-fold
scores, applied to the ensemble mean), each with the ECE of P(COVID-19), the top-label ECE and
the log-loss. ``sensitive_cut_held_out`` gives the sensitivity and specificity that the cut
chosen on the inner out-of-fold scores reaches on the held-out patients.

* Repeated k-fold (default): each repeat is a fresh stratified k-fold split (its own seed).
  Measures per held-out fold: one-vs-rest AUC and the paper's measures for control, type1 and
  type2 (class score at 0.5), COVID-19 vs control (P(type1) + P(type2)) at 0.5, and arg-max
  accuracy; ``summarise_runs`` gives mean, std, min and max over the ``folds x repeats`` runs.
  Per repeat, the pooled out-of-fold AUCs, calibration and sensitive cut. The out-of-fold
  scores of the first repeat can be written (``cf_scores_oof.csv``).
* ``--group hospital``: train on all patients of one hospital, test on every other hospital,
  in each direction; per direction the per-class and COVID-vs-control AUCs, the sensitive cut
  chosen at the training hospital and the sensitivity and specificity it gives at the test
  hospital, calibration, and a ROC PNG in ``--out``. New patients from another hospital, with
  its own population, test menu and reference ranges: the figure a new site should expect
  before it re-checks the model on its own patients. Beside it, :func:`missingness_probe`:
  how well the hospital, and the diagnosis, can be told from *which* tests were measured
  alone (the ordering pattern), within and across hospitals.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines import ictcf
from engines.cf import CLASSES, Calibration, apply_temperature
from engines.metrics import (
    binary_measures,
    multiclass_report,
    plot_roc,
    summarise_runs,
    threshold_for_sensitivity,
)
from engines.training import cf as training
from schemas.errors import InputError

log = logging.getLogger(__name__)

PAPER_CF_AUC_COVID_VS_CONTROL: Final = 0.882  # Ning et al. 2020, CF-only model
#: Seeds: repeat r splits with SPLIT_SEED + r; the network(s) of outer fold k of repeat r start
#: from NET_SEED * (r + 1) + k (the same seeds as the single-network CV before 2026-12).
SPLIT_SEED: Final = 1000
NET_SEED: Final = 1000
GROUPS: Final = ("hospital",)
#: The probes' linear model: L2 logistic regression with this inverse regularisation, scored
#: by stratified PROBE_FOLDS-fold cross-validation (split seed 0).
PROBE_C: Final = 0.1
PROBE_FOLDS: Final = 10


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


def fit_recipe(x: np.ndarray, y: np.ndarray, config: training.TrainConfig, members: int,
               progress: Callable[[], None] | None = None) -> training.CrossFit:
    """The shipped recipe on one training split: a ``members``-fold cross-fitting with its
    calibration; with ``members == 1`` one network on the whole split, uncalibrated."""
    if members == 1:
        net = training.fit(x, y, config)
        if progress is not None:
            progress()
        return training.CrossFit([net], np.zeros((0, len(CLASSES)), np.float32),
                                 np.zeros(0, np.int64), Calibration())
    return training.cross_fit(x, y, config, members, progress=progress)


class _HeldOut:
    """Held-out scores of the recipe, filled fold by fold: calibrated (``shipped``), raw, with
    the temperature alternative, and the sensitive cut chosen in each training split."""

    def __init__(self, n: int) -> None:
        self.shipped = np.zeros((n, len(CLASSES)), dtype=np.float32)
        self.raw = np.zeros_like(self.shipped)
        self.temperature = np.zeros_like(self.shipped)
        self.cut = np.zeros(n, dtype=np.float64)
        self.temperatures: list[float] = []

    def add(self, recipe: training.CrossFit, y_train: np.ndarray, x: np.ndarray,
            rows: np.ndarray, target_sn: float) -> None:
        self.raw[rows] = recipe.predict_raw(x)
        self.shipped[rows] = recipe.calibration.apply(self.raw[rows])
        if len(recipe.oof):
            t = training.fit_temperature(y_train, recipe.oof)
            self.temperatures.append(t)
            self.temperature[rows] = apply_temperature(self.raw[rows], t)
            self.cut[rows] = threshold_for_sensitivity(
                y_train > 0, training.covid_score(recipe.oof_calibrated), target_sn)
        else:
            self.cut[rows] = 0.5

    def calibration(self, y: np.ndarray, rows: np.ndarray | None = None) -> dict[str, Any]:
        r = np.arange(len(y)) if rows is None else rows
        out = {"uncalibrated": training.calibration_measures(y[r], self.raw[r]),
               "shipped": training.calibration_measures(y[r], self.shipped[r])}
        if self.temperatures:
            out["temperature"] = training.calibration_measures(y[r], self.temperature[r])
        return out

    def sensitive(self, y: np.ndarray, rows: np.ndarray | None = None) -> dict[str, Any]:
        """Sn / Sp of the training splits' sensitive cuts on the held-out patients."""
        r = np.arange(len(y)) if rows is None else rows
        covid, pos = training.covid_score(self.shipped[r]), y[r] > 0
        hit = covid >= self.cut[r]
        return {"sn": float(hit[pos].mean()) if pos.any() else None,
                "sp": float((~hit[~pos]).mean()) if (~pos).any() else None,
                "mean_cut": float(self.cut[r].mean())}


def cross_validate(data: training.Dataset, config: training.TrainConfig, folds: int,
                   repeats: int, *, members: int = training.DEFAULT_FOLDS,
                   target_sn: float = training.DEFAULT_TARGET_SN,
                   show_progress: bool = True, oof_path: Path | None = None) -> dict[str, Any]:
    """Run the repeated CV of the recipe; returns the per-fold measures' summary and, per
    repeat, the pooled out-of-fold AUCs, calibration and sensitive-cut figures."""
    from tqdm import tqdm

    runs: list[dict[str, Any]] = []
    pooled: list[dict[str, Any]] = []
    calibration: list[dict[str, Any]] = []
    sensitive: list[dict[str, Any]] = []
    temperatures: list[float] = []
    bar = tqdm(total=folds * repeats * members, desc=f"cv cf ({members} members/fold)",
               unit="net", disable=not show_progress)
    for r in range(repeats):
        held = _HeldOut(len(data.y))
        for k, (tr, te) in enumerate(training.stratified_folds(data.y, folds,
                                                               seed=SPLIT_SEED + r)):
            cfg = training.TrainConfig(**{**asdict(config), "seed": NET_SEED * (r + 1) + k})
            recipe = fit_recipe(data.x[tr], data.y[tr], cfg, members,
                                progress=lambda: bar.update(1))
            held.add(recipe, data.y[tr], data.x[te], te, target_sn)
            runs.append(fold_measures(data.y[te], held.shipped[te]))
            bar.set_postfix(auc=f"{runs[-1]['auc']['covid_vs_control']:.3f}")
        pooled.append(fold_measures(data.y, held.shipped)["auc"])
        log.info("repeat %d of %d: pooled held-out COVID-vs-control AUC %.3f", r + 1, repeats,
                 pooled[-1]["covid_vs_control"] or float("nan"))
        calibration.append(held.calibration(data.y))
        sensitive.append(held.sensitive(data.y))
        temperatures += held.temperatures
        if r == 0 and oof_path is not None:
            training.write_scores(oof_path, data.ids, [CLASSES[i] for i in data.y],
                                  held.shipped)
    bar.close()
    return {"per_fold": summarise_runs(runs), "pooled_oof_auc_per_repeat": summarise_runs(pooled),
            "calibration_per_repeat": summarise_runs(calibration),
            "sensitive_cut_held_out_per_repeat": summarise_runs(sensitive),
            "temperature_alternative": summarise_runs([{"t": t} for t in temperatures])
            .get("t") if temperatures else None}


def hospital_grouped(data: training.Dataset, config: training.TrainConfig, *,
                     members: int = training.DEFAULT_FOLDS,
                     target_sn: float = training.DEFAULT_TARGET_SN,
                     show_progress: bool = True, out: Path | None = None) -> dict[str, Any]:
    """Train the recipe on one hospital's patients, test on the others', each direction."""
    from tqdm import tqdm

    hospitals = np.array(data.hospitals)
    names = sorted(set(data.hospitals))
    if len(names) < 2:
        raise InputError(f"hospital-grouped validation needs two hospitals; found {names}")
    bar = tqdm(total=len(names) * members, desc="cv cf by hospital", unit="net",
               disable=not show_progress)
    directions: dict[str, Any] = {}
    for train_h in names:
        tr, te = np.flatnonzero(hospitals == train_h), np.flatnonzero(hospitals != train_h)
        test_h = " + ".join(n for n in names if n != train_h)
        recipe = fit_recipe(data.x[tr], data.y[tr], config, members,
                            progress=lambda: bar.update(1))
        held = _HeldOut(len(data.y))
        held.add(recipe, data.y[tr], data.x[te], te, target_sn)
        y_te, proba = data.y[te], held.shipped[te]
        inner = (training.summary_of(data.y[tr], recipe.oof_calibrated, 0.5)["auc"]
                 if len(recipe.oof) else None)
        name = f"{train_h} -> {test_h}"
        rep = multiclass_report(y_te, proba, CLASSES)
        directions[name] = {
            "train": {"hospital": train_h, "patients": len(tr),
                      "class_counts": _counts(data.y[tr]),
                      "out_of_fold_auc": inner},
            "test": {"hospital": test_h, "patients": len(te), "class_counts": _counts(y_te)},
            "auc": {**{c: rep["per_class"][c]["auc"] for c in CLASSES},
                    "covid_vs_control": binary_measures(y_te > 0,
                                                        training.covid_score(proba))["auc"]},
            "accuracy_argmax": rep["accuracy"], "confusion_argmax": rep["confusion"],
            "sensitive_cut_from_training_hospital": held.sensitive(data.y, te),
            "calibration": held.calibration(data.y, te),
        }
        log.info("%s: COVID-vs-control AUC %.3f (%d -> %d patients)", name,
                 directions[name]["auc"]["covid_vs_control"] or float("nan"), len(tr), len(te))
        if out is not None:
            png = out / f"cf-roc-grouped-{_slug(train_h)}.png"
            curves = {c: (y_te == i, proba[:, i]) for i, c in enumerate(CLASSES)}
            curves["COVID-19 vs control"] = (y_te > 0, training.covid_score(proba))
            plot_roc(curves, png, f"CF: trained at {_short(train_h)}, tested at "
                                  f"{_short(test_h)}")
            directions[name]["figure"] = str(png)
    bar.close()
    return {"directions": directions, "missingness_probe": missingness_probe(data)}


def missingness_probe(data: training.Dataset) -> dict[str, Any]:
    """What the *pattern* of measured tests gives away, by cross-validated L2 logistic
    regression (:data:`PROBE_C`, :data:`PROBE_FOLDS` folds): the hospital from the network
    inputs and from the measured-or-not mask alone; COVID-19 vs control from the mask alone,
    pooled and within each hospital; and the mask-only model trained at one hospital and
    tested at the other. A mask that predicts the diagnosis as well as the model does means
    the model can learn the wards' ordering habits, which need not hold elsewhere."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if data.measured is None:
        raise InputError("the dataset carries no measured-input mask")
    hospitals = np.array(data.hospitals)
    names = sorted(set(data.hospitals))
    mask = data.measured.astype(np.float64)
    covid = data.y > 0

    def cv_auc(features: np.ndarray, target: np.ndarray) -> float | None:
        if len(set(target.tolist())) < 2 or np.bincount(target.astype(int)).min() < PROBE_FOLDS:
            return None
        folds = StratifiedKFold(PROBE_FOLDS, shuffle=True, random_state=0)
        p = cross_val_predict(LogisticRegression(C=PROBE_C, max_iter=5000), features, target,
                              cv=folds, method="predict_proba")[:, 1]
        return binary_measures(target, p)["auc"]

    clipped = np.clip(data.x, -training.TrainConfig.clip, training.TrainConfig.clip)
    out: dict[str, Any] = {
        "model": f"L2 logistic regression, C={PROBE_C}, stratified {PROBE_FOLDS}-fold CV",
        "covid_vs_control_from_mask": cv_auc(mask, covid),
        "covid_vs_control_from_mask_within": {h: cv_auc(mask[hospitals == h],
                                                        covid[hospitals == h]) for h in names},
    }
    if len(names) == 2:
        first = hospitals == names[0]
        out["hospital_from_inputs"] = cv_auc(clipped, first)
        out["hospital_from_mask"] = cv_auc(mask, first)
        transfer = {}
        for train_h in names:
            tr = hospitals == train_h
            lr = LogisticRegression(C=PROBE_C, max_iter=5000).fit(mask[tr], covid[tr])
            transfer[f"{train_h} -> {next(n for n in names if n != train_h)}"] = \
                binary_measures(covid[~tr], lr.predict_proba(mask[~tr])[:, 1])["auc"]
        out["covid_vs_control_from_mask_across"] = transfer
    measured_at = {h: data.measured[hospitals == h].any(axis=0) for h in names}
    out["inputs_measured_at_one_hospital_only"] = {
        h: int((measured_at[h] & ~np.any([measured_at[o] for o in names if o != h],
                                         axis=0)).sum()) for h in names}
    return out


def _counts(y: np.ndarray) -> dict[str, int]:
    return {c: int(np.sum(y == i)) for i, c in enumerate(CLASSES)}


def _short(hospital: str) -> str:
    """"HUST-Union Hospital" -> "Union" (plot titles)."""
    return hospital.removeprefix("HUST-").removesuffix(" Hospital")


def _slug(hospital: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in _short(hospital).lower()).strip("-")


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 evaluate cv cf``."""
    parser.add_argument("--ictcf", type=Path, required=True,
                        help="folder with the iCTCF patients.csv and lab_results.csv")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--members", type=int, default=training.DEFAULT_FOLDS,
                        help="ensemble members per training split, as hust19 train cf "
                             "--folds (default %(default)s); 1 = a single network, "
                             "uncalibrated")
    parser.add_argument("--group", choices=GROUPS, default=None,
                        help="hospital: train on one hospital, test on the other(s), "
                             "instead of the repeated k-fold")
    parser.add_argument("--epochs", type=int, default=training.TrainConfig.epochs)
    parser.add_argument("--limit", type=int, default=None,
                        help="use a stratified subset of N scored patients (quick runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the JSON report (cv_cf.json, or cv_cf_hospital.json "
                             "and ROC PNGs with --group hospital) and the first repeat's "
                             "out-of-fold scores (cf_scores_oof.csv)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Entry point; prints the JSON report. Exit 2 on bad input."""
    training._torch().set_num_threads(1)
    started = time.monotonic()
    try:
        if args.folds < 2 or args.repeats < 1 or args.members < 1:
            raise InputError("--folds must be >= 2, --repeats and --members >= 1")
        data = training.stratified_subset(
            training.scored_dataset(ictcf.load_cohort(args.ictcf)), args.limit, seed=0)
        config = training.TrainConfig(epochs=args.epochs)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
        if args.group == "hospital":
            protocol = ("hospital-grouped: the recipe trained on all patients of one hospital, "
                        "tested on the other(s)")
            result = hospital_grouped(data, config, members=args.members,
                                      show_progress=not args.no_progress, out=args.out)
        else:
            protocol = (f"stratified {args.folds}-fold CV repeated {args.repeats} times; in "
                        "each training split the shipped recipe from scratch")
            oof_path = args.out / training.OOF_FILE if args.out else None
            result = cross_validate(data, config, args.folds, args.repeats,
                                    members=args.members, show_progress=not args.no_progress,
                                    oof_path=oof_path)
    except InputError as exc:
        print(f"hust19 evaluate cv cf: {exc.message}", file=sys.stderr)
        return 2
    recipe = (f"ensemble of {args.members} cross-fitted networks, temperature-calibrated on "
              "their out-of-fold scores" if args.members > 1
              else "one network, uncalibrated")
    report: dict[str, Any] = {
        "model": "cf", "protocol": protocol, "recipe": recipe, "members": args.members,
        "patients": len(data.y), "class_counts": _counts(data.y),
        "config": {**asdict(config), "hidden": list(config.hidden)},
    }
    if args.group is None:
        report["auc"] = {k: v["mean"] for k, v in result["per_fold"]["auc"].items()}
        report["paper"] = {"cf_only_auc_covid_vs_control": PAPER_CF_AUC_COVID_VS_CONTROL,
                           "note": "paper: full iCTCF cohort; here the 80% of iCTCF in "
                                   "../shared/data"}
    report.update(result)
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=1)
    if args.out is not None:
        name = "cv_cf_hospital.json" if args.group == "hospital" else "cv_cf.json"
        (args.out / name).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
