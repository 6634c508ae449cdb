"""Train the clinical-feature (CF) DNN on the iCTCF cohort and export it to ONNX.

Usage: ``hust19 train cf --ictcf DIR [--out DIR] [--epochs N] [--target-sn 0.95]``.

The network is the paper's CF model: the normalised clinical features, five dense hidden layers
with ReLU and dropout, three outputs (control, type1, type2). It is trained in PyTorch on the
CPU and exported to ONNX with a dynamic batch dimension and the softmax inside the graph.

Protocol (documented in ``docs/models/cf.md``): a stratified 10-fold pass over all scored
patients gives out-of-fold class probabilities; from them the sensitive threshold (the COVID
probability, type1 + type2, that reaches ``--target-sn`` sensitivity for COVID-19 vs control)
is chosen, and they are written to ``cf_scores_oof.csv`` for training the fusion. The shipped
network is then fitted on all scored patients. Suspected patients are never used for training.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines import ictcf
from engines.cf import CLASSES, MODELS_DIR, feature_order, vectorise_many
from engines.metrics import binary_measures, multiclass_report, threshold_for_sensitivity
from engines.training.provenance import training_platform
from schemas.errors import EngineError, InputError
from schemas.features import CATALOGUE_VERSION

log = logging.getLogger(__name__)

DEFAULT_TARGET_SN: Final = 0.95
DEFAULT_FOLDS: Final = 10
ONNX_OPSET: Final = 17
INPUT_NAME: Final = "features"
OUTPUT_NAME: Final = "proba"
OOF_FILE: Final = "cf_scores_oof.csv"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one CF network fit (recorded in ``cf.json``)."""

    hidden: tuple[int, ...] = (256, 128, 64, 32, 16)
    dropout: float = 0.5
    # The network's first operation bounds each input to [-clip, clip]: a few results lie
    # hundreds of ranges outside normal (data-entry slips such as PLCT 46.10 %), and unbounded
    # inputs that large dominate a small dense network. The CF normalisation itself is exactly
    # the paper's; this is part of the network. Chosen with the other values below by 5-fold
    # OOF AUC on the iCTCF data (docs/models/cf.md).
    clip: float = 2.0
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    class_weighted: bool = True
    seed: int = 0


@dataclass
class Dataset:
    """Vectors, class indices and patient ids of the scored patients."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str] = field(default_factory=list)


def scored_dataset(cohort: ictcf.Cohort) -> Dataset:
    """The scored (control/type1/type2) patients of a cohort as network inputs."""
    pts = cohort.scored
    return Dataset(vectorise_many([p.values for p in pts]),
                   np.array([p.class_index for p in pts], dtype=np.int64),
                   [p.patient_id for p in pts])


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # the 'train' extra
        raise EngineError("training needs PyTorch (install the 'train' extra)") from exc
    return torch


def build_network(n_inputs: int, config: TrainConfig) -> Any:
    """The CF DNN: clamp, five dense hidden layers with ReLU and dropout, three logits."""
    torch = _torch()
    nn = torch.nn

    class CfNet(nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            layers: list[Any] = []
            width = n_inputs
            for h in config.hidden:
                layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
                width = h
            layers.append(nn.Linear(width, len(CLASSES)))
            self.body = nn.Sequential(*layers)
            self.clip = float(config.clip)

        def forward(self, x: Any) -> Any:
            return self.body(torch.clamp(x, -self.clip, self.clip))

    return CfNet()


def fit(x: np.ndarray, y: np.ndarray, config: TrainConfig,
        on_epoch: Callable[[int, float], None] | None = None) -> Any:
    """Fit one network (Adam, cross-entropy, class-weighted by inverse frequency when
    configured); deterministic for a given ``config.seed``. Returns the torch module in eval
    mode."""
    torch = _torch()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = build_network(x.shape[1], config)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    weight = None
    if config.class_weighted:
        counts = np.bincount(y, minlength=len(CLASSES)).astype(np.float64)
        w = counts.sum() / (len(CLASSES) * np.maximum(counts, 1.0))
        weight = torch.tensor(w, dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = xt.shape[0]
    for epoch in range(config.epochs):
        net.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            opt.zero_grad()
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / n)
    net.eval()
    return net


def predict_torch(net: Any, x: np.ndarray) -> np.ndarray:
    """Softmax probabilities of a fitted torch network, ``(n, 3)``."""
    torch = _torch()
    with torch.no_grad():
        logits = net(torch.from_numpy(np.asarray(x, dtype=np.float32)))
        return np.asarray(torch.softmax(logits, dim=1).numpy(), dtype=np.float32)


def export_onnx(net: Any, n_inputs: int, path: Path) -> None:
    """Export with the softmax in the graph and a dynamic batch dimension; checked with
    ``onnx.checker``."""
    torch = _torch()
    import onnx

    class WithSoftmax(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return torch.softmax(self.inner(x), dim=1)

    wrapped = WithSoftmax(net).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros((2, n_inputs), dtype=torch.float32)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still exact here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapped, (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))


def covid_score(proba: np.ndarray) -> np.ndarray:
    """P(COVID-19) = P(type1) + P(type2)."""
    p = np.asarray(proba)
    return np.asarray(p[:, 1] + p[:, 2])


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of a stratified k-fold split."""
    from sklearn.model_selection import StratifiedKFold

    if np.bincount(y).min() < folds:
        raise InputError(f"a class has fewer than {folds} patients: cannot make {folds} folds")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in skf.split(np.zeros(len(y)), y)]


