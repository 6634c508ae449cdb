"""Fixtures of the dashboard tests: a users file, a running dashboard on a real bus, Debian's
Chromium driven by Playwright.

* ``users_file``: alice (reader) and victor (viewer), passwords :data:`PASSWORDS`; made once
  per session (argon2 is slow on purpose) and copied per test.
* ``embedded_bus``: the embedded bus of ``tmp_path/data``.
* ``start_dashboard(**settings)``: a :class:`agent.dashboard.service.Dashboard` on a free port
  over ``embedded_bus`` (or ``bus=``; ``bus=None`` opens its own), stopped at teardown before
  the bus is closed.
* ``browser``: one headless Chromium per module (``/usr/bin/chromium``: ``./run setup``
  installs it); ``page``: a fresh context at 1366x768 per test, closed at teardown.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from agent.bus.embedded import EmbeddedBus
from agent.bus.interface import Bus
from agent.dashboard.auth import add_user
from agent.dashboard.service import Dashboard
from agent.dashboard.settings import load_dashboard_settings

PASSWORDS: Final = {"alice": "alice-password-1", "victor": "victor-password-1"}
CHROMIUM: Final = Path(os.environ.get("HUST19_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS: Final = ["--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run"]
WARD_PC: Final = {"width": 1366, "height": 768}


@pytest.fixture(scope="session")
def _users_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users.txt"
    add_user(path, "alice", "reader", PASSWORDS["alice"])
    add_user(path, "victor", "viewer", PASSWORDS["victor"])
    return path


@pytest.fixture
def users_file(tmp_path: Path, _users_master: Path) -> Path:
    path = tmp_path / "users.txt"
    shutil.copy(_users_master, path)
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def embedded_bus(data_dir: Path) -> Iterator[EmbeddedBus]:
    bus = EmbeddedBus(data_dir / "bus")
    yield bus
    bus.close()


_OWN_BUS: Final = object()


@pytest.fixture
def start_dashboard(data_dir: Path, users_file: Path,
                    embedded_bus: EmbeddedBus) -> Iterator[Callable[..., Dashboard]]:
    """Starts dashboards on ``embedded_bus`` (``bus=None``: one that opens its own)."""
    started: list[Dashboard] = []

    def start(bus: Bus | object | None = _OWN_BUS, **settings: Any) -> Dashboard:
        values: dict[str, Any] = {"data_dir": data_dir, "port": 0, "users": users_file}
        values.update(settings)
        chosen = embedded_bus if bus is _OWN_BUS else bus
        dashboard = Dashboard(load_dashboard_settings(None, values, environ={}),
                              bus=chosen)  # type: ignore[arg-type]
        dashboard.start()
        started.append(dashboard)
        return dashboard

    yield start
    for dashboard in reversed(started):
        dashboard.stop()


def login(client: httpx.Client, user: str, password: str | None = None) -> httpx.Response:
    """Log ``client`` in through the login form (nonce cookie + form field)."""
    client.get("/login")
    nonce = client.cookies.get("hust19_login", path="/login")
    return client.post("/login", data={"username": user, "csrf": nonce or "",
                                       "password": password or PASSWORDS[user], "next": "/"})


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test module: Playwright's sync API keeps an event loop running in this
    thread while it is open, which other modules' ``asyncio.run`` must not meet."""
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `./run setup` installs Debian's chromium "
                    "(apt-get install chromium chromium-driver)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=WARD_PC)
    context.set_default_timeout(10_000)
    p = context.new_page()
    yield p
    context.close()
