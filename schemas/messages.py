"""Message schemas of every topic, as code. JSON Schema files in ``schemas/json/`` are
generated from these models (``python -m schemas.generate``) and a test fails when they drift.

Every message carries a ``schema`` field naming its type and version. A change to a model is a
new version; readers accept every version they know.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.uids import result_id

INSTANCE_SCHEMA: Final = "hust19.dicom.instance/1"
SERIES_SCHEMA: Final = "hust19.dicom.series/1"
RESULT_SCHEMA_V1: Final = "hust19.triage.result/1"
RESULT_SCHEMA: Final = "hust19.triage.result/2"
DLQ_SCHEMA: Final = "hust19.triage.dlq/1"
EVIDENCE_SCHEMA: Final = "hust19.triage.evidence/1"

Flag = Literal["control", "type1", "type2"]
Threshold = Literal["general", "sensitive"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InstanceHeaders(_Message):
    """Headers of a ``dicom.instances`` message; the value is the Part-10 file, byte for byte
    as received (no transcoding)."""

    schema_: Literal["hust19.dicom.instance/1"] = Field(INSTANCE_SCHEMA, alias="schema")
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    received_at: datetime


class SeriesEvent(_Message):
    """A series went quiet and is considered complete (DICOM has no end-of-series signal).

    ``generation`` counts completions of the same series: a late instance reopens the series
    and a later event with a higher generation and the new count follows.
    """

    schema_: Literal["hust19.dicom.series/1"] = Field(SERIES_SCHEMA, alias="schema")
    study_uid: str
    series_uid: str
    instance_count: int = Field(ge=1)
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime
    reason: Literal["quiet_after_release", "max_quiet", "shutdown"]
    generation: int = Field(1, ge=1)
    patient_id: str | None = None
    accession_number: str | None = None
    modality: str | None = None


class ClassScores(_Message):
    """Probabilities of the three patient classes (they sum to 1)."""

    control: float = Field(ge=0.0, le=1.0)
    type1: float = Field(ge=0.0, le=1.0)
    type2: float = Field(ge=0.0, le=1.0)


class ModalityScoresV1(_Message):
    """Per-modality scores of a version-1 result."""

    ct: ClassScores | None = None
    cf: ClassScores | None = None
    fused: ClassScores | None = None


class ModalityScores(_Message):
    """Per-modality scores; ``None`` where that modality was not available.

    ``ct`` is the CT side that went into the flag (``Availability.ct_source`` says which
    model gave it); ``ct_cnn`` is the HUST-19 patient CNN's output, always reported beside it
    when the CNN ran, whether or not it decided."""

    ct: ClassScores | None = None
    ct_cnn: ClassScores | None = None
    cf: ClassScores | None = None
    fused: ClassScores | None = None


class AvailabilityV1(_Message):
    """Which modalities went into the flag (version-1 result)."""

    ct: bool
    cf: bool
    ct_reason: str | None = None
    cf_reason: str | None = None
    fusion: Literal["plr", "ct_only", "cf_only", "none"]


class Availability(_Message):
    """Which modalities went into the flag, and why one is missing.

    ``fusion`` names the rule that combined them (``rule``: the stated default, CF decides
    COVID-19 and CT the severity; ``plr``: the paper's penalised logistic regression fitted on
    paired data), or the single modality used. ``ct_source`` is the model behind the CT
    scores: ``quantitative`` (lung involvement in HU) or ``patient_cnn``."""

    ct: bool
    cf: bool
    ct_reason: str | None = None
    cf_reason: str | None = None
    fusion: Literal["rule", "plr", "ct_only", "cf_only", "none"]
    ct_source: Literal["quantitative", "patient_cnn"] | None = None


class LungMeasurements(_Message):
    """Quantitative CT of one lung, or of both: volume and the share of each density pattern.

    Percentages are of this lung's volume. ``involvement_percent`` is ground glass plus
    consolidation that belongs to opacities (vessels, airway walls and lung surfaces
    suppressed; ``docs/models/quantitative.md`` has the bands and their sources). A figure is
    None when the series cannot give it: no volume when the series does not cover the whole
    lung or has gaps, no pattern shares when the slices are too thick (``QuantitativeCt``
    ``warnings`` says which)."""

    volume_ml: float | None = Field(None, ge=0.0)
    mean_hu: float | None = None
    well_aerated_percent: float | None = Field(None, ge=0.0, le=100.0)
    ground_glass_percent: float | None = Field(None, ge=0.0, le=100.0)
    consolidation_percent: float | None = Field(None, ge=0.0, le=100.0)
    involvement_percent: float | None = Field(None, ge=0.0, le=100.0)


class QuantitativeCt(_Message):
    """Quantitative lung CT of the series in Hounsfield units.

    ``severity`` is the CT severity category of the involvement (CT-0 none, CT-1 < 25 %,
    CT-2 25-50 %, CT-3 50-75 %, CT-4 >= 75 %), None when involvement was not measured;
    ``warnings`` name what limits the numbers (gaps, partial coverage, thick slices)."""

    method: str
    lungs: LungMeasurements
    right: LungMeasurements | None = None
    left: LungMeasurements | None = None
    severity: Literal["CT-0", "CT-1", "CT-2", "CT-3", "CT-4"] | None = None
    slices_with_lung: int = Field(ge=0)
    slice_spacing_mm: float | None = None
    warnings: list[str] = Field(default_factory=list)


class LabResult(_Message):
    """One lab value that went into the clinical-feature model, as the LIS gave it."""

    code: str = Field(description="catalogue code (schemas/clinical_features.json)")
    value: float | None = None
    unit: str | None = None
    qualifier: str = Field("", description="'<' or '>' for a censored result, else empty")
    low: float | None = Field(None, description="reference range printed with the result")
    high: float | None = None
    lis_code: str | None = None
    collected_at: str | None = None


class Timings(_Message):
    """When things happened, as UTC timestamps."""

    first_instance_received: datetime | None = None
    last_instance_received: datetime | None = None
    series_complete: datetime | None = None
    result_ready: datetime


class TriageResultV1(_Message):
    """A version-1 ``triage.results`` message, as agents before the quantitative CT wrote it.
    Read by :func:`parse_result`, which upgrades it to :class:`TriageResult`."""

    schema_: Literal["hust19.triage.result/1"] = Field(RESULT_SCHEMA_V1, alias="schema")
    status: Literal["triaged", "skipped"]
    skip_reason: str | None = None
    study_uid: str
    series_uid: str
    patient_id: str | None = None
    accession_number: str | None = None
    flag: Flag | None = None
    flag_general: Flag | None = None
    flag_sensitive: Flag | None = None
    threshold: Threshold | None = None
    scores: ModalityScoresV1 = ModalityScoresV1()
    availability: AvailabilityV1 | None = None
    instance_count: int = 0
    top_slices: list[str] = Field(default_factory=list)
    sr_sop_instance_uid: str | None = None
    model_versions: dict[str, str] = Field(default_factory=dict)
    timings: Timings
    generation: int = 1


class TriageResult(_Message):
    """A ``triage.results`` message (key = StudyInstanceUID), version 2.

    ``status`` is ``triaged`` with a flag, or ``skipped`` with ``skip_reason`` for series the
    method does not apply to (not CT, a localizer, too few slices, no lungs in view).

    ``result_id`` is the same for every result about one series; ``revision`` grows when a
    result with other content replaces an earlier one (labs arrived, more instances, other
    models). Consumers keep, per ``result_id``, the highest revision; a redelivered message
    repeats a revision they already have. ``supersedes_sr_sop_instance_uid`` names the SR the
    new one replaces at the PACS.

    Version 2 adds ``result_id``, ``revision``, ``supersedes_sr_sop_instance_uid``,
    ``quantitative_ct``, ``scores.ct_cnn``, ``availability.ct_source``, the fusion ``rule``,
    ``patient_name``, ``study_date``, ``lab_values`` and ``sr_destinations``.
    """

    schema_: Literal["hust19.triage.result/2"] = Field(RESULT_SCHEMA, alias="schema")
    result_id: str
    revision: int = Field(1, ge=1)
    status: Literal["triaged", "skipped"]
    skip_reason: str | None = None
    study_uid: str
    series_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = Field(None, description="Study Date as the images give it "
                                   "(YYYYMMDD)")
    accession_number: str | None = None
    flag: Flag | None = None
    flag_general: Flag | None = None
    flag_sensitive: Flag | None = None
    threshold: Threshold | None = None
    scores: ModalityScores = ModalityScores()
    availability: Availability | None = None
    quantitative_ct: QuantitativeCt | None = None
    lab_values: list[LabResult] = Field(default_factory=list, description="the lab values "
                                        "that went into the clinical-feature model")
    instance_count: int = 0
    top_slices: list[str] = Field(default_factory=list, description="SOP Instance UIDs of the "
                                  "top-10 evidence slices, in slice order")
    sr_sop_instance_uid: str | None = None
    supersedes_sr_sop_instance_uid: str | None = None
    sr_destinations: list[str] = Field(default_factory=list, description="the PACS the SR was "
                                       "queued for, AET@HOST:PORT")
    model_versions: dict[str, str] = Field(default_factory=dict)
    timings: Timings
    generation: int = 1


class EvidenceSlice(_Message):
    """One evidence slice as a small lung-window thumbnail (PNG, base64)."""

    sop_instance_uid: str
    index: int = Field(ge=0, description="position in slice order, 0 = most cranial")
    score: float = Field(ge=0.0, le=1.0, description="the slice evidence score")
    involvement_percent: float | None = Field(None, ge=0.0, le=100.0)
    png_b64: str
    width: int = Field(ge=1)
    height: int = Field(ge=1)


class EvidenceThumbnails(_Message):
    """A ``triage.evidence`` message (key = SeriesInstanceUID): the evidence slices of one
    result as thumbnails in the lung window, so that a dashboard can show them without
    reaching into the PACS. It carries pixel data of the patient (PHI), like the other
    topics."""

    schema_: Literal["hust19.triage.evidence/1"] = Field(EVIDENCE_SCHEMA, alias="schema")
    result_id: str
    revision: int = Field(1, ge=1)
    study_uid: str
    series_uid: str
    window_center_hu: float
    window_width_hu: float
    slices: list[EvidenceSlice]


class DeadLetter(_Message):
    """A ``triage.dlq`` message: what could not be processed, why, and the original message."""

    schema_: Literal["hust19.triage.dlq/1"] = Field(DLQ_SCHEMA, alias="schema")
    reason: str
    error_type: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    value_b64: str = Field(description="the original message value, base64")
    study_uid: str | None = None
    series_uid: str | None = None
    failed_at: datetime


ALL_MESSAGES: dict[str, type[_Message]] = {
    "dicom.instance": InstanceHeaders,
    "dicom.series": SeriesEvent,
    "triage.result.v1": TriageResultV1,
    "triage.result": TriageResult,
    "triage.evidence": EvidenceThumbnails,
    "triage.dlq": DeadLetter,
}


def upgrade_result(old: TriageResultV1) -> TriageResult:
    """A version-1 result as version 2: ``result_id`` derived from the series UID (the rule
    the agent uses), revision 1, no quantitative CT; the v1 ``fusion`` names carry over."""
    data = old.model_dump(by_alias=False, exclude={"schema_"})
    return TriageResult(result_id=result_id(old.series_uid), **data)


def parse_result(raw: bytes | str) -> TriageResult:
    """Read a ``triage.results`` message of any known version as a version-2 result.

    Raises ``pydantic.ValidationError`` for a message that is neither version."""
    doc = json.loads(raw)
    if isinstance(doc, dict) and doc.get("schema") == RESULT_SCHEMA_V1:
        return upgrade_result(TriageResultV1.model_validate(doc))
    return TriageResult.model_validate(doc)


def dump_json(message: _Message) -> bytes:
    """Serialise a message to UTF-8 JSON bytes with the ``schema`` field spelled as such."""
    return message.model_dump_json(by_alias=True).encode()
