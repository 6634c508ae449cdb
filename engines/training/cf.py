"""Train the clinical-feature (CF) model on the iCTCF cohort and export it to ONNX.

Usage: ``hust19 train cf --ictcf DIR [--out DIR] [--folds 10] [--epochs N] [--target-sn 0.95]``.

Each network is the paper's CF model: the normalised clinical features, five dense hidden
layers with ReLU and dropout, three outputs (control, type1, type2), trained in PyTorch on the
CPU.

Protocol (documented in ``docs/models/cf.md``), one stratified K-fold cross-fitting over all
scored patients (suspected patients are never used):

1. one network (a *member*) per fold, fitted on the other K - 1 folds: every patient is
   held out of exactly one member, whose scores on it are its out-of-fold scores;
2. calibration (:func:`calibration_for`): the networks are fitted with the cross-entropy
   weighted by inverse class frequency, so their scores are posteriors for equal class
   frequencies; the class-prior correction to the training cohort's frequencies undoes that
   weighting (no fitted parameter). Stored in ``cf.json`` and applied at run time by
   ``CfModel``. (A temperature fitted on the out-of-fold scores, :func:`fit_temperature`, was
   measured and made the ensemble worse: ``hust19 evaluate cv cf`` reports it beside.)
3. the sensitive threshold: the calibrated COVID probability (type1 + type2) that reaches
   ``--target-sn`` sensitivity for COVID-19 vs control on the out-of-fold scores;
4. the shipped model is the ensemble of the K members (mean of their probabilities), exported
   as one ONNX graph with a dynamic batch dimension, the softmax inside, and two outputs:
   ``proba`` (n, 3), the ensemble mean, and ``members`` (n, K, 3). ``cf.json`` records which
   member held out which patient (``training.held_out_by``), so the shipped weights can be
   checked on patients they were not fitted on (the quality gate in the tests,
   ``hust19 evaluate cf``).

The calibrated out-of-fold scores go to ``cf_scores_oof.csv`` beside the model.
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
from engines.cf import (
    CLASSES,
    MEMBERS_OUTPUT,
    MODELS_DIR,
    PROBA_FLOOR,
    PROBA_OUTPUT,
    UNIFORM_PRIOR,
    Calibration,
    apply_temperature,
    feature_order,
    vectorise_many,
)
from engines.metrics import binary_measures, multiclass_report, threshold_for_sensitivity
from engines.training.provenance import training_platform
from schemas.errors import EngineError, InputError
from schemas.features import CATALOGUE_VERSION

log = logging.getLogger(__name__)

DEFAULT_TARGET_SN: Final = 0.95
#: Folds of the cross-fitting, hence members of the shipped ensemble.
DEFAULT_FOLDS: Final = 10
ONNX_OPSET: Final = 17
INPUT_NAME: Final = "features"
OUTPUT_NAME: Final = PROBA_OUTPUT
OOF_FILE: Final = "cf_scores_oof.csv"
#: Equal-width probability bins of the expected calibration error and reliability diagram.
ECE_BINS: Final = 10
#: Search interval of a fitted temperature (a bounded 1-D minimisation of the log-loss).
TEMPERATURE_BOUNDS: Final = (0.05, 20.0)


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
    """Vectors, class indices, patient ids, hospitals and which inputs were measured (a
    boolean ``(n, d)`` array: a missing input is 0.5 in ``x``, indistinguishable there from
    a measured value at the middle of its range) of the scored patients."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str] = field(default_factory=list)
    hospitals: list[str] = field(default_factory=list)
    measured: np.ndarray | None = None

    def subset(self, rows: np.ndarray) -> Dataset:
        """The patients at ``rows`` (indices), in that order."""
        return Dataset(self.x[rows], self.y[rows], [self.ids[i] for i in rows],
                       [self.hospitals[i] for i in rows] if self.hospitals else [],
                       None if self.measured is None else self.measured[rows])


