"""The DICOM Storage SCP: receives CT instances over C-STORE and spools them durably.

Protocol roles, cut as pynetdicom cuts them:

* association setup (:meth:`StorageSCP.start`): the presentation contexts (CT Image Storage,
  Enhanced CT Image Storage, Verification) with every transfer syntax the product accepts *as
  received* (nothing is transcoded; ``agent.ingest.instance``), the calling-AE allow-list
  (pynetdicom answers an unknown AE with A-ASSOCIATE-RJ rejected-permanent / service-user /
  calling-AE-title-not-recognized, and we log it), the connection bounds
  (``agent.ingest.guard``) and optional TLS;
* the storage handler (:meth:`StorageSCP._serve_store` for the plain requests the DUL reads
  from their bytes, :meth:`StorageSCP._handle_store` for those pynetdicom decodes): checks the
  dataset (``agent.ingest.instance.check_dataset``), writes the Part-10 file (file meta + the
  dataset bytes exactly as they came off the wire) through ``agent.ingest.spool.Spool`` and
  answers Success once it is durable: the sealed file flushed (its index row right after the
  answer, before the next request is read), or in compatibility mode file, directory and index
  flushed. Bad input is answered with a named failure status (``agent.ingest.status``) and an
  Error Comment, kept in the quarantine, and the association goes on. No exception leaves the
  handler.

This module is the SCP's policy, written against pynetdicom's public API; the parts of
pynetdicom the agent replaces, and why, are in ``agent.ingest.pynetdicom_replacements``.
"""

from __future__ import annotations

import functools
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Final, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from agent.config import Settings
from agent.ingest.guard import MAX_PDU_BYTES, REASON_ASSOCIATION_REJECTED, ConnectionGuard, Limits
from agent.ingest.instance import (
    ACCEPTED_SYNTAXES,
    PREAMBLE,
    STORAGE_SOP_CLASSES,
    Rejection,
    check_dataset,
    encode_file_meta,
)
from agent.ingest.pynetdicom_replacements import (
    ASSOCIATION_ADJUSTMENTS,
    GuardedAssociationServer,
    request_handler,
    serve_stores_directly,
)
from agent.ingest.spool import InstanceInfo, Spool, SpoolError, StoreOutcome, Written
from agent.ingest.status import StoreStatus, error_comment
from agent.ingest.store_command import Answer, StoreMessage
from agent.ops.metrics import STAGE_INGEST, Metrics
from schemas.errors import ConfigError

