"""The embedded bus: a durable append-only log per topic on the local disk, no server.

It is the default for one edge box. Layout under ``root`` (``data_dir/bus``)::

    topics/<topic>/<base offset:020d>.log one segment of partition 0 (the only partition):
                                          the records from offset <base offset> on
    groups/<group>/<topic>.offset.json    committed next offset of that group on that topic
    groups/<group>/<topic>.lock           held (flock) by the group member that owns the topic
    groups/<group>/commit-<topics>.json   a commit of several topics, until each is written

A topic's log is a sequence of segments, as on Kafka. Appends go to the newest, the active
segment; before an append would take it past ``segment_bytes`` (:data:`SEGMENT_BYTES`) it is
fsync'd and closed and a new segment is started, named by the offset of its first record (a
record larger than that gets a segment of its own). ``topics/<topic>/0.log`` of the earlier
single-file layout is read as the first segment, base offset 0; nothing is migrated.

Each record is framed so that a crash in the middle of a write is detected on the next open::

    frame  : magic "HB" | version u8 | pad | body length u32 | CRC-32C(body) u32   (12 bytes)
    body   : timestamp ms i64 | key length i32 (-1 = None) | header count u32 | key
             | per header: name length u16, name (UTF-8), value length u32, value
             | value length u32 | value

Guarantees and how they are kept:

* **Durability.** :meth:`EmbeddedProducer.flush` fsyncs every log it appended to (and, when a
  topic is created, its directories) before returning. A record is visible to readers as soon
  as it is written, before the flush, as on Kafka with ``acks=1``; only flushed records are
  promised to survive a power loss.
* **Crash recovery.** The first time a process opens a topic it verifies the length and
  CRC-32C of every record of the active segment, under the topic's exclusive lock; the first
  invalid record and everything after it (a torn tail) are truncated with a warning, as Kafka
  does when it recovers unflushed segments. Closed segments were fsync'd whole when they were
  closed: only their record lengths are read to index them. Every later append first checks,
  under the same lock, that the active segment ends where its last complete record ends, so an
  append never lands after garbage.
* **Commits of several topics at once** are all or nothing, as one OffsetCommit request is on
  Kafka: the offsets are first written together to one file (``commit-<topics>.json``, atomic
  and durable), then to each topic's offset file, then that file is removed. A member that
  claims a topic first carries any such file's offset for it forward (never back), so a crash
  between two offset files cannot leave one topic committed and the other not (the worker would
  then see a series' completion event again without its instances, already committed).
* **Several processes on one box.** Appends, rolls and retention run under ``flock``
  (``LOCK_EX``) on the topic's directory, so several producers (ingest outbox, worker) in
  different processes interleave whole records only and agree on the active segment. Readers
  take no lock: they index only records whose full length is on disk, verify each record's CRC
  when they read it, and follow the segments other processes roll to or delete.
* **Retention** (``retention_h``, 0 = keep for ever). A closed segment is deleted when its
  newest record is older than the retention time *and* every consumer group with a committed
  offset on the topic has committed past its last record; only the oldest segments go, never
  the active one. A segment kept past its retention for a group logs a warning naming the
  group. Producers run it on :meth:`EmbeddedProducer.flush`, at most every
  :data:`RETENTION_CHECK_INTERVAL_S`. A consumer whose position is before the earliest offset
  still on disk continues from there, with a warning (Kafka's ``auto.offset.reset=earliest``).
* **Consumer groups.** One member per group owns a topic (an exclusive ``flock`` on the
  group's lock file; another member gets no assignment until the owner closes or dies, like a
  surplus Kafka member on a one-partition topic). Offsets are committed atomically (temporary
  file, fsync, rename, fsync of the directory); a member resumes from the committed offset, so
  messages polled but not committed are delivered again after a restart (at-least-once).
  A consumer with group ``None`` reads every topic from the beginning and never commits.

Message offsets are record indexes (0, 1, 2, ...) over the whole topic, never changed by rolling
or retention; an in-memory index per topic (each segment's base offset and record positions)
makes a read one ``pread``. There is one partition, ``0``: scale-out is Kafka's job.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import crc32c

from agent.bus.interface import Bus, Consumer, Headers, Message, Producer
from agent.durable import atomic_write, fsync_dir, write_all
from schemas.errors import BusError

logger = logging.getLogger(__name__)

PARTITION: Final = 0
"""The embedded bus has one partition per topic."""

RECORD_MAGIC: Final = b"HB"
FORMAT_VERSION: Final = 1
MAX_RECORD_BYTES: Final = 1 << 30
"""Largest record body accepted (1 GiB); a larger length in a frame means corruption."""

_FRAME: Final = struct.Struct(">2sBxII")  # magic, version, pad, body length, CRC-32C
_FIXED: Final = struct.Struct(">qiI")  # timestamp ms, key length, header count
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_NO_KEY: Final = -1
_MAX_HEADER_NAME: Final = 0xFFFF

POLL_SLEEP_MIN_S: Final = 0.002
POLL_SLEEP_MAX_S: Final = 0.05
"""A waiting poll re-checks the file size with sleeps growing from the min to the max."""

SEGMENT_BYTES: Final = 256 << 20
"""Size at which a topic's active segment is closed and a new one started (Kafka's
``segment.bytes``): 256 MiB, a little less than two CT series."""
RETENTION_CHECK_INTERVAL_S: Final = 300.0
"""A producer's flush applies the retention at most this often (Kafka's
``log.retention.check.interval.ms``)."""
OPEN_CLOSED_SEGMENTS: Final = 4
"""Closed segments a process keeps open for reading (the least recently read is closed)."""
MS_PER_HOUR: Final = 3_600_000

_SEGMENT_NAME: Final = re.compile(r"^(\d{1,20})\.log$")
_TIMESTAMP: Final = struct.Struct(">q")  # the first field of a record body

_TOPIC_NAME: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
"""The characters Kafka allows in a topic name; they are also safe as a file name."""
COMMIT_INTENT_GLOB: Final = "commit-*.json"
"""In a group's folder: the offsets of one commit of several topics, until each is written."""


