"""Where the agent replaces parts of pynetdicom, why, and for which pynetdicom.

pynetdicom is the agent's DICOM network stack. The Storage SCP (``agent.ingest.scp``) uses
its public API (``AE``, events and handlers); this module is the only one that reaches into
its internals. Each replacement is a subclass of the pynetdicom class it replaces that
changes one or two methods, and is put in place either through a hook pynetdicom offers
(``AE.make_server``'s ``server_class`` and ``request_handler``) or by swapping the class of an
object pynetdicom made, before that object is used (same layout: only methods differ).

========================== ============================== =========================================
replacement                replaces (pynetdicom)          why
========================== ============================== =========================================
GuardedAssociationServer   ``ThreadedAssociationServer``:  the TLS handshake ran in the accept
                           accept, TLS wrap, one thread    thread with no time limit (one silent
                           per connection                  client stopped every other sender);
                                                           nothing bounded connections that had
                                                           not associated, nor those per address
BoundedDUL                 ``DULServiceProvider.           a PDU body was read whatever length
                           _read_pdu_data``                its header declared (up to 4 GiB), one
                                                           C-STORE's dataset had no bound, and the
                                                           thread waiting for the A-ASSOCIATE-RQ
                                                           was not told when the connection ended
_GuardedRequestHandler     ``RequestHandler.handle`` and   installs the two above on each
                           ``_create_association``         acceptor; logs a connection closed by
                                                           ARTIM before it associated
_PromptAssociation         ``Association._run_reactor``    slept 1 ms before serving each
                                                           request (a fifth of the time per
                                                           instance)
_BulkReadSocket            ``AssociationSocket.recv``      4 KiB ``recv`` calls into a growing
                           and ``ready``                   buffer: ~130 calls and copies per CT
                                                           instance; the DUL thread slept blind
                                                           between polls of its socket
_QuickReplyDIMSE           ``DIMSEServiceProvider.         every response built, validated and
                           send_msg``                      encoded as a pydicom dataset: ~0.5 ms
                                                           for a 7-element C-STORE Success
BoundedDUL.direct_pdata    the state machine's DT-2 for    each P-DATA-TF PDU copied twice, decoded
                           P-DATA-TF in Sta6               into PDU objects, queued as an event
                                                           and dispatched by the state machine:
                                                           ~80 us per 128 KiB PDU, 6 per instance
serve_stores_directly      for a plain C-STORE-RQ: the     the command set decoded into a pydicom
(BoundedDUL.               DIMSE decoder, the request      dataset and a validated primitive, the
_take_store_fragment,      primitive, the Storage service  data set copied into a BytesIO, the
_serve_store)              class and ``EVT_C_STORE``, the  service class, an event and a response
                           Success response's encoding     primitive per instance: ~0.3 ms; read
                                                           and written as bytes instead
                                                           (``agent.ingest.store_command``)
_InlineStoreQueue          the DIMSE message queue         two thread hand-overs per C-STORE
                                                           request (network thread -> reactor ->
                                                           network thread)
_ResponseKeepingDIMSE      ``DIMSEServiceProvider.         as a *requestor* (the PACS sender, the
                           get_msg`` without blocking      test senders) the association's reactor
                                                           could take the response that
                                                           ``send_c_store`` waits for and drop it:
                                                           the sender waited its DIMSE timeout
========================== ============================== =========================================

Besides these, :data:`ASSOCIATION_ADJUSTMENTS` changes settings of each new association
(pynetdicom's per-message log handlers, the DUL polling period, ``TCP_NODELAY``).

Version guard. The replacements that only make the listener faster and are written against
the code of one pynetdicom release series (:class:`_PromptAssociation` copies its acceptor
loop; :class:`_BulkReadSocket`, :class:`_QuickReplyDIMSE`, :class:`_InlineStoreQueue`,
:attr:`BoundedDUL.direct_pdata` and :func:`serve_stores_directly` keep the contract of what
they replace there) are used only with that series,
:data:`MIRRORED_SERIES` (:func:`mirrors_installed_pynetdicom`); with any other pynetdicom its
own code runs instead (slower, the same protocol), said once in the log when the listener
starts. :class:`GuardedAssociationServer` overrides only ``socketserver`` hooks, and
:class:`BoundedDUL` bounds what a peer can make the listener read and hold, so both are used
with any pynetdicom: :func:`bound_dul` installs the latter on pynetdicom's own DUL class when
it has the method replaced (else it leaves the DUL as it is and logs a warning once).
:func:`keep_responses_for_caller`, a requestor's fix, applies to any pynetdicom whose DIMSE
provider is the stock class. A test fails when the installed pynetdicom leaves
:data:`MIRRORED_SERIES`: re-read the replaced methods in the new release, then move the guard.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from agent.ingest.guard import (
    FIXED_PDU_BODY_BYTES,
    MAX_ASSOCIATE_RQ_BYTES,
    REASON_ARTIM,
    REASON_BAD_PDU,
    REASON_INSTANCE_SIZE,
    REASON_PDU_LENGTH,
    REASON_TLS,
    ConnectionGuard,
    peer_text,
)
from agent.ingest.status import StoreStatus, error_comment
from agent.ingest.store_command import (
    Answer,
    StoreMessage,
    StoreRequest,
    encode_store_success,
    parse_store_request,
)

logger = logging.getLogger(__name__)

MIRRORED_SERIES: Final = "3.0."
"""The pynetdicom release series whose methods :class:`_PromptAssociation`,
:class:`_BulkReadSocket`, :class:`_QuickReplyDIMSE` and :class:`_InlineStoreQueue` copy."""

PDU_HEADER: Final = struct.Struct(">BBL")
PDU_HEADER_BYTES: Final = PDU_HEADER.size
PDV_HEADER: Final = struct.Struct(">LBB")
"""PDV item: length (of context ID, control header and fragment), context ID, control header."""
PDV_CONTROL_COMMAND: Final = 0x01
PDV_CONTROL_LAST: Final = 0x02

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ: Final = 0x01
A_ASSOCIATE_AC: Final = 0x02
A_ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
A_RELEASE_RQ: Final = 0x05
A_RELEASE_RP: Final = 0x06
A_ABORT: Final = 0x07
PDU_NAMES: Final = {A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
                    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", P_DATA_TF: "P-DATA-TF",
                    A_RELEASE_RQ: "A-RELEASE-RQ", A_RELEASE_RP: "A-RELEASE-RP",
                    A_ABORT: "A-ABORT"}

# DUL state machine events and states (PS3.8 9.2)
EVT_TRANSPORT_CLOSED: Final = "Evt17"
EVT_INVALID_PDU: Final = "Evt19"
STA_ESTABLISHED: Final = "Sta6"


ACTIVE_DUL_LOOP_DELAY_S: Final = 0.0001
"""Polling period of an association's DUL reactor thread (pynetdicom's default is 1 ms).

