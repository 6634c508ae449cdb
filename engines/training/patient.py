"""Train the patient CNN (control / type1 / type2) with the paper's method on pseudo-patients.

There is no public cohort of CT series labelled control / type1 / type2, so the inputs are
*pseudo-patients* built from what exists, each passed through exactly the run-time selection
(slice CNN scores from the shipped ONNX slice model; slices with NiCT <= 0.5; the 10 with the
highest pCT; in slice order; zero-padded to 10):

- series pseudo-patients: the whole series and random contiguous runs of at least
  ``MIN_RUN`` slices of P002 (COVID-19 -> "covid"), cap002 (community-acquired pneumonia ->
  "control": the iCTCF controls include CAP) and normal001 (-> "control"), in cranio-caudal
  order;
- public pseudo-patients: random draws of 10-25 slices from the UCSD COVID-CT *train* split,
  COVID slices -> "covid", NonCOVID -> "control". These images have no slice order; the draw
  order is used. The official val split is not touched.

Labels: control -> target (1, 0, 0); covid -> (0, 0.5, 0.5). Severity (type1 = mild/regular
vs type2 = severe/critical) is unknown for every source here, so it is *not learnable*: the
soft target splits the COVID probability evenly, and the type1 and type2 outputs each carry
about half of P(COVID). ``docs/models/patient.md`` says this; nothing here is a severity model.

Out-of-fold scores for the fusion training are written to ``patient_scores_oof.csv``
(``pseudo_patient_id,label,control,type1,type2,fold``): folds keep every series and every source
paper of the public slices inside one fold, so no pseudo-patient is scored by a model that
saw any of its slices.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from engines.patient_model import TOP_K, select_top, stack
from engines.training.provenance import training_platform
from engines.training.series_data import LabelledSeries, site_series
from engines.training.slice import (
    DEFAULT_DATA,
    MODELS_DIR,
    SliceSet,
    SliceSource,
    preprocess_sources,
    preprocessing_hash,
    public_sources,
    series_sources,
)
from schemas.errors import InputError

if TYPE_CHECKING:
    from engines.networks import Hust19Cnn
    from engines.training.common import TrainState

log = logging.getLogger(__name__)

DEFAULT_OUT: Final = Path("runs/patient")
DEFAULT_EPOCHS: Final = 8
DEFAULT_FOLDS: Final = 3
MODEL_NAME: Final = "patient"
OOF_CSV: Final = "patient_scores_oof.csv"
SERIES_LABELS: Final = {"P002": "covid", "cap002": "control", "normal001": "control"}
MIN_RUN: Final = 40
DRAW_MIN: Final = 10
DRAW_MAX: Final = 25
CONTROL_TARGET: Final = (1.0, 0.0, 0.0)
COVID_TARGET: Final = (0.0, 0.5, 0.5)
PUBLIC_LABELS: Final = {"pCT": "covid", "nCT": "control"}
SITE_CLASSES: Final = ("control", "type1", "type2")


@dataclass
class PseudoPatients:
    """Stacks uint8 (N, 10, 200, 200), labels ('control'/'covid'), ids and CV folds."""

    ids: list[str]
    labels: list[str]
    folds: np.ndarray
    stacks: np.ndarray

    def targets(self) -> np.ndarray:
        """Soft targets: ``covid`` splits evenly (severity unknown); a site's ``type1`` /
        ``type2`` patients are one-hot."""
        rows = []
        for lab in self.labels:
            if lab in SITE_CLASSES:
                rows.append(tuple(float(c == lab) for c in SITE_CLASSES))
            else:
                rows.append(COVID_TARGET if lab == "covid" else CONTROL_TARGET)
        return np.array(rows, np.float32)


def _fold_of(group: str, folds: int) -> int:
    return int(hashlib.sha256(group.encode()).hexdigest(), 16) % folds


def build_pseudo_patients(data: Path, slice_model_path: Path, *, per_series: int,
                          per_public_class: int, folds: int, seed: int, cache_dir: Path,
                          progress: bool = True, limit: int = 0) -> PseudoPatients:
    """Score every slice with the slice model and assemble the pseudo-patients (module doc)."""
    from engines.slice_model import SliceModel

    rng = np.random.default_rng(seed)
    model = SliceModel.load(slice_model_path, "onnxruntime")
    ids: list[str] = []
    labels: list[str] = []
    fold_of: list[int] = []
    stacks: list[np.ndarray] = []

    def add(pid: str, label: str, fold: int, crops: np.ndarray, scores: np.ndarray) -> None:
        chosen = select_top(scores, k=TOP_K, nict_max=model.nict_max)
        ids.append(pid)
        labels.append(label)
        fold_of.append(fold)
        stacks.append(stack(crops[chosen]))

    # series, in cranio-caudal order (label_index order of the slice tables)
    for s_i, (name, label) in enumerate(SERIES_LABELS.items()):
        sources = sorted(series_sources(data, name), key=lambda s: s.key)
        with (data / "chest-ct-series" / f"{name}-slices.csv").open(newline="") as fh:
            index = {f"{name}/{r['file']}": int(r["label_index"]) for r in csv.DictReader(fh)}
        sources.sort(key=lambda s: index[s.key])
        if limit:
            sources = sources[:limit]
        ss = preprocess_sources(sources, cache_dir / f"patient-{name}-{preprocessing_hash()}-"
                                f"{len(sources)}.npz", progress=progress)
        scores = model.score(ss.crops)
        n = len(sources)
        fold = s_i % folds
        add(f"{name}-full", label, fold, ss.crops, scores)
        run_min = min(MIN_RUN, n)
        for j in range(per_series - 1):
            length = int(rng.integers(run_min, n + 1))
            start = int(rng.integers(0, n - length + 1))
            sl = slice(start, start + length)
            add(f"{name}-run{j:03d}-{start}-{start + length}", label, fold,
                ss.crops[sl], scores[sl])

    # public train split: draws within one fold's pool of source papers
    pub = public_sources(data, "train")
    if limit:
        pub = [p for lab in PUBLIC_LABELS for p in pub if p.source_label == lab][:limit * 2]
    ps: SliceSet = preprocess_sources(pub, cache_dir / f"patient-public-{preprocessing_hash()}-"
                                      f"{len(pub)}.npz", progress=progress)
    scores = model.score(ps.crops)
    src_label = np.array([p.source_label for p in pub])
    group_fold = np.array([_fold_of(g, folds) for g in ps.groups])
    for src, label in PUBLIC_LABELS.items():
        for j in range(per_public_class):
            fold = j % folds
            pool = np.flatnonzero((src_label == src) & (group_fold == fold))
            if pool.size == 0:
                continue
            m = int(rng.integers(DRAW_MIN, DRAW_MAX + 1))
            draw = rng.choice(pool, size=min(m, pool.size), replace=False)
            add(f"public-{label}-{j:03d}", label, fold, ps.crops[draw], scores[draw])
    model.close()
    if not stacks:
        raise InputError(f"{data}: no pseudo-patient could be built")
    return PseudoPatients(ids, labels, np.array(fold_of), np.stack(stacks))


def site_patients(items: list[LabelledSeries], slice_model_path: Path, *, folds: int,
                  cache_dir: Path, progress: bool = True) -> PseudoPatients:
    """A site's patients (one series each, with its ``class``), through the run-time selection;
    each series is its own CV group."""
    import pydicom

    from engines import series as series_order
    from engines.slice_model import SliceModel

    model = SliceModel.load(slice_model_path, "onnxruntime")
    ids, labels, fold_of, stacks = [], [], [], []
    for item in items:
        if item.patient_class is None:
            log.info("series %s has no class: not a patient for the patient CNN", item.name)
            continue
        files = sorted(p for p in item.folder.iterdir() if p.is_file())
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        order = series_order.order_slices(headers)
        sources = [SliceSource(f"{item.name}/{files[i].name}", files[i], "dicom", "nCT", False,
                               f"series:{item.name}") for i in order.indices]
        ss = preprocess_sources(sources, cache_dir / f"patient-site-{item.name}-"
                                f"{preprocessing_hash()}-{len(sources)}.npz", progress=progress)
        chosen = select_top(model.score(ss.crops), k=TOP_K, nict_max=model.nict_max)
        ids.append(item.name)
        labels.append(item.patient_class)
        fold_of.append(_fold_of(item.name, folds))
        stacks.append(stack(ss.crops[chosen]))
    model.close()
    if not stacks:
        raise InputError("no series with a class (the labels CSV's class column): no patient "
                         "to train on")
    return PseudoPatients(ids, labels, np.array(fold_of), np.stack(stacks))


def site_report(pp: PseudoPatients, oof: np.ndarray, out: Path) -> dict[str, Any]:
    """Out-of-fold figures of a site's patients: report JSON, ROC and confusion PNGs."""
    from engines.metrics import binary_measures, confusion_matrix, plot_confusion, plot_roc

    y = np.array([SITE_CLASSES.index(lab) for lab in pp.labels])
    per_class = {c: binary_measures(y == i, oof[:, i]) for i, c in enumerate(SITE_CLASSES)}
    covid = binary_measures(y > 0, oof[:, 1] + oof[:, 2])
    confusion = confusion_matrix(y, oof.argmax(axis=1), len(SITE_CLASSES))
    report = {"patients": len(y), "class_counts": {c: int((y == i).sum())
                                                   for i, c in enumerate(SITE_CLASSES)},
              "per_class": per_class, "covid_vs_control": covid, "confusion": confusion,
              "protocol": "out-of-fold: each series scored by a model trained without it"}
    plot_roc({c: (y == i, oof[:, i]) for i, c in enumerate(SITE_CLASSES)
              if 0 < int((y == i).sum()) < len(y)}, out / "oof-roc.png",
             "Patient CNN, out-of-fold")
    plot_confusion(confusion, SITE_CLASSES, out / "oof-confusion.png",
                   "Patient CNN, out-of-fold (arg-max)")
    (out / "oof-report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def card(meta: dict[str, Any], report: dict[str, Any] | None) -> str:
    """A model card in Markdown from the metadata and the out-of-fold report."""
    t = meta["training"]
    lines = [f"# Patient CNN {meta['version']}", "",
             f"Trained on {t['source']}: {t['pseudo_patients']} (patients or pseudo-patients), "
             f"{t['epochs']} epochs, seed {t['seed']}. Slice selection by the slice model "
             f"{meta['slice_model']['version']}.", ""]
    if report is None:
        lines.append("No out-of-fold evaluation (--folds 0, or too few series).")
    else:
        lines += ["## Out-of-fold (each series scored by a model that never saw it)", "",
                  "| class | AUC | Sn | Sp |", "|---|---|---|---|"]
        for name, m in [*report["per_class"].items(),
                        ("COVID-19 vs control", report["covid_vs_control"])]:
            cells = ["n/a" if m[k] is None else f"{m[k]:.3f}" for k in ("auc", "sn", "sp")]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        lines += ["", f"Confusion (rows true control/type1/type2, columns predicted): "
                  f"{report['confusion']}. Plots: oof-roc.png, oof-confusion.png."]
    return "\n".join(lines) + "\n"


def _train(pp: PseudoPatients, idx: np.ndarray, *, epochs: int, batch_size: int, seed: int,
           out: Path | None, resume: bool, progress: bool,
           config: dict[str, object]) -> tuple[Hust19Cnn, TrainState]:
    import torch

    from engines import networks
    from engines.training import common

    common.seed_everything(seed)
    net = networks.patient_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=networks.PATIENT_LR)
    state = common.load_checkpoint(out, net, opt) if (out is not None and resume) else None
    if state is None:
        state = common.TrainState(config=config)
    else:
        log.info("resuming patient training in %s at epoch %d", out, state.epoch)
    state = common.train_epochs(net, opt, pp.stacks[idx], pp.targets()[idx], epochs=epochs,
                                batch_size=batch_size, seed=seed, out=out, state=state,
                                progress=progress)
    return net, state


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 train patient``."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    parser.add_argument("--series-dir", type=Path,
                        help="a site's folder of series folders: each series with a class in "
                             "--labels is one patient (docs/models/retraining.md)")
    parser.add_argument("--labels", type=Path,
                        help="the site's labels CSV: series,pneumonia,class")
    parser.add_argument("--slice-model", type=Path, default=MODELS_DIR / "slice.onnx",
                        help="ONNX slice model used for the selection (default: shipped)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--per-series", type=int, default=30,
                        help="pseudo-patients per series (the full series + random runs)")
    parser.add_argument("--per-public-class", type=int, default=60,
                        help="pseudo-patients drawn from the public COVID / NonCOVID slices")
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                        help="folds for the out-of-fold scores (0 = skip them)")
    parser.add_argument("--limit", type=int, default=0, help="few slices per source (tests)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--install", action="store_true",
                        help="copy model, metadata and OOF CSV into engines/models")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Build pseudo-patients, train the shipped model, then the out-of-fold models."""
    import torch

    from engines import networks
    from engines.slice_model import load_metadata
    from engines.training import common

    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    folds = max(args.folds, 1)
    site = args.series_dir is not None or args.labels is not None
    if site:
        if args.series_dir is None or args.labels is None:
            raise InputError("--series-dir and --labels go together")
        pp = site_patients(site_series(args.series_dir, args.labels), args.slice_model,
                           folds=folds, cache_dir=out, progress=not args.no_progress)
        source = f"site series in {args.series_dir}"
    else:
        pp = build_pseudo_patients(args.data, args.slice_model, per_series=args.per_series,
                                   per_public_class=args.per_public_class, folds=folds,
                                   seed=args.seed, cache_dir=out,
                                   progress=not args.no_progress, limit=args.limit)
        source = "pseudo-patients of the shared data"
    counts = {lab: pp.labels.count(lab) for lab in sorted(set(pp.labels))}
    log.info("pseudo-patients: %s", counts)
    config: dict[str, object] = {"epochs": args.epochs, "batch_size": args.batch_size,
                                 "seed": args.seed, "lr": networks.PATIENT_LR,
                                 "per_series": args.per_series,
                                 "per_public_class": args.per_public_class, "folds": folds}
    everything = np.arange(len(pp.ids))
    net, state = _train(pp, everything, epochs=args.epochs, batch_size=args.batch_size,
                        seed=args.seed, out=out / "final", resume=args.resume,
                        progress=not args.no_progress, config=config)
    slice_meta = load_metadata(args.slice_model)
    meta = {
        "name": MODEL_NAME,
        "version": f"patient-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}",
        "classes": list(networks.PATIENT_CLASSES),
        "output_meaning": "control = P(not COVID-19); type1 and type2 each carry about half of "
                          "P(COVID-19): severity was not learnable from the training data",
        "selection": {"nict_max": 0.5, "top_k": TOP_K, "order": "slice order (cranio-caudal)",
                      "padding": "blank slices appended when fewer than 10 are usable"},
        "slice_model": {"version": slice_meta.get("version"), "sha256": slice_meta["sha256"]},
        "training": {"source": source, "pseudo_patients": counts, "epochs": state.epoch,
                     "final_loss": state.losses[-1] if state.losses else None,
                     "platform": training_platform(), **config},
    }
    onnx_path = out / f"{MODEL_NAME}.onnx"
    meta = common.export_model(net, onnx_path, meta, pp.stacks[:4])
    oof_path = out / OOF_CSV
    report: dict[str, Any] | None = None
    if args.folds > 1:
        oof = np.zeros((len(pp.ids), 3), np.float32)
        for f in range(folds):
            test = np.flatnonzero(pp.folds == f)
            train = np.flatnonzero(pp.folds != f)
            if test.size == 0 or train.size == 0:
                continue
            fnet, _ = _train(pp, train, epochs=args.epochs, batch_size=args.batch_size,
                             seed=args.seed + 1 + f, out=out / f"fold{f}", resume=args.resume,
                             progress=not args.no_progress, config={**config, "fold": f})
            oof[test] = common.predict_proba(fnet, pp.stacks[test])
        with oof_path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["pseudo_patient_id", "label", "control", "type1", "type2", "fold"])
            for i, pid in enumerate(pp.ids):
                w.writerow([pid, pp.labels[i], *(f"{v:.6f}" for v in oof[i]),
                            int(pp.folds[i])])
        if site:
            report = site_report(pp, oof, out)
    (out / "card.md").write_text(card(meta, report))
    if args.install:
        for p in (onnx_path, onnx_path.with_suffix(".json"), oof_path):
            if p.is_file():
                shutil.copy2(p, MODELS_DIR / p.name)
    print(json.dumps({"model": str(onnx_path), "version": meta["version"],
                      "pseudo_patients": counts, "epochs": state.epoch,
                      "losses": state.losses,
                      "oof_csv": str(oof_path) if oof_path.is_file() else None}, indent=2))
    return 0
