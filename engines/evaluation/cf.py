"""Evaluate the shipped CF model on iCTCF-style tables.

Usage: ``hust19 evaluate cf --patients FILE --features FILE [--out DIR] [--model FILE]``.

``--patients`` is ``patients.csv`` (label control / type1 / type2 / suspected), ``--features``
the wide ``clinical_features.csv``. Reference ranges come from ``lab_results.csv`` beside the
features file (the range printed with each result) when present, else ``reference_ranges.csv``
beside it (per hospital), else the catalogue; the output says which (``range_source``).

Which weights score whom (``scoring``): the shipped model is an ensemble of cross-fitted
networks, and each of its training patients was held out of one member. A training patient is
scored by that member (*out-of-fold*), any other patient by the calibrated ensemble, as in
production. So on the iCTCF development patients the figures are out-of-fold figures of the
shipped weights, not training-set figures; what they still carry (the hyper-parameters and
the sensitive cut were chosen on these patients, the calibration uses their class frequencies)
is in ``data_overlap``. A
model without members (``--model`` of the older single-network format) scores every patient
with its one network, and on its training patients those are training-set figures.

Prints JSON: ``auc`` (a map: ``control``, ``type1``, ``type2`` one-vs-rest and
``covid_vs_control`` with P(type1) + P(type2)), the paper's measures per class and for COVID vs
control (general = arg-max and the shipped sensitive threshold), the arg-max confusion matrix,
calibration (ECE of P(COVID-19), top-label ECE and log-loss, with and without it), the
AUCs per hospital, counts. Suspected patients are predicted and counted, never scored. ROC,
confusion and reliability PNGs go to ``--out``. :func:`quality_gate` turns a report into the
reasons it fails stated floors (the shipped model's test uses it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines import ictcf
from engines.cf import CLASSES, CfModel, vectorise_many
from engines.metrics import binary_measures, multiclass_report, plot_confusion, plot_roc
from engines.training.cf import calibration_measures, covid_score, reliability_bins
from schemas.errors import Hust19Error, InputError

#: File names written into ``--out``.
ROC_PNG: Final = "cf-roc.png"
CONFUSION_PNG: Final = "cf-confusion.png"
RELIABILITY_PNG: Final = "cf-reliability.png"
REPORT_JSON: Final = "cf_eval.json"

RANGE_SOURCE_TEXT = {
    "lab_results": "per-result ranges printed by the hospital (lab_results.csv beside the "
                   "features file)",
    "reference_ranges": "per-hospital ranges (reference_ranges.csv beside the features file)",
    "catalogue": "catalogue ranges (no lab_results.csv or reference_ranges.csv beside the "
                 "features file): results in another unit than the catalogue's are off-scale",
}


def evaluate(cohort: ictcf.Cohort, model: CfModel) -> tuple[dict[str, Any], np.ndarray,
                                                            np.ndarray, np.ndarray]:
    """The report, the class indices of the scored patients, their calibrated probabilities
    and their probabilities before calibration (see the module docstring for who is scored
    out-of-fold)."""
    patients = cohort.patients
    if not patients:
        raise InputError("no patients to evaluate")
    x = vectorise_many([p.values for p in patients])
    ids = [p.patient_id for p in patients]
    proba_all, oof_all = model.predict_out_of_fold(x, ids)
    raw_all, _ = model.predict_out_of_fold(x, ids, calibrated=False)
    scored = np.array([p.scored for p in patients], dtype=bool)
    y = np.array([p.class_index for p in patients], dtype=np.int64)[scored]
    proba, oof = proba_all[scored], oof_all[scored]
    if y.size == 0:
        raise InputError("no scored patient (control/type1/type2): nothing to evaluate")
    uncalibrated = raw_all[scored]
    covid = covid_score(proba)
    sensitive = float(model.thresholds["sensitive"]["covid_probability"])
    rep = multiclass_report(y, proba, CLASSES)
    covid_general = binary_measures(y > 0, covid, 0.5)
    covid_sensitive = binary_measures(y > 0, covid, sensitive)
    trained_on = {str(i) for i in model.meta.get("training", {}).get("patient_ids", [])}
    overlap = sum(1 for p in patients if p.scored and p.patient_id in trained_on)
    in_training_not_oof = overlap - int(oof.sum())
    suspected_pred = Counter(CLASSES[i] for i in proba_all[~scored].argmax(axis=1))
    hospitals = np.array([p.hospital for p in patients])[scored]
    report: dict[str, Any] = {
        "model": "cf", "model_version": model.version,
        "scoring": {"out_of_fold": int(oof.sum()), "ensemble": int((~oof).sum()),
                    "members": model.member_count,
                    "note": "training patients scored by the member that did not see them, "
                            "others by the calibrated ensemble"},
        "auc": {**{c: rep["per_class"][c]["auc"] for c in CLASSES},
                "covid_vs_control": covid_general["auc"]},
        "f1": covid_general["f1"],
        "per_class": rep["per_class"],
        "covid_vs_control": {"general": covid_general, "sensitive": covid_sensitive},
        "confusion_argmax": {"labels": list(CLASSES), "matrix": rep["confusion"]},
        "accuracy_argmax": rep["accuracy"],
        "calibration": {**model.calibration.to_json(),
                        "before": calibration_measures(y, uncalibrated),
                        "after": calibration_measures(y, proba),
                        "reliability_covid": reliability_bins(y > 0, covid)},
        "by_hospital": _by_hospital(y, proba, hospitals),
        "counts": {"patients": len(patients), "scored": int(scored.sum()),
                   "suspected_predicted_not_scored": int((~scored).sum()),
                   **{c: int(np.sum(y == i)) for i, c in enumerate(CLASSES)}},
        "suspected_predicted": {c: suspected_pred.get(c, 0) for c in CLASSES},
        "range_source": cohort.range_source,
        "range_source_detail": RANGE_SOURCE_TEXT[cohort.range_source],
        "data_overlap": {
            "scored_patients_in_training_set": overlap,
            "scored_in_training_set_not_out_of_fold": in_training_not_oof,
            "note": _overlap_note(overlap, in_training_not_oof),
        },
    }
    return report, y, proba, uncalibrated


def _overlap_note(overlap: int, not_oof: int) -> str:
    if not overlap:
        return "no scored patient here is in the shipped model's training set"
    if not_oof:
        return ("the model was trained on these patients and has no out-of-fold member for "
                f"{not_oof} of them: training-set figures, not an estimate of performance on "
                "new patients; see docs/models/cf.md for the cross-validated figures")
    return ("these are the model's development patients, each scored by the ensemble member "
            "that was not fitted on it (out-of-fold); the hyper-parameters and the sensitive "
            "cut were chosen on them and the calibration uses their class frequencies, so the "
            "figures carry that small selection optimism")


def _by_hospital(y: np.ndarray, proba: np.ndarray,
                 hospitals: np.ndarray) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for h in sorted(set(hospitals.tolist())):
        m = hospitals == h
        rep = multiclass_report(y[m], proba[m], CLASSES)
        out[str(h) or "(none)"] = {
            "patients": int(m.sum()),
            "auc": {**{c: rep["per_class"][c]["auc"] for c in CLASSES},
                    "covid_vs_control": binary_measures(y[m] > 0,
                                                        covid_score(proba[m]))["auc"]}}
    return out


def quality_gate(report: Mapping[str, Any], floors: Mapping[str, float]) -> list[str]:
    """Why ``report`` fails the gate (empty: it passes). Every scored patient must have been
    scored out-of-fold (else the figures are the training set's, and no floor means anything),
    and each named AUC (``covid_vs_control``, ``control``, ``type1``, ``type2``) must reach its
    floor."""
    failures: list[str] = []
    scoring = report.get("scoring", {})
    scored = int(report.get("counts", {}).get("scored", 0))
    if int(scoring.get("out_of_fold", 0)) != scored or scored == 0:
        failures.append(f"{scoring.get('out_of_fold', 0)} of {scored} scored patients were "
                        "scored out-of-fold; the gate needs all of them")
    for name, floor in floors.items():
        auc = report.get("auc", {}).get(name)
        if auc is None or auc < floor:
            failures.append(f"AUC {name} {auc if auc is None else round(float(auc), 4)} "
                            f"below the floor {floor}")
    return failures


def plot_reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path,
                     title: str) -> None:
    """A reliability diagram: per named (labels, scores), the observed frequency against the
    mean score in each equal-width bin, with its ECE in the legend, and the histogram of the
    scores beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engines.training.cf import ECE_BINS, expected_calibration_error

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6.2), dpi=100, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    try:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8,
                label="perfect calibration")
        for name, (y, s) in curves.items():
            rows = reliability_bins(y, s)
            ece = expected_calibration_error(y, s)
            ax.plot([r["mean_score"] for r in rows], [r["observed"] for r in rows],
                    marker="o", label=f"{name} (ECE {ece:.3f})" if ece is not None else name)
            hist.hist(np.asarray(s, dtype=np.float64), bins=ECE_BINS, range=(0, 1),
                      histtype="step", label=name)
        ax.set(ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="upper left", fontsize="small")
        hist.set(xlabel="predicted probability", ylabel="patients")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def write_figures(out: Path, y: np.ndarray, proba: np.ndarray, uncalibrated: np.ndarray,
                  report: Mapping[str, Any], what: str) -> list[str]:
    """ROC, arg-max confusion and reliability (P(COVID-19), before and after calibration)
    PNGs into ``out``; returns their paths."""
    curves = {c: (y == i, proba[:, i]) for i, c in enumerate(CLASSES)}
    curves["COVID-19 vs control"] = (y > 0, covid_score(proba))
    plot_roc(curves, out / ROC_PNG, f"CF model: ROC ({what})")
    plot_confusion(report["confusion_argmax"]["matrix"], CLASSES, out / CONFUSION_PNG,
                   f"CF model: confusion, arg-max ({what})")
    plot_reliability({"uncalibrated": (y > 0, covid_score(uncalibrated)),
                      "calibrated (shipped)": (y > 0, covid_score(proba))},
                     out / RELIABILITY_PNG, f"CF model: P(COVID-19) reliability ({what})")
    return [str(out / n) for n in (ROC_PNG, CONFUSION_PNG, RELIABILITY_PNG)]


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 evaluate cf``."""
    parser.add_argument("--patients", type=Path, required=True, help="patients.csv")
    parser.add_argument("--features", type=Path, required=True,
                        help="clinical_features.csv (wide: patient_id + one column per code)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for cf_eval.json, cf-roc.png, cf-confusion.png and "
                             "cf-reliability.png")
    parser.add_argument("--model", type=Path, default=None,
                        help="a CF model .onnx (default: the shipped one)")


def main(args: argparse.Namespace) -> int:
    """Entry point; prints the JSON report. Bad input: one line on stderr, exit 2."""
    try:
        for f in (args.patients, args.features):
            if not f.is_file():
                raise InputError(f"{f}: not found")
        model = CfModel(args.model) if args.model else CfModel.load_default()
        cohort = ictcf.load_tables(args.patients, args.features)
        report, y, proba, uncalibrated = evaluate(cohort, model)
    except InputError as exc:
        print(f"hust19 evaluate cf: {exc.message}", file=sys.stderr)
        return 2
    except Hust19Error as exc:
        print(f"hust19 evaluate cf: {exc.message}", file=sys.stderr)
        return 1
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        oof, n = report["scoring"]["out_of_fold"], report["counts"]["scored"]
        what = "out-of-fold" if oof == n else ("new patients" if oof == 0 else "mixed")
        report["figures"] = write_figures(args.out, y, proba, uncalibrated, report, what)
        (args.out / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n",
                                            encoding="utf-8")
    print(json.dumps(report, indent=1))
    return 0