pynetdicom polls its socket and its outgoing queue in a loop that sleeps this long whenever
it found nothing to do, so every request and every response waits up to one period. The
thread lives only while its association is open (the idle listener does not poll), so a short
period costs CPU only during an association. With the mirrored pynetdicom series the DUL
does not sleep at all: it waits for data in :attr:`_BulkReadSocket.ready` (a sleep here costs
~0.08 ms even when asked for 0 s)."""

PDV_HEADER_BYTES: Final = 6
"""PDV item length (4), presentation context ID (1), message control header (1)."""
LAST_COMMAND_FRAGMENT: Final = b"\x03"
"""Message control header: command, last fragment."""

_PYNETDICOM_LOGGER: Final = logging.getLogger("pynetdicom")
_STANDARD_LOG_HANDLERS: Final = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)
"""pynetdicom's default per-message logging handlers (debug and info lines only)."""
_PER_PDU_EVENTS: Final = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)
"""Events pynetdicom fires for each PDU it receives on its own way, not on
:meth:`BoundedDUL._deliver_pdata`'s."""

_STOOD_IN_FOR_EVENTS: Final = (evt.EVT_C_STORE, evt.EVT_DIMSE_RECV)
"""Events pynetdicom fires for a C-STORE request that a direct store handler stands in for
(:func:`serve_stores_directly`)."""
_UNSERVED_EVENTS: Final = (evt.EVT_DIMSE_SENT, evt.EVT_PDU_SENT, evt.EVT_DATA_SENT)
"""Events of pynetdicom's way of sending a response that the direct Success answer does not
fire: with a handler bound to one, pynetdicom serves the request."""

StoreHandler = Callable[[Association, StoreMessage], Answer]
"""Serves a C-STORE request read directly: (association, request) -> the status, as a handler
bound to pynetdicom's ``EVT_C_STORE`` returns it, and what to run once it is sent."""


@dataclass
class _StoreInProgress:
    """A C-STORE request served directly whose data set is arriving."""

    context_id: int
    transfer_syntax_uid: str
    request: StoreRequest
    fragments: list[memoryview] = field(default_factory=list)


REACTOR_CHECK_S: Final = 0.001
"""How often an association's reactor checks for release, abort and the idle timeout (as
pynetdicom does), while it waits for the next DIMSE message."""



def _address(client_address: Any) -> tuple[str, int]:
    """``(host, port)`` of a socket address tuple (IPv4 or IPv6)."""
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return str(client_address[0]), int(client_address[1])
    return str(client_address), 0


