"""The parts of pynetdicom the agent replaces: each checked against what it stands in for,
and the version guard that keeps the copies to the pynetdicom series they were written for.
The replacements at work, against real peers: ``test_ingest.py``, ``test_hostile_peers.py``."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.app import Agent
from agent.ingest import pynetdicom_replacements as replacements
from agent.ingest.guard import ConnectionGuard, Limits
from agent.ingest.pynetdicom_replacements import (
    MIRRORED_SERIES,
    _BulkReadSocket,
    _GuardedRequestHandler,
    _InlineStoreQueue,
    _PromptRequestHandler,
    bound_dul,
    encode_store_success_primitive,
    keep_responses_for_caller,
    mirrors_installed_pynetdicom,
    request_handler,
)
from agent.ingest.scp import StorageSCP
from agent.ingest.status import StoreStatus
from tests.fixtures.dicom import SAMPLE, associate, free_port, stop_process
from tests.fixtures.faults import start_storescp


def test_installed_pynetdicom_is_the_series_the_replacements_mirror() -> None:
    assert mirrors_installed_pynetdicom(), (
        f"pynetdicom {pynetdicom.__version__} is installed, the fast paths in "
        f"agent/ingest/pynetdicom_replacements.py were written for {MIRRORED_SERIES}x: compare "
        "the methods they replace in the new release, then move MIRRORED_SERIES")


@pytest.mark.parametrize(("version", "handler"), [(f"{MIRRORED_SERIES}99", _PromptRequestHandler),
                                                  ("3.1.0", _GuardedRequestHandler),
                                                  ("2.1.1", _GuardedRequestHandler)])
def test_another_pynetdicom_keeps_its_own_reactor_and_the_bounds(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, version: str,
        handler: type) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", version)
    with caplog.at_level(logging.INFO, logger=replacements.__name__):
        assert request_handler() is handler
    assert issubclass(handler, _GuardedRequestHandler)  # the connection bounds either way
    said = [r.getMessage() for r in caplog.records if "its own association reactor" in
            r.getMessage()]
    assert said == ([] if handler is _PromptRequestHandler else [
        f"pynetdicom {version}: its own association reactor, socket read and DIMSE send are "
        f"used (1 ms polling; the agent's copies mirror pynetdicom {MIRRORED_SERIES}x)"])


def test_a_dul_that_cannot_be_bounded_is_left_alone_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    guard = ConnectionGuard(Limits(max_associations=1, max_associations_per_peer=1,
                                   artim_timeout_s=1, tls_handshake_timeout_s=1,
                                   idle_timeout_s=1, max_instance_bytes=1))

    class OtherDul:
        pass

    replacements._unbounded_logged.clear()
    try:
        with caplog.at_level(logging.WARNING, logger=replacements.__name__):
            assert bound_dul(OtherDul(), guard) is False  # type: ignore[arg-type]
            assert bound_dul(OtherDul(), guard) is False  # type: ignore[arg-type]
        warnings = [r.getMessage() for r in caplog.records if "not bounded" in r.getMessage()]
        assert len(warnings) == 1 and "OtherDul" in warnings[0]
    finally:
        replacements._unbounded_logged.clear()


def test_store_success_response_is_encoded_as_pynetdicom_encodes_it() -> None:
    for message_id, sop_instance in [(1, "1.2.3"), (65535, "1.2.840.113619.2.55.3.12345.678")]:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = CTImageStorage
        rsp.AffectedSOPInstanceUID = sop_instance
        rsp.Status = 0x0000
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        assert encode_store_success_primitive(rsp) == encode(message.command_set, True, True)
        rsp.ErrorComment = "a comment"  # anything but a plain Success goes through pynetdicom
        assert encode_store_success_primitive(rsp) is None
        rsp.ErrorComment, rsp.Status = None, int(StoreStatus.CANNOT_PARSE)
        assert encode_store_success_primitive(rsp) is None
    request = C_STORE()
    request.MessageID = 1
    assert encode_store_success_primitive(request) is None


def test_bulk_read_socket_reads_whole_pdus_and_stops_at_close() -> None:
    ours, theirs = socket.socketpair()
    reader = object.__new__(_BulkReadSocket)  # only the wrapped socket is used by recv()
    reader.socket = ours
    payload = bytes(range(256)) * 2048  # 512 KiB, written in uneven pieces

    def send() -> None:
        for start in range(0, len(payload), 70_001):
            theirs.sendall(payload[start:start + 70_001])
            time.sleep(0.001)
        theirs.sendall(b"tail")
        theirs.close()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert reader.recv(len(payload)) == payload
        assert reader.recv(100) == b"tail"  # the peer closed: what arrived, as pynetdicom does
    finally:
        sender.join()
        ours.close()


def test_bulk_read_socket_wakes_its_dul_when_data_arrives() -> None:
    """``ready`` waits for data (the DUL thread does not sleep blind between polls): it
    answers as soon as bytes arrive, ``False`` after ``wait_s`` without them, and ``False``
    for a closed connection."""
    ours, theirs = socket.socketpair()
    reader = object.__new__(_BulkReadSocket)  # only the socket and its state are used
    reader.socket = ours
    reader._is_connected = True
    reader.wait_s = 5.0
    try:
        timer = threading.Timer(0.05, theirs.sendall, (b"x",))
        started = time.monotonic()
        timer.start()
        assert reader.ready
        assert time.monotonic() - started < 2.0  # woken by the data, not at the end of wait_s
        assert ours.recv(1) == b"x"
        reader.wait_s = 0.05
        started = time.monotonic()
        assert not reader.ready
        assert time.monotonic() - started >= 0.04
        reader._is_connected = False
        assert not reader.ready
    finally:
        ours.close()
        theirs.close()


def test_only_store_requests_skip_the_reactor_queue() -> None:
    class Served:  # stands in for the association: records what it was asked to serve
        def __init__(self) -> None:
            self.requests: list[tuple[object, int]] = []

        def _serve_request(self, msg: object, context_id: int) -> None:
            self.requests.append((msg, context_id))

    assoc = Served()
    messages = _InlineStoreQueue(assoc)  # type: ignore[arg-type]
    store, echo, response = C_STORE(), C_ECHO(), C_STORE()
    store.MessageID, echo.MessageID = 1, 2
    response.MessageIDBeingRespondedTo = 3
    for msg in (store, echo, response):
        messages.put((5, msg))
    assert assoc.requests == [(store, 5)]
    assert [messages.get_nowait()[1] for _ in range(messages.qsize())] == [echo, response]


def test_a_requestor_gets_every_response_while_its_reactor_runs(tmp_path: Path) -> None:
    """The window that pynetdicom's stale pause flag opens, held open: requests sent while the
    requestor's reactor runs (as ``send_c_store`` does when the reactor has not really paused)
    and each response awaited as ``send_c_store`` awaits it, against dcmtk ``storescp``.
    Without :func:`keep_responses_for_caller` the reactor took 40 of 100 responses here and
    each cost the sender its DIMSE timeout; with it none is lost."""
    port = free_port()
    pacs = start_storescp(tmp_path / "pacs", port)
    ae = AE(ae_title="RACE")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 2
    assoc = keep_responses_for_caller(ae.associate("127.0.0.1", port, ae_title="PACS"))
    try:
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        statuses = []
        for message_id in range(1, 41):
            req = C_ECHO()
            req.MessageID, req.AffectedSOPClassUID = message_id, Verification
            assoc.dimse.send_msg(req, context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
            statuses.append(None if rsp is None else rsp.Status)
        assert statuses == [StoreStatus.SUCCESS] * 40
    finally:
        assoc.release()
        stop_process(pacs)


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Record each call of ``StorageSCP.<name>`` (patched before the agent binds it)."""
    calls: list[str] = []
    real = getattr(StorageSCP, name)

    def counted(self: StorageSCP, *args: Any) -> Any:
        calls.append(name)
        return real(self, *args)

    monkeypatch.setattr(StorageSCP, name, counted)
    return calls


