"""LisClient against real databases (SQLite, PostgreSQL, MariaDB: the ``lis_url`` fixture) with
the real iCTCF data loaded by the product's own import."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
)

from agent.cli.commands.lis import import_ictcf
from agent.triage.lis import LabLookup, LisClient, lab_window
from agent.triage.lis_mapping import LisMapping
from schemas.errors import ConfigError, LisError
from schemas.features import by_code
from schemas.lis import LisPatient, LisResult, parse_range
from tests.fixtures.paths import REPO

EXAMPLE_MAPPING = REPO / "deploy" / "lis-mapping.example.toml"
SUBSET = 50
LIYUAN = ("777", "778")  # HUST-Liyuan patients: PA in mg/L (180-350), PDW in fl
STUDY = date(2020, 2, 10)


@pytest.fixture(scope="module")
def ictcf(shared_data: Path) -> Path:
    return shared_data / "ictcf"


@pytest.fixture(scope="module")
def loaded(module_lis_url: str, ictcf: Path) -> str:
    """The first 50 iCTCF patients (all Union Hospital) plus two Liyuan patients, imported by
    ``import_ictcf`` (once per database kind); DICOM PatientID "P002" is an alias of iCTCF
    patient 778."""
    with (ictcf / "patients.csv").open(newline="", encoding="utf-8") as fh:
        first = [r["patient_id"] for r in csv.DictReader(fh)][:SUBSET]
    stats = import_ictcf(ictcf, module_lis_url, patient_ids=[*first, *LIYUAN],
                         aliases={"P002": "778"})
    assert stats.patients == SUBSET + len(LIYUAN)
    return module_lis_url


@pytest.fixture
def client(loaded: str) -> Iterator[LisClient]:
    with LisClient(loaded) as c:
        yield c


def csv_rows(ictcf: Path, name: str, patient_id: str) -> list[dict[str, str]]:
    with (ictcf / name).open(newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r["patient_id"] == patient_id]


def count_results(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(LisResult)).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.parametrize("patient_id", ["1", "778"])
def test_lookup_returns_the_csv_values(client: LisClient, ictcf: Path, patient_id: str) -> None:
    lab = csv_rows(ictcf, "lab_results.csv", patient_id)
    assert len(lab) > 40
    found = client.lookup(patient_id, STUDY)
    assert found.patient_found and found.lis_patient_id == patient_id
    assert found.source == "reference schema"
    assert found.unknown_codes == [] and found.unit_mismatches == []
    assert found.undated == len(lab)  # iCTCF has no collection dates: all by fallback
    for row in lab:
        value = found.values[row["code"]]
        assert value.value == float(row["value"]), row
        assert value.qualifier == row["qualifier"]
        printed = parse_range(row["reference_range"])
        assert printed is not None
        assert (value.low, value.high) == (printed.low, printed.high)
        assert value.collected_at is None and value.lis_code == row["code"]
    patient = csv_rows(ictcf, "patients.csv", patient_id)[0]
    assert found.values["AGE"].value == float(patient["age"])
    assert found.values["GENDER"].value == (1.0 if patient["gender"] == "Male" else 0.0)
    assert found.values["UDIS"].value == (0.0 if patient["underlying_diseases"] == "No" else 1.0)
    if patient["body_temperature"]:
        assert found.values["TEMP"].value == float(patient["body_temperature"])
    assert set(found.values) <= set(by_code())


def test_censored_values_keep_their_qualifier(client: LisClient, loaded: str) -> None:
    pct = client.lookup("1").values["PCT"]
    assert (pct.qualifier, pct.value, pct.high, pct.unit) == ("<", 0.13, 0.5, "ng/ml")
    engine = create_engine(loaded)
    try:
        with engine.connect() as conn:
            raw = conn.execute(select(LisResult.value_raw).where(
                LisResult.patient_id == "1", LisResult.code == "PCT")).scalar_one()
    finally:
        engine.dispose()
    assert raw == "<0.13"  # stored as printed


def test_hospital_specific_ranges_and_units(client: LisClient) -> None:
    liyuan = client.lookup("778").values
    assert (liyuan["PA"].unit, liyuan["PA"].low, liyuan["PA"].high) == ("mg/L", 180.0, 350.0)
    assert liyuan["PA"].value == 96.5
    assert (liyuan["PDW"].unit, liyuan["PDW"].low, liyuan["PDW"].high) == ("fl", 9.0, 17.0)
    union = client.lookup("1").values
    assert (union["PDW"].unit, union["PDW"].low, union["PDW"].high) == ("%", 15.9, 17.2)


def test_alias_unknown_patient_and_idempotent_import(client: LisClient, loaded: str,
                                                     ictcf: Path) -> None:
    via_alias = client.lookup("P002")
    assert via_alias.lis_patient_id == "778"
    assert via_alias.values == client.lookup("778").values
    unknown = client.lookup("no-such-patient", STUDY)
    assert not unknown.patient_found and unknown.values == {} and unknown.lis_patient_id is None
    before = count_results(loaded)
    import_ictcf(ictcf, loaded, patient_ids=LIYUAN, aliases={"P002": "778"})
    assert count_results(loaded) == before
    expected = sum(len(csv_rows(ictcf, "lab_results.csv", p)) for p in LIYUAN)
    assert before > expected


EVIL_IDS = ("1' OR '1'='1", "1; DROP TABLE lis_result; --", "1\" OR \"\"=\"", "%",
            "1' UNION SELECT 1 --", "1'); DELETE FROM lis_patient; --")


def test_sql_injection_in_patient_id_is_harmless(client: LisClient, loaded: str) -> None:
    before = count_results(loaded)
    for evil in EVIL_IDS:
        got = client.lookup(evil)
        assert not got.patient_found and got.values == {}, evil
    assert count_results(loaded) == before
    assert client.lookup("1").patient_found


def _insert(url: str, table: Any, rows: list[dict[str, Any]]) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(table), rows)
    finally:
        engine.dispose()


def test_window_and_undated_policy(lis_url: str) -> None:
    at = datetime.combine(STUDY, datetime.min.time()) + timedelta(hours=9)
    with LisClient(lis_url, window_days=7) as client:
        client.create_schema()
        _insert(lis_url, LisPatient, [{"patient_id": "W1", "sex": "F",
                                      "birth_date": date(1960, 6, 15)}])
        _insert(lis_url, LisResult, [
            {"patient_id": "W1", "code": "CRP", "value": 10.0, "unit": "mg/L",
             "collected_at": at - timedelta(days=3)},
            {"patient_id": "W1", "code": "CRP", "value": 12.0, "unit": "mg/L",
             "collected_at": at - timedelta(days=1)},
            {"patient_id": "W1", "code": "CRP", "value": 99.0, "unit": "mg/L",
             "collected_at": at + timedelta(days=10)},
            {"patient_id": "W1", "code": "CRP", "value": 5.0, "unit": "mg/L",
             "collected_at": None},
            {"patient_id": "W1", "code": "ALT", "value": 30.0, "unit": "U/L",
             "collected_at": None},
        ])
        near = client.lookup("W1", STUDY)
        assert near.values["CRP"].value == 12.0
        assert near.values["CRP"].collected_at == (at - timedelta(days=1)).isoformat()
        assert near.values["ALT"].value == 30.0 and near.undated == 1
        assert near.window == lab_window(STUDY, 7)
        assert near.values["AGE"].value == 59.0 and near.values["GENDER"].value == 0.0
        far = client.lookup("W1", date(2030, 1, 1))
        assert far.values["CRP"].value == 5.0 and far.undated == 2
        no_date = client.lookup("W1")
        assert no_date.window == (None, None) and no_date.values["CRP"].value == 99.0
    ignore = replace(LisMapping.reference(), undated="ignore")
    with LisClient(lis_url, ignore) as strict:
        got = strict.lookup("W1", STUDY)
        assert "ALT" not in got.values and got.undated == 0 and got.values["CRP"].value == 12.0


def _hospital_tables(url: str) -> None:
    """The hospital's own LIS tables used by deploy/lis-mapping.example.toml."""
    meta = MetaData()
    lab = Table("hosp_lab", meta, Column("id", Integer, primary_key=True),
                Column("mrn", String(20)), Column("test_code", String(20)),
                Column("result_num", Double), Column("units", String(20)),
                Column("ref_text", String(40)), Column("taken", DateTime))
    patients = Table("hosp_patient", meta, Column("mrn", String(20), primary_key=True),
                     Column("sex", String(1)), Column("birth_date", Date))
    engine = create_engine(url)
    try:
        meta.create_all(engine)
    finally:
        engine.dispose()
    at = datetime(2020, 2, 9, 8, 30)
    _insert(url, patients, [{"mrn": "H-001", "sex": "F", "birth_date": date(1960, 6, 15)}])
    _insert(url, lab, [
        {"mrn": "H-001", "test_code": "HB", "result_num": 135.0, "units": "g/L",
         "ref_text": "115-150 g/L", "taken": at},
        {"mrn": "H-001", "test_code": "HB", "result_num": 120.0, "units": "g/L",
         "ref_text": "115-150 g/L", "taken": at - timedelta(days=4)},
        {"mrn": "H-001", "test_code": "HB", "result_num": 99.0, "units": "g/L",
         "ref_text": "115-150 g/L", "taken": at - timedelta(days=20)},
        {"mrn": "H-001", "test_code": "WBC#", "result_num": 6.1, "units": "G/L",
         "ref_text": None, "taken": at},
        {"mrn": "H-001", "test_code": "PREALB", "result_num": 250.0, "units": "mg/L",
         "ref_text": None, "taken": at},
        {"mrn": "H-001", "test_code": "ZZZ", "result_num": 1.0, "units": "x",
         "ref_text": None, "taken": at},
        {"mrn": "H-002", "test_code": "HB", "result_num": 140.0, "units": "g/L",
         "ref_text": None, "taken": at},
    ])


