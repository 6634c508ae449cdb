"""Logging for the application: the ``hust19`` commands configure it here (library modules
only ever ``getLogger(__name__)``)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime
from typing import Final


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
