"""The dashboard's database, through SQLAlchemy Core (SQLite by default, PostgreSQL by URL).

Tables (all named ``dashboard_*`` so that the dashboard can share a database):

* ``results``: one row per ``result_id`` (one per series), the current revision, with the
  columns the worklist filters and sorts on (a compact table: scans stay fast).
* ``revisions``: every revision ever received, each with the whole result as JSON (version 2;
  version-1 results are stored as upgraded by :func:`schemas.messages.parse_result`); the
  patient page reads the current one from here.
* ``evidence_sets`` / ``evidence_slices``: the evidence thumbnails of each result; only the
  newest revision's set is kept per result (the store stays small).
* ``dead_letters``: the ``triage.dlq`` entries without their original bytes (the size is kept).
* ``audit``: every acknowledgement and undo, never updated or deleted.
* ``sessions``: logged-in browsers (the SHA-256 of the cookie, never the cookie).
* ``meta``: the store's own secret (CSRF tokens in proxy mode), made at first start.

Revisions and idempotence, as the worker issues them (``agent/triage/ledger.py``): a result whose
content changed (labs arrived, late instances, other models) comes as revision + 1, and a redo
of the same content repeats the same revision with the same content. So:

* a higher revision replaces the row (the acknowledgement stays on the revision it was given
  to, and the row shows that a newer one came);
* the same revision with the same content is a redelivery or a redo and changes nothing, even
  when what does not make the content differs (the times the instances arrived, where the SR
  was queued: :data:`CONTENT_EXCLUDED`, as the worker's content digest leaves them out);
* a lower revision only goes into the history.

The fallback: the same revision with *other* content. The worker's ledger lives in its data
folder, so after a partition moved to another worker a changed result can repeat a revision
number; version-1 results (all revision 1, re-issued when the labs arrived) do the same. Then
the later ``timings.result_ready`` wins and the other goes into the history.

Older stores are upgraded by :meth:`Store.create`: missing columns added and filled from the
stored results, digests recomputed as content digests.

Every statement is built with SQLAlchemy expressions (bound parameters only). Write
transactions on SQLite begin ``IMMEDIATE`` so that a reader-turned-writer never fails on a stale
snapshot; WAL lets the pages read while the consumer writes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.schema import CreateColumn
from sqlalchemy.sql.elements import ColumnElement

from agent.triage.lis import resolve_url, safe_url
from schemas.errors import ConfigError, Hust19Error, InputError
from schemas.messages import (
    ClassScores,
    DeadLetter,
    EvidenceThumbnails,
    TriageResult,
    dump_json,
)

logger = logging.getLogger(__name__)

PREFIX: Final = "dashboard_"
URGENCY: Final = {"type2": 0, "type1": 1, "control": 2}
URGENCY_SKIPPED: Final = 3
"""Worklist order: Type II, Type I, control, then skipped series; newest first within each."""
PRUNE_BATCH: Final = 500
"""Results (and dead letters) deleted per retention transaction, so that a first run over a
large store does not hold the write lock for long."""
UNDO_WINDOW_S: Final = 60.0
"""An acknowledgement can be undone by the one who gave it for this long."""
PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
MAX_THUMBNAIL_BYTES: Final = 1 << 20
"""An evidence thumbnail larger than this (decoded) is refused: thumbnails are small."""
SQLITE_BUSY_TIMEOUT_S: Final = 30.0
SQLITE_CACHE_KIB: Final = 8192
"""SQLite page cache per connection (the worklist table and its indexes of 10,000 results fit)."""
SESSION_TOUCH_S: Final = 60.0
"""A session's last-seen time is written at most this often."""
SECRET_KEY: Final = "secret"  # noqa: S105 - the name of a row, not a secret
CONTENT_EXCLUDED: Final = frozenset({"result_id", "revision", "sr_sop_instance_uid",
                                      "supersedes_sr_sop_instance_uid", "sr_destinations",
                                      "timings", "generation"})
"""The fields of a result that do not make its content: the same set as the worker's
``agent.triage.worker.CONTENT_EXCLUDED`` (a test keeps them equal)."""
STUDY_DATE_FORMAT: Final = "%Y%m%d"
NAME_CHARS: Final = 200
"""The worklist keeps this much of a patient's name (DICOM PN: three groups of 64 at most);
the stored result keeps all of it."""

Availability = Literal["both", "ct", "labs", "none"]
AVAILABILITY: Final = ("both", "ct", "labs", "none")
FLAGS: Final = ("type2", "type1", "control", "skipped")


class StoreError(Hust19Error):
    """The dashboard's database failed (unreachable, full, schema trouble)."""


metadata = MetaData()

