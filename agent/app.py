"""The running agent: components composed, started in order and stopped in reverse.

Roles:

* ``ingest``: spool (index + quarantine) -> bus -> outbox (+ series tracker) -> Storage SCP.
* ``worker``: the PACS sender (SR outbox), the LIS client, the models and the triage worker
  (:mod:`agent.triage.worker`).

``hust19 serve`` runs both in one process; ``hust19 ingest`` and ``hust19 worker`` run them
apart. With ``http_port`` set, ``/healthz``, ``/readyz`` and ``/metrics`` are served too.
Further :class:`Component` objects can be added with :meth:`Agent.add`.

Stopping is bounded (SIGTERM): the SCP stops accepting, running associations get a few seconds
to finish (then are aborted), the outbox makes a last pass to publish what is spooled, the
worker stops polling, commits what is finished and hands the rest back (redone at the next
start), the PACS sender makes a last delivery pass, then the bus and the index are closed.
Anything not published by then stays in the spool or the SR outbox and goes out at the next
start, so a stop never loses an instance that was answered Success.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

from agent.bus.factory import open_bus
from agent.bus.interface import Bus
from agent.config import Settings
from agent.durable import free_bytes
from agent.ingest.outbox import Outbox
from agent.ingest.scp import StorageSCP
from agent.ingest.series import RELEASED_FILE, SeriesTracker
from agent.ingest.spool import InstanceInfo, Spool, SpoolError, StoreOutcome, spool_disk_bytes
from agent.ops.http import HealthServer, ReadinessCheck
from agent.ops.metrics import Metrics
from schemas.errors import EngineError

if TYPE_CHECKING:
    from agent.triage.lis import LisClient
    from agent.triage.pacs import BusDeadLetters, PacsSender
    from agent.triage.worker import TriageWorker

logger = logging.getLogger(__name__)

ROLE_INGEST: Final = "ingest"
ROLE_WORKER: Final = "worker"
ALL_ROLES: Final = frozenset({ROLE_INGEST, ROLE_WORKER})
STOP_TIMEOUT_S: Final = 30.0
"""Default bound on :meth:`Agent.stop`."""
SECONDS_PER_HOUR: Final = 3600.0
READY_ECHO_TIMEOUT_S: Final = 5.0
READY_MIN_FREE_INSTANCES: Final = 4
"""/readyz fails while the data disk has room for fewer than this many instances of
``spool_pool_file_kib`` (a 2-byte probe file may still fit on a disk that refuses every
instance)."""
ASSOCIATION_GRACE_S: Final = 5.0
"""How long running associations may go on after stop() before they are aborted."""


class Component(Protocol):
    """Something the agent starts and stops (worker, PACS sender, HTTP endpoint...)."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout_s: float) -> None: ...


