"""``hust19 lis {import-ictcf,init,show,ping}``: load the iCTCF clinical data into a LIS
database (reference schema, any SQLAlchemy URL), create the empty reference schema, print one
patient's lookup as JSON, check the LIS (answers, has its tables, holds patients).

The import keeps every value as printed (``value_raw``, qualifier, the printed range); the
number, the range bounds and the unit are split out of the printed text, never converted. It
is idempotent: each batch of patients replaces that batch's earlier iCTCF rows in one
transaction (rows of other sources are left alone), so a rerun does not duplicate.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import delete, insert
from tqdm import tqdm

from agent.cli.commands.common import settings_from_args
from agent.triage.lis import LisClient, open_engine, resolve_url, translate_errors
from agent.triage.lis_mapping import LisMapping
from schemas.errors import InputError
from schemas.lis import LisBase, LisPatient, LisPatientAlias, LisResult, parse_range

ICTCF_SOURCE: Final = "ictcf"
PATIENTS_CSV: Final = "patients.csv"
RESULTS_CSV: Final = "lab_results.csv"
DEFAULT_BATCH: Final = 200
"""Patients per transaction (about 50 results each): large enough for executemany to pay."""

PATIENT_FIELDS: Final = ("patient_id", "hospital", "age", "gender", "body_temperature",
                         "underlying_diseases")
RESULT_FIELDS: Final = ("patient_id", "panel", "code", "value_raw", "qualifier", "value",
                        "flag", "reference_range")
DICOM_DATE_LENGTH: Final = 8


@dataclass(frozen=True)
class ImportStats:
    """What one import wrote."""

    patients: int
    results: int
    aliases: int
    seconds: float


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = sorted(set(required) - set(reader.fieldnames or ()))
            if missing:
                raise InputError(f"{path}: missing columns {', '.join(missing)}")
            return list(reader)
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from exc


def _none(text: str) -> str | None:
    return text if text.strip() else None


def _number(text: str, path: Path, what: str) -> float | None:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise InputError(f"{path}: {what} {text!r} is not a number") from exc


def _patient_row(row: Mapping[str, str], path: Path) -> dict[str, Any]:
    age = _number(row["age"], path, f"patient {row['patient_id']} age")
    return {
        "patient_id": row["patient_id"],
        "hospital": _none(row["hospital"]),
        "sex": _none(row["gender"]),
        "birth_date": None,
        "age": int(age) if age is not None else None,
        "body_temperature": _number(row["body_temperature"], path,
                                    f"patient {row['patient_id']} body_temperature"),
        "underlying_diseases": _none(row["underlying_diseases"]),
        "source": ICTCF_SOURCE,
    }


def _result_row(row: Mapping[str, str], path: Path) -> dict[str, Any]:
    printed = parse_range(row["reference_range"])
    return {
        "patient_id": row["patient_id"],
        "panel": _none(row["panel"]),
        "code": row["code"],
        "value_raw": row["value_raw"],
        "qualifier": _none(row["qualifier"]),
        "value": _number(row["value"], path, f"patient {row['patient_id']} {row['code']}"),
        "unit": (printed.unit or None) if printed else None,
        "reference_low": printed.low if printed else None,
        "reference_high": printed.high if printed else None,
        "reference_range": _none(row["reference_range"]),
        "flag": _none(row["flag"]),
        "collected_at": None,
        "source": ICTCF_SOURCE,
    }


def _sqlite_parent(url: str) -> None:
    """Create the folder of a SQLite file URL (the default LIS lives in the data dir)."""
    parsed = resolve_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)


def import_ictcf(directory: Path, url: str, *, limit: int | None = None,
                 patient_ids: Collection[str] | None = None,
                 aliases: Mapping[str, str] | None = None, batch_size: int = DEFAULT_BATCH,
                 progress: bool = False) -> ImportStats:
    """Load ``patients.csv`` + ``lab_results.csv`` of an iCTCF folder into the LIS at ``url``
    (creating the reference schema). ``patient_ids`` / ``limit`` pick a subset (in file
    order); ``aliases`` maps other identifiers (a DICOM PatientID) to iCTCF patient ids.
    Raises :class:`InputError` for unusable files or aliases, :class:`LisError` for the
    database."""
    started = time.perf_counter()
    patients_path, results_path = directory / PATIENTS_CSV, directory / RESULTS_CSV
    all_patients = _read_csv(patients_path, PATIENT_FIELDS)
    patients = all_patients
    if patient_ids is not None:
        wanted = set(patient_ids)
        patients = [p for p in patients if p["patient_id"] in wanted]
    if limit is not None:
        patients = patients[:limit]
    chosen = {p["patient_id"] for p in patients}
    by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _read_csv(results_path, RESULT_FIELDS):
        if row["patient_id"] in chosen:
            by_patient[row["patient_id"]].append(_result_row(row, results_path))
    all_ids = {p["patient_id"] for p in all_patients}
    for alias, target in (aliases or {}).items():
        if target not in all_ids:
            raise InputError(f"alias {alias}={target}: no iCTCF patient {target!r}")
    _sqlite_parent(url)
    engine = open_engine(url)
    parsed = resolve_url(url)
    n_results = 0
    try:
        with translate_errors(parsed, "creating the reference schema"):
            LisBase.metadata.create_all(engine)
        with tqdm(total=len(patients), unit="patient", desc="iCTCF -> LIS",
                  disable=not progress) as bar:
            for start in range(0, len(patients), max(1, batch_size)):
                batch = patients[start:start + batch_size]
                ids = [p["patient_id"] for p in batch]
                results = [r for pid in ids for r in by_patient.get(pid, [])]
                with translate_errors(parsed, "iCTCF import"), engine.begin() as conn:
                    conn.execute(delete(LisResult).where(LisResult.patient_id.in_(ids),
                                                         LisResult.source == ICTCF_SOURCE))
                    conn.execute(delete(LisPatient).where(LisPatient.patient_id.in_(ids),
                                                          LisPatient.source == ICTCF_SOURCE))
                    conn.execute(insert(LisPatient),
                                 [_patient_row(p, patients_path) for p in batch])
                    if results:
                        conn.execute(insert(LisResult), results)
                n_results += len(results)
                bar.update(len(batch))
        if aliases:
            with translate_errors(parsed, "writing aliases"), engine.begin() as conn:
                conn.execute(delete(LisPatientAlias).where(
                    LisPatientAlias.alias.in_(list(aliases))))
                conn.execute(insert(LisPatientAlias), [
                    {"alias": a, "patient_id": t, "note": "linked by hust19 lis import-ictcf"}
                    for a, t in aliases.items()])
    finally:
        engine.dispose()
    return ImportStats(len(patients), n_results, len(aliases or {}),
                       time.perf_counter() - started)


def parse_alias(text: str) -> tuple[str, str]:
    """``DICOM_PATIENT_ID=ICTCF_ID`` -> (alias, iCTCF id)."""
    alias, sep, target = text.partition("=")
    if not sep or not alias.strip() or not target.strip():
        raise InputError(f"--alias {text!r}: expected DICOM_PATIENT_ID=ICTCF_ID")
    return alias.strip(), target.strip()


def parse_study_date(text: str) -> date | datetime:
    """A DICOM date (YYYYMMDD) or an ISO 8601 date / date-time."""
    try:
        if len(text) == DICOM_DATE_LENGTH and text.isdigit():
            return datetime.strptime(text, "%Y%m%d").date()
        return datetime.fromisoformat(text) if "T" in text or " " in text \
            else date.fromisoformat(text)
    except ValueError as exc:
        raise InputError(f"--study-date {text!r}: expected YYYYMMDD or ISO 8601") from exc


def _lis_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lis", help="SQLAlchemy URL of the LIS (default: SQLite file "
                        "lis.sqlite in the data dir)")
    parser.add_argument("--data-dir", type=Path, help="the agent's data dir")
    parser.add_argument("--config", type=Path, help="TOML settings file")


def _cmd_import(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    aliases = dict(parse_alias(a) for a in args.alias or [])
    stats = import_ictcf(args.directory, settings.lis_url, limit=args.limit, aliases=aliases,
                         batch_size=args.batch_size, progress=not args.no_progress)
    print(f"imported {stats.patients} patients, {stats.results} results, {stats.aliases} "
          f"aliases into {resolve_url(settings.lis_url).render_as_string(hide_password=True)}"
          f" in {stats.seconds:.1f} s")
    for alias, target in aliases.items():
        print(f"alias: DICOM PatientID {alias!r} -> iCTCF patient {target!r} (a link made for "
              f"the demo, not the same person)")
    return 0


def _client(args: argparse.Namespace) -> LisClient:
    settings = settings_from_args(args)
    mapping = LisMapping.load(args.mapping) if args.mapping else None
    window = args.window_days if args.window_days is not None else settings.lis_window_days
    return LisClient(settings.lis_url, mapping, window_days=window)


def _cmd_show(args: argparse.Namespace) -> int:
    study = parse_study_date(args.study_date) if args.study_date else None
    with _client(args) as client:
        lookup = client.lookup(args.patient_id, study)
    print(json.dumps(lookup.to_dict(), indent=1, ensure_ascii=False))
    return 0


def _cmd_ping(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.ping()
    print(status.describe())
    if status.warning:
        print(f"warning: {status.warning}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    _sqlite_parent(settings.lis_url)
    with LisClient(settings.lis_url) as client:
        client.create_schema()
        status = client.ping()
    print(f"reference schema in place: {status.describe()}")
    if status.warning:
        print(f"warning: {status.warning}")
    return 0


def register(sub: Any) -> None:
    """Add ``hust19 lis``."""
    parser = sub.add_parser("lis", help="the laboratory information system: import, init, "
                            "show, ping")
    inner = parser.add_subparsers(dest="lis_command", metavar="ACTION", required=True)

    p = inner.add_parser("import-ictcf", help="load the iCTCF clinical data into a LIS database")
    p.add_argument("directory", type=Path, help="the iCTCF folder (patients.csv, "
                   "lab_results.csv)")
    _lis_args(p)
    p.add_argument("--alias", action="append", metavar="DICOM_PATIENT_ID=ICTCF_ID",
                   help="link a DICOM PatientID to an iCTCF patient (repeatable)")
    p.add_argument("--limit", type=int, help="only the first N patients")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help="patients per transaction")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_import)

    p = inner.add_parser("init", help="create the reference schema's tables where missing "
                         "(empty; import-ictcf also creates them)")
    _lis_args(p)
    p.set_defaults(func=_cmd_init)

    for name, func, help_text in (
            ("show", _cmd_show, "print a patient's LIS lookup as JSON"),
            ("ping", _cmd_ping, "check that the LIS answers, has its tables and holds "
             "patients")):
        q = inner.add_parser(name, help=help_text)
        if name == "show":
            q.add_argument("patient_id", help="DICOM PatientID / MRN (or an alias)")
            q.add_argument("--study-date", help="YYYYMMDD or ISO 8601; default: no window")
        _lis_args(q)
        q.add_argument("--mapping", type=Path, help="LIS mapping TOML (default: the "
                       "reference schema)")
        q.add_argument("--window-days", type=float, help="days either side of the study date")
        q.set_defaults(func=func)