def _check_hospital_lookup(got: LabLookup) -> None:
    assert got.patient_found
    hgb = got.values["HGB"]
    assert (hgb.value, hgb.lis_code, hgb.low, hgb.high) == (135.0, "HB", 115.0, 150.0)
    assert hgb.collected_at == datetime(2020, 2, 9, 8, 30).isoformat()
    wbc = got.values["WBC"]
    assert (wbc.value, wbc.unit, wbc.low, wbc.high) == (6.1, "G/L", None, None)
    assert "PA" not in got.values
    assert got.unit_mismatches == ["PREALB->PA: unit 'mg/L' != catalogue 'g/L', "
                                   "no printed range"]
    assert got.unknown_codes == ["ZZZ"]
    assert got.values["AGE"].value == 59.0 and got.values["GENDER"].value == 0.0
    assert got.undated == 0


def test_custom_query_mapping_over_hospital_tables(lis_url: str) -> None:
    _hospital_tables(lis_url)
    mapping = LisMapping.load(EXAMPLE_MAPPING)
    with LisClient(lis_url, mapping) as client:
        got = client.lookup("H-001", STUDY)
        assert got.source == "custom query"
        _check_hospital_lookup(got)
        assert not client.lookup("nobody", STUDY).patient_found


def test_custom_tables_mapping(lis_url: str) -> None:
    _hospital_tables(lis_url)
    mapping = LisMapping.from_dict({
        "results": {"table": "hosp_lab", "patient_id": "mrn", "code": "test_code",
                    "value": "result_num", "unit": "units", "reference_range": "ref_text",
                    "collected_at": "taken", "row_id": "id"},
        "patients": {"table": "hosp_patient", "patient_id": "mrn", "sex": "sex",
                     "birth_date": "birth_date"},
        "codes": {"HB": "HGB", "WBC#": "WBC", "PREALB": "PA"},
    })
    with LisClient(lis_url, mapping) as client:
        got = client.lookup("H-001", STUDY)
        assert got.source == "custom tables"
        _check_hospital_lookup(got)