class Agent:
    """The composed agent with the given ``roles``; ``bus`` may be passed in (tests),
    otherwise it is opened from the settings."""

    def __init__(self, settings: Settings, *, bus: Bus | None = None,
                 roles: frozenset[str] = ALL_ROLES) -> None:
        self.settings = settings
        self.roles = roles
        self._own_bus = bus is None
        self.bus: Bus = bus if bus is not None else open_bus(
            settings.bus, settings.data_dir, compression=settings.kafka_compression,
            retention_h=settings.bus_retention_h, kafka_client=settings.kafka_client_settings)
        self.spool: Spool | None = None
        self.tracker: SeriesTracker | None = None
        self.outbox: Outbox | None = None
        self.scp: StorageSCP | None = None
        self.metrics = Metrics()
        self.worker: TriageWorker | None = None
        self.pacs: PacsSender | None = None
        self.lis: LisClient | None = None
        self.http: HealthServer | None = None
        self._dead_letters: BusDeadLetters | None = None
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
        # every role: a worker-only process on the box reports the same data folder
        self.metrics.spool_bytes.set_function(partial(spool_disk_bytes, s.data_dir))
        self.metrics.data_disk_free_bytes.set_function(partial(free_bytes, s.data_dir))
        try:
            if ROLE_INGEST in self.roles:
                self.spool = Spool(s.data_dir, pool_files=s.spool_pool_files,
                                   pool_file_bytes=s.spool_pool_file_bytes)
                removed = self.spool.recover()
                pending = self.spool.pending_count()
                self.tracker = SeriesTracker(self.spool, s.series_quiet_s, s.series_max_quiet_s,
                                             aborted_quiet_s=s.series_aborted_quiet_s,
                                             released_file=s.data_dir / RELEASED_FILE)
                self.outbox = Outbox(self.spool, self.bus, self.tracker, self.metrics,
                                     retention_s=s.spool_retention_h * SECONDS_PER_HOUR)
                self.scp = StorageSCP(s, self.spool, on_stored=self._stored,
                                      on_closed=self.tracker.association_closed,
                                      metrics=self.metrics)
                self.outbox.start()
                self.scp.start()
                self._log_start(pending, removed)
            if ROLE_WORKER in self.roles:
                self._start_worker()
            if s.http_port:
                self.http = HealthServer(s.host, s.http_port, self.metrics, self._checks())
                self.http.start()
            for component in self._extra:
                component.start()
                logger.info("started %s", component.name)
            self._started = True
        except BaseException:
            self.stop(timeout_s=5.0)
            raise

    def _start_worker(self) -> None:
        from agent.triage.lis import open_lis
        from agent.triage.pacs import BusDeadLetters, PacsSender
        from agent.triage.worker import TriageModels, TriageWorker

        s = self.settings
        self._dead_letters = BusDeadLetters(self.bus, self.metrics)
        self.pacs = PacsSender.from_settings(s, metrics=self.metrics,
                                             dead_letter=self._dead_letters)
        self.pacs.start()
        self.lis = open_lis(s)
        models = TriageModels.load(s.backend)
        self.worker = TriageWorker(s, self.bus, pacs=self.pacs, lis=self.lis, models=models,
                                   metrics=self.metrics)
        self.worker.start()
        logger.info("worker: LIS %s, PACS %s, threshold %s, backend %s", self.lis.display_url,
                    ", ".join(map(str, s.pacs)) or "none (SRs are built but not sent)",
                    s.threshold, models.backend_name)

    def _checks(self) -> dict[str, ReadinessCheck]:
        """Readiness checks for ``/readyz``: each raises when its dependency is not usable."""
        checks: dict[str, ReadinessCheck] = {"bus": self.bus.ping}
        if self.spool is not None:
            checks["spool"] = self._check_spool
        if self.lis is not None:
            checks["lis"] = self.lis.ping
        if self.pacs is not None:
            from agent.triage.pacs import tls_context_for, verify

            tls = tls_context_for(self.settings)
            for dest in self.settings.pacs:  # takes our AE title and the SR SOP class
                checks[f"pacs {dest}"] = partial(verify, dest, self.settings.ae_title,
                                                 tls_context=tls,
                                                 timeout_s=READY_ECHO_TIMEOUT_S)
        if ROLE_WORKER in self.roles:
            checks["models"] = self._check_models
        return checks

    def _check_spool(self) -> None:
        probe = self.settings.data_dir / ".readyz"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
            free = free_bytes(self.settings.data_dir)
        except OSError as exc:
            raise SpoolError(f"spool {self.settings.data_dir} not writable: {exc}") from exc
        need = READY_MIN_FREE_INSTANCES * self.settings.spool_pool_file_bytes
        if free < need:
            raise SpoolError(f"spool {self.settings.data_dir}: {free / 2**20:.1f} MiB free, "
                             f"less than {READY_MIN_FREE_INSTANCES} instances need "
                             f"({need / 2**20:.1f} MiB): new instances are answered 0xA700 "
                             f"Out of Resources")
        if self.spool is not None:
            self.metrics.spool_depth.set(self.spool.pending_count())

    def _check_models(self) -> None:
        if self.worker is None:
            raise EngineError("models not loaded")
        if self.pacs is not None:
            self.metrics.outbox_depth.set(self.pacs.pending_count())

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

        if self.scp is not None:
            self.scp.stop(min(ASSOCIATION_GRACE_S, left()))
            self.scp = None
        if self.outbox is not None:
            drained = self.outbox.stop(left())
            logger.info("outbox stopped: %d instances and %d series events published in this "
                        "run%s", self.outbox.published, self.outbox.series_events,
                        "" if drained else "; the rest is published at the next start")
            self.outbox = None
        for component in reversed(self._extra):
            try:
                component.stop(left())
            except Exception:
                logger.exception("stopping %s failed", component.name)
        if self.worker is not None:
            self.worker.stop(left())
            self.worker = None
        if self.pacs is not None:
            self.pacs.stop(left())
            logger.info("PACS sender stopped; %d deliveries pending for the next start",
                        self.pacs.pending_count())
            self.pacs = None
        if self._dead_letters is not None:
            self._dead_letters.close()
            self._dead_letters = None
        if self.lis is not None:
            self.lis.close()
            self.lis = None
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self._own_bus:
            try:
                self.bus.close()
            except Exception:
                logger.exception("closing the bus failed")
        if self.spool is not None:
            if self.tracker is not None:  # a clean stop: say which open series were released
                self.tracker.save_released(self.settings.data_dir / RELEASED_FILE)
            self.spool.close()
            self.spool = None
        self._started = False
