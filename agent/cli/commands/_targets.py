"""Wiring of ``hust19 train TARGET`` / ``hust19 evaluate WHAT``: a subcommand per engines
module, each exposing ``configure(parser)`` and ``main(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from agent.cli.logs import setup_logging


def register_targets(sub: Any, name: str, help_text: str, targets: dict[str, Any]) -> None:
    """Add ``name`` with one sub-subcommand per target; nested dicts nest further."""
    parser = sub.add_parser(name, help=help_text)
    inner = parser.add_subparsers(dest=f"{name}_target", metavar="TARGET", required=True)
    for target, spec in targets.items():
        if isinstance(spec, dict):
            register_targets(inner, target, f"{help_text}: {target}", spec)
            continue
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            if exc.name == spec:  # target not built in this version
                continue
            raise
        p = inner.add_parser(target, help=(module.__doc__ or "").strip().splitlines()[0])
        module.configure(p)
        p.set_defaults(func=_runner(module))


def _runner(module: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        setup_logging("INFO")
        return int(module.main(args))

    return run
