"""Run only the triage worker (and its PACS sender) against the bus, until SIGINT or SIGTERM.
Several workers in one Kafka consumer group share the partitions; the key (the Series Instance
UID) keeps a series on one worker. It takes the settings flags of 'hust19 serve'."""

from __future__ import annotations

from typing import Any

from agent.app import ROLE_WORKER
from agent.cli.commands.serve import register_roles


def register(sub: Any) -> None:
    register_roles(sub, "worker", frozenset({ROLE_WORKER}),
                   "run only the triage worker and the SR sender", __doc__)
