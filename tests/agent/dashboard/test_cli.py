"""``hust19 dashboard`` and its user commands as processes: add-user / remove-user on the users
file; the dashboard beside ``hust19 serve`` lists a series sent with dcmtk storescu (with the
patient's name and the Study Date the worker read from the images; the date filter goes by the
Study Date, not the day it arrived), refuses anonymous requests, writes no patient data into
its log at INFO, and stops on SIGTERM."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from agent.cli import main
from agent.dashboard.auth import UserDirectory, read_users_file
from tests.fixtures.dicom import SAMPLE, free_port, run_storescu, wait_port

HUST19 = [sys.executable, "-m", "agent.cli"]


def hust19(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str,
           stdin: str = "") -> tuple[int, str, str]:
    """``hust19 ARGS`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_add_change_and_remove_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        return hust19(monkeypatch, capsys, *args, stdin=stdin)

    users = tmp_path / "etc" / "users.txt"
    code, out, err = run("dashboard", "add-user", "dr.wu", "--users", str(users),
                         "--password-stdin", stdin="a long passphrase\n")
    assert code == 0, err
    assert "added reader dr.wu" in out
    assert users.stat().st_mode & 0o777 == 0o600
    assert "a long passphrase" not in users.read_text()
    directory = UserDirectory(users)
    assert directory.verify("dr.wu", "a long passphrase") is not None
    assert directory.verify("dr.wu", "a long passphrasE") is None

    code, out, _ = run("dashboard", "add-user", "dr.wu", "--users", str(users),
                       "--password-stdin", "--role", "viewer", stdin="another passphrase\n")
    assert code == 0 and "updated viewer dr.wu" in out
    assert directory.verify("dr.wu", "another passphrase") is not None  # re-read on change
    assert read_users_file(users)["dr.wu"].role == "viewer"

    code, _, _ = run("dashboard", "add-user", "proxy-only", "--users", str(users),
                     "--proxy-only")
    assert code == 0 and not read_users_file(users)["proxy-only"].can_login

    for bad in (["no way!", "--password-stdin"], ["short", "--password-stdin"],
                ["empty", "--password-stdin"]):
        code, _, err = run("dashboard", "add-user", *bad, "--users", str(users),
                           stdin="" if bad[0] == "empty" else "tiny\n")
        assert code == 2 and err.startswith("hust19: error:"), (bad, err)
    assert run("dashboard", "remove-user", "dr.wu", "--users", str(users))[0] == 0
    assert "dr.wu" not in read_users_file(users)
    code, _, err = run("dashboard", "remove-user", "dr.wu", "--users", str(users))
    assert code == 2 and "no user" in err


@pytest.mark.slow
def test_beside_serve_a_sent_series_is_listed(tmp_path: Path) -> None:
    data, dicom_port, web_port = tmp_path / "data", free_port(), free_port()
    header = dcmread(next(SAMPLE.iterdir()), stop_before_pixels=True)
    patient_id, study = str(header.PatientID), str(header.StudyDate)
    study_day = f"{study[:4]}-{study[4:6]}-{study[6:8]}"
    assert study_day != date.today().isoformat()
    serve_log, dash_log = tmp_path / "serve.log", tmp_path / "dashboard.log"
    with serve_log.open("wb") as out:
        serve = subprocess.Popen([*HUST19, "serve", "--data-dir", str(data), "--port",
                                  str(dicom_port), "--series-quiet-s", "1"],
                                 stdout=out, stderr=subprocess.STDOUT)
    with dash_log.open("wb") as out:
        dash = subprocess.Popen([*HUST19, "dashboard", "--data-dir", str(data), "--port",
                                 str(web_port), "--host", "127.0.0.1", "--auth", "proxy"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(dicom_port, 60)
        wait_port(web_port, 60)
        sent = run_storescu(sorted(SAMPLE.iterdir()), dicom_port, "HUST19")
        assert sent.returncode == 0, sent.stderr
        url = f"http://127.0.0.1:{web_port}/"
        deadline, page = time.monotonic() + 90, ""
        with httpx.Client() as c:
            while patient_id not in page:
                assert time.monotonic() < deadline, f"{patient_id} not listed in 90 s"
                page = c.get(url, headers={"X-Forwarded-User": "check"}).text
                time.sleep(0.2)
            assert c.get(url).status_code == 401
            row = page[page.index(patient_id):]
            row = row[:row.index("</tr>")]
            assert study_day in row and f'class="name">{header.PatientName}<' in row
            for day, listed in ((study_day, True), (date.today().isoformat(), False)):
                filtered = c.get(url, params={"from": day, "to": day},
                                 headers={"X-Forwarded-User": "check"}).text
                assert (patient_id in filtered) is listed, day
            result_link = re.search(r'href="(/results/[0-9.]+)', page)
            assert result_link is not None
            detail = c.get(url.rstrip("/") + result_link.group(1),
                           headers={"X-Forwarded-User": "check"})
            assert detail.status_code == 200 and patient_id in detail.text
        dash.send_signal(signal.SIGTERM)
        assert dash.wait(20) == 0
    finally:
        for proc in (dash, serve):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
    log = dash_log.read_text()
    assert "dashboard on http://127.0.0.1" in log and "received SIGTERM" in log
    assert patient_id not in log  # no patient data in the log at INFO
