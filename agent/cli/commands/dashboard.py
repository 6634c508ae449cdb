"""The triage worklist for readers and IT, as a role of its own.

It consumes the topics triage.results, triage.evidence and triage.dlq as its own consumer
group (the embedded bus in --data-dir, or --bus kafka://...), keeps the worklist in a
database (SQLite in the data folder, or --db postgresql://...) and serves it on --host and
--port (default 127.0.0.1:8088) until SIGINT or SIGTERM.

Users: 'hust19 dashboard add-user NAME --users FILE --password-stdin [--role reader|viewer]'
(readers acknowledge results, viewers only look); or --auth proxy behind a reverse proxy
that names the user in the X-Forwarded-User header. See docs/dashboard.md.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path
from typing import Any, Final

from agent.cli.commands.common import run_until_signal
from agent.cli.logs import setup_logging
from agent.dashboard.settings import DEFAULT_PORT, ROLES, USERS_FILE_NAME
from schemas.errors import InputError

DEFAULT_ROLE: Final = "reader"


def register(sub: Any) -> None:
    parser = sub.add_parser("dashboard", help="serve the triage worklist (web) from the bus",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(parser)
    parser.set_defaults(func=run)
    users = parser.add_subparsers(dest="dashboard_command", metavar="SUBCOMMAND")
    add = users.add_parser("add-user", help="add a user to the users file, or change their "
                           "password or role")
    add.add_argument("name", help="user name (letters, digits, . _ @ -)")
    add.add_argument("--users", type=Path, help=f"users file (default: {USERS_FILE_NAME} in "
                     "--data-dir)")
    add.add_argument("--data-dir", type=Path, default=Path("hust19-data"),
                     help="where the default users file lives")
    add.add_argument("--role", choices=ROLES, default=DEFAULT_ROLE,
                     help=f"reader (acknowledges results) or viewer; default {DEFAULT_ROLE}")
    how = add.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    how.add_argument("--proxy-only", action="store_true",
                     help="no password: the user only gets a role in --auth proxy mode")
    add.set_defaults(func=add_user_command)
    remove = users.add_parser("remove-user", help="remove a user (their sessions end)")
    remove.add_argument("name")
    remove.add_argument("--users", type=Path)
    remove.add_argument("--data-dir", type=Path, default=Path("hust19-data"))
    remove.set_defaults(func=remove_user_command)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings (flags override HUST19_DASHBOARD_* env, which overrides "
                             "the [dashboard] table of --config)")
    g.add_argument("--config", type=Path, help="TOML settings file ([dashboard], [hust19])")
    g.add_argument("--data-dir", type=Path, help="the agent's data folder (embedded bus, "
                   "default database and users file)")
    g.add_argument("--bus", help="'embedded' or kafka://host:port[,host:port]")
    g.add_argument("--consumer-group", help="the dashboard's consumer group "
                   "(default hust19-dashboard)")
    g.add_argument("--db", help="SQLAlchemy URL of the dashboard database (default: SQLite "
                   "in --data-dir)")
    g.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, help=f"port to listen on (default {DEFAULT_PORT})")
    g.add_argument("--auth", choices=["password", "proxy"],
                   help="password (users file, login page) or proxy (X-Forwarded-User)")
    g.add_argument("--users", type=Path, help=f"users file (default: {USERS_FILE_NAME} in "
                   "--data-dir)")
    g.add_argument("--trusted-proxy", action="append", metavar="ADDR",
                   help="address or CIDR network whose X-Forwarded-User is believed "
                        "(repeatable; default 127.0.0.1)")
    g.add_argument("--proxy-default-role", choices=ROLES,
                   help="role of proxy users not in the users file (default viewer)")
    g.add_argument("--tls-cert", type=Path, help="PEM certificate: serve HTTPS")
    g.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    g.add_argument("--session-hours", type=float, help="a login lasts this long (default 12)")
    g.add_argument("--idle-minutes", type=float, help="an unused session ends after this "
                   "long (default 60)")
    g.add_argument("--role", action="append", metavar="NAME=URL",
                   help="an agent role's health endpoint for the IT page, e.g. "
                        "worker=http://10.0.0.5:8081 (repeatable)")
    g.add_argument("--lis", help="SQLAlchemy URL of the LIS, for the lab values on the patient "
                   "page (default: lis.sqlite in --data-dir when it exists)")
    g.add_argument("--lis-mapping", type=Path, help="TOML mapping of the hospital's LIS")
    g.add_argument("--page-size", type=int, help="worklist rows per page (default 50)")
    g.add_argument("--retention-days", type=float, help="delete results and dead letters "
                   "older than this many days from the dashboard's database (default 0: "
                   "keep everything; the acknowledgement audit is kept)")
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    g.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    from agent.dashboard.service import Dashboard
    from agent.dashboard.settings import DashboardSettings, load_dashboard_settings

    overrides = {name: getattr(args, name) for name in DashboardSettings.model_fields
                 if hasattr(args, name)}
    settings = load_dashboard_settings(args.config, overrides)
    setup_logging(settings.log_level, settings.log_json)
    for noisy in ("uvicorn.error", "uvicorn"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return run_until_signal(Dashboard(settings), "dashboard")


def _users_file(args: argparse.Namespace) -> Path:
    return Path(args.users) if args.users else Path(args.data_dir) / USERS_FILE_NAME


def add_user_command(args: argparse.Namespace) -> int:
    from agent.dashboard.auth import add_user, check_user_name

    setup_logging("WARNING")
    check_user_name(args.name)
    password: str | None
    if args.proxy_only:
        password = None
    elif args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise InputError("no password on standard input")
    else:
        if not sys.stdin.isatty():
            raise InputError("not a terminal: pass the password with --password-stdin")
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise InputError("the passwords differ")
    path = _users_file(args)
    new = add_user(path, args.name, args.role, password)
    print(f"{'added' if new else 'updated'} {args.role} {args.name} in {path}")
    return 0


def remove_user_command(args: argparse.Namespace) -> int:
    from agent.dashboard.auth import remove_user

    setup_logging("WARNING")
    path = _users_file(args)
    if not remove_user(path, args.name):
        raise InputError(f"no user {args.name!r} in {path}")
    print(f"removed {args.name} from {path}")
    return 0
