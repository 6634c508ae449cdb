"""Series completion: DICOM has no end-of-series signal, so a series is *complete* when quiet.

A series is complete when

* ``quiet_s`` (``Settings.series_quiet_s``) have passed since its last instance arrived and
  every association that sent it was released (reason ``quiet_after_release``), or
* ``max_quiet_s`` (``Settings.series_max_quiet_s``) have passed since its last instance,
  whatever the associations do (reason ``max_quiet``: a sender that keeps its association
  open for hours),

and, in both cases, every instance of it is on the bus: the event must follow its instances
on the same key.

A series whose last association was *aborted* (the sender crashed, the network broke, the
agent aborted it at shutdown), or that was still open when the agent stopped (after a restart
nobody knows how its association ended), may be resent: a partial series completed now would
be triaged once now and again after the resend. Such a series completes only when quiet for
``aborted_quiet_s`` (``Settings.series_aborted_quiet_s``) with no association open (reason
``max_quiet``: the event schema has no other word for it); an association that sends it again
and is released puts it back under the ordinary rule.

A late instance after completion reopens the series; it completes again with
``generation`` + 1 and the new count (downstream handles the repeat idempotently).

What must survive a restart lives in the spool index (table ``series``: counts, first/last
receive time, the generation and count of the last event sent). Which associations are open is
kept in memory only: after a restart none is, so a series left open counts as interrupted
(``aborted_quiet_s`` from its last receive time), unless the agent stopped cleanly and wrote
it down as released (:meth:`SeriesTracker.save_released`, read back at the next start).

The tracker only decides; :class:`agent.ingest.outbox.Outbox` publishes the events it returns from
:meth:`SeriesTracker.due` and then calls :meth:`SeriesTracker.completed`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from agent.durable import atomic_write
from agent.ingest.spool import InstanceInfo, SeriesState, Spool, StoreOutcome
from schemas.messages import SeriesEvent

logger = logging.getLogger(__name__)

CompletionReason = Literal["quiet_after_release", "max_quiet"]
RELEASED_FILE: Final = "series-released.json"
"""In ``data_dir``: the open series a clean stop found released (see the module docstring)."""


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _read_released(path: Path | None) -> set[str]:
    """The series a clean stop wrote down as released; the file is removed (read once)."""
    if path is None:
        return set()
    try:
        data = json.loads(path.read_bytes())
        path.unlink()
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s): its series count as interrupted", path, exc)
        with contextlib.suppress(OSError):
            path.unlink()
        return set()
    return {str(uid) for uid in data} if isinstance(data, list) else set()


class SeriesTracker:
    """Decides when series are complete; thread-safe (the SCP threads report arrivals and
    closed associations, the outbox thread asks what is due)."""

    def __init__(self, spool: Spool, quiet_s: float, max_quiet_s: float, *,
                 aborted_quiet_s: float | None = None,
                 clock: Callable[[], float] = time.time,
                 released_file: Path | None = None) -> None:
        """``released_file``: where a clean stop wrote the open series whose associations
        were all released (read and removed here; absent after a crash)."""
        self.spool = spool
        self.quiet_s = quiet_s
        self.max_quiet_s = max_quiet_s
        self.aborted_quiet_s = max(quiet_s, max_quiet_s if aborted_quiet_s is None
                                   else aborted_quiet_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._open_assocs: dict[str, set[int]] = {}  # series -> associations still open
        self._assoc_series: dict[int, set[str]] = {}  # association -> series it sent
        self._released_at: dict[str, float] = {}  # series -> when its last assoc closed
        released = _read_released(released_file)
        self._aborted: set[str] = {state.series_uid for state in spool.open_series()
                                   if state.series_uid not in released}
        """Series whose last association was aborted, or open when the agent stopped (not
        cleanly, or with an association still open)."""
        if self._aborted:
            logger.info("%d series were open when the agent stopped; each completes once "
                        "quiet for %.0f s (series_aborted_quiet_s) unless it is sent again: "
                        "%s", len(self._aborted), self.aborted_quiet_s,
                        ", ".join(sorted(self._aborted)[:10]))

    def save_released(self, path: Path) -> None:
        """At a clean stop: write down the open series whose associations were all released
        (not aborted), so that the next start does not take them for interrupted ones."""
        with self._lock:
            released = sorted(state.series_uid for state in self.spool.open_series()
                              if state.series_uid not in self._aborted
                              and not self._open_assocs.get(state.series_uid))
        try:
            atomic_write(path, json.dumps(released).encode(), path.parent)
        except OSError as exc:
            logger.warning("could not write %s (%s): the %d open series count as interrupted "
                           "at the next start", path, exc, len(released))

    # -- reports from the SCP ------------------------------------------------------------

    def instance_stored(self, assoc_key: int, info: InstanceInfo, outcome: StoreOutcome) -> None:
        """An instance of ``info.series_uid`` arrived on association ``assoc_key``."""
        with self._lock:
            self._open_assocs.setdefault(info.series_uid, set()).add(assoc_key)
            self._assoc_series.setdefault(assoc_key, set()).add(info.series_uid)

    def association_closed(self, assoc_key: int, closed_at: float,
                           aborted: bool = False) -> None:
        """The association ended: released, or (``aborted``) aborted or connection lost."""
        with self._lock:
            for series_uid in self._assoc_series.pop(assoc_key, set()):
                if aborted:
                    if series_uid not in self._aborted:
                        logger.info("series %s: its association was aborted; it completes "
                                    "once quiet for %.0f s unless it is sent again",
                                    series_uid, self.aborted_quiet_s)
                    self._aborted.add(series_uid)
                else:
                    self._aborted.discard(series_uid)
                assocs = self._open_assocs.get(series_uid)
                if assocs is None:
                    continue
                assocs.discard(assoc_key)
                if not assocs:
                    del self._open_assocs[series_uid]
                    self._released_at[series_uid] = closed_at

    # -- decisions -----------------------------------------------------------------------

    def _reason(self, state: SeriesState, now: float) -> CompletionReason | None:
        quiet = now - state.last_received_at
        with self._lock:
            open_assocs = bool(self._open_assocs.get(state.series_uid))
            released_at = self._released_at.get(state.series_uid, state.last_received_at)
            aborted = state.series_uid in self._aborted
        if aborted and not open_assocs:
            return "max_quiet" if quiet >= self.aborted_quiet_s else None
        if quiet >= self.max_quiet_s:
            return "max_quiet"
        if not open_assocs and now - max(released_at, state.last_received_at) >= self.quiet_s:
            return "quiet_after_release"
        return None

    def due(self, now: float | None = None) -> list[SeriesEvent]:
        """Completion events to publish now: open series that are quiet enough and whose
        instances are all published. Nothing is recorded until :meth:`completed`."""
        stamp = self._clock() if now is None else now
        events: list[SeriesEvent] = []
        for state in self.spool.open_series():
            reason = self._reason(state, stamp)
            if reason is None:
                continue
            if state.unpublished:
                logger.debug("series %s is quiet but %d instances still wait for the bus",
                             state.series_uid, state.unpublished)
                continue
            events.append(SeriesEvent(
                study_uid=state.study_uid, series_uid=state.series_uid,
                instance_count=state.instance_count,
                first_received_at=_dt(state.first_received_at),
                last_received_at=_dt(state.last_received_at), completed_at=_dt(stamp),
                reason=reason,
                generation=state.generation + 1, patient_id=state.patient_id,
                accession_number=state.accession_number, modality=state.modality))
        return events

    def completed(self, event: SeriesEvent) -> None:
        """``event`` is durably on the bus: record it (the series closes until a late
        instance reopens it)."""
        self.spool.mark_series_completed(event.series_uid, event.generation,
                                         event.instance_count, event.completed_at.timestamp())
        with self._lock:
            self._released_at.pop(event.series_uid, None)
            self._aborted.discard(event.series_uid)
        logger.info("study %s series %s complete (generation %d, %d instances, %s)",
                    event.study_uid, event.series_uid, event.generation, event.instance_count,
                    event.reason)