def test_bad_custom_query_is_a_lis_error(sqlite_url: str) -> None:
    mapping = LisMapping.from_dict({"query": "SELECT code, value FROM no_such_table "
                                             "WHERE mrn = :patient_id"})
    with LisClient(sqlite_url, mapping) as client, \
            pytest.raises(LisError, match=r"lab lookup failed: .*no_such_table"):
        client.lookup("1")


@pytest.mark.parametrize("url", ["postgresql://nobody:s3cret@127.0.0.1:1/none",
                                 "mysql://nobody:s3cret@127.0.0.1:1/none"])
def test_unreachable_lis_fails_fast_without_password(url: str) -> None:
    with LisClient(url) as client:
        for call in (lambda: client.lookup("1", STUDY), client.ping):
            started = time.monotonic()
            with pytest.raises(LisError) as info:
                call()
            assert time.monotonic() - started < 5.0
            assert "s3cret" not in info.value.message
            assert "nobody:***@127.0.0.1:1/none" in info.value.message


def test_missing_reference_schema_is_a_lis_error(sqlite_url: str) -> None:
    with LisClient(sqlite_url) as client, pytest.raises(LisError, match="lis_"):
        client.lookup("1")


@pytest.mark.parametrize(("doc", "message"), [
    ({"query": "SELECT code, value FROM t WHERE a = :patient_id AND b = :other"},
     "unknown bound parameters :other"),
    ({"query": "SELECT code, value FROM t"}, "must use the bound parameter :patient_id"),
    ({"query": "SELECT 1 WHERE x = :patient_id", "codes": {"X": "NOT_A_CODE"}},
     "not catalogue codes: X = NOT_A_CODE"),
    ({}, "either \\[results\\]"),
    ({"query": "SELECT 1 WHERE x = :patient_id", "undated": "maybe"}, "undated"),
    ({"results": {"table": "t", "patient_id": "p", "code": "c"}}, "value"),
    ({"results": {"table": "t", "patient_id": "p", "code": "c", "value": "v", "bogus": "x"}},
     "unknown keys bogus"),
])
def test_mapping_validation(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LisMapping.from_dict(doc)


def test_bad_url_is_a_lis_error() -> None:
    with pytest.raises(LisError, match="not a SQLAlchemy URL"):
        LisClient("not a url at all")


@pytest.mark.slow
def test_full_ictcf_import_into_postgresql(postgres_url: str, ictcf: Path) -> None:
    """The whole export (1,276 patients, 61,000 results); prints the time it took."""
    stats = import_ictcf(ictcf, postgres_url)
    assert (stats.patients, stats.results) == (1276, 61000)
    assert count_results(postgres_url) == 61000
    print(f"full iCTCF import into PostgreSQL: {stats.seconds:.2f} s")


def test_cf_inputs_equal_the_training_loader(client: LisClient, loaded: str,
                                             ictcf: Path) -> None:
    """What the LIS path gives ``engines.cf.vectorise`` equals what the CF model was trained
    on (``engines.ictcf`` reading the CSV files), for every imported patient."""
    import numpy as np

    from engines.cf import vectorise
    from engines.ictcf import load_cohort

    engine = create_engine(loaded)
    try:
        with engine.connect() as conn:
            ids = set(conn.execute(select(LisPatient.patient_id)).scalars())
    finally:
        engine.dispose()
    cohort = [p for p in load_cohort(ictcf).patients if p.patient_id in ids]
    assert len(cohort) == SUBSET + len(LIYUAN)
    for patient in cohort:
        got = vectorise(client.lookup(patient.patient_id, STUDY).values)
        assert np.array_equal(got, vectorise(patient.values)), patient.patient_id
