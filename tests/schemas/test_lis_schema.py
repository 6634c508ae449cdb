"""The reference LIS schema on real databases, and the printed-range / value / unit parsing."""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, inspect, select

from schemas.lis import (
    ALIAS_TABLE,
    PATIENT_TABLE,
    RESULT_TABLE,
    LisBase,
    LisPatient,
    LisResult,
    PrintedRange,
    canonical_unit,
    parse_range,
    parse_value,
)


def test_every_printed_ictcf_range_parses(shared_data: Path) -> None:
    """Each hospital's printed range (reference_ranges.csv) parses to the bounds and unit the
    data README lists for it."""
    with (shared_data / "ictcf" / "reference_ranges.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) > 150
    for row in rows:
        got = parse_range(row["reference_range"])
        low = float(row["normal_low"]) if row["normal_low"] else None
        high = float(row["normal_high"]) if row["normal_high"] else None
        assert got is not None, row
        assert (got.high, got.unit) == (high, row["unit"]), row
        if got.low is not None or low is not None:
            assert got.low == low, row


@pytest.mark.parametrize(("text", "expected"), [
    ("180-350 mg/L", PrintedRange(180.0, 350.0, "mg/L")),
    ("<0.5 mg/L FEU", PrintedRange(None, 0.5, "mg/L FEU")),
    ("0.41-2.72", PrintedRange(0.41, 2.72, "")),
    (">60 mL/min", PrintedRange(60.0, None, "mL/min")),
    ("≤ 5 U/L", PrintedRange(None, 5.0, "U/L")),
    ("negative", None),
    ("", None),
    (None, None),
])
def test_parse_range(text: str | None, expected: PrintedRange | None) -> None:
    assert parse_range(text) == expected


def test_parse_value_and_units() -> None:
    assert parse_value("<0.13") == ("<", 0.13)
    assert parse_value(">8.00") == (">", 8.0)
    assert parse_value("-0.17") == ("", -0.17)
    assert parse_value("negative") is None and parse_value(None) is None
    assert canonical_unit("μmol/L") == canonical_unit("umol/l") == canonical_unit("µmol/L")
    assert canonical_unit("G/L") != canonical_unit("g/L")
    assert canonical_unit("g/l") == canonical_unit("g/L")
    assert canonical_unit(None) == canonical_unit("") == ""


def test_schema_on_each_database(lis_url: str) -> None:
    engine = create_engine(lis_url)
    try:
        LisBase.metadata.create_all(engine)
        LisBase.metadata.create_all(engine)  # idempotent
        insp = inspect(engine)
        assert {PATIENT_TABLE, RESULT_TABLE, ALIAS_TABLE} <= set(insp.get_table_names())
        indexes = {ix["name"]: ix["column_names"] for ix in insp.get_indexes(RESULT_TABLE)}
        assert indexes["ix_lis_result_patient_code_time"] == ["patient_id", "code",
                                                             "collected_at"]
        precise = 0.1234567890123
        when = datetime(2020, 2, 9, 8, 30, 15)
        with engine.begin() as conn:
            conn.execute(insert(LisPatient), [{"patient_id": "p1", "sex": "M"}])
            conn.execute(insert(LisResult), [{"patient_id": "p1", "code": "CRP",
                                              "value_raw": "<0.13", "qualifier": "<",
                                              "value": precise, "collected_at": when}])
        with engine.connect() as conn:
            row = conn.execute(select(LisResult)).one()
        # double precision everywhere (a MySQL FLOAT would lose digits)
        assert (row.value, row.value_raw, row.collected_at) == (precise, "<0.13", when)
    finally:
        engine.dispose()
