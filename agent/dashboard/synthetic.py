"""Made-up triage results and evidence sets, for the dashboard's benchmark, screenshots and
tests: well-formed ``hust19.triage.result/2`` and ``hust19.triage.evidence/1`` messages whose
numbers hang together (the flag follows the scores, the CT severity the involvement, the lab
values the flag). Patient IDs are ``SYN-`` numbers and the names are drawn from common ones:
never real data.

Every result has a patient name and a study date (the day the series arrived, now and then a
day or three before: images sent later); a triaged one an SR queued for one or two PACS, and
when it used lab values (``labs``) the values themselves (``lab_values``); revision N > 1 names
revision N - 1's SR as the one it supersedes.
"""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime, timedelta
from typing import Final

import cv2
import numpy as np

from agent.bus.interface import Producer
from schemas import topics
from schemas.messages import (
    Availability,
    ClassScores,
    EvidenceSlice,
    EvidenceThumbnails,
    LabResult,
    LungMeasurements,
    ModalityScores,
    QuantitativeCt,
    Timings,
    TriageResult,
    dump_json,
)
from schemas.uids import derive_uid, result_id, sr_instance_uid

LUNG_WINDOW: Final = (-600.0, 1500.0)
"""(centre, width) in HU of the lung window the thumbnails are drawn in."""
THUMB_SIZE: Final = 128
MODEL_VERSIONS: Final = {"slice": "slice-20261126161031", "patient": "patient-20261127",
                         "cf": "cf-20261204132950", "fusion": "fusion-20261204",
                         "quantitative": "qct-1"}
FAMILY_NAMES: Final = ("CHEN", "LI", "WANG", "ZHANG", "LIU", "YANG", "HUANG", "ZHAO", "WU",
                       "ZHOU", "XU", "SUN", "MA", "ZHU", "HU", "GUO", "HE", "LIN", "LUO", "GAO")
GIVEN_NAMES: Final = ("Wei", "Fang", "Min", "Jing", "Lei", "Yan", "Tao", "Hui", "Jun", "Ping",
                      "Xiuying", "Ming", "Qiang", "Li", "Hong", "Bo")
SR_DESTINATIONS: Final = ("PACS@pacs.hospital.example:104", "ARCHIVE@10.20.0.15:11112")
Span = tuple[float, float]
# code: (where the value is drawn from for control, type I, type II), the printed range or None
LABS: Final[dict[str, tuple[tuple[Span, Span, Span], Span | None]]] = {
    "AGE": (((25, 70), (35, 80), (55, 90)), None),
    "TEMP": (((36.3, 37.1), (37.2, 38.6), (37.8, 39.4)), None),
    "WBC": (((4.0, 9.0), (3.2, 7.5), (6.0, 14.0)), (3.5, 9.5)),
    "NEP": (((45.0, 70.0), (55.0, 78.0), (78.0, 92.0)), (40.0, 75.0)),
    "LY": (((1.3, 2.9), (0.8, 1.3), (0.3, 0.8)), (1.1, 3.2)),
    "PLT": (((150, 320), (130, 260), (90, 180)), (125, 350)),
    "CRP": (((0.5, 6.0), (8.0, 40.0), (40.0, 130.0)), (0.0, 10.0)),
    "PCT": (((0.02, 0.05), (0.03, 0.12), (0.1, 0.9)), (0.0, 0.05)),
    "DD": (((0.1, 0.45), (0.3, 1.1), (1.0, 5.5)), None),
    "LDH": (((120, 230), (200, 310), (300, 620)), None),
    "ALB": (((38.0, 48.0), (33.0, 40.0), (27.0, 34.0)), (35.0, 55.0)),
}
UNITS: Final = {"AGE": "a", "TEMP": "Cel", "WBC": "G/L", "NEP": "%", "LY": "G/L", "PLT": "G/L",
                "CRP": "mg/L", "PCT": "ng/mL", "DD": "mg/L FEU", "LDH": "U/L", "ALB": "g/L"}
PCT_DETECTION_LIMIT: Final = 0.05


def severity(involvement: float) -> str:
    """CT severity category of a lung involvement in percent."""
    if involvement <= 0.0:
        return "CT-0"
    if involvement < 25:
        return "CT-1"
    if involvement < 50:
        return "CT-2"
    if involvement < 75:
        return "CT-3"
    return "CT-4"


def _scores(rng: random.Random, flag: str, strength: float) -> ClassScores:
    order = {"control": 0, "type1": 1, "type2": 2}
    raw = [rng.uniform(0.02, 0.3) for _ in range(3)]
    raw[order[flag]] = strength + rng.uniform(0.0, 0.3)
    total = sum(raw)
    p = [v / total for v in raw]
    return ClassScores(control=p[0], type1=p[1], type2=p[2])


