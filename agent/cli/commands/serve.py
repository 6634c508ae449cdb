"""``hust19 serve``: run the whole agent in one process (DICOM listener, spool, outbox,
series completion, triage worker, PACS sender; embedded bus and SQLite LIS by default) until
SIGINT or SIGTERM, then stop cleanly.

The flags are the shared settings flags (:mod:`agent.cli.commands.common`), a public contract:
``--data-dir``, ``--port``, ``--ae-title``, ``--allow-ae`` (repeatable), ``--bus``...
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from agent.app import ALL_ROLES, Agent
from agent.cli.commands.common import add_settings_args, settings_from_args
from agent.ingest.allocator import tune_for_large_buffers

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    register_roles(sub, "serve", ALL_ROLES, "run the agent: DICOM listener, bus, worker, SR",
                   __doc__)


def register_roles(sub: Any, name: str, roles: frozenset[str], help_text: str,
                   description: str | None) -> None:
    """A command that runs the agent with ``roles`` until SIGINT/SIGTERM, taking the shared
    settings flags (``serve``, ``ingest``, ``worker``)."""
    parser = sub.add_parser(name, help=help_text, description=description)
    add_settings_args(parser)

    def run(args: argparse.Namespace) -> int:
        settings = settings_from_args(args)
        tune_for_large_buffers()
        return run_until_signal(Agent(settings, roles=roles))

    parser.set_defaults(func=run)


def run_until_signal(agent: Agent) -> int:
    """Start ``agent``, block until SIGINT/SIGTERM, stop it; returns the exit status."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        agent.start()
        logger.info("agent running (pid %d); stop with Ctrl-C or SIGTERM",
                    os.getpid())
        while not stop.wait(1.0):
            pass
        logger.info("received %s: stopping", signal.Signals(received[0]).name)
    finally:
        agent.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0

