"""The bus named by a URL: ``embedded`` or ``kafka://...`` (:func:`open_bus`).

The implementations are imported here, when one is asked for (kafka-python only for a Kafka
bus), and never import this module: the interface is ``agent.bus.interface``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.bus.interface import Bus
from schemas.errors import ConfigError


def open_bus(url: str, data_dir: Path, *, compression: str = "none",
             retention_h: float = 0.0, kafka_client: Mapping[str, Any] | None = None) -> Bus:
    """The bus named by ``url``: ``embedded`` (under ``data_dir/bus``) or
    ``kafka://host:port[,host:port...]``. Raises :class:`schemas.errors.ConfigError` for
    anything else.

    ``retention_h`` is the embedded log's retention (0 = keep for ever; the agent passes
    ``Settings.bus_retention_h``); on Kafka the topics' own configuration owns retention and
    it is ignored. ``compression`` and ``kafka_client`` (kafka-python settings, e.g.
    ``Settings.kafka_client_settings``) apply to Kafka only."""
    if url == "embedded":
        from agent.bus.embedded import EmbeddedBus

        return EmbeddedBus(data_dir / "bus", retention_h=retention_h)
    if url.startswith("kafka://"):
        from agent.bus.kafka import KafkaBus

        servers = [s for s in url.removeprefix("kafka://").split(",") if s]
        if not servers:
            raise ConfigError(f"bus URL {url!r} names no broker")
        return KafkaBus(servers, compression=compression, **dict(kafka_client or {}))
    raise ConfigError(f"bus URL {url!r}: expected 'embedded' or 'kafka://host:port'")
