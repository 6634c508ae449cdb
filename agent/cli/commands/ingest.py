"""``hust19 ingest``: run only the ingest role (DICOM listener, spool, outbox to the bus,
series completion) until SIGINT or SIGTERM. Used to scale out with Kafka: several ingest
nodes and, separately, workers."""

from __future__ import annotations

from typing import Any

from agent.app import ROLE_INGEST
from agent.cli.commands.serve import register_roles


def register(sub: Any) -> None:
    register_roles(sub, "ingest", frozenset({ROLE_INGEST}),
                   "run only the DICOM listener and its outbox", __doc__)
