"""The LIS adapter: a patient's lab values around a study date, as catalogue-coded LabValues.

``LisClient(url, mapping, window_days).lookup(patient_id, study_date)`` returns a
:class:`LabLookup` whose ``values`` feed ``engines.cf.vectorise`` directly. The LIS is any
SQLAlchemy URL (SQLite file by default; ``postgresql://`` and ``mysql://``/``mariadb://`` get
the psycopg and PyMySQL drivers). Every database error comes out as
:class:`schemas.errors.LisError` naming the URL without its password.

Policies (documented in docs/operations.md, the LIS):

* Window: results collected within ``window_days`` before the study day's start and after its
  end. Per catalogue code the most recent result in the window wins.
* Undated results (no collection time; the whole iCTCF export): with ``undated = "fallback"``
  (default) an undated result is used for a code only when no dated result of that code lies in
  the window (several undated: the last one the LIS returns, i.e. the highest row id in the
  reference schema); ``LabLookup.undated`` counts the values taken that way. With
  ``undated = "ignore"`` they are never used. Without a study date there is no window: every
  result counts, dated ones first.
* Units: a result whose unit differs from the catalogue unit is used when the LIS printed a
  reference range with it (normalisation then uses that range, so the unit cancels out);
  without a printed range it is left out and listed in ``unit_mismatches``; nothing is ever
  converted. Unit spelling is compared loosely (``μmol/L`` = ``umol/l``, but ``G/L`` is not
  ``g/L``).
* Codes the mapping does not know are left out and listed in ``unknown_codes``; values that
  are not finite numbers ("negative", NaN, inf, 1e999) in ``non_numeric``; rows with a field
  that cannot be read (a collection time that is not a date) in ``unreadable``: one bad row
  costs its own value, not the patient's other labs. A birth date that is not a date is
  ignored (the ``age`` column is used, if any) and named there too.
* AGE, GENDER, TEMP and UDIS come from the patient table (or ``patient_query``) unless the
  results carry them.

Readiness (``hust19 doctor``, ``/readyz``): :meth:`LisClient.ping` checks that the LIS answers
and has the mapping's tables, and tells an empty LIS (a warning: triage is CT-only until it is
filled) from a usable one. The agent's start (:func:`open_lis`) creates a missing SQLite LIS
with the reference schema, so a fresh data dir has an empty LIS rather than none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    URL,
    ColumnElement,
    Engine,
    Select,
    TableClause,
    bindparam,
    column,
    create_engine,
    inspect,
    make_url,
    or_,
    select,
    table,
    text,
)
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from agent.config import Settings
from agent.triage.lis_mapping import (
    PATIENT_COLUMNS,
    RESULT_COLUMNS,
    AliasTable,
    LisMapping,
    PatientTable,
    ResultTable,
)
from schemas.errors import LisError
from schemas.features import Feature, LabValue, by_code
from schemas.lis import LisBase, canonical_unit, parse_range, parse_value

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 3
"""Seconds to wait for a TCP connection to the LIS: an unreachable LIS must fail fast."""
POOL_RECYCLE_S: Final = 1800
"""Reconnect pooled connections older than this (MariaDB drops idle ones after wait_timeout)."""

DEFAULT_DRIVERS: Final = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql",
                          "mariadb": "mariadb+pymysql"}
"""Plain URL schemes get the drivers the product ships with (SQLAlchemy's defaults, psycopg2
and mysqlclient, are not installed)."""

FILL_COMMAND: Final = "hust19 lis import-ictcf ICTCF_FOLDER --lis {url}"
"""How to fill an empty reference-schema LIS (for a demo: the iCTCF folder of patients.csv and
lab_results.csv; a hospital loads its own results into the same tables)."""
NO_PATIENT_ID: Final = "hust19 readiness probe: no such patient"
"""The Patient ID a custom query is run with to see that it runs (it matches nobody)."""

FAR_PAST: Final = datetime(1900, 1, 1)
FAR_FUTURE: Final = datetime(9999, 12, 31)
"""``:from``/``:to`` of a custom query when there is no study date (no window)."""

MALE: Final = frozenset({"m", "male", "1", "男"})
FEMALE: Final = frozenset({"f", "female", "0", "女"})
NO_DISEASE: Final = frozenset({"no", "none", "nil", "0", "false", "无"})
UNKNOWN_TEXT: Final = frozenset({"", "n/a", "na", "unknown", "-"})

AGE, GENDER, TEMP, UDIS = "AGE", "GENDER", "TEMP", "UDIS"

Window = tuple[datetime | None, datetime | None]


@dataclass(frozen=True)
class LabLookup:
    """What the LIS had for one patient around one study date.

    ``values``: catalogue code -> :class:`LabValue` (the input of ``engines.cf.vectorise``).
    ``unit_mismatches``: "LISCODE->CODE: unit 'x' != catalogue 'y', no printed range" for the
    results left out for that reason. ``unknown_codes``: LIS codes outside the catalogue and
    the mapping (sorted). ``undated``: how many of ``values`` came from results without a
    collection time. ``window``: (from, to), both ``None`` without a study date. ``source``:
    "reference schema", "custom tables" or "custom query". ``lis_patient_id``: the id the LIS
    knows the patient by (differs from the asked id through an alias).
    """

    patient_found: bool
    values: dict[str, LabValue]
    unit_mismatches: list[str]
    unknown_codes: list[str]
    undated: int
    window: Window
    source: str
    lis_patient_id: str | None = None
    non_numeric: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes as ISO 8601)."""
        return {
            "patient_found": self.patient_found,
            "lis_patient_id": self.lis_patient_id,
            "source": self.source,
            "window": [w.isoformat() if w else None for w in self.window],
            "undated": self.undated,
            "values": {k: asdict(v) for k, v in self.values.items()},
            "unit_mismatches": self.unit_mismatches,
            "unknown_codes": self.unknown_codes,
            "non_numeric": self.non_numeric,
            "unreadable": self.unreadable,
        }


