"""What the IT page shows of the agent's other roles: each configured role's ``/readyz`` (every
check and its state) and the ``hust19_consumer_lag`` it exports on ``/metrics``; and, on the
embedded bus, every consumer group's lag on every topic read from the bus folder itself.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

from agent.bus.interface import Bus
from schemas.errors import BusError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S: Final = 2.0
MAX_BODY: Final = 1 << 20
_LAG_LINE: Final = re.compile(r"^hust19_consumer_lag(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


@dataclass(frozen=True)
class RoleState:
    """One role's answer: ``ready`` True/False, or ``None`` when it could not be asked."""

    name: str
    url: str
    ready: bool | None
    checks: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    consumer_lag: float | None = None


@dataclass(frozen=True)
class GroupLag:
    group: str
    topic: str
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


def _get(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as resp:  # noqa: S310
            return int(resp.status), resp.read(MAX_BODY)
    except urllib.error.HTTPError as exc:  # 503 carries the report too
        return int(exc.code), exc.read(MAX_BODY)


def probe_role(name: str, base_url: str) -> RoleState:
    """Ask one role for ``/readyz`` (and ``/metrics`` for its consumer lag)."""
    base = base_url.rstrip("/")
    try:
        status, body = _get(base + "/readyz")
    except (OSError, ValueError) as exc:
        return RoleState(name, base, None, error=f"not reachable: {exc}")
    try:
        report = json.loads(body)
        checks = {str(k): str(v) for k, v in report.items()} if isinstance(report, dict) \
            else {}
    except ValueError:
        checks = {}
    lag: float | None = None
    try:
        m_status, metrics = _get(base + "/metrics")
        if m_status == 200:
            values = [float(v) for v in _LAG_LINE.findall(metrics.decode("utf-8", "replace"))]
            lag = sum(values) if values else None
    except (OSError, ValueError):
        lag = None
    return RoleState(name, base, status == 200, checks,
                     None if status in (200, 503) else f"HTTP {status}", lag)


def probe_roles(roles: dict[str, str]) -> list[RoleState]:
    """Every configured role, asked in parallel (each within :data:`PROBE_TIMEOUT_S`)."""
    if not roles:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(roles))) as pool:
        return list(pool.map(lambda item: probe_role(*item), sorted(roles.items())))


def embedded_group_lags(bus: Bus) -> list[GroupLag]:
    """Every consumer group's committed offset against the end of each topic, on the embedded
    bus (an empty list on Kafka, where each role's ``/metrics`` tells its lag)."""
    from agent.bus.embedded import EmbeddedBus

    if not isinstance(bus, EmbeddedBus):
        return []
    out: list[GroupLag] = []
    try:
        for topic in bus.topics():
            end = bus.log(topic).refresh()
            for group, committed in sorted(bus.committed_offsets(topic).items()):
                out.append(GroupLag(group, topic, committed, end))
    except (BusError, OSError) as exc:
        logger.warning("dashboard: embedded bus lag unknown: %s", exc)
    return out
