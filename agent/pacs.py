"""Sends the SRs to the PACS: a durable outbox drained by a C-STORE SCU with per-destination
retries.

Outbox layout (under ``outbox_dir``)::

    objects/<SOPInstanceUID>.dcm         the SR as a Part-10 file
    pending/<destination key>/<SOPInstanceUID>.json
                                         one marker per destination that still needs it
    tmp/                                 files being written (renamed into place)

:meth:`PacsSender.enqueue` writes the object, then one marker per destination, each by
write-to-temp + fsync + rename + fsync of the directory, so what ``enqueue`` returned from
survives a crash or power loss. The file name is the SOP Instance UID: enqueueing the same SR
again replaces the file and re-arms the markers (idempotent). A marker is removed only after the
destination answered the C-STORE with Success or a Warning status; when no marker refers to an
object any more, the object is removed. A restarted sender finds the markers and carries on.

Delivery is at-least-once: if the PACS stored the SR but its response was lost, the SR is sent
again. Exactly-once at the PACS is impossible in general; the resend carries the *same* SOP
Instance UID (derived deterministically, see :mod:`agent.uids`), so the PACS files it once.

Failures (destination down, association rejected or aborted, a failure status) leave the
marker in place and put that destination into exponential backoff (``retry_base_s`` doubled
per consecutive failed pass, capped at ``retry_max_s``); other destinations are not held up.
Every refusal is logged with the destination, the reason in words and the SR and study UIDs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import Any, Final

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from agent.config import PacsDestination, Settings
from agent.durable import atomic_write, fsync_dir
from agent.metrics import STAGE_SR_SEND, Metrics
from agent.uids import is_valid_uid
from schemas.errors import InputError, PacsError

logger = logging.getLogger(__name__)

TRANSFER_SYNTAXES: Final = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
"""Proposed for every SR: the two uncompressed syntaxes every Storage SCP must accept."""

DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_RETRY_BASE_S: Final = 2.0
DEFAULT_RETRY_MAX_S: Final = 300.0
DEFAULT_POLL_S: Final = 5.0

OUTBOX_SUBDIR: Final = "sr-outbox"
"""The outbox folder under ``Settings.data_dir``."""
OBJECTS_DIR: Final = "objects"
PENDING_DIR: Final = "pending"
TMP_DIR: Final = "tmp"
CORRUPT_DIR: Final = "corrupt"
OBJECT_SUFFIX: Final = ".dcm"
MARKER_SUFFIX: Final = ".json"


class DimseStatus(IntEnum):
    """The C-STORE / C-ECHO status codes the sender names (PS3.4 B.2.3, PS3.7 C). Anything
    else is named through pynetdicom's storage status table."""

    SUCCESS = 0x0000
    WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    REFUSED_NOT_AUTHORISED = 0x0124


class AbortSource(IntEnum):
    """A-ABORT source (PS3.8 9.3.8)."""

    SERVICE_USER = 0
    RESERVED = 1
    SERVICE_PROVIDER = 2


def status_meaning(code: int) -> str:
    """``'0xA700 Failure: Refused: Out of Resources'`` for a C-STORE status code."""
    category = code_to_category(code)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (category, "unknown status"))[1]
    return f"0x{code:04X} {category}: {meaning or category}"


def is_delivered(code: int) -> bool:
    """Whether a C-STORE status means the PACS holds the SR: Success, a Warning, or Duplicate
    SOP Instance (some archives answer a resend that way; the UID is the same, so the SR is
    there - but a *changed* SR under the same UID was not taken)."""
    return (code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING)
            or code == DimseStatus.DUPLICATE_SOP_INSTANCE)


