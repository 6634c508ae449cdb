"""``hust19 predict SERIES_DIR [--labs FILE] [--threshold general|sensitive]``: offline triage
of one DICOM CT series folder, JSON on stdout.

Every file in the folder is read; files that are not DICOM (or not CT images) are skipped with a
warning. The slices are put in cranio-caudal order (``engines.series``); the quantitative CT
measures the lungs in HU (volume, patterns, involvement, slice evidence, CT stage:
``engines.ct_analysis``) and the paper's CNN path scores every slice and the top-10 pCT slices
with the patient CNN (``engines.triage``). Without ``--labs`` the decision is CT-only; with it,
the lab values go through the CF network and the fusion. The JSON carries the top-level number
``lung_involvement_percent`` (null when it could not be measured, with the reason in
``ct.reason``) beside ``flag``. An empty folder or a folder without a usable CT slice exits with
status 2 and one line.

``--labs`` is a JSON object mapping catalogue codes (``schemas/clinical_features.json``) to a
number, or to ``{"value": 1.2, "unit": "mg/L", "qualifier": "<", "low": 0, "high": 5}``;
``gender`` is 0/1 and ``Udis`` (underlying diseases) 0/1 as in the paper.

The threshold and the backend come from the settings (``--config`` TOML, ``HUST19_THRESHOLD`` /
``HUST19_BACKEND``) unless the flags name them, as for ``serve``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Final

import numpy as np

from schemas.errors import InputError

log = logging.getLogger(__name__)

CT_MODALITY: Final = "CT"
MICRO_BATCH: Final = 16
SLICE_LIST_LIMIT: Final = 10


def register(sub: Any) -> None:
    """Add ``predict`` to the ``hust19`` parser."""
    p = sub.add_parser("predict", help="triage one DICOM CT series folder offline (JSON out)")
    p.add_argument("series_dir", type=Path, metavar="SERIES_DIR")
    p.add_argument("--labs", type=Path, metavar="FILE", help="JSON lab values for the CF side")
    p.add_argument("--config", type=Path, help="TOML settings file (threshold, backend)")
    p.add_argument("--threshold", choices=["general", "sensitive"], default=None,
                   help="decision threshold (default: the settings', general)")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default=None,
                   help="inference backend (default: the settings', auto)")
    p.add_argument("--ct-source", choices=["quantitative", "patient_cnn"], default=None,
                   help="which model gives the CT scores (default: the settings', "
                        "quantitative)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   default="WARNING")
    p.set_defaults(func=run)


def read_series(folder: Path) -> tuple[list[Any], list[str]]:
    """The CT image datasets of ``folder`` (sorted file names) and their file names."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise InputError(f"{folder}: empty folder, no DICOM file to triage")
    datasets, names = [], []
    skipped: Counter[str] = Counter()
    for path in files:
        reason = None
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:  # pydicom's text ends "Use force=True": not for a CLI user
            reason, detail = "not DICOM", "not a DICOM file (no preamble and 'DICM' prefix)"
        except OSError as exc:
            reason, detail = "unreadable", f"cannot be read ({exc.strerror or exc})"
        except (ValueError, EOFError) as exc:
            damage = str(exc).split(". Use force")[0]  # no library hints for a CLI user
            reason, detail = "damaged DICOM", f"a damaged DICOM file ({damage})"
        else:
            modality = str(ds.get("Modality", "") or "")
            if "PixelData" not in ds:
                reason, detail = "without pixel data", "no pixel data"
            elif modality and modality != CT_MODALITY:
                reason, detail = "not CT", f"modality {modality} is not CT"
        if reason is not None:
            log.warning("%s: skipped, %s", path.name, detail)
            skipped[reason] += 1
            continue
        datasets.append(ds)
        names.append(path.name)
    if not datasets:
        counts = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        raise InputError(f"{folder}: no CT image among {len(files)} file(s) ({counts})")
    return datasets, names


def load_labs(path: Path) -> dict[str, Any]:
    """Parse ``--labs`` into catalogue code -> LabValue; raises :class:`InputError`."""
    from schemas.features import LabValue, by_code

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object of code -> value")
    known = by_code()
    out: dict[str, Any] = {}
    for code, raw in doc.items():
        if code not in known:
            raise InputError(f"{path}: unknown clinical feature code {code!r}")
        spec = raw if isinstance(raw, dict) else {"value": raw}
        try:
            value = None if spec.get("value") is None else float(spec["value"])
            out[code] = LabValue(code=code, value=value, unit=spec.get("unit"),
                                 qualifier=str(spec.get("qualifier", "") or ""),
                                 low=None if spec.get("low") is None else float(spec["low"]),
                                 high=None if spec.get("high") is None else float(spec["high"]))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: {code}: unusable value {raw!r}") from exc
    return out


