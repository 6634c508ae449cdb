"""How a hospital's LIS is read: which tables and columns, or one parameterised query, and how
its test codes map onto the clinical-feature catalogue.

Three sources, one per mapping:

* the reference schema (``schemas.lis``; the default: catalogue codes are the LIS codes);
* the hospital's own tables, named in ``[results]`` (and optionally ``[patients]``): the
  SELECT is built with SQLAlchemy Core, identifiers quoted by the dialect;
* ONE SQL query in ``query`` with the bound parameters ``:patient_id``, ``:from`` and ``:to``
  only (``from``/``to``: the window around the study date), run with ``text()``; it returns
  the columns ``code`` and ``value`` and any of ``value_raw``, ``qualifier``, ``unit``,
  ``reference_low``, ``reference_high``, ``reference_range``, ``collected_at``. An optional
  ``patient_query`` (``:patient_id`` only) returns any of ``sex``, ``birth_date``, ``age``,
  ``body_temperature``, ``underlying_diseases``.

``[codes]`` maps the hospital's codes onto catalogue codes (``"HB" = "HGB"``); catalogue codes
are always understood. See ``deploy/lis-mapping.example.toml``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from schemas import lis as ref
from schemas.errors import ConfigError
from schemas.features import by_code

UndatedPolicy = Literal["fallback", "ignore"]
UNDATED_POLICIES: Final = ("fallback", "ignore")

SOURCE_REFERENCE: Final = "reference schema"
SOURCE_TABLES: Final = "custom tables"
SOURCE_QUERY: Final = "custom query"

QUERY_PARAMS: Final = frozenset({"patient_id", "from", "to"})
PATIENT_QUERY_PARAMS: Final = frozenset({"patient_id"})

RESULT_COLUMNS: Final = ("code", "value", "value_raw", "qualifier", "unit", "reference_low",
                         "reference_high", "reference_range", "collected_at")
PATIENT_COLUMNS: Final = ("sex", "birth_date", "age", "body_temperature", "underlying_diseases")


@dataclass(frozen=True)
class ResultTable:
    """The hospital's results table: its name and which column holds what (``None``: the
    table has no such column). ``patient_id``, ``code`` and ``value`` are required."""

    table: str
    patient_id: str
    code: str
    value: str
    schema: str | None = None
    value_raw: str | None = None
    qualifier: str | None = None
    unit: str | None = None
    reference_low: str | None = None
    reference_high: str | None = None
    reference_range: str | None = None
    collected_at: str | None = None
    row_id: str | None = None
    """A column giving the order the LIS stored the rows in (an id): among undated results
    of one code the last one wins."""


@dataclass(frozen=True)
class PatientTable:
    """The hospital's patient table (optional): name and columns."""

    table: str
    patient_id: str
    schema: str | None = None
    sex: str | None = None
    birth_date: str | None = None
    age: str | None = None
    body_temperature: str | None = None
    underlying_diseases: str | None = None


@dataclass(frozen=True)
class AliasTable:
    """A table of other identifiers (alias -> patient id)."""

    table: str
    alias: str
    patient_id: str
    schema: str | None = None


REFERENCE_RESULTS: Final = ResultTable(
    table=ref.RESULT_TABLE, patient_id="patient_id", code="code", value="value",
    value_raw="value_raw", qualifier="qualifier", unit="unit", reference_low="reference_low",
    reference_high="reference_high", reference_range="reference_range",
    collected_at="collected_at", row_id="id")
REFERENCE_PATIENTS: Final = PatientTable(
    table=ref.PATIENT_TABLE, patient_id="patient_id", sex="sex", birth_date="birth_date",
    age="age", body_temperature="body_temperature",
    underlying_diseases="underlying_diseases")
REFERENCE_ALIASES: Final = AliasTable(table=ref.ALIAS_TABLE, alias="alias",
                                      patient_id="patient_id")