def out_of_fold(data: Dataset, config: TrainConfig, folds: int, seed: int,
                progress: Callable[[], None] | None = None) -> np.ndarray:
    """Out-of-fold probabilities ``(n, 3)`` of one stratified k-fold pass."""
    oof = np.zeros((len(data.y), len(CLASSES)), dtype=np.float32)
    for k, (tr, te) in enumerate(stratified_folds(data.y, folds, seed)):
        cfg = TrainConfig(**{**asdict(config), "seed": config.seed + k})
        net = fit(data.x[tr], data.y[tr], cfg)
        oof[te] = predict_torch(net, data.x[te])
        if progress is not None:
            progress()
    return oof


def write_scores(path: Path, ids: Sequence[str], labels: Sequence[str],
                 proba: np.ndarray) -> None:
    """``patient_id,label,control,type1,type2`` CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "label", *CLASSES])
        for pid, lab, p in zip(ids, labels, proba, strict=True):
            w.writerow([pid, lab, *(f"{v:.6f}" for v in p)])


def summary_of(y: np.ndarray, proba: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per-class one-vs-rest and COVID-vs-control measures (COVID at ``threshold``)."""
    rep = multiclass_report(y, proba, CLASSES)
    covid = binary_measures(y > 0, covid_score(proba), threshold)
    return {"auc": {**{c: rep["per_class"][c]["auc"] for c in CLASSES},
                    "covid_vs_control": covid["auc"]},
            "accuracy_argmax": rep["accuracy"], "confusion_argmax": rep["confusion"],
            "covid_vs_control_at_sensitive_threshold": covid}


