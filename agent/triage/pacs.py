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
Instance UID (derived deterministically, see :mod:`agent.triage.uids`), so the PACS files it once.

Failures are of two kinds:

* **Transient** (destination down or not answering, association aborted or rejected
  *transiently*, a C-STORE answered Out of Resources 0xA7xx, Processing Failure 0x0110 or
  Resource Limitation 0x0213): the marker stays and that destination goes into exponential
  backoff (``retry_base_s`` doubled per consecutive failed pass, capped at ``retry_max_s``,
  at most :data:`MAX_RETRY_S` = 30 s); other destinations are not held up. While a
  destination that could not be reached at all is in backoff, a TCP connect probes it every
  :data:`PROBE_INTERVAL_S`: as soon as it answers, the pending SRs go at once instead of at
  the end of the backoff.
* **Permanent** (association rejected *permanently*, e.g. our AE title is not in the PACS's
  list; the PACS accepts no Comprehensive SR presentation context; any other failure status,
  e.g. 0x0124 Not Authorised, 0xA9xx, 0xCxxx): no amount of retrying helps. The SR goes to
  the dead-letter topic (``triage.dlq``, through the ``dead_letter`` callback) with the reason,
  a copy is kept under ``refused/<destination key>/`` (with a ``.json`` saying why) for a
  resend by hand once the PACS is fixed, the marker is removed and
  ``hust19_sr_refused{destination,reason}`` counts it.

Every refusal is logged with the destination, the reason in words and the SR and study UIDs.
:func:`verify` (``hust19 doctor``, ``/readyz``) checks what a C-ECHO cannot: that the PACS
accepts an association from our AE title proposing Comprehensive SR Storage, and takes that
presentation context.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    Verification,
)
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from agent.config import PacsDestination, Settings
from agent.durable import atomic_write, fsync_dir
from agent.ingest.pynetdicom_replacements import keep_responses_for_caller
from agent.ops.metrics import STAGE_SR_SEND, Metrics
from agent.triage.uids import is_valid_uid
from schemas import topics
from schemas.errors import ConfigError, Hust19Error, InputError, PacsError
from schemas.messages import DeadLetter

logger = logging.getLogger(__name__)

TRANSFER_SYNTAXES: Final = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
"""Proposed for every SR: the two uncompressed syntaxes every Storage SCP must accept."""

DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_RETRY_BASE_S: Final = 2.0
MAX_RETRY_S: Final = 30.0
"""The backoff between delivery attempts never exceeds this (issue 20: a PACS back after 90 s
down got its SR 37 s later with a 300 s cap)."""
DEFAULT_RETRY_MAX_S: Final = MAX_RETRY_S
DEFAULT_POLL_S: Final = 5.0
PROBE_INTERVAL_S: Final = 1.0
"""How often a destination that could not be reached is probed (TCP connect) while in
backoff."""
PROBE_TIMEOUT_S: Final = 1.0
SR_SOP_CLASS: Final = str(ComprehensiveSRStorage)
"""Comprehensive SR Storage (1.2.840.10008.5.1.4.1.1.88.33): what :mod:`agent.triage.sr` writes."""
TRANSIENT_STATUSES: Final = frozenset({0x0110, 0x0213})
"""Failure statuses retried (besides 0xA7xx Out of Resources): Processing Failure, Resource
Limitation. Any other failure status is a permanent refusal."""
OUT_OF_RESOURCES_MASK: Final = 0xFF00
OUT_OF_RESOURCES: Final = 0xA700
REJECTED_PERMANENT: Final = 0x01

OUTBOX_SUBDIR: Final = "sr-outbox"
"""The outbox folder under ``Settings.data_dir``."""
OBJECTS_DIR: Final = "objects"
PENDING_DIR: Final = "pending"
TMP_DIR: Final = "tmp"
CORRUPT_DIR: Final = "corrupt"
REFUSED_DIR: Final = "refused"
"""Copies of the SRs a destination refused for good, per destination, each with its reason."""
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


def is_transient(code: int) -> bool:
    """Whether a failure status is worth retrying (the PACS is short of something for now)."""
    return (code & OUT_OF_RESOURCES_MASK) == OUT_OF_RESOURCES or code in TRANSIENT_STATUSES


DeadLetterSink = Callable[[DeadLetter], None]
"""Publishes a dead letter durably (raises :class:`Hust19Error` if it could not)."""


