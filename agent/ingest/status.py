"""DICOM status codes the Storage SCP answers, named once (never bare numbers elsewhere).

The Storage Service Class (PS3.4 B.2.3) reserves these ranges for failures:

* ``0xA7xx`` Refused: Out of Resources
* ``0xA9xx`` Error: Data Set does not match SOP Class
* ``0xCxxx`` Error: Cannot understand

The specific codes inside the ranges follow pynetdicom's own choices where it has one
(``0xC210`` cannot decode, ``0xC211`` exception in the handler) so that logs read the same on
both ends. Every failure also carries an Error Comment (LO, at most 64 characters) naming the
problem; :func:`error_comment` shortens a reason to fit.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

ERROR_COMMENT_MAX: Final = 64
"""(0000,0902) Error Comment is LO: at most 64 characters."""


class StoreStatus(IntEnum):
    """C-STORE response statuses of the HUST-19 Storage SCP."""

    SUCCESS = 0x0000
    """Stored durably (file and directory fsync'd, index committed), or already stored."""

    OUT_OF_RESOURCES = 0xA700
    """The spool could not be written (disk full, permissions): the sender should retry."""

    SOP_CLASS_MISMATCH = 0xA900
    """The dataset's SOP Class UID is not the one the request (and context) announced."""

    CANNOT_PARSE = 0xC210
    """The dataset bytes cannot be decoded as DICOM."""

    PROCESSING_FAILURE = 0xC211
    """An unexpected error in the handler (logged with a traceback); nothing was stored."""

    MISSING_UID = 0xC212
    """Study, Series or SOP Instance UID is absent or empty."""

    MISSING_PIXEL_DATA = 0xC213
    """No Pixel Data (7FE0,0010): nothing to triage."""

    UID_MISMATCH = 0xC214
    """The dataset's SOP Instance UID differs from the request's Affected SOP Instance UID."""


VERIFICATION_SUCCESS: Final = StoreStatus.SUCCESS
"""C-ECHO answer."""


def error_comment(reason: str) -> str:
    """``reason`` cut to fit an Error Comment (LO: 64 characters, no backslash)."""
    text = reason.replace("\\", "/").replace("\n", " ").strip()
    if len(text) <= ERROR_COMMENT_MAX:
        return text
    return text[: ERROR_COMMENT_MAX - 3] + "..."
