"""The durable spool of received instances, its SQLite index, and the quarantine.

Layout under ``data_dir``::

    spool/<xx>/<random>.dcm                 one Part-10 file per instance (sealed, see below)
    spool.sqlite                            the index (WAL)
    quarantine/<time>-<random>.dcm + .json  rejected input and the reason

**Sealed mode** (the default, wherever the file system keeps ``user.*`` extended attributes):
the spool file itself is the durable record of an accepted instance, and it costs one flush.

1. Spool files are taken from a pool of files created ahead of time by a background thread,
   ``POOL_BATCH`` at a time in one directory, whose directory is then ``fsync``'d once: the
   name of every pool file is already on disk before any instance is written into it. Up to
   ``pool_files`` of them are *pre-written*: ``pool_file_bytes`` of zeros, ``fdatasync``'d, so
   their blocks are allocated and written (what PostgreSQL does with its WAL segments). The
   thread pre-writes only while no instance arrives (``RECEIVING_GAP_S``); during a stream it
   adds cheap empty files, and only when the pool runs low.
2. :meth:`Spool.store` writes the Part-10 bytes into a pool file and attaches the *seal* (JSON
   with the size, the CRC-32C of the bytes and the index fields of the instance), then flushes:

   - *in the data* (``padding`` given, the usual case): the file is closed with a Data Set
     Trailing Padding element (FFFC,FFFC), so it stays a valid Part-10 file, and the seal is
     the last ``SEAL_BLOCK`` bytes of that padding. In a pre-written file of the right size
     nothing but data changes, so ``fdatasync`` needs no journal commit (measured here: 0.3-0.4
     ms instead of 0.7-1.7 ms for a 530 KB CT instance). Otherwise the file is sized to fit
     and ``fdatasync`` also commits the new size.
   - *as an extended attribute* ``user.hust19.seal`` (a dataset that must not be extended:
     deflated, big endian, odd length, or already padded): ``fsync`` commits data, size and
     seal in one journal commit.
3. Then the index row is committed (WAL, ``synchronous=NORMAL``: no fsync of its own), in the
   same transaction as the series' running totals. :meth:`Spool.store` does both; the listener
   answers Success between them (:meth:`Spool.write`, then :meth:`Spool.index`), since the
   sealed file is already the record; an index row that fails after the answer keeps the file
   and is retried (:meth:`Spool.index_unindexed`).
   The index keeps the instance's own size: :meth:`Spool.read` returns exactly the bytes
   received, never the padding.

A crash (or power loss) can lose the last index commits, never a sealed file: at the next start
:meth:`Spool.recover` indexes every spool file without an index row whose seal matches its
bytes (the outbox then publishes it), and deletes files without a valid seal (written but never
sealed: a store that was interrupted, so no Success was sent) and unused pool files. A seal
matches only if the CRC-32C of the instance (and, for a seal in the data, of the padding
element's header, which holds the file's length) is right: a torn write never matches.
Lost ``published``/``completed`` marks only mean a re-publication (at-least-once).

**Compatibility mode** (no extended attributes, e.g. an old tmpfs): files are created with
``O_EXCL`` under a new name, written, ``fsync``'d, their directory ``fsync``'d, and the index
commit is the durable point (``synchronous=FULL``); a file without an index row is an
interrupted store and is deleted at the next start. Three fsyncs per instance instead of one.

A duplicate SOP Instance UID is stored once: the index has a UNIQUE key on it, and the loser of
a race between two associations deletes its own file.

The index is also the outbox's queue (``published_at IS NULL``) and the source of the series
completion state (table ``series``), so both survive restarts.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

import crc32c

from agent.durable import disk_bytes, free_bytes, fsync_dir, write_all
from schemas.errors import Hust19Error

logger = logging.getLogger(__name__)

SPOOL_DIR: Final = "spool"
QUARANTINE_DIR: Final = "quarantine"
INDEX_FILE: Final = "spool.sqlite"
FANOUT: Final = 256
"""Spool files are spread over this many sub-directories (first byte of the name hash)."""
NAME_HASH_CHARS: Final = 40
"""Compatibility mode names a file after this many hex digits of its SOP Instance UID hash."""
POOL_NAME_BYTES: Final = 10
"""Random bytes in the name of a pool file (hex-encoded)."""
SUFFIX: Final = ".dcm"
POOL_BATCH: Final = 32
"""Spool files created (and made durable by one directory fsync) per pool refill."""
POOL_LOW_WATER: Final = POOL_BATCH // 2
"""When fewer pool files than this are left, empty ones are added in the background even while
instances arrive, so that file creations and a directory fsync (about 14 ms here) delay no
C-STORE."""
POOL_FILE_BYTES: Final = 576 * 1024
"""Default size of a pre-written pool file: a 512x512 16-bit CT instance (512 KiB of pixels
plus its header) with its padding and seal."""
POOL_MAX_FREE_SHARE: Final = 0.10
"""The pre-written pool takes at most this share of the data disk's free space (the pool's own
files counted as free): on a small disk it is smaller than ``pool_files`` (issue 20: 256 x
576 KiB took 91 % of a small data disk at start)."""
POOL_RETRY_S: Final = 5.0
"""After a failed refill (disk full), the filler tries again this much later."""
RECEIVING_GAP_S: Final = 0.25
"""Instances stored less than this apart count as one stream still arriving: background disk
work (pre-writing pool files, the outbox's bus appends) waits for the stream to pause."""
SEAL_XATTR: Final = "user.hust19.seal"
"""Extended attribute that seals a complete spool file (see the module docstring)."""
PART10_MAGIC_END: Final = 132
"""A Part-10 file has "DICM" at bytes 128-131: an unused pool file has only zeros up to here."""
SEAL_BLOCK: Final = 4096
"""A seal in the data: the last bytes of the file (JSON, zeros, :data:`_SEAL_TRAILER`)."""
SEAL_MAGIC: Final = b"HUST19SL"
_SEAL_TRAILER: Final = struct.Struct("<8sII")
"""Magic, length of the seal's JSON, CRC-32C of that JSON."""
TRAILING_PADDING: Final = 0xFFFC
"""Group and element of Data Set Trailing Padding (FFFC,FFFC), PS3.6 Table 6-1."""
_PADDING_EXPLICIT: Final = struct.Struct("<HH2s2xI")
_PADDING_IMPLICIT: Final = struct.Struct("<HHI")
_PADDING_LENGTH: Final = struct.Struct("<I")
"""The value length that ends both padding headers."""
SEAL_VERSION: Final = 1
MAX_SEAL_BYTES: Final = 4000
"""A seal must fit one file-system block of extended attributes (4 KiB on ext4)."""
_XATTR_UNSUPPORTED: Final = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM})

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS instances (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid    TEXT NOT NULL UNIQUE,
    sop_class_uid       TEXT NOT NULL,
    study_uid           TEXT NOT NULL,
    series_uid          TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae          TEXT NOT NULL,
    received_at         REAL NOT NULL,
    path                TEXT NOT NULL,
    size                INTEGER NOT NULL,
    published_at        REAL,
    publish_error       TEXT,
    pruned_at           REAL
);
CREATE INDEX IF NOT EXISTS instances_pending ON instances (id)
    WHERE published_at IS NULL AND publish_error IS NULL;