def _tls_failure(exc: BaseException) -> str:
    """What failed in a TLS handshake, in words."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"{exc.reason or exc}".replace("_", " ").lower()
    return f"{type(exc).__name__}: {exc}"


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with connection slots and the TLS handshake
    in the connection's thread (bounded by a timeout) instead of the accept thread.

    Connection threads are daemon threads and the server does not wait for them when it
    closes: :meth:`agent.ingest.scp.StorageSCP.stop` waits for the associations itself (bounded)
    and aborts what is left."""

    daemon_threads = True
    block_on_close = False
    guard: ConnectionGuard

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only: the TLS handshake happens in :meth:`process_request_thread`."""
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection slot (on the accept thread: no I/O, no allocation)."""
        return self.guard.admit(_address(client_address), cast(socket.socket, request))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = _address(client_address)
        peer = peer_text(client_address)
        limits = self.guard.limits
        try:
            sock = cast(socket.socket, request)
            if self.ssl_context is not None:
                tls = self._handshake(sock, peer)
                if tls is None:
                    return
                sock = tls
            sock.settimeout(limits.idle_timeout_s)
            self.finish_request(sock, client_address)
        except Exception:
            logger.exception("DICOM connection from %s failed", peer)
            self.shutdown_request(request)
        finally:
            self.guard.release(address)

    def _handshake(self, sock: socket.socket, peer: str) -> ssl.SSLSocket | None:
        """The server side of the TLS handshake, within the handshake timeout; ``None`` (the
        failure logged, the socket closed) if it fails."""
        assert self.ssl_context is not None
        timeout = self.guard.limits.tls_handshake_timeout_s
        try:
            sock.settimeout(timeout)
            tls = self.ssl_context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)
            tls.do_handshake()
            return tls
        except (OSError, ssl.SSLError) as exc:
            what = _tls_failure(exc)
            if what == "timed out":
                what = f"no TLS handshake within {timeout:g} s (tls_handshake_timeout_s)"
            self.guard.refused(peer, REASON_TLS, f"TLS handshake failed: {what}")
            with contextlib.suppress(OSError):
                sock.close()
            return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("DICOM connection from %s failed", peer_text(client_address))


