"""``hust19 bus dump``: print the messages of one topic as JSON lines, without committing.

It reads the embedded bus under ``--data-dir`` (safe while the agent writes in another
process: readers take no lock) or a Kafka cluster given by ``--bus kafka://...``. One line per
message on stdout::

    {"topic": ..., "partition": 0, "offset": 12, "key": "1.2.840...", "headers": {...},
     "value_size": 528742, "timestamp": "2025-...Z", "timestamp_ms": 17...}

It stops when it has read everything that was on the topic when it started (``--follow``: it
keeps waiting for new messages until interrupted). Values are not printed, only their size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from agent.bus.factory import open_bus
from agent.bus.interface import Bus, Message, read_to_end
from agent.cli.logs import setup_logging
from agent.config import Settings, load_settings
from schemas.errors import InputError

logger = logging.getLogger(__name__)

POLL_TIMEOUT_S: Final = 0.5
PING_TIMEOUT_S: Final = 5.0
POLL_BATCH: Final = 500


def message_json(m: Message) -> dict[str, Any]:
    """The JSON object printed for one message."""
    return {
        "topic": m.topic,
        "partition": m.partition,
        "offset": m.offset,
        "key": None if m.key is None else m.key.decode("utf-8", "replace"),
        "headers": {k: v.decode("utf-8", "replace") for k, v in m.headers},
        "value_size": len(m.value),
        "timestamp": datetime.fromtimestamp(m.timestamp_ms / 1000, UTC)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "timestamp_ms": m.timestamp_ms,
    }


def open_existing_bus(settings: Settings) -> Bus:
    """The settings' bus for reading, without creating one: an embedded bus must already be
    in the data directory (:class:`InputError` naming what is missing)."""
    if settings.bus == "embedded":
        bus_dir = settings.data_dir / "bus"
        if not settings.data_dir.is_dir():
            raise InputError(f"data directory {settings.data_dir} does not exist")
        if not (bus_dir / "topics").is_dir():
            raise InputError(f"no embedded bus in {settings.data_dir} ({bus_dir} is missing)")
    # The retention only shows in the startup line: a reader never flushes a producer, so it
    # never deletes anything.
    return open_bus(settings.bus, settings.data_dir, retention_h=settings.bus_retention_h,
                    kafka_client=settings.kafka_client_settings)


def _open(args: argparse.Namespace, settings: Settings) -> Bus:
    bus = open_existing_bus(settings)
    try:
        bus.ping(PING_TIMEOUT_S)
        if not bus.topic_exists(args.topic):
            raise InputError(f"topic {args.topic} does not exist on the {settings.bus} bus")
    except BaseException:
        bus.close()
        raise
    return bus


def dump(args: argparse.Namespace) -> int:
    """Print the topic's messages as JSON lines; see the module docstring."""
    settings = load_settings(None, {"data_dir": args.data_dir, "bus": args.bus})
    setup_logging(settings.log_level, settings.log_json)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # failures surface as BusError
    if args.max is not None and args.max < 0:
        raise InputError("--max must be >= 0")
    bus = _open(args, settings)
    logger.info("bus dump: %s", bus.describe())
    printed = 0
    try:
        consumer = bus.consumer(None, [args.topic])
        try:
            for batch in read_to_end(consumer, poll_timeout_s=POLL_TIMEOUT_S,
                                     max_records=POLL_BATCH, follow=args.follow):
                for m in batch[:None if args.max is None else args.max - printed]:
                    sys.stdout.write(json.dumps(message_json(m)) + "\n")
                    printed += 1
                sys.stdout.flush()
                if args.max is not None and printed >= args.max:
                    break
        finally:
            consumer.close()
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error. Point stdout at /dev/null so
        # that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    finally:
        bus.close()
    return 0


def register(sub: Any) -> None:
    """Add ``hust19 bus dump``."""
    bus = sub.add_parser("bus", help="inspect the message bus")
    bus_sub = bus.add_subparsers(dest="bus_command", metavar="SUBCOMMAND", required=True)
    p = bus_sub.add_parser(
        "dump", help="print a topic's messages as JSON lines (key, headers, value size)",
        description="Print one JSON line per message of a topic (topic, partition, offset, "
                    "key, headers, value_size, timestamp). Commits nothing.")
    p.add_argument("--topic", required=True, help="topic to read, e.g. dicom.instances")
    p.add_argument("--data-dir", type=Path,
                   help="data directory of the embedded bus (default: settings)")
    p.add_argument("--bus", help="'embedded' or kafka://host:port[,host:port] "
                                 "(default: settings)")
    p.add_argument("--follow", action="store_true",
                   help="keep waiting for new messages (until interrupted)")
    p.add_argument("--max", type=int, metavar="N", help="stop after N messages")
    p.set_defaults(func=dump)