CREATE INDEX IF NOT EXISTS instances_pending_series ON instances (series_uid)
    WHERE published_at IS NULL AND publish_error IS NULL;
CREATE TABLE IF NOT EXISTS series (
    series_uid        TEXT PRIMARY KEY,
    study_uid         TEXT NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at  REAL NOT NULL,
    instance_count    INTEGER NOT NULL,
    completed_count   INTEGER NOT NULL DEFAULT 0,
    generation        INTEGER NOT NULL DEFAULT 0,
    completed_at      REAL,
    patient_id        TEXT,
    accession_number  TEXT,
    modality          TEXT
);
CREATE INDEX IF NOT EXISTS series_open ON series (series_uid)
    WHERE instance_count > completed_count;
"""
_PRUNE_INDEX: Final = """
CREATE INDEX IF NOT EXISTS instances_prunable ON instances (published_at)
    WHERE pruned_at IS NULL AND published_at IS NOT NULL;
"""
PRUNE_BATCH: Final = 256
"""At most this many files are deleted per :meth:`Spool.prune` call (the outbox calls it
between its publishing passes, so deleting never holds publishing back for long)."""


def spool_disk_bytes(data_dir: Path) -> int:
    """Bytes the spool under ``data_dir`` takes on disk: received instances, the pre-written
    pool (``pool_files`` x ``pool_file_bytes`` when stocked) and the quarantine. Reads only
    the folders, so any process on the box can report it (metrics, ``hust19 doctor``)."""
    return disk_bytes(data_dir / SPOOL_DIR, data_dir / QUARANTINE_DIR)


class SpoolError(Hust19Error):
    """The spool could not store or read an instance (disk full, permissions, corrupt index)."""


class _Recovered(enum.Enum):
    """What :meth:`Spool.recover` did with a spool file that had no index row."""

    INDEXED = "indexed"
    DUPLICATE = "duplicate"
    REMOVED = "removed"
    POOL = "pool"
    QUARANTINED = "quarantined"
    GONE = "gone"


class Padding(enum.Enum):
    """How the Data Set Trailing Padding element that carries a seal in the data is encoded:
    as the dataset's transfer syntax encodes its elements (Little Endian, both)."""

    EXPLICIT_VR = "explicit"
    IMPLICIT_VR = "implicit"

    @property
    def header_size(self) -> int:
        return (_PADDING_EXPLICIT if self is Padding.EXPLICIT_VR else _PADDING_IMPLICIT).size

    def header(self, length: int) -> bytes:
        """The element's tag, VR (explicit) and value length ``length`` (even)."""
        if self is Padding.EXPLICIT_VR:
            return _PADDING_EXPLICIT.pack(TRAILING_PADDING, TRAILING_PADDING, b"OB", length)
        return _PADDING_IMPLICIT.pack(TRAILING_PADDING, TRAILING_PADDING, length)


class StoreOutcome(enum.Enum):
    """What :meth:`Spool.store` did."""

    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class InstanceInfo:
    """What the index keeps about one received instance (taken from the dataset)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    received_at: float
    patient_id: str | None = None
    accession_number: str | None = None
    modality: str | None = None


@dataclass(frozen=True, slots=True)
class Written:
    """An instance flushed to the spool by :meth:`Spool.write`, not indexed yet."""

    info: InstanceInfo
    path: Path
    size: int


@dataclass(frozen=True)
class SpooledInstance:
    """An index row: an instance on disk, maybe not yet published."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    received_at: float
    path: Path
    size: int


@dataclass(frozen=True)
class SeriesState:
    """Running totals of one series, as committed with its instances."""

    series_uid: str
    study_uid: str
    first_received_at: float
    last_received_at: float
    instance_count: int
    completed_count: int
    generation: int
    unpublished: int
    patient_id: str | None
    accession_number: str | None
    modality: str | None

    @property
    def is_open(self) -> bool:
        """Instances arrived since the last completion event (or none was sent yet)."""
        return self.instance_count > self.completed_count



