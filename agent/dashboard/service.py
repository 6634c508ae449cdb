"""The dashboard role composed: store, bus consumer, change feed, web server; started in that
order and stopped in reverse.

The web server is uvicorn in a thread of its own (its event loop serves the pages and the live
streams; signals are the caller's: uvicorn handles none outside the main thread); the consumer
is another thread. :meth:`Dashboard.start` returns once the server
listens, so tests and the CLI alike get the address from :attr:`Dashboard.url`. uvicorn's own
proxy-header handling is off (the dashboard decides whom to believe, see
:mod:`agent.dashboard.auth`) and so is its access log (request lines carry search terms).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Final

import uvicorn

from agent.bus.factory import open_bus
from agent.bus.interface import Bus
from agent.dashboard.app import DashboardState, create_app
from agent.dashboard.auth import LoginLimiter, TrustedProxies, UserDirectory
from agent.dashboard.consumer import DashboardConsumer
from agent.dashboard.feed import ChangeFeed
from agent.dashboard.settings import DashboardSettings
from agent.dashboard.store import Store
from agent.triage.lis import LisClient
from schemas.errors import ConfigError, Hust19Error

logger = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 15.0
GRACEFUL_SHUTDOWN_S: Final = 3


class Dashboard:
    """The dashboard on ``settings``; ``bus`` may be passed in (tests), otherwise it is opened
    from the settings and closed with the dashboard."""

    def __init__(self, settings: DashboardSettings, *, bus: Bus | None = None,
                 limiter: LoginLimiter | None = None) -> None:
        self.settings = settings
        self._own_bus = bus is None
        self.bus: Bus | None = bus
        self.store: Store | None = None
        self.feed = ChangeFeed()
        self.consumer: DashboardConsumer | None = None
        self.users = UserDirectory(settings.users_file)
        self.limiter = limiter or LoginLimiter()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._lis: LisClient | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            return self.settings.port
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind, named for clients
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.settings.tls else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        """Open the store and the bus, start consuming and serving; on failure stop what was
        started and re-raise."""
        s = self.settings
        if s.auth == "password" and len(self.users) == 0:
            raise ConfigError(f"no users in {s.users_file}: add one with `hust19 dashboard "
                              f"add-user NAME --users {s.users_file}` (or use --auth proxy)")
        try:
            self.store = Store(s.db_url)
            self.store.create()
            self.store.secret()
            if self.bus is None:
                self.bus = open_bus(s.bus, s.data_dir)
            self.consumer = DashboardConsumer(
                self.bus, self.store, s.consumer_group, on_change=self.feed.publish,
                retention=timedelta(days=s.retention_days) if s.retention_days else None)
            self.consumer.start()
            self._open_lis()
            self._serve()
        except BaseException:
            self.stop()
            raise
        self._log_start()

    def _open_lis(self) -> None:
        url = self.settings.lis_url
        if url is None:
            return
        from agent.triage.lis_mapping import LisMapping

        mapping = LisMapping.load(self.settings.lis_mapping) if self.settings.lis_mapping \
            else None
        self._lis = LisClient(url, mapping, window_days=self.settings.lis_window_days)

    def _serve(self) -> None:
        s = self.settings
        assert self.store is not None and self.consumer is not None and self.bus is not None
        state = DashboardState(
            settings=s, store=self.store, feed=self.feed, users=self.users,
            consumer_status=self.consumer.status, bus_describe=self.bus.describe(),
            bus=self.bus, lis=self._lis, limiter=self.limiter,
            proxies=TrustedProxies(s.trusted_proxy))
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"dashboard cannot listen on {s.host}:{s.port}: {exc}") from exc
        sock.listen(128)
        sock.set_inheritable(True)
        self._socket = sock
        config = uvicorn.Config(
            create_app(state), log_config=None, access_log=False, proxy_headers=False,
            server_header=False, lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
            ssl_keyfile=str(s.tls_key) if s.tls_key else None)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=self._run_server, args=(server, sock),
                                        name="hust19-dashboard-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive():
                raise ConfigError("dashboard web server did not start (see the log above)")
            if time.monotonic() > deadline:
                raise ConfigError(f"dashboard web server did not start in {START_TIMEOUT_S} s")
            time.sleep(0.02)

    @staticmethod
    def _run_server(server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException:
            logger.exception("dashboard web server stopped with an error")

    def _log_start(self) -> None:
        s = self.settings
        assert self.store is not None and self.bus is not None
        if s.auth == "proxy":
            who = (f"reverse proxy: X-Forwarded-User believed from "
                   f"{', '.join(s.trusted_proxy)}; users not in {s.users_file} are "
                   f"{s.proxy_default_role}s")
        else:
            who = f"login with the {len(self.users)} user(s) of {s.users_file}"
        logger.info("dashboard on %s (%s; TLS %s)", self.url, who, "on" if s.tls else
                    "off: use --tls-cert/--tls-key or a TLS proxy beyond this machine")
        logger.info("dashboard database: %s%s", self.store.display_url,
                    " (SQLite, for one box; --db postgresql://... for a database server)"
                    if self.store.is_sqlite else "")
        logger.info("dashboard reads %s as group %s", self.bus.describe(), s.consumer_group)
        if self._lis is not None:
            logger.info("dashboard shows lab values from the LIS %s", self._lis.display_url)
        if not s.tls and s.host not in ("127.0.0.1", "::1", "localhost") \
                and s.auth == "password":
            logger.warning("dashboard: passwords and patient data travel unencrypted on "
                           "%s:%d: set --tls-cert/--tls-key", s.host, self.port)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving (live streams end), stop consuming, close the store and the bus."""
        self.feed.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._server = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self.consumer is not None:
            self.consumer.stop(timeout_s)
            self.consumer = None
        if self._lis is not None:
            self._lis.close()
            self._lis = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._own_bus and self.bus is not None:
            try:
                self.bus.close()
            except Hust19Error:
                logger.exception("closing the bus failed")
            self.bus = None
