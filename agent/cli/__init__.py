"""The ``hust19`` command. Each subcommand lives in ``agent/cli/commands/<name>.py`` and
exposes ``register(subparsers)``; this module only wires them and turns the product's errors
into a one-line message and an exit status (never a traceback). Logging is configured by the
commands, through ``agent.cli.logs``. ``python -m agent.cli`` runs it too."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final

from agent import __version__
from schemas.errors import Hust19Error, InputError

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

COMMAND_MODULES: Final = ("serve", "ingest", "worker", "dashboard", "bus", "dlq", "lis", "train",
                          "evaluate", "predict", "doctor", "engines", "demo", "config")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; when ``argv`` names a command, only that command's module is imported (a
    fast start: some commands pull in the models or the DICOM stack)."""
    parser = argparse.ArgumentParser(
        prog="hust19",
        description="HUST-19 COVID-19 triage agent: DICOM CT in, DICOM SR and Kafka out.")
    parser.add_argument("--version", action="version", version=f"hust19 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    first = next((a for a in (argv or ()) if not a.startswith("-")), None)
    names = [first] if first in COMMAND_MODULES else list(COMMAND_MODULES)
    for name in names:
        try:
            module = importlib.import_module(f"agent.cli.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"agent.cli.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except InputError as exc:
        print(f"hust19: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except Hust19Error as exc:
        print(f"hust19: error: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
