"""Fit the slice evidence scorer and evaluate it leave-one-series-out.

Usage: ``hust19 train evidence [--data DIR --series NAME ...] | [--series-dir DIR --labels CSV
[--slice-labels CSV]] [--out DIR] [--install]``.

Protocol (``docs/models/evidence.md``):

1. Every series is decoded, segmented and measured (:mod:`engines.ct_analysis`), giving per
   slice its lung area and opacity areas.
2. **Leave one series out.** For each series, the feature settings (:data:`SPEC_GRID`: which
   opacity area, the area floor, the smoothing) are chosen on the *other* series (the mean of
   their per-series AUCs), the two coefficients are fitted on the other series' labelled
   slices with lung, and the held-out series is scored. Reported per held-out series: AUC and
   the paper's measures at the threshold, the share of lung slices scored positive, and a
   **position-only baseline** fitted the same way on (relative slice position, relative lung
   area) plus the raw position's AUC in its better direction: a score must beat where in the
   chest the slice is (cap002's lesions are all basal).
3. The shipped model repeats step 2's choice and fit on all series.

Outputs in ``--out``: ``evidence.json`` (the model, with the evaluation), ``report.json``,
``card.md`` (what it was trained and evaluated on, generated), ``roc-loso.png`` and one
``profile-<series>.png`` per series (score along the slices, labels shaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines import MODELS_DIR, ct_analysis, manifest, quantitative
from engines.evidence import FeatureSpec, features
from engines.metrics import binary_measures, plot_roc, roc_auc
from engines.training.provenance import training_platform
from engines.training.series_data import (
    UNLABELLED,
    LabelledSeries,
    load_volume,
    shared_series,
    site_series,
)
from schemas.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_DATA: Final = Path("../shared/data")
DEFAULT_SERIES: Final = ("P002", "cap002", "normal001")
DEFAULT_OUT: Final = Path("runs/evidence")
MODEL_NAME: Final = "evidence"
THRESHOLD: Final = 0.5
REGULARISATION_C: Final = 1.0
"""Inverse L2 strength of the two-coefficient logistic regression (scikit-learn's default)."""
SPEC_GRID: Final = tuple(FeatureSpec(kind, floor, smoothing)
                         for kind in ("core", "opacity")
                         for floor in (0.3, 0.5, 1.0)
                         for smoothing in (1, 3))


@dataclass(frozen=True)
class SeriesFeatures:
    """What the scorer needs of one series, in slice order."""

    name: str
    pneumonia: bool
    labels: np.ndarray
    lung_px: np.ndarray
    core_px: np.ndarray
    opacity_px: np.ndarray
    involvement_percent: float | None

    def x(self, spec: FeatureSpec) -> np.ndarray:
        source = self.core_px if spec.kind == "core" else self.opacity_px
        return features(self.lung_px, source, spec)

    @property
    def labelled(self) -> np.ndarray:
        return self.labels != UNLABELLED

    @property
    def has_both_classes(self) -> bool:
        known = self.labels[self.labelled]
        return bool(known.size and 0 < known.sum() < known.size)

    def position(self) -> np.ndarray:
        """The baseline's inputs: relative position (0 cranial .. 1 caudal), relative area."""
        n = len(self.lung_px)
        z = np.arange(n) / max(n - 1, 1)
        area = self.lung_px / max(float(self.lung_px.max()), 1.0)
        return np.stack([z, area], axis=1)


def measure(items: Sequence[LabelledSeries], cache: Path | None,
            progress: bool = True) -> list[SeriesFeatures]:
    """Decode, segment and measure every series (volumes cached in ``cache``)."""
    from tqdm import tqdm

    from engines.evidence import EvidenceModel

    neutral = EvidenceModel({"feature": dataclasses.asdict(FeatureSpec()), "coef": 0.0,
                             "intercept": 0.0, "threshold": THRESHOLD, "version": "none",
                             "method": quantitative.METHOD})
    out = []
    for item in tqdm(items, desc="measuring series", unit="series", disable=not progress):
        volume, labels = load_volume(item, cache)
        analysis = ct_analysis.analyse(volume, neutral, series_uid=item.name)
        if analysis.quant.reason is not None:
            raise InputError(f"series {item.name}: cannot be measured: {analysis.quant.reason}")
        q = analysis.quant
        out.append(SeriesFeatures(item.name, item.pneumonia, labels, q.lung_px, q.core_px,
                                  q.opacity_px, q.involvement_percent))
    return out


def choose_spec(train: Sequence[SeriesFeatures]) -> FeatureSpec:
    """The grid point with the best mean per-series AUC over the training series that have
    both classes (ties: the earlier grid point)."""
    scored = [s for s in train if s.has_both_classes]
    if not scored:
        raise InputError("no training series with both infected and uninfected slices: "
                         "the feature settings cannot be chosen")
    best, best_auc = SPEC_GRID[0], -1.0
    for spec in SPEC_GRID:
        aucs = [roc_auc(s.labels[s.labelled], s.x(spec)[s.labelled]) for s in scored]
        mean = float(np.mean([a for a in aucs if a is not None]))
        if mean > best_auc + 1e-12:
            best, best_auc = spec, mean
    return best


def _training_rows(train: Sequence[SeriesFeatures], inputs: Any) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for s in train:
        keep = s.labelled & (s.lung_px > 0)
        xs.append(np.asarray(inputs(s))[keep])
        ys.append(s.labels[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if y.min() == y.max():
        raise InputError("the training slices are all of one class: nothing to fit")
    return x.reshape(len(y), -1), y


def fit(train: Sequence[SeriesFeatures], spec: FeatureSpec) -> tuple[float, float]:
    """(coef, intercept) of the logistic regression on the labelled slices with lung."""
    from sklearn.linear_model import LogisticRegression

    x, y = _training_rows(train, lambda s: s.x(spec))
    model = LogisticRegression(C=REGULARISATION_C).fit(x, y)
    return float(model.coef_[0][0]), float(model.intercept_[0])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


def score(s: SeriesFeatures, spec: FeatureSpec, coef: float, intercept: float) -> np.ndarray:
    """Scores of every slice (0 without lung), as :class:`engines.evidence.EvidenceModel`."""
    return np.where(s.lung_px > 0, _sigmoid(intercept + coef * s.x(spec)), 0.0)


def position_baseline(train: Sequence[SeriesFeatures], test: SeriesFeatures) -> np.ndarray:
    """The position-only scores of ``test`` from a regression fitted on ``train``."""
    from sklearn.linear_model import LogisticRegression

    x, y = _training_rows(train, lambda s: s.position())
    model = LogisticRegression(C=REGULARISATION_C).fit(x, y)
    return np.asarray(model.predict_proba(test.position())[:, 1])


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def evaluate_held_out(train: Sequence[SeriesFeatures], test: SeriesFeatures) -> dict[str, Any]:
    """Step 2 for one held-out series; returns its report (and the scores under ``_scores``)."""
    spec = choose_spec(train)
    coef, intercept = fit(train, spec)
    scores = score(test, spec, coef, intercept)
    lung = test.lung_px > 0
    report: dict[str, Any] = {
        "series": test.name, "spec": dataclasses.asdict(spec),
        "coef": round(coef, 4), "intercept": round(intercept, 4),
        "slices": len(scores), "lung_slices": int(lung.sum()),
        "positive_lung_slices": int(np.sum(scores[lung] >= THRESHOLD)),
        "positive_lung_share": round(float(np.mean(scores[lung] >= THRESHOLD)), 4),
        "involvement_percent": _round(test.involvement_percent, 3),
    }
    if test.has_both_classes:
        y, keep = test.labels, test.labelled
        baseline = position_baseline(train, test)
        z = test.position()[:, 0]
        raw = roc_auc(y[keep], z[keep])
        report["measures"] = binary_measures(y[keep], scores[keep], THRESHOLD)
        report["position_baseline_auc"] = _round(roc_auc(y[keep], baseline[keep]))
        report["position_raw_auc_best_direction"] = _round(None if raw is None
                                                           else max(raw, 1 - raw))
        report["_baseline"] = baseline
    report["_scores"] = scores
    return report


def leave_one_series_out(series: Sequence[SeriesFeatures]) -> list[dict[str, Any]]:
    """Step 2 over every series."""
    if len(series) < 2:
        raise InputError("leave-one-series-out needs at least two series")
    return [evaluate_held_out([s for s in series if s is not held], held) for held in series]


def _public(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def _plots(series: Sequence[SeriesFeatures], loso: Sequence[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s, r in zip(series, loso, strict=True):
        if "_baseline" in r:
            keep = s.labelled
            curves[f"{s.name} evidence"] = (s.labels[keep], r["_scores"][keep])
            curves[f"{s.name} position baseline"] = (s.labels[keep], r["_baseline"][keep])
    if curves:
        plot_roc(curves, out / "roc-loso.png", "Slice evidence, leave one series out")
    for s, r in zip(series, loso, strict=True):
        fig, ax = plt.subplots(figsize=(8, 2.6), dpi=100)
        try:
            idx = np.arange(len(s.labels))
            ax.fill_between(idx, 0, (s.labels == 1).astype(float), step="mid", alpha=0.25,
                            color="tab:red", label="reader: infected")
            ax.plot(idx, r["_scores"], color="tab:blue", label="evidence (held out)")
            ax.axhline(THRESHOLD, color="grey", linestyle="--", linewidth=0.8)
            ax.set(xlabel="slice (0 = most cranial)", ylabel="score", ylim=(0, 1.02),
                   title=f"{s.name}: slice evidence, series held out")
            ax.legend(loc="upper left", fontsize="small")
            fig.tight_layout()
            fig.savefig(out / f"profile-{s.name}.png", format="png")
        finally:
            plt.close(fig)


def card(doc: dict[str, Any]) -> str:
    """A model card in Markdown from the model document."""
    lines = [f"# Slice evidence scorer {doc['version']}", "",
             f"Trained on {doc['training']['source']}: series "
             f"{', '.join(doc['training']['series'])} ({doc['training']['slices']} labelled "
             f"slices with lung, {doc['training']['positive']} infected).",
             f"Feature: {doc['feature']}; score = sigmoid({doc['intercept']:.4f} + "
             f"{doc['coef']:.4f} x feature); evidence when >= {doc['threshold']}.", "",
             "## Leave one series out (settings chosen and coefficients fitted without the "
             "held-out series)", "",
             "| held out | AUC | position baseline AUC | raw position AUC | Sn | Sp | lung slices "
             "positive |", "|---|---|---|---|---|---|---|"]
    def num(value: Any) -> str:
        return "n/a" if value is None else f"{float(value):.3f}"

    for r in doc["evaluation"]["leave_one_series_out"]:
        m = r.get("measures", {})
        lines.append(f"| {r['series']} | {num(m.get('auc'))} | "
                     f"{num(r.get('position_baseline_auc'))} | "
                     f"{num(r.get('position_raw_auc_best_direction'))} | {num(m.get('sn'))}"
                     f" | {num(m.get('sp'))} | {r['positive_lung_slices']} of "
                     f"{r['lung_slices']} |")
    lines += ["", "These are the only labelled series the scorer has seen; they are not a "
              "clinical evaluation."]
    return "\n".join(lines) + "\n"


def train(series: Sequence[SeriesFeatures], source: str) -> dict[str, Any]:
    """Evaluate leave-one-series-out, then fit on all; returns the model document (with the
    held-out scores under ``_loso`` for the plots)."""
    loso = leave_one_series_out(series)
    spec = choose_spec(series)
    coef, intercept = fit(series, spec)
    _, y = _training_rows(series, lambda s: s.x(spec))
    return {
        "model": MODEL_NAME,
        "version": f"evidence-{datetime.now(UTC):%Y%m%d%H%M%S}",
        "method": quantitative.METHOD,
        "feature": dataclasses.asdict(spec),
        "coef": coef, "intercept": intercept, "threshold": THRESHOLD,
        "training": {"source": source, "series": [s.name for s in series],
                     "slices": len(y), "positive": int(y.sum()),
                     "regularisation_c": REGULARISATION_C,
                     "spec_grid": [dataclasses.asdict(g) for g in SPEC_GRID],
                     "platform": training_platform()},
        "evaluation": {"protocol": "leave one series out; settings chosen and coefficients "
                                   "fitted on the other series",
                       "leave_one_series_out": [_public(r) for r in loso]},
        "_loso": loso,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 train evidence``."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data folder (with --series)")
    parser.add_argument("--series", nargs="*", default=list(DEFAULT_SERIES),
                        help="series of the shared data (default: P002 cap002 normal001)")
    parser.add_argument("--series-dir", type=Path, help="a site's folder of series folders")
    parser.add_argument("--labels", type=Path, help="the site's labels CSV: series,pneumonia")
    parser.add_argument("--slice-labels", type=Path,
                        help="the site's slice labels CSV: series,file,infection")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--install", action="store_true",
                        help="copy the model into the package (engines/models) and rewrite the "
                             "manifest")
    parser.add_argument("--no-progress", action="store_true")


def items_from_args(args: argparse.Namespace) -> tuple[list[LabelledSeries], str]:
    """The series named by the flags, and how to describe where they came from."""
    if args.series_dir is not None or args.labels is not None:
        if args.series_dir is None or args.labels is None:
            raise InputError("--series-dir and --labels go together")
        return (site_series(args.series_dir, args.labels, args.slice_labels),
                f"site series in {args.series_dir}")
    return shared_series(args.data, args.series), f"shared data {args.data / 'chest-ct-series'}"


def main(args: argparse.Namespace) -> int:
    """Measure, evaluate, fit, write (and install)."""
    try:
        items, source = items_from_args(args)
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        series = measure(items, out / "cache", progress=not args.no_progress)
        doc = train(series, source)
    except InputError as exc:
        print(f"hust19: error: {exc.message}", file=sys.stderr)
        return 2
    loso = doc.pop("_loso")
    _plots(series, loso, out)
    model_path = out / f"{MODEL_NAME}.json"
    model_path.write_text(json.dumps(doc, indent=1) + "\n")
    (out / "report.json").write_text(json.dumps(doc["evaluation"], indent=1) + "\n")
    (out / "card.md").write_text(card(doc))
    if args.install:
        shutil.copy2(model_path, MODELS_DIR / model_path.name)
        manifest.main()
    print(json.dumps({"model": str(model_path), "version": doc["version"],
                      "feature": doc["feature"],
                      "leave_one_series_out": doc["evaluation"]["leave_one_series_out"]},
                     indent=1))
    return 0
