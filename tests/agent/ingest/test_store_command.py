"""The C-STORE command set read from its bytes: the same fields pynetdicom decodes from the same
bytes, and ``None`` (pynetdicom's way) for everything that is not a plain C-STORE-RQ. The
Success response's bytes are checked against pynetdicom's in ``test_pynetdicom_replacements``."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.ingest.store_command import StoreRequest, parse_store_request

INSTANCE = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"


def _request(**fields: object) -> C_STORE:
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = INSTANCE
    req.Priority = 2
    for name, value in fields.items():
        setattr(req, name, value)
    return req


def _encoded(primitive: C_STORE | C_ECHO) -> bytes:
    message = C_ECHO_RQ() if isinstance(primitive, C_ECHO) else C_STORE_RQ()
    message.primitive_to_message(primitive)
    if isinstance(message, C_STORE_RQ):
        message.command_set.CommandDataSetType = 0x0001  # a data set follows
    return bytes(encode(message.command_set, True, True))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _plain(**replace: bytes) -> list[bytes]:
    values = {0x0002: CTImageStorage.encode() + b"\x00", 0x0100: b"\x01\x00",
              0x0110: b"\x07\x00", 0x0700: b"\x00\x00", 0x0800: b"\x01\x00",
              0x1000: INSTANCE.encode(), **{int(k, 16): v for k, v in replace.items()}}
    return [_element(tag, value) for tag, value in sorted(values.items())]


@pytest.mark.parametrize("fields", [
    {},
    {"MoveOriginatorApplicationEntityTitle": "MOVESCU", "MoveOriginatorMessageID": 3},
    {"Priority": 1, "MessageID": 65535},
], ids=["plain", "move-originator", "high-priority"])
def test_a_c_store_request_reads_as_pynetdicom_decodes_it(fields: dict[str, object]) -> None:
    req = _request(**fields)
    parsed = parse_store_request(_encoded(req))
    assert parsed == StoreRequest(
        message_id=req.MessageID, sop_class_uid=str(req.AffectedSOPClassUID),
        sop_instance_uid=str(req.AffectedSOPInstanceUID), priority=req.Priority,
        move_originator_ae_title=(None if req.MoveOriginatorApplicationEntityTitle is None
                                  else req.MoveOriginatorApplicationEntityTitle.strip()),
        move_originator_message_id=req.MoveOriginatorMessageID)
    assert parse_store_request(memoryview(_encoded(req))) == parsed


def test_the_hand_built_command_is_a_plain_request() -> None:
    """The helper below builds what the parser accepts, so each case changes one thing."""
    assert parse_store_request(_command(*_plain())) == StoreRequest(7, CTImageStorage, INSTANCE, 0)


@pytest.mark.parametrize("command", [
    _command(*_plain(**{"0100": b"\x30\x00"})),  # C-ECHO-RQ's command field
    _command(*_plain(**{"0800": b"\x01\x01"})),  # no data set follows
    _command(*_plain(**{"1000": b""})),  # empty Affected SOP Instance UID
    _command(*_plain(**{"1000": b"\x00\x00"})),  # only padding
    _command(*_plain(**{"1000": b"1.2.abc\x00"})),  # not a conformant UID
    _command(*_plain(**{"1000": b"1.02.3\x00"})),  # a component with a leading zero
    _command(*_plain(**{"1000": b"1." * 33})),  # 66 characters
    _command(*_plain(**{"0700": b"\x03\x00"})),  # no such priority
    _command(*_plain(**{"0110": b"\x07\x00\x00\x00"})),  # a US of 4 bytes
    _command(*_plain(**{"1030": b"A" * 18})),  # an AE title of 18 bytes
    _command(*_plain(**{"0120": b"\x07\x00"})),  # an element of a response
    _command(*[e for e in _plain() if e[2:4] != b"\x00\x10"]),  # no Affected SOP Instance UID
    _command(*reversed(_plain())),  # elements out of order
    _command(*_plain(), _plain()[-1]),  # an element twice
    _command(*_plain())[:-3],  # truncated inside a value
    _command(*_plain()) + b"\x00\x00\x00",  # truncated inside an element header
    _element(0x0000, struct.pack("<I", 4)) + b"".join(_plain()),  # wrong group length
    _command(*_plain()).replace(b"\x00\x00\x02\x00", b"\x08\x00\x02\x00", 1),  # group 0008
], ids=["c-echo", "no-data-set", "empty-uid", "padding-uid", "bad-uid", "leading-zero",
        "long-uid", "priority", "us-length", "long-ae", "response-element", "missing-uid",
        "out-of-order", "repeated", "truncated-value", "truncated-header", "group-length",
        "other-group"])
def test_anything_but_a_plain_c_store_request_is_left_to_pynetdicom(command: bytes) -> None:
    assert parse_store_request(command) is None


def test_a_c_echo_request_is_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert parse_store_request(_encoded(echo)) is None