results = Table(
    f"{PREFIX}results", metadata,
    Column("result_id", String(64), primary_key=True),
    Column("revision", Integer, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("flag", String(16)),
    Column("urgency", SmallInteger, nullable=False),
    Column("threshold", String(16)),
    Column("patient_id", String(64)),
    Column("patient_name", String(NAME_CHARS)),
    Column("study_date", Date),
    Column("accession_number", String(64)),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("availability", String(8), nullable=False),
    Column("p_fused", Float),
    Column("p_ct", Float),
    Column("p_labs", Float),
    Column("involvement", Float),
    Column("severity", String(8)),
    Column("turnaround_s", Float),
    Column("received_at", DateTime, nullable=False),
    Column("result_ready", DateTime, nullable=False),
    Column("stored_at", DateTime, nullable=False),
    Column("skip_reason", Text),
    Column("ack_user", String(64)),
    Column("ack_at", DateTime),
    Column("ack_revision", Integer),
    Column("acked", Boolean, nullable=False, default=False),
)
Index(f"ix_{PREFIX}results_order", results.c.urgency, results.c.result_ready.desc())
Index(f"ix_{PREFIX}results_patient", results.c.patient_id)
Index(f"ix_{PREFIX}results_accession", results.c.accession_number)
Index(f"ix_{PREFIX}results_received", results.c.received_at)
STUDY_DATE_INDEX: Final = Index(f"ix_{PREFIX}results_study_date", results.c.study_date)

revisions = Table(
    f"{PREFIX}revisions", metadata,
    Column("result_id", String(64), primary_key=True),
    Column("revision", Integer, primary_key=True),
    Column("digest", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("flag", String(16)),
    Column("result_ready", DateTime, nullable=False),
    Column("stored_at", DateTime, nullable=False),
    Column("doc", Text, nullable=False),
)

evidence_sets = Table(
    f"{PREFIX}evidence_sets", metadata,
    Column("result_id", String(64), primary_key=True),
    Column("revision", Integer, primary_key=True),
    Column("window_center_hu", Float, nullable=False),
    Column("window_width_hu", Float, nullable=False),
    Column("stored_at", DateTime, nullable=False),
)

evidence_slices = Table(
    f"{PREFIX}evidence_slices", metadata,
    Column("result_id", String(64), primary_key=True),
    Column("revision", Integer, primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("slice_index", Integer, nullable=False),
    Column("score", Float, nullable=False),
    Column("involvement", Float),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("png", LargeBinary, nullable=False),
)

dead_letters = Table(
    f"{PREFIX}dead_letters", metadata,
    Column("dlq_partition", Integer, primary_key=True),
    Column("dlq_offset", Integer, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("error_type", String(100), nullable=False),
    Column("source_topic", String(249), nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("source_offset", Integer, nullable=False),
    Column("msg_key", String(200)),
    Column("study_uid", String(64)),
    Column("series_uid", String(64)),
    Column("failed_at", DateTime, nullable=False),
    Column("value_size", Integer, nullable=False),
    Column("stored_at", DateTime, nullable=False),
)
Index(f"ix_{PREFIX}dead_letters_failed", dead_letters.c.failed_at)

audit = Table(
    f"{PREFIX}audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("result_id", String(64), nullable=False),
    Column("revision", Integer, nullable=False),
    Column("user_name", String(64), nullable=False),
    Column("action", String(16), nullable=False),
    Column("at", DateTime, nullable=False),
)
Index(f"ix_{PREFIX}audit_result", audit.c.result_id)

sessions = Table(
    f"{PREFIX}sessions", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_name", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("last_seen_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
)

meta = Table(
    f"{PREFIX}meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


def utcnow() -> datetime:
    """Now, as the naive UTC datetime the store keeps (every column is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(value: datetime) -> datetime:
    """``value`` in UTC without its zone (a naive value is taken as UTC already)."""
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def p_covid(scores: ClassScores | None) -> float | None:
    """P(COVID-19) of a score set: Type I + Type II (``None`` without scores)."""
    return None if scores is None else min(1.0, scores.type1 + scores.type2)


def availability_of(result: TriageResult) -> Availability:
    """Which modalities went into the flag: both, CT only, labs only, or none (skipped)."""
    a = result.availability
    if a is None or result.status != "triaged":
        return "none"
    if a.ct and a.cf:
        return "both"
    return "ct" if a.ct else "labs" if a.cf else "none"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def content_digest(result: TriageResult) -> str:
    """SHA-256 of what makes a result's content, computed as the worker computes it
    (everything but :data:`CONTENT_EXCLUDED`): equal for a redelivery and for a redo."""
    content = result.model_dump(mode="json", by_alias=True, exclude=set(CONTENT_EXCLUDED))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def study_date_of(result: TriageResult) -> date | None:
    """The result's Study Date (DICOM DA, YYYYMMDD) as a date; ``None`` when it has none or
    it is not a date."""
    text_ = (result.study_date or "").strip()
    try:
        return datetime.strptime(text_[:8], STUDY_DATE_FORMAT).date() \
            if len(text_) >= 8 else None
    except ValueError:
        return None


def local_midnight_utc(day: date) -> datetime:
    """The start of the server's local day ``day`` as a naive UTC time."""
    return datetime(day.year, day.month, day.day).astimezone().astimezone(UTC).replace(
        tzinfo=None)


# --- what the consumer hands the store ------------------------------------------------------
@dataclass(frozen=True)
class ResultItem:
    result: TriageResult


@dataclass(frozen=True)
class EvidenceItem:
    """An evidence set with its thumbnails decoded (and checked: PNG, size) beforehand."""

    evidence: EvidenceThumbnails
    pngs: tuple[bytes, ...]


@dataclass(frozen=True)
class DeadLetterItem:
    entry: DeadLetter
    partition: int
    offset: int


Item = ResultItem | EvidenceItem | DeadLetterItem


@dataclass
class PruneStats:
    """What one :meth:`Store.prune` deleted (counts only)."""

    results: int = 0
    dead_letters: int = 0


@dataclass
class ApplyStats:
    """What one :meth:`Store.apply` changed (only counts: no patient data)."""

    new: int = 0
    replaced: int = 0
    history: int = 0
    unchanged: int = 0
    evidence: int = 0
    dead_letters: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.new or self.replaced or self.evidence or self.dead_letters)


# --- what the pages read ---------------------------------------------------------------------
@dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters; ``None`` is "any".

    ``date_from``/``date_to`` (both inclusive) bound the study's date: the Study Date of the
    images where the result carries one, else the server's local day on which the series
    arrived (results from agents that did not send the Study Date)."""

    flag: str | None = None
    availability: str | None = None
    acknowledged: bool | None = None
    date_from: date | None = None
    date_to: date | None = None
    search: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        c = results.c
        out: list[ColumnElement[bool]] = []
        if self.flag == "skipped":
            out.append(c.status == "skipped")
        elif self.flag is not None:
            out.append(c.flag == self.flag)
        if self.availability is not None:
            out.append(c.availability == self.availability)
        if self.acknowledged is not None:
            out.append(c.acked.is_(self.acknowledged))
        if self.date_from is not None or self.date_to is not None:
            dated: list[ColumnElement[bool]] = [c.study_date.is_not(None)]
            undated: list[ColumnElement[bool]] = [c.study_date.is_(None)]
            if self.date_from is not None:
                dated.append(c.study_date >= self.date_from)
                undated.append(c.received_at >= local_midnight_utc(self.date_from))
            if self.date_to is not None:
                dated.append(c.study_date <= self.date_to)
                undated.append(c.received_at < local_midnight_utc(
                    self.date_to + timedelta(days=1)))
            out.append(or_(and_(*dated), and_(*undated)))
        if self.search:
            pattern = "%" + _escape_like(self.search.strip()) + "%"
            out.append(or_(c.patient_id.ilike(pattern, escape="\\"),
                           c.accession_number.ilike(pattern, escape="\\")))
        return out


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class WorklistRow:
    result_id: str
    revision: int
    status: str
    flag: str | None
    threshold: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: date | None
    accession_number: str | None
    availability: str
    p_fused: float | None
    p_ct: float | None
    p_labs: float | None
    involvement: float | None
    severity: str | None
    turnaround_s: float | None
    received_at: datetime
    result_ready: datetime
    skip_reason: str | None
    ack_user: str | None
    ack_at: datetime | None
    ack_revision: int | None
    acked: bool


ROW_COLUMNS: Final = tuple(getattr(results.c, f) for f in WorklistRow.__dataclass_fields__)


@dataclass(frozen=True)
class Page:
    rows: list[WorklistRow]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


@dataclass(frozen=True)
class RevisionRow:
    revision: int
    status: str
    flag: str | None
    result_ready: datetime
    stored_at: datetime
    current: bool
    sr_sop_instance_uid: str | None = None
    supersedes_sr_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class AuditRow:
    revision: int
    user_name: str
    action: str
    at: datetime


@dataclass(frozen=True)
class EvidenceSlice:
    position: int
    sop_instance_uid: str
    slice_index: int
    score: float
    involvement: float | None
    width: int
    height: int


@dataclass(frozen=True)
class EvidenceSet:
    revision: int
    window_center_hu: float
    window_width_hu: float
    slices: list[EvidenceSlice]


@dataclass(frozen=True)
class ResultDetail:
    row: WorklistRow
    result: TriageResult
    revisions: list[RevisionRow]
    audit: list[AuditRow]
    evidence: EvidenceSet | None


@dataclass(frozen=True)
class DeadLetterRow:
    dlq_partition: int
    dlq_offset: int
    reason: str
    error_type: str
    source_topic: str
    source_partition: int
    source_offset: int
    msg_key: str | None
    study_uid: str | None
    series_uid: str | None
    failed_at: datetime
    value_size: int


@dataclass(frozen=True)
class SessionRow:
    user_name: str
    role: str
    csrf: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class AckOutcome:
    """The result of an acknowledge or undo: ``ok``, or why not (``message`` for the page)."""

    ok: bool
    message: str
    row: WorklistRow | None = None


class Store:
    """The dashboard's database. Thread-safe: each call uses its own connection."""

    def __init__(self, url: str) -> None:
        try:
            self.url = resolve_url(url)
        except Hust19Error as exc:
            raise ConfigError(f"dashboard database: {exc.message}") from exc
        self.display_url = safe_url(self.url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        try:
            if self.is_sqlite:
                self._write = self._sqlite_engine(immediate=True)
                self._read = self._sqlite_engine(immediate=False)
            else:
                self._write = self._read = create_engine(self.url, pool_pre_ping=True,
                                                         pool_recycle=1800)
        except (SQLAlchemyError, ImportError) as exc:
            raise ConfigError(f"dashboard database {self.display_url}: {exc}") from exc
        self._secret: str | None = None

    def _sqlite_engine(self, *, immediate: bool) -> Engine:
        engine = create_engine(self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S,
                                                       "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # transactions begin below, explicitly
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # the audit must survive a power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    # --- lifecycle ---------------------------------------------------------------------------
    def create(self) -> None:
        """Create the tables that are missing; a store made by an earlier dashboard is kept
        and upgraded (:meth:`_upgrade`)."""
        if self.is_sqlite and self.url.database:
            from pathlib import Path

            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        with self._errors("create the tables"):
            metadata.create_all(self._write)
        with self._errors("upgrade the tables"), self._write.begin() as conn:
            self._upgrade(conn)

    @staticmethod
    def _upgrade(conn: Connection) -> None:
        """Bring a store made by an earlier dashboard up to date: add the ``results`` columns
        it lacks (and their index), fill them from the stored results, and recompute the
        digests as content digests (they were digests of the whole message)."""
        have = {c["name"] for c in inspect(conn).get_columns(results.name)}
        missing = [c for c in results.columns if c.name not in have]
        if not missing:
            return
        for column in missing:
            spec = CreateColumn(column).compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {results.name} ADD COLUMN {spec}"))
        STUDY_DATE_INDEX.create(conn, checkfirst=True)
        current = {r.result_id: (r.revision, r.digest) for r in conn.execute(
            select(results.c.result_id, results.c.revision, results.c.digest))}
        seen: set[tuple[str, int, str]] = set()
        rows = conn.execute(select(revisions.c.result_id, revisions.c.revision,
                                   revisions.c.digest, revisions.c.doc)
                            .order_by(revisions.c.result_id, revisions.c.revision,
                                      revisions.c.stored_at)).all()
        for rid, rev, old, doc in rows:
            result = TriageResult.model_validate_json(doc)
            new = content_digest(result)
            where = and_(revisions.c.result_id == rid, revisions.c.revision == rev,
                         revisions.c.digest == old)
            if (rid, rev, new) in seen:  # the same content stored twice: keep one
                conn.execute(delete(revisions).where(where))
            else:
                seen.add((rid, rev, new))
                conn.execute(update(revisions).where(where).values(digest=new))
            if current.get(rid) == (rev, old):
                conn.execute(update(results).where(results.c.result_id == rid).values(
                    digest=new, patient_name=result.patient_name,
                    study_date=study_date_of(result)))
        logger.info("dashboard database upgraded: columns %s added, %d stored results "
                    "re-read", ", ".join(c.name for c in missing), len(rows))

    def ping(self) -> None:
        with self._errors("answer"), self._read.connect() as conn:
            conn.execute(select(1))

    def close(self) -> None:
        self._write.dispose()
        if self._read is not self._write:
            self._read.dispose()

    def _errors(self, what: str) -> _Translate:
        return _Translate(f"dashboard database {self.display_url}: cannot {what}")

    # --- the consumer's side -----------------------------------------------------------------
    def apply(self, items: Sequence[Item], now: datetime | None = None) -> ApplyStats:
        """Store a batch of messages in one transaction (all or nothing)."""
        stats = ApplyStats()
        now = now or utcnow()
        with self._errors("store messages"), self._write.begin() as conn:
            for item in items:
                if isinstance(item, ResultItem):
                    self._apply_result(conn, item.result, now, stats)
                elif isinstance(item, EvidenceItem):
                    self._apply_evidence(conn, item, now, stats)
                else:
                    self._apply_dead_letter(conn, item, now, stats)
        return stats

    def _apply_result(self, conn: Connection, r: TriageResult, now: datetime,
                      stats: ApplyStats) -> None:
        """One result, by the rules of the module docstring (revisions and idempotence)."""
        doc = dump_json(r).decode()
        digest = content_digest(r)
        ready = naive_utc(r.timings.result_ready)
        seen = conn.execute(select(revisions.c.digest).where(
            revisions.c.result_id == r.result_id, revisions.c.revision == r.revision,
            revisions.c.digest == digest)).first()
        if seen is None:
            conn.execute(insert(revisions).values(
                result_id=r.result_id, revision=r.revision, digest=digest, status=r.status,
                flag=r.flag, result_ready=ready, stored_at=now, doc=doc))
        current = conn.execute(select(results.c.revision, results.c.digest,
                                      results.c.result_ready, results.c.ack_revision)
                               .where(results.c.result_id == r.result_id)
                               .with_for_update()).first()
        values = _row_values(r, digest, now)
        if current is None:
            conn.execute(insert(results).values(result_id=r.result_id, acked=False, **values))
            stats.new += 1
            return
        # a higher revision replaces; the same revision with other content (another worker's
        # ledger, version-1 results) replaces only when it was made later
        newer = r.revision > current.revision or (
            r.revision == current.revision and digest != current.digest
            and ready > current.result_ready)
        if not newer:  # a redelivery changes nothing; another revision joins the history
            if seen is not None:
                stats.unchanged += 1
            else:
                stats.history += 1
            return
        values["acked"] = current.ack_revision == r.revision and digest == current.digest
        conn.execute(update(results).where(results.c.result_id == r.result_id).values(**values))
        stats.replaced += 1

    def _apply_evidence(self, conn: Connection, item: EvidenceItem, now: datetime,
                        stats: ApplyStats) -> None:
        ev, pngs = item.evidence, item.pngs
        newest = conn.execute(select(func.max(evidence_sets.c.revision)).where(
            evidence_sets.c.result_id == ev.result_id)).scalar()
        if newest is not None and newest >= ev.revision:
            return  # this set or a newer one is stored already
        conn.execute(delete(evidence_slices).where(evidence_slices.c.result_id == ev.result_id))
        conn.execute(delete(evidence_sets).where(evidence_sets.c.result_id == ev.result_id))
        conn.execute(insert(evidence_sets).values(
            result_id=ev.result_id, revision=ev.revision, window_center_hu=ev.window_center_hu,
            window_width_hu=ev.window_width_hu, stored_at=now))
        if ev.slices:
            conn.execute(insert(evidence_slices), [
                {"result_id": ev.result_id, "revision": ev.revision, "position": pos,
                 "sop_instance_uid": s.sop_instance_uid, "slice_index": s.index,
                 "score": s.score, "involvement": s.involvement_percent, "width": s.width,
                 "height": s.height, "png": png}
                for pos, (s, png) in enumerate(zip(ev.slices, pngs, strict=True))])
        stats.evidence += 1

    def _apply_dead_letter(self, conn: Connection, item: DeadLetterItem, now: datetime,
                           stats: ApplyStats) -> None:
        e = item.entry
        exists = conn.execute(select(dead_letters.c.dlq_offset).where(
            dead_letters.c.dlq_partition == item.partition,
            dead_letters.c.dlq_offset == item.offset)).first()
        if exists is not None:
            return
        try:
            size = len(base64.b64decode(e.value_b64, validate=False))
        except (binascii.Error, ValueError):
            size = 0
        conn.execute(insert(dead_letters).values(
            dlq_partition=item.partition, dlq_offset=item.offset, reason=e.reason,
            error_type=e.error_type[:100], source_topic=e.source_topic,
            source_partition=e.source_partition, source_offset=e.source_offset,
            msg_key=(e.key or None) and e.key[:200], study_uid=e.study_uid,
            series_uid=e.series_uid, failed_at=naive_utc(e.failed_at), value_size=size,
            stored_at=now))
        stats.dead_letters += 1

    def prune(self, before: datetime, batch: int = PRUNE_BATCH) -> PruneStats:
        """Delete the results whose current revision was ready before ``before`` (with their
        revisions and evidence thumbnails) and the dead letters that failed before it, at
        most ``batch`` of each in one transaction (the retention; call again while it finds
        more). The acknowledgement audit stays: it names result IDs and readers only."""
        cut = naive_utc(before)
        with self._errors("delete old results"), self._write.begin() as conn:
            old = [row[0] for row in conn.execute(
                select(results.c.result_id).where(results.c.result_ready < cut)
                .order_by(results.c.result_ready).limit(batch))]
            if old:
                for table in (evidence_slices, evidence_sets, revisions, results):
                    conn.execute(delete(table).where(table.c.result_id.in_(old)))
            letters = conn.execute(
                select(dead_letters.c.dlq_partition, dead_letters.c.dlq_offset)
                .where(dead_letters.c.failed_at < cut).order_by(dead_letters.c.failed_at)
                .limit(batch)).all()
            for partition, offset in letters:
                conn.execute(delete(dead_letters).where(
                    dead_letters.c.dlq_partition == partition,
                    dead_letters.c.dlq_offset == offset))
        return PruneStats(len(old), len(letters))

    # --- the worklist ------------------------------------------------------------------------
    def worklist(self, flt: WorklistFilter, page: int = 1, page_size: int = 50) -> Page:
        """One page of the worklist: Type II, Type I, control, skipped; newest first."""
        conds = flt.conditions()
        page = max(1, page)
        with self._errors("read the worklist"), self._read.begin() as conn:
            total = int(conn.execute(select(func.count()).select_from(results)
                                     .where(and_(True, *conds))).scalar() or 0)
            pages = max(1, -(-total // page_size))
            page = min(page, pages)
            rows = conn.execute(select(*ROW_COLUMNS).where(and_(True, *conds))
                                .order_by(results.c.urgency, results.c.result_ready.desc(),
                                          results.c.result_id)
                                .limit(page_size).offset((page - 1) * page_size)).all()
        return Page([WorklistRow(*r) for r in rows], total, page, page_size)

    def export(self, flt: WorklistFilter, batch: int = 1000) -> Iterator[WorklistRow]:
        """Every row matching ``flt`` in worklist order (read in batches)."""
        conds = flt.conditions()
        offset = 0
        while True:
            with self._errors("export the worklist"), self._read.begin() as conn:
                rows = conn.execute(select(*ROW_COLUMNS).where(and_(True, *conds))
                                    .order_by(results.c.urgency,
                                              results.c.result_ready.desc(),
                                              results.c.result_id)
                                    .limit(batch).offset(offset)).all()
            yield from (WorklistRow(*r) for r in rows)
            if len(rows) < batch:
                return
            offset += batch

    def row(self, result_id: str) -> WorklistRow | None:
        with self._errors("read a result"), self._read.begin() as conn:
            r = conn.execute(select(*ROW_COLUMNS)
                             .where(results.c.result_id == result_id)).first()
        return WorklistRow(*r) if r is not None else None

    def detail(self, result_id: str) -> ResultDetail | None:
        """Everything the patient page shows of one result."""
        with self._errors("read a result"), self._read.begin() as conn:
            r = conn.execute(select(*ROW_COLUMNS, results.c.digest, revisions.c.doc)
                             .join_from(results, revisions, and_(
                                 revisions.c.result_id == results.c.result_id,
                                 revisions.c.revision == results.c.revision,
                                 revisions.c.digest == results.c.digest))
                             .where(results.c.result_id == result_id)).first()
            if r is None:
                return None
            row = WorklistRow(*r[:len(ROW_COLUMNS)])
            digest, doc = r[len(ROW_COLUMNS)], r[len(ROW_COLUMNS) + 1]
            revs = conn.execute(select(revisions.c.revision, revisions.c.status,
                                       revisions.c.flag, revisions.c.result_ready,
                                       revisions.c.stored_at, revisions.c.digest,
                                       revisions.c.doc)
                                .where(revisions.c.result_id == result_id)
                                .order_by(revisions.c.revision.desc(),
                                          revisions.c.result_ready.desc())).all()
            trail = conn.execute(select(audit.c.revision, audit.c.user_name, audit.c.action,
                                        audit.c.at).where(audit.c.result_id == result_id)
                                 .order_by(audit.c.id.desc())).all()
            evidence = self._evidence(conn, result_id)
        return ResultDetail(
            row=row, result=TriageResult.model_validate_json(doc),
            revisions=[_revision_row(v, v.revision == row.revision and v.digest == digest)
                       for v in revs],
            audit=[AuditRow(*a) for a in trail], evidence=evidence)

    @staticmethod
    def _evidence(conn: Connection, result_id: str) -> EvidenceSet | None:
        s = conn.execute(select(evidence_sets).where(
            evidence_sets.c.result_id == result_id)).first()
        if s is None:
            return None
        slices = conn.execute(select(
            evidence_slices.c.position, evidence_slices.c.sop_instance_uid,
            evidence_slices.c.slice_index, evidence_slices.c.score,
            evidence_slices.c.involvement, evidence_slices.c.width, evidence_slices.c.height)
            .where(evidence_slices.c.result_id == result_id,
                   evidence_slices.c.revision == s.revision)
            .order_by(evidence_slices.c.slice_index, evidence_slices.c.position)).all()
        return EvidenceSet(s.revision, s.window_center_hu, s.window_width_hu,
                           [EvidenceSlice(*x) for x in slices])

    def thumbnail(self, result_id: str, revision: int, position: int) -> bytes | None:
        with self._errors("read a thumbnail"), self._read.begin() as conn:
            png = conn.execute(select(evidence_slices.c.png).where(
                evidence_slices.c.result_id == result_id,
                evidence_slices.c.revision == revision,
                evidence_slices.c.position == position)).scalar()
        return bytes(png) if png is not None else None

    def counts(self) -> dict[str, int]:
        """Results per flag (``skipped`` for skipped ones) and unacknowledged ones."""
        with self._errors("count results"), self._read.begin() as conn:
            rows = conn.execute(select(results.c.status, results.c.flag, func.count())
                                .group_by(results.c.status, results.c.flag)).all()
            open_ = conn.execute(select(func.count()).select_from(results).where(
                results.c.acked.is_(False), results.c.status == "triaged")).scalar()
        out = dict.fromkeys(FLAGS, 0)
        for status, flag, n in rows:
            key = "skipped" if status == "skipped" else str(flag)
            out[key] = out.get(key, 0) + int(n)
        out["unacknowledged"] = int(open_ or 0)
        return out

    # --- acknowledgements --------------------------------------------------------------------
    def acknowledge(self, result_id: str, user: str, revision: int,
                    now: datetime | None = None) -> AckOutcome:
        """Acknowledge revision ``revision`` of a result (the one the reader saw)."""
        now = now or utcnow()
        with self._errors("acknowledge"), self._write.begin() as conn:
            cur = conn.execute(select(results.c.revision, results.c.acked, results.c.ack_user)
                               .where(results.c.result_id == result_id)
                               .with_for_update()).first()
            if cur is None:
                return AckOutcome(False, "no such result")
            if cur.revision != revision:
                return AckOutcome(False, f"a newer revision ({cur.revision}) arrived: "
                                  "read it before acknowledging")
            if cur.acked:
                return AckOutcome(False, f"already acknowledged by {cur.ack_user}")
            conn.execute(update(results).where(results.c.result_id == result_id).values(
                ack_user=user, ack_at=now, ack_revision=revision, acked=True))
            conn.execute(insert(audit).values(result_id=result_id, revision=revision,
                                              user_name=user, action="acknowledge", at=now))
        logger.info("result %s revision %d acknowledged by %s", result_id, revision, user)
        return AckOutcome(True, "acknowledged", self.row(result_id))

    def undo(self, result_id: str, user: str, now: datetime | None = None,
             window_s: float = UNDO_WINDOW_S) -> AckOutcome:
        """Take back one's own acknowledgement within ``window_s`` of giving it."""
        now = now or utcnow()
        with self._errors("undo an acknowledgement"), self._write.begin() as conn:
            cur = conn.execute(select(results.c.acked, results.c.ack_user, results.c.ack_at,
                                      results.c.ack_revision)
                               .where(results.c.result_id == result_id)
                               .with_for_update()).first()
            if cur is None or cur.ack_user is None or cur.ack_at is None:
                return AckOutcome(False, "not acknowledged")
            if cur.ack_user != user:
                return AckOutcome(False, f"acknowledged by {cur.ack_user}: only they can undo")
            if (now - cur.ack_at).total_seconds() > window_s:
                return AckOutcome(False, f"more than {window_s:.0f} s ago: cannot be undone")
            conn.execute(update(results).where(results.c.result_id == result_id).values(
                ack_user=None, ack_at=None, ack_revision=None, acked=False))
            conn.execute(insert(audit).values(result_id=result_id,
                                              revision=int(cur.ack_revision or 0),
                                              user_name=user, action="undo", at=now))
        logger.info("result %s: acknowledgement undone by %s", result_id, user)
        return AckOutcome(True, "acknowledgement undone", self.row(result_id))

    # --- dead letters ------------------------------------------------------------------------
    def dead_letters(self, page: int = 1, page_size: int = 50) -> tuple[list[DeadLetterRow],
                                                                         int]:
        with self._errors("read the dead letters"), self._read.begin() as conn:
            total = int(conn.execute(select(func.count()).select_from(dead_letters)).scalar()
                        or 0)
            rows = conn.execute(select(*[getattr(dead_letters.c, f) for f in
                                         DeadLetterRow.__dataclass_fields__])
                                .order_by(dead_letters.c.failed_at.desc(),
                                          dead_letters.c.dlq_offset.desc())
                                .limit(page_size).offset((max(1, page) - 1) * page_size)).all()
        return [DeadLetterRow(*r) for r in rows], total

    # --- sessions ----------------------------------------------------------------------------
    def create_session(self, user: str, role: str, lifetime: timedelta,
                       now: datetime | None = None) -> tuple[str, str]:
        """A new session; returns ``(cookie token, CSRF token)``. Only the token's hash is
        stored."""
        now = now or utcnow()
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._errors("create a session"), self._write.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.expires_at < now))
            conn.execute(insert(sessions).values(
                token_hash=token_hash(token), user_name=user, role=role, csrf=csrf,
                created_at=now, last_seen_at=now, expires_at=now + lifetime))
        return token, csrf

    def session(self, token: str, idle: timedelta,
                now: datetime | None = None) -> SessionRow | None:
        """The live session of ``token`` (its last-seen time refreshed), or ``None``."""
        now = now or utcnow()
        key = token_hash(token)
        with self._errors("read a session"), self._read.begin() as conn:
            r = conn.execute(select(sessions.c.user_name, sessions.c.role, sessions.c.csrf,
                                    sessions.c.created_at, sessions.c.last_seen_at,
                                    sessions.c.expires_at)
                             .where(sessions.c.token_hash == key)).first()
        if r is None:
            return None
        s = SessionRow(*r)
        if now >= s.expires_at or now - s.last_seen_at > idle:
            self.end_session(token)
            return None
        if (now - s.last_seen_at).total_seconds() > SESSION_TOUCH_S:
            with self._errors("refresh a session"), self._write.begin() as conn:
                conn.execute(update(sessions).where(sessions.c.token_hash == key)
                             .values(last_seen_at=now))
        return s

    def end_session(self, token: str) -> None:
        with self._errors("end a session"), self._write.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.token_hash == token_hash(token)))

    def secret(self) -> str:
        """The store's own random secret (made at first use, kept in the database)."""
        if self._secret is not None:
            return self._secret
        with self._errors("read its secret"), self._write.begin() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == SECRET_KEY)).scalar()
            if value is None:
                value = secrets.token_hex(32)
                try:
                    with conn.begin_nested():
                        conn.execute(insert(meta).values(key=SECRET_KEY, value=value))
                except IntegrityError:  # another process made it first
                    value = conn.execute(select(meta.c.value)
                                         .where(meta.c.key == SECRET_KEY)).scalar()
        self._secret = str(value)
        return self._secret


class _Translate:
    """Turns SQLAlchemy errors into :class:`StoreError` (a context manager)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        if isinstance(exc, SQLAlchemyError):
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise StoreError(f"{self.what}: {detail}") from exc


def decode_thumbnail(png_b64: str) -> bytes:
    """The PNG bytes of an evidence thumbnail; :class:`InputError` if it is not a PNG."""
    try:
        data = base64.b64decode(png_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"evidence thumbnail is not base64: {exc}") from exc
    if not data.startswith(PNG_MAGIC):
        raise InputError("evidence thumbnail is not a PNG")
    if len(data) > MAX_THUMBNAIL_BYTES:
        raise InputError(f"evidence thumbnail of {len(data)} bytes is larger than "
                         f"{MAX_THUMBNAIL_BYTES}")
    return data


def _clip(value: str | None, chars: int) -> str | None:
    return None if value is None else value[:chars]


def _revision_row(v: Any, current: bool) -> RevisionRow:
    """A row of the revisions table with the SR UIDs of its stored result."""
    doc = json.loads(v.doc)
    return RevisionRow(v.revision, v.status, v.flag, v.result_ready, v.stored_at, current,
                       doc.get("sr_sop_instance_uid"),
                       doc.get("supersedes_sr_sop_instance_uid"))


def _row_values(r: TriageResult, digest: str, now: datetime) -> dict[str, Any]:
    t = r.timings
    turnaround = ((t.result_ready - t.last_instance_received).total_seconds()
                  if t.last_instance_received is not None else None)
    q = r.quantitative_ct
    received = t.first_instance_received or t.last_instance_received or t.result_ready
    urgency = URGENCY.get(r.flag or "", URGENCY_SKIPPED) if r.status == "triaged" \
        else URGENCY_SKIPPED
    return {
        "revision": r.revision, "digest": digest, "status": r.status, "flag": r.flag,
        "urgency": urgency, "threshold": r.threshold, "patient_id": r.patient_id,
        "patient_name": _clip(r.patient_name, NAME_CHARS), "study_date": study_date_of(r),
        "accession_number": r.accession_number,
        "study_uid": r.study_uid, "series_uid": r.series_uid,
        "availability": availability_of(r), "p_fused": p_covid(r.scores.fused),
        "p_ct": p_covid(r.scores.ct), "p_labs": p_covid(r.scores.cf),
        "involvement": q.lungs.involvement_percent if q is not None else None,
        "severity": q.severity if q is not None else None,
        "turnaround_s": turnaround, "received_at": naive_utc(received),
        "result_ready": naive_utc(t.result_ready), "stored_at": now,
        "skip_reason": r.skip_reason,
    }
