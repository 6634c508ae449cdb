"""The settings flags of the commands that run or inspect the agent (serve, ingest, worker,
doctor, config show): one flag per :class:`agent.config.Settings` field, generated from the
field. ``hust19 config example`` documents the flags this parser has (:func:`settings_flags`),
so what it documents is what the commands accept."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType, UnionType
from typing import Any, Final, Literal, Protocol, Union, get_args, get_origin

from agent.cli.logs import setup_logging
from agent.config import Settings, load_settings

logger = logging.getLogger(__name__)

METAVARS: Final = {"allow_ae": "AET", "pacs": "HOST:PORT:AET"}
"""How a value is written, where the setting's name does not say it."""


def flag(name: str) -> str:
    """The flag of setting ``name``: ``--`` and the name with dashes (a public contract)."""
    return "--" + name.replace("_", "-")


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag: its name from :func:`flag`, its help the field's description,
    its type, choices or repetition from the field's type (a yes/no setting also gets its
    ``--no-`` form). Also ``--config``, the settings file."""
    group = parser.add_argument_group("settings (flags override HUST19_* env, which overrides "
                                      "--config)")
    group.add_argument("--config", type=Path,
                       help="TOML settings file ('hust19 config example' prints one).")
    for name, field in Settings.model_fields.items():
        keywords = _flag_type(field.annotation)
        if name in METAVARS:
            keywords["metavar"] = METAVARS[name]
        group.add_argument(flag(name), dest=name,
                           help=(field.description or "").replace("%", "%%"), **keywords)


def settings_flags() -> dict[str, list[str]]:
    """Setting name -> the flags that set it, as :func:`add_settings_args` made them."""
    parser = argparse.ArgumentParser(add_help=False)
    add_settings_args(parser)
    return {action.dest: list(action.option_strings) for action in parser._actions
            if action.dest in Settings.model_fields}


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


class Service(Protocol):
    """What :func:`run_until_signal` runs: the agent's roles, the dashboard."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def run_until_signal(service: Service, name: str) -> int:
    """Start ``service``, block until SIGINT/SIGTERM, stop it; returns the exit status. ``name``
    says what runs in the log lines."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        service.start()
        logger.info("%s running (pid %d); stop with Ctrl-C or SIGTERM", name, os.getpid())
        while not stop.wait(1.0):
            pass
        logger.info("received %s: stopping", signal.Signals(received[0]).name)
    finally:
        service.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
