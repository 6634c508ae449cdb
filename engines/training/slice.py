"""Train the slice CNN (NiCT / pCT / nCT) on the public slices and the labelled DICOM series.

Data and labels (the model card ``docs/models/slice.md`` states the same):

- UCSD COVID-CT official *train* split (``covid-ct/splits/train.csv``), only with
  ``--public train``: COVID -> pCT, NonCOVID -> nCT. The official *val* split is never used
  here (evaluation only). The default is ``--public none``: the lung extraction fails on most
  of these figures (cut from papers, not PACS slices), and adding their crops lowered the
  held-out series score (``docs/models/slice.md``, "Why the figures were dropped").
- Chest CT series given by ``--series`` (default P002 and normal001; cap002 is held out):
  slice-level radiologist infection label 1 -> pCT, 0 -> nCT; normal001 (no slice labels, a
  normal subject) -> nCT.
- NiCT is a *derived* label: any slice whose lung extraction is not informative
  (``engines.lung.is_informative`` false: too little lung parenchyma) is NiCT, except a series
  slice the radiologists marked infected (their mark wins).

Pre-processing is the runtime's, byte for byte: PNG -> ``preprocess.load_image_u8`` / DICOM ->
``preprocess.dataset_to_u8`` (HU, lung window) -> ``lung.extract`` -> 200x200 crop -> /255. The
crops are cached in ``OUT/cache-<hash>.npz``; the hash covers the source of ``preprocess.py`` and
``lung.py`` so that a change of pre-processing can never reuse stale crops.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import inspect
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from engines import lung, preprocess
from engines.training.provenance import training_platform
from engines.training.series_data import LabelledSeries, site_series
from schemas.errors import InputError

if TYPE_CHECKING:
    from engines.networks import Hust19Cnn
    from engines.training.common import TrainState

log = logging.getLogger(__name__)

DEFAULT_DATA: Final = Path("../shared/data")
DEFAULT_OUT: Final = Path("runs/slice")
DEFAULT_EPOCHS: Final = 40
DEFAULT_BATCH_SIZE: Final = 16
DEFAULT_TRAIN_SERIES: Final = ("P002", "normal001")
PUBLIC_NONE: Final = "none"
PUBLIC_TRAIN: Final = "train"
PUBLIC_CHOICES: Final = (PUBLIC_NONE, PUBLIC_TRAIN)
MODELS_DIR: Final = Path(__file__).resolve().parents[1] / "models"
MODEL_NAME: Final = "slice"
LABEL_PCT: Final = "pCT"
LABEL_NCT: Final = "nCT"
LABEL_NICT: Final = "NiCT"
CLASS_INDEX: Final = {"NiCT": 0, "pCT": 1, "nCT": 2}
PUBLIC_LABELS: Final = {"COVID": LABEL_PCT, "NonCOVID": LABEL_NCT}
INFECTED: Final = "1"


@dataclass(frozen=True)
class SliceSource:
    """One training slice before pre-processing: where it is and the label its source gives."""

    key: str  # unique id: "covid-ct/<path>" or "<series>/<file>"
    path: Path
    kind: str  # "png" or "dicom"
    source_label: str  # pCT or nCT (before the derived NiCT rule)
    radiologist_marked: bool  # a series slice with infection 1
    group: str  # what must stay together in CV folds (paper prefix / series)


def public_sources(data: Path, split: str = "train") -> list[SliceSource]:
    """The UCSD COVID-CT slices of an official split (``train`` or ``val``)."""
    root = data / "covid-ct"
    csv_path = root / "splits" / f"{split}.csv"
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: not found (is --data the shared data folder?)")
    out = []
    with csv_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            label = PUBLIC_LABELS.get(row["label"])
            if label is None:
                raise InputError(f"{csv_path}: unknown label {row['label']!r}")
            # file names look like "<paper>-p<page>-<n>.png": the paper is the group
            group = row["filename"].split("-p")[0] if "-p" in row["filename"] else row["filename"]
            out.append(SliceSource(f"covid-ct/{row['path']}", root / row["path"], "png", label,
                                   False, f"covid-ct:{group}"))
    return out


def series_sources(data: Path, series: str) -> list[SliceSource]:
    """The slices of one chest CT series with their infection labels (nCT for normal)."""
    root = data / "chest-ct-series"
    table = root / f"{series}-slices.csv"
    if not table.is_file():
        raise InputError(f"{table}: not found (unknown series {series!r})")
    out = []
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            marked = row.get("infection", "") == INFECTED
            out.append(SliceSource(f"{series}/{row['file']}", root / series / row["file"],
                                   "dicom", LABEL_PCT if marked else LABEL_NCT, marked,
                                   f"series:{series}"))
    return out


def site_sources(items: list[LabelledSeries]) -> list[SliceSource]:
    """The labelled slices of a site's series (:mod:`engines.training.series_data`): a slice a
    reader marked infected -> pCT, else nCT; a normal series (no slice labels) -> nCT; a
    pneumonia series without slice labels gives no slice."""
    out = []
    for item in items:
        files = sorted(p for p in item.folder.iterdir() if p.is_file())
        for path in files:
            if item.slice_labels is not None:
                if path.name not in item.slice_labels:
                    continue
                marked = item.slice_labels[path.name] == 1
            elif item.pneumonia:
                continue
            else:
                marked = False
            out.append(SliceSource(f"{item.name}/{path.name}", path, "dicom",
                                   LABEL_PCT if marked else LABEL_NCT, marked,
                                   f"series:{item.name}"))
    return out


def holdout_report(net: Hust19Cnn, images: SliceSet, out: Path,
                   held_out: list[str]) -> dict[str, Any]:
    """Score the held-out series' slices and write ``holdout-report.json``, ROC and confusion
    PNGs (pCT vs rest, per held-out series and pooled)."""
    from engines.metrics import binary_measures, multiclass_report, plot_confusion, plot_roc
    from engines.training import common

    proba = common.predict_proba(net, images.crops[:, None])
    pct = proba[:, CLASS_INDEX[LABEL_PCT]]
    y = images.labels == CLASS_INDEX[LABEL_PCT]
    curves = {}
    per_series: dict[str, Any] = {}
    for name in held_out:
        mask = images.groups == f"series:{name}"
        per_series[name] = binary_measures(y[mask], pct[mask])
        curves[f"{name} pCT vs rest"] = (y[mask], pct[mask])
    rep = multiclass_report(images.labels, proba, list(CLASS_INDEX))
    report = {"held_out": held_out, "slices": len(y), "pct_vs_rest": per_series,
              "three_class": rep}
    plot_roc(curves, out / "holdout-roc.png", "Slice CNN on held-out series: pCT vs rest")
    plot_confusion(rep["confusion"], list(CLASS_INDEX), out / "holdout-confusion.png",
                   "Slice CNN on held-out series (arg-max)")
    (out / "holdout-report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def preprocessing_hash() -> str:
    """Short hash of the pre-processing source code (cache key, recorded in the metadata)."""
    h = hashlib.sha256()
    for module in (preprocess, lung):
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:12]


@dataclass
class SliceSet:
    """Pre-processed slices: crops uint8 (N, 200, 200) and their labels."""

    keys: np.ndarray  # str
    groups: np.ndarray  # str
    crops: np.ndarray  # uint8 (N, 200, 200)
    labels: np.ndarray  # int class index (NiCT 0, pCT 1, nCT 2)
    informative: np.ndarray  # bool
    area_fraction: np.ndarray  # float32

    def subset(self, idx: np.ndarray) -> SliceSet:
        return SliceSet(self.keys[idx], self.groups[idx], self.crops[idx], self.labels[idx],
                        self.informative[idx], self.area_fraction[idx])

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for name, i in CLASS_INDEX.items()}


def load_u8(src: SliceSource) -> np.ndarray:
    """The runtime's grey image for a source (PNG reader or DICOM + lung window)."""
    if src.kind == "png":
        return preprocess.load_image_u8(src.path)
    import pydicom

    try:
        ds = pydicom.dcmread(src.path)
    except Exception as exc:  # pydicom raises InvalidDicomError, OSError, ...
        raise InputError(f"{src.path}: cannot read DICOM: {exc}") from exc
    return preprocess.dataset_to_u8(ds)


