"""Loading the iCTCF clinical tables into per-patient catalogue values.

The iCTCF export (Ning et al. 2020) as it sits in ``../shared/data/ictcf``:

* ``patients.csv``: one row per patient with the demographics the CF network uses (age, gender,
  body temperature, underlying diseases) and the ``label`` (control / type1 / type2 /
  suspected). ``ct_finding``, ``morbidity``, ``mortality`` and the nucleic-acid columns are
  outcomes or other modalities and are never read into the features.
* ``lab_results.csv``: long form, one row per result with the reference range the hospital
  printed next to it (the preferred source: each result carries its own range and unit).
* ``clinical_features.csv``: the same results in wide form, values as printed, no ranges.
  Ranges then come from ``reference_ranges.csv`` (per hospital) when it sits beside the file,
  else from the catalogue.

Censoring decision: a censored result (``"<0.13"``, ``">8.00"``) takes the bound number as its
value, with the qualifier kept on the :class:`~schemas.features.LabValue`. The bound is the
closest number the lab gives: the true value lies beyond it, so the normalised value is on the
correct side and only slightly less extreme than the truth (352 of the ~61,000 results here).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from schemas.errors import InputError
from schemas.features import LabValue, by_code

log = logging.getLogger(__name__)

Label = Literal["control", "type1", "type2", "suspected"]

#: Classes the CF network predicts, in output order.
CLASSES: Final[tuple[str, str, str]] = ("control", "type1", "type2")
#: Label of patients with no confirmed diagnosis: predicted, never scored.
SUSPECTED: Final = "suspected"
LABELS: Final[tuple[str, ...]] = (*CLASSES, SUSPECTED)

#: ``underlying_diseases`` text meaning "none" (the paper's Udis = 0).
NO_DISEASE: Final = "no"
MALE: Final = "male"

PATIENT_COLUMNS: Final = ("patient_id", "hospital", "age", "gender", "body_temperature",
                          "underlying_diseases", "label")
LAB_COLUMNS: Final = ("patient_id", "code", "value_raw", "qualifier", "value",
                      "reference_range")

_RANGE = re.compile(r"^\s*(?:(?P<low>-?\d+(?:\.\d+)?)\s*-\s*(?P<high>-?\d+(?:\.\d+)?)|"
                    r"<\s*(?P<upper>-?\d+(?:\.\d+)?))\s*(?P<unit>.*?)\s*$")
_VALUE = re.compile(r"^\s*(?P<qual>[<>]?)\s*(?P<num>[-+]?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Patient:
    """One iCTCF patient: identity, hospital, label and CF input values keyed by catalogue
    code (labs plus AGE, GENDER, TEMP, UDIS)."""

    patient_id: str
    hospital: str
    label: str
    values: Mapping[str, LabValue] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        """Whether the label is a diagnosis (control/type1/type2) that can be scored."""
        return self.label in CLASSES

    @property
    def class_index(self) -> int:
        """Index into :data:`CLASSES`; ``-1`` for suspected patients."""
        return CLASSES.index(self.label) if self.scored else -1


def parse_range(text: str) -> tuple[float | None, float | None, str]:
    """``"316-354 g/L"`` -> ``(316.0, 354.0, "g/L")``; ``"<15 mm/h"`` -> ``(0.0, 15.0, "mm/h")``
    (upper bound only: Min = 0, as the catalogue does); empty or unreadable -> ``(None, None,
    "")``."""
    m = _RANGE.match(text or "")
    if not m:
        return None, None, ""
    if m["upper"] is not None:
        return 0.0, float(m["upper"]), m["unit"]
    return float(m["low"]), float(m["high"]), m["unit"]


def parse_value(text: str) -> tuple[float | None, str]:
    """A printed result -> ``(number, qualifier)``; censored results keep the bound number
    (see the module docstring). Empty -> ``(None, "")``; anything else is an
    :class:`InputError`."""
    if not text or not text.strip():
        return None, ""
    m = _VALUE.match(text)
    if not m:
        raise InputError(f"unreadable lab value {text!r}")
    return float(m["num"]), m["qual"]


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
            return list(reader)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text") from exc


def _opt_float(text: str, where: str) -> float | None:
    if not text.strip() or text.strip().upper() == "N/A":
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise InputError(f"{where}: {text!r} is not a number") from exc


def demographic_values(row: Mapping[str, str], where: str) -> dict[str, LabValue]:
    """AGE, GENDER (male = 1), TEMP (degC, missing where N/A) and UDIS ("No" = 0, any
    other text = 1, empty = missing) from a ``patients.csv`` row."""
    out: dict[str, LabValue] = {}
    age = _opt_float(row["age"], f"{where} age")
    if age is not None:
        out["AGE"] = LabValue("AGE", age, unit="a")
    gender = row["gender"].strip().lower()
    if gender:
        out["GENDER"] = LabValue("GENDER", 1.0 if gender == MALE else 0.0)
    temp = _opt_float(row["body_temperature"], f"{where} body_temperature")
    if temp is not None:
        out["TEMP"] = LabValue("TEMP", temp, unit="Cel")
    udis = row["underlying_diseases"].strip()
    if udis:
        out["UDIS"] = LabValue("UDIS", 0.0 if udis.lower() == NO_DISEASE else 1.0)
    return out


def load_patients(path: Path) -> list[Patient]:
    """Patients with their demographic values, in file order. Unknown labels are an
    :class:`InputError` naming the file and row."""
    rows = _read_csv(path, PATIENT_COLUMNS)
    patients: list[Patient] = []
    for i, row in enumerate(rows, start=2):
        where = f"{path} line {i}"
        label = row["label"].strip().lower()
        if label not in LABELS:
            raise InputError(f"{where}: unknown label {row['label']!r} "
                             f"(expected one of {', '.join(LABELS)})")
        patients.append(Patient(row["patient_id"].strip(), row["hospital"].strip(), label,
                                demographic_values(row, where)))
    return patients


def load_lab_results(path: Path) -> dict[str, dict[str, LabValue]]:
    """``lab_results.csv`` (long form) -> ``{patient_id: {code: LabValue}}`` with each
    result's printed range and unit. A later row for the same code overrides an earlier one."""
    out: dict[str, dict[str, LabValue]] = {}
    for i, row in enumerate(_read_csv(path, LAB_COLUMNS), start=2):
        code = row["code"].strip()
        raw = row["value_raw"].strip()
        try:
            value, qual = parse_value(raw)
        except InputError as exc:
            raise InputError(f"{path} line {i}: {exc.message}") from exc
        qual = row["qualifier"].strip() or qual
        low, high, unit = parse_range(row["reference_range"])
        out.setdefault(row["patient_id"].strip(), {})[code] = LabValue(
            code, value, unit=unit or None, qualifier=qual, low=low, high=high, lis_code=code)
    return out