def destination_key(dest: PacsDestination) -> str:
    """A directory name for ``dest``, readable and collision-free (AE titles may hold spaces)."""
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", f"{dest.host}_{dest.port}_{dest.ae_title.strip()}")
    digest = hashlib.sha1(str(dest).encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{safe}-{digest}"


@dataclass(frozen=True)
class _Delivery:
    """One pending (SR, destination) pair as its marker describes it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    token: str
    marker: Path


@dataclass
class _Backoff:
    failures: int = 0
    next_attempt: float = 0.0


class _AssociationFailed(Exception):
    """Internal: the association could not be set up or broke down (reason in words)."""




@contextlib.contextmanager
def _associate(dest: PacsDestination, calling_ae: str, abstract_syntaxes: list[str], *,
               tls_context: ssl.SSLContext | None, timeout_s: float) -> Iterator[Association]:
    """An established association with ``dest`` (released on exit); raises
    :class:`_AssociationFailed` with the reason in words."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for syntax in abstract_syntaxes:
        ae.add_requested_context(syntax, TRANSFER_SYNTAXES)
    heard: list[Any] = []

    def on_acse(event: Any) -> None:
        heard.append(event.primitive)

    tls_args = (tls_context, dest.host) if tls_context is not None else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             tls_args=tls_args, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])
    except (OSError, RuntimeError, ValueError) as exc:
        raise _AssociationFailed(f"cannot associate: {exc}") from exc
    if not assoc.is_established:
        raise _AssociationFailed(_why_not_established(assoc, heard, abstract_syntaxes))
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _why_not_established(assoc: Association, heard: list[Any],
                         abstract_syntaxes: list[str]) -> str:
    """The reason an association did not come up, from the ACSE primitives received."""
    for primitive in heard:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0):
            return (f"association rejected ({primitive.result_str}, source: "
                    f"{primitive.source_str}, reason: {primitive.reason_str})")
        if isinstance(primitive, A_ASSOCIATE) and primitive.result == 0:
            return (f"association accepted but none of the proposed presentation contexts "
                    f"({', '.join(abstract_syntaxes)} in Explicit/Implicit VR Little "
                    f"Endian): the destination does not store this SOP class")
        if isinstance(primitive, A_ABORT):
            source = primitive.abort_source
            name = AbortSource(source).name if source in (0, 1, 2) else source
            return f"association aborted by the peer (A-ABORT, source {name})"
        if isinstance(primitive, A_P_ABORT):
            return f"association aborted (A-P-ABORT, reason {primitive.provider_reason})"
    if not heard:  # pynetdicom flags a failed TCP connect as aborted: say what it was
        return ("no connection, or closed at once without an answer (destination down, "
                "unreachable, not answering, or refusing and closing before its rejection "
                "was read)")
    if assoc.is_rejected:
        return "association rejected"
    return "association aborted"