def predict(folder: Path, labs: Path | None = None, threshold: str = "general",
            backend: str = "auto", ct_source: str = "quantitative") -> dict[str, Any]:
    """The whole offline triage of one folder; returns the JSON document."""
    from engines import series
    from engines.evidence import EvidenceModel
    from engines.lung_gpu import array_module
    from engines.patient_model import PatientModel
    from engines.slice_model import SliceModel
    from engines.triage import SeriesScorer, decide, slice_input

    datasets, names = read_series(folder)
    series_uid = str(datasets[0].get("SeriesInstanceUID", "") or "") or folder.name
    uids = [str(ds.get("SOPInstanceUID", "") or "") for ds in datasets]
    if not all(uids):
        log.warning("series %s: %d slice(s) have no SOP Instance UID; using file names as ids",
                    series_uid, sum(not u for u in uids))
        uids = [u or f"file:{n}" for u, n in zip(uids, names, strict=True)]
    order = series.order_slices(datasets)
    rank = np.empty(len(datasets), np.float64)
    rank[list(order.indices)] = np.arange(len(order.indices))

    slice_model = SliceModel.load(backend=backend)  # type: ignore[arg-type]
    patient_model = PatientModel.load(backend=backend)  # type: ignore[arg-type]
    evidence_model = EvidenceModel.load()
    on_gpu = getattr(slice_model.backend, "name", "") == "tensorrt"
    scorer = SeriesScorer(slice_model, patient_model, series_uid,
                          evidence_model=evidence_model, xp=array_module(on_gpu),
                          ct_source=ct_source)  # type: ignore[arg-type]
    for start in range(0, len(datasets), MICRO_BATCH):
        scorer.add_slices([slice_input(ds, uids[i], float(rank[i]), series_uid=series_uid,
                                       index=i)
                           for i, ds in enumerate(datasets[start:start + MICRO_BATCH],
                                                  start=start)])
    ct = scorer.finish()

    cf_proba = None
    cf_version = None
    if labs is not None:
        from engines.cf import CfModel

        cf_model = CfModel.load_default()
        cf_proba = cf_model.predict_values([load_labs(labs)])[0]
        cf_version = cf_model.version
    if ct.proba is None and cf_proba is None:
        raise InputError(f"{folder}: no CT scores ({ct.reason}) and no lab values")
    decision = decide(ct.proba, cf_proba, threshold)  # type: ignore[arg-type]
    analysis = ct.analysis
    return {
        "series_uid": series_uid,
        **decision.to_dict(),
        "lung_involvement_percent": None if analysis is None or analysis.stage is None
        else round(analysis.stage.involvement_percent, 3),
        "quantitative_ct": None if analysis is None else analysis.summary(),
        "modalities": {"ct": ct.proba is not None, "cf": cf_proba is not None,
                       "missing": [m for m, p in (("ct", ct.proba), ("cf", cf_proba))
                                   if p is None]},
        "ct": ct.to_dict(),
        "cf": None if cf_proba is None else {
            "scores": dict(zip(("control", "type1", "type2"), map(float, cf_proba),
                               strict=True))},
        "top10_sop_instance_uids": list(ct.top_uids),
        "order": {"method": order.method, "gaps": len(order.gaps), "tilt": order.tilt},
        "models": {"slice": slice_model.version, "patient": patient_model.version,
                   "evidence": evidence_model.version, "cf": cf_version,
                   "fusion": decision.fusion_version},
    }


def run(args: argparse.Namespace) -> int:
    """Entry of ``hust19 predict``."""
    from agent.cli.logs import setup_logging
    from agent.config import load_settings

    setup_logging(args.log_level)
    settings = load_settings(args.config, {"threshold": args.threshold, "backend": args.backend,
                                           "ct_source": args.ct_source})
    result = predict(args.series_dir, args.labs, settings.threshold, settings.backend,
                     settings.ct_source)
    print(json.dumps(result, indent=2))
    return 0
