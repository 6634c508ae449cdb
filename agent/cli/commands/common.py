"""Flags shared by the commands that run or inspect the agent (serve, ingest, worker, doctor,
bus dump): each maps onto a :class:`agent.config.Settings` field."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from agent.cli.logs import setup_logging
from agent.config import Settings, load_settings


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    """The public flags of ``hust19 serve`` and its siblings (a contract: do not rename)."""
    g = parser.add_argument_group("settings (flags override HUST19_* env, which overrides "
                                  "--config)")
    g.add_argument("--config", type=Path, help="TOML settings file")
    g.add_argument("--data-dir", type=Path, help="spool, embedded bus, outbox, SQLite LIS")
    g.add_argument("--host", help="address the DICOM listener binds to")
    g.add_argument("--port", type=int, help="DICOM listener port")
    g.add_argument("--ae-title", help="the agent's AE title")
    g.add_argument("--allow-ae", action="append", metavar="AET",
                   help="calling AE allowed to send (repeatable)")
    g.add_argument("--tls-cert", type=Path, help="PEM certificate: DICOM over TLS")
    g.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    g.add_argument("--tls-ca", type=Path, help="CA bundle: require client certificates")
    g.add_argument("--bus", help="'embedded' or kafka://host:port[,host:port]")
    g.add_argument("--kafka-compression", choices=["none", "gzip", "snappy", "lz4", "zstd"])
    g.add_argument("--bus-retention-h", type=float,
                   help="embedded bus: delete consumed log segments this old (0 = keep)")
    g.add_argument("--consumer-group", help="Kafka consumer group of the workers")
    g.add_argument("--series-quiet-s", type=float, help="quiet time after release")
    g.add_argument("--series-max-quiet-s", type=float, help="quiet time regardless")
    g.add_argument("--spool-retention-h", type=float,
                   help="delete spool files this long after publishing (0 = keep)")
    g.add_argument("--lis", help="SQLAlchemy URL of the LIS")
    g.add_argument("--lis-mapping", type=Path, help="TOML mapping of the hospital's LIS")
    g.add_argument("--pacs", action="append", metavar="HOST:PORT:AET",
                   help="SR destination (repeatable)")
    g.add_argument("--threshold", choices=["general", "sensitive"])
    g.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"])
    g.add_argument("--http-port", type=int, help="port of /healthz /readyz /metrics")
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    g.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    taken = {action.dest for action in parser._actions}
    for name, field in Settings.model_fields.items():
        if name not in taken:  # every other setting: its flag from its type
            g.add_argument(f"--{name.replace('_', '-')}", help=field.description,
                           **_flag_type(field.annotation))


def _flag_type(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a setting of type ``annotation`` (``X | None`` read as X)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction, "default": None}
    if get_origin(annotation) is Literal:
        return {"choices": list(get_args(annotation))}
    if get_origin(annotation) is list:
        return {"action": "append"}
    if annotation in (int, float, Path):
        return {"type": annotation}
    return {"type": str}


def settings_from_args(args: argparse.Namespace, *, configure_logging: bool = True) -> Settings:
    """Load the settings with the flags on top, and configure logging from them."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)
    }
    settings = load_settings(getattr(args, "config", None), overrides)
    if configure_logging:
        setup_logging(settings.log_level, settings.log_json)
    return settings
