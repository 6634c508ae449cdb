"""The change feed: the consumer thread (and acknowledgements) say "the worklist changed"; every
open live page (server-sent events, one asyncio task each) wakes up and refetches its view.

A change is a number that only grows (``version``); a waiting page compares it with the one it
has seen, so a burst of changes while a page refetches costs one more refetch, never a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class ChangeFeed:
    """Thread-safe producer side, asyncio consumer side (bound to one event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop of the web server (called from that loop)."""
        with self._lock:
            self._loop = loop
            self._event = asyncio.Event()

    def publish(self) -> int:
        """Record a change and wake the waiting pages; callable from any thread."""
        with self._lock:
            self._version += 1
            version, loop = self._version, self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed since the check
                loop.call_soon_threadsafe(self._wake)
        return version

    def close(self) -> None:
        """Wake every waiting page for good (the server is stopping)."""
        with self._lock:
            self._closed = True
            loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        event = self._event
        self._event = asyncio.Event()
        if event is not None:
            event.set()

    async def wait(self, seen: int, timeout_s: float) -> int:
        """Wait until the version passes ``seen``, the feed closes, or ``timeout_s``; returns
        the version now."""
        while True:
            with self._lock:
                version, closed, event = self._version, self._closed, self._event
            if version != seen or closed or event is None:
                return version
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                return self.version