class BusDeadLetters:
    """A :data:`DeadLetterSink` onto ``triage.dlq`` of a bus (one producer, made when first
    needed; flushed per entry)."""

    def __init__(self, bus: Any, metrics: Metrics | None = None) -> None:
        self._bus = bus
        self._metrics = metrics
        self._producer: Any = None
        self._lock = threading.Lock()

    def __call__(self, entry: DeadLetter) -> None:
        from schemas.messages import dump_json

        with self._lock:
            if self._producer is None:
                self._producer = self._bus.producer()
            self._producer.send(topics.TRIAGE_DLQ, (entry.key or "").encode() or None,
                                dump_json(entry), [(topics.H_SCHEMA, entry.schema_.encode())])
            self._producer.flush()
        if self._metrics is not None:
            self._metrics.dlq.inc()

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Hust19Error):
                producer.close()


def destination_key(dest: PacsDestination) -> str:
    """A directory name for ``dest``, readable and collision-free (AE titles may hold spaces)."""
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", f"{dest.host}_{dest.port}_{dest.ae_title.strip()}")
    digest = hashlib.sha1(str(dest).encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{safe}-{digest}"


def _marker(ds: Dataset) -> bytes:
    """The pending marker of an outbox object for one destination (a fresh token each time:
    a delivery finished meanwhile does not remove a newer marker)."""
    return json.dumps({
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "token": uuid.uuid4().hex, "enqueued_at": datetime.now(UTC).isoformat(),
    }).encode()


def requeue_refused(outbox_dir: Path, dest: PacsDestination, data: bytes) -> str:
    """Put an SR that ``dest`` refused for good (its dead letter carries the bytes) back in
    the outbox for ``dest`` alone, once the PACS is fixed (``hust19 dlq retry``). Safe while
    the agent runs in another process: the object is written before its marker, both
    atomically, and the running sender finds the marker at its next pass. Returns the SR's
    SOP Instance UID; :class:`InputError` if ``data`` is not a Part-10 object with valid
    UIDs."""
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise InputError(f"the dead letter's SR is not readable DICOM: {exc}") from exc
    uid = str(ds.get("SOPInstanceUID", ""))
    for name in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID"):
        if not is_valid_uid(str(ds.get(name, ""))):
            raise InputError(f"the dead letter's SR has no valid {name} ({uid!r})")
    outbox = Path(outbox_dir)
    tmp, pending = outbox / TMP_DIR, outbox / PENDING_DIR / destination_key(dest)
    for folder in (tmp, outbox / OBJECTS_DIR, pending):
        folder.mkdir(parents=True, exist_ok=True)
    atomic_write(outbox / OBJECTS_DIR / f"{uid}{OBJECT_SUFFIX}", data, tmp)
    atomic_write(pending / f"{uid}{MARKER_SUFFIX}", _marker(ds), tmp)
    refused = outbox / REFUSED_DIR / destination_key(dest)
    for suffix in (OBJECT_SUFFIX, MARKER_SUFFIX):
        (refused / f"{uid}{suffix}").unlink(missing_ok=True)
    logger.info("SR %s (study %s) queued again for %s", uid, ds.get("StudyInstanceUID", ""),
                dest)
    return uid


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
    unreachable: bool = False
    """The last failure was no connection at all: probe while waiting."""


class _AssociationFailed(Exception):
    """Internal: the association could not be set up or broke down (reason in words);
    ``permanent`` when retrying cannot help, ``unreachable`` when nothing answered."""

    def __init__(self, reason: str, *, permanent: bool = False,
                 unreachable: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent
        self.unreachable = unreachable


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
        reason = _why_not_established(assoc, heard, abstract_syntaxes)
        permanent = any(isinstance(p, A_ASSOCIATE) and p.result == REJECTED_PERMANENT
                        for p in heard) or reason.startswith("association accepted but")
        raise _AssociationFailed(reason, permanent=permanent, unreachable=not heard)
    try:
        yield keep_responses_for_caller(assoc)
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
                 metrics: Metrics | None = None,
                 dead_letter: DeadLetterSink | None = None) -> None:
        if not 1 <= len(calling_ae.strip()) <= 16:
            raise InputError(f"calling AE title {calling_ae!r} must be 1-16 characters")
        if retry_base_s <= 0 or retry_max_s < retry_base_s or retry_max_s > MAX_RETRY_S:
            raise InputError(f"retry backoff {retry_base_s}..{retry_max_s} s is not usable "
                             f"(at most {MAX_RETRY_S:g} s)")
        self._destinations = list(dict.fromkeys(destinations))
        self._metrics = metrics
        self._dead_letter = dead_letter
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
    def from_settings(cls, settings: Settings, **kwargs: Any) -> PacsSender:
        """The sender the agent runs: ``settings.pacs`` destinations, outbox
        ``data_dir/sr-outbox``, calling AE = the agent's own AE title, TLS as the settings say
        (:func:`tls_context_for`)."""
        return cls(list(settings.pacs), settings.data_dir / OUTBOX_SUBDIR, settings.ae_title,
                   tls_context=tls_context_for(settings), **kwargs)

    # --- paths -----------------------------------------------------------------------------
    def _pending_dir(self, dest: PacsDestination) -> Path:
        return self._outbox / PENDING_DIR / destination_key(dest)

    def _object_path(self, sop_instance_uid: str) -> Path:
        return self._outbox / OBJECTS_DIR / f"{sop_instance_uid}{OBJECT_SUFFIX}"

    # --- enqueue ---------------------------------------------------------------------------
    def enqueue(self, ds: Dataset) -> str:
        """Store ``ds`` (an SR with file meta, e.g. from :func:`agent.triage.sr.build_sr`) in the
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
        marker = _marker(ds)
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

    def _refuse(self, dest: PacsDestination, delivery: _Delivery, reason: str,
                label: str) -> bool:
        """A permanent refusal: dead letter with the reason, a copy under ``refused/``, the
        marker removed, the metric counted. ``False`` (the marker stays, retried next pass)
        when the dead letter could not be published."""
        uid, study = delivery.sop_instance_uid, delivery.study_uid
        text = (f"PACS {dest} refused SR {uid} (study {study}, series {delivery.series_uid}) "
                f"for good: {reason}")
        try:
            data = self._object_path(uid).read_bytes()
        except FileNotFoundError:
            self._mark_done(dest, delivery)  # superseded and cleaned meanwhile
            return True
        if self._dead_letter is not None:
            try:
                self._dead_letter(DeadLetter(
                    reason=text, error_type=PacsError.__name__, source_topic=OUTBOX_SUBDIR,
                    source_partition=-1, source_offset=-1, key=delivery.series_uid or None,
                    headers={"destination": str(dest), "sop_instance_uid": uid,
                             "sop_class_uid": delivery.sop_class_uid},
                    value_b64=base64.b64encode(data).decode(), study_uid=study,
                    series_uid=delivery.series_uid or None, failed_at=datetime.now(UTC)))
            except Hust19Error as exc:
                logger.error("%s; the dead letter could not be published (%s): kept pending, "
                             "tried again", text, exc.message)
                return False
        folder = self._outbox / REFUSED_DIR / destination_key(dest)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = self._outbox / TMP_DIR
        atomic_write(folder / f"{uid}{OBJECT_SUFFIX}", data, tmp)
        atomic_write(folder / f"{uid}{MARKER_SUFFIX}", json.dumps({
            "destination": str(dest), "sop_instance_uid": uid, "study_uid": study,
            "series_uid": delivery.series_uid, "reason": reason,
            "refused_at": datetime.now(UTC).isoformat()}).encode(), tmp)
        logger.error("%s: sent to %s, a copy kept in %s (resend it by hand once the PACS is "
                     "fixed)", text, topics.TRIAGE_DLQ if self._dead_letter else "no "
                     "dead-letter topic", folder)
        self._mark_done(dest, delivery)
        if self._metrics is not None:
            self._metrics.sr_refused.labels(destination=str(dest), reason=label).inc()
        return True

    def _send_to(self, dest: PacsDestination,
                 deliveries: list[_Delivery]) -> tuple[int, int, bool]:
        """One association with ``dest`` for ``deliveries``; returns (stored, failed, whether
        the failure was that nothing answered)."""
        stored = failed = 0
        handled: set[str] = set()
        syntaxes = sorted({d.sop_class_uid for d in deliveries})
        try:
            with self._associate(dest, syntaxes) as assoc:
                for delivery in deliveries:
                    if not assoc.is_established:
                        raise _AssociationFailed("association dropped during the transfer")
                    handled.add(delivery.sop_instance_uid)
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
                        if not self._refuse(dest, delivery, f"no accepted presentation "
                                            f"context for SOP class {delivery.sop_class_uid}"
                                            f" ({exc})", "sop_class_not_accepted"):
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
                        comment = status.get("ErrorComment", "")
                        why = f"{status_meaning(code)}{f' ({comment})' if comment else ''}"
                        if not is_transient(code):
                            if not self._refuse(dest, delivery, why, f"0x{code:04X}"):
                                failed += 1
                            continue
                        failed += 1
                        logger.error("PACS %s refused SR %s (study %s), attempt %d: %s; "
                                     "retried", dest, delivery.sop_instance_uid,
                                     delivery.study_uid, attempt, why)
        except _AssociationFailed as exc:
            left = [d for d in deliveries if d.sop_instance_uid not in handled]
            if exc.permanent:
                for delivery in left:
                    if not self._refuse(dest, delivery, str(exc), "association_rejected"):
                        failed += 1
                return stored, failed, False
            failed += len(left)
            uids = ", ".join(f"SR {d.sop_instance_uid} (study {d.study_uid})"
                             for d in left[:5])
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            logger.error("PACS %s: %s; %d SR(s) stay pending: %s%s", dest, exc, len(left),
                         uids, more)
            return stored, failed, exc.unreachable
        return stored, failed, False

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
            stored, failed, unreachable = self._send_to(dest, deliveries)
            delivered += stored
            if failed:
                backoff.failures += 1
                backoff.unreachable = unreachable
                delay = min(self._retry_max_s,
                            self._retry_base_s * 2 ** min(backoff.failures - 1, 32))
                backoff.next_attempt = time.monotonic() + delay
                logger.warning("PACS %s: %d SR(s) pending, next attempt in %.1f s "
                               "(failure %d in a row)%s", dest, failed, delay, backoff.failures,
                               f"; probing every {PROBE_INTERVAL_S:g} s meanwhile"
                               if unreachable else "")
            else:
                backoff.failures = 0
                backoff.next_attempt = 0.0
                backoff.unreachable = False
        return delivered

    def _has_pending(self, dest: PacsDestination) -> bool:
        return any(self._pending_dir(dest).glob(f"*{MARKER_SUFFIX}"))

    def _next_wait(self) -> float:
        now = time.monotonic()
        waits = []
        for dest in self._destinations:
            if not self._has_pending(dest):
                continue
            backoff = self._backoff[dest]
            wait = max(0.0, backoff.next_attempt - now)
            waits.append(min(wait, PROBE_INTERVAL_S) if backoff.unreachable else wait)
        return min([self._poll_s, *waits])

    def _probe_unreachable(self) -> None:
        """End the backoff of each unreachable destination that accepts a TCP connection
        now (it is back): its SRs go in this pass, not at the end of the backoff."""
        now = time.monotonic()
        for dest in self._destinations:
            backoff = self._backoff[dest]
            if not backoff.unreachable or now >= backoff.next_attempt \
                    or not self._has_pending(dest):
                continue
            try:
                with socket.create_connection((dest.host, dest.port), PROBE_TIMEOUT_S):
                    pass
            except OSError:
                continue
            logger.info("PACS %s answers again: sending its pending SRs now", dest)
            backoff.next_attempt = 0.0
            backoff.unreachable = False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._probe_unreachable()
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


def tls_context_for(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for the PACS (``pacs_tls``), or None for plain TCP.

    TLS 1.2 or later; the PACS certificate is checked against ``pacs_tls_ca`` (else the
    system's CAs) and the destination's host name; ``tls_cert`` / ``tls_key``, when set, are
    presented as the agent's certificate. Raises :class:`ConfigError` naming the file that
    cannot be used."""
    if not settings.pacs_tls:
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=None if settings.pacs_tls_ca is None else str(settings.pacs_tls_ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.tls_cert is not None and settings.tls_key is not None:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS to the PACS: pacs_tls_ca {settings.pacs_tls_ca} or tls_cert "
                          f"{settings.tls_cert} / tls_key cannot be used: {exc}") from exc
    return context


def verify(dest: PacsDestination, calling_ae: str, *,
           tls_context: ssl.SSLContext | None = None,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Check that ``dest`` would store our SRs (``hust19 doctor``, ``/readyz``): an
    association from ``calling_ae`` proposing Verification and Comprehensive SR Storage
    (Explicit/Implicit VR Little Endian) is accepted *with* the SR context, and a C-ECHO is
    answered Success where Verification was accepted. Returns what was found, in words;
    raises :class:`PacsError` with the reason otherwise (a PACS that answers C-ECHO but
    rejects our AE title or the SR SOP class fails here)."""
    try:
        with _associate(dest, calling_ae, [Verification, SR_SOP_CLASS],
                        tls_context=tls_context, timeout_s=timeout_s) as assoc:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            if SR_SOP_CLASS not in accepted:
                raise PacsError(f"PACS {dest} accepts an association from AE {calling_ae!r} "
                                f"but not Comprehensive SR Storage ({SR_SOP_CLASS}): it would "
                                f"refuse every SR")
            if str(Verification) not in accepted:
                return (f"accepts Comprehensive SR Storage from AE {calling_ae!r} "
                        f"(Verification not offered: no C-ECHO)")
            status = assoc.send_c_echo()
    except _AssociationFailed as exc:
        what = "refuses" if exc.permanent else "cannot be used by"
        raise PacsError(f"PACS {dest} {what} AE {calling_ae!r}: {exc}") from exc
    code = int(status.Status) if "Status" in status else None
    if code != DimseStatus.SUCCESS:
        raise PacsError(f"PACS {dest}: C-ECHO answered "
                        f"{'nothing' if code is None else status_meaning(code)}")
    return (f"accepts Comprehensive SR Storage from AE {calling_ae!r}; C-ECHO answered "
            "Success")


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
