"""The embedded bus: a durable append-only log per topic on the local disk, no server.

It is the default for one edge box. Layout under ``root`` (``data_dir/bus``)::

    topics/<topic>/0.log                  the log of partition 0 (the only partition)
    groups/<group>/<topic>.offset.json    committed next offset of that group on that topic
    groups/<group>/<topic>.lock           held (flock) by the group member that owns the topic

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
  CRC-32C of every record, under the topic's exclusive lock; the first invalid record and
  everything after it (a torn tail) are truncated with a warning, as Kafka does when it
  recovers unflushed segments. Every later append first checks, under the same lock, that the
  file ends where the last complete record ends, so an append never lands after garbage.
* **Several processes on one box.** Appends are whole records written under ``flock``
  (``LOCK_EX``) on the log file, so several producers (ingest outbox, worker) in different
  processes interleave whole records only. Readers take no lock: they index only records whose
  full length is on disk and verify each record's CRC when they read it.
* **Consumer groups.** One member per group owns a topic (an exclusive ``flock`` on the
  group's lock file; another member gets no assignment until the owner closes or dies, like a
  surplus Kafka member on a one-partition topic). Offsets are committed atomically (temporary
  file, fsync, rename, fsync of the directory); a member resumes from the committed offset, so
  messages polled but not committed are delivered again after a restart (at-least-once).
  A consumer with group ``None`` reads every topic from the beginning and never commits.

Message offsets are record indexes (0, 1, 2, ...), kept in an in-memory index per topic so that
a read is one ``pread``. There is one partition, ``0``: scale-out is Kafka's job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import struct
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import crc32c

from agent.bus import Bus, Consumer, Headers, Message, Producer
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

_TOPIC_NAME: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
"""The characters Kafka allows in a topic name; they are also safe as a file name."""


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



class _TopicLog:
    """One topic's log file in this process: the append fd, the record index, the locks.

    ``positions[i]`` is the byte position of record ``i``; ``end`` is the byte after the last
    indexed (complete) record. The thread lock guards the index; ``flock`` guards the file
    against other processes during appends and recovery.
    """

    def __init__(self, topic: str, path: Path) -> None:
        self.topic = topic
        self.path = path
        self.lock = threading.Lock()
        self.positions: array[int] = array("Q")
        self.end = 0
        created = not path.exists()
        if created:
            _makedirs_durable(path.parent)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BusError(f"cannot open the log of topic {topic} at {path}: {exc}") from exc
        if created:
            fsync_dir(path.parent)
        with self.lock, self._file_lock():
            self._scan(recover=True)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _scan(self, *, recover: bool) -> None:
        """Index the complete records after ``end``.

        With ``recover`` (only under the exclusive file lock, when no writer can be mid-record)
        the CRC of each new record is checked and an incomplete or invalid tail is truncated.
        Without it (a reader beside live writers) only lengths are checked and the scan stops
        at the first record not yet fully on disk.
        """
        size = os.fstat(self.fd).st_size
        pos = self.end
        problem = ""
        while pos < size:
            if pos + _FRAME.size > size:
                problem = "incomplete record frame"
                break
            frame = os.pread(self.fd, _FRAME.size, pos)
            magic, version, length, crc = _FRAME.unpack(frame)
            if magic != RECORD_MAGIC or version != FORMAT_VERSION or length > MAX_RECORD_BYTES:
                problem = "invalid record frame"
                break
            if pos + _FRAME.size + length > size:
                problem = "incomplete record"
                break
            if recover:
                body = os.pread(self.fd, length, pos + _FRAME.size)
                if crc32c.crc32c(body) != crc:
                    problem = "CRC-32C mismatch"
                    break
            self.positions.append(pos)
            pos += _FRAME.size + length
        self.end = pos
        if recover and pos < size:
            logger.warning("embedded bus: topic %s: %s at byte %d of %s; truncating %d bytes "
                           "(a write interrupted by a crash); %d records kept",
                           self.topic, problem, pos, self.path, size - pos, len(self.positions))
            os.ftruncate(self.fd, pos)
            os.fsync(self.fd)

    def append(self, frames: Sequence[tuple[bytes, bytes]]) -> None:
        """Append whole records, after making sure the file ends at a record boundary."""
        with self.lock:
            self._check_open()
            self._append_locked(frames)

    def _append_locked(self, frames: Sequence[tuple[bytes, bytes]]) -> None:
        with self._file_lock():
            try:
                self._scan(recover=True)
                for frame, body in frames:
                    write_all(self.fd, (frame, body))
                    self.positions.append(self.end)
                    self.end += len(frame) + len(body)
            except OSError as exc:
                # A partial record may be on disk; the next append (or open) truncates it.
                raise BusError(f"embedded bus: append to topic {self.topic} failed: {exc}") \
                    from exc

    def refresh(self) -> int:
        """Index records other processes appended; return the number of records."""
        with self.lock:
            self._check_open()
            try:
                self._scan(recover=False)
            except OSError as exc:
                raise BusError(f"embedded bus: cannot read the log of topic {self.topic}: "
                               f"{exc}") from exc
            return len(self.positions)

    def _check_open(self) -> None:
        # A closed descriptor number may be reused by another file: never touch it again.
        if self.fd < 0:
            raise BusError(f"embedded bus: topic {self.topic} is closed")

    def count(self) -> int:
        with self.lock:
            return len(self.positions)

    def read(self, offset: int) -> Message:
        """The record at ``offset`` (which must be indexed), CRC-checked."""
        with self.lock:
            self._check_open()
            pos = self.positions[offset]
            try:
                frame = os.pread(self.fd, _FRAME.size, pos)
                _magic, _version, length, crc = _FRAME.unpack(frame)
                body = os.pread(self.fd, length, pos + _FRAME.size)
            except OSError as exc:
                raise BusError(f"embedded bus: read of topic {self.topic} record {offset} "
                               f"failed: {exc}") from exc
        if len(body) != length or crc32c.crc32c(body) != crc:
            raise BusError(f"embedded bus: topic {self.topic} record {offset} at byte {pos} of "
                           f"{self.path} is corrupt (CRC-32C mismatch)")
        try:
            ts, key, headers, value = decode_body(body)
        except ValueError as exc:
            raise BusError(f"embedded bus: topic {self.topic} record {offset} is malformed: "
                           f"{exc}") from exc
        return Message(self.topic, PARTITION, offset, key, value, headers, ts)

    def fsync(self) -> None:
        with self.lock:
            self._check_open()
            fd = self.fd
        try:
            os.fsync(fd)
        except OSError as exc:
            raise BusError(f"embedded bus: fsync of topic {self.topic} failed: {exc}") from exc

    def close(self) -> None:
        with self.lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class EmbeddedBus(Bus):
    """The embedded durable log under ``root``; see the module docstring for the guarantees."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            _makedirs_durable(self.root / "topics")
            _makedirs_durable(self.root / "groups")
        except OSError as exc:
            raise BusError(f"embedded bus: cannot create {self.root}: {exc}") from exc
        self._logs: dict[str, _TopicLog] = {}
        self._lock = threading.Lock()
        self._closed = False

    def topic_path(self, topic: str) -> Path:
        """The log file of ``topic`` (partition 0)."""
        _check_topic(topic)
        return self.root / "topics" / topic / f"{PARTITION}.log"

    def topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` has a log here (without creating it)."""
        return self.topic_path(topic).is_file()

    def topics(self) -> list[str]:
        """The topics that have a log here, sorted."""
        base = self.root / "topics"
        return sorted(p.parent.name for p in base.glob(f"*/{PARTITION}.log"))

    def log(self, topic: str) -> _TopicLog:
        """This process's handle on ``topic``'s log, created (and recovered) on first use."""
        path = self.topic_path(topic)
        with self._lock:
            if self._closed:
                raise BusError("embedded bus is closed")
            log = self._logs.get(topic)
            if log is None:
                log = self._logs[topic] = _TopicLog(topic, path)
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
        return (f"embedded durable log at {self.root.resolve()} (one box, one partition per "
                f"topic, fsync on flush, at-least-once; point --bus at Kafka to scale out)")

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
            pos = self._positions[topic]
            while pos < count and len(out) < max_records:
                out.append(log.read(pos))
                pos += 1
            self._positions[topic] = pos
            if len(out) >= max_records:
                break
        return out

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
            self._write_offset(topic, offset)

    def _write_offset(self, topic: str, offset: int) -> None:
        path = self._offset_path(topic)
        data = json.dumps({"topic": topic, "partition": PARTITION, "next_offset": offset,
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
