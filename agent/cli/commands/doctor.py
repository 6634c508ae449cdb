"""``hust19 doctor``: check every dependency, in plain words; exit 1 if something needed is
missing. Takes the same settings and flags as ``hust19 serve``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli.commands.common import add_settings_args, settings_from_args
from agent.ops.doctor import run_checks

_MARK = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]"}


def register(sub: Any) -> None:
    parser = sub.add_parser("doctor", help="check the installation and every dependency")
    add_settings_args(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per finding")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, configure_logging=False)
    findings = run_checks(settings)
    for f in findings:
        if args.json:
            print(json.dumps({"check": f.check, "level": f.level, "message": f.message}))
        else:
            print(f"{_MARK[f.level]} {f.check}: {f.message}")
    failed = [f for f in findings if f.level == "fail"]
    warned = [f for f in findings if f.level == "warn"]
    if not args.json:
        print("\n" + summary(len(failed), len(warned)))
    return 1 if failed else 0


def summary(failed: int, warned: int) -> str:
    """The last line: "everything in place" only when nothing failed and nothing warned."""
    if failed:
        return f"{failed} problem(s) found" + (f", and {warned} warning(s)." if warned else ".")
    if warned:
        return (f"No problem stops the agent; read the {warned} warning(s) above: not "
                "everything is in place.")
    return "Everything needed is in place."
