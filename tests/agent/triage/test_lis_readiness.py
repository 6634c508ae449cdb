"""Honest LIS readiness (issue 17, item 4): a fresh data dir gets an empty SQLite LIS with the
reference schema (no "no such table" at every study); ``hust19 doctor``, ``hust19 lis ping``
and ``/readyz`` tell a LIS without its tables (a failure), an empty one (a warning that says
how to fill it) and a filled one apart, on SQLite, PostgreSQL and MariaDB; doctor in an empty
folder creates nothing and does not claim that everything is in place. The CLI runs as a
subprocess (``python -m agent.cli``)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from agent.app import ALL_ROLES, ROLE_WORKER, Agent
from agent.cli.commands.lis import import_ictcf
from agent.config import Settings
from agent.triage.lis import open_lis
from schemas import topics
from schemas.lis import ALIAS_TABLE, PATIENT_TABLE, RESULT_TABLE
from schemas.messages import TriageResult
from tests.fixtures.dicom import SAMPLE, free_port, read_topic, run_storescu
from tests.fixtures.faults import readyz

pytestmark = pytest.mark.slow

REFERENCE_TABLES = {PATIENT_TABLE, RESULT_TABLE, ALIAS_TABLE}
FILL = "hust19 lis import-ictcf"
WAIT_S = 90.0


def hust19(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def doctor_lis(url: str, data_dir: Path) -> dict[str, str]:
    """doctor's LIS finding (``--json``)."""
    proc = hust19("doctor", "--json", "--data-dir", data_dir, "--lis", url)
    findings = {f["check"]: f for f in map(json.loads, proc.stdout.splitlines())}
    assert "lis" in findings, proc.stdout + proc.stderr
    return findings["lis"]


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_doctor_in_an_empty_folder_creates_nothing_and_says_what_is_missing(
        tmp_path: Path) -> None:
    proc = hust19("doctor", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == [], "doctor only looks"
    out = proc.stdout
    data = tmp_path / "hust19-data"
    assert "[ ok ] bus: no embedded bus log yet at hust19-data/bus" in out
    assert (f"[warn] lis: no LIS yet at {data / 'lis.sqlite'}: hust19 serve creates it with "
            "the reference schema at its first start") in out
    assert f"{FILL} ICTCF_FOLDER --lis sqlite:///{data / 'lis.sqlite'}" in out
    assert "Everything needed is in place" not in out
    assert out.rstrip().splitlines()[-1].startswith("No problem stops the agent; read the ")


def test_a_fresh_data_dir_gets_an_empty_sqlite_lis_with_its_schema(tmp_path: Path,
                                                                    shared_data: Path) -> None:
    settings = Settings(data_dir=tmp_path / "new" / "data")
    client = open_lis(settings)  # the agent's start
    try:
        assert client.sqlite_path == (tmp_path / "new" / "data" / "lis.sqlite").resolve()
        assert tables(settings.lis_url) >= REFERENCE_TABLES
        lookup = client.lookup("P002")  # "no such table" before
        assert not lookup.patient_found and lookup.values == {}
        status = client.ping()
        assert status.has_data is False and status.warning is not None
        assert "holds no patient" in status.warning and FILL in status.warning
        import_ictcf(shared_data / "ictcf", settings.lis_url, limit=2)
        assert client.ping().warning is None and client.ping().has_data
    finally:
        client.close()


def _bare_database(kind: str, url: str) -> None:
    """A database that exists but has no tables (a SQLite file made by hand)."""
    if kind == "sqlite":
        sqlite3.connect(url.removeprefix("sqlite:///")).close()


def test_doctor_and_lis_ping_tell_no_tables_empty_and_filled_apart(
        lis_url: str, request: pytest.FixtureRequest, tmp_path: Path,
        shared_data: Path) -> None:
    kind = request.node.callspec.params["lis_url"]
    _bare_database(kind, lis_url)
    data = tmp_path / "d"

    bare = doctor_lis(lis_url, data)
    assert bare["level"] == "fail"
    assert "answers but has no table" in bare["message"] and PATIENT_TABLE in bare["message"]
    assert "hust19 lis init --lis" in bare["message"]
    ping = hust19("lis", "ping", "--lis", lis_url)
    assert ping.returncode != 0 and "has no table" in ping.stderr
    assert not data.exists(), "doctor only looks"

    init = hust19("lis", "init", "--lis", lis_url)
    assert init.returncode == 0, init.stderr
    assert tables(lis_url) >= REFERENCE_TABLES
    empty = doctor_lis(lis_url, data)
    assert empty["level"] == "warn"
    assert "holds no patient" in empty["message"] and FILL in empty["message"]
    assert "the mapping covers" in empty["message"]
    ping = hust19("lis", "ping", "--lis", lis_url)
    assert ping.returncode == 0 and "are empty" in ping.stdout and FILL in ping.stdout

    import_ictcf(shared_data / "ictcf", lis_url, limit=2)
    filled = doctor_lis(lis_url, data)
    assert filled["level"] == "ok", filled
    assert "hold patients" in filled["message"]
    ping = hust19("lis", "ping", "--lis", lis_url)
    assert ping.returncode == 0 and "hold patients" in ping.stdout
    assert "warning" not in ping.stdout


def test_doctor_fails_an_unreachable_lis(tmp_path: Path) -> None:
    finding = doctor_lis(f"postgresql://nobody@127.0.0.1:{free_port()}/none", tmp_path / "d")
    assert finding["level"] == "fail" and "not reachable" in finding["message"]


def test_readyz_warns_for_an_empty_lis_and_fails_one_without_tables(
        running_agent: Callable[..., Agent], postgres_url: str, tmp_path: Path,
        shared_data: Path) -> None:
    http = free_port()
    agent = running_agent(roles=frozenset({ROLE_WORKER}), http_port=http)  # default LIS
    status, report = readyz(http)
    assert status == 200, report
    assert report["lis"].startswith("warning: LIS sqlite:///")
    assert "holds no patient" in report["lis"] and FILL in report["lis"]
    import_ictcf(shared_data / "ictcf", agent.settings.lis_url, limit=2)
    assert readyz(http) == (200, {**report, "lis": "ok"})

    other = free_port()  # a PostgreSQL database without the LIS tables: lookups would fail
    running_agent(roles=frozenset({ROLE_WORKER}), http_port=other, lis=postgres_url)
    status, report = readyz(other)
    assert status == 503
    assert "answers but has no table" in report["lis"]


def test_a_study_on_a_fresh_data_dir_says_patient_not_found_not_lis_unreachable(
        running_agent: Callable[..., Agent], tmp_path: Path) -> None:
    """Before: "no such table: lis_patient_alias" logged per study and "LIS unreachable" (with
    the LIS path) in the result and its SR."""
    agent = running_agent(roles=ALL_ROLES, series_quiet_s=1.0)  # no --lis: the default
    assert run_storescu(sorted(SAMPLE.glob("*.dcm")), agent.port, "HUST19").returncode == 0
    (message,) = read_topic(agent.bus, topics.TRIAGE_RESULTS, 1, WAIT_S)
    result = TriageResult.model_validate_json(message.value)
    reason = " ".join(filter(None, [result.skip_reason, result.availability.cf_reason
                                    if result.availability else None]))
    assert "patient not found in the LIS" in reason
    assert "unreachable" not in reason and "no such table" not in reason
