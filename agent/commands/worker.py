"""``hust19 worker``: run only the triage worker (and its PACS sender) against the bus, until
SIGINT or SIGTERM. Several workers in one Kafka consumer group share the partitions; the key
(SeriesInstanceUID) keeps a series on one worker."""

from __future__ import annotations

import argparse
from typing import Any

from agent.app import ROLE_WORKER, Agent
from agent.commands.common import add_settings_args, settings_from_args
from agent.commands.serve import run_until_signal

ROLES_WORKER = frozenset({ROLE_WORKER})


def register(sub: Any) -> None:
    parser = sub.add_parser("worker", help="run only the triage worker and the SR sender",
                            description=__doc__)
    add_settings_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    return run_until_signal(Agent(settings, roles=ROLES_WORKER))
