"""The dashboard's consumer: reads ``triage.results``, ``triage.evidence`` and ``triage.dlq``
as its own consumer group and fills the store.

Delivery: each poll's messages go into the store in one transaction, and only then are their
offsets committed; a crash in between redelivers them, which the store ignores (it is
idempotent, see :mod:`agent.dashboard.store`). A message that is not a valid result, evidence
set or dead letter is logged (topic, partition, offset and the validation error, never its
content: it may carry patient data) and skipped, so one bad message never stops the worklist.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from pydantic import ValidationError

from agent.bus.interface import Bus, Consumer, Message
from agent.dashboard.store import (
    PRUNE_BATCH,
    DeadLetterItem,
    EvidenceItem,
    Item,
    ResultItem,
    Store,
    decode_thumbnail,
)
from schemas import topics
from schemas.errors import BusError, Hust19Error, InputError
from schemas.messages import DeadLetter, EvidenceThumbnails, parse_result

logger = logging.getLogger(__name__)

TOPICS: Final = (topics.TRIAGE_RESULTS, topics.TRIAGE_EVIDENCE, topics.TRIAGE_DLQ)
POLL_TIMEOUT_S: Final = 0.2
POLL_BATCH: Final = 500
LAG_INTERVAL_S: Final = 2.0
RETRY_S: Final = 2.0
PRUNE_INTERVAL_S: Final = 600.0
"""How often the retention runs (it deletes by age: ten minutes late is within its meaning)."""

_Batch = tuple[list[Item], dict[tuple[str, int], int], int]


@dataclass
class ConsumerStatus:
    """What the IT page shows of the dashboard's own consumer (thread-safe snapshot)."""

    group: str
    lag: dict[str, int] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    ends: dict[str, int] = field(default_factory=dict)
    stored: int = 0
    skipped: int = 0
    last_message_at: float | None = None
    last_error: str | None = None
    running: bool = False


