"""The Kafka bus: Apache Kafka (or any Kafka-protocol broker) through kafka-python.

Producer: ``acks="all"``, idempotent, keyed (the default partitioner hashes the key, so one
series stays on one partition and in order), ``compression_type`` from the settings,
``max_request_size`` :data:`MAX_MESSAGE_BYTES` (64 MiB: an enhanced multi-frame CT instance can
be tens of MB; the brokers' ``message.max.bytes`` / topics' ``max.message.bytes`` and
``replica.fetch.max.bytes`` must be raised to match, see docs/operations.md, the bus) and
unlimited retries within ``delivery_timeout_ms``. :meth:`KafkaProducerAdapter.flush` waits for every
acknowledgement and raises :class:`BusError` if any send failed.

Consumer: ``enable_auto_commit=False``, ``auto_offset_reset="earliest"``; offsets are committed
only by :meth:`KafkaConsumerAdapter.commit` (after the work is done: at-least-once). With group
``None`` the consumer assigns itself every partition of the topics and reads from the beginning
(the ``bus dump`` mode).

Group settings for the edge (:data:`EDGE_GROUP_SETTINGS`): session timeout 6 s, heartbeat
0.5 s, max poll interval 30 s, kafka-python's eager assignors (range, round robin). kafka-python's
defaults (45 s session) made a dead worker's series wait 69 s and a joining worker stall the
others 24 s (issue 20); measured with the test broker (``bench/kafka_group.py``): failover
9.3-10.2 s, join stall 3.1-3.2 s. kafka-python 3 also offers incremental cooperative
rebalancing (``cooperative-sticky``, KIP-429) and static membership (``group_instance_id``,
KIP-345); with the test broker the first stalled members up to 11 s on a join and a killed
static member's partitions were not reassigned within 60 s, so the eager protocol is used and
static membership is opt-in (``Settings.kafka_instance_id``), not measured on Apache Kafka.
The agent passes its settings (``Settings.kafka_client_settings``) through :func:`open_bus`.

Client settings. Any kafka-python setting may be passed as a keyword argument
(``KafkaBus(servers, session_timeout_ms=6000)``); it goes to every client (producer, consumer,
admin) that knows it. The group timeouts can also be set by environment variable:
``HUST19_KAFKA_SESSION_TIMEOUT_MS``, ``HUST19_KAFKA_HEARTBEAT_INTERVAL_MS``,
``HUST19_KAFKA_MAX_POLL_INTERVAL_MS``, ``HUST19_KAFKA_REQUEST_TIMEOUT_MS`` (keyword arguments win).

Idempotence: the producer is idempotent (``enable_idempotence``: the broker assigns it a
producer id, :attr:`KafkaProducerAdapter.producer_id`, and drops a batch it retries after a lost
acknowledgement). This holds within one producer: the outbox makes a new producer after a bus
failure and re-sends what was not marked published, so a consumer still deduplicates by SOP
Instance UID.
Topic creation uses ``HUST19_KAFKA_PARTITIONS`` (default :data:`DEFAULT_PARTITIONS`) and
``HUST19_KAFKA_REPLICATION_FACTOR`` (default ``-1``: the broker's default).

Every ``kafka.errors`` exception is translated into :class:`schemas.errors.BusError` here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.record import util as record_util
from kafka.structs import OffsetAndMetadata

from agent.bus.interface import Bus, Consumer, Headers, Message, Producer
from agent.config import (
    KAFKA_HEARTBEAT_INTERVAL_MS,
    KAFKA_MAX_POLL_INTERVAL_MS,
    KAFKA_SESSION_TIMEOUT_MS,
)
from schemas.errors import BusError, ConfigError

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""Largest produced request / fetched partition batch (64 MiB)."""

DEFAULT_PARTITIONS: Final = 6
"""Partitions of a topic created by :meth:`KafkaBus.ensure_topics` (the unit of worker
parallelism: more workers than partitions sit idle)."""

BROKER_DEFAULT: Final = -1
"""``replication_factor`` / ``num_partitions`` value meaning "the broker's default"."""

CLOSE_TIMEOUT_S: Final = 10.0
RECENT_TIMEOUT_S: Final = 10.0
"""How long :meth:`KafkaBus.recent` reads at most."""
"""How long closing a producer waits for its pending messages to be acknowledged."""

COMPRESSIONS: Final = ("none", "gzip", "snappy", "lz4", "zstd")

EDGE_GROUP_SETTINGS: Final = {
    "session_timeout_ms": KAFKA_SESSION_TIMEOUT_MS,
    "heartbeat_interval_ms": KAFKA_HEARTBEAT_INTERVAL_MS,
    "max_poll_interval_ms": KAFKA_MAX_POLL_INTERVAL_MS,
}
"""The consumer-group settings used unless told otherwise (see the module docstring)."""

