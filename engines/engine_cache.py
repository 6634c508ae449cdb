"""On-disk cache of serialized TensorRT engines, keyed by everything that makes one valid.

A TensorRT engine is compiled for one GPU architecture by one TensorRT version from one ONNX
file with one set of build options; run anywhere else it fails or, worse, misbehaves. So an
engine is only reused when its :class:`EngineKey` (TensorRT version, GPU name and compute
capability, ONNX SHA-256, precision, optimisation-profile shapes, workspace limit, other
builder options) is the one wanted now, and when the bytes on disk are the bytes that were
written. Anything else is stale or corrupt: it is removed with a warning and the caller
rebuilds. An engine file is executable code for the GPU, so only engines this cache wrote
(with a matching sidecar) are ever handed out.

Layout, per engine: ``<model>.<precision>.<digest16>.engine`` (the plan) and the same name
with ``.json`` (the sidecar: the key parts, plan size and SHA-256, build time, when built).
Both are written through a temporary file, ``fsync`` and ``rename``, the plan first, so a
crash leaves either the old pair, or a plan without sidecar (treated as corrupt), never a
torn file that is trusted. A ``.lock`` file (``flock``) stops two workers starting at once
from building the same engine twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from schemas.errors import EngineError

log = logging.getLogger(__name__)

#: Bumped when the key's meaning or the sidecar format changes: old entries become stale.
CACHE_FORMAT: Final = 1
ENGINE_SUFFIX: Final = ".engine"
SIDECAR_SUFFIX: Final = ".json"
LOCK_SUFFIX: Final = ".lock"
_DIGEST_CHARS_IN_NAME: Final = 16


@dataclass(frozen=True)
class ProfileShape:
    """One input's optimisation-profile shapes (min <= opt <= max, element-wise)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_list(self) -> list[Any]:
        return [self.name, list(self.min), list(self.opt), list(self.max)]


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built from and for. Two engines are interchangeable only if their
    keys are equal; :meth:`digest` is the SHA-256 of the canonical JSON of :meth:`parts`."""

    model_name: str
    onnx_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: tuple[ProfileShape, ...]
    workspace_bytes: int
    builder_options: tuple[tuple[str, str], ...] = ()

    def parts(self) -> dict[str, Any]:
        """JSON-ready key parts, in the form stored in the sidecar."""
        return {
            "format": CACHE_FORMAT,
            "model_name": self.model_name,
            "onnx_sha256": self.onnx_sha256,
            "trt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "profiles": [p.as_list() for p in self.profiles],
            "workspace_bytes": self.workspace_bytes,
            "builder_options": sorted([k, v] for k, v in self.builder_options),
        }

    def digest(self) -> str:
        """Hex SHA-256 of the canonical key: stable across runs, changes with any part."""
        canonical = json.dumps(self.parts(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def file_stem(self) -> str:
        return f"{self.model_name}.{self.precision}.{self.digest()[:_DIGEST_CHARS_IN_NAME]}"


@dataclass(frozen=True)
class CacheEntry:
    """One engine in the cache, as ``hust19 engines list`` shows it."""

    engine_path: Path
    key: dict[str, Any]
    plan_size: int
    build_seconds: float | None
    built_at: str | None
    problem: str | None = None  # None = intact (size and hash match the sidecar)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one:
    temporary file in the same directory, ``fsync``, ``rename``, ``fsync`` of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EngineError(f"cannot write {path}: {exc}") from exc


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EngineCache:
    """Engines under one directory (``Settings.engine_cache_dir``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem()}{ENGINE_SUFFIX}"

    def sidecar_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem()}{SIDECAR_SUFFIX}"

    def load(self, key: EngineKey) -> bytes | None:
        """The cached plan for ``key``, or ``None`` when there is none or it cannot be trusted
        (no or unreadable sidecar, key mismatch, size or SHA-256 mismatch). Untrusted entries
        are removed with a warning so that the caller's rebuild replaces them."""
        engine = self.engine_path(key)
        if not engine.exists():
            log.debug("no cached engine for %s (%s)", key.model_name, engine.name)
            return None
        try:
            side = json.loads(self.sidecar_path(key).read_text())
        except (OSError, ValueError) as exc:
            self.invalidate(key, f"sidecar missing or unreadable ({exc})")
            return None
        if not isinstance(side, dict) or side.get("key") != key.parts():
            self.invalidate(key, "stale: sidecar key differs from the wanted key")
            return None
        try:
            plan = engine.read_bytes()
        except OSError as exc:
            self.invalidate(key, f"unreadable ({exc})")
            return None
        if len(plan) != side.get("plan_size") or _sha256(plan) != side.get("plan_sha256"):
            self.invalidate(key, f"corrupt: {len(plan)} bytes / hash do not match the sidecar")
            return None
        return plan

    def store(self, key: EngineKey, plan: bytes, build_seconds: float) -> CacheEntry:
        """Write ``plan`` and its sidecar atomically; remove older engines of the same model,
        precision and GPU (superseded by this one). Raises :class:`EngineError` on I/O failure."""
        built_at = datetime.now(UTC).isoformat()
        side = {"key": key.parts(), "digest": key.digest(), "plan_size": len(plan),
                "plan_sha256": _sha256(plan), "build_seconds": round(build_seconds, 3),
                "built_at": built_at}
        atomic_write_bytes(self.engine_path(key), plan)
        atomic_write_bytes(self.sidecar_path(key),
                           json.dumps(side, indent=2, sort_keys=True).encode())
        self._remove_superseded(key)
        return CacheEntry(self.engine_path(key), key.parts(), len(plan), build_seconds, built_at)

    def invalidate(self, key: EngineKey, why: str) -> None:
        """Remove ``key``'s engine and sidecar, saying why (stale, corrupt, failed to load)."""
        log.warning("engine cache: discarding %s for %s: %s", self.engine_path(key).name,
                    key.model_name, why)
        for path in (self.engine_path(key), self.sidecar_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @contextlib.contextmanager
    def build_lock(self, key: EngineKey) -> Iterator[None]:
        """Exclusive (``flock``) while one process builds ``key``; others wait, then find the
        engine in the cache."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / f"{key.file_stem()}{LOCK_SUFFIX}"
        with lock_path.open("a") as fh:
            started = time.monotonic()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            waited = time.monotonic() - started
            if waited > 1.0:
                log.info("waited %.1f s for another process building %s", waited,
                         key.model_name)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def entries(self) -> list[CacheEntry]:
        """Every engine with a sidecar here, each checked (size and hash); sorted by name."""
        out: list[CacheEntry] = []
        if not self.root.is_dir():
            return out
        for side_path in sorted(self.root.glob(f"*{SIDECAR_SUFFIX}")):
            engine = side_path.with_suffix(ENGINE_SUFFIX)
            try:
                side = json.loads(side_path.read_text())
            except (OSError, ValueError) as exc:
                out.append(CacheEntry(engine, {}, 0, None, None, f"sidecar unreadable: {exc}"))
                continue
            problem = None
            try:
                plan = engine.read_bytes()
            except OSError:
                plan = b""
                problem = "engine file missing"
            if problem is None and (len(plan) != side.get("plan_size")
                                    or _sha256(plan) != side.get("plan_sha256")):
                problem = "corrupt: size or hash differs from the sidecar"
            out.append(CacheEntry(engine, side.get("key") or {}, len(plan),
                                  side.get("build_seconds"), side.get("built_at"), problem))
        return out

    def _remove_superseded(self, key: EngineKey) -> None:
        """Drop other engines for the same model, precision and GPU: they were built from an
        older ONNX file, TensorRT or options and would never be loaded again."""
        mine = key.parts()
        same = ("model_name", "precision", "gpu_name", "compute_capability")
        for entry in self.entries():
            if entry.engine_path == self.engine_path(key):
                continue
            if all(entry.key.get(f) == mine[f] for f in same):
                log.info("engine cache: removing superseded %s", entry.engine_path.name)
                for path in (entry.engine_path, entry.engine_path.with_suffix(SIDECAR_SUFFIX),
                             entry.engine_path.with_suffix(LOCK_SUFFIX)):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
