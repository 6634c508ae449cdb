"""Makes the dashboard screenshots in ``docs/images/`` (shown in ``docs/dashboard.md``):

    .venv/bin/python docs/dashboard_screenshots.py

It starts the dashboard in this process on a temporary data folder, publishes made-up results
(``agent.dashboard.synthetic``: ``SYN-`` patients with made-up names, never real data) on the
embedded bus, gives one of them a second revision (its lab values arrived after the CT-only
first one) and evidence thumbnails drawn from the repository's sample CT series
(``samples/lung-pet-ct-dx``, CC BY 4.0) in the lung window, and photographs the pages in
Debian's Chromium at 1366x768 (a ward PC) and 768x1024 (a tablet).
"""

from __future__ import annotations

import base64
import secrets
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.bus.embedded import EmbeddedBus  # noqa: E402
from agent.dashboard.auth import add_user  # noqa: E402
from agent.dashboard.service import Dashboard  # noqa: E402
from agent.dashboard.settings import load_dashboard_settings  # noqa: E402
from agent.dashboard.store import WorklistFilter  # noqa: E402
from agent.dashboard.synthetic import (  # noqa: E402
    make_evidence,
    make_result,
    publish_evidence,
    publish_result,
)
from agent.ops.http import HealthServer  # noqa: E402
from agent.ops.metrics import Metrics  # noqa: E402
from schemas import topics  # noqa: E402
from schemas.messages import DeadLetter, dump_json  # noqa: E402

OUT = REPO / "docs" / "images"
SAMPLE = REPO / "samples" / "lung-pet-ct-dx" / "Lung_Dx-A0002-B40f"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PASSWORD = secrets.token_urlsafe(16)  # a throwaway user of a throwaway folder


def sample_slices_hu() -> list[np.ndarray]:
    """Ten slices of the sample series in Hounsfield units, in slice order."""
    files = sorted(SAMPLE.iterdir())
    picked = files[5:25:2]
    out = []
    for f in picked:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) \
            + float(ds.get("RescaleIntercept", 0))
        out.append(hu)
    return out


def publish_scene(bus: EmbeddedBus, now: datetime) -> str:
    """About forty results of a morning; returns the result_id of the one to open."""
    producer = bus.producer()
    featured = ""
    for n in range(1, 43):
        ready = now - timedelta(minutes=9 * (43 - n))
        status = "skipped" if n in (7, 29) else "triaged"
        result = make_result(n, ready=ready, status=status, seed=4)
        if n == 40:  # CT only first; revision 2 when the lab values came
            publish_result(producer, make_result(n, flag="type2", labs=False, seed=4,
                                                 ready=ready - timedelta(minutes=12)))
            result = make_result(n, flag="type2", labs=True, revision=2, ready=ready, seed=4)
            featured = result.result_id
        publish_result(producer, result)
        if status == "triaged":
            publish_evidence(producer, make_evidence(result, seed=n, slices=sample_slices_hu()
                                                     if n == 40 else None))
    entry = DeadLetter(reason="slice 1.3.6.1.4.1.14519.5.2.1.99.1 of series "
                              "1.3.6.1.4.1.14519.5.2.1.99 cannot be decoded: JPEG 2000 "
                              "decoder not installed", error_type="RuntimeError",
                       source_topic=topics.DICOM_INSTANCES, source_partition=0,
                       source_offset=4812, value_b64=base64.b64encode(b"\0" * 524_288).decode(),
                       series_uid="1.3.6.1.4.1.14519.5.2.1.99",
                       study_uid="1.3.6.1.4.1.14519.5.2.1.98",
                       failed_at=now - timedelta(minutes=31))
    producer.send(topics.TRIAGE_DLQ, entry.series_uid.encode() if entry.series_uid else None,
                  dump_json(entry))
    producer.flush()
    return featured


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hust19-screenshots-"))
    try:
        data = tmp / "data"
        data.mkdir()
        add_user(data / "dashboard-users.txt", "dr.lin", "reader", PASSWORD)
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        bus = EmbeddedBus(data / "bus")
        featured = publish_scene(bus, now)
        health = HealthServer("127.0.0.1", 0, Metrics(), {"bus": bus.ping})
        health.start()
        settings = load_dashboard_settings(None, {
            "data_dir": data, "port": 0,
            "role": [f"worker=http://127.0.0.1:{health.port}"]}, environ={})
        dash = Dashboard(settings, bus=bus)
        dash.start()
        try:
            shoot(dash, featured)
        finally:
            dash.stop()
            health.stop()
            bus.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def shoot(dash: Dashboard, featured: str) -> None:
    from playwright.sync_api import sync_playwright

    assert dash.store is not None
    deadline = time.monotonic() + 30
    while dash.store.worklist(WorklistFilter()).total < 42:
        if time.monotonic() > deadline:
            raise SystemExit("the results did not reach the dashboard")
        time.sleep(0.1)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(dash.url + "/login")
        page.get_by_label("User name").fill("dr.lin")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_selector("#live[data-state=live]")
        # two acknowledged results, as on a morning's list
        for button in page.get_by_role("button", name="Acknowledge result of").all()[3:5]:
            with page.expect_navigation():
                button.click()
        page.wait_for_selector("#live[data-state=live]")
        page.screenshot(path=str(OUT / "dashboard-worklist.png"))
        page.goto(dash.url + f"/results/{featured}")
        page.wait_for_function("() => [...document.querySelectorAll('.thumbs img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(OUT / "dashboard-patient.png"), full_page=True)
        page.goto(dash.url + "/it")
        page.screenshot(path=str(OUT / "dashboard-it.png"), full_page=True)
        page.set_viewport_size({"width": 768, "height": 1024})
        page.goto(dash.url + "/?flag=type2")
        page.wait_for_selector("#live[data-state=live]")
        page.screenshot(path=str(OUT / "dashboard-tablet.png"))
        browser.close()
    for name in ("worklist", "patient", "it", "tablet"):
        print(OUT / f"dashboard-{name}.png")


if __name__ == "__main__":
    sys.exit(main())
