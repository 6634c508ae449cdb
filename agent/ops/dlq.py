"""Dead letters on ``triage.dlq``: read them, and retry the ones that can be retried once
their cause is fixed (``hust19 dlq list`` / ``hust19 dlq retry``, the dashboard's IT page).

Two kinds of entry can be retried, each from the data directory that holds what it needs:

* **an SR that a PACS refused for good** (``source_topic`` is the SR outbox; the entry
  carries the SR's bytes and the destination): it goes back into the worker's SR outbox for
  that destination alone (:func:`agent.triage.pacs.requeue_refused`); the running worker sends
  it at its next pass.
* **a series whose instances or triage failed** (an instance or completion event from
  ``dicom.instances`` / ``dicom.series`` with its Series Instance UID): the ingest's spool
  publishes the series again, then a completion event of the next generation
  (:func:`agent.ingest.spool.requeue_series`); the worker triages it as a new revision, or
  recognises the same content and sends nothing twice.

Anything else (an instance that named no series) cannot be retried from here; the entry
keeps the original bytes for a person to look at.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from agent.bus.interface import Bus, read_to_end
from agent.config import PacsDestination
from agent.ingest.spool import requeue_series
from agent.triage.pacs import OUTBOX_SUBDIR, requeue_refused
from schemas import topics
from schemas.errors import InputError
from schemas.messages import DeadLetter

logger = logging.getLogger(__name__)

__all__ = ["RETRY_SERIES", "RETRY_SR", "Entry", "read_entries", "retry", "retry_command",
           "retry_kind"]

RETRY_SR: Final = "sr"
"""An SR refused by a PACS: queued again for that PACS."""
RETRY_SERIES: Final = "series"
"""A series: published again from the ingest's spool."""
SERIES_SOURCES: Final = frozenset({topics.DICOM_INSTANCES, topics.DICOM_SERIES})
DESTINATION_HEADER: Final = "destination"
POLL_TIMEOUT_S: Final = 0.5
POLL_BATCH: Final = 500
READ_TIMEOUT_S: Final = 30.0


def retry_kind(source_topic: str, series_uid: str | None) -> str | None:
    """How an entry with these fields is retried (:data:`RETRY_SR`, :data:`RETRY_SERIES`), or
    ``None`` when it cannot be."""
    if source_topic == OUTBOX_SUBDIR:
        return RETRY_SR
    if source_topic in SERIES_SOURCES and series_uid:
        return RETRY_SERIES
    return None


def retry_command(partition: int, offset: int, source_topic: str,
                  series_uid: str | None) -> str | None:
    """The command line that retries the entry at ``partition``/``offset`` with these fields
    (shown to IT), ``None`` when it cannot be retried."""
    if retry_kind(source_topic, series_uid) is None:
        return None
    where = f" --partition {partition}" if partition else ""
    return f"hust19 dlq retry {offset}{where}"


@dataclass(frozen=True)
class Entry:
    """One ``triage.dlq`` message: where it is on the topic, and the dead letter."""

    partition: int
    offset: int
    letter: DeadLetter

    @property
    def kind(self) -> str | None:
        return retry_kind(self.letter.source_topic, self.letter.series_uid)


def read_entries(bus: Bus) -> list[Entry]:
    """Every dead letter on ``triage.dlq`` now, oldest first per partition (a consumer
    without a group: nothing is committed). A message that is not a dead letter is logged
    and skipped."""
    if not bus.topic_exists(topics.TRIAGE_DLQ):
        return []
    out: list[Entry] = []
    consumer = bus.consumer(None, [topics.TRIAGE_DLQ])
    try:
        deadline = time.monotonic() + READ_TIMEOUT_S
        for batch in read_to_end(consumer, poll_timeout_s=POLL_TIMEOUT_S,
                                 max_records=POLL_BATCH):
            for m in batch:
                try:
                    out.append(Entry(m.partition, m.offset,
                                     DeadLetter.model_validate_json(m.value)))
                except ValidationError:
                    logger.warning("%s[%d]@%d is not a dead letter: skipped", m.topic,
                                   m.partition, m.offset)
            if time.monotonic() >= deadline:
                logger.warning("%s: not read to its end within %.0f s; %d dead letters "
                               "listed", topics.TRIAGE_DLQ, READ_TIMEOUT_S, len(out))
                break
    finally:
        consumer.close()
    return out


def retry(entry: Entry, data_dir: Path) -> str:
    """Retry ``entry`` from ``data_dir`` (the worker's for an SR, the ingest's for a series;
    one and the same for ``serve``); a sentence saying what was done. :class:`InputError` for
    an entry that cannot be retried, or is not retried by this data directory."""
    letter = entry.letter
    where = f"{topics.TRIAGE_DLQ}[{entry.partition}]@{entry.offset}"
    kind = entry.kind
    if kind == RETRY_SR:
        if DESTINATION_HEADER not in letter.headers:
            raise InputError(f"{where}: the dead letter names no destination (header "
                             f"{DESTINATION_HEADER!r}): it cannot be retried")
        dest = PacsDestination.parse(letter.headers[DESTINATION_HEADER])
        outbox = data_dir / OUTBOX_SUBDIR
        if not outbox.is_dir():
            raise InputError(f"{where}: no SR outbox in {data_dir}: run this where the worker "
                             "that wrote the SR keeps its data directory")
        uid = requeue_refused(outbox, dest, base64.b64decode(letter.value_b64))
        return (f"{where}: SR {uid} queued again for {dest}; the running worker sends it at "
                "its next pass (the PACS must accept it this time, or it comes back here)")
    if kind == RETRY_SERIES:
        assert letter.series_uid is not None
        count = requeue_series(data_dir, letter.series_uid)
        return (f"{where}: series {letter.series_uid}: {count} instances queued to be "
                "published again from the spool, then a new completion event; the worker "
                "triages it again (a changed result is a new revision)")
    raise InputError(f"{where} ({letter.reason}) names no series and no refused SR: it cannot "
                     "be retried; its original bytes are in the entry (value_b64)")