@dataclass(frozen=True)
class LisStatus:
    """What :meth:`LisClient.ping` found in a LIS that answers: the mapped ``tables`` it has
    and whether they hold a patient (``has_data``; ``None`` through a custom query, which
    cannot tell). An empty LIS works (every study is triaged CT-only) but is worth a
    ``warning``, which says how to fill it."""

    url: str
    source: str
    tables: tuple[str, ...]
    has_data: bool | None
    fill_hint: str

    @property
    def warning(self) -> str | None:
        """Why this LIS, though reachable, gives no lab values; ``None`` when it can."""
        if self.has_data is not False:
            return None
        return (f"LIS {self.url} ({self.source}) holds no patient: every study is triaged "
                f"CT-only until it is filled; {self.fill_hint}")

    def describe(self) -> str:
        """One line for doctor and ``hust19 lis ping``."""
        if self.has_data is None:
            return (f"LIS {self.url} answers ({self.source}): the query runs (a custom query "
                    "cannot tell whether the LIS holds patients)")
        return (f"LIS {self.url} answers ({self.source}): tables {', '.join(self.tables)}"
                f"{' hold patients' if self.has_data else ' are empty'}")


def resolve_url(url: str) -> URL:
    """Parse a SQLAlchemy URL and give plain postgresql/mysql/mariadb their shipped driver.
    :class:`LisError` for text that is not a URL (the text is not echoed: it may hold a
    password)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        scheme = url.split(":", 1)[0] if ":" in url else "?"
        raise LisError(f"LIS URL (scheme {scheme!r}) is not a SQLAlchemy URL") from exc
    driver = DEFAULT_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver) if driver else parsed


def safe_url(url: URL) -> str:
    """The URL as text with the password masked."""
    return url.render_as_string(hide_password=True)


def open_engine(url: str) -> Engine:
    """An engine for the LIS: pooled, pre-pinged, with a short connect timeout."""
    parsed = resolve_url(url)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() in ("postgresql", "mysql", "mariadb"):
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        return create_engine(parsed, pool_pre_ping=True, pool_recycle=POOL_RECYCLE_S,
                             connect_args=connect_args)
    except (NoSuchModuleError, ImportError, ArgumentError) as exc:
        raise LisError(f"LIS {safe_url(parsed)}: cannot use this URL: {exc}") from exc


def describe_error(exc: BaseException, url: URL) -> str:
    """A one-line reason, with the password (if any) scrubbed."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(orig).strip().splitlines()
    reason = lines[0] if lines else type(orig).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return reason