logger = logging.getLogger(__name__)


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context from ``tls_cert``/``tls_key`` (``None`` when TLS is off);
    with ``tls_ca`` clients must present a certificate signed by it."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_ca is not None:
            raise ConfigError("tls_ca is set but tls_cert/tls_key are not: TLS needs a server "
                              "certificate")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("TLS needs both tls_cert and tls_key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_ca is not None:
            ctx.load_verify_locations(cafile=str(settings.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate/key/CA cannot be loaded: {exc}") from exc
    return ctx


@dataclass
class _AssociationStats:
    calling_ae: str
    peer: str
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    series: set[str] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)


StoredCallback = Callable[[int, InstanceInfo, StoreOutcome], None]
"""Called after an instance is durably spooled: (association key, instance, outcome)."""
ClosedCallback = Callable[[int, float, bool], None]
"""Called when an association's connection closes: (association key, time, whether it ended
otherwise than by a release: aborted by either side, or the connection lost)."""


AFFECTED_SOP_CLASS_UID: Final = 0x00000002
AFFECTED_SOP_INSTANCE_UID: Final = 0x00001000
"""Command elements (0000,0002) and (0000,1000)."""

CALLING_AE_NOT_RECOGNISED: Final = (0x01, 0x01, 0x03)
"""A-ASSOCIATE-RJ result, source and reason (PS3.8 9.3.4): rejected-permanent, service-user,
calling AE title not recognized."""
CALLED_AE_NOT_RECOGNISED: Final = (0x01, 0x01, 0x07)
"""... called AE title not recognized."""
LOCAL_LIMIT_EXCEEDED: Final = (0x02, 0x03, 0x02)
"""rejected-transient, service-provider (presentation), local-limit-exceeded."""

class StorageSCP:
    """The Storage SCP. ``start()`` binds and serves in background threads; ``stop()`` stops
    accepting, lets running associations finish for a bounded time, then aborts them."""

    def __init__(self, settings: Settings, spool: Spool, *,
                 on_stored: StoredCallback | None = None,
                 on_closed: ClosedCallback | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics or Metrics()
        self._on_stored = on_stored
        self._on_closed = on_closed
        self._ssl = build_ssl_context(settings)
        self.guard = ConnectionGuard(Limits(
            max_associations=settings.max_associations,
            max_associations_per_peer=settings.max_associations_per_peer,
            artim_timeout_s=settings.artim_timeout_s,
            tls_handshake_timeout_s=settings.tls_handshake_timeout_s,
            idle_timeout_s=settings.dicom_idle_timeout_s,
            max_instance_bytes=settings.max_instance_bytes), self.metrics)
        self._ae = self._make_ae()
        self._server: GuardedAssociationServer | None = None
        self._assocs: dict[int, _AssociationStats] = {}
        self._lock = threading.Lock()

    # -- association setup ---------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.acse_timeout = self.settings.artim_timeout_s  # ARTIM: waiting for A-ASSOCIATE-RQ
        ae.network_timeout = self.settings.dicom_idle_timeout_s
        # the guard counts connections first; pynetdicom counts live acceptor threads, among
        # them connections the guard closed to make room that have not ended yet
        ae.maximum_associations = 2 * self.settings.max_associations
        ae.require_called_aet = self.settings.require_called_ae
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_SYNTAXES))
        ae.add_supported_context(Verification)
        if self.settings.allow_ae:
            ae.require_calling_aet = list(self.settings.allow_ae)
        return ae

    @property
    def tls(self) -> bool:
        """Whether DICOM TLS is on."""
        return self._ssl is not None

    @property
    def port(self) -> int:
        """The bound port (the real one when ``settings.port`` was 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and start serving in background threads."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_CONN_OPEN, self._handle_open),
            (evt.EVT_CONN_CLOSE, self._handle_close),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_DIMSE_RECV, self._handle_dimse_recv),
        ]
        try:
            # AE.start_server(block=False) with a request handler of our own (make_server
            # passes extra keywords to the server class)
            server = cast(GuardedAssociationServer, self._ae.make_server(
                (self.settings.host, self.settings.port), ssl_context=self._ssl,
                evt_handlers=handlers, server_class=GuardedAssociationServer,
                request_handler=request_handler()))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.settings.host}:{self.settings.port}: "
                              f"{exc}") from exc
        server.guard = self.guard
        threading.Thread(target=server.serve_forever, daemon=True,
                         name=f"hust19-scp-{self.settings.port}").start()
        self._ae._servers.append(server)  # as start_server does: shutdown() removes it
        self._server = server
        if not self.settings.allow_ae:
            logger.warning("DICOM listener %s accepts ANY calling AE title: set allow_ae "
                           "(--allow-ae) to restrict who may send", self.settings.ae_title)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting associations; wait up to ``timeout_s`` for running ones to finish,
        then abort what is left. Instances already answered Success are on disk."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + timeout_s
        while self._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self._ae.active_associations
        for assoc in left:
            logger.warning("aborting association with %s at shutdown",
                           assoc.requestor.ae_title)
            assoc.abort()
        for assoc in left:
            assoc.join(timeout=2.0)

    def _handle_open(self, event: evt.Event) -> None:
        for what, adjust in ASSOCIATION_ADJUSTMENTS:
            with _suppress_logged(what):
                adjust(event.assoc)
        with _suppress_logged("serving C-STORE requests directly"):
            serve_stores_directly(event.assoc, self._serve_store, standing_in_for=(
                (evt.EVT_C_STORE, self._handle_store),
                (evt.EVT_DIMSE_RECV, self._handle_dimse_recv)))

    def _handle_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        request = assoc.requestor.primitive
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        self.metrics.associations.labels(outcome="rejected").inc()
        answer = assoc.acceptor.primitive
        rsd: tuple[int, int, int] = (int(getattr(answer, "result", 0) or 0),
                                     int(getattr(answer, "result_source", 0) or 0),
                                     int(getattr(answer, "diagnostic", 0) or 0))
        reasons = {
            CALLING_AE_NOT_RECOGNISED: f"calling AE {calling!r} is not on the allow-list "
                                       f"{self.settings.allow_ae} (allow_ae)",
            CALLED_AE_NOT_RECOGNISED: f"called AE {called!r} is not this agent's "
                                      f"{self.settings.ae_title!r} (require_called_ae)",
            LOCAL_LIMIT_EXCEEDED: f"more than {self.settings.max_associations} associations "
                                  "(max_associations)",
        }
        why = reasons.get(rsd, f"result {rsd[0]}, source {rsd[1]}, diagnostic {rsd[2]}")
        self.guard.refused(peer, REASON_ASSOCIATION_REJECTED,
                           f"A-ASSOCIATE-RJ (calling AE {calling!r}, called AE {called!r}): "
                           f"{why}")

    def _handle_close(self, event: evt.Event) -> None:
        key = id(event.assoc)
        with self._lock:
            stats = self._assocs.pop(key, None)
        if stats is None:
            return
        self.metrics.associations.labels(outcome="accepted").inc()
        aborted = not event.assoc.is_released
        logger.info("audit: association from %s (%s) accepted and %s: %d stored, "
                    "%d duplicate, %d failed; series %s", stats.calling_ae, stats.peer,
                    "aborted or lost" if aborted else "released", stats.stored,
                    stats.duplicates, stats.failed, ", ".join(sorted(stats.series)) or "-")
        if self._on_closed is not None:
            with _suppress_logged("association-closed callback"):
                self._on_closed(key, time.time(), aborted)

    def _stats(self, assoc: Association) -> _AssociationStats:
        key = id(assoc)
        with self._lock:
            stats = self._assocs.get(key)
            if stats is None:
                req = assoc.requestor
                stats = self._assocs[key] = _AssociationStats(
                    calling_ae=str(req.ae_title), peer=f"{req.address}:{req.port}")
            return stats

    # -- the handlers --------------------------------------------------------------------

    def _handle_echo(self, event: evt.Event) -> int:
        return int(StoreStatus.SUCCESS)

    def _handle_store(self, event: evt.Event) -> Dataset | int:
        """C-STORE as pynetdicom decodes it (requests :meth:`_serve_store` is not given)."""
        received_at = time.time()
        try:
            req = cast(C_STORE, event.request)
            sop_class = str(req.AffectedSOPClassUID or "")
            sop_instance = str(req.AffectedSOPInstanceUID or "")
            ts = str(event.context.transfer_syntax)
            dataset = cast(BytesIO, req.DataSet).getvalue()
        except Exception as exc:
            return _unreadable_request(exc)
        status, _ = self._receive(event.assoc, dataset, sop_class=sop_class,
                                  sop_instance=sop_instance, ts=ts, received_at=received_at)
        return status

    def _serve_store(self, assoc: Association, message: StoreMessage) -> Answer:
        """C-STORE read directly from the request's bytes by the association's DUL
        (``agent.ingest.pynetdicom_replacements.serve_stores_directly``): a plain request with
        both Affected SOP UIDs. The DUL sends the answer, then runs what comes with it (the
        index row, where the spool is durable without it)."""
        return self._receive(assoc, message.dataset,
                             sop_class=message.request.sop_class_uid,
                             sop_instance=message.request.sop_instance_uid,
                             ts=message.transfer_syntax_uid, received_at=time.time(),
                             index_after_answer=True)

    def _receive(self, assoc: Association, dataset: bytes, *, sop_class: str, sop_instance: str,
                 ts: str, received_at: float, index_after_answer: bool = False) -> Answer:
        """Check, spool durably, answer (:meth:`_store`). Never raises."""
        try:
            stats = self._stats(assoc)
            meta = encode_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                    transfer_syntax_uid=ts, source_ae=stats.calling_ae)
            parts = [PREAMBLE + meta, dataset]
        except Exception as exc:
            return _unreadable_request(exc), None
        return self._store(id(assoc), stats, parts, sop_class=sop_class,
                           sop_instance=sop_instance, ts=ts, received_at=received_at,
                           index_after_answer=index_after_answer)

    def _handle_dimse_recv(self, event: evt.Event) -> None:
        """Answer a C-STORE-RQ that pynetdicom would drop without any response.

        pynetdicom ignores a C-STORE request whose command lacks the Affected SOP Instance
        (or Class) UID, so the sender waits until its DIMSE timeout and aborts. Real input
        does this (an empty SOP Instance UID in the dataset, as in COVID-CT-MD's P002): here
        the bytes are quarantined and the request gets a failure response naming the problem.
        """
        try:
            msg: Any = event.message
            if type(msg).__name__ != "C_STORE_RQ":
                return
            cmd = msg.command_set
            if _has_value(cmd, AFFECTED_SOP_CLASS_UID) and _has_value(cmd,
                                                                      AFFECTED_SOP_INSTANCE_UID):
                return  # every well-formed request: pynetdicom serves it
            sop_class = str(cmd.get("AffectedSOPClassUID", "") or "")
            sop_instance = str(cmd.get("AffectedSOPInstanceUID", "") or "")
            if sop_class and sop_instance:
                return
            received_at = time.time()
            assoc = event.assoc
            context_id = int(msg.context_id)
            cx = next(c for c in assoc.accepted_contexts if c.context_id == context_id)
            data = msg.data_set.getvalue() if msg.data_set is not None else b""
            answer, _ = self._receive(assoc, data, sop_class=sop_class,
                                      sop_instance=sop_instance, ts=str(cx.transfer_syntax[0]),
                                      received_at=received_at)
            rsp: Any = C_STORE()
            rsp.MessageIDBeingRespondedTo = int(cmd.MessageID)
            if sop_class:
                rsp.AffectedSOPClassUID = sop_class
            if isinstance(answer, Dataset):
                rsp.Status = int(answer.Status)
                rsp.ErrorComment = str(answer.ErrorComment)
            else:  # cannot happen: an empty request UID never matches a stored dataset
                rsp.Status = int(StoreStatus.MISSING_UID)
                rsp.ErrorComment = "C-STORE request lacks the Affected SOP Instance UID"
            assoc.dimse.send_msg(rsp, context_id)
        except Exception:
            logger.exception("could not answer a C-STORE request without Affected SOP UIDs")

    def _store(self, assoc_key: int, stats: _AssociationStats, parts: list[bytes], *,
               sop_class: str, sop_instance: str, ts: str, received_at: float,
               index_after_answer: bool = False) -> Answer:
        """Check and spool one instance: the C-STORE answer, and what to do once it is sent
        (``index_after_answer`` and the spool is durable before its index: the index row,
        :meth:`_index_answered`). Never raises."""
        details: dict[str, Any] = {
            "calling_ae": stats.calling_ae, "peer": stats.peer,
            "affected_sop_class_uid": sop_class, "affected_sop_instance_uid": sop_instance,
            "transfer_syntax_uid": ts, "received_at": received_at}
        started = time.perf_counter()
        try:
            head, dataset = parts
            checked = check_dataset(dataset, file_meta=head, sop_class_uid=sop_class,
                                    sop_instance_uid=sop_instance, transfer_syntax_uid=ts,
                                    calling_ae=stats.calling_ae, received_at=received_at)
            info = checked.info
            for warning in checked.warnings:
                if warning not in stats.warned:
                    stats.warned.add(warning)
                    logger.warning("study %s series %s from %s: %s (accepted)", info.study_uid,
                                   info.series_uid, stats.calling_ae, warning)
            if index_after_answer and self.spool.durable_before_index:
                written = self.spool.write(info, parts, padding=checked.padding)
                if written is not None:
                    return int(StoreStatus.SUCCESS), functools.partial(
                        self._index_answered, assoc_key, stats, written, started)
                outcome = StoreOutcome.DUPLICATE
            else:
                outcome = self.spool.store(info, parts, padding=checked.padding)
        except Rejection as rej:
            return self._reject(stats, parts, rej.status, rej.reason, details), None
        except SpoolError as exc:
            logger.error("C-STORE from %s: %s", stats.calling_ae, exc.message)
            with self._lock:
                stats.failed += 1
            return _failure(StoreStatus.OUT_OF_RESOURCES,
                            f"spool write failed: {exc.message}"), None
        except Exception as exc:
            logger.exception("C-STORE from %s (SOP instance %s): unexpected error",
                             stats.calling_ae, sop_instance)
            return self._reject(stats, parts, StoreStatus.PROCESSING_FAILURE,
                                f"internal error: {type(exc).__name__}: {exc}", details), None
        self._stored(assoc_key, stats, info, outcome, started)
        return int(StoreStatus.SUCCESS), None

    def _index_answered(self, assoc_key: int, stats: _AssociationStats, written: Written,
                        started: float) -> None:
        """After the Success response: index the instance written before it. A failure is
        logged; the spool keeps the sealed file and indexes it later. Never raises."""
        try:
            outcome = self.spool.index(written, answered=True)
        except SpoolError as exc:
            logger.error("C-STORE from %s answered Success, then: %s", stats.calling_ae,
                         exc.message)
            return
        except Exception:
            logger.exception("C-STORE from %s (SOP instance %s): indexing after the answer "
                             "failed", stats.calling_ae, written.info.sop_instance_uid)
            return
        self._stored(assoc_key, stats, written.info, outcome, started)

    def _stored(self, assoc_key: int, stats: _AssociationStats, info: InstanceInfo,
                outcome: StoreOutcome, started: float) -> None:
        """Count, log and report a spooled instance (indexed, or found already stored)."""
        with self._lock:
            stats.series.add(info.series_uid)
            if outcome is StoreOutcome.STORED:
                stats.stored += 1
                self.metrics.instances_received.inc()
                self.metrics.stage_seconds.labels(stage=STAGE_INGEST).observe(
                    time.perf_counter() - started)
            else:
                stats.duplicates += 1
        if outcome is StoreOutcome.DUPLICATE:
            logger.info("study %s series %s: SOP instance %s from %s already stored; "
                        "answered Success without storing again", info.study_uid,
                        info.series_uid, info.sop_instance_uid, stats.calling_ae)
        else:
            logger.debug("study %s series %s: stored SOP instance %s from %s", info.study_uid,
                         info.series_uid, info.sop_instance_uid, stats.calling_ae)
        if self._on_stored is not None:
            with _suppress_logged(f"stored callback for series {info.series_uid}"):
                self._on_stored(assoc_key, info, outcome)

    def _reject(self, stats: _AssociationStats | None, parts: list[bytes],
                status: StoreStatus, reason: str, details: dict[str, Any]) -> Dataset | int:
        """Quarantine the bytes (if any arrived), log, and build the failure response."""
        if stats is not None:
            with self._lock:
                stats.failed += 1
        self.metrics.instances_rejected.labels(reason=status.name).inc()
        where = "not kept (no bytes)"
        if parts:
            try:
                path = self.spool.quarantine(parts, reason,
                                             {**details, "status": f"0x{status:04X}",
                                              "status_name": status.name})
                where = f"quarantined as {path}"
            except Exception as exc:  # the answer matters more than the evidence
                where = f"NOT quarantined ({exc})"
        logger.warning("C-STORE from %s refused with 0x%04X %s: %s (SOP instance %r); %s",
                       details.get("calling_ae", "?"), status, status.name, reason,
                       details.get("affected_sop_instance_uid", "?"), where)
        return _failure(status, reason)


def _has_value(command_set: Dataset, tag: int) -> bool:
    """Whether the command element ``tag`` is present with a value other than padding, read
    from its raw bytes (pydicom's conversion and UID validation cost ~0.1 ms a request)."""
    element = command_set.get_item(tag)
    if element is None:
        return False
    value = element.value
    if isinstance(value, bytes | bytearray):
        return bool(value.strip(b"\x00 "))
    return bool(str(value or "").strip())


def _unreadable_request(exc: Exception) -> Dataset:
    """Log (with traceback) and answer a request the handler could not read: an internal
    error, never the sender's."""
    logger.exception("C-STORE: cannot read the request")
    return _failure(StoreStatus.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}: {exc}")


def _failure(status: StoreStatus, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = int(status)
    rsp.ErrorComment = error_comment(reason)
    return rsp


class _suppress_logged:  # noqa: N801  (used like contextlib.suppress)
    """Log (with traceback) and swallow any exception: for callbacks that must not break the
    association."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        if exc is not None and isinstance(exc, Exception):
            logger.error("error in %s: %s", self.what, exc, exc_info=exc)
            return True
        return False
