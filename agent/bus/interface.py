"""The message bus interface: one small interface, two implementations.

* ``agent.bus.embedded``: a durable append-only log in ``data_dir/bus`` for one box (no
  server; survives restarts; consumer-group offsets on disk; several processes on the same
  box may read while one writes).
* ``agent.bus.kafka``: Apache Kafka through kafka-python (``acks=all``, keyed messages,
  configurable compression, consumer groups).

Both implement the classes below and import this module; ``agent.bus.factory.open_bus``
chooses one from the bus URL. Nothing here imports an implementation.

Delivery guarantee for both: at-least-once. A producer's :meth:`Producer.flush` returns only
when every message sent before it is durably stored (fsync'd / acknowledged by all in-sync
replicas); a consumer's position is committed only by :meth:`Consumer.commit`, which callers
invoke after the work for those messages is finished.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Message:
    """One record as read from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers = field(default_factory=list)
    timestamp_ms: int = 0

    def header(self, name: str) -> str | None:
        """The first header called ``name`` decoded as UTF-8, or ``None``."""
        for k, v in self.headers:
            if k == name:
                return v.decode("utf-8", "replace")
        return None


class Producer(ABC):
    """Sends keyed messages. Not durable until :meth:`flush` returns."""

    @abstractmethod
    def send(self, topic: str, key: bytes | None, value: bytes,
             headers: Headers | None = None) -> None:
        """Queue one message; raises :class:`schemas.errors.BusError` if it cannot be queued."""

    @abstractmethod
    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued message is durably stored; raise ``BusError`` if not."""

    @abstractmethod
    def close(self) -> None:
        """Flush what can be flushed and release resources."""


class Consumer(ABC):
    """Reads topics as a member of a consumer group (or, with group ``None``, everything from
    the beginning without committing: the ``bus dump`` mode)."""

    @abstractmethod
    def poll(self, timeout_s: float = 1.0, max_records: int = 100) -> list[Message]:
        """Return up to ``max_records`` messages, waiting up to ``timeout_s`` for the first."""

    @abstractmethod
    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit ``(topic, partition) -> next offset to read`` for this group."""

    @abstractmethod
    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition) pairs this member currently owns."""

    @abstractmethod
    def positions(self) -> dict[tuple[str, int], int]:
        """The next offset this member will read on each owned partition."""

    @abstractmethod
    def end_offsets(self) -> dict[tuple[str, int], int]:
        """The log-end offset of each owned partition, now (a broker round trip on Kafka)."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group and release resources (commits nothing by itself)."""


def read_to_end(consumer: Consumer, *, poll_timeout_s: float, max_records: int,
                follow: bool = False) -> Iterator[list[Message]]:
    """The batches ``consumer`` polls (empty ones too, so that a caller can watch the clock)
    until it has read everything that was on its partitions when this started; with
    ``follow``, until the caller stops iterating."""
    end = consumer.end_offsets()
    while True:
        batch = consumer.poll(poll_timeout_s, max_records)
        yield batch
        if not follow and not batch:
            positions = consumer.positions()
            if all(positions.get(tp, 0) >= offset for tp, offset in end.items()):
                return


class Bus(ABC):
    """A bus connection factory. ``describe()`` goes into the startup log."""

    @abstractmethod
    def producer(self) -> Producer: ...

    @abstractmethod
    def consumer(self, group_id: str | None, topics: Sequence[str]) -> Consumer: ...

    @abstractmethod
    def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics if missing (a no-op where the bus creates them on first use)."""

    @abstractmethod
    def topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` exists now (nothing is created)."""

    @abstractmethod
    def ping(self, timeout_s: float = 5.0) -> None:
        """Raise ``BusError`` if the bus cannot be reached now."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the startup log: which bus, where, with what guarantees."""

    def recent(self, topic: str, count: int) -> list[Message]:
        """Up to ``count`` of the newest messages of each partition of ``topic``: what a
        producer that stopped between its flush and its own bookkeeping may have written
        (the outbox checks it at start, so that it does not publish those again). ``[]``
        where the bus cannot tell; then delivery stays at-least-once."""
        return []

    def close(self) -> None:
        """Release shared resources."""