ENV_PREFIX: Final = "HUST19_KAFKA_"
ENV_CLIENT_SETTINGS: Final = ("session_timeout_ms", "heartbeat_interval_ms",
                              "max_poll_interval_ms", "request_timeout_ms")
"""Client settings that may come from ``HUST19_KAFKA_<NAME>`` (integers, milliseconds)."""

_PRODUCER_KEYS: Final = frozenset(KafkaProducer.DEFAULT_CONFIG)
_CONSUMER_KEYS: Final = frozenset(KafkaConsumer.DEFAULT_CONFIG)
_ADMIN_KEYS: Final = frozenset(KafkaAdminClient.DEFAULT_CONFIG)
_OWN_KEYS: Final = frozenset({"bootstrap_servers", "group_id", "enable_auto_commit",
                              "key_serializer", "value_serializer", "key_deserializer",
                              "value_deserializer"})


def crc32c_is_native() -> bool:
    """Whether kafka-python computes record CRC-32C with the C ``crc32c`` package (it falls
    back to a slow pure-Python loop when that package is missing)."""
    return bool(getattr(record_util, "crc32c_c", None) is not None
                and record_util._crc32c is record_util.crc32c_c)


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    """Turn kafka-python's exceptions (and socket errors) into :class:`BusError`."""
    try:
        yield
    except BusError:
        raise
    except KafkaError as exc:
        text = str(exc)
        name = type(exc).__name__
        raise BusError(f"Kafka: {what}: {text if text.startswith(name) else f'{name}: {text}'}") \
            from exc
    except (OSError, ValueError, AssertionError) as exc:
        raise BusError(f"Kafka: {what}: {exc}") from exc


