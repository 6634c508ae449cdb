"""Slice-model experiment for the model card: which input the network sees (JSON out).

Question for the team's decision on the slice target (docs/models/slice.md): with a network
and recipe that do learn from a few hundred figures (batch-normalised convolutions, AdamW
with a one-cycle schedule, label smoothing, affine + contrast augmentation), how much of the
UCSD COVID-CT signal survives each input?

- ``lung``: the shipped pre-processing, the HUST-19 lung extraction crop (lungs kept, the rest
  set to 0);
- ``square``: the extraction's first step only, the square content crop (``lung.crop_square``),
  nothing masked;
- ``whole``: the whole figure.

Each is resized to ``--size`` (area interpolation). Trained on the official train split
(COVID 191 / NonCOVID 234; see "Training data" below), scored once on the official val split
(60 / 58) after the last epoch: pCT-score AUC, the measures at score >= 0.5 for every seed,
and the AUC of the seeds' mean score. Nothing is chosen on the val split here: every run is
listed. The same networks also score the slices of the labelled DICOM series in ``--series``
(lung window, then the same input step; never trained on): AUC of the COVID score for the
radiologists' infection label, i.e. whether what was learned carries over to the product's
input. Networks:

- ``bn-gap``: four blocks of two 3x3 conv + BatchNorm + ReLU (``--widths``) and a max-pool,
  global average pooling, dropout 0.3, 2 outputs (cheap enough for several seeds on 2 cores);
- ``paper-bn``: the paper's 13-layer shape (64,64 / 32,32 / 16,16, dense 64 -> 32, dropout
  0.5) with BatchNorm after each convolution, 2 outputs.

Training data: by default the public train split only; ``--train-series P002,normal001`` adds
those series' slices (infection label 1 -> COVID/pCT, normal001 -> not), ``--public none``
leaves the figures out. A series trained on cannot also be scored.

    .venv/bin/python bench/slice_inputs.py [--inputs lung,square,whole] [--seeds 1,2,3,4,5]
        [--arch bn-gap|paper-bn] [--size 96] [--epochs 40] [--train-series P002,normal001]
        [--public train|none]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# The repository first: run as `python bench/...`, this folder's engines.py (the network
# benchmark) would otherwise shadow the engines package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import lung, metrics
from engines.training.slice import (
    DEFAULT_DATA,
    LABEL_PCT,
    PUBLIC_CHOICES,
    PUBLIC_TRAIN,
    SliceSource,
    load_u8,
    public_sources,
    series_sources,
    sources_text,
    training_sources,
)

INPUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "lung": lambda image: lung.extract(image).crop,
    "square": lung.crop_square,
    "whole": lambda image: image,
}
MAX_ROTATION_RAD = 0.26
ZOOM_RANGE = (0.75, 1.15)
MAX_SHIFT = 0.12
CONTRAST_RANGE = (0.75, 1.25)
MAX_BRIGHTNESS = 0.1
MAX_LOG_GAMMA = 0.3
LABEL_SMOOTHING = 0.1
WARMUP_FRACTION = 0.15
EVAL_BATCH = 64
GAP_DROPOUT = 0.3
PAPER_DROPOUT = 0.5
PAPER_DENSE = (64, 32)


def prepare(sources: list[SliceSource], kind: str,
            size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 1, size, size) network inputs and 0/1 pCT labels (COVID figure, or a series
    slice the radiologists marked infected)."""
    images = np.stack([cv2.resize(INPUTS[kind](load_u8(s)), (size, size),
                                  interpolation=cv2.INTER_AREA) for s in sources])
    labels = np.array([s.source_label == LABEL_PCT for s in sources], np.int64)
    return images[:, None], labels


def build_net(arch: str, size: int, widths: list[int]) -> Any:
    """The experiment's network (see the module docstring)."""
    from torch import nn

    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    layers: list[nn.Module] = []
    cin = 1
    for width in widths:
        layers += [*conv(cin, width), *conv(width, width), nn.MaxPool2d(2)]
        cin = width
    if arch == "bn-gap":
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Dropout(GAP_DROPOUT), nn.Linear(cin, 2))
    side = size // 2 ** len(widths)
    first, second = PAPER_DENSE
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, first),
                         nn.ReLU(inplace=True), nn.Dropout(PAPER_DROPOUT), nn.Linear(first, second),
                         nn.ReLU(inplace=True), nn.Dropout(PAPER_DROPOUT), nn.Linear(second, 2))


def augment(x: Any, gen: Any) -> Any:
    """Per sample: rotation, zoom, shift, left-right flip (one affine warp), gamma, contrast,
    brightness; x float (N, 1, H, W) in [0, 1]."""
    import torch
    import torch.nn.functional as functional

    n = x.shape[0]

    def uniform(low: float, high: float, *shape: int) -> Any:
        return low + torch.rand(n, *shape, generator=gen) * (high - low)

    angle = uniform(-MAX_ROTATION_RAD, MAX_ROTATION_RAD)
    zoom = 1 / uniform(*ZOOM_RANGE)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, uniform(-MAX_SHIFT, MAX_SHIFT)], 1),
                         torch.stack([sin * flip, cos, uniform(-MAX_SHIFT, MAX_SHIFT)], 1)], 1)
    grid = functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    x = x.clamp(1e-4, 1) ** torch.exp(uniform(-MAX_LOG_GAMMA, MAX_LOG_GAMMA, 1, 1, 1))
    mean = x.mean((2, 3), keepdim=True)
    contrast = uniform(*CONTRAST_RANGE, 1, 1, 1)
    return ((x - mean) * contrast + mean + uniform(-MAX_BRIGHTNESS, MAX_BRIGHTNESS, 1, 1, 1)
            ).clamp(0, 1)