def load_reference_ranges(path: Path) -> dict[tuple[str, str], tuple[float, float, str]]:
    """``reference_ranges.csv`` -> ``{(code, hospital): (low, high, unit)}`` (upper-bound-only
    ranges take low = 0)."""
    out: dict[tuple[str, str], tuple[float, float, str]] = {}
    for row in _read_csv(path, ("code", "hospital", "reference_range")):
        low, high, unit = parse_range(row["reference_range"])
        if low is not None and high is not None:
            out[(row["code"].strip(), row["hospital"].strip())] = (low, high, unit)
    return out


def load_wide(path: Path, hospitals: Mapping[str, str] | None = None,
              ranges: Mapping[tuple[str, str], tuple[float, float, str]] | None = None,
              ) -> dict[str, dict[str, LabValue]]:
    """``clinical_features.csv`` (wide form: ``patient_id`` plus one column per test code)
    -> ``{patient_id: {code: LabValue}}``. With ``hospitals`` (patient -> hospital) and
    ``ranges`` (from :func:`load_reference_ranges`) each value gets its hospital's printed
    range and unit; without them the value has no range (the catalogue range applies)."""
    rows = _read_csv(path, ("patient_id",))
    known = set(by_code())
    unknown = sorted({c for c in (rows[0] if rows else {}) if c != "patient_id"} - known)
    if unknown:
        log.warning("%s: %d column(s) are not catalogue codes and are ignored by the CF "
                    "model: %s", path, len(unknown), ", ".join(unknown[:10]))
    out: dict[str, dict[str, LabValue]] = {}
    for i, row in enumerate(rows, start=2):
        pid = row["patient_id"].strip()
        hospital = (hospitals or {}).get(pid, "")
        values: dict[str, LabValue] = {}
        for code, raw in row.items():
            if code == "patient_id" or raw is None or not raw.strip():
                continue
            try:
                value, qual = parse_value(raw)
            except InputError as exc:
                raise InputError(f"{path} line {i} column {code}: {exc.message}") from exc
            rng = (ranges or {}).get((code, hospital))
            if rng is None:
                values[code] = LabValue(code, value, qualifier=qual, lis_code=code)
            else:
                values[code] = LabValue(code, value, unit=rng[2] or None, qualifier=qual,
                                        low=rng[0], high=rng[1], lis_code=code)
        out[pid] = values
    return out


