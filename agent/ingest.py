"""The DICOM Storage SCP: receives CT instances over C-STORE and spools them durably.

Protocol roles, cut as pynetdicom cuts them:

* association setup (:meth:`StorageSCP.start`): the presentation contexts (CT Image Storage,
  Enhanced CT Image Storage, Verification) with every transfer syntax the product accepts *as
  received* (nothing is transcoded), the calling-AE allow-list (pynetdicom answers an unknown
  AE with A-ASSOCIATE-RJ rejected-permanent / service-user / calling-AE-title-not-recognized,
  and we log it), and optional TLS;
* the storage handler (:meth:`StorageSCP._handle_store`): checks the dataset, writes the
  Part-10 file (file meta + the dataset bytes exactly as they came off the wire) through
  :class:`agent.spool.Spool` (fsync of file and directory, then the index) and only then answers
  Success. Bad input is answered with a named failure status (:mod:`agent.status`) and an Error
  Comment, kept in the quarantine, and the association goes on. No exception leaves the
  handler.
"""

from __future__ import annotations

import logging
import queue
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Final, cast

import pynetdicom
from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import AssociationSocket, RequestHandler

from agent.config import Settings
from agent.dicom_guard import (
    MAX_PDU_BYTES,
    REASON_ARTIM,
    REASON_ASSOCIATION_REJECTED,
    ConnectionGuard,
    GuardedAssociationServer,
    Limits,
    bound_dul,
)
from agent.element_scan import (
    PIXEL_DATA,
    UNDEFINED_LENGTH,
    ScanError,
    StructureError,
    inflate,
    scan,
)
from agent.metrics import STAGE_INGEST, Metrics
from agent.spool import TRAILING_PADDING, InstanceInfo, Padding, Spool, SpoolError, StoreOutcome
from agent.status import StoreStatus, error_comment
from schemas.errors import ConfigError

logger = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: Final = (CTImageStorage, EnhancedCTImageStorage)
"""What the agent triages: single-frame CT and Enhanced (multi-frame) CT."""

NATIVE_SYNTAXES: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                          DeflatedExplicitVRLittleEndian)
ENCAPSULATED_SYNTAXES: Final = (
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLossless,  # 1.2.840.10008.1.2.4.57 (Process 14)
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    JPEG2000,  # 1.2.840.10008.1.2.4.91
    RLELossless,  # 1.2.840.10008.1.2.5
)
ACCEPTED_SYNTAXES: Final = (*NATIVE_SYNTAXES, *ENCAPSULATED_SYNTAXES)
"""Accepted as received, in this order of preference when a context offers several."""


ACTIVE_DUL_LOOP_DELAY_S: Final = 0.0001
"""Polling period of an association's DUL reactor thread (pynetdicom's default is 1 ms).

pynetdicom polls its socket and its outgoing queue in a loop that sleeps this long whenever
it found nothing to do, so every request and every response waits up to one period. The
thread lives only while its association is open (the idle listener does not poll), so a short
period costs CPU only during an association."""

PREAMBLE: Final = b"\x00" * 128 + b"DICM"
FILE_META_VERSION: Final = b"\x00\x01"
"""(0002,0001) File Meta Information Version."""
C_STORE_RSP_COMMAND: Final = 0x8001
"""(0000,0100) Command Field of a C-STORE-RSP."""
NO_DATA_SET: Final = 0x0101
"""(0000,0800) Command Data Set Type: no data set follows."""
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

_PIXEL_TAGS: Final = (Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))
_UID_TAGS: Final = {"StudyInstanceUID": Tag(0x0020, 0x000D),
                    "SeriesInstanceUID": Tag(0x0020, 0x000E),
                    "SOPInstanceUID": Tag(0x0008, 0x0018)}
_LABELS: Final = {"StudyInstanceUID": "Study Instance UID (0020,000D)",
                  "SeriesInstanceUID": "Series Instance UID (0020,000E)",
                  "SOPInstanceUID": "SOP Instance UID (0008,0018)"}
_SOP_CLASS_TAG: Final = Tag(0x0008, 0x0016)
_TAG_CHARSET: Final = 0x00080005
_TAG_SAMPLES: Final = 0x00280002
_TAG_NUMBER_OF_FRAMES: Final = 0x00280008
_TAG_ROWS: Final = 0x00280010
_TAG_COLUMNS: Final = 0x00280011
_TAG_BITS_ALLOCATED: Final = 0x00280100
_TAG_TRAILING_PADDING: Final = TRAILING_PADDING << 16 | TRAILING_PADDING
_HINT_TAGS: Final = {"PatientID": Tag(0x0010, 0x0020), "AccessionNumber": Tag(0x0008, 0x0050),
                     "Modality": Tag(0x0008, 0x0060)}