def _send_sample(port: int, count: int) -> list[int]:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = associate(ae, port)
    try:
        assert assoc.is_established
        statuses = []
        for path in sorted(SAMPLE.glob("*.dcm"))[:count]:
            ds = dcmread(path)
            ds.SOPInstanceUID = generate_uid()
            statuses.append(int(assoc.send_c_store(ds).Status))
        return statuses
    finally:
        assoc.release()


def test_plain_store_requests_are_served_directly_unless_another_handler_listens(
        running_agent: Callable[..., Agent], monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain C-STORE request is read from its bytes and handed to the SCP whole
    (``serve_stores_directly``), without pynetdicom's DIMSE decoding and ``EVT_C_STORE``; with
    pynetdicom's own message log bound (its logger at INFO) pynetdicom serves it as before.
    Either way every instance is stored and answered Success."""
    direct = _count_calls(monkeypatch, "_serve_store")
    decoded = _count_calls(monkeypatch, "_handle_store")
    agent = running_agent()
    assert _send_sample(agent.port, 3) == [StoreStatus.SUCCESS] * 3
    assert (len(direct), len(decoded)) == (3, 0)
    pynetdicom_logger = logging.getLogger("pynetdicom")
    level = pynetdicom_logger.level
    pynetdicom_logger.setLevel(logging.INFO)  # clears isEnabledFor's cache, unlike .level
    try:
        assert _send_sample(agent.port, 2) == [StoreStatus.SUCCESS] * 2
    finally:
        pynetdicom_logger.setLevel(level)
    assert (len(direct), len(decoded)) == (3, 2)
    assert agent.spool is not None and agent.spool.instance_count() == 5