def _check_topic(topic: str) -> None:
    if not _TOPIC_NAME.match(topic) or topic in {".", ".."}:
        raise BusError(f"invalid topic name {topic!r}: use 1-249 of [A-Za-z0-9._-]")


def _group_dirname(group: str) -> str:
    """A file-system-safe directory name for a consumer group id (hex for odd characters)."""
    if _TOPIC_NAME.match(group) and group not in {".", ".."}:
        return group
    return "x-" + group.encode("utf-8").hex()



def _makedirs_durable(path: Path) -> None:
    """Create ``path`` and its missing parents, fsyncing each parent that gained an entry."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        fsync_dir(d.parent)


def encode_record(key: bytes | None, value: bytes, headers: Headers,
                  timestamp_ms: int) -> tuple[bytes, bytes]:
    """Frame and body of one record (two buffers, so a large value is copied only once)."""
    parts: list[bytes] = [_FIXED.pack(timestamp_ms, _NO_KEY if key is None else len(key),
                                      len(headers))]
    if key is not None:
        parts.append(key)
    for name, hval in headers:
        raw = name.encode("utf-8")
        if len(raw) > _MAX_HEADER_NAME:
            raise BusError(f"header name too long ({len(raw)} bytes)")
        parts += [_U16.pack(len(raw)), raw, _U32.pack(len(hval)), bytes(hval)]
    parts += [_U32.pack(len(value)), value]
    body = b"".join(parts)
    if len(body) > MAX_RECORD_BYTES:
        raise BusError(f"record of {len(body)} bytes exceeds the embedded bus limit "
                       f"{MAX_RECORD_BYTES}")
    return _FRAME.pack(RECORD_MAGIC, FORMAT_VERSION, len(body), crc32c.crc32c(body)), body


def decode_body(body: bytes) -> tuple[int, bytes | None, Headers, bytes]:
    """``(timestamp_ms, key, headers, value)`` of a record body; ``ValueError`` if malformed."""
    mv = memoryview(body)
    try:
        ts, klen, hcount = _FIXED.unpack_from(mv, 0)
        pos = _FIXED.size
        key: bytes | None = None
        if klen != _NO_KEY:
            key = bytes(mv[pos:pos + klen])
            pos += klen
        headers: Headers = []
        for _ in range(hcount):
            (nlen,) = _U16.unpack_from(mv, pos)
            pos += _U16.size
            name = bytes(mv[pos:pos + nlen]).decode("utf-8")
            pos += nlen
            (vlen,) = _U32.unpack_from(mv, pos)
            pos += _U32.size
            headers.append((name, bytes(mv[pos:pos + vlen])))
            pos += vlen
        (vlen,) = _U32.unpack_from(mv, pos)
        pos += _U32.size
        if pos + vlen != len(mv):
            raise ValueError("value length does not match the record length")
        return ts, key, headers, bytes(mv[pos:pos + vlen])
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc



class _SegmentGone(Exception):
    """A closed segment was deleted by retention (in this process or another) before it could
    be read; the reader moves on to the earliest offset still on disk."""


def segment_name(base_offset: int) -> str:
    """The file name of the segment whose first record has offset ``base_offset``."""
    return f"{base_offset:020d}.log"


def _segment_files(directory: Path) -> dict[int, Path]:
    """``base offset -> path`` of the segment files in a topic directory (``0.log`` of the
    single-file layout is the segment with base offset 0)."""
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        m = _SEGMENT_NAME.match(entry.name)
        if m is None:
            continue
        base = int(m.group(1))
        path = Path(entry.path)
        if base in found:
            # An empty one is harmless (e.g. 0.log made by an earlier version's reader).
            sizes = {found[base]: found[base].stat().st_size, path: path.stat().st_size}
            if min(sizes.values()) > 0:
                raise BusError(f"embedded bus: {directory} holds two segments with base "
                               f"offset {base}: {found[base].name} and {entry.name}")
            path = max(sizes, key=lambda p: sizes[p])
        found[base] = path
    return found


class _Segment:
    """One segment file: its base offset, the byte position of each indexed record and the
    byte after the last one."""

    __slots__ = ("base", "end", "path", "positions")

    def __init__(self, base: int, path: Path) -> None:
        self.base = base
        self.path = path
        self.positions: array[int] = array("Q")
        self.end = 0

    @property
    def next_offset(self) -> int:
        return self.base + len(self.positions)


class _TopicLog:
    """One topic's segments in this process: the record index, the descriptors, the locks.

    ``segments`` is ordered by base offset; the last one is the active segment (appends go
    there, through ``fd``). Closed segments are opened for reading on demand and at most
    :data:`OPEN_CLOSED_SEGMENTS` of them stay open. The thread lock guards the index; an
    ``flock`` on the topic directory guards the files against other processes during appends,
    rolls, recovery and retention.
    """

    def __init__(self, topic: str, directory: Path, segment_bytes: int) -> None:
        self.topic = topic
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.lock = threading.Lock()
        self.segments: list[_Segment] = []
        self.fd = -1
        self._read_fds: OrderedDict[int, int] = OrderedDict()  # base offset -> read-only fd
        self._closed = False
        try:
            _makedirs_durable(directory)
            self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise BusError(f"cannot open the log of topic {topic} at {directory}: {exc}") \
                from exc
        try:
            with self.lock, self._file_lock():
                self._load(recover=True)
        except OSError as exc:
            self.close()
            raise BusError(f"cannot open the log of topic {topic} at {directory}: {exc}") \
                from exc
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        fcntl.flock(self.dir_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.dir_fd, fcntl.LOCK_UN)

    # -- index -------------------------------------------------------------------------------
    def _load(self, *, recover: bool) -> None:
        """(Re)build the index from the segment files on disk. Closed segments were fsync'd
        whole when they were closed, so only their record lengths are read; the active one
        is scanned with ``recover`` (see :meth:`_scan`)."""
        self._close_fds()
        found = _segment_files(self.dir) or {0: self.dir / segment_name(0)}
        self.segments = [_Segment(base, found[base]) for base in sorted(found)]
        for seg, nxt in itertools.pairwise(list(self.segments)):
            try:
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # deleted by retention since the listing (no lock)
                self.segments.remove(seg)
                continue
            try:
                self._scan(seg, fd, recover=False, limit=nxt.base - seg.base)
            finally:
                os.close(fd)
            if seg.next_offset != nxt.base:
                logger.warning("embedded bus: topic %s: segment %s holds offsets %d-%d but the "
                               "next segment starts at %d; offsets %d-%d are missing",
                               self.topic, seg.path.name, seg.base, seg.next_offset - 1,
                               nxt.base, seg.next_offset, nxt.base - 1)
        self._open_active(self.segments[-1], create=True)
        self._scan(self.segments[-1], self.fd, recover=recover)

    def _open_active(self, seg: _Segment, *, create: bool) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        created = create and not seg.path.exists()
        fd = os.open(seg.path, flags, 0o644)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        if created:
            fsync_dir(self.dir)

    def _scan(self, seg: _Segment, fd: int, *, recover: bool, limit: int | None = None) -> None:
        """Index the complete records of ``seg`` after ``seg.end`` (at most ``limit`` in all).

        With ``recover`` (only under the exclusive file lock, when no writer can be mid-record)
        the CRC of each new record is checked and an incomplete or invalid tail is truncated.
        Without it (a reader beside live writers) only lengths are checked and the scan stops
        at the first record not yet fully on disk.
        """
        size = os.fstat(fd).st_size
        pos = seg.end
        problem = ""
        while pos < size and (limit is None or len(seg.positions) < limit):
            if pos + _FRAME.size > size:
                problem = "incomplete record frame"
                break
            frame = os.pread(fd, _FRAME.size, pos)
            magic, version, length, crc = _FRAME.unpack(frame)
            if magic != RECORD_MAGIC or version != FORMAT_VERSION or length > MAX_RECORD_BYTES:
                problem = "invalid record frame"
                break
            if pos + _FRAME.size + length > size:
                problem = "incomplete record"
                break
            if recover:
                body = os.pread(fd, length, pos + _FRAME.size)
                if crc32c.crc32c(body) != crc:
                    problem = "CRC-32C mismatch"
                    break
            seg.positions.append(pos)
            pos += _FRAME.size + length
        seg.end = pos
        if recover and pos < size:
            logger.warning("embedded bus: topic %s: %s at byte %d of %s; truncating %d bytes "
                           "(a write that did not finish: a crash, or a failed write such as "
                           "a full disk); %d records kept",
                           self.topic, problem or "extra bytes", pos, seg.path, size - pos,
                           self._count())
            os.ftruncate(fd, pos)
            os.fsync(fd)
        elif limit is not None and pos < size:
            logger.warning("embedded bus: topic %s: closed segment %s has %d bytes after its "
                           "last usable record (%s); they are ignored", self.topic,
                           seg.path.name, size - pos, problem or "past the next segment")

    def _count(self) -> int:
        return self.segments[-1].next_offset

    def _catch_up(self, *, recover: bool) -> None:
        """Index what other processes appended, following the segments they rolled to.

        A segment is rolled under the file lock after every record of the old one is written,
        and the new one is named by the offset of its first record; so once the active segment
        is fully indexed, a file named after the next offset means the active one is closed.
        """
        while True:
            active = self.segments[-1]
            self._scan(active, self.fd, recover=recover)
            if not active.positions:
                return
            path = self.dir / segment_name(active.next_offset)
            if not path.exists():
                return
            nxt = _Segment(active.next_offset, path)
            try:
                self._open_active(nxt, create=False)
            except FileNotFoundError:
                # Rolled and already deleted by retention: this view is far behind, re-read
                # the directory.
                self._load(recover=recover)
                return
            self.segments.append(nxt)

    def _drop_deleted(self) -> None:
        """Forget the oldest segments that retention (maybe in another process) deleted."""
        while len(self.segments) > 1 and not self.segments[0].path.exists():
            self._forget(self.segments[0])

    def _forget(self, seg: _Segment) -> None:
        self.segments.remove(seg)
        fd = self._read_fds.pop(seg.base, -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _read_fd(self, seg: _Segment) -> int:
        """A descriptor to read ``seg`` (the active one's, or a cached read-only one)."""
        if seg is self.segments[-1]:
            return self.fd
        fd = self._read_fds.get(seg.base)
        if fd is not None:
            self._read_fds.move_to_end(seg.base)
            return fd
        try:
            fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._drop_deleted()
            raise _SegmentGone(seg.path.name) from None
        self._read_fds[seg.base] = fd
        while len(self._read_fds) > OPEN_CLOSED_SEGMENTS:
            _, old = self._read_fds.popitem(last=False)
            with contextlib.suppress(OSError):
                os.close(old)
        return fd

    def _segment_of(self, offset: int) -> _Segment:
        """The segment holding ``offset``; ``_SegmentGone`` if it is no longer on disk."""
        i = bisect.bisect_right(self.segments, offset, key=lambda s: s.base) - 1
        if i < 0 or offset >= self.segments[i].next_offset:
            raise _SegmentGone(str(offset))
        return self.segments[i]

    # -- writing -----------------------------------------------------------------------------
    def append(self, frames: Sequence[tuple[bytes, bytes]]) -> None:
        """Append whole records, after making sure the active segment ends at a record
        boundary, rolling to a new segment first if they would take it past the size limit."""
        with self.lock:
            self._check_open()
            self._append_locked(frames)

    def _append_locked(self, frames: Sequence[tuple[bytes, bytes]]) -> None:
        with self._file_lock():
            try:
                self._catch_up(recover=True)
                incoming = sum(len(frame) + len(body) for frame, body in frames)
                active = self.segments[-1]
                if active.positions and active.end + incoming > self.segment_bytes:
                    active = self._roll()
                for frame, body in frames:
                    write_all(self.fd, (frame, body))
                    active.positions.append(active.end)
                    active.end += len(frame) + len(body)
            except OSError as exc:
                self._cut_failed_write(exc)
                raise BusError(f"embedded bus: append to topic {self.topic} failed: {exc}") \
                    from exc

    def _cut_failed_write(self, exc: OSError) -> None:
        """A write failed (a full disk, an I/O error): cut the partial record it may have left
        at once, so that nothing later mistakes it for a crash's leftover. If the cut fails
        too, the next append (or open) truncates it, saying so."""
        end = self.segments[-1].end
        try:
            size = os.fstat(self.fd).st_size
            if size > end:
                os.ftruncate(self.fd, end)
                logger.warning("embedded bus: topic %s: a write failed (%s); its partial "
                               "record (%d bytes) was cut off", self.topic, exc, size - end)
        except OSError as cut:
            logger.warning("embedded bus: topic %s: a write failed (%s) and its partial "
                           "record could not be cut off yet (%s)", self.topic, exc, cut)

    def _roll(self) -> _Segment:
        """Close the active segment (fsync'd, so a closed segment is always whole) and start
        the next one, named by its base offset. Under both locks, after :meth:`_catch_up`."""
        old = self.segments[-1]
        os.fsync(self.fd)
        seg = _Segment(old.next_offset, self.dir / segment_name(old.next_offset))
        try:
            fd = os.open(seg.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL
                         | os.O_CLOEXEC, 0o644)
        except FileExistsError as exc:
            raise BusError(f"embedded bus: topic {self.topic}: segment {seg.path} exists "
                           "already (written without the topic lock?)") from exc
        os.close(self.fd)
        self.fd = fd
        fsync_dir(self.dir)
        self.segments.append(seg)
        logger.info("embedded bus: topic %s: segment %s closed at %d bytes (offsets %d-%d); "
                    "new segment %s", self.topic, old.path.name, old.end, old.base,
                    old.next_offset - 1, seg.path.name)
        return seg

    # -- reading -----------------------------------------------------------------------------
    def refresh(self) -> int:
        """Index records other processes appended, forget segments retention deleted; return
        the log-end offset (the offset the next record will get)."""
        with self.lock:
            self._check_open()
            try:
                self._catch_up(recover=False)
                self._drop_deleted()
            except OSError as exc:
                raise BusError(f"embedded bus: cannot read the log of topic {self.topic}: "
                               f"{exc}") from exc
            return self._count()

    def _check_open(self) -> None:
        # A closed descriptor number may be reused by another file: never touch it again.
        if self._closed:
            raise BusError(f"embedded bus: topic {self.topic} is closed")

    def count(self) -> int:
        """The log-end offset as indexed now."""
        with self.lock:
            return self._count()

    def earliest(self) -> int:
        """The first offset still on disk (as indexed now)."""
        with self.lock:
            return self.segments[0].base

    def segment_paths(self) -> list[Path]:
        """The segment files as indexed now, oldest first (the last one is active)."""
        with self.lock:
            return [seg.path for seg in self.segments]

    def readable_from(self, offset: int) -> int:
        """``offset`` if it is on disk (or not written yet), else the next offset that is."""
        with self.lock:
            for seg in self.segments:
                if offset < seg.base:
                    return seg.base
                if offset < seg.next_offset:
                    return offset
            return max(offset, self._count())

    def read(self, offset: int) -> Message:
        """The record at ``offset`` (which must be indexed), CRC-checked. Raises
        ``_SegmentGone`` if its segment is no longer on disk."""
        with self.lock:
            self._check_open()
            seg = self._segment_of(offset)
            pos = seg.positions[offset - seg.base]
            try:
                fd = self._read_fd(seg)
                frame = os.pread(fd, _FRAME.size, pos)
                _magic, _version, length, crc = _FRAME.unpack(frame)
                body = os.pread(fd, length, pos + _FRAME.size)
            except OSError as exc:
                raise BusError(f"embedded bus: read of topic {self.topic} record {offset} "
                               f"failed: {exc}") from exc
        if len(body) != length or crc32c.crc32c(body) != crc:
            raise BusError(f"embedded bus: topic {self.topic} record {offset} at byte {pos} of "
                           f"{seg.path} is corrupt (CRC-32C mismatch)")
        try:
            ts, key, headers, value = decode_body(body)
        except ValueError as exc:
            raise BusError(f"embedded bus: topic {self.topic} record {offset} is malformed: "
                           f"{exc}") from exc
        return Message(self.topic, PARTITION, offset, key, value, headers, ts)

    # -- retention ---------------------------------------------------------------------------
    def _newest_ms(self, seg: _Segment) -> int:
        """Timestamp of the last record of ``seg`` (0 for an empty segment)."""
        if not seg.positions:
            return 0
        raw = os.pread(self._read_fd(seg), _TIMESTAMP.size, seg.positions[-1] + _FRAME.size)
        return int(_TIMESTAMP.unpack(raw)[0])

    def enforce_retention(self, cutoff_ms: int, committed: dict[str, int]) -> int:
        """Delete the oldest closed segments whose newest record is older than ``cutoff_ms``
        and that every group in ``committed`` (group -> committed next offset) has read past;
        stop at the first one that must stay. Returns the number of segments deleted."""
        with self.lock:
            self._check_open()
            with self._file_lock():
                try:
                    return self._enforce_retention_locked(cutoff_ms, committed)
                except _SegmentGone:
                    return 0  # deleted under us by a process without the lock: next time
                except OSError as exc:
                    raise BusError(f"embedded bus: retention of topic {self.topic} failed: "
                                   f"{exc}") from exc

    def _enforce_retention_locked(self, cutoff_ms: int, committed: dict[str, int]) -> int:
        self._catch_up(recover=False)
        self._drop_deleted()
        doomed: list[tuple[_Segment, int]] = []
        for seg, nxt in itertools.pairwise(self.segments):  # never the active (last) one
            newest = self._newest_ms(seg)
            if newest >= cutoff_ms:
                break
            behind = {g: off for g, off in committed.items() if off < nxt.base}
            if behind:
                logger.warning(
                    "embedded bus: topic %s: segment %s (offsets %d-%d, newest record %s) is "
                    "past its retention but kept: %s not read past offset %d yet; it is "
                    "deleted once every group has (a group no longer used can be removed "
                    "from %s)", self.topic, seg.path.name, seg.base, nxt.base - 1,
                    _iso_ms(newest), ", ".join(f"group {g} has committed only up to offset "
                                               f"{off}" for g, off in sorted(behind.items())),
                    nxt.base - 1, self.dir.parent.parent / "groups")
                break
            doomed.append((seg, newest))
        for seg, newest in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg.path)
            logger.info("embedded bus: topic %s: deleted segment %s (offsets %d-%d, %d bytes, "
                        "newest record %s): past retention and read by every group",
                        self.topic, seg.path.name, seg.base, seg.next_offset - 1, seg.end,
                        _iso_ms(newest))
            self._forget(seg)
        if doomed:
            fsync_dir(self.dir)
        return len(doomed)

    # -- closing -----------------------------------------------------------------------------
    def fsync(self) -> None:
        """fsync the active segment (closed ones were fsync'd when they were closed)."""
        with self.lock:
            self._check_open()
            try:
                fd = os.dup(self.fd)  # a roll may close self.fd while this one syncs
            except OSError as exc:
                raise BusError(f"embedded bus: fsync of topic {self.topic} failed: {exc}") \
                    from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise BusError(f"embedded bus: fsync of topic {self.topic} failed: {exc}") from exc
        finally:
            os.close(fd)

    def _close_fds(self) -> None:
        fds = [self.fd, *self._read_fds.values()]
        self.fd = -1
        self._read_fds.clear()
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._close_fds()
            with contextlib.suppress(OSError):
                os.close(self.dir_fd)