def train(ictcf_dir: Path, out_dir: Path, config: TrainConfig, *, folds: int = DEFAULT_FOLDS,
          target_sn: float = DEFAULT_TARGET_SN, show_progress: bool = True,
          limit: int | None = None) -> dict[str, Any]:
    """Run the whole protocol (see the module docstring); writes ``cf.onnx``, ``cf.json``
    and ``cf_scores_oof.csv`` into ``out_dir`` and returns the JSON metadata. ``limit``
    keeps a stratified subset of that many patients (for quick runs and tests)."""
    from tqdm import tqdm

    started = time.monotonic()
    cohort = ictcf.load_cohort(ictcf_dir)
    data = scored_dataset(cohort)
    if limit is not None and limit < len(data.y):
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(np.arange(len(data.y)), train_size=limit,
                                   stratify=data.y, random_state=config.seed)
        keep = np.sort(keep)
        data = Dataset(data.x[keep], data.y[keep], [data.ids[i] for i in keep])
    bar = tqdm(total=folds + config.epochs, desc="train cf", unit="step",
               disable=not show_progress)
    oof = out_of_fold(data, config, folds, config.seed, progress=lambda: bar.update(1))
    covid = covid_score(oof)
    sensitive = threshold_for_sensitivity(data.y > 0, covid, target_sn)
    oof_summary = summary_of(data.y, oof, sensitive)
    write_scores(out_dir / OOF_FILE, data.ids, [CLASSES[i] for i in data.y], oof)

    def on_epoch(_epoch: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    net = fit(data.x, data.y, config, on_epoch=on_epoch)
    bar.close()
    onnx_path = out_dir / "cf.onnx"
    export_onnx(net, data.x.shape[1], onnx_path)
    counts = {c: int(np.sum(data.y == i)) for i, c in enumerate(CLASSES)}
    meta: dict[str, Any] = {
        "model": "cf",
        "version": f"cf-{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}",
        "classes": list(CLASSES),
        "input": INPUT_NAME, "output": OUTPUT_NAME,
        "feature_order": feature_order(),
        "catalogue_version": CATALOGUE_VERSION,
        "normalisation": "F=(f-Min)/(Max-Min) over the printed (else catalogue) normal range; "
                         "missing 0.5; gender, Udis 0/1; censored values take the bound",
        "thresholds": {
            "general": "argmax",
            "sensitive": {"covid_probability": sensitive, "target_sensitivity": target_sn,
                          "chosen_on": f"out-of-fold predictions of a stratified {folds}-fold "
                                       "pass over the training patients"},
        },
        "training": {
            "data": "iCTCF (../shared/data/ictcf): scored patients (control, type1, type2); "
                    "suspected excluded",
            "patients": len(data.y), "class_counts": counts,
            "patient_ids": [str(i) for i in data.ids],
            "config": {**asdict(config), "hidden": list(config.hidden)},
            "framework": "PyTorch (CPU), exported to ONNX opset "
                         f"{ONNX_OPSET} with softmax in the graph",
            "out_of_fold": oof_summary,
            "seconds": round(time.monotonic() - started, 1),
            "platform": training_platform(),
        },
    }
    (out_dir / "cf.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    log.info("CF model written to %s (OOF COVID-vs-control AUC %.3f, sensitive cut %.4f)",
             onnx_path, oof_summary["auc"]["covid_vs_control"] or float("nan"), sensitive)
    return meta


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 train cf``."""
    parser.add_argument("--ictcf", type=Path, required=True,
                        help="folder with the iCTCF patients.csv and lab_results.csv")
    parser.add_argument("--out", type=Path, default=MODELS_DIR,
                        help="where cf.onnx, cf.json and cf_scores_oof.csv go "
                             "(default: the package's models folder)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                        help="folds of the out-of-fold pass that sets the sensitive threshold")
    parser.add_argument("--target-sn", type=float, default=DEFAULT_TARGET_SN,
                        help="COVID-19 sensitivity the sensitive threshold must reach")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--limit", type=int, default=None,
                        help="train on a stratified subset of N patients (quick runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hust19 train cf``; prints the JSON metadata. Exit 2 on bad input."""
    import sys

    _torch().set_num_threads(1)  # a tiny network: one thread is as fast and shares the box
    try:
        config = TrainConfig(epochs=args.epochs, seed=args.seed)
        meta = train(args.ictcf, args.out, config, folds=args.folds, target_sn=args.target_sn,
                     show_progress=not args.no_progress, limit=args.limit)
    except InputError as exc:
        print(f"hust19 train cf: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps({"written": str(args.out / "cf.onnx"), "version": meta["version"],
                      "thresholds": meta["thresholds"],
                      "out_of_fold": meta["training"]["out_of_fold"]["auc"]}, indent=1))
    return 0
