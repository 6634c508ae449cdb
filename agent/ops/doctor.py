"""``hust19 doctor``: checks each dependency of the agent and explains the result in plain
words, for the person installing or on call.

Each check returns a :class:`Finding`: ``ok``, ``warn`` (works, but worth knowing) or ``fail``
(something needed is missing: the command exits non-zero). Doctor only looks: it creates no
data folder, bus log or LIS file (``hust19 serve`` does at its first start).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.config import Settings
from agent.durable import existing_ancestor, free_bytes
from agent.ingest.spool import spool_disk_bytes
from engines import MODELS_DIR
from schemas.errors import Hust19Error

if TYPE_CHECKING:
    from agent.bus.embedded import EmbeddedBus

Level = Literal["ok", "warn", "fail"]

REQUIRED_PACKAGES = ("pydicom", "pynetdicom", "highdicom", "pylibjpeg", "kafka-python",
                     "onnxruntime", "opencv-python-headless", "scikit-learn", "sqlalchemy",
                     "numpy", "prometheus-client")
OPTIONAL_PACKAGES = {"crc32c": "fast CRC-32C for Kafka (pure Python without it: ~20x slower)",
                     "psycopg": "PostgreSQL LIS driver", "pymysql": "MariaDB/MySQL LIS driver",
                     "tensorrt": "GPU inference", "pycuda": "GPU inference",
                     "cupy-cuda12x": "GPU lung extraction"}
MIN_FREE_SPOOL_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    check: str
    level: Level
    message: str


def _packages() -> list[Finding]:
    out = []
    missing = []
    for name in REQUIRED_PACKAGES:
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(name)
    if missing:
        out.append(Finding("python packages", "fail", "missing: " + ", ".join(missing)
                           + " (reinstall the agent: pip install hust19-agent)"))
    else:
        out.append(Finding("python packages", "ok", f"{len(REQUIRED_PACKAGES)} required "
                           "packages installed"))
    absent = [f"{n} ({why})" for n, why in OPTIONAL_PACKAGES.items() if not _installed(n)]
    if absent:
        out.append(Finding("optional packages", "warn", "not installed: " + "; ".join(absent)))
    return out


def _installed(name: str) -> bool:
    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def _backend(settings: Settings) -> Finding:
    from engines.backends import tensorrt_usable

    ok, why = tensorrt_usable()
    if ok:
        return Finding("gpu / backend", "ok", "GPU and TensorRT usable: backend "
                       f"{'tensorrt' if settings.backend != 'onnxruntime' else 'onnxruntime'}")
    if settings.backend == "tensorrt":
        return Finding("gpu / backend", "warn", f"TensorRT requested but not usable ({why}); "
                       "the agent will fall back to ONNX Runtime on the CPU")
    return Finding("gpu / backend", "ok" if settings.backend == "onnxruntime" else "warn",
                   f"backend onnxruntime (CPU); TensorRT not usable here: {why}")


def _models() -> Finding:
    from engines.manifest import shipped_files, verify

    problems = verify()
    if problems:
        return Finding("model files", "fail", "; ".join(problems) + " (reinstall the agent)")
    return Finding("model files", "ok", f"{len(shipped_files())} files in {MODELS_DIR} match "
                   "their SHA-256 checksums")


def _bus(settings: Settings) -> list[Finding]:
    """The bus answers; on the embedded bus also what its retention would do (one open). An
    embedded bus not made yet is not opened (that would create it)."""
    from agent.bus.embedded import EmbeddedBus
    from agent.bus.factory import open_bus

    if settings.bus == "embedded" and not (settings.data_dir / "bus").is_dir():
        return [_unmade("bus", settings.data_dir / "bus", "embedded bus log")]
    try:
        bus = open_bus(settings.bus, settings.data_dir, compression=settings.kafka_compression,
                       retention_h=settings.bus_retention_h,
                       kafka_client=settings.kafka_client_settings)
        try:
            bus.ping()
            findings = [Finding("bus", "ok", bus.describe())]
            if isinstance(bus, EmbeddedBus) and settings.bus_retention_h:
                findings += _bus_retention(bus, settings.bus_retention_h)
            return findings
        finally:
            bus.close()
    except Hust19Error as exc:
        return [Finding("bus", "fail", f"{settings.bus}: {exc.message}")]


def _bus_retention(bus: EmbeddedBus, retention_h: float) -> list[Finding]:
    """Instances that no consumer group has committed on are deleted unread once past the
    retention (a group that never committed protects nothing, as on Kafka)."""
    from schemas import topics

    if topics.DICOM_INSTANCES not in bus.topics():
        return []
    end = bus.log(topics.DICOM_INSTANCES).count()
    committed = bus.committed_offsets(topics.DICOM_INSTANCES)
    if end and not committed:
        return [Finding("bus retention", "warn", f"{end} instances on "
                        f"{topics.DICOM_INSTANCES} and no consumer group has committed on it: "
                        f"past the retention ({retention_h:g} h) they are deleted unread; run "
                        f"the worker (hust19 serve or hust19 worker) against this data "
                        f"directory")]
    groups = ", ".join(f"{g} at {off}" for g, off in sorted(committed.items()))
    return [Finding("bus retention", "ok", f"{retention_h:g} h; {topics.DICOM_INSTANCES} ends "
                    f"at offset {end}; groups: {groups or 'none'}")]


def _unmade(check: str, path: Path, what: str) -> Finding:
    """A folder or file the agent makes at its first start: fine if it can be made there."""
    parent = existing_ancestor(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        return Finding(check, "fail", f"no {what} yet at {path}, and {parent} is not writable: "
                       f"the agent cannot create it (choose --data-dir)")
    return Finding(check, "ok", f"no {what} yet at {path}: hust19 serve creates it at its "
                   "first start")


def _lis(settings: Settings) -> Finding:
    """The LIS answers, has the mapping's tables and at least one patient (empty: a warning
    that says how to fill it), and the mapping covers lab features of the CF model."""
    from agent.triage.lis import FILL_COMMAND, open_lis
    from schemas.features import catalogue

    try:
        client = open_lis(settings, prepare=False)
    except Hust19Error as exc:
        return Finding("lis", "fail", f"LIS settings unusable: {exc.message}")
    wanted = {f.code for f in catalogue() if f.kind == "lab"}
    covered = wanted & set(client.mapping.code_map().values())
    coverage = f"the mapping covers {len(covered)} of {len(wanted)} lab features of the CF model"
    path = client.sqlite_path
    try:
        if path is not None and not path.is_file() and client.mapping.is_reference:
            return Finding("lis", "warn", f"no LIS yet at {path}: hust19 serve creates it "
                           "with the reference schema at its first start, empty (every study "
                           "triaged CT-only); fill it with: "
                           f"{FILL_COMMAND.format(url=client.display_url)}")
        status = client.ping()
    except Hust19Error as exc:
        return Finding("lis", "fail", f"{exc.message} (triage runs CT-only until it is)")
    finally:
        client.close()
    if not covered:
        return Finding("lis", "fail", f"{status.describe()}; {coverage}")
    if status.warning:
        return Finding("lis", "warn", f"{status.warning}; {coverage}")
    return Finding("lis", "ok", f"{status.describe()}; {coverage}")


def _pacs(settings: Settings) -> list[Finding]:
    """Each destination accepts our AE title with the SR SOP class (not only C-ECHO)."""
    from agent.triage.pacs import tls_context_for, verify

    if not settings.pacs:
        return [Finding("pacs", "warn", "no --pacs destination: SRs will not be sent anywhere")]
    out = []
    for dest in settings.pacs:
        try:
            out.append(Finding(f"pacs {dest}", "ok", verify(
                dest, settings.ae_title, tls_context=tls_context_for(settings))))
        except Hust19Error as exc:
            out.append(Finding(f"pacs {dest}", "fail", exc.message))
    return out


def _disk(settings: Settings) -> Finding:
    probe = existing_ancestor(settings.data_dir)
    free = free_bytes(probe)
    used = spool_disk_bytes(settings.data_dir)
    level: Level = "ok" if free >= MIN_FREE_SPOOL_BYTES else "fail"
    return Finding("spool disk", level, f"{free / 1024**3:.1f} GiB free at {probe} (need "
                   f">= {MIN_FREE_SPOOL_BYTES / 1024**3:.0f} GiB for the spool); the spool "
                   f"uses {used / 1024**2:.1f} MiB")


def run_checks(settings: Settings) -> list[Finding]:
    """Every check, in the order a person would fix them."""
    findings = _packages()
    steps: list[Callable[[], Finding | list[Finding]]] = [
        lambda: _backend(settings), _models, lambda: _bus(settings), lambda: _lis(settings),
        lambda: _pacs(settings), lambda: _disk(settings)]
    for step in steps:
        try:
            result = step()
        except (ImportError, Hust19Error) as exc:
            result = Finding(getattr(step, "__name__", "check"), "fail", str(exc))
        findings.extend(result if isinstance(result, list) else [result])
    return findings

