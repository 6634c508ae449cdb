"""``/healthz`` (liveness), ``/readyz`` (dependencies reachable) and Prometheus ``/metrics``.

Readiness is a list of named checks, each a callable that raises (any :class:`Hust19Error`)
when its dependency is not usable; ``/readyz`` answers 200 with every check's state as JSON,
or 503 naming the failing ones. A check may also return an object whose ``warning`` text says
that the dependency works but not fully (an empty LIS): reported as ``"warning: ..."``,
without failing readiness.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.ops.metrics import Metrics
from schemas.errors import Hust19Error

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], object]
"""Raises when its dependency is not usable; what it returns counts only through a ``warning``
attribute holding text (see the module doc)."""
WARNING_PREFIX = "warning: "


class HealthServer:
    """A small HTTP server in a daemon thread."""

    def __init__(self, host: str, port: int, metrics: Metrics,
                 checks: dict[str, ReadinessCheck]) -> None:
        self.metrics = metrics
        self.checks = checks
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._send(HTTPStatus.OK, b'{"status":"ok"}\n', "application/json")
                elif self.path == "/readyz":
                    ok, report = server.readiness()
                    body = (json.dumps(report) + "\n").encode()
                    self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body,
                               "application/json")
                elif self.path == "/metrics":
                    self._send(HTTPStatus.OK, generate_latest(server.metrics.registry),
                               CONTENT_TYPE_LATEST)
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

            def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http %s", format % args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hust19-http",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Run every check; ``(none failed, name -> "ok", "warning: ..." or the reason)``."""
        report: dict[str, str] = {}
        failed = False
        for name, check in self.checks.items():
            try:
                warning = getattr(check(), "warning", None)
                report[name] = WARNING_PREFIX + warning if isinstance(warning, str) \
                    and warning else "ok"
                continue
            except Hust19Error as exc:
                report[name] = exc.message
            except Exception as exc:  # a check must never take the endpoint down
                report[name] = f"{type(exc).__name__}: {exc}"
            failed = True
        return not failed, report

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics on http://%s:%d (/healthz /readyz /metrics)",
                 self._httpd.server_address[0], self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