def derive_label(src: SliceSource, informative: bool) -> int:
    """The training class: the derived NiCT rule over the source label (see module doc)."""
    if not informative and not src.radiologist_marked:
        return CLASS_INDEX[LABEL_NICT]
    return CLASS_INDEX[src.source_label]


def preprocess_sources(sources: list[SliceSource], cache: Path | None = None,
                       progress: bool = True) -> SliceSet:
    """Run the runtime pre-processing on every source (cached in ``cache`` when given)."""
    from tqdm import tqdm

    keys = np.array([s.key for s in sources])
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as d:
            if d["keys"].shape == keys.shape and bool(np.all(d["keys"] == keys)):
                log.info("using cached pre-processed slices %s", cache)
                return SliceSet(d["keys"], d["groups"], d["crops"], d["labels"],
                                d["informative"], d["area_fraction"])
    crops = np.zeros((len(sources), 200, 200), np.uint8)
    labels = np.zeros(len(sources), np.int64)
    informative = np.zeros(len(sources), bool)
    area = np.zeros(len(sources), np.float32)
    for i, src in enumerate(tqdm(sources, desc="lung extraction", unit="slice",
                                 disable=not progress)):
        ext = lung.extract(load_u8(src))
        crops[i] = ext.crop
        informative[i] = bool(lung.is_informative(ext))
        area[i] = float(ext.area_fraction)
        labels[i] = derive_label(src, informative[i])
    out = SliceSet(keys, np.array([s.group for s in sources]), crops, labels, informative, area)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, keys=out.keys, groups=out.groups, crops=out.crops,
                            labels=out.labels, informative=out.informative,
                            area_fraction=out.area_fraction)
    return out


