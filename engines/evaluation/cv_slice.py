"""The paper's protocol for the slice CNN: k-fold cross-validation repeated r times.

Each repeat shuffles the slice training pool (UCSD COVID-CT train split + the training series,
exactly the data and labels of ``hust19 train slice``) into ``--folds`` stratified folds that
keep every source paper / series inside one fold (``StratifiedGroupKFold``: no near-duplicate
slice of one patient on both sides), trains a fresh slice CNN on the other folds for
``--epochs`` epochs and scores the held-out fold. Each fold's measures (pCT vs rest: AUC, Sn,
Sp, Ac, PPV, NPV, MCC, F1; and the three-class report) are summarised as mean, std, min and
max over all folds of all repeats. The paper uses 10 x 10 folds; on a CPU, pass fewer epochs,
folds or repeats (``--limit`` subsamples the pool) and report the flags with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Final

import numpy as np

from schemas.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_FOLDS: Final = 10
DEFAULT_REPEATS: Final = 10
DEFAULT_EPOCHS: Final = 16
#: Four times ``hust19 train slice``'s batch: with the shorter default run, 100 folds stay
#: feasible on a CPU. Pass ``--batch-size 16 --epochs 40`` for the shipped recipe.
DEFAULT_BATCH_SIZE: Final = 64


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 evaluate cv slice``."""
    from engines.training.slice import DEFAULT_DATA, PUBLIC_TRAIN, add_data_flags

    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=19)
    # folds are grouped by source paper / series: the public slices supply the groups
    add_data_flags(parser, public=PUBLIC_TRAIN)
    parser.add_argument("--limit", type=int, default=0,
                        help="keep at most N slices per source and label (feasibility)")
    parser.add_argument("--cache", type=Path, default=Path("runs/slice"),
                        help="folder of the pre-processed slice cache")
    parser.add_argument("--out", type=Path, help="write the full JSON (all folds) here")
    parser.add_argument("--no-progress", action="store_true")


def run_cv(args: argparse.Namespace) -> dict[str, Any]:
    """All folds of all repeats; returns ``{"summary", "folds", "protocol"}``."""
    from sklearn.model_selection import StratifiedGroupKFold
    from tqdm import tqdm

    from engines import metrics
    from engines.training import common
    from engines.training.slice import (
        CLASS_INDEX,
        preprocess_sources,
        preprocessing_hash,
        train_slice_net,
        training_sources,
    )

    sources = training_sources(args.data, tuple(args.series), args.limit, args.public)
    cache = args.cache / f"cache-{preprocessing_hash()}-{len(sources)}.npz"
    n_groups = len({s.group for s in sources})
    if n_groups < args.folds:
        raise InputError(f"--folds {args.folds}: the training pool has only {n_groups} "
                         "group(s) (source papers / series); add --public train or lower --folds")
    pool = preprocess_sources(sources, cache, progress=not args.no_progress)
    classes = tuple(CLASS_INDEX)
    runs: list[dict[str, Any]] = []
    bar = tqdm(total=args.folds * args.repeats, desc="cross-validation", unit="fold",
               disable=args.no_progress)
    for rep in range(args.repeats):
        splitter = StratifiedGroupKFold(n_splits=args.folds, shuffle=True,
                                        random_state=args.seed + rep)
        for fold, (train, test) in enumerate(splitter.split(pool.crops, pool.labels,
                                                            pool.groups)):
            net, _ = train_slice_net(pool.subset(train), epochs=args.epochs,
                                     batch_size=args.batch_size,
                                     seed=args.seed + 1000 * rep + fold, out=None,
                                     resume=False, progress=False)
            proba = common.predict_proba(net, pool.crops[test][:, None])
            y = pool.labels[test]
            run = metrics.binary_measures(y == CLASS_INDEX["pCT"], proba[:, 1])
            run["three_class"] = metrics.multiclass_report(y, proba, classes)
            run["repeat"], run["fold"] = rep, fold
            runs.append(run)
            bar.set_postfix(auc=f"{run['auc'] or float('nan'):.3f}")
            bar.update(1)
    bar.close()
    summary = metrics.summarise_runs([{k: v for k, v in r.items()
                                       if k not in ("repeat", "fold", "n", "threshold")}
                                      for r in runs])
    return {"protocol": {"folds": args.folds, "repeats": args.repeats, "epochs": args.epochs,
                         "limit": args.limit, "series": list(args.series),
                         "public": args.public,
                         "n_slices": len(pool.labels), "class_counts": pool.counts(),
                         "grouping": "source paper / series (StratifiedGroupKFold)"},
            "summary": summary, "folds": runs}


def main(args: argparse.Namespace) -> int:
    """Run the CV; print the summary JSON (all folds too when ``--out`` is given)."""
    result = run_cv(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    mean = {k: v.get("mean") for k, v in result["summary"].items()
            if isinstance(v, dict) and "mean" in v}
    print(json.dumps({"protocol": result["protocol"], "mean": mean,
                      "summary": result["summary"]}, indent=2, default=_json_default))
    return 0


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
