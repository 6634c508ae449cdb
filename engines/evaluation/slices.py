"""Evaluate the shipped slice model on a CSV of labelled slice images.

``FILE`` has the columns ``path,label``; ``label`` is one of pCT / nCT / NiCT, or COVID /
NonCOVID (COVID = pCT, NonCOVID = not pCT). A relative ``path`` is looked up first in the
folder that holds ``FILE``, then in its parent. Images may be PNG/JPEG slices or DICOM CT
slices (HU -> lung window). Every image goes through the runtime
pre-processing (grey 8-bit -> lung extraction -> 200x200 crop) and the shipped ONNX slice model.

The JSON printed on stdout has the paper's measures for pCT vs the rest at the 0.5 cut as
top-level keys (``auc``, ``sn``, ``sp``, ``ac``, ``ppv``, ``npv``, ``mcc``, ``f1``,
``confusion`` as [[tn, fp], [fn, tp]]), plus the three-class report when the labels are
three-class. ROC and confusion-matrix PNGs go to ``--out``.

Bad input fails the whole run, before any inference: a missing file, a wrong column or an
unknown label stops with a one-line message naming the file (and row), exit status 2. An image
that exists but cannot be decoded stops the same way when it is reached.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from schemas.errors import InputError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: Final = ("path", "label")
THREE_CLASS: Final = ("NiCT", "pCT", "nCT")
TWO_CLASS: Final = {"COVID": True, "NonCOVID": False}
PCT_INDEX: Final = 1
PCT_THRESHOLD: Final = 0.5
DICOM_MAGIC: Final = b"DICM"
DICOM_MAGIC_OFFSET: Final = 128


@dataclass(frozen=True)
class LabelledSlice:
    """One row of the CSV, with its path resolved."""

    path: Path
    label: str
    row: int


def resolve(csv_path: Path, raw: str) -> Path:
    """``raw`` as given when absolute, else under ``csv_path``'s folder or its parent."""
    p = Path(raw)
    if p.is_absolute():
        return p
    for base in (csv_path.parent, csv_path.parent.parent):
        if (base / p).exists():
            return base / p
    return csv_path.parent / p


def read_csv(csv_path: Path) -> list[LabelledSlice]:
    """Parse and check the CSV (columns, labels, files exist); raises :class:`InputError`."""
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such CSV file")
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in fields]
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)} "
                             f"(has {', '.join(fields) or 'none'})")
        rows = []
        for i, r in enumerate(reader, start=2):
            label = (r["label"] or "").strip()
            if label not in THREE_CLASS and label not in TWO_CLASS:
                raise InputError(f"{csv_path}: row {i}: unknown label {label!r} (expected "
                                 "pCT, nCT, NiCT, COVID or NonCOVID)")
            path = resolve(csv_path, (r["path"] or "").strip())
            if not path.is_file():
                raise InputError(f"{csv_path}: row {i}: image {path} not found")
            rows.append(LabelledSlice(path, label, i))
    if not rows:
        raise InputError(f"{csv_path}: no rows")
    return rows


def is_dicom(path: Path) -> bool:
    """Part-10 files carry ``DICM`` at byte 128; ``.dcm`` files without a preamble count too."""
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as fh:
        head = fh.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


def load_u8(path: Path) -> np.ndarray:
    """The runtime's 8-bit slice: DICOM -> HU -> lung window; PNG/JPEG -> grey."""
    from engines import preprocess

    if not is_dicom(path):
        return preprocess.load_image_u8(path)
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # InvalidDicomError, OSError, struct errors ...
        raise InputError(f"{path}: not a readable DICOM file: {exc}") from exc
    return preprocess.dataset_to_u8(ds)


def crops_for(rows: list[LabelledSlice], progress: bool = True) -> np.ndarray:
    """Runtime pre-processing of every image: uint8 (N, 200, 200) lung crops."""
    from tqdm import tqdm

    from engines import lung

    out = np.zeros((len(rows), 200, 200), np.uint8)
    for i, r in enumerate(tqdm(rows, desc="pre-processing", unit="image", disable=not progress)):
        out[i] = lung.extract(load_u8(r.path)).crop
    return out


def evaluate(rows: list[LabelledSlice], proba: np.ndarray, out: Path | None) -> dict[str, Any]:
    """The report for scores ``proba`` (N, 3) against the rows' labels; plots to ``out``."""
    from engines import metrics

    is_pct = np.array([r.label in ("pCT", "COVID") for r in rows])
    pct = proba[:, PCT_INDEX]
    report: dict[str, Any] = metrics.binary_measures(is_pct, pct, PCT_THRESHOLD)
    report["task"] = "pCT vs rest (COVID = pCT)"
    three = all(r.label in THREE_CLASS for r in rows)
    if three:
        y = np.array([THREE_CLASS.index(r.label) for r in rows])
        report["three_class"] = metrics.multiclass_report(y, proba, THREE_CLASS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics.plot_roc({"pCT vs rest": (is_pct, pct)}, out / "slice-roc.png",
                         "Slice CNN: pCT vs rest")
        metrics.plot_confusion(report["confusion"], ["not pCT", "pCT"],
                               out / "slice-confusion.png", "Slice CNN (pCT >= 0.5)")
        plots = ["slice-roc.png", "slice-confusion.png"]
        if three:
            metrics.plot_confusion(report["three_class"]["confusion"], list(THREE_CLASS),
                                   out / "slice-confusion-3class.png", "Slice CNN (arg-max)")
            plots.append("slice-confusion-3class.png")
        report["plots"] = [str(out / p) for p in plots]
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hust19 evaluate slices``."""
    parser.add_argument("--csv", type=Path, required=True, help="CSV with columns path,label")
    parser.add_argument("--out", type=Path, help="folder for the ROC / confusion PNGs")
    parser.add_argument("--model", type=Path, help="ONNX slice model (default: the shipped one)")
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"],
                        default="auto")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Evaluate the shipped slice model on ``--csv``; JSON on stdout."""
    from engines.slice_model import SliceModel

    rows = read_csv(args.csv)
    model = SliceModel.load(args.model, args.backend)
    proba = model.score(crops_for(rows, progress=not args.no_progress))
    report = evaluate(rows, proba, args.out)
    report = {"model": {"name": "slice", "version": model.version,
                        "sha256": model.meta.get("sha256")}, "csv": str(args.csv), **report}
    print(json.dumps(report, indent=2))
    return 0
