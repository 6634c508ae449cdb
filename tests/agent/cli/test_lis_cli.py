"""``hust19 lis import-ictcf / show / ping`` through the real console entry point
(``python -m agent.cli`` in a subprocess): output, idempotence, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from agent.cli import EXIT_FAILURE, EXIT_USAGE
from schemas.lis import LisPatient, LisResult
from tests.fixtures.paths import REPO

UNREACHABLE = "postgresql://nobody:s3cret@127.0.0.1:1/none"


def hust19(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def counts(url: str) -> tuple[int, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return (conn.execute(select(func.count()).select_from(LisPatient)).scalar_one(),
                    conn.execute(select(func.count()).select_from(LisResult)).scalar_one())
    finally:
        engine.dispose()


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hust19: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.slow
def test_import_show_ping(tmp_path: Path, shared_data: Path) -> None:
    ictcf = shared_data / "ictcf"
    url = f"sqlite:///{tmp_path / 'lis.sqlite'}"
    for _ in range(2):  # the second run replaces, never duplicates
        proc = hust19("lis", "import-ictcf", ictcf, "--lis", url, "--limit", "20",
                      "--alias", "P002=1", "--no-progress")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("imported 20 patients, ")
        assert "'P002' -> iCTCF patient '1'" in proc.stdout
    patients, results = counts(url)
    assert patients == 20
    assert f"{results} results" in proc.stdout

    shown = hust19("lis", "show", "P002", "--lis", url, "--study-date", "20200210")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["patient_found"] and doc["lis_patient_id"] == "1"
    assert doc["source"] == "reference schema"
    assert doc["window"] == ["2020-02-03T00:00:00", "2020-02-17T23:59:59.999999"]
    assert doc["values"]["PCT"]["qualifier"] == "<" and doc["values"]["PCT"]["value"] == 0.13
    assert doc["values"]["AGE"]["value"] == 81.0

    ping = hust19("lis", "ping", "--lis", url)
    assert ping.returncode == 0 and "answers (reference schema)" in ping.stdout


def test_default_lis_is_sqlite_in_the_data_dir(tmp_path: Path, shared_data: Path) -> None:
    proc = hust19("lis", "import-ictcf", shared_data / "ictcf", "--data-dir", tmp_path / "d",
                  "--limit", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert counts(f"sqlite:///{tmp_path / 'd' / 'lis.sqlite'}")[0] == 2


@pytest.mark.slow
def test_errors_are_one_line(tmp_path: Path, shared_data: Path) -> None:
    line = assert_one_line_error(hust19("lis", "show", "1", "--lis", UNREACHABLE),
                                 EXIT_FAILURE)
    assert "s3cret" not in line and "nobody:***@127.0.0.1:1" in line
    assert_one_line_error(hust19("lis", "import-ictcf", tmp_path / "missing", "--lis",
                                 f"sqlite:///{tmp_path / 'x.sqlite'}"), EXIT_USAGE)
    line = assert_one_line_error(hust19("lis", "import-ictcf", shared_data / "ictcf", "--lis",
                                        f"sqlite:///{tmp_path / 'x.sqlite'}", "--alias",
                                        "P002=no-such-id"), EXIT_USAGE)
    assert "no-such-id" in line
    bad_mapping = tmp_path / "mapping.toml"
    bad_mapping.write_text('query = "SELECT code, value FROM t WHERE id = :patient_id OR 1 = '
                           ':other"\n')
    line = assert_one_line_error(hust19("lis", "show", "1", "--lis",
                                        f"sqlite:///{tmp_path / 'x.sqlite'}",
                                        "--mapping", bad_mapping), EXIT_FAILURE)
    assert ":other" in line
    assert_one_line_error(hust19("lis", "show", "1", "--lis", "sqlite://", "--study-date",
                                 "10/02/2020"), EXIT_USAGE)