@contextlib.contextmanager
def _closed_or_removed(fd: int, path: Path) -> Iterator[int]:
    """Close ``fd`` (open on ``path``) on exit; if the body fails, also remove ``path``: a
    spool file we write is whole or absent."""
    try:
        yield fd
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _write_durable(path: Path, parts: Sequence[bytes | memoryview]) -> int:
    """Create ``path`` (must not exist), write ``parts``, fsync the file and its directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with _closed_or_removed(fd, path):
        total = write_all(fd, parts)
        os.fsync(fd)
    fsync_dir(path.parent)
    return total


def _seal_bytes(info: InstanceInfo, size: int, crc: int, end: int | None = None) -> bytes:
    """The seal of a complete spool file: what :meth:`Spool.recover` needs to check the bytes
    and to index the instance without parsing DICOM. ``end`` (a seal in the data): where the
    bytes covered by ``crc`` end (the instance and its padding element's header)."""
    record: dict[str, Any] = {"v": SEAL_VERSION, "size": size, "crc32c": crc}
    if end is not None:
        record["end"] = end
    fields_ = dict(vars(info))  # flat strings and a float: asdict's deep copy is not needed
    record["info"] = fields_
    data = json.dumps(record, separators=(",", ":")).encode()
    if len(data) > MAX_SEAL_BYTES:  # only the optional hints can be long: drop them
        record["info"] = {**fields_, "patient_id": None, "accession_number": None,
                          "modality": None}
        data = json.dumps(record, separators=(",", ":")).encode()
    return data


def _seal_block(seal: bytes) -> bytes:
    """``seal`` as the last :data:`SEAL_BLOCK` bytes of a file."""
    trailer = _SEAL_TRAILER.pack(SEAL_MAGIC, len(seal), crc32c.crc32c(seal))
    return seal + bytes(SEAL_BLOCK - len(seal) - len(trailer)) + trailer


def _crc(parts: Sequence[bytes | memoryview]) -> int:
    crc = 0
    for part in parts:
        crc = crc32c.crc32c(part, crc)
    return crc


def fits_pool_file(end: int, capacity: int) -> bool:
    """Whether an instance whose padding element's header ends at byte ``end`` goes into a
    pre-written file of ``capacity`` bytes as it is (room for the seal, at most half wasted)."""
    return capacity // 2 <= end + SEAL_BLOCK <= capacity


def is_unused_pool_file(path: Path) -> bool:
    """Whether a spool file holds no instance: empty, or only zeros where a Part-10 file has
    its preamble and "DICM" (a pre-written pool file)."""
    with path.open("rb") as f:
        return not any(f.read(PART10_MAGIC_END))


def _open_pool_file(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:  # a pool file that cannot be opened is of no use: drop it
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _write_sealed(path: Path, parts: Sequence[bytes | memoryview], info: InstanceInfo) -> None:
    """Write ``parts`` into the pool file ``path``, seal it with an extended attribute and
    fsync it (one fsync: the directory entry is already durable). On failure the file is
    removed."""
    fd = _open_pool_file(path)
    with _closed_or_removed(fd, path):
        if os.fstat(fd).st_size != 0:
            os.ftruncate(fd, 0)
        total = write_all(fd, parts)
        os.setxattr(fd, SEAL_XATTR, _seal_bytes(info, total, _crc(parts)))
        os.fsync(fd)


def _write_padded(path: Path, parts: Sequence[bytes | memoryview], size: int,
                  info: InstanceInfo, padding: Padding, capacity: int) -> None:
    """Write ``parts`` (``size`` bytes) into the pool file ``path`` (pre-written to
    ``capacity`` bytes, or empty if 0), close the dataset with a trailing padding element
    whose last bytes are the seal, and ``fdatasync``. On failure the file is removed."""
    end = size + padding.header_size
    length = capacity if fits_pool_file(end, capacity) else end + SEAL_BLOCK
    header = padding.header(length - end)
    fd = _open_pool_file(path)
    with _closed_or_removed(fd, path):
        if os.fstat(fd).st_size != length:
            os.ftruncate(fd, length)
        write_all(fd, [*parts, header])
        # the checksum after the write, while the bytes are still in the CPU cache: ~3x
        # faster than before it for a 512 KiB instance
        block = _seal_block(_seal_bytes(info, size, _crc([*parts, header]), end))
        if os.pwrite(fd, block, length - SEAL_BLOCK) != SEAL_BLOCK:
            raise OSError(errno.EIO, "short write of the seal", str(path))
        os.fdatasync(fd)


class SealError(Exception):
    """A spool file carries a seal that cannot be read (another version, damaged)."""


@dataclass(frozen=True)
class _Seal:
    size: int
    crc: int
    info: InstanceInfo
    end: int | None
    """Set for a seal in the data: where the bytes covered by ``crc`` end."""


def _data_seal(path: str) -> bytes | None:
    """The JSON of a seal in the file's last bytes, ``None`` if there is none."""
    try:
        with open(path, "rb") as f:
            length = os.fstat(f.fileno()).st_size
            if length < SEAL_BLOCK:
                return None
            f.seek(length - _SEAL_TRAILER.size)
            magic, size, crc = _SEAL_TRAILER.unpack(f.read(_SEAL_TRAILER.size))
            if magic != SEAL_MAGIC or size > SEAL_BLOCK - _SEAL_TRAILER.size:
                return None
            f.seek(length - SEAL_BLOCK)
            raw = f.read(size)
    except OSError:
        return None
    if crc32c.crc32c(raw) != crc:
        raise SealError("the seal at the end of the file fails its CRC-32C")
    return raw


def _read_seal(path: str) -> _Seal | None:
    """The seal of a spool file (extended attribute, else in the data), ``None`` if it has
    none; raises :class:`SealError` if it has one that cannot be read."""
    try:
        raw: bytes | None = os.getxattr(path, SEAL_XATTR)
    except OSError:
        raw = _data_seal(path)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        if record.get("v") != SEAL_VERSION:
            raise SealError(f"seal version {record.get('v')!r}, expected {SEAL_VERSION}")
        known = {f.name for f in fields(InstanceInfo)}
        info = InstanceInfo(**{k: v for k, v in record["info"].items() if k in known})
        end = record.get("end")
        return _Seal(int(record["size"]), int(record["crc32c"]), info,
                     None if end is None else int(end))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SealError(f"unreadable seal: {type(exc).__name__}: {exc}") from exc


def _matches_seal(path: Path, seal: _Seal) -> bool:
    """Whether the file holds the bytes it was sealed with (a torn or truncated write does
    not): exactly ``size`` bytes with that CRC-32C (extended attribute), or (in the data) that
    CRC-32C over the instance and a padding header whose length reaches the file's end."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if seal.end is None:
        return len(data) == seal.size and crc32c.crc32c(data) == seal.crc
    return (seal.size < seal.end <= len(data) - SEAL_BLOCK
            and _PADDING_LENGTH.unpack_from(data, seal.end - _PADDING_LENGTH.size)[0]
            == len(data) - seal.end
            and crc32c.crc32c(memoryview(data)[:seal.end]) == seal.crc)


def xattrs_supported(directory: Path) -> bool:
    """Whether files in ``directory`` keep ``user.*`` extended attributes (sealed mode)."""
    probe = directory / f".xattr-probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        os.setxattr(fd, SEAL_XATTR, b"{}")
        return bool(os.getxattr(fd, SEAL_XATTR) == b"{}")
    except OSError as exc:
        if exc.errno not in _XATTR_UNSUPPORTED:
            logger.warning("spool: extended attributes probe in %s failed: %s", directory, exc)
        return False
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


class Spool:
    """Durable store + index of received instances, and the quarantine for rejected ones.

    Thread-safe: the SCP's association threads call :meth:`store` and :meth:`quarantine`; the
    outbox thread reads and marks. File I/O runs outside the index lock. ``sealed=None``
    probes the file system (sealed mode where extended attributes work); tests force a mode.
    ``pool_files`` pre-written files of ``pool_file_bytes`` each are kept ready (sealed mode;
    0: empty pool files only); the agent sets them from its settings.
    """

    def __init__(self, data_dir: Path, *, sealed: bool | None = None, pool_files: int = 0,
                 pool_file_bytes: int = POOL_FILE_BYTES) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / SPOOL_DIR
        self.quarantine_dir = self.data_dir / QUARANTINE_DIR
        self.index_path = self.data_dir / INDEX_FILE
        try:
            for d in (self.data_dir, self.root, self.quarantine_dir):
                d.mkdir(parents=True, exist_ok=True)
            for i in range(FANOUT):
                (self.root / f"{i:02x}").mkdir(exist_ok=True)
            fsync_dir(self.root)
            fsync_dir(self.data_dir)
            self.sealed = xattrs_supported(self.root) if sealed is None else sealed
            self._db = sqlite3.connect(self.index_path, isolation_level=None,
                                       check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            # sealed: the spool files are the durable record, the index is rebuilt from them
            self._db.execute(f"PRAGMA synchronous={'NORMAL' if self.sealed else 'FULL'}")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(instances)")}
            if "pruned_at" not in columns:  # an index written before pruning existed
                self._db.execute("ALTER TABLE instances ADD COLUMN pruned_at REAL")
            self._db.executescript(_PRUNE_INDEX)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open the spool in {self.data_dir}: {exc}") from exc
        if not self.sealed:
            logger.warning("spool: %s keeps no extended attributes; compatibility mode (file, "
                           "directory and index fsync'd for every instance: slower)", self.root)
        self.pool_files = pool_files if self.sealed else 0
        self.pool_file_bytes = pool_file_bytes
        self._lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._pool_wake = threading.Condition(self._pool_lock)
        self._ready: list[Path] = []
        """Pre-written pool files (``pool_file_bytes`` of zeros, fdatasync'd)."""
        self._empty: list[Path] = []
        self._unindexed: list[Written] = []
        """Answered instances whose index row failed (:meth:`index`), to be indexed again."""
        self._last_store = 0.0
        self._refill_lock = threading.Lock()
        self._closed = False
        self._pool_bound_logged = False
        self._pool_dir = secrets.randbelow(FANOUT)
        self._filler: threading.Thread | None = None
        if self.sealed:
            self._filler = threading.Thread(target=self._fill_pool, name="hust19-spool-pool",
                                            daemon=True)
            self._filler.start()

    # -- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def contains(self, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID is already stored."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                                   (sop_instance_uid,)).fetchone()
        return row is not None

    def _new_path(self, sop_instance_uid: str) -> Path:
        digest = hashlib.sha256(sop_instance_uid.encode("utf-8")).hexdigest()
        return (self.root / digest[:2] /
                f"{digest[:NAME_HASH_CHARS]}.{secrets.token_hex(4)}{SUFFIX}")

    def _take_pool_file(self, end: int | None) -> tuple[Path, int]:
        """A pool file whose directory entry is already durable, and its pre-written size (0:
        empty). A pre-written file is preferred where the instance, its padding header ending
        at ``end``, fits it (:func:`fits_pool_file`); an empty one otherwise."""
        while True:
            with self._pool_lock:
                self._last_store = time.monotonic()
                self._pool_wake.notify()
                if end is not None and self._ready and fits_pool_file(end,
                                                                       self.pool_file_bytes):
                    return self._ready.pop(), self.pool_file_bytes
                if self._empty:
                    return self._empty.pop(), 0
                if self._ready:
                    return self._ready.pop(), self.pool_file_bytes
            if not self._add_pool_batch(prewrite=False):  # the filler fell behind
                raise OSError(errno.ESHUTDOWN, "the spool is closed", str(self.root))

    def _receiving(self) -> bool:
        return time.monotonic() - self._last_store < RECEIVING_GAP_S

    def _pool_task(self) -> bool | None:
        """What the filler does next (with the pool lock held): ``True`` pre-write a batch,
        ``False`` add empty files, ``None`` wait."""
        if len(self._ready) + len(self._empty) < POOL_LOW_WATER:
            return False
        if len(self._ready) < self._pool_target() and not self._receiving():
            return True
        return None

    def _pool_target(self) -> int:
        """How many pre-written files to keep: ``pool_files``, bounded by
        :data:`POOL_MAX_FREE_SHARE` of the free space (with the pool lock held)."""
        try:
            free = free_bytes(self.root)
        except OSError:
            return 0
        budget = POOL_MAX_FREE_SHARE * (free + len(self._ready) * self.pool_file_bytes)
        target = min(self.pool_files, int(budget // self.pool_file_bytes))
        if target < self.pool_files and not self._pool_bound_logged:
            self._pool_bound_logged = True
            logger.info("spool: %d pre-written pool files of %d KiB at most, not %d: the pool "
                        "takes no more than %.0f %% of the %.0f MiB free in %s", target,
                        self.pool_file_bytes // 1024, self.pool_files,
                        POOL_MAX_FREE_SHARE * 100, free / (1 << 20), self.root)
        return target

    def _fill_pool(self) -> None:
        """The filler thread: keeps the pool stocked until the spool closes."""
        while True:
            with self._pool_lock:
                task = self._pool_task()
                while task is None and not self._closed:
                    # stocked: sleep until a store takes a file (it notifies) or a stream pauses
                    self._pool_wake.wait(RECEIVING_GAP_S if self._receiving() else None)
                    task = self._pool_task()
                if self._closed or task is None:
                    return
            try:
                self._add_pool_batch(prewrite=task)
            except OSError as exc:
                logger.warning("spool: cannot create spool files ahead of time in %s (%s); "
                               "trying again in %.0f s", self.root, exc, POOL_RETRY_S)
                with self._pool_lock:
                    if not self._closed:
                        self._pool_wake.wait(POOL_RETRY_S)

    def _add_pool_batch(self, *, prewrite: bool) -> bool:
        """Create up to ``POOL_BATCH`` pool files in the next fan-out directory (pre-written to
        ``pool_file_bytes`` and fdatasync'd, or empty) and fsync that directory once; a
        pre-written batch ends early when an instance arrives. ``False`` when the spool is
        closed."""
        with self._refill_lock:
            with self._pool_lock:
                if self._closed:
                    return False
                count = (min(POOL_BATCH, self._pool_target() - len(self._ready)) if prewrite
                         else POOL_BATCH)
            if count <= 0:
                return True
            self._pool_dir = (self._pool_dir + 1) % FANOUT
            sub = self.root / f"{self._pool_dir:02x}"
            zeros = memoryview(bytes(self.pool_file_bytes if prewrite else 0))
            created: list[Path] = []
            try:
                for _ in range(count):
                    if prewrite and created and self._receiving():
                        break  # an instance arrived: its flush must not queue behind ours
                    path = sub / f"{secrets.token_hex(POOL_NAME_BYTES)}{SUFFIX}"
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o644)
                    created.append(path)
                    with _closed_or_removed(fd, path):
                        if prewrite:
                            write_all(fd, [zeros])
                            os.fdatasync(fd)
                fsync_dir(sub)
            except BaseException:
                for path in created:
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
            with self._pool_lock:
                (self._ready if prewrite else self._empty).extend(created)
            return True

    @staticmethod
    def _index_locked(db: sqlite3.Connection, info: InstanceInfo, rel: str, size: int) -> bool:
        """Insert the index row and update the series totals (inside a transaction);
        ``False`` when the SOP Instance UID is already indexed."""
        cur = db.execute(
            "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, "
            "study_uid, series_uid, transfer_syntax_uid, calling_ae, received_at, path,"
            " size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (info.sop_instance_uid, info.sop_class_uid, info.study_uid,
             info.series_uid, info.transfer_syntax_uid, info.calling_ae,
             info.received_at, rel, size))
        if cur.rowcount != 1:
            return False
        db.execute(
            "INSERT INTO series (series_uid, study_uid, first_received_at, "
            "last_received_at, instance_count, patient_id, accession_number, "
            "modality) VALUES (?, ?, ?, ?, 1, ?, ?, ?) "
            "ON CONFLICT (series_uid) DO UPDATE SET "
            "instance_count = instance_count + 1, "
            "first_received_at = min(first_received_at, excluded.first_received_at),"
            " last_received_at = max(last_received_at, excluded.last_received_at)",
            (info.series_uid, info.study_uid, info.received_at, info.received_at,
             info.patient_id, info.accession_number, info.modality))
        return True

    @property
    def durable_before_index(self) -> bool:
        """Whether an instance is durable once :meth:`write` returns (sealed mode: the sealed
        file is the record, :meth:`recover` indexes it after a crash), so that Success may be
        answered before :meth:`index`. In compatibility mode the index commit is the durable
        point: :meth:`store`."""
        return self.sealed

    def store(self, info: InstanceInfo, part10: Sequence[bytes | memoryview], *,
              padding: Padding | None = None) -> StoreOutcome:
        """Write the Part-10 file (``part10`` buffers, concatenated) durably and index it.

        Returns once the instance is durable (sealed file flushed, or in compatibility mode
        file, directory and index fsync'd); the caller may then answer Success. ``padding``:
        how a Data Set Trailing Padding element would be encoded after this dataset, ``None``
        if it must not be extended (the seal then goes into an extended attribute). A SOP
        Instance UID already stored is not written again (``DUPLICATE``). Raises
        :class:`SpoolError` if the disk or the index fails (nothing is kept then).
        """
        written = self.write(info, part10, padding=padding)
        if written is None:
            return StoreOutcome.DUPLICATE
        return self.index(written, answered=False)

    def write(self, info: InstanceInfo, part10: Sequence[bytes | memoryview], *,
              padding: Padding | None = None) -> Written | None:
        """The first half of :meth:`store`: the file written and flushed, not indexed yet;
        ``None`` for a SOP Instance UID already indexed. Raises :class:`SpoolError`."""
        if self.contains(info.sop_instance_uid):
            return None
        path = self.root
        size = sum(memoryview(p).nbytes for p in part10)
        if size % 2:  # a padding element must start at an even offset
            padding = None
        try:
            if self.sealed:
                path, capacity = self._take_pool_file(
                    None if padding is None else size + padding.header_size)
                if padding is None:
                    _write_sealed(path, part10, info)
                else:
                    _write_padded(path, part10, size, info, padding, capacity)
            else:
                path = self._new_path(info.sop_instance_uid)
                _write_durable(path, part10)
        except OSError as exc:
            raise SpoolError(f"cannot write {path} (series {info.series_uid}, SOP instance "
                             f"{info.sop_instance_uid}): {exc}") from exc
        return Written(info, path, size)

    def index(self, written: Written, *, answered: bool) -> StoreOutcome:
        """The second half of :meth:`store`: the index row (and the series totals) of a
        written instance; ``DUPLICATE`` (the file removed) when another association indexed
        the same SOP Instance UID meanwhile. ``answered``: Success was already sent (only when
        :attr:`durable_before_index`): a failed insert then keeps the file and is tried again
        by :meth:`index_unindexed` (and :meth:`recover` at the next start); otherwise the file
        is removed. Raises :class:`SpoolError` when the insert fails."""
        info = written.info
        try:
            with self._tx() as db:
                inserted = self._index_locked(db, info, str(written.path.relative_to(self.root)),
                                              written.size)
        except sqlite3.Error as exc:
            if answered and self.durable_before_index:
                with self._lock:
                    self._unindexed.append(written)
                kept = "; the sealed file is kept and indexed once the index works again"
            else:
                with contextlib.suppress(OSError):
                    written.path.unlink()
                kept = ""
            raise SpoolError(f"cannot index series {info.series_uid} SOP instance "
                             f"{info.sop_instance_uid} in {self.index_path}: {exc}{kept}"
                             ) from exc
        if not inserted:  # another association stored the same instance meanwhile
            with contextlib.suppress(OSError):
                written.path.unlink()
            return StoreOutcome.DUPLICATE
        return StoreOutcome.STORED

    def index_unindexed(self) -> int:
        """Index the answered instances whose index row failed (:meth:`index`); returns how
        many are indexed now. Raises :class:`SpoolError` when the index still fails (those
        not done stay for the next call)."""
        with self._lock:
            waiting, self._unindexed = self._unindexed, []
        done = 0
        for position, written in enumerate(waiting):
            try:
                self.index(written, answered=True)
            except SpoolError:
                with self._lock:
                    self._unindexed.extend(waiting[position + 1:])
                raise
            done += 1
        if done:
            logger.info("spool: %d answered instances indexed after their index row had "
                        "failed", done)
        return done

    def quarantine(self, parts: Sequence[bytes | memoryview], reason: str,
                   details: dict[str, Any]) -> Path:
        """Keep rejected bytes in ``quarantine/`` with a JSON file saying why; returns the
        path of the ``.dcm``. Best effort but durable: both files are fsync'd."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        base = self.quarantine_dir / f"{stamp}-{secrets.token_hex(6)}"
        data_path = base.with_suffix(SUFFIX)
        record = {"reason": reason, "quarantined_at": time.time(), "file": data_path.name,
                  **details}
        try:
            size = _write_durable(data_path, parts)
            record["size"] = size
            _write_durable(base.with_suffix(".json"),
                           [json.dumps(record, indent=2, default=str).encode()])
        except OSError as exc:
            raise SpoolError(f"cannot write to the quarantine {self.quarantine_dir}: {exc}") \
                from exc
        return data_path

    # -- reading (outbox, series tracker) ------------------------------------------------

    def pending(self, limit: int = 64, max_bytes: int = 16 << 20) -> list[SpooledInstance]:
        """Unpublished instances in arrival order: at most ``limit`` rows and about
        ``max_bytes`` (always at least one row when any is pending)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, sop_instance_uid, sop_class_uid, study_uid, series_uid, "
                "transfer_syntax_uid, calling_ae, received_at, path, size FROM instances "
                "WHERE published_at IS NULL AND publish_error IS NULL ORDER BY id LIMIT ?",
                (limit,)).fetchall()
        out: list[SpooledInstance] = []
        total = 0
        for row in rows:
            if out and total + row[9] > max_bytes:
                break
            total += row[9]
            out.append(SpooledInstance(
                id=row[0], sop_instance_uid=row[1], sop_class_uid=row[2], study_uid=row[3],
                series_uid=row[4], transfer_syntax_uid=row[5], calling_ae=row[6],
                received_at=row[7], path=self.root / row[8], size=row[9]))
        return out

    def read(self, instance: SpooledInstance) -> bytes:
        """The Part-10 bytes of a spooled instance as received (without the padding that
        carries a seal); :class:`SpoolError` if unreadable."""
        try:
            with instance.path.open("rb") as f:
                data = f.read(instance.size)
        except OSError as exc:
            raise SpoolError(f"cannot read spooled series {instance.series_uid} SOP instance "
                             f"{instance.sop_instance_uid} at {instance.path}: {exc}") from exc
        if len(data) != instance.size:
            raise SpoolError(f"spooled file {instance.path} (series {instance.series_uid}, SOP "
                             f"instance {instance.sop_instance_uid}) has {len(data)} bytes, "
                             f"the index says {instance.size}")
        return data

    def mark_published(self, ids: Sequence[int], when: float | None = None) -> None:
        """Record that these rows are durably on the bus (call after ``flush()``)."""
        if not ids:
            return
        stamp = time.time() if when is None else when
        with self._tx() as db:
            db.executemany("UPDATE instances SET published_at = ? WHERE id = ?",
                           [(stamp, i) for i in ids])

    def mark_failed(self, instance_id: int, error: str) -> None:
        """Take a row that can never be published (its file is gone or corrupt) out of the
        queue, keeping the reason; it no longer holds back its series' completion."""
        with self._tx() as db:
            db.execute("UPDATE instances SET publish_error = ? WHERE id = ?",
                       (error, instance_id))

    def prune(self, published_before: float, limit: int = PRUNE_BATCH) -> int:
        """Delete the files of instances published to the bus before ``published_before``
        (epoch seconds), oldest first, at most ``limit``; returns how many were deleted.

        Once flushed to the bus an instance's bytes live there, so the spool copy is only a
        safety margin. The index row stays (``pruned_at`` set): a re-sent instance is still
        recognised as a duplicate. The file goes first and the mark second, so a crash between
        them leaves a row whose file is already gone (pruned again, harmlessly), never a file
        that nothing accounts for.
        """
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, path FROM instances WHERE pruned_at IS NULL AND published_at "
                    "IS NOT NULL AND published_at < ? ORDER BY published_at, id LIMIT ?",
                    (published_before, limit)).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read the spool index {self.index_path}: {exc}") from exc
        deleted: list[int] = []
        for instance_id, rel in rows:
            try:
                (self.root / rel).unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("spool: cannot delete published file %s: %s", self.root / rel,
                               exc)
                continue
            deleted.append(instance_id)
        if deleted:
            stamp = time.time()
            try:
                with self._tx() as db:
                    db.executemany("UPDATE instances SET pruned_at = ? WHERE id = ?",
                                   [(stamp, i) for i in deleted])
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot update the spool index {self.index_path}: {exc}") \
                    from exc
        return len(deleted)

    def pending_count(self) -> int:
        """Instances not yet published (excluding those marked failed)."""
        with self._lock:
            (n,) = self._db.execute(
                "SELECT count(*) FROM instances WHERE published_at IS NULL "
                "AND publish_error IS NULL").fetchone()
        return int(n)

    def instance_count(self) -> int:
        """All indexed instances."""
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM instances").fetchone()
        return int(n)

    def open_series(self) -> list[SeriesState]:
        """Series with instances received since their last completion (or never completed),
        with the number of their instances still waiting for the bus."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.series_uid, s.study_uid, s.first_received_at, s.last_received_at, "
                "s.instance_count, s.completed_count, s.generation, "
                "(SELECT count(*) FROM instances i WHERE i.series_uid = s.series_uid "
                " AND i.published_at IS NULL AND i.publish_error IS NULL), "
                "s.patient_id, s.accession_number, s.modality "
                "FROM series s WHERE s.instance_count > s.completed_count").fetchall()
        return [SeriesState(*row) for row in rows]

    def series(self, series_uid: str) -> SeriesState | None:
        """The state of one series, or ``None`` if never seen."""
        with self._lock:
            row = self._db.execute(
                "SELECT s.series_uid, s.study_uid, s.first_received_at, s.last_received_at, "
                "s.instance_count, s.completed_count, s.generation, "
                "(SELECT count(*) FROM instances i WHERE i.series_uid = s.series_uid "
                " AND i.published_at IS NULL AND i.publish_error IS NULL), "
                "s.patient_id, s.accession_number, s.modality "
                "FROM series s WHERE s.series_uid = ?", (series_uid,)).fetchone()
        return SeriesState(*row) if row else None

    def mark_series_completed(self, series_uid: str, generation: int, instance_count: int,
                              completed_at: float) -> None:
        """Record that completion event ``generation`` (covering ``instance_count``
        instances) is durably on the bus."""
        with self._tx() as db:
            db.execute("UPDATE series SET generation = ?, completed_count = ?, completed_at = ?"
                       " WHERE series_uid = ?",
                       (generation, instance_count, completed_at, series_uid))

    # -- lifecycle -----------------------------------------------------------------------

    def recover(self) -> int:
        """Reconcile the spool files with the index at start (before the SCP runs).

        A file without an index row whose seal matches its bytes is a stored instance whose
        index commit was lost (it may have been answered Success): it is indexed, so the
        outbox publishes it. Unused pool files are removed. A file with a seal that cannot be
        read is moved to the quarantine (never deleted). Any other file without an index row
        was never sealed (an interrupted store, never acknowledged: the sender sends it again)
        and is deleted. Returns the number of such interrupted files deleted.
        """
        with self._lock:
            known = {row[0] for row in self._db.execute("SELECT path FROM instances")}
        outcomes: dict[_Recovered, int] = dict.fromkeys(_Recovered, 0)
        with self._refill_lock:  # no batch half-created while the leftovers are looked for
            with self._pool_lock:  # pool files taken in this run are in use, not leftovers
                known.update(str(p.relative_to(self.root))
                             for p in (*self._ready, *self._empty))
            for sub in sorted(self.root.iterdir()):
                if not sub.is_dir():
                    continue
                for entry in os.scandir(sub):
                    rel = f"{sub.name}/{entry.name}"
                    if rel not in known:
                        outcomes[self._recover_file(Path(entry.path), rel)] += 1
        if outcomes[_Recovered.INDEXED]:
            logger.warning("spool: %d sealed instances had lost their index row (crash or power "
                           "loss); indexed again, they will be published",
                           outcomes[_Recovered.INDEXED])
        return outcomes[_Recovered.REMOVED]

    def _recover_file(self, path: Path, rel: str) -> _Recovered:
        """Index, drop, quarantine or delete one spool file that has no index row."""
        try:
            seal = _read_seal(str(path))
        except SealError as exc:
            target = self.quarantine_dir / f"spool-{path.name}"
            logger.error("spool: %s has a seal that cannot be read (%s); moved to %s, not "
                         "published", path, exc, target)
            with contextlib.suppress(OSError):
                os.replace(path, target)
            return _Recovered.QUARANTINED
        if seal is None:
            try:
                unused = is_unused_pool_file(path)
            except OSError:
                return _Recovered.GONE
            if unused:
                with contextlib.suppress(OSError):
                    path.unlink()
                return _Recovered.POOL
        elif _matches_seal(path, seal):
            info = seal.info
            with self._tx() as db:
                inserted = self._index_locked(db, info, rel, seal.size)
            if inserted:
                logger.warning("spool: indexed %s again: series %s SOP instance %s (sealed, "
                               "index row lost)", path, info.series_uid, info.sop_instance_uid)
                return _Recovered.INDEXED
            logger.info("spool: removing %s: SOP instance %s is already stored", path,
                        info.sop_instance_uid)
            with contextlib.suppress(OSError):
                path.unlink()
            return _Recovered.DUPLICATE
        logger.warning("spool: removing %s: written but never sealed nor indexed, so never "
                       "acknowledged (interrupted store)", path)
        with contextlib.suppress(OSError):
            path.unlink()
        return _Recovered.REMOVED

    def close(self) -> None:
        """Remove the unused pool files and close the index (idempotent)."""
        with self._refill_lock, self._pool_lock:
            self._closed = True
            self._pool_wake.notify_all()
            pool = [*self._ready, *self._empty]
            self._ready, self._empty = [], []
        if self._filler is not None and self._filler is not threading.current_thread():
            self._filler.join()
        for path in pool:
            with contextlib.suppress(OSError):
                path.unlink()
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()


def info_dict(info: InstanceInfo) -> dict[str, Any]:
    """``info`` as a plain dict (for quarantine reason files and logs)."""
    return asdict(info)


def requeue_series(data_dir: Path, series_uid: str) -> int:
    """Put a received series back in the outbox's queue, to be published and completed again
    (``hust19 dlq retry``: a series whose triage failed, once the cause is fixed).

    Works on the index of ``data_dir``'s spool while the agent runs in another process: its
    instances are marked unpublished and the series open, so the outbox sends them to
    ``dicom.instances`` again and the series tracker then publishes a completion event of
    the next generation (at once if the series is quiet; after ``series_aborted_quiet_s`` if
    the agent is started afterwards). Returns how many instances were queued. Raises
    :class:`SpoolError` when the series is unknown here or retention already deleted files
    of it (they cannot be sent again from this spool)."""
    path = Path(data_dir) / INDEX_FILE
    if not path.is_file():
        raise SpoolError(f"no spool index at {path}: is {data_dir} the data directory of the "
                         "agent that received the series?")
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot open the spool index {path}: {exc}") from exc
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM series WHERE series_uid = ?",
                          (series_uid,)).fetchone() is None:
                raise SpoolError(f"series {series_uid} was not received by the agent whose "
                                 f"data directory is {data_dir}")
            pruned = db.execute("SELECT count(*) FROM instances WHERE series_uid = ? AND "
                                "pruned_at IS NOT NULL", (series_uid,)).fetchone()[0]
            if pruned:
                raise SpoolError(f"series {series_uid}: the spooled files of {pruned} of its "
                                 "instances were deleted by the spool retention "
                                 "(spool_retention_h); it cannot be published again from "
                                 f"{data_dir}")
            queued = db.execute("UPDATE instances SET published_at = NULL WHERE series_uid = ? "
                                "AND publish_error IS NULL", (series_uid,)).rowcount
            db.execute("UPDATE series SET completed_count = 0 WHERE series_uid = ?",
                       (series_uid,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot update the spool index {path}: {exc}") from exc
    finally:
        db.close()
    logger.info("series %s: %d instances queued to be published again", series_uid, queued)
    return int(queued)
