"""Evaluate the shipped CF model on iCTCF-style tables.

Usage: ``hust19 evaluate cf --patients FILE --features FILE [--out DIR] [--threshold
general|sensitive]``.

``--patients`` is ``patients.csv`` (label control / type1 / type2 / suspected), ``--features``
the wide ``clinical_features.csv``. Reference ranges come from ``lab_results.csv`` beside the
features file (the range printed with each result) when present, else ``reference_ranges.csv``
beside it (per hospital), else the catalogue; the output says which (``range_source``).

Prints JSON: ``auc`` (a map: ``control``, ``type1``, ``type2`` one-vs-rest and
``covid_vs_control`` with P(type1) + P(type2)), the paper's measures per class and for COVID vs
control (general = arg-max and the shipped sensitive threshold), the arg-max confusion
matrix, counts. Suspected patients are predicted and counted, never scored. ROC and confusion
PNGs go to ``--out``. The shipped model was trained on the iCTCF data in ``../shared/data``:
on those patients the figures are training-set figures (``data_overlap`` in the output); the
cross-validated figures are in ``docs/models/cf.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from engines import ictcf
from engines.cf import CLASSES, CfModel, vectorise_many
from engines.metrics import binary_measures, multiclass_report, plot_confusion, plot_roc
from schemas.errors import Hust19Error, InputError

RANGE_SOURCE_TEXT = {
    "lab_results": "per-result ranges printed by the hospital (lab_results.csv beside the "
                   "features file)",
    "reference_ranges": "per-hospital ranges (reference_ranges.csv beside the features file)",
    "catalogue": "catalogue ranges (no lab_results.csv or reference_ranges.csv beside the "
                 "features file): results in another unit than the catalogue's are off-scale",
}


def _training_ids(model: CfModel) -> set[str]:
    """Patient ids the shipped model was trained on (listed in its metadata)."""
    ids = model.meta.get("training", {}).get("patient_ids", [])
    return {str(i) for i in ids}


def evaluate(cohort: ictcf.Cohort, model: CfModel) -> tuple[dict[str, Any], np.ndarray,
                                                            np.ndarray]:
    """The report, the class indices of the scored patients and their probabilities."""
    patients = cohort.patients
    if not patients:
        raise InputError("no patients to evaluate")
    proba_all = model.predict(vectorise_many([p.values for p in patients]))
    scored = np.array([p.scored for p in patients], dtype=bool)
    y = np.array([p.class_index for p in patients], dtype=np.int64)[scored]
    proba = proba_all[scored]
    if y.size == 0:
        raise InputError("no scored patient (control/type1/type2): nothing to evaluate")
    covid = proba[:, 1] + proba[:, 2]
    sensitive = float(model.thresholds["sensitive"]["covid_probability"])
    rep = multiclass_report(y, proba, CLASSES)
    covid_general = binary_measures(y > 0, covid, 0.5)
    covid_sensitive = binary_measures(y > 0, covid, sensitive)
    trained_on = _training_ids(model)
    overlap = sum(1 for p in patients if p.scored and p.patient_id in trained_on)
    suspected_pred = Counter(CLASSES[i] for i in proba_all[~scored].argmax(axis=1))
    report: dict[str, Any] = {
        "model": "cf", "model_version": model.version,
        "auc": {**{c: rep["per_class"][c]["auc"] for c in CLASSES},
                "covid_vs_control": covid_general["auc"]},
        "f1": covid_general["f1"],
        "per_class": rep["per_class"],
        "covid_vs_control": {"general": covid_general, "sensitive": covid_sensitive},
        "confusion_argmax": {"labels": list(CLASSES), "matrix": rep["confusion"]},
        "accuracy_argmax": rep["accuracy"],
        "counts": {"patients": len(patients), "scored": int(scored.sum()),
                   "suspected_predicted_not_scored": int((~scored).sum()),
                   **{c: int(np.sum(y == i)) for i, c in enumerate(CLASSES)}},
        "suspected_predicted": {c: suspected_pred.get(c, 0) for c in CLASSES},
        "range_source": cohort.range_source,
        "range_source_detail": RANGE_SOURCE_TEXT[cohort.range_source],
        "data_overlap": {
            "scored_patients_in_training_set": overlap,
            "note": ("the shipped CF model was trained on these patients: these are "
                     "training-set figures, not an estimate of performance on new patients; "
                     "see docs/models/cf.md for the 10x10-fold cross-validated figures")
            if overlap else "no scored patient here is in the shipped model's training set",
        },
    }
    return report, y, proba


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 evaluate cf``."""
    parser.add_argument("--patients", type=Path, required=True, help="patients.csv")
    parser.add_argument("--features", type=Path, required=True,
                        help="clinical_features.csv (wide: patient_id + one column per code)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for cf_eval.json, cf-roc.png and cf-confusion.png")
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
        report, y, proba = evaluate(cohort, model)
    except InputError as exc:
        print(f"hust19 evaluate cf: {exc.message}", file=sys.stderr)
        return 2
    except Hust19Error as exc:
        print(f"hust19 evaluate cf: {exc.message}", file=sys.stderr)
        return 1
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        curves = {c: (y == i, proba[:, i]) for i, c in enumerate(CLASSES)}
        curves["COVID-19 vs control"] = (y > 0, proba[:, 1] + proba[:, 2])
        plot_roc(curves, args.out / "cf-roc.png", "CF model: ROC (one-vs-rest)")
        plot_confusion(report["confusion_argmax"]["matrix"], CLASSES,
                       args.out / "cf-confusion.png", "CF model: confusion (arg-max)")
        report["figures"] = [str(args.out / "cf-roc.png"), str(args.out / "cf-confusion.png")]
        (args.out / "cf_eval.json").write_text(json.dumps(report, indent=1) + "\n",
                                               encoding="utf-8")
    print(json.dumps(report, indent=1))
    return 0