def scored_dataset(cohort: ictcf.Cohort) -> Dataset:
    """The scored (control/type1/type2) patients of a cohort as network inputs."""
    pts = cohort.scored
    codes = feature_order()
    measured = np.array([[c in p.values and p.values[c].value is not None for c in codes]
                         for p in pts], dtype=bool).reshape(len(pts), len(codes))
    return Dataset(vectorise_many([p.values for p in pts]),
                   np.array([p.class_index for p in pts], dtype=np.int64),
                   [p.patient_id for p in pts], [p.hospital for p in pts], measured)


def stratified_subset(data: Dataset, limit: int | None, seed: int) -> Dataset:
    """A stratified subset of ``limit`` patients in their original order (quick runs and
    tests); the whole dataset when ``limit`` is ``None`` or not smaller."""
    if limit is None or limit >= len(data.y):
        return data
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(data.y)), train_size=limit, stratify=data.y,
                               random_state=seed)
    return data.subset(np.sort(keep))


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


def export_onnx(nets: Sequence[Any], n_inputs: int, path: Path) -> None:
    """Export the ensemble of ``nets`` as one graph with the softmax inside and a dynamic
    batch dimension: outputs ``proba`` (n, 3), the mean of the members' probabilities, and
    ``members`` (n, K, 3). Checked with ``onnx.checker``."""
    torch = _torch()
    import onnx

    if not nets:
        raise EngineError("no network to export")

    class Ensemble(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, inner: Sequence[Any]) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(inner)

        def forward(self, x: Any) -> tuple[Any, Any]:
            each = [torch.softmax(m(x), dim=1) for m in self.members]
            # the mean from its own stack: a graph output that also fed another node breaks
            # the FP16 conversion (onnxconverter_common casts outputs; engines/fp16.py)
            return torch.stack(each, dim=0).mean(dim=0), torch.stack(each, dim=1)

    wrapped = Ensemble(nets).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros((2, n_inputs), dtype=torch.float32)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still exact here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapped, (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME, MEMBERS_OUTPUT], opset_version=ONNX_OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"},
                                        MEMBERS_OUTPUT: {0: "batch"}},
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


