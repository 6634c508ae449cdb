"""What the DICOM listener bounds before a peer has associated (and, for a few things, after).

A peer that connects to the Storage SCP has proved nothing yet: the calling AE title is
checked only once its A-ASSOCIATE-RQ has been read, and a client certificate only once its TLS
handshake is over. Everything a peer can make the listener do before that is bounded here:

* **Connections** (:class:`ConnectionGuard`): at most ``max_associations`` connections at once
  (TLS handshakes and connections that have not associated yet included) and at most
  ``max_associations_per_peer`` from one IP address. A connection over the per-address limit is
  closed as soon as it is accepted (no thread, no read). When all ``max_associations`` slots
  are taken, the oldest connection that has not sent its A-ASSOCIATE-RQ after
  :data:`EVICT_AFTER_S` is closed to make room (a sender associates within milliseconds of
  connecting; a flood of idle connections from many addresses no longer locks senders out
  until ARTIM); only when every slot holds an association is the new connection refused. Every
  refusal and eviction is logged with the peer address and the reason.
* **TLS** (:class:`GuardedAssociationServer`): the handshake runs in the connection's own
  thread, never in the accept thread, and must finish within ``tls_handshake_timeout_s``; a
  failed handshake is logged with the peer and what failed (no client certificate, unknown CA,
  protocol version, timeout).
* **ARTIM**: a connection that sends no A-ASSOCIATE-RQ within ``artim_timeout_s`` is closed
  (PS3.8 9.1.5; pynetdicom's ARTIM and ACSE timeout are both set to it), and logged.
* **PDU lengths** (:class:`BoundedDUL`): the 6-byte PDU header is checked before anything is
  allocated for the PDU body: an A-ASSOCIATE-RQ may be at most :data:`MAX_ASSOCIATE_RQ_BYTES`,
  a P-DATA-TF at most the Maximum Length the SCP announced (:data:`MAX_PDU_BYTES`), release
  and abort PDUs their fixed 4 bytes. A longer PDU is answered with A-ABORT and the connection
  is closed; the 6-byte header costs 6 bytes.
* **Instance size**: the dataset fragments of one C-STORE may add up to at most
  ``max_instance_mib``; beyond that the association is aborted (the peer has associated, but
  an unbounded message would still be held in memory whole).
* **Idle associations**: an established association that sends nothing for
  ``dicom_idle_timeout_s`` is aborted, and a PDU whose bytes stop arriving for that long
  closes the connection (socket timeout).

Refusals are logged at WARNING, at most one line per peer and reason every
:data:`LOG_EVERY_S` (the next line says how many were not logged), and counted in the metric
``hust19_connections_refused{reason}``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Final, cast

from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from agent.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_PDU_BYTES: Final = 1 << 20
"""Maximum Length the SCP announces for the P-DATA-TF PDUs it receives (1 MiB: a 512x512 CT
instance fits one PDU). A longer P-DATA-TF PDU is refused before its body is read."""
MAX_ASSOCIATE_RQ_BYTES: Final = 128 << 10
"""Largest A-ASSOCIATE-RQ read (128 KiB). Real requests are a few KiB: 128 presentation
contexts of one abstract and a few transfer syntaxes each are about 20 KiB; a user identity
item (Kerberos ticket, SAML assertion, JWT) at most 64 KiB."""
FIXED_PDU_BODY_BYTES: Final = 4
"""The body of A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT PDUs (PS3.8 9.3.4, 9.3.6-9.3.8)."""
PDU_HEADER: Final = struct.Struct(">BBL")
PDU_HEADER_BYTES: Final = PDU_HEADER.size
PDV_HEADER: Final = struct.Struct(">LBB")
"""PDV item: length (of context ID, control header and fragment), context ID, control header."""
PDV_CONTROL_COMMAND: Final = 0x01
PDV_CONTROL_LAST: Final = 0x02
EVICT_AFTER_S: Final = 0.5
"""A connection that has not associated this long may be closed to make room for a new one
when every slot is taken."""
LOG_EVERY_S: Final = 10.0
"""One refusal line per peer and reason at most this often."""
THROTTLE_KEYS_MAX: Final = 4096
"""Peers and reasons remembered by the log throttle (oldest forgotten first)."""

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

# DUL state machine events (PS3.8 9.2.2)
EVT_TRANSPORT_CLOSED: Final = "Evt17"
EVT_INVALID_PDU: Final = "Evt19"

# Refusal reasons: the label of hust19_connections_refused
REASON_TOO_MANY: Final = "max_associations"
REASON_EVICTED: Final = "evicted"
REASON_TOO_MANY_FROM_PEER: Final = "max_associations_per_peer"
REASON_TLS: Final = "tls_handshake"
REASON_ARTIM: Final = "artim"
REASON_PDU_LENGTH: Final = "pdu_length"
REASON_INSTANCE_SIZE: Final = "instance_size"
REASON_BAD_PDU: Final = "bad_pdu"
REASON_ASSOCIATION_REJECTED: Final = "association_rejected"


@dataclass(frozen=True)
class Limits:
    """The bounds in force (from :class:`agent.config.Settings`)."""

    max_associations: int
    max_associations_per_peer: int
    artim_timeout_s: float
    tls_handshake_timeout_s: float
    idle_timeout_s: float
    max_instance_bytes: int
    max_pdu_bytes: int = MAX_PDU_BYTES


@dataclass
class _Slot:
    """One admitted connection."""

    host: str
    since: float
    sock: socket.socket
    associated: bool = False
    evicted: bool = False


class ConnectionGuard:
    """Connection slots (in total and per peer address), the refusal log and its metric.

    Thread-safe: the accept thread takes slots, connection threads give them back and say
    when their peer has associated."""

    def __init__(self, limits: Limits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._throttle: dict[tuple[str, str], tuple[float, int]] = {}

    @property
    def open_connections(self) -> int:
        """Connections holding a slot (those being closed to make room not counted)."""
        with self._lock:
            return sum(1 for slot in self._slots.values() if not slot.evicted)

    def admit(self, address: tuple[str, int], sock: socket.socket) -> bool:
        """Take a slot for a new connection from ``address``; ``False`` (logged) when a
        limit is reached and no idle connection can make room."""
        host, peer = address[0], f"{address[0]}:{address[1]}"
        victim: _Slot | None = None
        victim_peer = ""
        now = time.monotonic()
        with self._lock:
            live = [slot for slot in self._slots.values() if not slot.evicted]
            from_peer = sum(1 for slot in live if slot.host == host)
            if from_peer >= self.limits.max_associations_per_peer:
                reason, why = REASON_TOO_MANY_FROM_PEER, (
                    f"{from_peer} connections open from {host}, the limit is "
                    f"{self.limits.max_associations_per_peer} (max_associations_per_peer)")
            elif len(live) >= self.limits.max_associations:
                idle = [slot for slot in live if not slot.associated
                        and now - slot.since >= EVICT_AFTER_S]
                if not idle:
                    reason, why = REASON_TOO_MANY, (
                        f"{len(live)} connections open, the limit is "
                        f"{self.limits.max_associations} (max_associations)")
                else:
                    victim = min(idle, key=lambda slot: slot.since)
                    victim.evicted = True
                    victim_peer = next(f"{h}:{p}" for (h, p), slot in self._slots.items()
                                       if slot is victim)
            if from_peer < self.limits.max_associations_per_peer and (
                    len(live) < self.limits.max_associations or victim is not None):
                self._slots[(host, int(address[1]))] = _Slot(host, now, sock)
                reason = ""
        if victim is not None:
            self.refused(victim_peer, REASON_EVICTED,
                         f"connection closed after {now - victim.since:.1f} s without an "
                         f"A-ASSOCIATE-RQ to make room for {peer} (all "
                         f"{self.limits.max_associations} slots taken: max_associations)")
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)
        if reason:
            self.refused(peer, reason, f"connection closed at once: {why}")
            return False
        return True

    def associated(self, address: tuple[str, int]) -> None:
        """The connection from ``address`` sent its A-ASSOCIATE-RQ: never evicted now."""
        with self._lock:
            slot = self._slots.get((address[0], int(address[1])))
            if slot is not None:
                slot.associated = True

    def release(self, address: tuple[str, int]) -> None:
        """Give back the slot of a connection from ``address`` that has ended."""
        with self._lock:
            self._slots.pop((address[0], int(address[1])), None)

    def refused(self, peer: str, reason: str, text: str) -> None:
        """Count a refusal and log it (at most one line per peer and reason every
        :data:`LOG_EVERY_S`)."""
        self.metrics.connections_refused.labels(reason=reason).inc()
        now = time.monotonic()
        host = peer.rsplit(":", 1)[0]
        key = (host, reason)
        with self._lock:
            last, skipped = self._throttle.get(key, (-LOG_EVERY_S, 0))
            if now - last < LOG_EVERY_S:
                self._throttle[key] = (last, skipped + 1)
                return
            self._throttle.pop(key, None)
            self._throttle[key] = (now, 0)
            while len(self._throttle) > THROTTLE_KEYS_MAX:
                del self._throttle[next(iter(self._throttle))]
        more = f" ({skipped} more like it from {host} not logged)" if skipped else ""
        logger.warning("DICOM peer %s refused (%s): %s%s", peer, reason, text, more)


def peer_text(address: Any) -> str:
    """``host:port`` of a socket address tuple (IPv4 or IPv6)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


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
    closes: :meth:`agent.ingest.StorageSCP.stop` waits for the associations itself (bounded)
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
    body (see the module docstring). Installed on an acceptor before its thread starts
    (:func:`bound_dul`); the rest is pynetdicom's."""

    guard: ConnectionGuard
    refused: bool
    """Whether this DUL refused a PDU (the refusal is logged already)."""
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
            self.to_user_queue.put(None)

    def _read_pdu_data(self) -> None:
        """As pynetdicom's, with the length checked before the body is read."""
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(PDU_HEADER_BYTES)
        except OSError as exc:  # TimeoutError included
            self._closed("while a PDU header was expected", exc)
            return
        if len(header) != PDU_HEADER_BYTES:
            self._transport_closed()
            return
        pdu_type, _, length = PDU_HEADER.unpack(header)
        limit = self._limit(pdu_type)
        name = PDU_NAMES.get(pdu_type, f"0x{pdu_type:02X}")
        if limit is None:
            self._refuse(REASON_BAD_PDU, f"unknown PDU type 0x{pdu_type:02X}: aborted")
            return
        if length > limit:
            self._refuse(REASON_PDU_LENGTH, f"{name} PDU declares {length} bytes, at most "
                         f"{limit} are accepted: aborted before reading it")
            return
        try:
            body = sock.recv(length)
        except OSError as exc:
            self._closed(f"inside a {name} PDU ({length} bytes)", exc)
            return
        if len(body) != length:
            self._closed(f"inside a {name} PDU ({len(body)} of {length} bytes received)")
            return
        if pdu_type == P_DATA_TF and not self._count_dataset(body):
            return
        bytestream = header + body
        try:
            pdu, event = self._decode_pdu(bytestream)
        except Exception as exc:  # a malformed PDU: pynetdicom's own answer is Evt19 too
            self._refuse(REASON_BAD_PDU, f"{name} PDU cannot be decoded ({type(exc).__name__}"
                         f": {exc}): aborted")
            return
        if pdu_type == A_ASSOCIATE_RQ:
            self._rq_read = True
            requestor = self.assoc.requestor
            with contextlib.suppress(Exception):  # the slot is then merely evictable
                self.guard.associated((str(requestor.address), int(requestor.port)))
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

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


def bound_dul(dul: DULServiceProvider, guard: ConnectionGuard) -> bool:
    """Make ``dul`` (not started yet) a :class:`BoundedDUL`; ``False`` when the installed
    pynetdicom's DUL does not read PDUs the way this mirrors (then it is left as it is)."""
    if type(dul) is not DULServiceProvider or not hasattr(dul, "_read_pdu_data"):
        return False
    dul.__class__ = BoundedDUL  # same layout: only _read_pdu_data differs
    bounded = cast(BoundedDUL, dul)
    bounded.guard = guard
    bounded.refused = False
    bounded._dataset_bytes = 0
    bounded._rq_read = bounded._woken = False
    return True