def _lung(rng: random.Random, involvement: float, volume: float) -> LungMeasurements:
    consolidation = involvement * rng.uniform(0.1, 0.45)
    return LungMeasurements(volume_ml=volume, mean_hu=-850 + involvement * 4.0,
                            well_aerated_percent=max(0.0, 100 - involvement),
                            ground_glass_percent=involvement - consolidation,
                            consolidation_percent=consolidation,
                            involvement_percent=involvement)


def patient_name(rng: random.Random) -> str:
    """A made-up DICOM person name, FAMILY^Given."""
    return f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES)}"


def lab_values(rng: random.Random, flag: str, collected: datetime) -> list[LabResult]:
    """Lab values that fit ``flag``, as the worker puts them in a result (sorted by code)."""
    column = {"control": 0, "type1": 1, "type2": 2}[flag]
    out = []
    for code, (spans, printed) in LABS.items():
        lo, hi = spans[column]
        value = round(rng.uniform(lo, hi), 2 if hi < 10 else 1)
        qualifier = ""
        if code == "PCT" and value < PCT_DETECTION_LIMIT:  # below what the assay reports
            value, qualifier = PCT_DETECTION_LIMIT, "<"
        if code == "AGE":
            value = float(int(value))
        when = None if code == "AGE" else (collected - timedelta(
            hours=rng.uniform(1, 20))).replace(tzinfo=None, microsecond=0).isoformat()
        out.append(LabResult(code=code, value=value, unit=UNITS[code], qualifier=qualifier,
                             low=printed[0] if printed else None,
                             high=printed[1] if printed else None,
                             lis_code=None if code in ("AGE", "TEMP") else f"L-{code}",
                             collected_at=when))
    return sorted(out, key=lambda v: v.code)


def make_result(n: int, *, flag: str | None = None, revision: int = 1,
                status: str = "triaged", ready: datetime | None = None,
                labs: bool | None = None, patient_id: str | None = None,
                study_date: str | None = None, seed: int | None = None) -> TriageResult:
    """The ``n``-th synthetic result (deterministic for ``n`` and ``seed``). ``study_date``
    (YYYYMMDD) overrides the drawn one."""
    rng = random.Random(n if seed is None else seed * 1_000_003 + n)
    # the fields that came later draw from their own generator: the rest stays as it was
    more = random.Random(f"synthetic-more-{n}-{seed}")
    series_uid = derive_uid("synthetic-series", str(n))
    study_uid = derive_uid("synthetic-study", str(n))
    ready = ready or datetime(2026, 12, 1, 8, 0, tzinfo=UTC) + timedelta(minutes=7 * n)
    last = ready - timedelta(seconds=rng.uniform(8, 40))
    first = last - timedelta(seconds=rng.uniform(20, 90))
    timings = Timings(first_instance_received=first, last_instance_received=last,
                      series_complete=last + timedelta(seconds=3), result_ready=ready)
    days_before = more.choices([0, 1, 3], weights=[17, 2, 1])[0]
    base = {"result_id": result_id(series_uid), "revision": revision, "study_uid": study_uid,
            "series_uid": series_uid, "patient_id": patient_id or f"SYN-{n:06d}",
            "patient_name": patient_name(more),
            "study_date": study_date or (first - timedelta(days=days_before)).strftime("%Y%m%d"),
            "accession_number": f"ACC{n:07d}", "timings": timings,
            "model_versions": dict(MODEL_VERSIONS), "instance_count": rng.randint(60, 300)}
    if status == "skipped":
        return TriageResult(status="skipped", skip_reason=rng.choice(
            ["not a CT series (Modality MR)", "too short to triage: 3 axial slice(s), at "
             "least 10 needed", "not a chest series (BodyPartExamined HEAD)"]), **base)
    flag = flag or rng.choices(["type2", "type1", "control"], weights=[1, 3, 6])[0]
    labs = rng.random() < 0.6 if labs is None else labs
    involvement = {"control": rng.uniform(0.0, 4.0), "type1": rng.uniform(5.0, 35.0),
                   "type2": rng.uniform(30.0, 80.0)}[flag]
    ct = _scores(rng, flag, 0.6)
    cnn = _scores(rng, flag if rng.random() < 0.7 else "control", 0.5)
    cf = _scores(rng, flag, 0.7) if labs else None
    fused = _scores(rng, flag, 0.9) if labs else None
    left, right = rng.uniform(1500, 2600), rng.uniform(1700, 2900)
    q = QuantitativeCt(method="hu-bands/1", lungs=_lung(rng, involvement, left + right),
                       left=_lung(rng, involvement * rng.uniform(0.7, 1.2) % 100, left),
                       right=_lung(rng, involvement * rng.uniform(0.7, 1.2) % 100, right),
                       severity=severity(involvement),
                       slices_with_lung=rng.randint(40, 250), slice_spacing_mm=1.25)
    top = [derive_uid("synthetic-slice", str(n), str(i)) for i in range(10)]
    destinations = list(SR_DESTINATIONS[:more.choice([1, 1, 2])])
    return TriageResult(
        status="triaged", flag=flag, flag_general=flag, flag_sensitive=flag,
        threshold="general",
        scores=ModalityScores(ct=ct, ct_cnn=cnn, cf=cf, fused=fused),
        availability=Availability(ct=True, cf=labs, cf_reason=None if labs else
                                  "no lab values for the patient in the window",
                                  fusion="rule" if labs else "ct_only",
                                  ct_source="quantitative"),
        quantitative_ct=q, top_slices=top,
        lab_values=lab_values(more, flag, first) if labs else [],
        sr_sop_instance_uid=sr_instance_uid(series_uid, f"synthetic-{revision}"),
        supersedes_sr_sop_instance_uid=sr_instance_uid(series_uid, f"synthetic-{revision - 1}")
        if revision > 1 else None, sr_destinations=destinations, **base)


