"""The outbox: publishes spooled instances (and series-completion events) to the bus.

The spool index is the queue: rows with ``published_at IS NULL`` in arrival order. One
background thread takes a batch, sends each instance to ``dicom.instances`` (key =
SeriesInstanceUID, value = the Part-10 file bytes as spooled, headers = schema version and
UIDs), calls ``producer.flush()`` and only when that returned marks the batch published. A crash
between flush and mark would send the batch again after restart; so at its first pass the
outbox reads the newest records of ``dicom.instances`` and ``dicom.series``
(:meth:`agent.bus.interface.Bus.recent`, :data:`RECONCILE_RECORDS` per partition) and marks
what it finds there as published instead of sending it twice (issue 20: a kill -9 between
flush and mark put a batch of 31 instances on the bus twice). Where the bus cannot tell,
delivery stays at-least-once, and a duplicate is harmless downstream (the SOP Instance UID is
in the headers).

While a stream of instances is arriving the outbox waits for it to pause (at most
``YIELD_MAX_S``), so that its bus writes do not compete with the listener's fsyncs.

If the bus is down the SCP keeps accepting into the spool; the outbox retries with
exponential backoff (``BACKOFF_INITIAL_S`` doubling up to ``BACKOFF_MAX_S``, a new producer each
time) and catches up when the bus returns. After each pass it asks the
:class:`agent.ingest.series.SeriesTracker` which series are complete and publishes their events on
``dicom.series`` through the same producer, after their instances (flush, then mark).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Final

from agent.bus.interface import Bus, Headers, Producer
from agent.ingest.series import SeriesTracker
from agent.ingest.spool import PRUNE_BATCH, RECEIVING_GAP_S, Spool, SpooledInstance, SpoolError
from agent.ops.metrics import Metrics
from schemas import topics
from schemas.errors import Hust19Error
from schemas.messages import SERIES_SCHEMA, InstanceHeaders, SeriesEvent, dump_json

logger = logging.getLogger(__name__)

BATCH_MAX: Final = 64
"""Instances per send-and-flush round."""
BATCH_MAX_BYTES: Final = 16 << 20
"""About this many bytes per round (kafka-python's default buffer is 32 MiB)."""
POLL_S: Final = 0.2
"""Idle wake-up period (series quiet timers are checked this often)."""
COALESCE_S: Final = 0.05
"""After a wake-up, wait this long for more instances, so that one ``flush()`` (an fsync on the
embedded bus) covers a batch rather than every instance while a series streams in; it also
keeps the publisher from competing with the listener for the disk and the GIL per instance."""
YIELD_MAX_S: Final = 2.0
"""While a stream arrives the outbox waits for it to pause, at most this long: its bus appends
and fsyncs would share the disk with the listener's, whose fsync is on every C-STORE's path
(measured ~10 % more instances/s for one 300-instance association). Shorter than the series
quiet time, so a series' instances are on the bus before its completion event is due."""
BACKOFF_INITIAL_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
FLUSH_TIMEOUT_S: Final = 60.0
RECONCILE_RECORDS: Final = 2 * BATCH_MAX
"""How many of the newest records per partition the first pass checks (the batch a crash
can leave flushed but unmarked is the last one sent)."""
PRUNE_EVERY_S: Final = 60.0
"""How often the outbox deletes spool files older than the retention (more often when the
retention itself is shorter; a full batch deleted: again at the next pass)."""


def instance_headers(instance: SpooledInstance) -> Headers:
    """The ``dicom.instances`` headers of a spooled instance (validated by the model)."""
    model = InstanceHeaders(
        study_uid=instance.study_uid, series_uid=instance.series_uid,
        sop_instance_uid=instance.sop_instance_uid, sop_class_uid=instance.sop_class_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid, calling_ae=instance.calling_ae,
        received_at=datetime.fromtimestamp(instance.received_at, UTC))
    return [
        (topics.H_SCHEMA, model.schema_.encode()),
        (topics.H_STUDY_UID, model.study_uid.encode()),
        (topics.H_SERIES_UID, model.series_uid.encode()),
        (topics.H_SOP_INSTANCE_UID, model.sop_instance_uid.encode()),
        (topics.H_SOP_CLASS_UID, model.sop_class_uid.encode()),
        (topics.H_TRANSFER_SYNTAX, model.transfer_syntax_uid.encode()),
        (topics.H_CALLING_AE, model.calling_ae.encode()),
        (topics.H_RECEIVED_AT, model.received_at.isoformat().encode()),
    ]


def series_headers(event: SeriesEvent) -> Headers:
    """The ``dicom.series`` headers: schema version and UIDs (the value is the JSON)."""
    return [(topics.H_SCHEMA, SERIES_SCHEMA.encode()),
            (topics.H_STUDY_UID, event.study_uid.encode()),
            (topics.H_SERIES_UID, event.series_uid.encode())]


class Outbox:
    """Spool -> bus publisher thread. :meth:`publish_pending` does one synchronous pass (also
    usable without the thread); :meth:`start`/:meth:`stop` run it in the background."""

    def __init__(self, spool: Spool, bus: Bus, tracker: SeriesTracker | None = None,
                 metrics: Metrics | None = None, retention_s: float = 0.0) -> None:
        """``retention_s`` > 0: spool files published longer ago than that are deleted
        (:meth:`Spool.prune`) by the background thread; 0 keeps them."""
        self.spool = spool
        self.bus = bus
        self.tracker = tracker
        self.metrics = metrics
        self._producer: Producer | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = BACKOFF_INITIAL_S
        self._topics_ready = False
        self.published = 0
        self.series_events = 0
        self.last_error: str | None = None
        self.retention_s = retention_s
        self.pruned = 0
        self._next_prune = 0.0
        self._last_wake = 0.0
        self.passes = 0
        """Passes of the background thread so far (tests wait on it instead of sleeping)."""
        self._reconciled = False
        self._on_bus_series: set[tuple[str, int]] = set()
        """(series, generation) of the completion events found on the bus at the start."""

    # -- one pass ------------------------------------------------------------------------

    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer = self.bus.producer()
        return self._producer

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close()

    def publish_pending(self) -> int:
        """Index the answered instances whose index row failed (``Spool.index_unindexed``),
        publish every pending instance (batch by batch), then the due series events.
        Returns the number of instances published; raises ``Hust19Error`` (``BusError``)
        when the bus fails: what was flushed before stays marked."""
        if not self._topics_ready:
            self.bus.ensure_topics([topics.DICOM_INSTANCES, topics.DICOM_SERIES])
            self._topics_ready = True
        if not self._reconciled:
            self._reconcile()
            self._reconciled = True
        try:
            self.spool.index_unindexed()
        except SpoolError as exc:  # still failing: the next pass tries again
            logger.warning("outbox: %s", exc.message)
        total = 0
        while True:
            batch = self.spool.pending(BATCH_MAX, BATCH_MAX_BYTES)
            if not batch:
                break
            total += self._publish_batch(batch)
        self._publish_series()
        return total

    def _reconcile(self) -> None:
        """Mark as published what a previous run flushed to the bus but did not mark (it
        stopped in between), so that it is not published twice."""
        on_bus = {m.header(topics.H_SOP_INSTANCE_UID)
                  for m in self.bus.recent(topics.DICOM_INSTANCES, RECONCILE_RECORDS)}
        pending = self.spool.pending(RECONCILE_RECORDS, BATCH_MAX_BYTES * 2)
        found = [i for i in pending if i.sop_instance_uid in on_bus]
        if found:
            self.spool.mark_published([i.id for i in found])
            logger.warning("outbox: %d instances were on the bus already (flushed before the "
                           "last stop, not marked): marked, not published again (series %s)",
                           len(found), ", ".join(sorted({i.series_uid for i in found})))
        for m in self.bus.recent(topics.DICOM_SERIES, RECONCILE_RECORDS):
            try:
                event = SeriesEvent.model_validate_json(m.value)
            except ValueError:
                continue
            self._on_bus_series.add((event.series_uid, event.generation))

    def _publish_batch(self, batch: list[SpooledInstance]) -> int:
        producer = self._get_producer()
        sent: list[SpooledInstance] = []
        for instance in batch:
            try:
                value = self.spool.read(instance)
            except SpoolError as exc:
                logger.error("outbox: %s; this instance cannot be published and is taken out "
                             "of the queue", exc.message)
                self.spool.mark_failed(instance.id, exc.message)
                continue
            producer.send(topics.DICOM_INSTANCES, instance.series_uid.encode(), value,
                          instance_headers(instance))
            sent.append(instance)
        producer.flush(FLUSH_TIMEOUT_S)
        self.spool.mark_published([i.id for i in sent])
        self.published += len(sent)
        if sent:
            logger.debug("outbox: published %d instances (series %s)", len(sent),
                         ", ".join(sorted({i.series_uid for i in sent})))
        return len(sent)

    def _publish_series(self) -> None:
        if self.tracker is None:
            return
        events = self.tracker.due()
        for event in [e for e in events if (e.series_uid, e.generation) in self._on_bus_series]:
            logger.warning("outbox: the completion event of series %s (generation %d) was on "
                           "the bus already (flushed before the last stop): not sent again",
                           event.series_uid, event.generation)
            self.tracker.completed(event)
            self._on_bus_series.discard((event.series_uid, event.generation))
            events.remove(event)
        if not events:
            return
        producer = self._get_producer()
        for event in events:
            producer.send(topics.DICOM_SERIES, event.series_uid.encode(), dump_json(event),
                          series_headers(event))
        producer.flush(FLUSH_TIMEOUT_S)
        for event in events:
            self.tracker.completed(event)
            self.series_events += 1
            if self.metrics is not None:
                self.metrics.series_completed.inc()

    # -- background thread ---------------------------------------------------------------

    def wake(self) -> None:
        """Something was spooled: publish soon."""
        self._last_wake = time.monotonic()
        self._wake.set()

    def start(self) -> None:
        """Start the publisher thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hust19-outbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.publish_pending()
            except Exception as exc:
                self._failed(exc)
                if self._stop.wait(self._backoff):
                    break
                self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
                continue
            if self.last_error is not None:
                logger.info("outbox: bus reachable again (%s); caught up", self.bus.describe())
                self.last_error = None
            self._backoff = BACKOFF_INITIAL_S
            self._prune_due()
            self.passes += 1
            if self._stop.is_set():
                break
            if self._wake.wait(POLL_S) and not self._stop.is_set():
                self._stop.wait(COALESCE_S)
                self._yield_while_receiving()
            self._wake.clear()

    def _yield_while_receiving(self) -> None:
        """Wait while instances keep arriving (see :data:`YIELD_MAX_S`), at most that long."""
        deadline = time.monotonic() + YIELD_MAX_S
        while (time.monotonic() - self._last_wake < RECEIVING_GAP_S
               and time.monotonic() < deadline and not self._stop.is_set()):
            self._stop.wait(RECEIVING_GAP_S / 2)

    def _prune_due(self) -> None:
        """Delete one batch of expired spool files when the retention is on and it is time."""
        now = time.monotonic()
        if self.retention_s <= 0 or now < self._next_prune:
            return
        try:
            deleted = self.spool.prune(time.time() - self.retention_s)
        except SpoolError as exc:
            logger.warning("outbox: spool pruning failed: %s", exc.message)
            deleted = 0
        if deleted:
            self.pruned += deleted
            logger.info("spool: deleted %d files published more than %.1f s ago", deleted,
                        self.retention_s)
        every = min(PRUNE_EVERY_S, self.retention_s)
        self._next_prune = now if deleted >= PRUNE_BATCH else now + every

    def _failed(self, exc: Exception) -> None:
        message = exc.message if isinstance(exc, Hust19Error) else f"{type(exc).__name__}: {exc}"
        if message != self.last_error:
            log = logger.warning if isinstance(exc, Hust19Error) else logger.error
            log("outbox: cannot publish (%s); %d instances wait in the spool, retrying with "
                "backoff (the listener keeps accepting)", message, self.spool.pending_count(),
                exc_info=not isinstance(exc, Hust19Error))
        self.last_error = message
        self._drop_producer()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the thread after a last pass over what is pending (waiting at most
        ``timeout_s``). Returns ``True`` if nothing is left unpublished; what is left stays in
        the spool and is published at the next start."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("outbox: still blocked on the bus after %.0f s at shutdown; "
                               "leaving it", timeout_s)
                return False
        left = self.spool.pending_count()
        if left:
            logger.warning("outbox stopped with %d instances not yet on the bus; they stay in "
                           "the spool and are published at the next start", left)
        self._drop_producer()
        return left == 0
