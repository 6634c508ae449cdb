"""Run only the ingest role (the DICOM listener, the spool, the outbox to the bus and series
completion) until SIGINT or SIGTERM. Used to scale out with Kafka: several ingest nodes and,
separately, workers. It takes the settings flags of 'hust19 serve'."""

from __future__ import annotations

from typing import Any

from agent.app import ROLE_INGEST
from agent.cli.commands.serve import register_roles


def register(sub: Any) -> None:
    register_roles(sub, "ingest", frozenset({ROLE_INGEST}),
                   "run only the DICOM listener and its outbox", __doc__)
