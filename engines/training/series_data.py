"""Labelled CT series for training and evaluation: the shared data, or a site's own folder.

A site retrains with its own series (``docs/models/retraining.md``)::

    SERIES_DIR/<series>/*.dcm         one folder of DICOM files per series
    labels.csv                        series,pneumonia[,class]
    slice-labels.csv (optional)       series,file,infection

``pneumonia`` is 1 when the series shows pneumonia (any cause), 0 for a normal chest; ``class``
(optional) is the patient's HUST-19 class, ``control``, ``type1`` or ``type2``, for the patient
CNN and the fusion. ``infection`` is 1 when a reader marked pneumonia on that slice (the file
name within the series folder). A series with ``pneumonia`` 0 and no slice labels counts as
all slices negative; a pneumonia series without slice labels serves series-level checks only.

The shared data (``../shared/data/chest-ct-series``) is read through the same type: its
``series.csv`` gives the diagnosis and ``<series>-slices.csv`` the slice labels.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from engines import volume as volume_mod
from engines.volume import SeriesVolume
from schemas.errors import InputError

__all__ = ["LabelledSeries", "load_volume", "shared_series", "site_series"]

log = logging.getLogger(__name__)

SHARED_FOLDER: Final = "chest-ct-series"
NORMAL_DIAGNOSIS: Final = "normal"
CLASSES: Final = ("control", "type1", "type2")
UNLABELLED: Final = -1


@dataclass(frozen=True)
class LabelledSeries:
    """One series and what is known about it."""

    name: str
    folder: Path
    pneumonia: bool
    patient_class: str | None = None
    slice_labels: Mapping[str, int] | None = None

    @property
    def has_slice_labels(self) -> bool:
        return self.slice_labels is not None or not self.pneumonia


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has "
                                 f"{', '.join(reader.fieldnames or [])})")
            return list(reader)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc


def _flag(path: Path, row: Mapping[str, str], column: str) -> int:
    value = (row.get(column) or "").strip()
    if value not in ("0", "1"):
        raise InputError(f"{path}: series {row.get('series', '?')!r}: {column} must be 0 or 1, "
                         f"got {value!r}")
    return int(value)


def shared_series(data: Path, names: Sequence[str]) -> list[LabelledSeries]:
    """Series of the shared data folder by name (``P002``, ``cap002``, ``normal001``)."""
    root = data / SHARED_FOLDER
    table = root / "series.csv"
    rows = {r["series"]: r for r in _read_csv(table, ("series", "diagnosis"))}
    out = []
    for name in names:
        if name not in rows:
            raise InputError(f"{table}: no series {name!r} (has {', '.join(sorted(rows))})")
        pneumonia = rows[name]["diagnosis"].strip().lower() != NORMAL_DIAGNOSIS
        labels = None
        slices = root / f"{name}-slices.csv"
        if pneumonia:
            labels = {r["file"]: _flag(slices, r, "infection")
                      for r in _read_csv(slices, ("file", "infection"))}
        out.append(LabelledSeries(name, root / name, pneumonia, None, labels))
    return out


def site_series(series_dir: Path, labels_csv: Path,
                slice_labels_csv: Path | None = None) -> list[LabelledSeries]:
    """A site's series (see the module docstring for the files)."""
    if not series_dir.is_dir():
        raise InputError(f"{series_dir}: not a folder of series folders")
    per_series: dict[str, dict[str, int]] = {}
    if slice_labels_csv is not None:
        for r in _read_csv(slice_labels_csv, ("series", "file", "infection")):
            per_series.setdefault(r["series"], {})[r["file"]] = _flag(slice_labels_csv, r,
                                                                      "infection")
    out = []
    for r in _read_csv(labels_csv, ("series", "pneumonia")):
        name = r["series"]
        folder = series_dir / name
        if not folder.is_dir():
            raise InputError(f"{labels_csv}: series {name!r}: no folder {folder}")
        cls = (r.get("class") or "").strip() or None
        if cls is not None and cls not in CLASSES:
            raise InputError(f"{labels_csv}: series {name!r}: class must be one of "
                             f"{', '.join(CLASSES)}, got {cls!r}")
        out.append(LabelledSeries(name, folder, bool(_flag(labels_csv, r, "pneumonia")), cls,
                                  per_series.get(name)))
    unknown = set(per_series) - {s.name for s in out}
    if unknown:
        raise InputError(f"{slice_labels_csv}: slice labels for series not in {labels_csv}: "
                         f"{', '.join(sorted(unknown))}")
    if not out:
        raise InputError(f"{labels_csv}: no series")
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def load_volume(item: LabelledSeries, cache: Path | None = None) -> tuple[SeriesVolume,
                                                                           np.ndarray]:
    """The series as a volume and its slice labels in slice order (1 infected, 0 not,
    :data:`UNLABELLED` unknown). Decoded volumes are cached as .npz in ``cache``."""
    files = _files(item.folder)
    if not files:
        raise InputError(f"{item.folder}: no file")
    headers: list[pydicom.Dataset] = []
    pixels: list[np.ndarray] = []
    keys: list[str] = []
    digest = hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in files).encode())
    cached = None if cache is None else cache / f"{item.name}-{digest.hexdigest()[:12]}.npz"
    stored = np.load(cached) if cached is not None and cached.is_file() else None
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stored is not None)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            log.warning("%s: skipped, not readable DICOM (%s)", path, exc)
            continue
        headers.append(volume_mod.geometry_header(ds))
        keys.append(path.name)
        pixels.append(stored["hu"][len(pixels)] if stored is not None
                      else volume_mod.to_hu_int16(ds))
    if cache is not None and cached is not None and stored is None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(cached, hu=np.stack(pixels))
    vol = volume_mod.assemble(headers, pixels, keys, item.name)
    if item.slice_labels is not None:
        missing = [k for k in vol.keys if k not in item.slice_labels]
        if missing:
            log.warning("series %s: %d slice(s) without a label (%s...)", item.name,
                        len(missing), missing[0])
        labels = np.array([item.slice_labels.get(k, UNLABELLED) for k in vol.keys])
    elif not item.pneumonia:
        labels = np.zeros(len(vol.keys), dtype=np.int64)
    else:
        labels = np.full(len(vol.keys), UNLABELLED, dtype=np.int64)
    return vol, labels