class BoundedDUL(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer provider, checking each PDU's length before it reads the
    body (the bounds: ``agent.ingest.guard``). Installed on an acceptor before its thread
    starts (:func:`bound_dul`); the rest is pynetdicom's."""

    guard: ConnectionGuard
    refused: bool
    """Whether this DUL refused a PDU (the refusal is logged already)."""
    direct_pdata: bool
    """Whether P-DATA-TF PDUs of the established association go straight to the DIMSE
    provider (:meth:`_deliver_pdata`; the mirrored pynetdicom series only)."""
    store_handler: StoreHandler | None
    """Serves the C-STORE requests read from their bytes (:meth:`_take_store_fragment`);
    set by :func:`serve_stores_directly`."""
    _handlers_standing_in_for: tuple[tuple[evt.EventType, Callable[..., Any]], ...]
    _store: _StoreInProgress | None
    _dataset_bytes: int
    _rq_read: bool
    _woken: bool

    def _peer(self) -> str:
        requestor = self.assoc.requestor
        try:
            return f"{requestor.address}:{requestor.port}"
        except Exception:  # not known yet
            return "?"

    def _limit(self, pdu_type: int) -> int | None:
        if pdu_type == A_ASSOCIATE_RQ:
            return MAX_ASSOCIATE_RQ_BYTES
        if pdu_type == A_ASSOCIATE_AC:  # never sent to an acceptor: refused by the FSM
            return MAX_ASSOCIATE_RQ_BYTES
        if pdu_type == P_DATA_TF:
            announced = int(self.assoc.acceptor.maximum_length or 0)
            return announced or self.guard.limits.max_pdu_bytes
        if pdu_type in (A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
            return FIXED_PDU_BODY_BYTES
        return None

    def _refuse(self, reason: str, text: str) -> None:
        """Abort: the state machine answers an invalid PDU with A-ABORT; no more is read."""
        self.refused = True
        self.guard.refused(self._peer(), reason, text)
        self._wake_waiting_acceptor()
        self.event_queue.put(EVT_INVALID_PDU)
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def _closed(self, what: str, exc: BaseException | None = None) -> None:
        logger.info("DICOM connection from %s closed %s%s", self._peer(), what,
                    f" ({type(exc).__name__}: {exc})" if exc is not None else "")
        self._transport_closed()

    def _transport_closed(self) -> None:
        self._wake_waiting_acceptor()
        self.event_queue.put(EVT_TRANSPORT_CLOSED)

    def _wake_waiting_acceptor(self) -> None:
        """Until an A-ASSOCIATE-RQ has been read, the association thread waits up to the
        ARTIM timeout for one; a connection that ended or was refused before it gives none,
        so that thread is told at once (``None``: pynetdicom's "no request" answer) and the
        connection's slot is free again. Only this DUL reads PDUs, so no request can be
        queued ahead of the ``None``."""
        if not self._rq_read and not self._woken:
            self._woken = True
            self.to_user_queue.put(cast(Any, None))  # pynetdicom: "no request"

    def _read_pdu_data(self) -> None:
        """As pynetdicom's, with the length checked before the body is read; with
        :attr:`direct_pdata`, the P-DATA-TF PDUs of a message that follow each other are read
        in one call (:meth:`_read_pdu`)."""
        while self._read_pdu():
            pass

    def _read_pdu(self) -> bool:
        """Read one PDU; ``True`` when the next one should be read at once: this one was
        delivered directly (:meth:`_deliver_pdata`), nothing waits to be sent and more data has
        arrived. pynetdicom's DUL thread sleeps whenever a pass of its loop queued no event,
        ~80 us here even for ``sleep(0)``; a directly delivered PDU queues none, so the
        fragments of one message are read here without returning to that loop."""
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(PDU_HEADER_BYTES)
        except OSError as exc:  # TimeoutError included
            self._closed("while a PDU header was expected", exc)
            return False
        if len(header) != PDU_HEADER_BYTES:
            self._transport_closed()
            return False
        pdu_type, _, length = PDU_HEADER.unpack(header)
        limit = self._limit(pdu_type)
        name = PDU_NAMES.get(pdu_type, f"0x{pdu_type:02X}")
        if limit is None:
            self._refuse(REASON_BAD_PDU, f"unknown PDU type 0x{pdu_type:02X}: aborted")
            return False
        if length > limit:
            self._refuse(REASON_PDU_LENGTH, f"{name} PDU declares {length} bytes, at most "
                         f"{limit} are accepted: aborted before reading it")
            return False
        try:
            body = sock.recv(length)
        except OSError as exc:
            self._closed(f"inside a {name} PDU ({length} bytes)", exc)
            return False
        if len(body) != length:
            self._closed(f"inside a {name} PDU ({len(body)} of {length} bytes received)")
            return False
        if pdu_type == P_DATA_TF:
            if not self._count_dataset(body):
                return False
            if self.direct_pdata and self._deliver_pdata(body):
                if self.refused:
                    return False
                if self.to_provider_queue.queue:  # a response: out before the next read
                    self._process_recv_primitive()  # its event, as the loop would queue it
                    return False
                return bool(sock.ready)
        bytestream = header + body
        try:
            pdu, event = self._decode_pdu(bytestream)
        except Exception as exc:  # a malformed PDU: pynetdicom's own answer is Evt19 too
            self._refuse(REASON_BAD_PDU, f"{name} PDU cannot be decoded ({type(exc).__name__}"
                         f": {exc}): aborted")
            return False
        if pdu_type == A_ASSOCIATE_RQ:
            self._rq_read = True
            requestor = self.assoc.requestor
            with contextlib.suppress(Exception):  # the slot is then merely evictable
                self.guard.associated((str(requestor.address), int(requestor.port)))
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)
        return False

    def _deliver_pdata(self, body: bytearray) -> bool:
        """Give the PDVs of a P-DATA-TF PDU to the DIMSE provider as pynetdicom's state machine
        does in Sta6 (Evt10, DT-2: a P-DATA indication, the state stays Sta6), without copying
        the PDU twice, decoding it into PDU objects and queueing it as an event first: the
        fragments are views of ``body``. ``False`` (nothing done) when the PDU must take
        pynetdicom's way: another state, an event or PDU queued ahead of it, or a handler bound
        to an event that way fires (the PDU, data and state-machine events). ``True`` also when
        the PDU was refused (malformed PDV items: the association is aborted, as pynetdicom
        aborts on a PDU it cannot decode)."""
        assoc = self.assoc
        if (self.state_machine.current_state != STA_ESTABLISHED or self.event_queue.queue
                or self._recv_pdu.queue or any(assoc.get_handlers(event)
                                               for event in _PER_PDU_EVENTS)):
            return False
        view = memoryview(body)
        values: list[tuple[int, memoryview]] = []
        pos, end = 0, len(body)
        while pos < end:
            if pos + PDV_HEADER_BYTES > end:
                self._refuse(REASON_BAD_PDU, f"P-DATA-TF PDU: {end - pos} bytes after the last "
                             "PDV item, too few for an item header: aborted")
                return True
            item_length, context_id, _ = PDV_HEADER.unpack_from(body, pos)
            if item_length < 2 or pos + 4 + item_length > end:
                self._refuse(REASON_BAD_PDU, f"P-DATA-TF PDU: a PDV item declares {item_length} "
                             f"bytes, {end - pos - 4} are left in the PDU: aborted")
                return True
            values.append((context_id, view[pos + 5:pos + 4 + item_length]))  # control + data
            pos += 4 + item_length
        if not values:
            self._refuse(REASON_BAD_PDU, "P-DATA-TF PDU without PDV items: aborted")
            return True
        if self.store_handler is None:
            self._to_dimse(values)
            return True
        left: list[tuple[int, memoryview]] = []
        for item in values:
            if not self._take_store_fragment(item, left):
                left.append(item)
            if self.refused:
                return True
        self._to_dimse(left)
        return True

    def _to_dimse(self, values: list[tuple[int, memoryview]]) -> None:
        """Hand PDV items to pynetdicom's DIMSE decoder, as its P-DATA indication would."""
        if not values:
            return
        pdata = P_DATA()
        # the getter's list, without the setter's per-item type check (bytes only, no views):
        # pynetdicom's DIMSE decoder reads each value by index and slice
        pdata._presentation_data_value_list = cast(list[tuple[int, bytes]], values)
        self.assoc.dimse.receive_primitive(pdata)

    def _take_store_fragment(self, item: tuple[int, memoryview],
                             before: list[tuple[int, memoryview]]) -> bool:
        """Read a PDV item as part of a C-STORE request served directly: ``True`` when it was
        (or was refused), ``False`` when it is pynetdicom's to decode. A request is served
        directly when its command set comes whole in one fragment, is a plain C-STORE-RQ
        (``agent.ingest.store_command``) on an accepted presentation context, pynetdicom is
        not in the middle of a message and no handler other than the ones
        :attr:`store_handler` stands in for is bound to the events pynetdicom's way would fire
        (``before``: this PDU's items for pynetdicom, handed over first to keep the order)."""
        context_id, value = item
        control = value[0]
        store = self._store
        if store is not None:
            if control & PDV_CONTROL_COMMAND or context_id != store.context_id:
                self._store = None
                self._refuse(REASON_BAD_PDU, "a P-DATA-TF PDU sent a command fragment or another"
                             " presentation context's fragment inside a C-STORE data set: "
                             "aborted")
                return True
            store.fragments.append(value[1:])
            if control & PDV_CONTROL_LAST:
                self._store = None
                self._serve_store(store)
            return True
        if control & (PDV_CONTROL_COMMAND | PDV_CONTROL_LAST) != (PDV_CONTROL_COMMAND
                                                                  | PDV_CONTROL_LAST):
            return False
        request = parse_store_request(value[1:])
        if request is None:
            return False
        self._to_dimse(before)
        before.clear()
        assoc = self.assoc
        context = assoc._accepted_cx.get(context_id)
        if (assoc.dimse.message is not None or context is None or assoc._sent_release
                or uid_to_service_class(request.sop_class_uid) is not StorageServiceClass
                or request.sop_class_uid in assoc.acceptor.accepted_common_extended
                or not self._only_handlers_stood_in_for()):
            return False
        self._store = _StoreInProgress(context_id, str(context.transfer_syntax[0]), request)
        return True

    def _only_handlers_stood_in_for(self) -> bool:
        assoc = self.assoc
        if any(assoc.get_handlers(event) for event in _UNSERVED_EVENTS):
            return False
        return all((event, handler) in self._handlers_standing_in_for
                   for event in _STOOD_IN_FOR_EVENTS
                   for handler in _bound_handlers(assoc, event))

    def _serve_store(self, store: _StoreInProgress) -> None:
        """Run :attr:`store_handler` on a complete request, send its response (a Success
        directly, :func:`agent.ingest.store_command.encode_store_success`, anything else
        through pynetdicom, as its Storage service class does), then run what the handler
        asked to run after it: before this thread reads the sender's next request."""
        assoc, request = self.assoc, store.request
        message = StoreMessage(store.context_id, store.transfer_syntax_uid, request,
                               b"".join(store.fragments))
        store.fragments.clear()
        handler = cast(StoreHandler, self.store_handler)
        after: Callable[[], None] | None = None
        try:
            status, after = handler(assoc, message)
        except Exception as exc:  # as pynetdicom answers a handler's exception
            logger.exception("C-STORE request (message ID %s, SOP instance %s): the handler "
                             "failed", request.message_id, request.sop_instance_uid)
            failure = Dataset()
            failure.Status = int(StoreStatus.PROCESSING_FAILURE)
            failure.ErrorComment = error_comment(f"internal error: {type(exc).__name__}")
            status = failure
        try:
            if assoc.is_established:
                self._answer_store(store, status)
        finally:
            if after is not None:
                after()

    def _answer_store(self, store: _StoreInProgress, status: Dataset | int) -> None:
        """Send the response: a Success as bytes when nothing else waits to be sent and it
        fits the peer's maximum PDU length, otherwise through pynetdicom."""
        request = store.request
        if (isinstance(status, int) and status == StoreStatus.SUCCESS
                and not self.to_provider_queue.queue):
            command = encode_store_success(request.message_id, request.sop_class_uid,
                                           request.sop_instance_uid)
            max_pdu = self.assoc.dimse.maximum_pdu_size
            if not max_pdu or len(command) + PDV_HEADER_BYTES <= max_pdu:
                cast(AssociationSocket, self.socket).send(_command_pdu(store.context_id,
                                                                       command))
                return
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = request.message_id
        rsp.AffectedSOPClassUID = request.sop_class_uid
        rsp.AffectedSOPInstanceUID = request.sop_instance_uid
        rsp = StorageServiceClass(self.assoc).validate_status(status, rsp)
        self.assoc.dimse.send_msg(rsp, store.context_id)

    def _count_dataset(self, body: bytes | bytearray) -> bool:
        """Add up the dataset fragments of the message being received; ``False`` (aborted)
        once one message's dataset is past ``max_instance_bytes``."""
        limit = self.guard.limits.max_instance_bytes
        pos, end = 0, len(body)
        total = getattr(self, "_dataset_bytes", 0)
        while pos + PDV_HEADER.size <= end:
            item_length, _context, control = PDV_HEADER.unpack_from(body, pos)
            if item_length < 2:
                break  # malformed: pynetdicom's decoder says so
            if not control & PDV_CONTROL_COMMAND:
                total += item_length - 2
                if total > limit:
                    self._dataset_bytes = 0
                    self._refuse(REASON_INSTANCE_SIZE, f"a C-STORE dataset is past "
                                 f"{limit} bytes (max_instance_mib): association aborted")
                    return False
                if control & PDV_CONTROL_LAST:
                    total = 0
            pos += 4 + item_length
        self._dataset_bytes = total
        return True


_unbounded_logged: Final = threading.Event()
"""Set once the warning that the DUL could not be bounded has been logged."""


def bound_dul(dul: DULServiceProvider, guard: ConnectionGuard) -> bool:
    """Make ``dul`` (not started yet) a :class:`BoundedDUL`; ``False`` when the installed
    pynetdicom's DUL does not read PDUs the way this mirrors (then it is left as it is)."""
    if type(dul) is not DULServiceProvider or not hasattr(dul, "_read_pdu_data"):
        if not _unbounded_logged.is_set():
            _unbounded_logged.set()
            logger.warning("pynetdicom %s: its DUL (%s) does not read PDUs as the agent's "
                           "bounded reader expects: PDU lengths and instance sizes are not "
                           "bounded before they are read", pynetdicom.__version__,
                           type(dul).__name__)
        return False
    dul.__class__ = BoundedDUL  # same layout: only methods differ
    bounded = cast(BoundedDUL, dul)
    bounded.guard = guard
    bounded.refused = bounded.direct_pdata = False
    bounded._dataset_bytes = 0
    bounded._rq_read = bounded._woken = False
    bounded.store_handler = bounded._store = None
    bounded._handlers_standing_in_for = ()
    return True


def serve_stores_directly(assoc: Association, handler: StoreHandler, *,
                          standing_in_for: tuple[tuple[evt.EventType, Callable[..., Any]], ...]
                          ) -> bool:
    """Have ``assoc``'s DUL serve plain C-STORE requests itself: read from their bytes,
    handed to ``handler`` whole, Success answered directly (:meth:`BoundedDUL._serve_store`).
    ``standing_in_for``: the (event, handler) bindings ``handler`` replaces for those
    requests; with any other handler bound to these events, pynetdicom serves the request.
    ``False`` (nothing changed) without the direct P-DATA path (another pynetdicom)."""
    dul = assoc.dul
    if not isinstance(dul, BoundedDUL) or not dul.direct_pdata:
        return False
    dul.store_handler = handler
    dul._handlers_standing_in_for = standing_in_for
    return True


class _PromptAssociation(Association):
    """An acceptor that starts serving a DIMSE message as soon as it is decoded.

    pynetdicom's acceptor reactor (``Association._run_reactor``, 3.0) sleeps 1 ms, then looks
    for a decoded message: every request waits up to 1 ms before its handler runs (about a
    fifth of the time per instance once the spool costs one fsync). This is the same loop with
    the sleep replaced by a wait on the DIMSE message queue, bounded by the same 1 ms, so the
    release/abort/idle checks run as often as before and an idle association costs no more
    CPU. Used only with the pynetdicom series it mirrors (:data:`MIRRORED_SERIES`).
    """

    def _wait_for_message(self, timeout_s: float) -> None:
        queue = self.dimse.msg_queue
        with queue.not_empty:
            if not queue.queue:
                queue.not_empty.wait(timeout_s)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._wait_for_message(REACTOR_CHECK_S)
            # From here on as pynetdicom 3.0: the pause checkpoint for send_*() from handlers,
            # one message served, then release, abort, DUL liveness and idle timeout.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                # released before the A-RELEASE-RP goes out (pynetdicom sets it after), so
                # that the connection-closed handler never sees a release as an abort
                self.is_released = True
                self.acse.send_release(is_response=True)
                logger.debug("association released by the peer")
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                logger.error("DICOM association with %s: network timeout reached",
                             self.requestor.ae_title)
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class _BulkReadSocket(AssociationSocket):
    """pynetdicom's association socket, reading a PDU with as few system calls as it can,
    and waking its DUL thread as soon as data arrives.

    pynetdicom 3.0 reads ``nr_bytes`` in 4 KiB ``recv`` calls appended to a growing
    ``bytearray``: 32 calls and copies for each 128 KiB P-DATA PDU that dcmtk sends, about
    130 for one 512x512 CT instance. :meth:`recv` reads into a buffer of the final size with
    ``recv_into``, as much as the kernel has per call. Same contract: blocks until
    ``nr_bytes`` arrived, returns what arrived before the peer closed the connection, and
    raises what the socket raises (timeouts included), with or without TLS.

    pynetdicom's DUL thread sleeps its polling period whenever a pass found nothing to do,
    then asks :attr:`ready` whether data arrived (without waiting): a PDU that arrives during
    the sleep waits for its end, and with :attr:`BoundedDUL.direct_pdata` (no event queued per
    PDU) every PDU found the queue empty and slept once. Here the DUL does not sleep
    (``_run_loop_delay`` 0, set with this class) and :attr:`ready` waits in ``select`` for up
    to :data:`REACTOR_CHECK_S`: data wakes it at once; a primitive queued by another thread
    (the reactor's C-ECHO or A-RELEASE answers; C-STORE answers are queued on this thread)
    waits up to that long, as with pynetdicom's own polling period.
    """

    wait_s: float = REACTOR_CHECK_S

    @property
    def ready(self) -> bool:
        """Whether data can be read, after waiting up to :attr:`wait_s` for it (pynetdicom's
        answer for a closed socket, ``False``, after the wait: the DUL does not spin)."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(self.wait_s)
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes buffered where select cannot see them
        try:
            readable, _, _ = select.select([sock], [], [], self.wait_s)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put(EVT_TRANSPORT_CLOSED)
            return False
        return bool(readable)

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = sock.recv_into(view[received:], nr_bytes - received)
            if count == 0:
                del view
                del buffer[received:]
                break
            received += count
        return buffer




def encode_store_success_primitive(rsp: C_STORE) -> bytes | None:
    """The Command Set of ``rsp`` when it is a plain C-STORE-RSP Success
    (:func:`agent.ingest.store_command.encode_store_success`), ``None`` for any other primitive
    (requests, failures, an Error Comment or Offending Element): those go through pynetdicom's
    encoder."""
    if (type(rsp) is not C_STORE or rsp.MessageIDBeingRespondedTo is None or rsp.Status != 0
            or rsp.ErrorComment is not None or rsp.OffendingElement is not None
            or rsp.AffectedSOPClassUID is None or rsp.AffectedSOPInstanceUID is None):
        return None
    return encode_store_success(rsp.MessageIDBeingRespondedTo, str(rsp.AffectedSOPClassUID),
                                str(rsp.AffectedSOPInstanceUID))


def _command_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU carrying ``command`` whole in one PDV item (PS3.8 9.3.5)."""
    item = PDV_HEADER.pack(len(command) + 2, context_id, PDV_CONTROL_COMMAND | PDV_CONTROL_LAST)
    return PDU_HEADER.pack(P_DATA_TF, 0, len(item) + len(command)) + item + command


def _bound_handlers(assoc: Association, event: evt.EventType) -> list[Callable[..., Any]]:
    bound: Any = assoc.get_handlers(event)
    if isinstance(bound, tuple):  # an intervention event: (handler, args), or (None, None)
        return [] if bound[0] is None else [bound[0]]
    return [handler for handler, _args in bound]


class _QuickReplyDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending a plain C-STORE Success response directly.

    pynetdicom 3.0 turns every response primitive into a pydicom dataset, validates and
    encodes it, then cuts it into P-DATA fragments: about 0.5 ms here, a tenth of the time per
    instance. A Success response is 7 fixed elements; :func:`encode_store_success` writes them
    and they go out in one P-DATA PDU, as pynetdicom would send them. Anything else, or when a
    handler is bound to ``EVT_DIMSE_SENT`` (pynetdicom's message log at DEBUG), takes
    pynetdicom's path.
    """

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = encode_store_success_primitive(primitive)
        max_pdu = self.maximum_pdu_size
        if (command is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
                or (max_pdu and len(command) + PDV_HEADER_BYTES > max_pdu)):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + command))
        self.dul.send_pdu(pdata)


class _InlineStoreQueue(queue.Queue[Any]):
    """The DIMSE message queue of an association that serves C-STORE requests at once.

    pynetdicom's network (DUL) thread decodes a request and puts it on this queue; the
    association's reactor thread takes it, runs the handler and queues the response back to
    the network thread: two thread hand-overs (and GIL transfers) per instance, in series
    with the sender, who waits for each response. A C-STORE request is served here, on the
    network thread, as pynetdicom itself does with N-EVENT-REPORT requests; the sender sends
    nothing else until it has the response (the SCP negotiates no asynchronous operations), so
    nothing waits behind it. Every other message goes on the queue as before.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, msg = item
        if type(msg) is not C_STORE or msg.MessageIDBeingRespondedTo is not None:
            super().put(item, block, timeout)
            return
        try:
            self._assoc._serve_request(msg, context_id)
        except Exception:  # never into pynetdicom's network thread
            logger.exception("C-STORE request (message ID %s) could not be served",
                             msg.MessageID)


class _ResponseKeepingDIMSE(DIMSEServiceProvider):
    """A requestor's DIMSE provider whose reactor thread never takes a response.

    pynetdicom's ``send_c_store`` (and the other ``send_*``) pauses the association's reactor
    thread, sends the request and waits for the response with a blocking ``get_msg``; the
    reactor takes incoming requests with a non-blocking ``get_msg``. The pause handshake reads
    ``_is_paused``, which the reactor leaves ``True`` for a moment after the previous request
    let it go; a response that arrives in that window is taken by the reactor, which finds it
    is no request ("Received unexpected C-STORE service message") and drops it, and the sender
    waits its whole DIMSE timeout, then aborts. Measured here with pynetdicom 3.0.4: 4 of 32
    runs of a 60-instance resend under CPU and fsync load lost a response that way. Here a
    non-blocking ``get_msg`` (only the reactor makes one) takes a message only when it is a
    request; a response stays on the queue for the blocking caller.
    """

    def get_msg(self, block: bool = False) -> Any:
        if not block:
            with self.msg_queue.mutex:
                msg = self.msg_queue.queue[0][1] if self.msg_queue.queue else None
            if msg is None or not msg.is_valid_request:  # (None, None) wakes the caller too
                return None, None
        return super().get_msg(block)


def keep_responses_for_caller(assoc: Association) -> Association:
    """``assoc`` (a requestor, just established, before its first ``send_*``) with responses
    kept for the ``send_*`` call that waits for them (:class:`_ResponseKeepingDIMSE`); left
    as it is when its DIMSE provider is not pynetdicom's own class."""
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = _ResponseKeepingDIMSE  # same layout: only get_msg() differs
    return assoc


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating acceptors whose DUL bounds what it reads
    (:class:`BoundedDUL`) and, with the pynetdicom series it mirrors,
    :class:`_PromptAssociation` acceptors. It stays with its connection until the association
    thread ends, so that the connection's slot is given back then (the server runs it in the
    connection's thread), and says when a connection ended without associating."""

    server: GuardedAssociationServer
    prompt: bool = False

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if self.prompt:
            assoc.__class__ = _PromptAssociation  # same object layout: only the reactor differs
        bound_dul(assoc.dul, self.server.guard)
        return assoc

    def handle(self) -> None:
        started = time.monotonic()
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        if assoc.requestor.primitive is not None or getattr(assoc.dul, "refused", False):
            return
        waited = time.monotonic() - started
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        artim = self.server.guard.limits.artim_timeout_s
        if waited >= artim:
            self.server.guard.refused(peer, REASON_ARTIM, f"no A-ASSOCIATE-RQ within {artim:g} s"
                                      " (ARTIM): connection closed")
        else:
            logger.debug("DICOM connection from %s closed by the peer before associating "
                         "(%.1f s)", peer, waited)


class _PromptRequestHandler(_GuardedRequestHandler):
    prompt = True


def mirrors_installed_pynetdicom() -> bool:
    """Whether the installed pynetdicom is of the release series the mirrors copy
    (:data:`MIRRORED_SERIES`): the version guard."""
    return str(pynetdicom.__version__).startswith(MIRRORED_SERIES)


def request_handler() -> type[RequestHandler]:
    """The request handler for the installed pynetdicom (pynetdicom's reactor outside the
    mirrored series)."""
    if mirrors_installed_pynetdicom():
        return _PromptRequestHandler
    logger.info("pynetdicom %s: its own association reactor, socket read and DIMSE send are "
                "used (1 ms polling; the agent's copies mirror pynetdicom %sx)",
                pynetdicom.__version__, MIRRORED_SERIES)
    return _GuardedRequestHandler




def _quiet_standard_log_handlers(assoc: Association) -> None:
    """pynetdicom's per-message log handlers: after ours, or not bound at all."""
    if _PYNETDICOM_LOGGER.isEnabledFor(logging.INFO):
        # pynetdicom's own DIMSE log handler is bound first and raises on a C-STORE without
        # Affected SOP Instance UID, which would skip ours: move it after ours.
        bound = [h[0] for h in cast(list[Any], assoc.get_handlers(evt.EVT_DIMSE_RECV))]
        if standard_dimse_recv_handler in bound:
            assoc.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
            assoc.bind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
    else:
        # Its lines would be dropped, but the handlers still format them for every message
        # and PDU (and copy each received dataset once to test that it is not empty): not
        # bound for this association's messages.
        for event_type, handler in _STANDARD_LOG_HANDLERS:
            assoc.unbind(event_type, handler)


def _shorten_dul_polling(assoc: Association) -> None:
    assoc.dul._run_loop_delay = ACTIVE_DUL_LOOP_DELAY_S


def _install_fast_paths(assoc: Association) -> None:
    """The socket read, DIMSE send and message queue replacements, on an acceptor of the
    mirrored series (:class:`_PromptAssociation`) only."""
    if not isinstance(assoc, _PromptAssociation):
        return
    if type(assoc.dul.socket) is AssociationSocket:
        assoc.dul.socket.__class__ = _BulkReadSocket  # same layout: recv() and ready differ
        assoc.dul._run_loop_delay = 0  # the DUL waits in _BulkReadSocket.ready instead
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = _QuickReplyDIMSE  # same layout: only send_msg() differs
        assoc.dimse.msg_queue = _InlineStoreQueue(assoc)  # nothing queued yet
    if isinstance(assoc.dul, BoundedDUL):
        assoc.dul.direct_pdata = True


def _set_tcp_nodelay(assoc: Association) -> None:
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


ASSOCIATION_ADJUSTMENTS: Final[tuple[tuple[str, Callable[[Association], None]], ...]] = (
    ("adjusting pynetdicom's logging handlers", _quiet_standard_log_handlers),
    ("shortening the DUL polling period", _shorten_dul_polling),
    ("installing the fast C-STORE paths", _install_fast_paths),
    ("setting TCP_NODELAY", _set_tcp_nodelay),
)
"""What the SCP does to each new association when its connection opens (``EVT_CONN_OPEN``),
in order, each with what to call it in a log line if it fails (the association goes on)."""
