"""The C-STORE command set read and written as bytes (PS3.7 9.3.1, Implicit VR Little Endian).

The listener receives one C-STORE request per CT slice. pynetdicom decodes each command set
into a pydicom dataset, converts and validates every element into a request primitive and
dispatches it through its service-class and event machinery: ~0.4 ms per instance here,
a fifth of the time per instance (measured, issue 20). A plain request is nine fixed
elements at most; :func:`parse_store_request` reads them straight from the bytes and
:func:`encode_store_success` writes the Success response. Anything that is not a plain,
well-formed C-STORE-RQ is left to pynetdicom (``None``), so unusual input keeps its
established handling (a request without Affected SOP Instance UID, for one, is answered by
``agent.ingest.scp``).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

C_STORE_RQ_COMMAND: Final = 0x0001
"""(0000,0100) Command Field of a C-STORE-RQ."""
C_STORE_RSP_COMMAND: Final = 0x8001
"""(0000,0100) Command Field of a C-STORE-RSP."""
NO_DATA_SET: Final = 0x0101
"""(0000,0800) Command Data Set Type: no data set follows."""
SUCCESS: Final = 0x0000
PRIORITIES: Final = frozenset({0x0000, 0x0001, 0x0002})
"""(0000,0700) Priority: medium, high, low (PS3.7 Table 9.3-1)."""

GROUP_LENGTH: Final = 0x0000
AFFECTED_SOP_CLASS_UID: Final = 0x0002
COMMAND_FIELD: Final = 0x0100
MESSAGE_ID: Final = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO: Final = 0x0120
PRIORITY: Final = 0x0700
COMMAND_DATA_SET_TYPE: Final = 0x0800
STATUS: Final = 0x0900
AFFECTED_SOP_INSTANCE_UID: Final = 0x1000
MOVE_ORIGINATOR_AE_TITLE: Final = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID: Final = 0x1031
"""Elements of group 0000 (PS3.7 Annex E)."""

_US: Final = frozenset({COMMAND_FIELD, MESSAGE_ID, PRIORITY, COMMAND_DATA_SET_TYPE,
                        MOVE_ORIGINATOR_MESSAGE_ID})
_UI: Final = frozenset({AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID})
_REQUIRED: Final = frozenset({AFFECTED_SOP_CLASS_UID, COMMAND_FIELD, MESSAGE_ID, PRIORITY,
                              COMMAND_DATA_SET_TYPE, AFFECTED_SOP_INSTANCE_UID})
"""The elements of a C-STORE-RQ (PS3.7 Table 9.3-1); the group length and the two move
originator elements are optional."""
MAX_AE_TITLE_BYTES: Final = 16
MAX_UID_CHARS: Final = 64
_UID: Final = re.compile(rb"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
"""A conformant UID (PS3.5 9.1): pynetdicom's validation of UIDs is no stricter."""
_ELEMENT: Final = struct.Struct("<HHI")
_US_VALUE: Final = struct.Struct("<H")
_UL_VALUE: Final = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """The command of a C-STORE-RQ that carries a data set (its fragments follow)."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    move_originator_ae_title: str | None = None
    move_originator_message_id: int | None = None


def _uid(value: bytes) -> str | None:
    value = value.rstrip(b"\x00 ")
    if not 0 < len(value) <= MAX_UID_CHARS or _UID.fullmatch(value) is None:
        return None
    return value.decode("ascii")


def parse_store_request(command: bytes | memoryview) -> StoreRequest | None:
    """The C-STORE-RQ in ``command`` (a whole command set), or ``None`` when it is anything
    else: another command, a request without a data set, an element missing, repeated, out of
    order, of the wrong length or not of a C-STORE-RQ, a UID that is empty or not conformant,
    an unknown priority, a group length that does not match."""
    data = bytes(command)
    values: dict[int, bytes] = {}
    pos, end, last = 0, len(data), -1
    while pos < end:
        if pos + _ELEMENT.size > end:
            return None
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += _ELEMENT.size
        if group != 0 or element <= last or pos + length > end:
            return None
        last = element
        values[element] = data[pos:pos + length]
        pos += length
        if element == GROUP_LENGTH:
            if length != _UL_VALUE.size or _UL_VALUE.unpack(values[element])[0] != end - pos:
                return None
        elif element in _US:
            if length != _US_VALUE.size:
                return None
        elif element == MOVE_ORIGINATOR_AE_TITLE:
            if length > MAX_AE_TITLE_BYTES or not values[element].isascii():
                return None
        elif element not in _UI:
            return None
    if not values.keys() >= _REQUIRED:
        return None
    number = {tag: _US_VALUE.unpack(values[tag])[0] for tag in _US if tag in values}
    if (number[COMMAND_FIELD] != C_STORE_RQ_COMMAND
            or number[COMMAND_DATA_SET_TYPE] == NO_DATA_SET
            or number[PRIORITY] not in PRIORITIES):
        return None
    sop_class = _uid(values[AFFECTED_SOP_CLASS_UID])
    sop_instance = _uid(values[AFFECTED_SOP_INSTANCE_UID])
    if sop_class is None or sop_instance is None:
        return None
    move_ae = values.get(MOVE_ORIGINATOR_AE_TITLE)
    return StoreRequest(
        message_id=number[MESSAGE_ID], sop_class_uid=sop_class, sop_instance_uid=sop_instance,
        priority=number[PRIORITY],
        move_originator_ae_title=None if move_ae is None else move_ae.decode("ascii").strip(),
        move_originator_message_id=number.get(MOVE_ORIGINATOR_MESSAGE_ID))


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_success(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The command set of a C-STORE-RSP Success to request ``message_id`` (PS3.7 9.3.1.2):
    the same bytes as pynetdicom's encoder writes (a test checks that)."""
    body = b"".join((
        _element(AFFECTED_SOP_CLASS_UID, _uid_value(sop_class_uid)),
        _element(COMMAND_FIELD, _US_VALUE.pack(C_STORE_RSP_COMMAND)),
        _element(MESSAGE_ID_BEING_RESPONDED_TO, _US_VALUE.pack(message_id)),
        _element(COMMAND_DATA_SET_TYPE, _US_VALUE.pack(NO_DATA_SET)),
        _element(STATUS, _US_VALUE.pack(SUCCESS)),
        _element(AFFECTED_SOP_INSTANCE_UID, _uid_value(sop_instance_uid)),
    ))
    return _element(GROUP_LENGTH, _UL_VALUE.pack(len(body))) + body


@dataclass(frozen=True, slots=True)
class StoreMessage:
    """A whole C-STORE request as received: its command and its data set's bytes, as sent."""

    context_id: int
    transfer_syntax_uid: str
    request: StoreRequest
    dataset: bytes


Answer = tuple["Dataset | int", Callable[[], None] | None]
"""What a store handler answers: the status (a Dataset with Status and Error Comment for a
failure), and what to run once the response is sent (or ``None``)."""
