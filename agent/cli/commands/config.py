"""``hust19 config example`` (the documented settings file) and ``hust19 config show`` (the
settings in force, after file, env and flags)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli.commands.common import add_settings_args, settings_flags, settings_from_args
from agent.config import example_toml


def register(sub: Any) -> None:
    parser = sub.add_parser("config", help="print the example or the effective settings")
    inner = parser.add_subparsers(dest="config_cmd", metavar="ACTION", required=True)
    ex = inner.add_parser("example", help="the example settings file, every setting documented")
    ex.set_defaults(func=_example)
    show = inner.add_parser("show", help="the settings in force, as JSON")
    add_settings_args(show)
    show.set_defaults(func=_show)


def _example(args: argparse.Namespace) -> int:
    print(example_toml(settings_flags()), end="")
    return 0


def _show(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, configure_logging=False)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0
