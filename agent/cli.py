"""The ``hust19`` command. Each subcommand lives in ``agent/commands/<name>.py`` and exposes
``register(subparsers)``; this module only wires them, configures logging and turns the
product's errors into a one-line message and an exit status (never a traceback)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from agent import __version__
from schemas.errors import Hust19Error, InputError

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

COMMAND_MODULES: Final = ("serve", "ingest", "worker", "dashboard", "bus", "lis", "train",
                          "evaluate", "predict", "doctor", "engines", "demo", "config")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


NOISY_LIBRARIES: Final = {"pynetdicom": logging.WARNING, "kafka": logging.WARNING,
                          "highdicom": logging.WARNING, "pydicom": logging.ERROR}
"""Third-party loggers and the least level they log at (all levels at DEBUG): highdicom logs
seven INFO lines per SR, pydicom a warning per invalid UID of every instance read."""


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Configure the root logger for the application (library modules never do this)."""
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy, floor in NOISY_LIBRARIES.items():
        logging.getLogger(noisy).setLevel(
            root.level if root.level <= logging.DEBUG else max(floor, root.level))
    if root.level > logging.DEBUG:
        # Invalid UIDs are real-world input; the agent reports the ones that matter itself.
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")


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
            module = importlib.import_module(f"agent.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"agent.commands.{name}":
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


if __name__ == "__main__":
    sys.exit(main())
