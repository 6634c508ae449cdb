"""The result ledger: which revision of each series' result was issued, with which content.

One current SR per series needs memory across crashes and redeliveries: the worker computes a
digest of everything that decides a result's content (flag, scores, measurements, evidence,
lab use, model versions; not the clock), and the ledger answers, durably:

- the same digest as the last revision: *a redo*. The revision, the time it was first ready
  and the SR UID are reused, so the SR is byte-identical (a PACS that keeps the first copy of
  a UID loses nothing) and consumers see the same ``(result_id, revision)`` again;
- another digest: *a new revision*, with a new SR UID, naming the SR it replaces.

SQLite in the data directory (``results.sqlite``), synchronous FULL, written before the SR is
queued or the result published. The ledger is per worker data directory: workers that share a
Kafka group do not share it, so after a partition moves to another worker a *changed* result
can repeat a revision number there; consumers then order equal revisions by
``timings.result_ready`` (``docs/results.md``).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from schemas.errors import StorageError

__all__ = ["LEDGER_FILE", "ResultLedger", "Revision"]

LEDGER_FILE: Final = "results.sqlite"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS result_revision (
    result_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    digest TEXT NOT NULL,
    ready_at TEXT NOT NULL,
    sr_series_uid TEXT,
    sr_instance_uid TEXT,
    published INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (result_id, revision)
)
"""


@dataclass(frozen=True)
class Revision:
    """What the ledger decided for one computed result."""

    revision: int
    ready_at: datetime
    sr_series_uid: str | None
    sr_instance_uid: str | None
    previous: tuple[str, str] | None
    """(SR Series, SR SOP Instance) UID of the revision this one replaces, if it had an SR."""
    redo: bool
    published: bool = False
    """A redo of a revision whose result was already published (and its SR queued): nothing
    needs to go out again (:meth:`ResultLedger.mark_published`)."""


class ResultLedger:
    """Revisions of results by ``result_id`` (module docstring). Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(result_revision)")}
            if "published" not in columns:  # a ledger written before the column existed
                self._db.execute("ALTER TABLE result_revision ADD COLUMN published INTEGER "
                                 "NOT NULL DEFAULT 0")
        except sqlite3.Error as exc:
            raise StorageError(f"result ledger {path}: {exc}") from exc

    def revise(self, result_id: str, digest: str, ready_at: datetime,
               sr_series_uid: str | None, sr_instance_uid: str | None) -> Revision:
        """The revision for a result with ``digest``: the last one if its digest is the same
        (a redo), else a new one recorded with the given time and SR UIDs."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT revision, digest, ready_at, sr_series_uid, sr_instance_uid, "
                    "published FROM result_revision WHERE result_id = ? "
                    "ORDER BY revision DESC LIMIT 1", (result_id,)).fetchone()
                if row is not None and row[1] == digest:
                    return Revision(int(row[0]), datetime.fromisoformat(row[2]), row[3],
                                    row[4], self._previous(result_id, int(row[0])), True,
                                    bool(row[5]))
                revision = 1 if row is None else int(row[0]) + 1
                self._db.execute(
                    "INSERT INTO result_revision (result_id, revision, digest, ready_at, "
                    "sr_series_uid, sr_instance_uid) VALUES (?, ?, ?, ?, ?, ?)",
                    (result_id, revision, digest, ready_at.isoformat(), sr_series_uid,
                     sr_instance_uid))
            except sqlite3.Error as exc:
                raise StorageError(f"result ledger {self.path}: {exc}") from exc
            return Revision(revision, ready_at, sr_series_uid, sr_instance_uid,
                            self._previous(result_id, revision), False)

    def mark_published(self, result_id: str, revision: int) -> int:
        """Record that this revision's result is on the bus (after the producer's flush), so
        that a redo of it sends nothing again. A crash between the flush and this mark is the
        one case in which a consumer could see the same result twice (same id, revision and
        content: it drops the second); the worker reconciles it at start from the bus's newest
        results. How many rows this newly marked (0 or 1)."""
        with self._lock:
            try:
                cur = self._db.execute("UPDATE result_revision SET published = 1 WHERE "
                                       "result_id = ? AND revision = ? AND published = 0",
                                       (result_id, revision))
                return cur.rowcount
            except sqlite3.Error as exc:
                raise StorageError(f"result ledger {self.path}: {exc}") from exc

    def published_revision(self, result_id: str) -> int | None:
        """The newest revision of ``result_id`` whose result is on the bus, if any."""
        with self._lock:
            try:
                row = self._db.execute("SELECT MAX(revision) FROM result_revision WHERE "
                                       "result_id = ? AND published = 1",
                                       (result_id,)).fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"result ledger {self.path}: {exc}") from exc
        return None if row is None or row[0] is None else int(row[0])

    def _previous(self, result_id: str, revision: int) -> tuple[str, str] | None:
        row = self._db.execute(
            "SELECT sr_series_uid, sr_instance_uid FROM result_revision "
            "WHERE result_id = ? AND revision < ? AND sr_instance_uid IS NOT NULL "
            "ORDER BY revision DESC LIMIT 1", (result_id, revision)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def close(self) -> None:
        with self._lock:
            self._db.close()