#: :func:`input_fingerprint` tolerances: how far a slice's lung-area fraction and mean crop grey
#: level may move (a library's rounding, not a changed method) before the inputs count as changed.
FINGERPRINT_TOLERANCES: Final = {"area_fraction": 0.002, "crop_mean": 0.5}
_FINGERPRINT_DECIMALS: Final = 4


def _per_slice(images: SliceSet) -> dict[str, list[float]]:
    """The per-slice numbers of a fingerprint, rounded as recorded."""
    means = images.crops.reshape(len(images.crops), -1).mean(axis=1)
    return {name: [round(float(v), _FINGERPRINT_DECIMALS) for v in values]
            for name, values in (("area_fraction", images.area_fraction), ("crop_mean", means))}


def _crops_sha256(images: SliceSet) -> str:
    return hashlib.sha256(np.ascontiguousarray(images.crops, dtype=np.uint8).tobytes()).hexdigest()


def input_fingerprint(images: SliceSet) -> dict[str, object]:
    """What the network was trained on, compactly: the SHA-256 of the crops and, per slice,
    the lung-area fraction and the mean grey level of the crop (recorded in the metadata).

    :func:`fingerprint_problems` recomputes it from the same sources, so a change of
    pre-processing behaviour (windowing, extraction, decoding) after a model was trained is
    noticed even where the source hash of :func:`preprocessing_hash` is unchanged (a library
    update) or changed without effect (a refactor).
    """
    return {"crops_sha256": _crops_sha256(images), "n": len(images.crops), **_per_slice(images)}


def fingerprint_problems(recorded: dict[str, object], images: SliceSet) -> list[str]:
    """How pre-processed slices differ from a recorded :func:`input_fingerprint` (empty: the
    same inputs, byte for byte or within the tolerances)."""
    if _crops_sha256(images) == recorded.get("crops_sha256"):
        return []
    if len(images.crops) != recorded.get("n"):
        return [f"{len(images.crops)} slices now, {recorded.get('n')} when recorded"]
    problems = []
    for name, now in _per_slice(images).items():
        tolerance = FINGERPRINT_TOLERANCES[name]
        was = np.asarray(recorded.get(name, []), dtype=np.float64)
        diff = np.abs(np.asarray(now) - was)
        moved = np.flatnonzero(diff > tolerance)
        if moved.size:
            worst = int(np.argmax(diff))
            problems.append(f"{name} moved by more than {tolerance} on {moved.size} of "
                            f"{len(diff)} slices (most on {images.keys[worst]}: "
                            f"{was[worst]} -> {now[worst]})")
    return problems


