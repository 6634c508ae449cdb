"""Slice-model experiment for the model card (JSON out; not a test, not a product path).

Question for the team's decision on the slice target (docs/models/slice.md): how far does the
paper's slice network get on the UCSD COVID-CT official split when it sees the *whole* figure
(grey, resized to 200x200 with area interpolation) instead of the HUST-19 lung-extraction
crop, which fails on many of those figures? Same network, optimiser (Adam, lr 0.001),
augmentation and seeds as ``hust19 train slice``; trained only on the official train split
(COVID -> pCT, NonCOVID -> nCT; the NiCT output is never a target here), evaluated on the
official val split every ``--eval-every`` epochs: pCT-score AUC (COVID vs NonCOVID) and the
measures at pCT score >= 0.5. The val split is only watched, never used to choose anything:
the JSON lists every evaluation.

    .venv/bin/python bench/slice_whole_image.py [--data ../shared/data] [--epochs 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

# The repository first: run as `python bench/...`, this folder's engines.py (the network
# benchmark) would otherwise shadow the engines package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import metrics, networks, preprocess
from engines.training import common
from engines.training.slice import (
    CLASS_INDEX,
    DEFAULT_DATA,
    LABEL_PCT,
    public_sources,
)

SIZE = 200


def _whole_images(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    sources = public_sources(data, split)
    images = np.stack([cv2.resize(preprocess.load_image_u8(s.path), (SIZE, SIZE),
                                  interpolation=cv2.INTER_AREA) for s in sources])
    labels = np.array([CLASS_INDEX[s.source_label] for s in sources], np.int64)
    return images[:, None], labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    import torch

    train_x, train_y = _whole_images(args.data, "train")
    val_x, val_y = _whole_images(args.data, "val")
    covid = val_y == CLASS_INDEX[LABEL_PCT]
    common.seed_everything(args.seed)
    net = networks.slice_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=networks.SLICE_LR)
    state = common.TrainState()
    evaluations = []
    started = time.monotonic()
    for upto in range(args.eval_every, args.epochs + 1, args.eval_every):
        state = common.train_epochs(net, opt, train_x, train_y, epochs=upto,
                                    batch_size=args.batch_size, seed=args.seed, out=None,
                                    state=state, progress=False)
        score = common.predict_proba(net, val_x)[:, CLASS_INDEX[LABEL_PCT]]
        train_score = common.predict_proba(net, train_x)[:, CLASS_INDEX[LABEL_PCT]]
        row = {"epoch": upto, "minutes": round((time.monotonic() - started) / 60, 1),
               "train_auc": metrics.roc_auc(train_y == CLASS_INDEX[LABEL_PCT], train_score),
               "val": metrics.binary_measures(covid, score)}
        evaluations.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress
    print(json.dumps({"train": len(train_y), "val": len(val_y), "input": "whole figure, "
                      f"grey, {SIZE}x{SIZE} INTER_AREA", "batch_size": args.batch_size,
                      "seed": args.seed, "evaluations": evaluations}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