class PacsSender:
    """C-STORE SCU with a durable outbox; see the module docstring for the guarantees.

    Use :meth:`start` / :meth:`stop` for the background thread, or call
    :meth:`send_pending_once` yourself. Thread-safe: :meth:`enqueue` may be called from any
    thread while the background thread sends.
    """

    def __init__(self, destinations: list[PacsDestination], outbox_dir: Path, calling_ae: str,
                 *, tls_context: ssl.SSLContext | None = None,
                 retry_base_s: float = DEFAULT_RETRY_BASE_S,
                 retry_max_s: float = DEFAULT_RETRY_MAX_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = DEFAULT_POLL_S,
                 metrics: Metrics | None = None) -> None:
        if not 1 <= len(calling_ae.strip()) <= 16:
            raise InputError(f"calling AE title {calling_ae!r} must be 1-16 characters")
        if retry_base_s <= 0 or retry_max_s < retry_base_s:
            raise InputError(f"retry backoff {retry_base_s}..{retry_max_s} s is not usable")
        self._destinations = list(dict.fromkeys(destinations))
        self._metrics = metrics
        self._outbox = Path(outbox_dir)
        self._calling_ae = calling_ae
        self._tls_context = tls_context
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._lock = threading.Lock()  # outbox files and markers
        self._send_lock = threading.Lock()  # one sending pass at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = {dest: _Backoff() for dest in self._destinations}
        self._attempts: dict[tuple[PacsDestination, str], int] = {}
        for sub in (OBJECTS_DIR, TMP_DIR, PENDING_DIR):
            (self._outbox / sub).mkdir(parents=True, exist_ok=True)
        for dest in self._destinations:
            self._pending_dir(dest).mkdir(parents=True, exist_ok=True)
        for stale in (self._outbox / TMP_DIR).iterdir():  # half-written before a crash
            stale.unlink(missing_ok=True)
        known = {destination_key(d) for d in self._destinations}
        for folder in (self._outbox / PENDING_DIR).iterdir():
            if folder.name not in known and any(folder.iterdir()):
                logger.warning("outbox %s holds SRs pending for %s, which is no longer "
                               "configured: they stay there and are not sent", self._outbox,
                               folder.name)
        if not self._destinations:
            logger.warning("no PACS destination configured: SRs are built but not sent")

    @classmethod
    def from_settings(cls, settings: Settings, *, tls_context: ssl.SSLContext | None = None,
                      **kwargs: Any) -> PacsSender:
        """The sender the agent runs: ``settings.pacs`` destinations, outbox
        ``data_dir/sr-outbox``, calling AE = the agent's own AE title."""
        return cls(list(settings.pacs), settings.data_dir / OUTBOX_SUBDIR, settings.ae_title,
                   tls_context=tls_context, **kwargs)

    # --- paths -----------------------------------------------------------------------------
    def _pending_dir(self, dest: PacsDestination) -> Path:
        return self._outbox / PENDING_DIR / destination_key(dest)

    def _object_path(self, sop_instance_uid: str) -> Path:
        return self._outbox / OBJECTS_DIR / f"{sop_instance_uid}{OBJECT_SUFFIX}"

    # --- enqueue ---------------------------------------------------------------------------
    def enqueue(self, ds: Dataset) -> str:
        """Store ``ds`` (an SR with file meta, e.g. from :func:`agent.sr.build_sr`) in the
        outbox, pending for every destination, and wake the sender. Durable on return.
        Returns its SOP Instance UID. Raises :class:`InputError` for a dataset without valid
        UIDs or that cannot be written as Part-10."""
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        sop_class = str(ds.get("SOPClassUID", ""))
        study_uid = str(ds.get("StudyInstanceUID", ""))
        for name, value in (("SOPInstanceUID", sop_uid), ("SOPClassUID", sop_class),
                            ("StudyInstanceUID", study_uid)):
            if not is_valid_uid(value):
                raise InputError(f"SR {name} {value!r} is not a valid UID; not queued "
                                 f"(SR {sop_uid!r}, study {study_uid!r})")
        buffer = BytesIO()
        try:
            ds.save_as(buffer, enforce_file_format=True)
        except (ValueError, AttributeError, TypeError) as exc:
            raise InputError(f"SR {sop_uid} (study {study_uid}) cannot be written as "
                             f"Part-10: {exc}") from exc
        marker = json.dumps({
            "sop_instance_uid": sop_uid, "sop_class_uid": sop_class, "study_uid": study_uid,
            "series_uid": str(ds.get("SeriesInstanceUID", "")),
            "token": uuid.uuid4().hex, "enqueued_at": datetime.now(UTC).isoformat(),
        }).encode()
        tmp = self._outbox / TMP_DIR
        with self._lock:
            atomic_write(self._object_path(sop_uid), buffer.getvalue(), tmp)
            for dest in self._destinations:
                atomic_write(self._pending_dir(dest) / f"{sop_uid}{MARKER_SUFFIX}", marker,
                               tmp)
        logger.info("SR %s (study %s) queued for %d PACS destination(s)", sop_uid, study_uid,
                    len(self._destinations))
        self._wake.set()
        return sop_uid

    # --- state -----------------------------------------------------------------------------
    def _deliveries(self, dest: PacsDestination) -> list[_Delivery]:
        out: list[tuple[float, _Delivery]] = []
        for marker in self._pending_dir(dest).glob(f"*{MARKER_SUFFIX}"):
            try:
                data = json.loads(marker.read_bytes())
                mtime = marker.stat().st_mtime
            except FileNotFoundError:
                continue  # done meanwhile
            except (OSError, ValueError) as exc:
                logger.error("outbox marker %s is unreadable (%s): left in place", marker, exc)
                continue
            out.append((mtime, _Delivery(data["sop_instance_uid"], data["sop_class_uid"],
                                         data["study_uid"], data.get("series_uid", ""),
                                         data["token"], marker)))
        return [d for _, d in sorted(out, key=lambda pair: (pair[0], pair[1].sop_instance_uid))]

    def pending_count(self) -> int:
        """How many (SR, destination) deliveries are still to do."""
        return sum(1 for dest in self._destinations
                   for _ in self._pending_dir(dest).glob(f"*{MARKER_SUFFIX}"))

    def _mark_done(self, dest: PacsDestination, delivery: _Delivery) -> None:
        with self._lock:
            try:
                current = json.loads(delivery.marker.read_bytes()).get("token")
            except FileNotFoundError:
                current = None
            if current == delivery.token:  # not re-enqueued while we were sending
                delivery.marker.unlink()
                fsync_dir(delivery.marker.parent)
            still_wanted = any(
                (self._outbox / PENDING_DIR / folder.name /
                 f"{delivery.sop_instance_uid}{MARKER_SUFFIX}").exists()
                for folder in (self._outbox / PENDING_DIR).iterdir())
            if not still_wanted:
                self._object_path(delivery.sop_instance_uid).unlink(missing_ok=True)
        self._attempts.pop((dest, delivery.sop_instance_uid), None)

    def _quarantine(self, delivery: _Delivery, reason: str) -> None:
        """An outbox object that cannot be read: move it aside and drop its markers."""
        logger.error("SR %s (study %s) in the outbox is unreadable (%s): moved to %s",
                     delivery.sop_instance_uid, delivery.study_uid, reason, CORRUPT_DIR)
        with self._lock:
            corrupt = self._outbox / CORRUPT_DIR
            corrupt.mkdir(exist_ok=True)
            path = self._object_path(delivery.sop_instance_uid)
            if path.exists():
                os.replace(path, corrupt / path.name)
            for folder in (self._outbox / PENDING_DIR).iterdir():
                (folder / f"{delivery.sop_instance_uid}{MARKER_SUFFIX}").unlink(missing_ok=True)

    # --- sending ---------------------------------------------------------------------------
    def _associate(self, dest: PacsDestination, abstract_syntaxes: list[str]) \
            -> contextlib.AbstractContextManager[Association]:
        return _associate(dest, self._calling_ae, abstract_syntaxes,
                          tls_context=self._tls_context, timeout_s=self._timeout_s)

    def _send_to(self, dest: PacsDestination, deliveries: list[_Delivery]) -> tuple[int, int]:
        """One association with ``dest`` for ``deliveries``; returns (stored, failed)."""
        stored = failed = 0
        syntaxes = sorted({d.sop_class_uid for d in deliveries})
        try:
            with self._associate(dest, syntaxes) as assoc:
                for delivery in deliveries:
                    if not assoc.is_established:
                        raise _AssociationFailed("association dropped during the transfer")
                    key = (dest, delivery.sop_instance_uid)
                    self._attempts[key] = attempt = self._attempts.get(key, 0) + 1
                    try:
                        ds = dcmread(self._object_path(delivery.sop_instance_uid))
                    except FileNotFoundError:
                        self._mark_done(dest, delivery)  # superseded and cleaned meanwhile
                        continue
                    except (InvalidDicomError, OSError, ValueError) as exc:
                        self._quarantine(delivery, str(exc))
                        continue
                    started = time.perf_counter()
                    try:
                        status = assoc.send_c_store(ds)
                    except (ValueError, RuntimeError) as exc:  # no context for this class
                        logger.error("PACS %s refused SR %s (study %s), attempt %d: %s", dest,
                                     delivery.sop_instance_uid, delivery.study_uid, attempt, exc)
                        failed += 1
                        continue
                    if "Status" not in status:
                        raise _AssociationFailed(
                            f"no C-STORE response for SR {delivery.sop_instance_uid} (study "
                            f"{delivery.study_uid}): association aborted or timed out")
                    code = int(status.Status)
                    if is_delivered(code):
                        self._mark_done(dest, delivery)
                        stored += 1
                        log = logger.info if code == DimseStatus.SUCCESS else logger.warning
                        log("audit: SR %s (study %s) stored at PACS %s (%s, attempt %d)",
                            delivery.sop_instance_uid, delivery.study_uid, dest,
                            status_meaning(code), attempt)
                        if self._metrics is not None:
                            self._metrics.sr_sent.labels(destination=str(dest)).inc()
                            self._metrics.stage_seconds.labels(stage=STAGE_SR_SEND).observe(
                                time.perf_counter() - started)
                    else:
                        failed += 1
                        comment = status.get("ErrorComment", "")
                        logger.error("PACS %s refused SR %s (study %s), attempt %d: %s%s",
                                     dest, delivery.sop_instance_uid, delivery.study_uid,
                                     attempt, status_meaning(code),
                                     f" ({comment})" if comment else "")
        except _AssociationFailed as exc:
            left = len(deliveries) - stored - failed
            failed += left
            uids = ", ".join(f"SR {d.sop_instance_uid} (study {d.study_uid})"
                             for d in deliveries[:5])
            more = f" and {len(deliveries) - 5} more" if len(deliveries) > 5 else ""
            logger.error("PACS %s: %s; %d SR(s) stay pending: %s%s", dest, exc, left, uids,
                         more)
        return stored, failed

    def send_pending_once(self, *, respect_backoff: bool = False) -> int:
        """One pass over every destination with pending SRs (one association each); returns
        how many deliveries succeeded. With ``respect_backoff`` a destination still in its
        backoff is skipped (the background thread does this; tests call it without)."""
        with self._send_lock:  # one pass at a time, whoever calls
            return self._send_pass(respect_backoff)

    def _send_pass(self, respect_backoff: bool) -> int:
        delivered = 0
        for dest in self._destinations:
            backoff = self._backoff[dest]
            if respect_backoff and time.monotonic() < backoff.next_attempt:
                continue
            deliveries = self._deliveries(dest)
            if not deliveries:
                continue
            stored, failed = self._send_to(dest, deliveries)
            delivered += stored
            if failed:
                backoff.failures += 1
                delay = min(self._retry_max_s,
                            self._retry_base_s * 2 ** min(backoff.failures - 1, 32))
                backoff.next_attempt = time.monotonic() + delay
                logger.warning("PACS %s: %d SR(s) pending, next attempt in %.1f s "
                               "(failure %d in a row)", dest, failed, delay, backoff.failures)
            else:
                backoff.failures = 0
                backoff.next_attempt = 0.0
        return delivered

    def _next_wait(self) -> float:
        now = time.monotonic()
        waits = [max(0.0, self._backoff[d].next_attempt - now) for d in self._destinations
                 if any(self._pending_dir(d).glob(f"*{MARKER_SUFFIX}"))]
        return min([self._poll_s, *waits])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_pending_once(respect_backoff=True)
            except Exception:  # the sender thread must survive anything; say what happened
                logger.exception("PACS sender pass failed; retrying in %.1f s", self._poll_s)
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def start(self) -> None:
        """Start the background sender thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pacs-sender", daemon=True)
        self._thread.start()
        logger.info("PACS sender started: %s, outbox %s, %d delivery(ies) pending",
                    ", ".join(map(str, self._destinations)) or "no destination", self._outbox,
                    self.pending_count())

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the background thread; True when it ended within ``timeout`` (a transfer in
        progress finishes first). Pending SRs stay in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            self._thread = None
        return stopped

    # --- verification ----------------------------------------------------------------------
    def echo(self, dest: PacsDestination) -> bool:
        """C-ECHO ``dest`` with this sender's AE title and TLS: True when it answered Success
        (the reason for a False is logged)."""
        try:
            echo(dest, self._calling_ae, tls_context=self._tls_context, timeout_s=self._timeout_s)
        except PacsError as exc:
            logger.error("%s", exc.message)
            return False
        return True


def echo(dest: PacsDestination, calling_ae: str, *, tls_context: ssl.SSLContext | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """C-ECHO ``dest`` (for ``hust19 doctor``): returns when it answered Success, raises
    :class:`PacsError` with the reason in words otherwise."""
    try:
        with _associate(dest, calling_ae, [Verification], tls_context=tls_context,
                        timeout_s=timeout_s) as assoc:
            status = assoc.send_c_echo()
    except _AssociationFailed as exc:
        raise PacsError(f"C-ECHO to PACS {dest} failed: {exc}") from exc
    code = int(status.Status) if "Status" in status else None
    if code != DimseStatus.SUCCESS:
        raise PacsError(f"C-ECHO to PACS {dest}: "
                        f"{'no response' if code is None else status_meaning(code)}")
