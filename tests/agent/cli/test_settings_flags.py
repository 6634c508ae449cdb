"""One source for settings (issue 17, item 3): the flags ``hust19 config example`` documents
are exactly the flags ``serve``, ``ingest``, ``worker``, ``doctor`` and ``config show`` accept,
each documented flag sets its setting, and every command's ``--help`` is plain text."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pytest

from agent.cli import build_parser, main
from agent.cli.commands.common import settings_from_args
from agent.config import PacsDestination, Settings, load_settings
from tests.fixtures.paths import REPO

SETTINGS_COMMANDS = (["serve"], ["ingest"], ["worker"], ["doctor"], ["config", "show"])
SETTINGS_GROUP = "settings"
RST = re.compile(r"``|:(mod|class|func|meth|data|attr|ref|obj):")


def documented_flags(capsys: pytest.CaptureFixture[str]) -> dict[str, list[str]]:
    """Setting name -> the flags ``hust19 config example`` names for it."""
    assert main(["config", "example"]) == 0
    text = capsys.readouterr().out
    found: dict[str, list[str]] = {}
    for match in re.finditer(r"^# env: HUST19_([A-Z0-9_]+) +flag: (.+)$", text, re.MULTILINE):
        found[match.group(1).lower()] = re.findall(r"--[a-z0-9-]+", match.group(2))
    return found


def subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser(path)
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def accepted_flags(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Setting name -> the flags of the parser's settings group that set it."""
    (group,) = [g for g in parser._action_groups if (g.title or "").startswith(SETTINGS_GROUP)]
    out: dict[str, list[str]] = {}
    for action in group._group_actions:
        out.setdefault(action.dest, []).extend(action.option_strings)
    return out


@pytest.mark.parametrize("command", SETTINGS_COMMANDS, ids=" ".join)
def test_config_example_documents_exactly_the_flags_the_command_accepts(
        command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    documented = documented_flags(capsys)
    assert documented.keys() == Settings.model_fields.keys()
    accepted = accepted_flags(subparser(command))
    assert accepted.pop("config") == ["--config"]  # the file itself, named in the example's head
    assert accepted == documented
    flags = [f for action in subparser(command)._actions for f in action.option_strings]
    assert len(flags) == len(set(flags))


def _other_value(name: str, annotation: Any, default: Any) -> tuple[Any, list[str]]:
    """A value of the setting's type that is not its default, and the command-line words that
    give it (with the setting's documented flag, filled in by the caller)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return (not default), []
    if get_origin(annotation) is Literal:
        choice = next(c for c in get_args(annotation) if c != default)
        return choice, [choice]
    if get_origin(annotation) is list:
        if get_args(annotation)[0] is PacsDestination:
            text = "pacs.example.org:104:PACS"
            return [PacsDestination.parse(text)], [text]
        return ["CT_ONE", "CT_TWO"], ["CT_ONE", "CT_TWO"]
    if annotation is Path:
        return Path(f"/srv/{name}"), [f"/srv/{name}"]
    if annotation in (int, float):
        return default + 1, [str(default + 1)]
    return f"{name}-1", [f"{name}-1"]


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["doctor"]], ids=" ".join)
def test_each_documented_flag_sets_its_setting(
        command: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"HUST19_{name.upper()}", raising=False)
    documented = documented_flags(capsys)
    parser = build_parser(command)
    default = load_settings(environ={})
    for name, field in Settings.model_fields.items():
        value, words = _other_value(name, field.annotation, getattr(default, name))
        flag, *negated = documented[name]
        if field.annotation is bool:
            argv = [flag] if value else negated
        elif isinstance(value, list):
            argv = [w for word in words for w in (flag, word)]
        else:
            argv = [flag, *words]
        settings = settings_from_args(parser.parse_args([*command, *argv]),
                                      configure_logging=False)
        assert getattr(settings, name) == value != getattr(default, name), (name, argv)


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    found: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        found.append((path, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(build_parser(), "hust19")
    return found


def test_every_help_text_is_plain_sentences() -> None:
    parsers = all_parsers()
    assert len(parsers) > 30
    for path, parser in parsers:
        text = parser.format_help()
        assert not RST.search(text), f"{path} --help shows reStructuredText:\n{text}"
        description = (parser.description or "").strip()
        if description:
            assert description.endswith((".", ":")) and not description.endswith("..."), \
                f"{path}: the description does not end as a sentence: {description[-80:]!r}"


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_help_as_a_user_sees_it(command: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.cli", command, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not RST.search(proc.stdout), proc.stdout
    assert proc.stdout.count(".") > 3
