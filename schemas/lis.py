"""The reference LIS data model (SQLAlchemy 2.0 declarative) and the parsing of printed ranges.

A hospital whose laboratory information system has no schema of its own to offer (or a demo,
or the tests) uses these three tables; a real LIS is read through a mapping instead
(``agent.triage.lis_mapping``). The layout follows what a LIS report prints:

* ``lis_patient``: one row per patient, keyed by the hospital's medical record number (the
  value DICOM PatientID carries), with the clinical items the CF model needs that are not lab
  tests (age or birth date, sex, body temperature, underlying diseases).
* ``lis_result``: one row per printed result: the text as printed (``value_raw``), the
  censoring ``qualifier`` ("<" / ">"), the number, the unit, the reference range printed next
  to it (text and parsed bounds: ranges differ between hospitals), the H/L flag and the
  collection time (nullable: the iCTCF export has none).
* ``lis_patient_alias``: links another identifier (a DICOM PatientID that differs from the
  MRN) to a ``lis_patient``.

Values are stored as printed; nothing is converted between units. Numbers use ``Double`` (a
MySQL ``FLOAT`` would be single precision).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PATIENT_TABLE: Final = "lis_patient"
RESULT_TABLE: Final = "lis_result"
ALIAS_TABLE: Final = "lis_patient_alias"

ID_LENGTH: Final = 64
CODE_LENGTH: Final = 32
UNIT_LENGTH: Final = 32
TEXT_LENGTH: Final = 64
QUALIFIER_LENGTH: Final = 2
FLAG_LENGTH: Final = 4

QUALIFIERS: Final = ("<", ">")
"""Censoring qualifiers a printed value may carry ("<0.13": below the detection limit)."""


class LisBase(DeclarativeBase):
    """Declarative base of the reference LIS tables (its own metadata: the LIS is a separate
    database from anything else the agent stores)."""


class LisPatient(LisBase):
    """A patient as the LIS knows them."""

    __tablename__ = PATIENT_TABLE

    patient_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True,
                                            doc="The hospital's MRN (= DICOM PatientID).")
    hospital: Mapped[str | None] = mapped_column(String(128))
    sex: Mapped[str | None] = mapped_column(String(16), doc="M/F or Male/Female as recorded.")
    birth_date: Mapped[date | None] = mapped_column(Date)
    age: Mapped[int | None] = mapped_column(Integer, doc="Age in years, where no birth date is "
                                            "recorded (iCTCF gives only the age).")
    body_temperature: Mapped[float | None] = mapped_column(Double, doc="degC at admission.")
    underlying_diseases: Mapped[str | None] = mapped_column(Text, doc="Free text; 'No' = none.")
    source: Mapped[str | None] = mapped_column(String(CODE_LENGTH),
                                               doc="Who loaded the row ('ictcf' for the import).")


class LisPatientAlias(LisBase):
    """Another identifier of a patient (for instance a DICOM PatientID that is not the MRN).

    No foreign key on purpose: an alias may be recorded before the patient is loaded, and
    reloading patients must not be blocked by it."""

    __tablename__ = ALIAS_TABLE

    alias: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    note: Mapped[str | None] = mapped_column(Text)


class LisResult(LisBase):
    """One printed laboratory result."""

    __tablename__ = RESULT_TABLE
    __table_args__ = (
        Index("ix_lis_result_patient_code_time", "patient_id", "code", "collected_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey(f"{PATIENT_TABLE}.patient_id"), nullable=False)
    code: Mapped[str] = mapped_column(String(CODE_LENGTH), nullable=False,
                                      doc="The LIS test code (catalogue codes by default).")
    value_raw: Mapped[str | None] = mapped_column(String(TEXT_LENGTH), doc="As printed.")
    qualifier: Mapped[str | None] = mapped_column(String(QUALIFIER_LENGTH),
                                                  doc="'<' or '>' for a censored value.")
    value: Mapped[float | None] = mapped_column(Double, doc="The number after the qualifier.")
    unit: Mapped[str | None] = mapped_column(String(UNIT_LENGTH))
    reference_low: Mapped[float | None] = mapped_column(Double)
    reference_high: Mapped[float | None] = mapped_column(Double)
    reference_range: Mapped[str | None] = mapped_column(String(TEXT_LENGTH),
                                                        doc="The range as printed.")
    flag: Mapped[str | None] = mapped_column(String(FLAG_LENGTH), doc="H / L as printed.")
    collected_at: Mapped[datetime | None] = mapped_column(DateTime)
    panel: Mapped[str | None] = mapped_column(String(TEXT_LENGTH))
    source: Mapped[str | None] = mapped_column(String(CODE_LENGTH))


@dataclass(frozen=True)
class PrintedRange:
    """A reference range as printed next to a result: "316-354 g/L", "<0.5 mg/L FEU",
    "0.41-2.72". A one-sided range has ``low`` (or ``high``) ``None``; ``unit`` is the text after
    the numbers ("" when none was printed)."""

    low: float | None
    high: float | None
    unit: str


_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_RANGE_RE: Final = re.compile(
    rf"^\s*(?:(?P<lo>{_NUMBER})\s*(?:-|\u2013|~|to)\s*(?P<hi>{_NUMBER})"
    rf"|(?P<le><=|≤|<)\s*(?P<ub>{_NUMBER})"
    rf"|(?P<ge>>=|≥|>)\s*(?P<lb>{_NUMBER}))\s*(?P<unit>.*?)\s*$")
_VALUE_RE: Final = re.compile(rf"^\s*(?P<q>[<>])?\s*(?P<v>{_NUMBER})\s*$")


def parse_range(text: str | None) -> PrintedRange | None:
    """Parse a printed reference range; ``None`` for empty or unreadable text (the caller
    then has no printed range, which is what the LIS said)."""
    if not text:
        return None
    m = _RANGE_RE.match(text)
    if m is None:
        return None
    if m["lo"] is not None:
        return PrintedRange(float(m["lo"]), float(m["hi"]), m["unit"])
    if m["ub"] is not None:
        return PrintedRange(None, float(m["ub"]), m["unit"])
    return PrintedRange(float(m["lb"]), None, m["unit"])


def parse_value(text: str | None) -> tuple[str, float] | None:
    """Split a printed value into (qualifier, number): "<0.13" -> ("<", 0.13), "7.2" -> ("",
    7.2); ``None`` for text that is not a number (e.g. "negative")."""
    if text is None:
        return None
    m = _VALUE_RE.match(text)
    if m is None:
        return None
    return m["q"] or "", float(m["v"])


_COUNT_UNITS: Final = {"G/L": "10^9/l", "T/L": "10^12/l"}
"""Haematology writes counts per litre with SI prefixes: G/L (10^9/L) is not g/L (grams)."""


def canonical_unit(unit: str | None) -> str:
    """A unit spelled for comparison: micro sign to "u", case-insensitive except the count
    units G/L and T/L, spaces collapsed. "μmol/L" == "umol/l"; "G/L" != "g/L"."""
    if not unit:
        return ""
    text = " ".join(unit.replace("μ", "u").replace("µ", "u").split())
    return _COUNT_UNITS.get(text, text).lower()