def _iso_ms(timestamp_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp_ms / 1000))


class EmbeddedBus(Bus):
    """The embedded durable log under ``root``; see the module docstring for the guarantees.

    ``retention_h`` (0 = keep for ever) is enforced by this bus's producers on flush, at most
    every ``retention_check_interval_s``; ``segment_bytes`` is the size at which a topic's
    active segment is closed and a new one started."""

    def __init__(self, root: Path, *, retention_h: float = 0.0,
                 segment_bytes: int = SEGMENT_BYTES,
                 retention_check_interval_s: float = RETENTION_CHECK_INTERVAL_S) -> None:
        if retention_h < 0 or segment_bytes <= 0 or retention_check_interval_s < 0:
            raise BusError(f"embedded bus: invalid retention {retention_h} h, segment size "
                           f"{segment_bytes} bytes or check interval "
                           f"{retention_check_interval_s} s")
        self.root = Path(root)
        self.retention_h = retention_h
        self.segment_bytes = segment_bytes
        self.retention_check_interval_s = retention_check_interval_s
        try:
            _makedirs_durable(self.root / "topics")
            _makedirs_durable(self.root / "groups")
        except OSError as exc:
            raise BusError(f"embedded bus: cannot create {self.root}: {exc}") from exc
        self._logs: dict[str, _TopicLog] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._last_retention: float | None = None  # time.monotonic() of the last check

    def topic_dir(self, topic: str) -> Path:
        """The directory of ``topic``'s segments (partition 0)."""
        _check_topic(topic)
        return self.root / "topics" / topic

    def topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` has a log here (without creating it)."""
        return bool(_segment_files(self.topic_dir(topic)))

    def topics(self) -> list[str]:
        """The topics that have a log here, sorted."""
        base = self.root / "topics"
        return sorted(p.name for p in base.iterdir()
                      if p.is_dir() and _TOPIC_NAME.match(p.name) and _segment_files(p))

    def log(self, topic: str) -> _TopicLog:
        """This process's handle on ``topic``'s log, created (and recovered) on first use."""
        directory = self.topic_dir(topic)
        with self._lock:
            if self._closed:
                raise BusError("embedded bus is closed")
            log = self._logs.get(topic)
            if log is None:
                log = self._logs[topic] = _TopicLog(topic, directory, self.segment_bytes)
            return log

    def producer(self) -> EmbeddedProducer:
        return EmbeddedProducer(self)

    def consumer(self, group_id: str | None, topics: Sequence[str]) -> EmbeddedConsumer:
        return EmbeddedConsumer(self, group_id, topics)

    def ensure_topics(self, topics: Sequence[str]) -> None:
        for topic in topics:
            self.log(topic)

    def ping(self, timeout_s: float = 5.0) -> None:
        """Check that the bus directory is writable."""
        if not os.access(self.root / "topics", os.W_OK):
            raise BusError(f"embedded bus directory {self.root / 'topics'} is not writable")

    def describe(self) -> str:
        keep = f"{self.retention_h:g} h" if self.retention_h else "for ever"
        return (f"embedded durable log at {self.root.resolve()} (one box, one partition per "
                f"topic, fsync on flush, at-least-once, segments of "
                f"{self.segment_bytes // (1 << 20)} MiB kept {keep} once every consumer group "
                f"has read them; point --bus at Kafka to scale out)")

    # -- retention ---------------------------------------------------------------------------
    def recent(self, topic: str, count: int) -> list[Message]:
        """The newest ``count`` records of ``topic`` (it has one partition)."""
        if count <= 0 or not self.topic_exists(topic):
            return []
        log = self.log(topic)
        end = log.refresh()
        out = []
        for offset in range(max(log.earliest(), end - count), end):
            try:
                out.append(log.read(offset))
            except _SegmentGone:  # deleted by retention meanwhile
                continue
        return out

    def committed_offsets(self, topic: str) -> dict[str, int]:
        """``group -> committed next offset`` of every group that has committed on ``topic``
        (an unreadable offset file counts as offset 0: it keeps everything)."""
        out: dict[str, int] = {}
        for group_dir in sorted((self.root / "groups").iterdir()):
            path = group_dir / f"{topic}.offset.json"
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_bytes())
                out[str(data.get("group") or group_dir.name)] = int(data["next_offset"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("embedded bus: committed offset file %s is unreadable (%s); "
                               "retention keeps topic %s whole until it is fixed or removed",
                               path, exc, topic)
                out[group_dir.name] = 0
        return out

    def enforce_retention(self, now_ms: int | None = None) -> int:
        """Apply the retention to every topic now (``now_ms``: the clock, for tests); returns
        the number of segments deleted. A no-op when ``retention_h`` is 0."""
        if not self.retention_h:
            return 0
        now = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now - int(self.retention_h * MS_PER_HOUR)
        deleted = 0
        for topic in self.topics():
            deleted += self.log(topic).enforce_retention(cutoff, self.committed_offsets(topic))
        return deleted

    def maybe_enforce_retention(self) -> None:
        """:meth:`enforce_retention` if the last check is ``retention_check_interval_s`` old;
        a failure is logged (and retried at the next check), never raised."""
        if not self.retention_h:
            return
        now = time.monotonic()
        with self._lock:
            last = self._last_retention
            if self._closed or (last is not None
                                and now - last < self.retention_check_interval_s):
                return
            self._last_retention = now
        try:
            self.enforce_retention()
        except (BusError, OSError) as exc:
            logger.warning("embedded bus: retention check failed (retried in %.0f s): %s",
                           self.retention_check_interval_s, exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            logs, self._logs = list(self._logs.values()), {}
        for log in logs:
            log.close()


class EmbeddedProducer(Producer):
    """Appends records at once (visible to readers) and fsyncs them on :meth:`flush`."""

    def __init__(self, bus: EmbeddedBus) -> None:
        self._bus = bus
        self._dirty: dict[str, _TopicLog] = {}
        self._lock = threading.Lock()

    def send(self, topic: str, key: bytes | None, value: bytes,
             headers: Headers | None = None) -> None:
        log = self._bus.log(topic)
        frame = encode_record(key, value, list(headers or []), int(time.time() * 1000))
        log.append([frame])
        with self._lock:
            self._dirty[topic] = log

    def flush(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, {}
        for log in dirty.values():
            log.fsync()
        self._bus.maybe_enforce_retention()

    def close(self) -> None:
        self.flush()


class EmbeddedConsumer(Consumer):
    """Reads the subscribed topics of one group from its committed offsets (or, with group
    ``None``, from the beginning without committing)."""

    def __init__(self, bus: EmbeddedBus, group_id: str | None, topics: Sequence[str]) -> None:
        self._bus = bus
        self.group_id = group_id
        self._topics = list(dict.fromkeys(topics))
        if not self._topics:
            raise BusError("a consumer needs at least one topic")
        self._logs = {t: bus.log(t) for t in self._topics}
        self._positions: dict[str, int] = {}
        self._lock_fds: dict[str, int] = {}
        self._group_dir = (bus.root / "groups" / _group_dirname(group_id)
                           if group_id is not None else None)
        if self._group_dir is not None:
            _makedirs_durable(self._group_dir)
        else:
            self._positions = dict.fromkeys(self._topics, 0)
        self._next_topic = 0
        self._closed = False

    # -- group membership ------------------------------------------------------------------
    def _offset_path(self, topic: str) -> Path:
        assert self._group_dir is not None
        return self._group_dir / f"{topic}.offset.json"

    def _committed(self, topic: str) -> int:
        path = self._offset_path(topic)
        try:
            data = json.loads(path.read_text())
            return int(data["next_offset"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BusError(f"embedded bus: committed offset file {path} is unreadable: "
                           f"{exc}") from exc

    def _claim(self) -> None:
        """Try to own each subscribed topic not owned yet (an exclusive, non-blocking flock)."""
        if self._group_dir is None:
            return
        for topic in self._topics:
            if topic in self._lock_fds:
                continue
            path = self._group_dir / f"{topic}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise BusError(f"embedded bus: cannot lock {path}: {exc}") from exc
            self._lock_fds[topic] = fd
            self._finish_commits(topic)
            self._positions[topic] = self._committed(topic)
            logger.info("embedded bus: group %s owns topic %s from offset %d",
                        self.group_id, topic, self._positions[topic])

    def assignment(self) -> set[tuple[str, int]]:
        self._claim()
        return {(t, PARTITION) for t in self._positions}

    # -- reading ---------------------------------------------------------------------------
    def _read_available(self, max_records: int) -> list[Message]:
        out: list[Message] = []
        owned = [t for t in self._topics if t in self._positions]
        if not owned:
            return out
        # Round-robin over topics so that one busy topic does not starve the others.
        start = self._next_topic % len(owned)
        self._next_topic += 1
        for topic in owned[start:] + owned[:start]:
            log = self._logs[topic]
            count = log.refresh()
            pos = self._skip_deleted(topic, self._positions[topic])
            while pos < count and len(out) < max_records:
                try:
                    out.append(log.read(pos))
                except _SegmentGone:  # deleted by retention since the refresh
                    pos = self._skip_deleted(topic, pos)
                    continue
                pos += 1
            self._positions[topic] = pos
            if len(out) >= max_records:
                break
        return out

    def _skip_deleted(self, topic: str, pos: int) -> int:
        """``pos``, or the earliest offset on disk after it if retention deleted ``pos``."""
        readable = self._logs[topic].readable_from(pos)
        if readable != pos:
            logger.log(logging.INFO if self.group_id is None else logging.WARNING,
                       "embedded bus: %s: topic %s offset %d is no longer on disk (retention); "
                       "continuing from offset %d, the earliest one there (%d messages "
                       "skipped)", f"group {self.group_id}" if self.group_id is not None
                       else "reader without a group", topic, pos, readable, readable - pos)
        return readable

    def poll(self, timeout_s: float = 1.0, max_records: int = 100) -> list[Message]:
        if self._closed:
            raise BusError("consumer is closed")
        deadline = time.monotonic() + max(0.0, timeout_s)
        sleep = POLL_SLEEP_MIN_S
        while True:
            self._claim()
            out = self._read_available(max_records)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            time.sleep(min(sleep, remaining))
            sleep = min(sleep * 2, POLL_SLEEP_MAX_S)

    def seek(self, topic: str, offset: int) -> None:
        """Move this member's position on an owned topic (the next poll reads ``offset``)."""
        if topic not in self._positions:
            raise BusError(f"topic {topic} is not assigned to this consumer")
        self._positions[topic] = max(0, offset)

    def positions(self) -> dict[tuple[str, int], int]:
        """The next offset this member will read on each owned topic."""
        return {(t, PARTITION): pos for t, pos in self._positions.items()}

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """The offset after the last complete record of each owned topic, now."""
        return {(t, PARTITION): self._logs[t].refresh() for t in self._positions}

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if self._group_dir is None:
            raise BusError("a consumer without a group cannot commit")
        for (topic, partition), offset in offsets.items():
            if partition != PARTITION or topic not in self._lock_fds:
                raise BusError(f"cannot commit {topic}[{partition}]: not assigned to this "
                               f"member of group {self.group_id}")
            if offset < 0 or offset > self._logs[topic].refresh():
                raise BusError(f"cannot commit offset {offset} on {topic}: out of range")
        by_topic = {topic: offset for (topic, _), offset in offsets.items()}
        if len(by_topic) < 2:
            for topic, offset in by_topic.items():
                self._write_offset(topic, offset)
            return
        intent = self._group_dir / f"commit-{'+'.join(sorted(by_topic))}.json"
        try:
            atomic_write(intent, json.dumps(by_topic).encode())
        except OSError as exc:
            raise BusError(f"embedded bus: commit of {by_topic} for group {self.group_id} "
                           f"failed: {exc}") from exc
        for topic, offset in by_topic.items():
            self._write_offset(topic, offset)
        with contextlib.suppress(OSError):
            intent.unlink()  # a leftover is harmless: it only carries these offsets forward

    def _finish_commits(self, topic: str) -> None:
        """Carry ``topic``'s offset forward to where an interrupted commit of several topics
        put it (module docstring); such a file goes once this member owns all its topics."""
        assert self._group_dir is not None
        for intent in sorted(self._group_dir.glob(COMMIT_INTENT_GLOB)):
            try:
                planned = {str(t): int(o) for t, o in json.loads(intent.read_bytes()).items()}
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                raise BusError(f"embedded bus: commit file {intent} is unreadable: "
                               f"{exc}") from exc
            if topic in planned and planned[topic] > self._committed(topic):
                logger.warning("embedded bus: group %s: a commit of %s was interrupted; topic "
                               "%s committed at offset %d as it intended", self.group_id,
                               ", ".join(sorted(planned)), topic, planned[topic])
                self._write_offset(topic, planned[topic])
            if all(t in self._lock_fds and self._committed(t) >= o for t, o in planned.items()):
                with contextlib.suppress(OSError):
                    intent.unlink()

    def _write_offset(self, topic: str, offset: int) -> None:
        path = self._offset_path(topic)
        data = json.dumps({"group": self.group_id, "topic": topic, "partition": PARTITION,
                           "next_offset": offset,
                           "committed_at_ms": int(time.time() * 1000)}).encode()
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise BusError(f"embedded bus: commit of {topic} offset {offset} for group "
                           f"{self.group_id} failed: {exc}") from exc

    def close(self) -> None:
        self._closed = True
        for fd in self._lock_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock
        self._lock_fds.clear()
        if self._group_dir is not None:
            self._positions.clear()