@dataclass
class CrossFit:
    """The members of one K-fold cross-fitting, their out-of-fold probabilities (raw,
    ``(n, 3)``), the member that held out each patient and the calibration."""

    nets: list[Any]
    oof: np.ndarray
    held_out_by: np.ndarray
    calibration: Calibration

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        """The uncalibrated ensemble mean ``(n, 3)``: the exported ``proba`` output."""
        return np.asarray(np.mean([predict_torch(n, x) for n in self.nets], axis=0))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Calibrated ensemble probabilities ``(n, 3)``: what ``CfModel.predict`` returns."""
        return self.calibration.apply(self.predict_raw(x))

    @property
    def oof_calibrated(self) -> np.ndarray:
        return self.calibration.apply(self.oof)


def calibration_for(y: np.ndarray, config: TrainConfig) -> Calibration:
    """The class-prior correction of networks fitted on ``y`` with ``config``: from the
    uniform prior that inverse-frequency class weights fit to the classes' frequencies in
    ``y``; the identity for unweighted training."""
    if not config.class_weighted:
        return Calibration()
    counts = np.bincount(y, minlength=len(CLASSES)).astype(np.float64)
    if counts.min() == 0:
        raise InputError("a class has no patient: cannot calibrate to its frequency")
    return Calibration(prior=tuple(float(c) for c in counts / counts.sum()),
                       trained_prior=UNIFORM_PRIOR)


def cross_fit(data_x: np.ndarray, y: np.ndarray, config: TrainConfig, folds: int,
              progress: Callable[[], None] | None = None,
              on_epoch: Callable[[int, float], None] | None = None) -> CrossFit:
    """One stratified ``folds``-fold cross-fitting (split seed ``config.seed``; member k
    trained with seed ``config.seed + k``) and its calibration. ``progress`` is called after
    each member, ``on_epoch`` after each epoch."""
    oof = np.zeros((len(y), len(CLASSES)), dtype=np.float32)
    held = np.full(len(y), -1, dtype=np.int64)
    nets: list[Any] = []
    for k, (tr, te) in enumerate(stratified_folds(y, folds, config.seed)):
        cfg = TrainConfig(**{**asdict(config), "seed": config.seed + k})
        net = fit(data_x[tr], y[tr], cfg, on_epoch=on_epoch)
        oof[te] = predict_torch(net, data_x[te])
        held[te] = k
        nets.append(net)
        if progress is not None:
            progress()
    return CrossFit(nets, oof, held, calibration_for(y, config))


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.clip(np.asarray(proba, dtype=np.float64)[np.arange(len(y)), y], PROBA_FLOOR, 1.0)
    return float(-np.mean(np.log(p)))


def fit_temperature(y: np.ndarray, proba: np.ndarray) -> float:
    """The temperature T minimising the log-loss of softmax(log p / T) (Guo et al., "On
    calibration of modern neural networks", ICML 2017): one parameter, which cannot change
    the arg-max class. Not part of the shipped recipe: fitted on one member's out-of-fold
    scores it over-softens the ensemble mean (measured, ``docs/models/cf.md``); the CV reports
    it as the alternative."""
    from scipy.optimize import minimize_scalar

    lo, hi = TEMPERATURE_BOUNDS
    res = minimize_scalar(lambda t: log_loss(y, apply_temperature(proba, float(np.exp(t)))),
                          bounds=(np.log(lo), np.log(hi)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def reliability_bins(y_true: np.ndarray, score: np.ndarray,
                     bins: int = ECE_BINS) -> list[dict[str, float | int]]:
    """Per equal-width score bin with patients: ``n``, mean score ``mean_score`` and the
    observed frequency of the positive class ``observed``."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    which = np.minimum((s * bins).astype(np.int64), bins - 1)
    out: list[dict[str, float | int]] = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append({"bin": b, "n": int(m.sum()), "mean_score": float(s[m].mean()),
                        "observed": float(y[m].mean())})
    return out


def expected_calibration_error(y_true: np.ndarray, score: np.ndarray,
                               bins: int = ECE_BINS) -> float | None:
    """ECE (Naeini et al., AAAI 2015): the patient-weighted mean over equal-width score bins
    of |observed frequency - mean score|; ``None`` without patients."""
    rows = reliability_bins(y_true, score, bins)
    n = sum(int(r["n"]) for r in rows)
    if n == 0:
        return None
    return float(sum(int(r["n"]) * abs(float(r["observed"]) - float(r["mean_score"]))
                     for r in rows) / n)


def calibration_measures(y: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """ECE of P(COVID-19) against COVID-19 vs control (the score the sensitive threshold cuts),
    top-label ECE (arg-max confidence against being right) and the log-loss."""
    p = np.asarray(proba, dtype=np.float64)
    return {"ece_covid": expected_calibration_error(y > 0, covid_score(p)),
            "ece_top_label": expected_calibration_error(p.argmax(axis=1) == y, p.max(axis=1)),
            "log_loss": log_loss(y, p)}


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


def auc_by_hospital(data: Dataset, proba: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per hospital: patients and the one-vs-rest / COVID-vs-control AUCs of ``proba``."""
    out: dict[str, dict[str, Any]] = {}
    hospitals = np.array(data.hospitals)
    for h in sorted(set(data.hospitals)):
        m = hospitals == h
        rep = multiclass_report(data.y[m], proba[m], CLASSES)
        out[h] = {"patients": int(m.sum()),
                  "auc": {**{c: rep["per_class"][c]["auc"] for c in CLASSES},
                          "covid_vs_control": binary_measures(
                              data.y[m] > 0, covid_score(proba[m]))["auc"]}}
    return out


def train(ictcf_dir: Path, out_dir: Path, config: TrainConfig, *, folds: int = DEFAULT_FOLDS,
          target_sn: float = DEFAULT_TARGET_SN, show_progress: bool = True,
          limit: int | None = None) -> dict[str, Any]:
    """Run the whole protocol (see the module docstring); writes ``cf.onnx``, ``cf.json``
    and ``cf_scores_oof.csv`` into ``out_dir`` and returns the JSON metadata. ``limit``
    keeps a stratified subset of that many patients (for quick runs and tests)."""
    from tqdm import tqdm

    if folds < 2:
        raise InputError(f"--folds must be at least 2 (one ensemble member per fold), got {folds}")
    started = time.monotonic()
    data = stratified_subset(scored_dataset(ictcf.load_cohort(ictcf_dir)), limit, config.seed)
    bar = tqdm(total=folds * config.epochs, desc=f"train cf ({folds} members)", unit="epoch",
               disable=not show_progress)

    def on_epoch(_epoch: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    crossfit = cross_fit(data.x, data.y, config, folds, on_epoch=on_epoch)
    bar.close()
    oof = crossfit.oof_calibrated
    sensitive = threshold_for_sensitivity(data.y > 0, covid_score(oof), target_sn)
    oof_summary = {**summary_of(data.y, oof, sensitive),
                   "by_hospital": auc_by_hospital(data, oof)}
    write_scores(out_dir / OOF_FILE, data.ids, [CLASSES[i] for i in data.y], oof)
    onnx_path = out_dir / "cf.onnx"
    export_onnx(crossfit.nets, data.x.shape[1], onnx_path)
    counts = {c: int(np.sum(data.y == i)) for i, c in enumerate(CLASSES)}
    oof_text = f"out-of-fold scores of the stratified {folds}-fold cross-fitting"
    meta: dict[str, Any] = {
        "model": "cf",
        "version": f"cf-{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}",
        "classes": list(CLASSES),
        "input": INPUT_NAME, "output": OUTPUT_NAME, "members_output": MEMBERS_OUTPUT,
        "feature_order": feature_order(),
        "catalogue_version": CATALOGUE_VERSION,
        "normalisation": "F=(f-Min)/(Max-Min) over the printed (else catalogue) normal range; "
                         "missing 0.5; gender, Udis 0/1; censored values take the bound",
        "ensemble": {"members": folds,
                     "rule": "mean of the members' class probabilities, then the calibration",
                     "members_from": f"stratified {folds}-fold cross-fitting: member k is "
                                     "fitted on all folds but k (training.held_out_by)"},
        "calibration": {
            "method": "class prior",
            **crossfit.calibration.to_json(),
            "applied_as": "softmax((log p + log(prior / trained_prior)) / temperature) to the "
                          "ensemble mean (CfModel.predict)",
            "why": "the networks are fitted with the cross-entropy weighted by inverse class "
                   "frequency, i.e. for equal class frequencies (trained_prior); prior = the "
                   "training patients' class frequencies undoes that weighting; nothing fitted",
            "out_of_fold": {"before": calibration_measures(data.y, crossfit.oof),
                            "after": calibration_measures(data.y, oof),
                            "bins": ECE_BINS},
        },
        "thresholds": {
            "general": "argmax",
            "sensitive": {"covid_probability": sensitive, "target_sensitivity": target_sn,
                          "chosen_on": f"calibrated {oof_text}"},
        },
        "training": {
            "data": "iCTCF (../shared/data/ictcf): scored patients (control, type1, type2); "
                    "suspected excluded",
            "patients": len(data.y), "class_counts": counts,
            "patient_ids": [str(i) for i in data.ids],
            "held_out_by": [int(k) for k in crossfit.held_out_by],
            "config": {**asdict(config), "hidden": list(config.hidden)},
            "framework": "PyTorch (CPU), exported to ONNX opset "
                         f"{ONNX_OPSET} with softmax in the graph",
            "out_of_fold": oof_summary,
            "seconds": round(time.monotonic() - started, 1),
            "platform": training_platform(),
        },
    }
    (out_dir / "cf.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    log.info("CF model written to %s (%d members; calibrated OOF COVID-vs-control AUC %.3f, "
             "sensitive cut %.4f)", onnx_path, folds,
             oof_summary["auc"]["covid_vs_control"] or float("nan"), sensitive)
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
                        help="folds of the cross-fitting: one ensemble member per fold; its "
                             "out-of-fold scores set the calibration and the sensitive "
                             "threshold")
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
                      "members": meta["ensemble"]["members"],
                      "calibration": {k: meta["calibration"][k]
                                      for k in ("prior", "trained_prior", "temperature")},
                      "thresholds": meta["thresholds"],
                      "out_of_fold": meta["training"]["out_of_fold"]["auc"],
                      "calibration_out_of_fold": meta["calibration"]["out_of_fold"]},
                     indent=1))
    return 0