def _env_overrides(environ: Mapping[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in ENV_CLIENT_SETTINGS:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None or raw == "":
            continue
        try:
            out[name] = int(raw)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not an integer") from exc
    return out


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not an integer") from exc


class KafkaBus(Bus):
    """Kafka through kafka-python; see the module docstring for the settings used."""

    def __init__(self, servers: list[str], compression: str = "none", *,
                 environ: Mapping[str, str] | None = None, **client_overrides: Any) -> None:
        if not servers:
            raise ConfigError("Kafka bus: no bootstrap server given")
        if compression not in COMPRESSIONS:
            raise ConfigError(f"Kafka compression {compression!r}: expected one of "
                              f"{', '.join(COMPRESSIONS)}")
        env = os.environ if environ is None else environ
        overrides: dict[str, Any] = {**_env_overrides(env), **client_overrides}
        unknown = set(overrides) - (_PRODUCER_KEYS | _CONSUMER_KEYS | _ADMIN_KEYS)
        forbidden = set(overrides) & _OWN_KEYS
        if unknown or forbidden:
            raise ConfigError(f"Kafka bus: unusable client settings "
                              f"{sorted(unknown | forbidden)}")
        self.servers = list(servers)
        self.compression = compression
        self.partitions = _env_int(env, "PARTITIONS", DEFAULT_PARTITIONS)
        self.replication_factor = _env_int(env, "REPLICATION_FACTOR", BROKER_DEFAULT)
        self._overrides = overrides
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()
        if not crc32c_is_native():
            logger.warning("kafka-python computes CRC-32C in pure Python (slow): install the "
                           "'crc32c' package")

    # -- client configuration --------------------------------------------------------------
    def _config(self, keys: frozenset[str], base: dict[str, Any]) -> dict[str, Any]:
        cfg = {"bootstrap_servers": self.servers, **base}
        cfg.update({k: v for k, v in self._overrides.items() if k in keys})
        return cfg

    def producer_config(self) -> dict[str, Any]:
        """The keyword arguments given to ``KafkaProducer``."""
        return self._config(_PRODUCER_KEYS, {
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": None if self.compression == "none" else self.compression,
            "max_request_size": MAX_MESSAGE_BYTES,
            "linger_ms": 5,
        })

    def consumer_config(self, group_id: str | None) -> dict[str, Any]:
        """The keyword arguments given to ``KafkaConsumer``."""
        return self._config(_CONSUMER_KEYS, {
            **EDGE_GROUP_SETTINGS,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
            "fetch_max_bytes": MAX_MESSAGE_BYTES,
        })

    def _admin_client(self, timeout_s: float | None = None) -> KafkaAdminClient:
        with self._lock:
            if self._admin is None:
                base: dict[str, Any] = {}
                if timeout_s is not None:
                    base["bootstrap_timeout_ms"] = int(timeout_s * 1000)
                with _translate(f"cannot reach the brokers {','.join(self.servers)}"):
                    self._admin = KafkaAdminClient(**self._config(_ADMIN_KEYS, base))
            return self._admin

    # -- Bus -------------------------------------------------------------------------------
    def producer(self) -> KafkaProducerAdapter:
        with _translate(f"cannot create a producer for {','.join(self.servers)}"):
            return KafkaProducerAdapter(KafkaProducer(**self.producer_config()))

    def consumer_group_settings(self) -> dict[str, Any]:
        """The group settings a member of this bus uses (for the startup log)."""
        cfg = self.consumer_config("group")
        return {k: cfg[k] for k in (*EDGE_GROUP_SETTINGS, "group_instance_id") if k in cfg}

    def consumer(self, group_id: str | None, topics: Sequence[str]) -> KafkaConsumerAdapter:
        if not topics:
            raise BusError("a consumer needs at least one topic")
        with _translate(f"cannot create a consumer for {','.join(self.servers)}"):
            consumer = KafkaConsumer(**self.consumer_config(group_id))
        try:
            with _translate(f"cannot subscribe to {', '.join(topics)}"):
                if group_id is not None:
                    consumer.subscribe(list(topics))
                else:
                    parts = [TopicPartition(t, p) for t in topics
                             for p in sorted(self._partitions(t))]
                    consumer.assign(parts)
                    consumer.seek_to_beginning(*parts)
        except BusError:
            consumer.close()
            raise
        return KafkaConsumerAdapter(consumer, group_id)

    def _partitions(self, topic: str) -> list[int]:
        described = self.describe_topic(topic)
        if described is None:
            raise BusError(f"Kafka: topic {topic} does not exist")
        return described

    def describe_topic(self, topic: str) -> list[int] | None:
        """The partition ids of ``topic``, or ``None`` if the brokers do not know it."""
        admin = self._admin_client()
        with _translate(f"cannot describe topic {topic}"):
            if topic not in admin.list_topics():
                return None
            for t in admin.describe_topics([topic]):
                if t["name"] == topic:
                    return [int(p["partition_index"]) for p in t["partitions"]]
        return None

    def topic_exists(self, topic: str) -> bool:
        """Whether the brokers know ``topic``."""
        return self.describe_topic(topic) is not None

    def ensure_topics(self, topics: Sequence[str], num_partitions: int | None = None) -> None:
        """Create the missing topics (``num_partitions`` default: ``self.partitions``)."""
        admin = self._admin_client()
        with _translate("cannot list topics"):
            existing = set(admin.list_topics())
        for topic in topics:
            if topic in existing:
                continue
            spec = {topic: {"num_partitions": num_partitions or self.partitions,
                            "replication_factor": self.replication_factor}}
            try:
                with _translate(f"cannot create topic {topic}"):
                    admin.create_topics(spec, wait_for_metadata=True)
                logger.info("Kafka: created topic %s (%d partitions)", topic,
                            num_partitions or self.partitions)
            except BusError as exc:
                if isinstance(exc.__cause__, TopicAlreadyExistsError):
                    continue
                raise

    def recent(self, topic: str, count: int) -> list[Message]:
        """The newest ``count`` records of each partition of ``topic`` (a consumer without
        group, seeking back from the log ends); ``[]`` if the topic does not exist."""
        if count <= 0 or not self.topic_exists(topic):
            return []
        with _translate(f"cannot read the newest records of {topic}"):
            consumer = KafkaConsumer(**self.consumer_config(None))
            try:
                parts = [TopicPartition(topic, p) for p in self._partitions(topic)]
                consumer.assign(parts)
                ends = consumer.end_offsets(parts)
                starts = consumer.beginning_offsets(parts)
                for tp in parts:
                    consumer.seek(tp, max(starts[tp], ends[tp] - count))
                out: list[Message] = []
                deadline = time.monotonic() + RECENT_TIMEOUT_S
                while any(consumer.position(tp) < ends[tp] for tp in parts) \
                        and time.monotonic() < deadline:
                    for tp, records in consumer.poll(timeout_ms=500).items():
                        out += [Message(tp.topic, tp.partition, r.offset, r.key,
                                        r.value or b"", [(k, bytes(v or b""))
                                                         for k, v in (r.headers or [])],
                                        int(r.timestamp)) for r in records]
                return out
            finally:
                consumer.close(autocommit=False)

    def ping(self, timeout_s: float = 5.0) -> None:
        """A metadata request to the brokers; ``BusError`` if none answers."""
        admin = self._admin_client(timeout_s)
        with _translate(f"brokers {','.join(self.servers)} do not answer"):
            admin.list_topics()

    def describe(self) -> str:
        group = self.consumer_group_settings()
        static = group.get("group_instance_id")
        return (f"Kafka at {','.join(self.servers)} (acks=all, idempotent producer, "
                f"compression {self.compression}, manual commits, at-least-once; group "
                f"session {group['session_timeout_ms']} ms, heartbeat "
                f"{group['heartbeat_interval_ms']} ms, max poll interval "
                f"{group['max_poll_interval_ms']} ms"
                f"{f', static member {static}' if static else ''})")

    def close(self) -> None:
        with self._lock:
            admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(KafkaError, OSError):
                admin.close()


class KafkaProducerAdapter(Producer):
    """A ``KafkaProducer`` that remembers its pending sends so that :meth:`flush` can report
    any that failed."""

    def __init__(self, producer: KafkaProducer) -> None:
        self._producer = producer
        self._pending: list[Any] = []
        self._lock = threading.Lock()

    @property
    def producer_id(self) -> int | None:
        """The idempotent producer id the broker assigned (``None`` before the first send,
        or if the producer is not idempotent)."""
        manager = getattr(self._producer, "_transaction_manager", None)
        pid = getattr(getattr(manager, "producer_id_and_epoch", None), "producer_id", None)
        return int(pid) if isinstance(pid, int) and pid >= 0 else None

    def send(self, topic: str, key: bytes | None, value: bytes,
             headers: Headers | None = None) -> None:
        with _translate(f"cannot send to topic {topic}"):
            future = self._producer.send(topic, key=key, value=value,
                                         headers=list(headers or []))
        with self._lock:
            self._pending.append(future)

    def flush(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        with _translate(f"flush did not finish within {timeout_s} s"):
            self._producer.flush(timeout=timeout_s)
        failed = [f for f in pending if not f.is_done or f.failed()]
        if failed:
            first = failed[0]
            cause = first.exception if first.is_done else None
            err = BusError(f"Kafka: {len(failed)} of {len(pending)} messages were not "
                           f"acknowledged: {type(cause).__name__}: {cause}")
            if isinstance(cause, BaseException):
                raise err from cause
            raise err

    def close(self) -> None:
        """Flush (for up to :data:`CLOSE_TIMEOUT_S`), then close; if the flush failed, the
        undelivered messages are abandoned at once and the ``BusError`` is raised."""
        try:
            self.flush(CLOSE_TIMEOUT_S)
        except BusError:
            self._close_client(0.0)
            raise
        self._close_client(CLOSE_TIMEOUT_S)

    def _close_client(self, timeout_s: float) -> None:
        if timeout_s == 0.0:
            # kafka-python's close() flushes first and raises on a timeout without closing,
            # so its __del__ would raise again later: abandon the unsent batches first.
            accumulator = getattr(self._producer, "_accumulator", None)
            if accumulator is not None:
                with contextlib.suppress(Exception):
                    accumulator.abort_incomplete_batches()
        with contextlib.suppress(KafkaError, OSError):
            self._producer.close(timeout=timeout_s)


class KafkaConsumerAdapter(Consumer):
    """A ``KafkaConsumer`` returning :class:`agent.bus.interface.Message` objects."""

    def __init__(self, consumer: KafkaConsumer, group_id: str | None) -> None:
        self._consumer = consumer
        self.group_id = group_id

    def poll(self, timeout_s: float = 1.0, max_records: int = 100) -> list[Message]:
        with _translate("poll failed"):
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000),
                                          max_records=max_records)
        out: list[Message] = []
        for tp, records in batches.items():
            for r in records:
                headers: Headers = [(k, bytes(v or b"")) for k, v in (r.headers or [])]
                out.append(Message(tp.topic, tp.partition, r.offset, r.key,
                                   r.value if r.value is not None else b"", headers,
                                   int(r.timestamp)))
        return out

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if self.group_id is None:
            raise BusError("a consumer without a group cannot commit")
        request = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                   for (t, p), o in offsets.items()}
        with _translate(f"commit of {len(request)} offsets for group {self.group_id} failed"):
            self._consumer.commit(request)

    def positions(self) -> dict[tuple[str, int], int]:
        """The next offset this member will read on each assigned partition."""
        with _translate("positions"):
            return {(tp.topic, tp.partition): int(self._consumer.position(tp))
                    for tp in self._consumer.assignment()}

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """The log-end offset of each assigned partition, now."""
        with _translate("end offsets"):
            ends = self._consumer.end_offsets(list(self._consumer.assignment()))
            return {(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    def assignment(self) -> set[tuple[str, int]]:
        with _translate("assignment"):
            return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def close(self) -> None:
        with contextlib.suppress(KafkaError, OSError):
            self._consumer.close(autocommit=False)
