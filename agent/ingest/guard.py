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
* **TLS** (``GuardedAssociationServer``): the handshake runs in the connection's own
  thread, never in the accept thread, and must finish within ``tls_handshake_timeout_s``; a
  failed handshake is logged with the peer and what failed (no client certificate, unknown CA,
  protocol version, timeout).
* **ARTIM**: a connection that sends no A-ASSOCIATE-RQ within ``artim_timeout_s`` is closed
  (PS3.8 9.1.5; pynetdicom's ARTIM and ACSE timeout are both set to it), and logged.
* **PDU lengths** (``BoundedDUL``): the 6-byte PDU header is checked before anything is
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

This module holds the bounds, the connection slots and the refusal log; what enforces the
bounds inside pynetdicom (``GuardedAssociationServer``, ``BoundedDUL``) is in
``agent.ingest.pynetdicom_replacements``.

Refusals are logged at WARNING, at most one line per peer and reason every
:data:`LOG_EVERY_S` (the next line says how many were not logged), and counted in the metric
``hust19_connections_refused{reason}``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from agent.ops.metrics import Metrics

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
EVICT_AFTER_S: Final = 0.5
"""A connection that has not associated this long may be closed to make room for a new one
when every slot is taken."""
LOG_EVERY_S: Final = 10.0
"""One refusal line per peer and reason at most this often."""
THROTTLE_KEYS_MAX: Final = 4096
"""Peers and reasons remembered by the log throttle (oldest forgotten first)."""


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


