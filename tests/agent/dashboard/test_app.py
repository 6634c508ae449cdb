"""The dashboard over HTTP (a real server on a free port, httpx as the client): every page and
stream needs a user; login, logout, sessions; CSRF and origin checks; rate-limited login; the
reverse-proxy mode and whom it believes; roles; CSV export; headers; health; TLS; the patient
page's lab table from the result (or from a real LIS for results without), its SR destinations
and revisions; names and study dates on the worklist, never in the log."""

from __future__ import annotations

import csv
import io
import logging
import re
import ssl
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from agent.bus.embedded import EmbeddedBus
from agent.dashboard.service import Dashboard
from agent.dashboard.store import WorklistFilter
from agent.dashboard.synthetic import make_evidence, make_result, publish_evidence, publish_result
from schemas.errors import ConfigError
from schemas.messages import LabResult
from tests.agent.dashboard.conftest import login

PROTECTED = ["/", "/worklist", "/events", "/export.csv", "/it", "/results/2.25.1",
             "/results/2.25.1/evidence/1/0.png"]


def wait_rows(dashboard: Dashboard, count: int, timeout_s: float = 10.0) -> None:
    """Until the dashboard's store holds ``count`` results (the consumer is a thread)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert dashboard.store is not None
        if dashboard.store.worklist(WorklistFilter()).total >= count:
            return
        assert time.monotonic() < deadline, "results did not reach the store"
        time.sleep(0.05)


def publish(bus: EmbeddedBus, *results: object, evidence: bool = True) -> None:
    producer = bus.producer()
    for r in results:
        publish_result(producer, r)  # type: ignore[arg-type]
        if evidence and r.status == "triaged":  # type: ignore[attr-defined]
            publish_evidence(producer, make_evidence(r))  # type: ignore[arg-type]
    producer.flush()


def make_lis(folder: Path, patient_id: str, values: list[dict[str, object]]) -> str:
    """A LIS (the reference schema, SQLite) that knows ``patient_id`` with ``values``."""
    from sqlalchemy import create_engine, insert

    from agent.triage.lis import LisClient
    from schemas.lis import LisPatient, LisResult

    url = f"sqlite:///{folder / 'lis.sqlite'}"
    with LisClient(url) as client:
        client.create_schema()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(LisPatient), [{"patient_id": patient_id, "sex": "F", "age": 61}])
        conn.execute(insert(LisResult), [{"patient_id": patient_id, **v} for v in values])
    engine.dispose()
    return url


def section(page: str, heading: str, next_heading: str) -> str:
    return page[page.index(f'id="{heading}"'):page.index(f'id="{next_heading}"')]


def test_everything_needs_a_login(start_dashboard: Callable[..., Dashboard]) -> None:
    dash = start_dashboard()
    with httpx.Client(base_url=dash.url) as c:
        for path in PROTECTED:
            r = c.get(path)
            assert r.status_code in (303, 401), path
        assert c.get("/").headers["location"] == "/login?next=%2F"
        assert c.get("/events").status_code == 401
        assert c.post("/results/2.25.1/acknowledge", data={"revision": "1"}).status_code == 401
        assert c.get("/healthz").status_code == 200
        assert c.get("/login").status_code == 200


def test_login_session_logout(start_dashboard: Callable[..., Dashboard],
                              embedded_bus: EmbeddedBus) -> None:
    publish(embedded_bus, make_result(1, flag="type2"))
    dash = start_dashboard()
    wait_rows(dash, 1)
    with httpx.Client(base_url=dash.url) as c:
        r = login(c, "alice")
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        page = c.get("/")
        assert page.status_code == 200 and "SYN-000001" in page.text
        assert "Not a medical device" in page.text
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert token is not None
        # logout needs the CSRF token too
        assert c.post("/logout", data={"csrf": "wrong"}).status_code == 403
        assert c.post("/logout", data={"csrf": token.group(1)}).status_code == 303
        assert c.get("/").status_code == 303  # the session is gone on the server


def test_wrong_password_and_rate_limit(start_dashboard: Callable[..., Dashboard],
                                       caplog: pytest.LogCaptureFixture) -> None:
    dash = start_dashboard()
    with httpx.Client(base_url=dash.url) as c:
        for _ in range(5):
            assert login(c, "alice", "wrong-password").status_code == 401
        limited = login(c, "alice")  # even the right password waits now
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    with httpx.Client(base_url=dash.url) as c:  # from the same address, another account
        assert login(c, "victor").status_code == 429
    assert "wrong-password" not in caplog.text


def test_login_form_needs_its_nonce_and_our_origin(
        start_dashboard: Callable[..., Dashboard]) -> None:
    dash = start_dashboard()
    with httpx.Client(base_url=dash.url) as c:
        c.get("/login")
        nonce = c.cookies.get("hust19_login", path="/login")
        form = {"username": "alice", "password": "alice-password-1", "next": "/"}
        assert c.post("/login", data={**form, "csrf": "forged"}).status_code == 403
        evil = c.post("/login", data={**form, "csrf": nonce},
                      headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403
        # an open redirect through ?next= is refused: it lands on /
        r = c.post("/login", data={**form, "csrf": nonce, "next": "//evil.example/x"})
        assert r.status_code == 303 and r.headers["location"] == "/"


def test_acknowledge_needs_csrf_and_the_reader_role(start_dashboard: Callable[..., Dashboard],
                                                    embedded_bus: EmbeddedBus) -> None:
    result = make_result(2, flag="type1")
    publish(embedded_bus, result)
    dash = start_dashboard()
    wait_rows(dash, 1)
    ack = f"/results/{result.result_id}/acknowledge"
    with httpx.Client(base_url=dash.url) as c:
        login(c, "victor")
        page = c.get("/")
        assert f'action="{ack}"' not in page.text  # viewers get no button ...
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        r = c.post(ack, data={"csrf": token, "revision": "1"})
        assert r.status_code == 403  # ... and no way around it
    with httpx.Client(base_url=dash.url) as c:
        login(c, "alice")
        page = c.get("/")
        assert f'action="{ack}"' in page.text
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        assert c.post(ack, data={"revision": "1"}).status_code == 403  # no token
        assert c.post(ack, data={"csrf": token + "x", "revision": "1"}).status_code == 403
        r = c.post(ack, data={"csrf": token, "revision": "1", "next": "/?flag=type1"})
        assert r.status_code == 303 and r.headers["location"] == "/?flag=type1"
        r = c.post(ack, data={"csrf": token, "revision": "1"},
                   headers={"Accept": "application/json"})
        assert r.status_code == 409 and "already acknowledged by alice" in r.json()["message"]
        detail = c.get(f"/results/{result.result_id}")
        assert "acknowledge" in detail.text and "alice" in detail.text


def test_proxy_mode_believes_only_trusted_addresses(
        start_dashboard: Callable[..., Dashboard], embedded_bus: EmbeddedBus) -> None:
    publish(embedded_bus, make_result(3, flag="type2"))
    dash = start_dashboard(auth="proxy")
    wait_rows(dash, 1)
    with httpx.Client(base_url=dash.url) as c:
        assert c.get("/").status_code == 401
        page = c.get("/", headers={"X-Forwarded-User": "check"})
        assert page.status_code == 200 and "SYN-000003" in page.text
        # not in the users file: the default role; alice is: her role
        assert re.search(r"check\s*<span class=\"role\">\(viewer\)", page.text)
        page = c.get("/", headers={"X-Forwarded-User": "alice"})
        assert re.search(r"alice\s*<span class=\"role\">\(reader\)", page.text)
        assert c.get("/", headers={"X-Forwarded-User": "bad name!"}).status_code == 401
        assert c.get("/login").status_code == 404
    # the same request from an address that is not a trusted proxy is anonymous
    other = start_dashboard(bus=None, auth="proxy", trusted_proxy=["10.1.2.3/32"],
                            consumer_group="dash-other")
    with httpx.Client(base_url=other.url) as c:
        assert c.get("/", headers={"X-Forwarded-User": "check"}).status_code == 401


def test_csv_export_of_the_current_filter(start_dashboard: Callable[..., Dashboard],
                                         embedded_bus: EmbeddedBus) -> None:
    results = [make_result(n) for n in range(12)]
    odd = make_result(50, flag="type2", patient_id="=HYPERLINK(1)")
    publish(embedded_bus, *results, odd, evidence=False)
    dash = start_dashboard()
    wait_rows(dash, 13)
    with httpx.Client(base_url=dash.url) as c:
        login(c, "alice")
        r = c.get("/export.csv", params={"flag": "type2"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        want = sum(1 for x in [*results, odd] if x.flag == "type2")
        assert len(rows) == want and {row["flag"] for row in rows} == {"type2"}
        assert "'=HYPERLINK(1)" in {row["patient_id"] for row in rows}  # not a formula
        by_id = {row["patient_id"]: row for row in rows}
        assert by_id["'=HYPERLINK(1)"]["patient_name"] == odd.patient_name
        study = str(odd.study_date)
        assert by_id["'=HYPERLINK(1)"]["study_date"] == f"{study[:4]}-{study[4:6]}-{study[6:]}"
        everything = list(csv.DictReader(io.StringIO(c.get("/export.csv").text)))
        assert len(everything) == 13


def test_headers_health_and_thumbnails(start_dashboard: Callable[..., Dashboard],
                                       embedded_bus: EmbeddedBus) -> None:
    result = make_result(4)
    publish(embedded_bus, result)
    dash = start_dashboard()
    wait_rows(dash, 1)
    with httpx.Client(base_url=dash.url) as c:
        login(c, "alice")
        page = c.get(f"/results/{result.result_id}")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-content-type-options"] == "nosniff"
        thumbs = re.findall(r'src="(/results/[^"]+\.png)"', page.text)
        assert len(thumbs) == 10 and str(result.patient_id) not in "".join(thumbs)
        png = c.get(thumbs[0])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert c.get("/results/2.25.12345").status_code == 404
        assert c.get("/readyz").json() == {"database": "ok", "consumer": "ok"}


def test_password_mode_needs_users(data_dir: Path) -> None:
    from agent.dashboard.settings import load_dashboard_settings

    settings = load_dashboard_settings(None, {"data_dir": data_dir, "port": 0,
                                              "users": data_dir / "none.txt"}, environ={})
    with pytest.raises(ConfigError, match="add-user"):
        Dashboard(settings).start()


def test_tls(start_dashboard: Callable[..., Dashboard], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    dash = start_dashboard(tls_cert=cert, tls_key=key)
    assert dash.url.startswith("https://")
    with httpx.Client(base_url=dash.url, verify=ssl.create_default_context(cafile=cert)) as c:
        r = login(c, "alice")
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
        assert c.get("/").status_code == 200


def test_partial_quantitative_ct_and_old_results_render(
        start_dashboard: Callable[..., Dashboard], embedded_bus: EmbeddedBus) -> None:
    """Measurements the series could not give (None) and results without quantitative CT,
    evidence or lab values (agents before them) still render, saying what is missing."""
    from schemas.messages import LungMeasurements, QuantitativeCt

    partial = make_result(8).model_copy(update={"quantitative_ct": QuantitativeCt(
        method="hu-bands/1", lungs=LungMeasurements(), slices_with_lung=12,
        warnings=["slices 5 mm thick: no pattern shares"])})
    bare = make_result(9).model_copy(update={"quantitative_ct": None, "lab_values": [],
                                              "sr_destinations": []})
    publish(embedded_bus, partial, bare, evidence=False)
    dash = start_dashboard()
    wait_rows(dash, 2)
    with httpx.Client(base_url=dash.url) as c:
        login(c, "alice")
        page = c.get(f"/results/{partial.result_id}")
        assert page.status_code == 200
        assert "not measured" in page.text and "slices 5 mm thick" in page.text
        page = c.get(f"/results/{bare.result_id}")
        assert page.status_code == 200
        assert "No quantitative CT in this result" in page.text
        assert "No thumbnails for this result" in page.text
        assert "--lis URL" in page.text and "The result does not carry lab values" in page.text
        assert "not recorded in this result" in page.text  # no SR destinations


def test_patient_page_shows_the_lab_values_the_result_carries(
        start_dashboard: Callable[..., Dashboard], embedded_bus: EmbeddedBus,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A result with ``lab_values``: the table shows them (named by the catalogue, censored
    values, the printed range or the catalogue's, the unit they came in), not what the LIS
    has now; the SR destinations, the revision and the SR it replaces; the name and the study
    date on the worklist; none of it in the log at INFO."""
    caplog.set_level(logging.INFO)
    first = make_result(13, flag="type2", labs=False, study_date="20261128")
    values = [
        LabResult(code="CRP", value=48.5, unit="mg/L", low=0.0, high=10.0, lis_code="HS-CRP",
                  collected_at="2026-11-28T06:30:00"),
        LabResult(code="PCT", value=0.05, unit="ng/mL", qualifier="<", low=0.0, high=0.5),
        LabResult(code="LY", value=0.61, unit="G/L", collected_at="2026-11-28T06:30:00"),
        LabResult(code="ALB", value=3.12, unit="g/dL", low=3.5, high=5.5),
    ]
    result = make_result(13, flag="type2", labs=True, revision=2, study_date="20261128") \
        .model_copy(update={"lab_values": values, "patient_name": "ZHANG^Wei=张^伟",
                            "sr_destinations": ["PACS@pacs.hospital.example:104",
                                                "ARCHIVE@10.20.0.15:11112"]})
    assert result.patient_id is not None
    lis = make_lis(tmp_path, result.patient_id, [  # the LIS has other values by now
        {"code": "CRP", "value": 77.7, "unit": "mg/L", "collected_at": datetime(2026, 11, 29)}])
    publish(embedded_bus, first, result, evidence=False)
    dash = start_dashboard(lis=lis)
    assert dash.store is not None
    deadline = time.monotonic() + 10
    while (row := dash.store.row(result.result_id)) is None or row.revision < 2:
        assert time.monotonic() < deadline, "revision 2 did not reach the store"
        time.sleep(0.05)
    with httpx.Client(base_url=dash.url) as c:
        login(c, "alice")
        worklist = c.get("/").text
        page = c.get(f"/results/{result.result_id}").text
    row_html = worklist[worklist.index(f'id="row-{result.result_id}"'):]
    row_html = row_html[:row_html.index("</tr>")]
    assert "ZHANG, Wei (张伟)" in row_html and "2026-11-28" in row_html
    assert "revision 2" in row_html

    labs = section(page, "labs-heading", "evidence-heading")
    assert "From the result" in labs and "Looked up now in the LIS" not in labs
    assert "77.7" not in labs  # the LIS' newer value is not what the model used
    rows = dict(re.findall(r'data-code="([^"]+)">(.*?)</tr>', labs, re.S))
    assert list(rows) == ["LY", "CRP", "PCT", "ALB"]  # the catalogue's order
    assert "C-reactive protein" in rows["CRP"] and "48.5" in rows["CRP"]
    assert "0\u201310" in rows["CRP"] and "(high)" in rows["CRP"]
    assert "&lt;0.05" in rows["PCT"] and "(high)" not in rows["PCT"]  # censored, in range
    assert "Lymphocyte count" in rows["LY"] and "1.1\u20133.2" in rows["LY"]
    assert "catalogue" in rows["LY"] and "(low)" in rows["LY"]
    assert "2026-11-28 06:30" in rows["LY"]
    assert "g/dL" in rows["ALB"] and "catalogue: g/L" in rows["ALB"] and "(low)" in rows["ALB"]

    summary = section(page, "patient-heading", "scores-heading")
    assert "ZHANG, Wei (张伟)" in summary and "2026-11-28" in summary
    assert "replaces the SR of revision 1" in summary
    report = page[page.index('id="report-heading"'):]
    assert "PACS@pacs.hospital.example:104" in report and "ARCHIVE@10.20.0.15:11112" in report
    assert str(first.sr_sop_instance_uid) in report and str(result.sr_sop_instance_uid) in report
    assert "the report of revision 1" in report
    for secret in ("ZHANG", "张", str(result.patient_id)):
        assert secret not in caplog.text


