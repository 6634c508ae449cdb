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


def test_version_1_results_are_read_as_version_2() -> None:
    from schemas.messages import TriageResult, TriageResultV1, parse_result
    from schemas.uids import result_id

    now = datetime.now(UTC)
    old = TriageResultV1(status="triaged", study_uid="1.2", series_uid="1.2.3", flag="type1",
                         flag_general="type1", threshold="general",
                         availability={"ct": True, "cf": False, "fusion": "ct_only"},
                         timings={"result_ready": now})
    raw = dump_json(old)
    assert b'"schema":"hust19.triage.result/1"' in raw
    new = parse_result(raw)
    assert isinstance(new, TriageResult) and new.schema_ == "hust19.triage.result/2"
    assert new.result_id == result_id("1.2.3") and new.revision == 1
    assert new.flag == "type1" and new.quantitative_ct is None
    assert new.availability is not None and new.availability.fusion == "ct_only"
    assert parse_result(dump_json(new)) == new
    with pytest.raises(ValidationError):
        parse_result(b'{"schema": "hust19.triage.result/9"}')