RangeSource = Literal["lab_results", "reference_ranges", "catalogue"]


@dataclass(frozen=True)
class Cohort:
    """Patients with their merged values, and where the reference ranges came from."""

    patients: tuple[Patient, ...]
    range_source: RangeSource

    @property
    def scored(self) -> tuple[Patient, ...]:
        return tuple(p for p in self.patients if p.scored)

    @property
    def suspected(self) -> tuple[Patient, ...]:
        return tuple(p for p in self.patients if not p.scored)


def _merge(patients: list[Patient], labs: Mapping[str, Mapping[str, LabValue]],
           source: RangeSource) -> Cohort:
    merged = tuple(Patient(p.patient_id, p.hospital, p.label,
                           {**labs.get(p.patient_id, {}), **p.values}) for p in patients)
    unknown = set(labs) - {p.patient_id for p in patients}
    if unknown:
        log.warning("%d lab patient(s) not in the patient table, ignored (e.g. %s)",
                    len(unknown), sorted(unknown)[0])
    return Cohort(merged, source)


def _with_ranges(wide: Mapping[str, Mapping[str, LabValue]],
                 labs: Mapping[str, Mapping[str, LabValue]]) -> dict[str, dict[str, LabValue]]:
    """The wide table's values, each with the range and unit printed for the same patient and
    code in the long table (when it has one)."""
    out: dict[str, dict[str, LabValue]] = {}
    for pid, values in wide.items():
        printed = labs.get(pid, {})
        out[pid] = {}
        for code, v in values.items():
            p = printed.get(code)
            out[pid][code] = v if p is None else LabValue(
                code, v.value, unit=p.unit, qualifier=v.qualifier, low=p.low, high=p.high,
                lis_code=v.lis_code)
    return out


def load_tables(patients_csv: Path, features_csv: Path) -> Cohort:
    """The ``evaluate cf`` inputs: ``patients.csv`` plus the wide ``clinical_features.csv``.
    Values come from the wide file; ranges from ``lab_results.csv`` beside it when present
    (the range printed with each result), else ``reference_ranges.csv`` beside it (per
    hospital), else the catalogue."""
    patients = load_patients(patients_csv)
    beside = features_csv.parent
    if (beside / "lab_results.csv").is_file():
        labs = load_lab_results(beside / "lab_results.csv")
        return _merge(patients, _with_ranges(load_wide(features_csv), labs), "lab_results")
    if (beside / "reference_ranges.csv").is_file():
        hospitals = {p.patient_id: p.hospital for p in patients}
        ranges = load_reference_ranges(beside / "reference_ranges.csv")
        return _merge(patients, load_wide(features_csv, hospitals, ranges), "reference_ranges")
    return _merge(patients, load_wide(features_csv), "catalogue")


def load_cohort(directory: Path) -> Cohort:
    """The iCTCF folder (``patients.csv`` + ``lab_results.csv``) for training and CV."""
    patients_csv = directory / "patients.csv"
    labs_csv = directory / "lab_results.csv"
    for f in (patients_csv, labs_csv):
        if not f.is_file():
            raise InputError(f"{f}: not found (expected the iCTCF tables in {directory})")
    return _merge(load_patients(patients_csv), load_lab_results(labs_csv), "lab_results")
