"""The checked-in JSON Schema files are exactly what the message models generate."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas import generate
from schemas.messages import SeriesEvent, dump_json


def test_json_schema_files_match_models() -> None:
    for fname, text in generate.render().items():
        path = generate.SCHEMA_DIR / fname
        assert path.is_file(), f"{fname} missing: run python -m schemas.generate"
        assert path.read_text() == text, f"{fname} drifted: run python -m schemas.generate"


def test_series_event_round_trip_and_validation() -> None:
    now = datetime.now(UTC)
    ev = SeriesEvent(study_uid="1.2", series_uid="1.2.3", instance_count=3,
                     first_received_at=now, last_received_at=now, completed_at=now,
                     reason="max_quiet")
    raw = dump_json(ev)
    assert b'"schema":"hust19.dicom.series/1"' in raw
    assert SeriesEvent.model_validate_json(raw) == ev
    with pytest.raises(ValidationError):
        SeriesEvent(study_uid="1.2", series_uid="1.2.3", instance_count=0,
                    first_received_at=now, last_received_at=now, completed_at=now,
                    reason="max_quiet")
