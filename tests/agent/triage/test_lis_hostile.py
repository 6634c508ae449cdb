"""The LIS custom ``query`` path against hostile input (issue 20), on real databases (SQLite
and PostgreSQL through the ``lis_url`` fixture):

* the Patient ID comes from a DICOM header any sender writes: SQL in it, NUL bytes, a
  megabyte of it, odd Unicode; it is only ever a bound parameter, so it matches nobody and
  changes nothing, and where a database refuses it the answer is a LisError, never another
  exception;
* the rows the hospital's query returns: values that are not finite numbers (NaN, inf,
  1e999), text, bytes, garbage dates and ranges, missing codes; each is dropped (and named)
  or used, never a crash and never a NaN in the CF vector."""

from __future__ import annotations

import math
from datetime import date

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, text

from agent.triage.lis import LisClient
from agent.triage.lis_mapping import LisMapping
from schemas.errors import LisError

STUDY = date(2020, 2, 10)
QUERY = ("SELECT test_code AS code, result AS value, units AS unit, ref AS reference_range, "
         "taken AS collected_at FROM hostile_lab WHERE mrn = :patient_id")
HOSTILE_IDS = (
    "x' OR '1'='1",
    "'; DROP TABLE hostile_lab; --",
    "H-001' --",
    "H-001\\",
    "%",
    "H-001" + "\u202e" + "evil",
    "\u0000H-001",
    "A" * (1 << 20),
)


def _tables(url: str) -> None:
    engine = create_engine(url)
    meta = MetaData()
    lab = Table("hostile_lab", meta, Column("id", Integer, primary_key=True),
                Column("mrn", String(64)), Column("test_code", String(32)),
                Column("result", String(64)), Column("units", String(32)),
                Column("ref", String(64)), Column("taken", String(64)))
    meta.drop_all(engine)
    meta.create_all(engine)
    rows = [
        ("H-001", "WBC", "6.1", "G/L", "3.5-9.5", "2020-02-09 08:00:00"),
        ("H-001", "HGB", "NaN", "g/L", "130-175", "2020-02-09 08:00:00"),
        ("H-001", "PLT", "inf", "G/L", "125-350", "2020-02-09 08:00:00"),
        ("H-001", "CRP", "1e999", "mg/L", "0-10", "2020-02-09 08:00:00"),
        ("H-001", "LY", "-", "G/L", "1.1-3.2", "2020-02-09 08:00:00"),
        ("H-001", "MO", "0.4", "G/L", "garbage range", "not a date"),
        ("H-001", None, "1.0", "G/L", None, None),
        ("H-001", "ALB", "<0.1", "g/L", "40-55", "2020-02-09 08:00:00"),
        ("OTHER", "WBC", "99", "G/L", "3.5-9.5", "2020-02-09 08:00:00"),
    ]
    with engine.begin() as conn:
        conn.execute(insert(lab), [dict(zip(("mrn", "test_code", "result", "units", "ref",
                                             "taken"), r, strict=True)) for r in rows])
    engine.dispose()


def _client(url: str) -> LisClient:
    return LisClient(url, LisMapping.from_dict({"query": QUERY}))


def _count(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as conn:
        n = int(conn.execute(text("SELECT count(*) FROM hostile_lab")).scalar_one())
    engine.dispose()
    return n


@pytest.mark.parametrize("patient_id", HOSTILE_IDS, ids=lambda p: repr(p[:24]))
def test_a_hostile_patient_id_is_only_ever_a_bound_parameter(lis_url: str,
                                                             patient_id: str) -> None:
    _tables(lis_url)
    with _client(lis_url) as client:
        try:
            got = client.lookup(patient_id, STUDY)
        except LisError as exc:  # a database may refuse the value itself (PostgreSQL: NUL)
            assert "NUL" in exc.message or "null" in exc.message.lower(), exc.message
        else:
            assert not got.patient_found and got.values == {}
    assert _count(lis_url) == 9  # nothing dropped, nothing changed


def test_hostile_values_from_the_query_are_dropped_or_used_never_a_crash(
        lis_url: str) -> None:
    _tables(lis_url)
    with _client(lis_url) as client:
        got = client.lookup("H-001", STUDY)
    assert got.patient_found
    assert all(math.isfinite(v.value) for v in got.values.values()), got.values
    assert got.values["WBC"].value == 6.1
    assert got.values["ALB"].value == 0.1 and got.values["ALB"].qualifier == "<"
    for dropped in ("HGB", "PLT", "CRP", "LY"):
        assert dropped not in got.values, dropped
    named = " ".join(got.non_numeric)
    assert all(f"{code}: " in named for code in ("HGB", "PLT", "CRP", "LY")), named
    assert got.unknown_codes == [""]  # the row without a code, named as unknown
    # a collection time that is not a date costs that row only, named
    assert "MO" not in got.values
    assert got.unreadable == ["MO: LIS collection time 'not a date' is not a date/time"]
    with _client(lis_url) as client:  # the CF vector stays finite
        from engines.cf import vectorise

        assert all(math.isfinite(x) for x in vectorise(client.lookup("H-001", STUDY).values))


def test_a_query_that_fails_on_hostile_data_is_a_lis_error(sqlite_url: str) -> None:
    _tables(sqlite_url)
    mapping = LisMapping.from_dict({"query": "SELECT test_code AS code, 1 / 0 AS value, "
                                             "abs(-9223372036854775808) AS unit FROM "
                                             "hostile_lab WHERE mrn = :patient_id"})
    with LisClient(sqlite_url, mapping) as client, pytest.raises(LisError, match="overflow"):
        client.lookup("H-001", STUDY)


def test_a_hostile_patient_query_row_costs_only_what_is_unreadable(lis_url: str) -> None:
    _tables(lis_url)
    engine = create_engine(lis_url)
    meta = MetaData()
    patients = Table("hostile_patient", meta, Column("mrn", String(64), primary_key=True),
                     Column("sex", String(16)), Column("born", String(32)),
                     Column("age", String(16)), Column("temp", String(16)))
    meta.drop_all(engine)
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(patients), [{"mrn": "H-001", "sex": "M'; --", "born": "yesterday",
                                         "age": "61", "temp": "NaN"}])
    engine.dispose()
    mapping = LisMapping.from_dict({
        "query": QUERY,
        "patient_query": "SELECT sex, born AS birth_date, age, temp AS body_temperature "
                         "FROM hostile_patient WHERE mrn = :patient_id"})
    with LisClient(lis_url, mapping) as client:
        got = client.lookup("H-001", STUDY)
    assert got.values["AGE"].value == 61.0  # from the age column: the birth date is garbage
    assert "TEMP" not in got.values  # NaN is not a temperature
    assert "GENDER" not in got.values  # neither male nor female
    assert got.unreadable[-1] == "birth_date: LIS birth date 'yesterday' is not a date"
