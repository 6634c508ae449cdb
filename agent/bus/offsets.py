"""Which offsets a consumer may commit: only those below every message whose work is still
unfinished.

The worker consumes instances of many series interleaved on one partition and finishes a
series only when it completes, so finished work is not a prefix of what was read. The safe
commit point of a partition is the lowest offset still in flight, or one past the last read
offset when nothing is in flight. A crash then redoes the unfinished series (and possibly some
finished ones after it, which is harmless: outputs are idempotent).
"""

from __future__ import annotations

from collections import defaultdict

TopicPartition = tuple[str, int]


class OffsetTracker:
    """Tracks read and in-flight offsets per (topic, partition)."""

    def __init__(self) -> None:
        self._inflight: dict[TopicPartition, set[int]] = defaultdict(set)
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def read(self, tp: TopicPartition, offset: int, *, in_flight: bool = True) -> None:
        """Record that ``offset`` was read; ``in_flight`` until :meth:`done` is called."""
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        if in_flight:
            self._inflight[tp].add(offset)

    def done(self, tp: TopicPartition, offsets: set[int] | list[int]) -> None:
        """The work of these offsets is finished (outputs stored and sent)."""
        self._inflight[tp].difference_update(offsets)

    def forget(self, tp: TopicPartition) -> None:
        """The partition was revoked: its uncommitted work goes to the new owner."""
        self._inflight.pop(tp, None)
        self._next.pop(tp, None)
        self._committed.pop(tp, None)

    def committable(self) -> dict[TopicPartition, int]:
        """Partitions whose safe commit point moved since the last :meth:`mark_committed`."""
        out = {}
        for tp, nxt in self._next.items():
            pending = self._inflight.get(tp)
            point = min(pending) if pending else nxt
            if point > self._committed.get(tp, -1):
                out[tp] = point
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def in_flight_count(self) -> int:
        """Messages read whose work is not finished (the worker's own lag)."""
        return sum(len(s) for s in self._inflight.values())