@dataclass(frozen=True)
class LisMapping:
    """Where the lab values are and what the codes mean. Build with :meth:`reference` or
    :meth:`load` (TOML); the constructor validates."""

    results: ResultTable | None = None
    patients: PatientTable | None = None
    aliases: AliasTable | None = None
    query: str | None = None
    patient_query: str | None = None
    codes: Mapping[str, str] = field(default_factory=dict)
    undated: UndatedPolicy = "fallback"
    is_reference: bool = False

    def __post_init__(self) -> None:
        if (self.results is None) == (self.query is None):
            raise ConfigError("LIS mapping: give either [results] (the hospital's tables) or "
                              "query (one SQL query), not both and not neither")
        if self.patient_query is not None and self.query is None:
            raise ConfigError("LIS mapping: patient_query goes with query")
        if self.undated not in UNDATED_POLICIES:
            raise ConfigError(f"LIS mapping: undated = {self.undated!r}; use one of "
                              f"{', '.join(UNDATED_POLICIES)}")
        catalogue = by_code()
        bad = sorted(f"{k} = {v}" for k, v in self.codes.items() if v not in catalogue)
        if bad:
            raise ConfigError(f"LIS mapping [codes]: not catalogue codes: {', '.join(bad)}")
        if self.query is not None:
            _check_params("query", self.query, QUERY_PARAMS)
        if self.patient_query is not None:
            _check_params("patient_query", self.patient_query, PATIENT_QUERY_PARAMS)

    @property
    def source(self) -> str:
        """``"reference schema"``, ``"custom tables"`` or ``"custom query"``."""
        if self.is_reference:
            return SOURCE_REFERENCE
        return SOURCE_QUERY if self.query is not None else SOURCE_TABLES

    def code_map(self) -> dict[str, str]:
        """LIS code -> catalogue code: every catalogue feature's own ``lis_codes``, then the
        mapping's ``[codes]`` on top."""
        out = {c: f.code for f in by_code().values() for c in f.lis_codes}
        out.update(self.codes)
        return out

    @classmethod
    def reference(cls) -> LisMapping:
        """The reference schema of ``schemas.lis`` with catalogue codes as LIS codes."""
        return cls(results=REFERENCE_RESULTS, patients=REFERENCE_PATIENTS,
                   aliases=REFERENCE_ALIASES, is_reference=True)

    @classmethod
    def load(cls, path: Path) -> LisMapping:
        """Read a mapping TOML file; :class:`ConfigError` names the file and the problem."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"LIS mapping {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LisMapping:
        """Build from the parsed TOML document (keys as in the example file)."""
        known = {"results", "patients", "aliases", "query", "patient_query", "codes", "undated"}
        extra = sorted(set(data) - known)
        if extra:
            raise ConfigError(f"LIS mapping: unknown keys {', '.join(extra)}")
        codes = data.get("codes", {})
        if not isinstance(codes, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in codes.items()):
            raise ConfigError("LIS mapping: [codes] must map strings to catalogue codes")
        return cls(
            results=_section(ResultTable, data.get("results"), "results"),
            patients=_section(PatientTable, data.get("patients"), "patients"),
            aliases=_section(AliasTable, data.get("aliases"), "aliases"),
            query=_opt_str(data, "query"),
            patient_query=_opt_str(data, "patient_query"),
            codes=dict(codes),
            undated=data.get("undated", "fallback"),
        )


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"LIS mapping: {key} must be a string")
    return value


def _section(kind: Any, data: Any, name: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"LIS mapping: [{name}] must be a table")
    allowed = {f.name for f in fields(kind)}
    extra = sorted(set(data) - allowed)
    if extra:
        raise ConfigError(f"LIS mapping [{name}]: unknown keys {', '.join(extra)}; "
                          f"known: {', '.join(sorted(allowed))}")
    if not all(isinstance(v, str) and v for v in data.values()):
        raise ConfigError(f"LIS mapping [{name}]: names must be non-empty strings")
    try:
        return kind(**data)
    except TypeError as exc:
        raise ConfigError(f"LIS mapping [{name}]: {exc}") from exc


def _check_params(name: str, sql: str, allowed: frozenset[str]) -> None:
    """The query's bound parameters must be among ``allowed`` and include ``:patient_id``."""
    try:
        params = set(text(sql).compile().params)
    except SQLAlchemyError as exc:
        raise ConfigError(f"LIS mapping {name}: {exc}") from exc
    extra = sorted(params - allowed)
    if extra:
        raise ConfigError(f"LIS mapping {name}: unknown bound parameters "
                          f"{', '.join(':' + p for p in extra)}; allowed: "
                          f"{', '.join(':' + p for p in sorted(allowed))}")
    if "patient_id" not in params:
        raise ConfigError(f"LIS mapping {name}: must use the bound parameter :patient_id")