def lung_window_png(hu: np.ndarray, size: int = THUMB_SIZE) -> bytes:
    """A square PNG thumbnail of a slice in Hounsfield units, in the lung window."""
    centre, width = LUNG_WINDOW
    lo = centre - width / 2
    img = np.clip((hu.astype(np.float32) - lo) / width * 255.0, 0, 255).astype(np.uint8)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("PNG encoding failed")
    return bytes(buf)


def phantom_slice(rng: random.Random, involvement: float, size: int = 256) -> np.ndarray:
    """A chest-like slice in HU: body, two lungs, a few ground-glass blobs."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hu = np.full((size, size), -1000.0, np.float32)
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.5) / 0.36) ** 2 <= 1
    hu[body] = 40.0
    for cx in (0.32, 0.68):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.48) / 0.27) ** 2 <= 1
        hu[lung] = -860.0
    for _ in range(int(involvement / 8) + 1):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.7), rng.uniform(0.02, 0.06)
        blob = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        hu[blob & (hu < -500)] = -450.0
    return hu + rng.gauss(0, 15)


def make_evidence(result: TriageResult, *, slices: list[np.ndarray] | None = None,
                  seed: int = 0) -> EvidenceThumbnails:
    """The evidence set of ``result``: its ten top slices as lung-window thumbnails (of
    ``slices`` in HU when given, else of made-up phantoms)."""
    rng = random.Random(seed)
    measured = result.quantitative_ct.lungs.involvement_percent \
        if result.quantitative_ct is not None else None
    involvement = 10.0 if measured is None else measured
    uids = result.top_slices or [derive_uid("synthetic-slice", result.result_id, str(i))
                                 for i in range(10)]
    out = []
    for i, uid in enumerate(uids):
        hu = slices[i % len(slices)] if slices else phantom_slice(rng, involvement)
        png = lung_window_png(hu)
        out.append(EvidenceSlice(sop_instance_uid=uid, index=20 + 7 * i,
                                 score=round(rng.uniform(0.5, 0.99), 3),
                                 involvement_percent=round(min(100.0, involvement *
                                                               rng.uniform(0.6, 1.6)), 1),
                                 png_b64=base64.b64encode(png).decode(), width=THUMB_SIZE,
                                 height=THUMB_SIZE))
    return EvidenceThumbnails(result_id=result.result_id, revision=result.revision,
                              study_uid=result.study_uid, series_uid=result.series_uid,
                              window_center_hu=LUNG_WINDOW[0], window_width_hu=LUNG_WINDOW[1],
                              slices=out)


def publish_result(producer: Producer, result: TriageResult) -> None:
    """Send a result as the worker does (key StudyInstanceUID, schema header)."""
    producer.send(topics.TRIAGE_RESULTS, result.study_uid.encode(), dump_json(result),
                  [(topics.H_SCHEMA, result.schema_.encode()),
                   (topics.H_SERIES_UID, result.series_uid.encode())])


def publish_evidence(producer: Producer, evidence: EvidenceThumbnails) -> None:
    """Send an evidence set (key SeriesInstanceUID)."""
    producer.send(topics.TRIAGE_EVIDENCE, evidence.series_uid.encode(), dump_json(evidence),
                  [(topics.H_SCHEMA, evidence.schema_.encode())])
