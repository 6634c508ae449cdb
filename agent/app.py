"""The running agent: components composed, started in order and stopped in reverse.

The ingest role is: spool (index + quarantine) -> bus -> outbox (+ series tracker) -> Storage
SCP. Other roles (the worker, the PACS sender, the HTTP endpoint) are added as further
:class:`Component` objects with :meth:`Agent.add`; they start after the ingest components and
stop before them.

Stopping is bounded: the SCP stops accepting, running associations get a few seconds to finish
(then are aborted), the outbox makes a last pass to flush what is spooled, then the bus and the
index are closed. Anything not published by then stays in the spool and is published at the
next start, so a stop never loses an instance that was answered Success.
"""

from __future__ import annotations

import logging
import time
from typing import Final, Protocol

from agent.bus import Bus, open_bus
from agent.config import Settings
from agent.ingest import StorageSCP
from agent.outbox import Outbox
from agent.series import SeriesTracker
from agent.spool import InstanceInfo, Spool, StoreOutcome

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S: Final = 30.0
"""Default bound on :meth:`Agent.stop`."""
ASSOCIATION_GRACE_S: Final = 5.0
"""How long running associations may go on after stop() before they are aborted."""


class Component(Protocol):
    """Something the agent starts and stops (worker, PACS sender, HTTP endpoint...)."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout_s: float) -> None: ...


class Agent:
    """The composed agent. ``roles`` is ``{"ingest"}`` for now (``serve`` = ``ingest`` until
    the worker exists); ``bus`` may be passed in (tests), otherwise opened from settings."""

    def __init__(self, settings: Settings, *, bus: Bus | None = None,
                 roles: frozenset[str] = frozenset({"ingest"})) -> None:
        self.settings = settings
        self.roles = roles
        self._own_bus = bus is None
        self.bus: Bus = bus if bus is not None else open_bus(
            settings.bus, settings.data_dir, compression=settings.kafka_compression)
        self.spool: Spool | None = None
        self.tracker: SeriesTracker | None = None
        self.outbox: Outbox | None = None
        self.scp: StorageSCP | None = None
        self._extra: list[Component] = []
        self._started = False

    def add(self, component: Component) -> None:
        """Add a component started after (and stopped before) the ingest components."""
        self._extra.append(component)

    @property
    def port(self) -> int:
        """The DICOM port the SCP listens on."""
        return self.scp.port if self.scp is not None else self.settings.port

    def start(self) -> None:
        """Start every component; on failure stop what was started and re-raise."""
        s = self.settings
        try:
            if "ingest" in self.roles:
                self.spool = Spool(s.data_dir)
                removed = self.spool.recover()
                pending = self.spool.pending_count()
                self.tracker = SeriesTracker(self.spool, s.series_quiet_s, s.series_max_quiet_s)
                self.outbox = Outbox(self.spool, self.bus, self.tracker)
                self.scp = StorageSCP(s, self.spool, on_stored=self._stored,
                                      on_closed=self.tracker.association_closed)
                self.outbox.start()
                self.scp.start()
                self._log_start(pending, removed)
            for component in self._extra:
                component.start()
                logger.info("started %s", component.name)
            self._started = True
        except BaseException:
            self.stop(timeout_s=5.0)
            raise

    def _stored(self, assoc_key: int, info: InstanceInfo, outcome: StoreOutcome) -> None:
        if self.tracker is not None:
            self.tracker.instance_stored(assoc_key, info, outcome)
        if self.outbox is not None and outcome is StoreOutcome.STORED:
            self.outbox.wake()

    def _log_start(self, pending: int, removed: int) -> None:
        s = self.settings
        logger.info("bus: %s", self.bus.describe())
        if s.bus == "embedded":
            logger.info("scale: the embedded bus and SQLite serve ONE box; for more, run "
                        "ingest and workers against Kafka (--bus kafka://host:port)")
        logger.info("DICOM listener: AE title %s on %s:%d, TLS %s%s, allowed calling AEs: %s",
                    s.ae_title, s.host, self.port, "on" if s.tls_cert else "off",
                    " (client certificates required)" if s.tls_ca else "",
                    ", ".join(s.allow_ae) if s.allow_ae else "ANY")
        logger.info("spool: %s (%d instances indexed, %d waiting for the bus%s); series "
                    "complete after %.1f s quiet once released, %.1f s regardless",
                    s.data_dir.resolve(), self.spool.instance_count() if self.spool else 0,
                    pending, f", {removed} unacknowledged partial files removed" if removed
                    else "", s.series_quiet_s, s.series_max_quiet_s)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop accepting, flush the outbox, close; bounded by about ``timeout_s``."""
        deadline = time.monotonic() + timeout_s

        def left() -> float:
            return max(0.5, deadline - time.monotonic())

        for component in reversed(self._extra):
            try:
                component.stop(left())
            except Exception:
                logger.exception("stopping %s failed", component.name)
        if self.scp is not None:
            self.scp.stop(min(ASSOCIATION_GRACE_S, left()))
            self.scp = None
        if self.outbox is not None:
            drained = self.outbox.stop(left())
            logger.info("outbox stopped: %d instances and %d series events published in this "
                        "run%s", self.outbox.published, self.outbox.series_events,
                        "" if drained else "; the rest is published at the next start")
            self.outbox = None
        if self._own_bus:
            try:
                self.bus.close()
            except Exception:
                logger.exception("closing the bus failed")
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self._started = False