def training_sources(data: Path, series: tuple[str, ...], limit: int = 0,
                     public: str = PUBLIC_NONE) -> list[SliceSource]:
    """The given series (+ the public train split with ``public="train"``); ``limit`` > 0 keeps
    that many per source/label (tiny test runs)."""
    if public not in PUBLIC_CHOICES:
        raise InputError(f"public slices: {public!r} is not one of {', '.join(PUBLIC_CHOICES)}")
    sources = public_sources(data, "train") if public == PUBLIC_TRAIN else []
    for name in series:
        sources += series_sources(data, name)
    if not sources:
        raise InputError("no training slices: name a series (--series) or --public train")
    if limit > 0:
        kept: list[SliceSource] = []
        seen: dict[tuple[str, str], int] = {}
        for s in sources:
            k = (s.group.split(":")[0] + s.kind, s.source_label)
            if seen.get(k, 0) < limit:
                kept.append(s)
                seen[k] = seen.get(k, 0) + 1
        sources = kept
    return sources


def train_slice_net(images: SliceSet, *, epochs: int, batch_size: int, seed: int,
                    out: Path | None, resume: bool, progress: bool = True,
                    config: dict[str, object] | None = None) -> tuple[Hust19Cnn, TrainState]:
    """Build and train a slice CNN on ``images``; returns (net, TrainState)."""
    import torch

    from engines import networks
    from engines.training import common

    common.seed_everything(seed)
    net = networks.slice_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=networks.SLICE_LR)
    state = common.load_checkpoint(out, net, opt) if (out is not None and resume) else None
    if state is not None:
        log.info("resuming from %s at epoch %d", out, state.epoch)
    else:
        state = common.TrainState(config=dict(config or {}))
    state = common.train_epochs(net, opt, images.crops[:, None], images.labels, epochs=epochs,
                                batch_size=batch_size, seed=seed, out=out, state=state,
                                progress=progress)
    return net, state


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 train slice``."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    parser.add_argument("--series-dir", type=Path,
                        help="a site's folder of series folders (docs/models/retraining.md)")
    parser.add_argument("--labels", type=Path, help="the site's labels CSV: series,pneumonia")
    parser.add_argument("--slice-labels", type=Path,
                        help="the site's slice labels CSV: series,file,infection")
    parser.add_argument("--holdout", nargs="*", default=[], metavar="SERIES",
                        help="site series kept out of training and scored afterwards "
                             "(holdout-report.json, holdout-roc.png)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="work dir: checkpoints, cache, exported model")
    parser.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=19)
    add_data_flags(parser)
    parser.add_argument("--limit", type=int, default=0,
                        help="keep at most N slices per source and label (quick tests)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--install", action="store_true",
                        help="copy the exported model into the package (engines/models)")
    parser.add_argument("--no-progress", action="store_true")


def sources_text(public: str, series: list[str]) -> str:
    """What trained the model, in words, for the metadata."""
    parts = ["covid-ct train split"] if public == PUBLIC_TRAIN else []
    if series:
        parts.append("series " + ",".join(series))
    return " + ".join(parts)


def add_data_flags(parser: argparse.ArgumentParser, public: str = PUBLIC_NONE) -> None:
    """``--series`` and ``--public``: which labelled slices train the network."""
    parser.add_argument("--series", nargs="*", default=list(DEFAULT_TRAIN_SERIES),
                        help="chest CT series used for training (default P002 normal001)")
    parser.add_argument("--public", choices=PUBLIC_CHOICES, default=public,
                        help=f"UCSD COVID-CT slices to add: none or the official train split "
                             f"(default {public})")


