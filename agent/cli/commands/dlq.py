"""``hust19 dlq list`` and ``hust19 dlq retry``: the dead letters on ``triage.dlq``, and a
retry of one once its cause is fixed (:mod:`agent.ops.dlq` says what can be retried and
from which data directory)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from agent.cli.commands.bus import open_existing_bus
from agent.cli.logs import setup_logging
from agent.config import Settings, load_settings
from agent.ops.dlq import Entry, read_entries, retry, retry_command
from schemas import topics
from schemas.errors import InputError

logger = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config, {"data_dir": args.data_dir, "bus": args.bus})
    setup_logging(settings.log_level, settings.log_json)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # failures surface as BusError
    return settings


def _entries(settings: Settings) -> list[Entry]:
    bus = open_existing_bus(settings)
    try:
        return read_entries(bus)
    finally:
        bus.close()


def list_entries(args: argparse.Namespace) -> int:
    """One JSON line per dead letter, oldest first, without the original bytes."""
    for e in _entries(_settings(args)):
        letter = e.letter
        sys.stdout.write(json.dumps({
            "partition": e.partition, "offset": e.offset,
            "failed_at": letter.failed_at.isoformat(), "reason": letter.reason,
            "source_topic": letter.source_topic, "study_uid": letter.study_uid,
            "series_uid": letter.series_uid,
            "retry": retry_command(e.partition, e.offset, letter.source_topic,
                                   letter.series_uid)}) + "\n")
    return 0


def retry_entry(args: argparse.Namespace) -> int:
    """Retry the dead letter at ``--partition``/OFFSET; print what was done."""
    settings = _settings(args)
    found = [e for e in _entries(settings)
             if e.partition == args.partition and e.offset == args.offset]
    if not found:
        raise InputError(f"no dead letter at {topics.TRIAGE_DLQ}[{args.partition}]@"
                         f"{args.offset} ('hust19 dlq list' shows them)")
    print(retry(found[0], settings.data_dir))
    return 0


def register(sub: Any) -> None:
    """Add ``hust19 dlq list`` and ``hust19 dlq retry``."""
    dlq = sub.add_parser("dlq", help="list the dead letters and retry one",
                         description="The dead letters on triage.dlq, and a retry of one once "
                                     "its cause is fixed.")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path,
                       help="the agent's data directory: its embedded bus, and the spool (a "
                            "series) or SR outbox (a refused SR) a retry uses")
        p.add_argument("--bus", help="'embedded' or kafka://host:port[,host:port] "
                                     "(default: settings)")
        p.add_argument("--config", type=Path, help="TOML settings file")

    p = dlq_sub.add_parser("list", help="print the dead letters as JSON lines",
                           description="Print one JSON line per dead letter (partition, offset, "
                                       "time, reason, source, UIDs, the retry command where "
                                       "it can be retried). Commits nothing.")
    common(p)
    p.set_defaults(func=list_entries)
    p = dlq_sub.add_parser(
        "retry", help="retry one dead letter",
        description="Retry one dead letter once its cause is fixed: an SR a PACS refused goes "
                    "back to the worker's SR outbox for that PACS; a series is published "
                    "again from the ingest's spool and triaged again. Run it with the data "
                    "directory of the role that holds these (the same one for serve).")
    p.add_argument("offset", type=int, help="the dead letter's offset on triage.dlq")
    p.add_argument("--partition", type=int, default=0, help="its partition (default 0)")
    common(p)
    p.set_defaults(func=retry_entry)
