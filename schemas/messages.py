"""Message schemas of every topic, as code. JSON Schema files in ``schemas/json/`` are
generated from these models (``python -m schemas.generate``) and a test fails when they drift.

Every message carries a ``schema`` field naming its type and version. A change to a model is a
new version; readers accept every version they know.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

INSTANCE_SCHEMA: Final = "hust19.dicom.instance/1"
SERIES_SCHEMA: Final = "hust19.dicom.series/1"
RESULT_SCHEMA: Final = "hust19.triage.result/1"
DLQ_SCHEMA: Final = "hust19.triage.dlq/1"

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


class ModalityScores(_Message):
    """Per-modality scores; ``None`` where that modality was not available."""

    ct: ClassScores | None = None
    cf: ClassScores | None = None
    fused: ClassScores | None = None


class Availability(_Message):
    """Which modalities went into the flag, and why one is missing."""

    ct: bool
    cf: bool
    ct_reason: str | None = None
    cf_reason: str | None = None
    fusion: Literal["plr", "ct_only", "cf_only", "none"]


class Timings(_Message):
    """When things happened, as UTC timestamps."""

    first_instance_received: datetime | None = None
    last_instance_received: datetime | None = None
    series_complete: datetime | None = None
    result_ready: datetime


class TriageResult(_Message):
    """A ``triage.results`` message (key = StudyInstanceUID).

    ``status`` is ``triaged`` with a flag, or ``skipped`` with ``skip_reason`` for series the
    method does not apply to (not CT, a localizer, too few slices)."""

    schema_: Literal["hust19.triage.result/1"] = Field(RESULT_SCHEMA, alias="schema")
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
    scores: ModalityScores = ModalityScores()
    availability: Availability | None = None
    instance_count: int = 0
    top_slices: list[str] = Field(default_factory=list, description="SOP Instance UIDs of the "
                                  "top-10 pCT evidence slices, in slice order")
    sr_sop_instance_uid: str | None = None
    model_versions: dict[str, str] = Field(default_factory=dict)
    timings: Timings
    generation: int = 1


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
    "triage.result": TriageResult,
    "triage.dlq": DeadLetter,
}


def dump_json(message: _Message) -> bytes:
    """Serialise a message to UTF-8 JSON bytes with the ``schema`` field spelled as such."""
    return message.model_dump_json(by_alias=True).encode()