def test_patient_page_falls_back_to_the_lis_for_results_without_lab_values(
        start_dashboard: Callable[..., Dashboard], embedded_bus: EmbeddedBus,
        tmp_path: Path) -> None:
    """Results from agents before ``lab_values`` (and without a study date): the values are
    looked up in the LIS around the day the series arrived, and the page says so."""
    from datetime import timedelta

    result = make_result(12, labs=True).model_copy(update={
        "lab_values": [], "study_date": None, "patient_name": None})
    assert result.patient_id is not None
    received = result.timings.first_instance_received
    assert received is not None
    url = make_lis(tmp_path, result.patient_id, [
        {"code": "CRP", "value": 48.5, "unit": "mg/L",
         "collected_at": received.replace(tzinfo=None) - timedelta(days=1)},
        {"code": "MCHC", "value": 331.5, "unit": "g/L",
         "collected_at": received.replace(tzinfo=None) - timedelta(days=30)}])
    publish(embedded_bus, result, evidence=False)
    dash = start_dashboard(lis=url)
    wait_rows(dash, 1)
    with httpx.Client(base_url=dash.url) as c:
        login(c, "alice")
        text = c.get(f"/results/{result.result_id}").text
    labs = section(text, "labs-heading", "evidence-heading")
    assert "48.5" in labs and "mg/L" in labs and "out-of-range" in labs  # CRP is high
    assert "331.5" not in labs  # collected outside the window around the study
    assert "Looked up now in the LIS" in labs and "From the result" not in labs
    assert "may differ from what the lab model saw" in labs  # this result used labs