def train_and_score(args: argparse.Namespace, kind: str, seed: int,
                    train: tuple[np.ndarray, np.ndarray],
                    scored: list[np.ndarray]) -> list[np.ndarray]:
    """Train one network from scratch; return its COVID score on each of ``scored``."""
    import torch
    import torch.nn.functional as functional

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train = torch.from_numpy(train[0].astype(np.float32) / 255.0)
    y_train = torch.from_numpy(train[1])
    net = build_net(args.arch, args.size, [int(w) for w in args.widths.split(",")])
    net.to(memory_format=torch.channels_last)  # oneDNN's faster CPU convolutions
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = -(-len(y_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr,
                                                total_steps=args.epochs * per_epoch,
                                                pct_start=WARMUP_FRACTION)
    net.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            x = augment(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = functional.cross_entropy(net(x), y_train[idx],
                                            label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"{kind} seed {seed}: epoch {epoch + 1}/{args.epochs} loss "
              f"{total / len(y_train):.4f}", file=sys.stderr, flush=True)  # progress
    net.eval()
    out = []
    with torch.no_grad():
        for images in scored:
            scores = []
            for start in range(0, len(images), EVAL_BATCH):
                batch = torch.from_numpy(images[start:start + EVAL_BATCH].astype(np.float32)
                                         / 255.0)
                scores.append(torch.softmax(net(batch), dim=1)[:, 1].numpy())
            out.append(np.concatenate(scores))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--inputs", default="lung,square,whole")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--series", default="P002,cap002",
                        help="labelled DICOM series scored after training ('' for none)")
    parser.add_argument("--train-series", default="",
                        help="labelled DICOM series added to the training data")
    parser.add_argument("--public", choices=PUBLIC_CHOICES, default=PUBLIC_TRAIN,
                        help="train on the UCSD official train split (default) or not")
    parser.add_argument("--arch", choices=("bn-gap", "paper-bn"), default="bn-gap")
    parser.add_argument("--widths", default="16,32,64,128",
                        help="conv widths per block (paper-bn: 64,32,16)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    series = [s for s in args.series.split(",") if s]
    kinds = args.inputs.split(",")
    train_series = [s for s in args.train_series.split(",") if s]
    if set(train_series) & set(series):
        parser.error(f"--series: {', '.join(set(train_series) & set(series))} is also trained on")
    if not train_series and args.public != PUBLIC_TRAIN:
        parser.error("--public none needs --train-series")
    train_sources = training_sources(args.data, tuple(train_series), public=args.public)
    for kind in kinds:
        if kind not in INPUTS:
            parser.error(f"--inputs: unknown input {kind!r} (choose from {', '.join(INPUTS)})")
    results: dict[str, Any] = {}
    for kind in kinds:
        train = prepare(train_sources, kind, args.size)
        val_x, val_y = prepare(public_sources(args.data, "val"), kind, args.size)
        held = {name: prepare(series_sources(args.data, name), kind, args.size)
                for name in series}
        runs: list[dict[str, Any]] = []
        scores: list[np.ndarray] = []
        for seed in seeds:
            started = time.monotonic()
            score, *series_scores = train_and_score(
                args, kind, seed, train, [val_x, *(x for x, _ in held.values())])
            scores.append(score)
            runs.append({"seed": seed, "minutes": round((time.monotonic() - started) / 60, 2),
                         "val": metrics.binary_measures(val_y, score),
                         "series_auc": {name: metrics.roc_auc(y, sc) for (name, (_, y)), sc
                                        in zip(held.items(), series_scores, strict=True)}})
        aucs = [r["val"]["auc"] for r in runs]
        results[kind] = {"runs": runs, "auc_mean": float(np.mean(aucs)),
                         "series_auc_mean": {name: float(np.mean([r["series_auc"][name]
                                                                  for r in runs]))
                                             for name in series},
                         "auc_min": min(aucs), "auc_max": max(aucs),
                         "seed_mean_score": metrics.binary_measures(val_y,
                                                                    np.mean(scores, axis=0))}
        print(json.dumps({kind: {k: v for k, v in results[kind].items() if k != "runs"}}),
              file=sys.stderr, flush=True)
    print(json.dumps({"train": sources_text(args.public, train_series),
                      "n_train": len(train_sources),
                      "val": "covid-ct official val split (118)", "arch": args.arch,
                      "widths": args.widths, "size": args.size, "epochs": args.epochs,
                      "batch_size": args.batch_size, "lr": args.lr,
                      "weight_decay": args.weight_decay, "seeds": seeds,
                      "series": series, "inputs": results},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