def main(args: argparse.Namespace) -> int:
    """Pre-process, train (resumable), export ONNX + metadata to OUT (and the package)."""
    import torch

    from engines import networks
    from engines.training import common

    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    held: list[SliceSource] = []
    if args.series_dir is not None or args.labels is not None:
        if args.series_dir is None or args.labels is None:
            raise InputError("--series-dir and --labels go together")
        items = site_series(args.series_dir, args.labels, args.slice_labels)
        unknown = set(args.holdout) - {i.name for i in items}
        if unknown:
            raise InputError(f"--holdout names series not in {args.labels}: "
                             f"{', '.join(sorted(unknown))}")
        sources = site_sources([i for i in items if i.name not in args.holdout])
        held = site_sources([i for i in items if i.name in args.holdout])
        args.series = [i.name for i in items if i.name not in args.holdout]
        args.public = PUBLIC_NONE
        if not sources:
            raise InputError(f"{args.labels}: no labelled slice to train on")
    else:
        sources = training_sources(args.data, tuple(args.series), args.limit, args.public)
    cache = out / f"cache-{preprocessing_hash()}-{len(sources)}.npz"
    images = preprocess_sources(sources, cache, progress=not args.no_progress)
    config = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
              "series": list(args.series), "public": args.public, "limit": args.limit,
              "lr": networks.SLICE_LR}
    net, state = train_slice_net(images, epochs=args.epochs, batch_size=args.batch_size,
                                 seed=args.seed, out=out, resume=args.resume,
                                 progress=not args.no_progress, config=config)
    meta = {
        "name": MODEL_NAME,
        "version": f"slice-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}",
        "classes": list(networks.SLICE_CLASSES),
        "thresholds": {"nict_max": 0.5, "pct": 0.5},
        "preprocessing": {"hash": preprocessing_hash(),
                          "steps": "DICOM: HU -> lung window C-600/W1200 -> uint8; PNG: grey "
                                   "uint8; then engines.lung.extract -> 200x200 crop -> /255",
                          "training_inputs": input_fingerprint(images)},
        "training": {"sources": sources_text(args.public, args.series),
                     "n": len(images.labels), "class_counts": images.counts(),
                     "epochs": state.epoch, "final_loss": state.losses[-1] if state.losses
                     else None, "final_train_accuracy": state.accuracies[-1]
                     if state.accuracies else None, "platform": training_platform(),
                     **config},
    }
    onnx_path = out / f"{MODEL_NAME}.onnx"
    check = images.crops[:8, None]
    meta = common.export_model(net, onnx_path, meta, check)
    report = None
    if held:
        held_images = preprocess_sources(held, out / f"cache-{preprocessing_hash()}-held-"
                                         f"{len(held)}.npz", progress=not args.no_progress)
        report = holdout_report(net, held_images, out, list(args.holdout))
    (out / "card.md").write_text(card(meta, report))
    if args.install:
        for p in (onnx_path, onnx_path.with_suffix(".json")):
            shutil.copy2(p, MODELS_DIR / p.name)
    print(json.dumps({"model": str(onnx_path), "version": meta["version"],
                      "class_counts": images.counts(), "epochs": state.epoch,
                      "losses": state.losses,
                      "held_out_pct_auc": None if report is None else {
                          k: v["auc"] for k, v in report["pct_vs_rest"].items()}},
                     indent=2))
    return 0


def card(meta: dict[str, Any], report: dict[str, Any] | None) -> str:
    """A model card in Markdown from the metadata and the held-out report."""
    t = meta["training"]
    lines = [f"# Slice CNN {meta['version']}", "",
             f"Trained on {t['sources']}: {t['n']} slices, classes {t['class_counts']} (NiCT is "
             "derived from the lung extraction, pCT/nCT from the readers' slice labels).",
             f"{t['epochs']} epochs, batch {t['batch_size']}, seed {t['seed']}, final training "
             f"loss {t['final_loss']}.", ""]
    if report is None:
        lines.append("No series was held out: there is no validation figure. Hold series out "
                     "with --holdout to get one.")
    else:
        lines += ["## Held-out series (never trained on)", "",
                  "| series | pCT AUC | Sn | Sp | slices |", "|---|---|---|---|---|"]
        for name, m in report["pct_vs_rest"].items():
            auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
            sn = "n/a" if m["sn"] is None else f"{m['sn']:.3f}"
            sp = "n/a" if m["sp"] is None else f"{m['sp']:.3f}"
            lines.append(f"| {name} | {auc} | {sn} | {sp} | {m['n']} |")
        lines += ["", "Plots: holdout-roc.png, holdout-confusion.png."]
    return "\n".join(lines) + "\n"
