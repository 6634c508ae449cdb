"""``hust19 ingest``: run only the ingest role (DICOM listener, spool, outbox to the bus,
series completion) until SIGINT or SIGTERM. Used to scale out with Kafka: several ingest
nodes and, separately, workers."""

from __future__ import annotations

import argparse
from typing import Any

from agent.app import ROLE_INGEST, Agent
from agent.commands.common import add_settings_args, settings_from_args
from agent.commands.serve import run_until_signal

ROLES_INGEST = frozenset({ROLE_INGEST})


def register(sub: Any) -> None:
    parser = sub.add_parser("ingest", help="run only the DICOM listener and its outbox",
                            description=__doc__)
    add_settings_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    return run_until_signal(Agent(settings, roles=ROLES_INGEST))