def decode(msg: Message) -> Item:
    """The store item of one message; :class:`InputError` if it does not match its schema."""
    try:
        if msg.topic == topics.TRIAGE_RESULTS:
            return ResultItem(parse_result(msg.value))
        if msg.topic == topics.TRIAGE_EVIDENCE:
            evidence = EvidenceThumbnails.model_validate_json(msg.value)
            return EvidenceItem(evidence, tuple(decode_thumbnail(s.png_b64)
                                                for s in evidence.slices))
        if msg.topic == topics.TRIAGE_DLQ:
            return DeadLetterItem(DeadLetter.model_validate_json(msg.value), msg.partition,
                                  msg.offset)
    except (ValidationError, ValueError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        detail = (f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first
                  else type(exc).__name__)
        raise InputError(f"not a valid {msg.topic} message ({detail})") from exc
    raise InputError(f"unexpected topic {msg.topic}")


class DashboardConsumer:
    """A consumer-group member in a thread of its own; ``on_change`` is called after each
    commit that changed the store."""

    def __init__(self, bus: Bus, store: Store, group_id: str,
                 on_change: Callable[[], object] | None = None,
                 retention: timedelta | None = None) -> None:
        """``retention``: results and dead letters older than this are deleted from the store
        (:meth:`Store.prune`) at start and every :data:`PRUNE_INTERVAL_S`; ``None`` keeps
        everything."""
        self.bus = bus
        self.store = store
        self.group_id = group_id
        self.on_change = on_change
        self.retention = retention
        self._pruned_at: float | None = None
        self._consumer: Consumer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._status = ConsumerStatus(group_id)
        self._lag_checked = 0.0
        self._pending: _Batch | None = None

    def status(self) -> ConsumerStatus:
        with self._lock:
            s = self._status
            return ConsumerStatus(s.group, dict(s.lag), dict(s.positions), dict(s.ends),
                                  s.stored, s.skipped, s.last_message_at, s.last_error,
                                  s.running)

    def open(self) -> None:
        if self._consumer is None:
            self.bus.ensure_topics(list(TOPICS))
            self._consumer = self.bus.consumer(self.group_id, list(TOPICS))
            logger.info("dashboard consumer joined group %s on %s", self.group_id,
                        self.bus.describe())

    def start(self) -> None:
        self.open()
        with self._lock:
            self._status.running = True
        self._thread = threading.Thread(target=self._run, name="hust19-dashboard-consumer",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        with self._lock:
            self._status.running = False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                with self._lock:
                    self._status.last_error = None
            except Hust19Error as exc:
                logger.error("dashboard consumer: %s (retrying in %.0f s)", exc.message, RETRY_S)
                with self._lock:
                    self._status.last_error = exc.message
                self._stop.wait(RETRY_S)
            except Exception as exc:  # the loop survives anything: log it, go on
                logger.exception("dashboard consumer: unexpected error (continuing)")
                with self._lock:
                    self._status.last_error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(RETRY_S)

    def prune_due(self, now: float | None = None) -> int:
        """Apply the retention if it is due (at the first call, then every
        :data:`PRUNE_INTERVAL_S`); how many results and dead letters were deleted."""
        stamp = time.monotonic() if now is None else now
        if self.retention is None or (self._pruned_at is not None
                                      and stamp - self._pruned_at < PRUNE_INTERVAL_S):
            return 0
        self._pruned_at = stamp
        before = datetime.now(UTC) - self.retention
        deleted = 0
        while True:
            stats = self.store.prune(before)
            deleted += stats.results + stats.dead_letters
            if stats.results < PRUNE_BATCH and stats.dead_letters < PRUNE_BATCH:
                break
        if deleted:
            logger.info("dashboard retention: %d results and dead letters older than %s "
                        "deleted", deleted, self.retention)
            if self.on_change is not None:
                self.on_change()
        return deleted

    def run_once(self, timeout_s: float = POLL_TIMEOUT_S) -> int:
        """Poll once, store what came, commit; returns the number of messages handled.

        A batch the store could not take (database down) is kept and tried again before the
        next poll: the consumer's position has moved past it, so it must not be dropped. A
        failed commit drops nothing: the messages come again and the store ignores them."""
        self.open()
        assert self._consumer is not None
        self.prune_due()
        if self._pending is None:
            messages = self._consumer.poll(timeout_s, POLL_BATCH)
            if not messages:
                self._update_lag()
                return 0
            self._pending = self._decode(messages)
        items, offsets, skipped = self._pending
        stats = self.store.apply(items)
        # stored: whatever the commit does, the batch is done here (if the commit fails, e.g.
        # the partitions moved to another member, they are delivered again: harmless)
        self._pending = None
        logger.debug("dashboard: %d messages stored (%d new, %d replaced, %d evidence, "
                     "%d dead letters, %d unchanged), %d skipped", len(items), stats.new,
                     stats.replaced, stats.evidence, stats.dead_letters, stats.unchanged,
                     skipped)
        with self._lock:
            self._status.stored += len(items)
            self._status.skipped += skipped
            self._status.last_message_at = time.time()
        if stats.changed and self.on_change is not None:
            self.on_change()
        self._consumer.commit(offsets)
        self._update_lag()
        return len(items) + skipped

    @staticmethod
    def _decode(messages: list[Message]) -> _Batch:
        items: list[Item] = []
        skipped = 0
        offsets: dict[tuple[str, int], int] = {}
        for msg in messages:
            tp = (msg.topic, msg.partition)
            offsets[tp] = max(offsets.get(tp, 0), msg.offset + 1)
            try:
                items.append(decode(msg))
            except InputError as exc:
                skipped += 1
                logger.warning("dashboard: %s[%d]@%d skipped: %s", msg.topic, msg.partition,
                               msg.offset, exc.message)
        return items, offsets, skipped

    def _update_lag(self) -> None:
        now = time.monotonic()
        if self._consumer is None or now - self._lag_checked < LAG_INTERVAL_S:
            return
        self._lag_checked = now
        try:
            ends = self._consumer.end_offsets()
            positions = self._consumer.positions()
        except BusError as exc:
            logger.warning("dashboard: consumer lag unknown: %s", exc.message)
            return
        lag: dict[str, int] = {}
        pos: dict[str, int] = {}
        end: dict[str, int] = {}
        for (topic, _partition), e in ends.items():
            p = positions.get((topic, _partition), e)
            lag[topic] = lag.get(topic, 0) + max(0, e - p)
            pos[topic] = pos.get(topic, 0) + p
            end[topic] = end.get(topic, 0) + e
        with self._lock:
            self._status.lag, self._status.positions, self._status.ends = lag, pos, end
