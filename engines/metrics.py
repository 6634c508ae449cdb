"""The paper's evaluation measures, shared by every engine's evaluation and training.

Ning et al. (2020) report AUC, sensitivity (Sn), specificity (Sp), accuracy (Ac), positive and
negative predictive value (PPV, NPV), Matthews correlation coefficient (MCC) and F1. This module
computes them for a binary problem (``binary_measures``), for a k-class problem one-vs-rest
(``multiclass_report``), summarises repeated cross-validation runs (``summarise_runs``), picks
the score cut that reaches a stated sensitivity (``threshold_for_sensitivity``) and draws ROC
and confusion-matrix PNGs.

A measure that is undefined on the data (PPV with no positive prediction, AUC with one class
only) is ``None`` so that it serialises as JSON ``null``, never ``NaN``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from schemas.errors import InputError

#: Names of the scalar measures ``binary_measures`` returns, in report order.
MEASURES: tuple[str, ...] = ("auc", "sn", "sp", "ac", "ppv", "npv", "mcc", "f1")


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or ``None`` when the denominator is zero (measure undefined)."""
    return float(num / den) if den else None


def _as_binary(y_true: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise InputError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.all(np.isfinite(s)):
        raise InputError("scores contain NaN or infinity")
    return y, s


def roc_auc(y_true: ArrayLike, score: ArrayLike) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tie correction); ``None`` when only one
    class is present."""
    y, s = _as_binary(y_true, score)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(s)  # average ranks for ties
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def binary_measures(y_true: ArrayLike, score: ArrayLike, threshold: float = 0.5) -> dict[str, Any]:
    """The paper's measures for a binary problem; positive prediction is ``score >= threshold``.

    Returns ``auc, sn, sp, ac, ppv, npv, mcc, f1`` (float or ``None`` when undefined),
    ``confusion`` as ``[[tn, fp], [fn, tp]]``, ``n`` and ``threshold``.
    """
    y, s = _as_binary(y_true, score)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    tn = int(np.sum(~pred & ~y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    den = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "auc": roc_auc(y, s),
        "sn": _ratio(tp, tp + fn),
        "sp": _ratio(tn, tn + fp),
        "ac": _ratio(tp + tn, y.size),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "mcc": _ratio(tp * tn - fp * fn, den),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "confusion": [[tn, fp], [fn, tp]],
        "n": int(y.size),
        "threshold": float(threshold),
    }


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, k: int) -> list[list[int]]:
    """``k x k`` counts, rows = true class, columns = predicted class."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return [[int(v) for v in row] for row in m]


def multiclass_report(y_true: ArrayLike, proba: np.ndarray,
                      classes: Sequence[str]) -> dict[str, Any]:
    """One-vs-rest ``binary_measures`` of each class's score at 0.5, the arg-max confusion
    matrix (rows true, columns predicted, order ``classes``) and the arg-max accuracy."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(proba, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape != (y.size, k):
        raise InputError(f"probabilities of shape {p.shape} do not match {y.size} labels "
                         f"and {k} classes")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise InputError(f"labels outside 0..{k - 1}")
    pred = p.argmax(axis=1)
    return {
        "classes": list(classes),
        "per_class": {c: binary_measures(y == i, p[:, i]) for i, c in enumerate(classes)},
        "confusion": confusion_matrix(y, pred, k),
        "accuracy": _ratio(int(np.sum(pred == y)), y.size),
        "n": int(y.size),
    }


def threshold_for_sensitivity(y_true: ArrayLike, score: ArrayLike, target_sn: float) -> float:
    """The largest cut ``t`` such that ``score >= t`` reaches sensitivity ``>= target_sn`` on
    these data (the most specific threshold that still meets the sensitivity target)."""
    y, s = _as_binary(y_true, score)
    if not 0.0 < target_sn <= 1.0:
        raise InputError(f"target sensitivity {target_sn} outside (0, 1]")
    pos = np.sort(s[y])[::-1]
    if pos.size == 0:
        raise InputError("no positive case: sensitivity is undefined")
    need = math.ceil(target_sn * pos.size - 1e-9)  # positives that must score >= t
    return float(pos[max(need, 1) - 1])


def _numeric_leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_numeric_leaves(value, f"{name}."))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float) or value is None:
            out[name] = None if value is None else float(value)
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def summarise_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``mean, std, min, max`` (and ``n`` runs where defined) of every numeric measure across
    runs (nested dicts are followed; lists such as confusion matrices are skipped). A measure
    undefined in some runs is summarised over the runs where it is defined."""
    if not runs:
        raise InputError("no runs to summarise")
    flat = [_numeric_leaves(r) for r in runs]
    names: list[str] = []
    for f in flat:
        names.extend(n for n in f if n not in names)
    summary: dict[str, Any] = {}
    for name in names:
        vals = np.array([f[name] for f in flat if f.get(name) is not None], dtype=np.float64)
        if vals.size == 0:
            summary[name] = {"mean": None, "std": None, "min": None, "max": None, "n": 0}
            continue
        summary[name] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1))
                         if vals.size > 1 else 0.0, "min": float(vals.min()),
                         "max": float(vals.max()), "n": int(vals.size)}
    return _unflatten(summary)


def roc_curve(y_true: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score cut (for plotting)."""
    y, s = _as_binary(y_true, score)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def plot_roc(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path: Path, title: str) -> None:
    """Write one PNG with a ROC curve (and its AUC in the legend) per named (labels, scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    try:
        for name, (y, s) in curves.items():
            fpr, tpr = roc_curve(y, s)
            auc = roc_auc(y, s)
            label = f"{name} (AUC {auc:.3f})" if auc is not None else f"{name} (AUC n/a)"
            ax.plot(fpr, tpr, label=label)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title,
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize="small")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def plot_confusion(matrix: ArrayLike, labels: Sequence[str], path: Path, title: str) -> None:
    """Write a PNG of a confusion matrix (rows true, columns predicted) with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(labels), 1.2 + 1.2 * len(labels)), dpi=100)
    try:
        ax.imshow(m, cmap="Blues")
        ticks = range(len(labels))
        ax.set_xticks(list(ticks), labels=list(labels))
        ax.set_yticks(list(ticks), labels=list(labels))
        ax.set(xlabel="predicted", ylabel="true", title=title)
        top = m.max() if m.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center",
                        color="white" if top and m[i, j] > top / 2 else "black")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