_SCAN_TAGS: Final = frozenset({
    *(int(t) for t in (*_UID_TAGS.values(), _SOP_CLASS_TAG, *_PIXEL_TAGS,
                       *_HINT_TAGS.values())),
    _TAG_CHARSET, _TAG_SAMPLES, _TAG_NUMBER_OF_FRAMES, _TAG_ROWS, _TAG_COLUMNS,
    _TAG_BITS_ALLOCATED, _TAG_TRAILING_PADDING})
_VALID_UID: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_MAX_UID_LEN: Final = 64


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` follows PS3.5 9.1 (digits and dots, no leading zeros, <= 64 chars)."""
    return len(uid) <= _MAX_UID_LEN and bool(_VALID_UID.match(uid))


class Rejection(Exception):
    """A dataset the SCP refuses: the status to answer and the reason to log and keep."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class CheckedInstance:
    """The facts taken from an accepted dataset."""

    info: InstanceInfo
    warnings: list[str] = field(default_factory=list)
    padding: Padding | None = None
    """How the spool may close the dataset with a trailing padding element (``None``: it may
    not: deflated, big endian, or padded already)."""


@dataclass(frozen=True)
class _Facts:
    """What the check needs from a dataset, however it was read."""

    uids: dict[str, str | None]
    sop_class_uid: str | None
    has_pixels: bool
    geometry: tuple[int, int, int, int, int, int] | None
    """Native Pixel Data (7FE0,0010) only: rows, columns, samples, frames, bits allocated and
    the bytes present."""
    hints: dict[str, str | None]
    padded: bool
    """The dataset ends with its own Data Set Trailing Padding (FFFC,FFFC)."""


def _padding(transfer_syntax_uid: str, padded: bool) -> Padding | None:
    """How a trailing padding element would be encoded after a dataset in this syntax."""
    uid = UID(transfer_syntax_uid)
    if padded or not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
        return None
    return Padding.IMPLICIT_VR if uid.is_implicit_VR else Padding.EXPLICIT_VR


def _ascii(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("latin-1").strip("\x00 ")


def _us(raw: bytes | None, default: int | None = None) -> int:
    if raw is None and default is not None:
        return default
    if raw is None or len(raw) != 2:
        raise ScanError("an image geometry element is not one US value")
    return int.from_bytes(raw, "little")


def _hint(raw: bytes | None, charsets: list[str]) -> str | None:
    """A text hint (Patient ID, Accession Number, Modality) decoded in the dataset's
    Specific Character Set; ``None`` if absent, empty or undecodable."""
    if not raw:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        try:
            text = decode_bytes(raw, convert_encodings(charsets or ["ISO_IR 6"]), set())
        except Exception:  # a hint only: an odd Patient ID must not refuse an image
            return None
    return text.strip("\x00 ") or None


def _facts_from_scan(dataset: bytes | memoryview, transfer_syntax_uid: str) -> _Facts:
    """The facts from a walk over the encoded dataset (:mod:`agent.element_scan`); raises
    :class:`ScanError` when the walk or a value fails (the caller then asks pydicom)."""
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        dataset = inflate(dataset)
    walked = scan(dataset, explicit_vr=transfer_syntax_uid != ImplicitVRLittleEndian,
                  wanted=_SCAN_TAGS)
    present = walked.elements
    pixel = present.get(PIXEL_DATA)
    geometry = None
    if transfer_syntax_uid in NATIVE_SYNTAXES and pixel is not None:
        if pixel.length == UNDEFINED_LENGTH:
            raise ScanError("native Pixel Data of undefined length")
        frames_text = _ascii(walked.value(_TAG_NUMBER_OF_FRAMES))
        try:
            frames = int(frames_text) if frames_text else 1
        except ValueError as exc:
            raise ScanError(f"Number of Frames {frames_text!r} is not an integer") from exc
        geometry = (_us(walked.value(_TAG_ROWS)), _us(walked.value(_TAG_COLUMNS)),
                    _us(walked.value(_TAG_SAMPLES), default=1), frames,
                    _us(walked.value(_TAG_BITS_ALLOCATED)), pixel.length)
    charsets = [c.strip() for c in (_ascii(walked.value(_TAG_CHARSET)) or "").split("\\")
                if c.strip()]
    return _Facts(
        uids={name: _ascii(walked.value(int(tag))) for name, tag in _UID_TAGS.items()},
        sop_class_uid=_ascii(walked.value(int(_SOP_CLASS_TAG))),
        has_pixels=any(int(t) in present for t in _PIXEL_TAGS), geometry=geometry,
        hints={name: _hint(walked.value(int(tag)), charsets) for name, tag in _HINT_TAGS.items()},
        padded=_TAG_TRAILING_PADDING in present)


def _syntax_mismatch(dataset: bytes | memoryview, transfer_syntax_uid: str) -> str | None:
    """When the declared transfer syntax cannot walk ``dataset``: the reason to refuse it if
    the other VR encoding can (Implicit VR bytes announced as Explicit, or the reverse);
    ``None`` otherwise. Only asked after a failed walk."""
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return None
    explicit = transfer_syntax_uid != ImplicitVRLittleEndian
    try:
        scan(dataset, explicit_vr=not explicit, wanted=frozenset())
    except ScanError:
        return None
    found, declared = ("Implicit", "Explicit") if explicit else ("Explicit", "Implicit")
    return (f"{found} VR data, transfer syntax says {declared} VR: the dataset is encoded in "
            f"{found} VR Little Endian, the negotiated transfer syntax "
            f"{UID(transfer_syntax_uid).name} ({transfer_syntax_uid}) is {declared} VR")


def _raw_text(ds: Dataset, tag: BaseTag) -> str | None:
    """The value of a text element without pydicom's VR validation (raw bytes decoded),
    ``None`` when absent. Raises ``Rejection`` if the element cannot be read."""
    try:
        elem = ds.get_item(tag)
    except Exception as exc:
        raise Rejection(StoreStatus.CANNOT_PARSE,
                        f"element {tag} cannot be read: {exc}") from exc
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return _ascii(value)
    return str(value).strip("\x00 ")


def _text(ds: Dataset, keyword: str) -> str | None:
    """A decoded text attribute for metadata hints, ``None`` if absent or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # a hint only: an odd Patient ID must not refuse an image
        return None
    return str(value) if value not in (None, "") else None


def _facts_from_pydicom(part10: bytes, transfer_syntax_uid: str) -> _Facts:
    """The facts as pydicom reads the Part-10 bytes; raises :class:`Rejection` when it cannot
    (the answer then names pydicom's complaint)."""
    try:
        ds = dcmread(BytesIO(part10), force=False)
    except Exception as exc:
        raise Rejection(StoreStatus.CANNOT_PARSE,
                        f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise Rejection(StoreStatus.CANNOT_PARSE, "dataset cannot be parsed: no data elements")
    pixel_tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    geometry = None
    if transfer_syntax_uid in NATIVE_SYNTAXES and pixel_tag == _PIXEL_TAGS[0]:
        try:
            geometry = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1),
                        int(ds.get("NumberOfFrames", 1) or 1), int(ds.BitsAllocated),
                        len(ds.PixelData))
        except Exception as exc:
            raise Rejection(StoreStatus.CANNOT_PARSE, f"image geometry cannot be read: "
                            f"{type(exc).__name__}: {exc}") from exc
    return _Facts(uids={name: _raw_text(ds, tag) for name, tag in _UID_TAGS.items()},
                  sop_class_uid=_raw_text(ds, _SOP_CLASS_TAG), has_pixels=pixel_tag is not None,
                  geometry=geometry,
                  hints={name: _text(ds, name) for name in _HINT_TAGS},
                  padded=_TAG_TRAILING_PADDING in ds)


def check_dataset(dataset: bytes | memoryview, *, file_meta: bytes, sop_class_uid: str,
                  sop_instance_uid: str, transfer_syntax_uid: str, calling_ae: str,
                  received_at: float) -> CheckedInstance:
    """Check what triage needs of a received dataset; raise :class:`Rejection`.

    ``dataset`` is the encoded dataset as received, ``file_meta`` the preamble and File Meta
    written before it. Checks, in order: it parses as DICOM; Study, Series and SOP Instance
    UIDs are present and not empty; its SOP Class and SOP Instance UIDs are those the request
    announced; it has pixel data, and native (uncompressed) pixel data is as long as its
    geometry says. Syntactically invalid (but present) UIDs are accepted with a warning: real
    scanners send them and the SeriesInstanceUID is only used as a key.

    The dataset is walked by :mod:`agent.element_scan`. Where that walk fails, the bytes are
    refused when they contradict themselves (:class:`~agent.element_scan.StructureError`: a
    declared length past the end of the data, such as Pixel Data declaring 0x7FFFFFF0 bytes;
    sequences nested too deep; a deflate bomb) or when they are encoded in the other VR
    encoding than the transfer syntax says (Explicit VR bytes announced as Implicit VR, or
    the reverse). Whatever else that walk cannot read is read by pydicom instead, so what is
    accepted or refused, and why, is pydicom's call. The extra checks run only when the walk
    failed: an ordinary instance costs nothing more.
    """
    try:
        facts = _facts_from_scan(dataset, transfer_syntax_uid)
    except ScanError as exc:
        mismatch = _syntax_mismatch(dataset, transfer_syntax_uid)
        if mismatch is not None:
            raise Rejection(StoreStatus.CANNOT_PARSE, mismatch) from exc
        if isinstance(exc, StructureError):
            raise Rejection(StoreStatus.CANNOT_PARSE, str(exc)) from exc
        facts = _facts_from_pydicom(file_meta + bytes(dataset), transfer_syntax_uid)
    uids = facts.uids
    invalid = [f"{_LABELS[name]} {value!r} is not a valid DICOM UID"
               for name, value in uids.items() if value and not is_valid_uid(value)]
    problems = [f"{_LABELS[name]} {'is empty' if value == '' else 'is missing'}"
                for name, value in uids.items() if not value]
    if problems:
        raise Rejection(StoreStatus.MISSING_UID, "; ".join(problems + invalid))
    study_uid = str(uids["StudyInstanceUID"])
    series_uid = str(uids["SeriesInstanceUID"])
    sop_uid = str(uids["SOPInstanceUID"])
    if facts.sop_class_uid != sop_class_uid:
        raise Rejection(StoreStatus.SOP_CLASS_MISMATCH,
                        f"SOP Class UID {facts.sop_class_uid!r} is not the requested "
                        f"{sop_class_uid!r}")
    if sop_uid != sop_instance_uid:
        raise Rejection(StoreStatus.UID_MISMATCH,
                        f"SOP Instance UID {sop_uid!r} differs from the request's "
                        f"{sop_instance_uid!r}")
    if not facts.has_pixels:
        raise Rejection(StoreStatus.MISSING_PIXEL_DATA,
                        "no Pixel Data (7FE0,0010): absent or truncated")
    if facts.geometry is not None:
        _check_native_length(*facts.geometry)
    info = InstanceInfo(
        sop_instance_uid=sop_uid, sop_class_uid=sop_class_uid, study_uid=study_uid,
        series_uid=series_uid, transfer_syntax_uid=transfer_syntax_uid, calling_ae=calling_ae,
        received_at=received_at, patient_id=facts.hints["PatientID"],
        accession_number=facts.hints["AccessionNumber"], modality=facts.hints["Modality"])
    return CheckedInstance(info, invalid, _padding(transfer_syntax_uid, facts.padded))


def _check_native_length(rows: int, cols: int, samples: int, frames: int, bits: int,
                         have: int) -> None:
    """Uncompressed Pixel Data must hold Rows x Columns x Samples x Frames x Bits/8 bytes."""
    need = (rows * cols * samples * frames * bits + 7) // 8
    if have < need:
        raise Rejection(StoreStatus.CANNOT_PARSE,
                        f"Pixel Data has {have} bytes, {rows}x{cols}x{samples}x{frames} at "
                        f"{bits} bits needs {need} (truncated)")


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length (or, for OB, 4 bytes)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     source_ae: str) -> bytes:
    """The Part-10 File Meta Information of a received instance, encoded directly.

    The same bytes pydicom's ``write_file_meta_info`` writes for pynetdicom's
    ``Event.file_meta`` plus Source Application Entity Title (a test checks that), at a
    fraction of the cost: it runs once per C-STORE. Empty UIDs are written empty (a request
    without a SOP Instance UID must still reach the quarantine as it came).
    """
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", FILE_META_VERSION),
        _element(0x0002, 0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _element(0x0002, 0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _element(0x0002, 0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x0002, 0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _element(0x0002, 0x0016, b"AE", _padded(source_ae, b" ")),
    ))
    return _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


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


REACTOR_CHECK_S: Final = 0.001
"""How often an association's reactor checks for release, abort and the idle timeout (as
pynetdicom does), while it waits for the next DIMSE message."""
_PROMPT_REACTOR_FOR: Final = "3.0."
"""The pynetdicom release series whose acceptor reactor :class:`_PromptAssociation` mirrors."""


class _PromptAssociation(Association):
    """An acceptor that starts serving a DIMSE message as soon as it is decoded.

    pynetdicom's acceptor reactor (``Association._run_reactor``, 3.0) sleeps 1 ms, then looks
    for a decoded message: every request waits up to 1 ms before its handler runs (about a
    fifth of the time per instance once the spool costs one fsync). This is the same loop with
    the sleep replaced by a wait on the DIMSE message queue, bounded by the same 1 ms, so the
    release/abort/idle checks run as often as before and an idle association costs no more
    CPU. Used only with the pynetdicom series it mirrors (:data:`_PROMPT_REACTOR_FOR`).
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
    """pynetdicom's association socket, reading a PDU with as few system calls as it can.

    pynetdicom 3.0 reads ``nr_bytes`` in 4 KiB ``recv`` calls appended to a growing
    ``bytearray``: 32 calls and copies for each 128 KiB P-DATA PDU that dcmtk sends, about
    130 for one 512x512 CT instance. This reads into a buffer of the final size with
    ``recv_into``, as much as the kernel has per call. Same contract: blocks until
    ``nr_bytes`` arrived, returns what arrived before the peer closed the connection, and
    raises what the socket raises (timeouts included), with or without TLS.
    """

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


CALLING_AE_NOT_RECOGNISED: Final = (0x01, 0x01, 0x03)
"""A-ASSOCIATE-RJ result, source and reason (PS3.8 9.3.4): rejected-permanent, service-user,
calling AE title not recognized."""
CALLED_AE_NOT_RECOGNISED: Final = (0x01, 0x01, 0x07)
"""... called AE title not recognized."""
LOCAL_LIMIT_EXCEEDED: Final = (0x02, 0x03, 0x02)
"""rejected-transient, service-provider (presentation), local-limit-exceeded."""


def _command_element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def encode_store_success(rsp: C_STORE) -> bytes | None:
    """The Command Set of a plain C-STORE-RSP Success (Implicit VR Little Endian, PS3.7 9.3.1.2),
    ``None`` for any other primitive (requests, failures, an Error Comment or Offending
    Element): those go through pynetdicom's encoder. The same bytes as pynetdicom's (a test
    checks that), without building and encoding a pydicom dataset per instance."""
    if (type(rsp) is not C_STORE or rsp.MessageIDBeingRespondedTo is None or rsp.Status != 0
            or rsp.ErrorComment is not None or rsp.OffendingElement is not None
            or rsp.AffectedSOPClassUID is None or rsp.AffectedSOPInstanceUID is None):
        return None
    body = b"".join((
        _command_element(0x0002, _padded(str(rsp.AffectedSOPClassUID), b"\x00")),
        _command_element(0x0100, struct.pack("<H", C_STORE_RSP_COMMAND)),
        _command_element(0x0120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)),
        _command_element(0x0800, struct.pack("<H", NO_DATA_SET)),
        _command_element(0x0900, struct.pack("<H", int(StoreStatus.SUCCESS))),
        _command_element(0x1000, _padded(str(rsp.AffectedSOPInstanceUID), b"\x00")),
    ))
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


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
        command = encode_store_success(primitive)
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


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating acceptors whose DUL bounds what it reads
    (:class:`agent.dicom_guard.BoundedDUL`) and, with the pynetdicom series it mirrors,
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


def _request_handler() -> type[RequestHandler]:
    """The request handler for the installed pynetdicom (pynetdicom's reactor outside the
    mirrored series)."""
    if pynetdicom.__version__.startswith(_PROMPT_REACTOR_FOR):
        return _PromptRequestHandler
    logger.info("pynetdicom %s: its own association reactor is used (1 ms polling)",
                pynetdicom.__version__)
    return _GuardedRequestHandler


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
                request_handler=_request_handler()))
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
        assoc = event.assoc
        with _suppress_logged("adjusting pynetdicom's logging handlers"):
            if _PYNETDICOM_LOGGER.isEnabledFor(logging.INFO):
                # pynetdicom's own DIMSE log handler is bound first and raises on a C-STORE
                # without Affected SOP Instance UID, which would skip ours: move it after ours.
                bound = [h[0] for h in cast(list[Any], assoc.get_handlers(evt.EVT_DIMSE_RECV))]
                if standard_dimse_recv_handler in bound:
                    assoc.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
                    assoc.bind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
            else:
                # Its lines would be dropped, but the handlers still format them for every
                # message and PDU (and copy each received dataset once to test that it is not
                # empty): not bound for this association's messages.
                for event_type, handler in _STANDARD_LOG_HANDLERS:
                    assoc.unbind(event_type, handler)
        with _suppress_logged("shortening the DUL polling period"):
            assoc.dul._run_loop_delay = ACTIVE_DUL_LOOP_DELAY_S
        if isinstance(assoc, _PromptAssociation):  # the pynetdicom series these mirror
            if type(assoc.dul.socket) is AssociationSocket:
                assoc.dul.socket.__class__ = _BulkReadSocket  # same layout: only recv() differs
            if type(assoc.dimse) is DIMSEServiceProvider:
                assoc.dimse.__class__ = _QuickReplyDIMSE  # same layout: only send_msg() differs
                assoc.dimse.msg_queue = _InlineStoreQueue(assoc)  # nothing queued yet
        with _suppress_logged("setting TCP_NODELAY"):
            sock = assoc.dul.socket.socket if assoc.dul.socket else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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

    def _stats(self, event: evt.Event) -> _AssociationStats:
        key = id(event.assoc)
        with self._lock:
            stats = self._assocs.get(key)
            if stats is None:
                req = event.assoc.requestor
                stats = self._assocs[key] = _AssociationStats(
                    calling_ae=str(req.ae_title), peer=f"{req.address}:{req.port}")
            return stats

    # -- the handlers --------------------------------------------------------------------

    def _handle_echo(self, event: evt.Event) -> int:
        return int(StoreStatus.SUCCESS)

    def _handle_store(self, event: evt.Event) -> Dataset | int:
        """C-STORE: check, spool durably, answer. Never raises."""
        received_at = time.time()
        try:
            stats = self._stats(event)
            req = cast(C_STORE, event.request)
            sop_class = str(req.AffectedSOPClassUID or "")
            sop_instance = str(req.AffectedSOPInstanceUID or "")
            ts = str(event.context.transfer_syntax)
            meta = encode_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                    transfer_syntax_uid=ts, source_ae=stats.calling_ae)
            parts = [PREAMBLE + meta, cast(BytesIO, req.DataSet).getvalue()]
        except Exception as exc:
            logger.exception("C-STORE: cannot read the request")
            return _failure(StoreStatus.PROCESSING_FAILURE,
                            f"internal error: {type(exc).__name__}: {exc}")
        return self._store(id(event.assoc), stats, parts, sop_class=sop_class,
                           sop_instance=sop_instance, ts=ts, received_at=received_at)

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
            sop_class = str(cmd.get("AffectedSOPClassUID", "") or "")
            sop_instance = str(cmd.get("AffectedSOPInstanceUID", "") or "")
            if sop_class and sop_instance:
                return
            received_at = time.time()
            assoc = event.assoc
            stats = self._stats(event)
            context_id = int(msg.context_id)
            cx = next(c for c in assoc.accepted_contexts if c.context_id == context_id)
            meta = encode_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                    transfer_syntax_uid=str(cx.transfer_syntax[0]),
                                    source_ae=stats.calling_ae)
            data = msg.data_set.getvalue() if msg.data_set is not None else b""
            answer = self._store(id(assoc), stats, [PREAMBLE + meta, data],
                                 sop_class=sop_class, sop_instance=sop_instance,
                                 ts=str(cx.transfer_syntax[0]), received_at=received_at)
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
               sop_class: str, sop_instance: str, ts: str,
               received_at: float) -> Dataset | int:
        """Check and spool one instance; the C-STORE answer. Never raises."""
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
            outcome = self.spool.store(info, parts, padding=checked.padding)
        except Rejection as rej:
            return self._reject(stats, parts, rej.status, rej.reason, details)
        except SpoolError as exc:
            logger.error("C-STORE from %s: %s", stats.calling_ae, exc.message)
            with self._lock:
                stats.failed += 1
            return _failure(StoreStatus.OUT_OF_RESOURCES, f"spool write failed: {exc.message}")
        except Exception as exc:
            logger.exception("C-STORE from %s (SOP instance %s): unexpected error",
                             stats.calling_ae, sop_instance)
            return self._reject(stats, parts, StoreStatus.PROCESSING_FAILURE,
                                f"internal error: {type(exc).__name__}: {exc}", details)
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
        return int(StoreStatus.SUCCESS)

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
