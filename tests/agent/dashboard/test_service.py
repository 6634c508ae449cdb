"""The dashboard role composed: on the Kafka test broker; a stop ends open live streams at
once; the change feed wakes waiting pages."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from agent.bus.kafka import KafkaBus
from agent.dashboard.consumer import TOPICS
from agent.dashboard.feed import ChangeFeed
from agent.dashboard.service import Dashboard
from agent.dashboard.synthetic import make_result, publish_result
from tests.fixtures.dicom import wait_for
from tests.fixtures.kafka import kafka_test_overrides


@pytest.mark.kafka
def test_on_the_kafka_test_broker(fresh_kafka_broker: str,
                                  start_dashboard: Callable[..., Dashboard]) -> None:
    bus = KafkaBus([fresh_kafka_broker.removeprefix("kafka://")], **kafka_test_overrides())
    try:
        bus.ensure_topics(list(TOPICS))
        dash = start_dashboard(bus=bus, auth="proxy")
        producer = bus.producer()
        publish_result(producer, make_result(77, flag="type2"))
        producer.flush()
        producer.close()
        with httpx.Client(base_url=dash.url, headers={"X-Forwarded-User": "it"}) as c:
            wait_for(lambda: "SYN-000077" in c.get("/").text, "the result on the page", 60)
            assert "kafka" in c.get("/it").text.lower()
    finally:
        bus.close()


def test_stop_ends_open_live_streams(start_dashboard: Callable[..., Dashboard]) -> None:
    dash = start_dashboard(auth="proxy")
    opened, ended = threading.Event(), threading.Event()

    def listen() -> None:
        with httpx.Client(base_url=dash.url, timeout=30) as c, \
                c.stream("GET", "/events", headers={"X-Forwarded-User": "it"}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("event: hello"):
                    opened.set()
        ended.set()

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert opened.wait(10)
    started = time.monotonic()
    dash.stop()
    assert ended.wait(10)
    assert time.monotonic() - started < 5


def test_change_feed_wakes_waiters_from_another_thread() -> None:
    feed = ChangeFeed()

    async def scenario() -> list[int]:
        feed.bind(asyncio.get_running_loop())
        seen = feed.version
        waiter = asyncio.create_task(feed.wait(seen, 5.0))
        await asyncio.sleep(0.05)
        threading.Thread(target=feed.publish).start()
        first = await asyncio.wait_for(waiter, 2.0)
        timed_out = await feed.wait(first, 0.05)  # nothing new: returns at the timeout
        feed.close()
        closed = await asyncio.wait_for(feed.wait(first, 5.0), 1.0)
        return [seen, first, timed_out, closed]

    # a thread of its own: the session's Playwright keeps an event loop in this one
    out: list[list[int]] = []
    runner = threading.Thread(target=lambda: out.append(asyncio.run(scenario())))
    runner.start()
    runner.join(10)
    assert out == [[0, 1, 1, 1]]


def test_a_change_made_while_the_page_loaded_is_sent_at_once(
        start_dashboard: Callable[..., Dashboard]) -> None:
    dash = start_dashboard(auth="proxy")
    version = dash.feed.version
    dash.feed.publish()  # between the page's render (at `version`) and its stream
    events: list[str] = []
    with httpx.Client(base_url=dash.url, timeout=10) as c, \
            c.stream("GET", f"/events?since={version}",
                     headers={"X-Forwarded-User": "it"}) as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                events.append(line)
            if len(events) == 2:
                break
    assert events == ["event: hello", "event: change"]