@contextmanager
def translate_errors(url: URL, what: str) -> Iterator[None]:
    """Turn any SQLAlchemy error into :class:`LisError` ("LIS <url>: <what> failed: ...")."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise LisError(f"LIS {safe_url(url)}: {what} failed: "
                       f"{describe_error(exc, url)}") from exc


def lab_window(study_date: datetime | date | None, days: float) -> Window:
    """(from, to) around the study: ``days`` before the study day's start and after its end
    (a datetime: around that instant). Aware datetimes are turned into naive local time, as
    LIS timestamps are."""
    if study_date is None:
        return None, None
    span = timedelta(days=days)
    if isinstance(study_date, datetime):
        moment = study_date.astimezone().replace(tzinfo=None) if study_date.tzinfo \
            else study_date
        return moment - span, moment + span
    return (datetime.combine(study_date, time.min) - span,
            datetime.combine(study_date, time.max) + span)


class LisClient:
    """Reads lab values from one LIS. Thread-safe (one pooled engine); ``close()`` it."""

    def __init__(self, url: str, mapping: LisMapping | None = None,
                 window_days: float = 7.0) -> None:
        self.mapping = mapping or LisMapping.reference()
        self.window_days = window_days
        self.url = resolve_url(url)
        self.engine = open_engine(url)
        self._code_map = self.mapping.code_map()
        self._catalogue = by_code()

    @property
    def display_url(self) -> str:
        """The URL without its password, for logs and messages."""
        return safe_url(self.url)

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> LisClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sqlite_path(self) -> Path | None:
        """The file of a SQLite LIS (``None`` for a server or an in-memory database)."""
        database = self.url.database
        if self.url.get_backend_name() != "sqlite" or database in (None, "", ":memory:") \
                or str(database).startswith("file:"):
            return None
        return Path(str(database))

    def ping(self) -> LisStatus:
        """Check that the LIS can serve lookups: it answers and has the mapping's tables (a
        custom query: the query runs). :class:`LisError` when it cannot (unreachable, a table
        missing, a SQLite file that does not exist: never created here); an empty LIS is a
        :class:`LisStatus` with a ``warning``. Used by ``hust19 doctor`` and ``/readyz``."""
        path = self.sqlite_path
        if path is not None and not path.is_file():
            raise LisError(f"LIS {self.display_url}: the SQLite file {path} does not exist")
        try:
            conn = self.engine.connect()
        except SQLAlchemyError as exc:
            raise LisError(f"LIS {self.display_url} not reachable: "
                           f"{describe_error(exc, self.url)}") from exc
        with translate_errors(self.url, "readiness check"), conn:
            if self.mapping.query is not None:
                self._probe_queries(conn)
                return LisStatus(self.display_url, self.mapping.source, (), None, "")
            tables = self._mapped_tables()
            found = inspect(conn)
            missing = [_qualified(name, schema) for name, schema in tables
                       if not found.has_table(name, schema=schema)]
            if missing:
                raise LisError(self._missing_tables_message(missing))
            name, schema = tables[0]
            has_data = conn.execute(select(text("1")).select_from(
                table(name, schema=schema)).limit(1)).first() is not None
        return LisStatus(self.display_url, self.mapping.source,
                         tuple(_qualified(n, s) for n, s in tables), has_data, self._fill_hint())

    def create_schema(self) -> None:
        """Create the reference tables where missing (reference mapping only)."""
        with translate_errors(self.url, "creating the reference schema"):
            LisBase.metadata.create_all(self.engine)

    def prepare(self) -> None:
        """At the agent's start: a SQLite LIS read through the reference schema gets its
        folder and tables where missing (a fresh data dir then has an empty LIS instead of
        "no such table" at every study), then the log says what the LIS can serve. Never
        raises for the LIS itself: triage runs CT-only while it cannot serve."""
        path = self.sqlite_path
        if path is not None and self.mapping.is_reference and not path.is_file():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.create_schema()
            except (OSError, LisError) as exc:
                logger.warning("LIS %s: cannot create it (%s)", self.display_url, exc)
            else:
                logger.info("LIS %s: created with the reference schema (empty)",
                            self.display_url)
        try:
            status = self.ping()
        except LisError as exc:
            logger.warning("%s; triage is CT-only until it can serve", exc.message)
            return
        if status.warning:
            logger.warning("%s", status.warning)
        else:
            logger.info("%s", status.describe())

    def _mapped_tables(self) -> list[tuple[str, str | None]]:
        """(table, schema) of the mapping, the one a patient shows in first: patients where
        mapped, else results."""
        m = self.mapping
        out = [(t.table, t.schema) for t in (m.patients, m.results, m.aliases) if t is not None]
        return list(dict.fromkeys(out))

    def _missing_tables_message(self, missing: list[str]) -> str:
        text_ = f"LIS {self.display_url} answers but has no table {', '.join(missing)}"
        if self.mapping.is_reference:
            return (f"{text_}: create the reference schema with: hust19 lis init --lis "
                    f"{self.display_url} (or fill it: {self._fill_command()})")
        return f"{text_}: check the table names in the LIS mapping ({self.mapping.source})"

    def _fill_command(self) -> str:
        return FILL_COMMAND.format(url=self.display_url)

    def _fill_hint(self) -> str:
        if self.mapping.is_reference:
            return f"fill it with: {self._fill_command()}"
        return ("check that the LIS mapping names the tables the laboratory writes to "
                f"({self.mapping.source})")

    def _probe_queries(self, conn: Any) -> None:
        """Run the custom query (and patient query) for a Patient ID that matches nobody."""
        params = {"patient_id": NO_PATIENT_ID, "from": FAR_PAST, "to": FAR_FUTURE}
        for sql in (self.mapping.query, self.mapping.patient_query):
            if sql is not None:
                q = text(sql)
                wanted = set(q.compile().params)
                conn.execute(q, {k: v for k, v in params.items() if k in wanted}).first()

    def lookup(self, patient_id: str, study_date: datetime | date | None = None) -> LabLookup:
        """The patient's values around ``study_date`` (see the module doc for the policies).
        An unknown patient gives ``patient_found=False`` and no values; a LIS that cannot be
        queried raises :class:`LisError`."""
        window = lab_window(study_date, self.window_days)
        with translate_errors(self.url, "lab lookup"), self.engine.connect() as conn:
            lis_id = self._resolve_alias(conn, patient_id)
            patient = self._patient_row(conn, lis_id)
            rows = self._result_rows(conn, lis_id, window)
        found = patient is not None or bool(rows)
        result = self._assemble(rows, patient, window, study_date)
        lookup = LabLookup(
            patient_found=found, values=result.values if found else {},
            unit_mismatches=result.mismatches, unknown_codes=sorted(result.unknown),
            undated=result.undated, window=window, source=self.mapping.source,
            lis_patient_id=lis_id if found else None, non_numeric=result.non_numeric,
            unreadable=result.unreadable)
        logger.debug("LIS lookup (%s): found=%s, %d values, %d undated, %d unit mismatches, "
                     "%d unknown codes", self.mapping.source, found, len(lookup.values),
                     lookup.undated, len(lookup.unit_mismatches), len(lookup.unknown_codes))
        return lookup

    # -- queries ------------------------------------------------------------------------------

    def _resolve_alias(self, conn: Any, patient_id: str) -> str:
        aliases: AliasTable | None = self.mapping.aliases
        if aliases is None:
            return patient_id
        t = _table(aliases.table, aliases.schema, [aliases.alias, aliases.patient_id])
        stmt = select(t.c[aliases.patient_id]).where(
            t.c[aliases.alias] == bindparam("patient_id"))
        found = conn.execute(stmt, {"patient_id": patient_id}).scalar()
        return str(found) if found is not None else patient_id

    def _patient_row(self, conn: Any, lis_id: str) -> dict[str, Any] | None:
        if self.mapping.patient_query is not None:
            row = conn.execute(text(self.mapping.patient_query),
                               {"patient_id": lis_id}).mappings().first()
            return _lower_keys(row) if row is not None else None
        pt: PatientTable | None = self.mapping.patients
        if pt is None:
            return None
        names = {k: getattr(pt, k) for k in PATIENT_COLUMNS if getattr(pt, k)}
        t = _table(pt.table, pt.schema, [pt.patient_id, *names.values()])
        stmt = select(t.c[pt.patient_id].label("patient_id"),
                      *(t.c[col].label(key) for key, col in names.items())
                      ).where(t.c[pt.patient_id] == bindparam("patient_id"))
        row = conn.execute(stmt, {"patient_id": lis_id}).mappings().first()
        return dict(row) if row is not None else None

    def _result_rows(self, conn: Any, lis_id: str, window: Window) -> list[dict[str, Any]]:
        lo, hi = window
        if self.mapping.query is not None:
            q = text(self.mapping.query)
            wanted = set(q.compile().params)
            params = {"patient_id": lis_id, "from": lo or FAR_PAST, "to": hi or FAR_FUTURE}
            rows = conn.execute(q, {k: v for k, v in params.items() if k in wanted})
            return [_lower_keys(r) for r in rows.mappings()]
        rt = self.mapping.results
        if rt is None:  # excluded by LisMapping validation
            raise LisError("LIS mapping has neither tables nor a query")
        stmt = self._results_select(rt, window)
        return [dict(r) for r in conn.execute(stmt, {"patient_id": lis_id}).mappings()]

    @staticmethod
    def _results_select(rt: ResultTable, window: Window) -> Select[Any]:
        names = {k: getattr(rt, k) for k in RESULT_COLUMNS if getattr(rt, k)}
        extra = [rt.row_id] if rt.row_id else []
        t = _table(rt.table, rt.schema, [rt.patient_id, *names.values(), *extra])
        stmt = select(*(t.c[col].label(key) for key, col in names.items())).where(
            t.c[rt.patient_id] == bindparam("patient_id"))
        lo, hi = window
        if rt.collected_at and lo is not None and hi is not None:
            when: ColumnElement[Any] = t.c[rt.collected_at]
            stmt = stmt.where(or_(when.is_(None), when.between(lo, hi)))
        order = [t.c[name] for name in (rt.collected_at, rt.row_id) if name]
        return stmt.order_by(*order) if order else stmt

    # -- assembly -----------------------------------------------------------------------------

    def _assemble(self, rows: list[dict[str, Any]], patient: Mapping[str, Any] | None,
                  window: Window, study_date: datetime | date | None) -> _Assembly:
        out = _Assembly()
        dated: dict[str, tuple[datetime, int, LabValue]] = {}
        undated: dict[str, LabValue] = {}
        for index, row in enumerate(rows):
            lis_code = str(row.get("code") or "").strip()
            code = self._code_map.get(lis_code)
            if code is None:
                out.unknown.add(lis_code)
                continue
            try:
                collected = _to_datetime(row.get("collected_at"))
            except LisError as exc:
                out.unreadable.append(f"{lis_code}: {exc.message}")
                continue
            if collected is not None and window[0] is not None and window[1] is not None \
                    and not window[0] <= collected <= window[1]:
                continue  # a custom query that ignores :from/:to
            if collected is None and self.mapping.undated == "ignore":
                continue
            value = self._lab_value(lis_code, code, row, collected, out)
            if value is None:
                continue
            if collected is None:
                undated[code] = value  # the last undated row wins
            elif code not in dated or (collected, index) >= dated[code][:2]:
                dated[code] = (collected, index, value)
        for code, (_, _, value) in dated.items():
            out.values[code] = value
        for code, value in undated.items():
            if code not in out.values:
                out.values[code] = value
                out.undated += 1
        if patient is not None:
            values = _patient_values(patient, study_date, self._catalogue, out.unreadable)
            for code, value in values.items():
                out.values.setdefault(code, value)
        return out

    def _lab_value(self, lis_code: str, code: str, row: Mapping[str, Any],
                   collected: datetime | None, out: _Assembly) -> LabValue | None:
        feature = self._catalogue[code]
        raw = row.get("value_raw")
        value, qualifier = row.get("value"), str(row.get("qualifier") or "")
        if isinstance(value, str):
            parsed = parse_value(value)
            value, qualifier = (parsed[1], parsed[0] or qualifier) if parsed else (None, "")
            raw = raw if raw is not None else row.get("value")
        elif isinstance(value, int | float | Decimal):
            value = float(value)
            if not math.isfinite(value):
                raw, value = value, None
        if value is None and raw is not None:
            parsed = parse_value(str(raw))
            if parsed is not None:
                qualifier, value = parsed
        if value is None or not math.isfinite(value):
            out.non_numeric.append(f"{lis_code}: {raw!r}")
            return None
        low, high = _opt_float(row.get("reference_low")), _opt_float(row.get("reference_high"))
        printed = parse_range(row.get("reference_range"))
        if low is None and high is None and printed is not None:
            low, high = printed.low, printed.high
        unit = row.get("unit") or (printed.unit if printed is not None else None) or None
        if low is None and high is None \
                and canonical_unit(unit) != canonical_unit(feature.unit):
            label = lis_code if lis_code == code else f"{lis_code}->{code}"
            out.mismatches.append(f"{label}: unit {unit or ''!r} != catalogue "
                                  f"{feature.unit!r}, no printed range")
            return None
        return LabValue(code=code, value=value, unit=unit, qualifier=qualifier, low=low,
                        high=high, lis_code=lis_code,
                        collected_at=collected.isoformat() if collected else None)


@dataclass
class _Assembly:
    values: dict[str, LabValue] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    unknown: set[str] = field(default_factory=set)
    non_numeric: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    undated: int = 0


def _qualified(name: str, schema: str | None) -> str:
    return f"{schema}.{name}" if schema else name


def _table(name: str, schema: str | None, columns: list[str]) -> TableClause:
    return table(name, *(column(c) for c in dict.fromkeys(columns)), schema=schema)


def _lower_keys(row: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in row.items()}


def _opt_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _to_datetime(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.astimezone().replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, date):
        return datetime.combine(value, time.min)
    try:
        return _to_datetime(datetime.fromisoformat(str(value)))
    except ValueError as exc:
        raise LisError(f"LIS collection time {value!r} is not a date/time") from exc


def _to_date(value: Any) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError as exc:
        raise LisError(f"LIS birth date {value!r} is not a date") from exc


def _patient_values(patient: Mapping[str, Any], study_date: datetime | date | None,
                    catalogue: Mapping[str, Feature],
                    unreadable: list[str] | None = None) -> dict[str, LabValue]:
    """AGE, GENDER, TEMP and UDIS from the patient row (missing items are left out; a birth
    date that is not a date is named in ``unreadable`` and the age column used instead)."""
    out: dict[str, LabValue] = {}

    def put(code: str, value: float | None, column_name: str) -> None:
        if value is not None:
            out[code] = LabValue(code=code, value=value, unit=catalogue[code].unit or None,
                                 lis_code=column_name)

    try:
        birth = _to_date(patient.get("birth_date"))
    except LisError as exc:
        birth = None
        if unreadable is not None:
            unreadable.append(f"birth_date: {exc.message}")
    if birth is not None:
        ref = study_date.date() if isinstance(study_date, datetime) else \
            (study_date or date.today())
        years = ref.year - birth.year - ((ref.month, ref.day) < (birth.month, birth.day))
        put(AGE, float(years), "birth_date")
    else:
        put(AGE, _opt_float(patient.get("age")), "age")
    sex = str(patient.get("sex") or "").strip().lower()
    put(GENDER, 1.0 if sex in MALE else 0.0 if sex in FEMALE else None, "sex")
    put(TEMP, _opt_float(patient.get("body_temperature")), "body_temperature")
    diseases = patient.get("underlying_diseases")
    text_ = str(diseases).strip().lower() if diseases is not None else ""
    put(UDIS, None if text_ in UNKNOWN_TEXT else 0.0 if text_ in NO_DISEASE else 1.0,
        "underlying_diseases")
    return out


def open_lis(settings: Settings, *, prepare: bool = True) -> LisClient:
    """The LIS the settings name: ``lis_url`` with the ``lis_mapping`` file (or the reference
    schema) and the lab window; with ``prepare`` (the agent's start) a missing SQLite LIS is
    created with the reference schema and the log says what it holds (:meth:`LisClient.prepare`;
    ``hust19 doctor`` passes False: it creates nothing). Raises :class:`ConfigError` for a
    bad mapping file."""
    mapping = LisMapping.load(settings.lis_mapping) if settings.lis_mapping else None
    client = LisClient(settings.lis_url, mapping, window_days=settings.lis_window_days)
    if prepare:
        client.prepare()
    return client
