"""Run the whole agent in one process: the DICOM listener, the spool, the outbox to the bus,
series completion, the triage worker and the PACS sender (the embedded bus and a SQLite LIS by
default), until SIGINT or SIGTERM, then stop cleanly.

Every setting can be given as a flag (below), as a HUST19_* environment variable or in the
--config file; 'hust19 config example' prints every setting with its flag and variable.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.app import ALL_ROLES, Agent
from agent.cli.commands.common import add_settings_args, run_until_signal, settings_from_args
from agent.ingest.allocator import tune_for_large_buffers


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
        return run_until_signal(Agent(settings, roles=roles), "agent")

    parser.set_defaults(func=run)
