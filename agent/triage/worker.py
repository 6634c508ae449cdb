"""The triage worker: consumes ``dicom.instances`` and ``dicom.series``, scores slices as they
arrive, and on series completion fuses CT and lab scores into the flag, writes the DICOM SR to
the PACS outbox and the JSON result to ``triage.results``.

Streaming: each instance is decoded once into HU (kept as int16 for the quantitative CT, 0.5 MiB
per 512 x 512 slice) and windowed, lung-extracted and scored by the slice CNN in micro-batches
as it arrives (:class:`engines.triage.SeriesScorer`). A completed series then needs the
quantitative CT of its volume (lungs, patterns, slice evidence, CT stage), the patient CNN, the
LIS lookup and the fusion; its volume is dropped once measured.

Delivery: offsets are committed only below work that is finished (result published and SR
stored durably in the PACS outbox; :mod:`agent.bus.offsets`). A crash redoes unfinished series. The
result ledger (:mod:`agent.triage.ledger`) keeps, per series, the digest of each revision's content:
a redo with the same content reuses its revision, time and SR UID (a byte-identical SR, the same
result message); changed content (labs arrived, late instances, new models) is a new revision
with a new SR that names the one it replaces. Each result's evidence slices go out as
thumbnails on ``triage.evidence``.

Bad input never stops the loop: an instance that cannot be decoded goes to ``triage.dlq`` with
the reason and the original message; a series the method does not apply to (not CT, not chest,
a localizer, too short) gets a ``skipped`` result with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from agent import __version__
from agent.bus.interface import Bus, Consumer, Message, Producer
from agent.bus.offsets import OffsetTracker, TopicPartition
from agent.config import Settings
from agent.ops.metrics import STAGE_FUSION, STAGE_SLICE_INFERENCE, Metrics
from agent.triage.ledger import LEDGER_FILE, ResultLedger
from agent.triage.lis import LabLookup, LisClient
from agent.triage.pacs import PacsSender
from agent.triage.sr import SrSource, build_sr
from agent.triage.uids import derive_uid, result_id, sr_series_uid
from engines.cf import CfModel, vectorise
from engines.evidence import EvidenceModel
from engines.fusion import FusionModel
from engines.lung_gpu import array_module
from engines.patient_model import PatientModel
from engines.slice_model import SliceModel
from engines.thumbnails import WINDOW_CENTER_HU, WINDOW_WIDTH_HU
from engines.triage import (
    CLASSES,
    CtResult,
    SeriesScorer,
    SliceInput,
    decide,
    order_key,
    slice_input,
)
from schemas import topics
from schemas.errors import BusError, Hust19Error, InputError, LisError, StorageError
from schemas.messages import (
    Availability,
    ClassScores,
    DeadLetter,
    EvidenceSlice,
    EvidenceThumbnails,
    LabResult,
    ModalityScores,
    QuantitativeCt,
    SeriesEvent,
    Timings,
    TriageResult,
    dump_json,
)

log = logging.getLogger(__name__)

CT_SOP_CLASSES: Final = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
})
CHEST_BODY_PARTS: Final = frozenset({
    "CHEST", "LUNG", "THORAX", "CHESTABDOMEN", "CHEST_ABDOMEN", "CHESTABDPELV",
    "CHEST_ABDOMEN_PELVIS", "TORSO", "WHOLEBODY", "WHOLE BODY", "TRUNK", "THORAXABDOMEN",
})
MIN_TRIAGE_SLICES: Final = 10
"""A series with fewer axial slices is skipped: the top-10 selection needs at least ten."""
MICRO_BATCH: Final = 32
EVENT_GRACE_S: Final = 30.0
"""How long a completion event waits for instances it counts but the worker has not read."""
FINISHED_KEPT: Final = 64
"""Finished series kept in memory so that a late instance can re-complete them."""
POLL_TIMEOUT_S: Final = 0.5
MIB: Final = 1 << 20
LAG_INTERVAL_S: Final = 5.0
RECONCILE_RESULTS: Final = 256
"""How many of the newest results per partition the worker checks at start against its ledger
(results a crash left flushed but not marked published)."""
LAB_KINDS: Final = ("lab",)
PIXEL_DATA_GROUP: Final = 0x7FE00000


@dataclass
class TriageModels:
    """The models of one worker, loaded once on the configured backend."""

    slice: SliceModel
    patient: PatientModel
    cf: CfModel
    fusion: FusionModel
    evidence: EvidenceModel
    xp: Any = np
    """The array module of the quantitative CT: CuPy when the CNNs run on TensorRT."""

    @classmethod
    def load(cls, backend: str = "auto") -> TriageModels:
        models = cls(SliceModel.load(backend=backend),  # type: ignore[arg-type]
                     PatientModel.load(backend=backend),  # type: ignore[arg-type]
                     CfModel.load_default(), FusionModel.load_default(), EvidenceModel.load())
        models.xp = array_module(models.backend_name == "tensorrt")
        return models

    @property
    def versions(self) -> dict[str, str]:
        return {"slice": self.slice.version, "patient": self.patient.version,
                "cf": self.cf.version, "fusion": str(getattr(self.fusion, "version", "")),
                "evidence": self.evidence.version}

    @property
    def version(self) -> str:
        """The algorithm version in the SR (a DICOM LO: at most 64 characters): the agent's
        version plus a digest of every model's version, so a new model = a new report UID."""
        joined = ";".join(f"{k}={v}" for k, v in sorted(self.versions.items()))
        return f"{__version__}+models.{hashlib.sha256(joined.encode()).hexdigest()[:12]}"

    @property
    def backend_name(self) -> str:
        return str(getattr(self.slice.backend, "name", "unknown"))


@dataclass
class SeriesState:
    """What the worker keeps of one series between its first instance and its completion."""

    series_uid: str
    scorer: SeriesScorer
    header: pydicom.Dataset | None = None
    study_uid: str | None = None
    sop_uids: set[str] = field(default_factory=set)
    offsets: dict[TopicPartition, set[int]] = field(default_factory=dict)
    pending: list[SliceInput] = field(default_factory=list)
    skip_reason: str | None = None
    localizers: int = 0
    dead: int = 0
    first_received: datetime | None = None
    last_received: datetime | None = None
    event: SeriesEvent | None = None
    event_seen_at: float = 0.0
    generation: int = 0
    published_here: bool = False
    """Whether this worker published a result of the series from this state: then it holds the
    instances that result was triaged from, and a late instance makes a whole new revision."""

    def hold(self, msg: Message) -> None:
        self.offsets.setdefault((msg.topic, msg.partition), set()).add(msg.offset)

    @property
    def seen(self) -> int:
        return len(self.sop_uids)


def _header_time(msg: Message) -> datetime | None:
    text = msg.header(topics.H_RECEIVED_AT)
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _study_date(ds: pydicom.Dataset) -> date | None:
    text = str(ds.get("StudyDate", "") or "")
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


CONTENT_EXCLUDED: Final = frozenset({"result_id", "revision", "sr_sop_instance_uid",
                                      "supersedes_sr_sop_instance_uid", "sr_destinations",
                                      "timings", "generation"})
"""What does not decide a result's content: ids, revision, clock times, where the SR goes."""


def content_digest(result: TriageResult) -> str:
    """SHA-256 of everything that decides the result's content (flag, scores, measurements,
    evidence slices, availability and its reasons, model versions, instance count)."""
    content = result.model_dump(mode="json", by_alias=True, exclude=set(CONTENT_EXCLUDED))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _scores(proba: np.ndarray | None) -> ClassScores | None:
    if proba is None:
        return None
    p = np.clip(np.asarray(proba, np.float64), 0.0, 1.0)
    return ClassScores(**dict(zip(CLASSES, map(float, p), strict=True)))


class TriageWorker:
    """One worker: a consumer-group member with its own models, LIS client and producer.

    Run it with :meth:`start`/:meth:`stop` (a thread) or drive :meth:`run_once` in tests.
    """

    def __init__(self, settings: Settings, bus: Bus, *, pacs: PacsSender | None,
                 lis: LisClient | None, models: TriageModels, metrics: Metrics | None = None,
                 group_id: str | None = None, ledger: ResultLedger | None = None) -> None:
        self.settings = settings
        self.ledger = ledger or ResultLedger(settings.data_dir / LEDGER_FILE)
        self._predecessors: dict[str, tuple[str, str]] = {}
        """result_id -> (Series, SOP Instance) UID of the SR the next SR replaces."""
        self._published: set[tuple[str, int]] = set()
        """(result_id, revision) redone after they were published: sent nothing again."""
        self.bus = bus
        self.pacs = pacs
        self.lis = lis
        self.models = models
        self.metrics = metrics or Metrics()
        self.group_id = group_id or settings.consumer_group
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._tracker = OffsetTracker()
        self._active: dict[str, SeriesState] = {}
        self._finished: OrderedDict[str, SeriesState] = OrderedDict()
        self._retries: dict[str, tuple[float, SeriesState]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assignment: set[TopicPartition] = set()
        self._lag_checked = 0.0
        self.metrics.backend.labels(backend=models.backend_name).set(1)

    @property
    def assignment(self) -> set[TopicPartition]:
        """The (topic, partition) pairs this worker owned at its last poll."""
        return set(self._assignment)

    # --- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Join the consumer group and open the producer."""
        if self._consumer is None:
            self.bus.ensure_topics(topics.ALL_TOPICS)
            self._consumer = self.bus.consumer(self.group_id,
                                               [topics.DICOM_INSTANCES, topics.DICOM_SERIES])
            self._producer = self.bus.producer()
            self._reconcile_published()
            log.info("worker subscribed as a member of group %s on %s (joining: its "
                     "partitions are logged when assigned); backend %s; algorithm %s (%s)",
                     self.group_id, self.bus.describe(), self.models.backend_name,
                     self.models.version, ", ".join(f"{k} {v}" for k, v in
                                                    sorted(self.models.versions.items())))

    def _reconcile_published(self) -> None:
        """Mark in the ledger the results that a previous run flushed to ``triage.results``
        but stopped before marking, so that their redo is not published again (where the bus
        cannot tell, a consumer may see that result twice: same id, revision and content)."""
        marked = 0
        for m in self.bus.recent(topics.TRIAGE_RESULTS, RECONCILE_RESULTS):
            try:
                doc = json.loads(m.value)
                result_id, revision = str(doc["result_id"]), int(doc["revision"])
            except (ValueError, KeyError, TypeError):
                continue  # a v1 result or a foreign message: nothing to reconcile
            marked += self.ledger.mark_published(result_id, revision)
        if marked:
            log.warning("worker: %d results were on %s already (flushed before the last stop, "
                        "not marked): marked, not published again", marked,
                        topics.TRIAGE_RESULTS)

    def start(self) -> None:
        self.open()
        self._thread = threading.Thread(target=self._run, name="hust19-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop polling, commit what is finished, hand the rest back (redone by the next
        owner), close the consumer and the producer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.close()

    def close(self) -> None:
        try:
            self._commit()
        except BusError as exc:
            log.warning("final commit failed (the work will be redone): %s", exc.message)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        if self._active:
            log.info("worker stopped with %d unfinished series handed back: %s",
                     len(self._active), ", ".join(sorted(self._active)))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except BusError as exc:
                log.error("bus error in the worker loop (retrying in 2 s): %s", exc.message)
                self._stop.wait(2.0)
            except Exception:  # the loop must survive anything: log it, keep going
                log.exception("unexpected error in the worker loop (continuing)")
                self._stop.wait(1.0)

    # --- one iteration ---------------------------------------------------------------------
    def run_once(self, timeout_s: float = POLL_TIMEOUT_S) -> int:
        """Poll once, score what arrived, finish what is complete, commit. Returns the number
        of messages handled."""
        self.open()
        assert self._consumer is not None
        messages = self._consumer.poll(timeout_s, max_records=MICRO_BATCH * 4)
        self._check_assignment()
        for msg in messages:
            if msg.topic == topics.DICOM_INSTANCES:
                self._on_instance(msg)
            elif msg.topic == topics.DICOM_SERIES:
                self._on_series_event(msg)
            else:
                self._tracker.read((msg.topic, msg.partition), msg.offset, in_flight=False)
        self._score_pending()
        self._finish_ready()
        self._run_retries()
        self._commit()
        self._update_lag()
        return len(messages)

    def _update_lag(self) -> None:
        """Consumer lag = messages not yet read + messages read whose work is unfinished;
        the log ends are asked for at most every LAG_INTERVAL_S (a broker round trip)."""
        now = time.monotonic()
        if self._consumer is None or now - self._lag_checked < LAG_INTERVAL_S:
            return
        self._lag_checked = now
        ends = self._consumer.end_offsets()
        positions = self._consumer.positions()
        unread = sum(max(0, end - positions.get(tp, end)) for tp, end in ends.items())
        self.metrics.consumer_lag.set(unread + self._tracker.in_flight_count())

    def _check_assignment(self) -> None:
        assert self._consumer is not None
        now = self._consumer.assignment()
        for tp in self._assignment - now:
            self._tracker.forget(tp)
            dropped = [uid for uid, st in self._active.items() if tp in st.offsets]
            for uid in dropped:
                del self._active[uid]
            if dropped:
                log.info("partition %s revoked: %d unfinished series handed back", tp,
                         len(dropped))
        if now != self._assignment:
            log.info("group %s: partitions assigned to this worker: %s (gained %d, lost %d)",
                     self.group_id, ", ".join(f"{t}[{p}]" for t, p in sorted(now)) or "none",
                     len(now - self._assignment), len(self._assignment - now))
        self._assignment = now

    # --- instances -------------------------------------------------------------------------
    def _state(self, series_uid: str) -> SeriesState:
        st = self._active.get(series_uid)
        if st is None:
            st = self._finished.pop(series_uid, None)
            if st is not None:
                log.info("series %s: late instance after completion, reopened", series_uid)
                st.event = None
            else:
                st = SeriesState(series_uid, SeriesScorer(
                    self.models.slice, self.models.patient, series_uid,
                    evidence_model=self.models.evidence, ct_source=self.settings.ct_source,
                    xp=self.models.xp,
                    max_volume_bytes=self.settings.series_volume_mib * MIB))
            self._active[series_uid] = st
        return st

    def _on_instance(self, msg: Message) -> None:
        tp = (msg.topic, msg.partition)
        series_uid = msg.header(topics.H_SERIES_UID) or (msg.key or b"").decode("utf-8",
                                                                                "replace")
        try:
            ds = pydicom.dcmread(io.BytesIO(msg.value))
        except (InvalidDicomError, ValueError, EOFError, OSError, KeyError) as exc:
            self._tracker.read(tp, msg.offset, in_flight=False)
            self._dead_letter(msg, f"instance is not readable DICOM: {exc}", exc)
            return
        try:
            sop_uid = str(ds.get("SOPInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or series_uid)
        except Exception as exc:  # pydicom cannot walk every dataset (an unknown VR, ...)
            self._tracker.read(tp, msg.offset, in_flight=False)
            self._dead_letter(msg, f"instance cannot be read: {type(exc).__name__}: {exc}", exc)
            return
        if not sop_uid or not series_uid:
            self._tracker.read(tp, msg.offset, in_flight=False)
            self._dead_letter(msg, "instance lacks SOPInstanceUID or SeriesInstanceUID", None)
            return
        st = self._state(series_uid)
        self._tracker.read(tp, msg.offset)
        st.hold(msg)
        if sop_uid in st.sop_uids:
            log.debug("series %s: instance %s seen again (redelivery), ignored", series_uid,
                      sop_uid)
            return
        st.sop_uids.add(sop_uid)
        received = _header_time(msg) or datetime.now(UTC)
        st.first_received = min(st.first_received or received, received)
        st.last_received = max(st.last_received or received, received)
        try:
            if st.header is None:
                st.header = self._header_of(ds)
                st.study_uid = str(ds.get("StudyInstanceUID", "") or "")
                st.skip_reason = self._not_applicable(ds)
                if st.skip_reason:
                    log.info("series %s: %s; it will be skipped", series_uid, st.skip_reason)
            image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        except Exception as exc:  # pydicom cannot walk every dataset (an unknown VR, ...)
            st.header = None
            st.dead += 1
            self._dead_letter(msg, f"instance {sop_uid} of series {series_uid} cannot be read: "
                              f"{type(exc).__name__}: {exc}", exc, series_uid=series_uid)
            return
        if st.skip_reason:
            return
        if "LOCALIZER" in image_type:
            st.localizers += 1
            return
        try:
            key = order_key(ds)
            if key is None:
                key = float(ds.get("InstanceNumber") or st.seen)
                log.warning("series %s: instance %s has no position; ordered by InstanceNumber",
                            series_uid, sop_uid)
            st.pending.append(slice_input(ds, sop_uid, key, series_uid=series_uid))
        except Hust19Error as exc:
            st.dead += 1
            self._dead_letter(msg, f"slice {sop_uid} of series {series_uid}: {exc.message}",
                              exc, study_uid=st.study_uid, series_uid=series_uid)
        except Exception as exc:  # pixel decoders raise many types
            st.dead += 1
            self._dead_letter(msg, f"slice {sop_uid} of series {series_uid} cannot be decoded: "
                              f"{type(exc).__name__}: {exc}", exc, study_uid=st.study_uid,
                              series_uid=series_uid)
        if len(st.pending) >= MICRO_BATCH:
            self._score(st)

    @staticmethod
    def _header_of(ds: pydicom.Dataset) -> pydicom.Dataset:
        """The instance without its pixel data (kept per series for the SR)."""
        header = pydicom.Dataset()
        for elem in ds:
            if elem.tag < PIXEL_DATA_GROUP:
                header.add(elem)
        return header

    @staticmethod
    def _not_applicable(ds: pydicom.Dataset) -> str | None:
        modality = str(ds.get("Modality", "") or "")
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if modality != "CT" or sop_class not in CT_SOP_CLASSES:
            return (f"not a CT series (Modality {modality or 'missing'}, SOP Class "
                    f"{UID(sop_class).name if sop_class else 'missing'})")
        body = str(ds.get("BodyPartExamined", "") or "").upper().strip()
        if body and body not in CHEST_BODY_PARTS:
            return f"not a chest series (BodyPartExamined {body})"
        return None

    def _score(self, st: SeriesState) -> None:
        if not st.pending:
            return
        batch, st.pending = st.pending, []
        started = time.perf_counter()
        try:
            st.scorer.add_slices(batch)
        except Hust19Error as exc:
            st.dead += len(batch)
            log.error("series %s: scoring %d slices failed: %s", st.series_uid, len(batch),
                      exc.message)
        self._keep_volumes_in_budget()
        self.metrics.stage_seconds.labels(stage=STAGE_SLICE_INFERENCE).observe(
            time.perf_counter() - started)

    def _score_pending(self) -> None:
        for st in list(self._active.values()):
            self._score(st)

    # --- completion ------------------------------------------------------------------------
    def _on_series_event(self, msg: Message) -> None:
        tp = (msg.topic, msg.partition)
        try:
            ev = SeriesEvent.model_validate_json(msg.value)
        except ValueError as exc:
            self._tracker.read(tp, msg.offset, in_flight=False)
            self._dead_letter(msg, f"series event does not match {topics.DICOM_SERIES} schema: "
                              f"{exc}", exc)
            return
        st = self._state(ev.series_uid)
        self._tracker.read(tp, msg.offset)
        st.hold(msg)
        if st.event is None or ev.generation >= st.event.generation:
            st.event = ev
            st.event_seen_at = time.monotonic()

    def _finish_ready(self) -> None:
        now = time.monotonic()
        for uid, st in list(self._active.items()):
            if st.event is None:
                continue
            if st.seen < st.event.instance_count and now - st.event_seen_at < EVENT_GRACE_S:
                continue
            if st.seen < st.event.instance_count:
                log.warning("series %s: completion event counts %d instances, %d read after "
                            "%.0f s; finishing with what arrived", uid, st.event.instance_count,
                            st.seen, EVENT_GRACE_S)
            self._finish(st)

    def _finish(self, st: SeriesState) -> None:
        assert st.event is not None and self._producer is not None
        self._score(st)
        ev = st.event
        try:
            standing = (self.ledger.published_revision(result_id(ev.series_uid))
                        if st.seen == 0 or (st.seen < ev.instance_count
                                            and not st.published_here) else None)
            if standing is not None and st.seen == 0:
                # its instances were committed with the result of an earlier run; "nothing
                # could be read" must not replace that result
                log.warning("series %s: completion event (generation %d) read again without "
                            "any of its instances: the published revision %d stands, nothing "
                            "is redone", ev.series_uid, ev.generation, standing)
            elif standing is not None:
                # late instances of a series triaged before this worker started (or before it
                # let the series go): alone they are not the series, and a revision made of
                # them would replace the whole series' result
                raise InputError(
                    f"completion event (generation {ev.generation}) counts "
                    f"{ev.instance_count} instances; this worker read {st.seen}, the others "
                    f"were triaged in revision {standing} before it started or let the series "
                    "go: that revision stands; retry this dead letter (hust19 dlq retry) to "
                    "triage the whole series again from the spool")
            else:
                self._publish(self._triage(st, ev))
                st.published_here = True
        except (BusError, StorageError):
            raise  # not finished: offsets stay in flight, the loop retries
        except Hust19Error as exc:
            log.error("series %s: cannot be triaged: %s", st.series_uid, exc.message)
            self._dead_letter_event(st, ev, exc)
        for tp, offs in st.offsets.items():
            self._tracker.done(tp, offs)
        st.offsets = {}
        st.generation = ev.generation
        del self._active[st.series_uid]
        self._finished[st.series_uid] = st
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)
        self._keep_volumes_in_budget()

    def _keep_volumes_in_budget(self) -> None:
        """At most ``worker_volume_mib`` of HU in all: finished series' volumes (kept for late
        instances; a late instance for a released one keeps its quantitative CT) go first,
        oldest first; then the arriving series holding the most is not measured."""
        limit = self.settings.worker_volume_mib * MIB
        held = sum(st.scorer.volume_bytes for st in self._active.values()) + \
            sum(st.scorer.volume_bytes for st in self._finished.values())
        for finished in self._finished.values():
            if held <= limit:
                return
            held -= finished.scorer.volume_bytes
            finished.scorer.release()
        while held > limit:
            largest = max(self._active.values(), key=lambda st: st.scorer.volume_bytes)
            size = largest.scorer.volume_bytes
            if size == 0:
                return
            largest.scorer.drop_volume(
                f"{len(self._active)} series arriving at once held more HU than the worker "
                f"keeps ({held / MIB:.0f} MiB > worker_volume_mib {limit // MIB} MiB): this "
                f"one, the largest ({size / MIB:.0f} MiB), is not measured")
            held -= size

    def _triage(self, st: SeriesState, ev: SeriesEvent, *,
                lookup: LabLookup | None = None) -> TriageResult:
        header = st.header
        base = {"result_id": result_id(ev.series_uid),
                "study_uid": ev.study_uid, "series_uid": ev.series_uid,
                "patient_name": (str(header.get("PatientName", "") or "") or None)
                if header is not None else None,
                "study_date": (str(header.get("StudyDate", "") or "") or None)
                if header is not None else None,
                "patient_id": (str(header.get("PatientID", "")) if header is not None else None)
                or ev.patient_id,
                "accession_number": (str(header.get("AccessionNumber", ""))
                                     if header is not None else None) or ev.accession_number,
                "instance_count": st.seen, "generation": ev.generation,
                "model_versions": self.models.versions}
        timings = {"first_instance_received": st.first_received or ev.first_received_at,
                   "last_instance_received": st.last_received or ev.last_received_at,
                   "series_complete": ev.completed_at}
        usable = st.scorer.n_slices
        skip = st.skip_reason
        if skip is None and header is None:
            skip = "no instance of the series could be read"
        if skip is None and usable < MIN_TRIAGE_SLICES:
            skip = (f"too short to triage: {usable} axial slice(s), at least "
                    f"{MIN_TRIAGE_SLICES} needed" + (f" ({st.localizers} localizer image(s) "
                                                     "ignored)" if st.localizers else ""))
        now = datetime.now(UTC)
        if skip is not None:
            log.info("series %s of study %s skipped: %s", ev.series_uid, ev.study_uid, skip)
            return self._revised(TriageResult(status="skipped", skip_reason=skip,
                                              timings=Timings(result_ready=now, **timings),
                                              **base))
        assert header is not None
        started = time.perf_counter()
        ct = st.scorer.finish()
        quantitative = None
        if ct.analysis is not None and ct.analysis.quant.lungs is not None:
            quantitative = QuantitativeCt.model_validate(ct.analysis.summary())
        cf_proba, cf_reason, lab_values = self._cf_scores(header, lookup)
        try:
            decision = decide(ct.proba, cf_proba, self.settings.threshold, self.models.fusion)
        except InputError:
            skip = f"nothing to triage: {ct.reason}; {cf_reason}"
            self._schedule_lis_retry(st, ev)
            return self._revised(TriageResult(status="skipped", skip_reason=skip,
                                              quantitative_ct=quantitative,
                                              scores=ModalityScores(ct_cnn=_scores(ct.cnn_proba)),
                                              timings=Timings(result_ready=now, **timings),
                                              **base))
        self.metrics.stage_seconds.labels(stage=STAGE_FUSION).observe(
            time.perf_counter() - started)
        fused = decision.proba if decision.mode in ("rule", "plr") else None
        availability = Availability(ct=ct.proba is not None, cf=cf_proba is not None,
                                    ct_reason=ct.reason, cf_reason=cf_reason,
                                    fusion=decision.mode, ct_source=ct.source)
        result = self._revised(TriageResult(
            status="triaged", flag=decision.flag, flag_general=decision.flag_general,
            flag_sensitive=decision.flag_sensitive, threshold=decision.threshold,
            scores=ModalityScores(ct=_scores(ct.proba), ct_cnn=_scores(ct.cnn_proba),
                                  cf=_scores(cf_proba), fused=_scores(fused)),
            availability=availability, quantitative_ct=quantitative, lab_values=lab_values,
            top_slices=list(ct.top_uids),
            timings=Timings(result_ready=now, **timings), **base), with_sr=True)
        if (result.result_id, result.revision) not in self._published:
            result = self._write_sr(result, header, ct)
            self._publish_evidence(result, ct)
        if cf_proba is None:
            self._schedule_lis_retry(st, ev)
        log.info("series %s of study %s triaged: %s (%s, %s threshold), revision %d, SR %s",
                 ev.series_uid, ev.study_uid, result.flag, decision.mode, decision.threshold,
                 result.revision, result.sr_sop_instance_uid)
        return result

    def _schedule_lis_retry(self, st: SeriesState, ev: SeriesEvent) -> None:
        """Look the labs up again after ``lis_retry_s`` (when set): a result re-issued with them
        is a new revision."""
        if self.settings.lis_retry_s > 0 and self.lis is not None:
            self._retries[ev.series_uid] = (time.monotonic() + self.settings.lis_retry_s, st)

    def _revised(self, result: TriageResult, with_sr: bool = False) -> TriageResult:
        """The result with its revision from the ledger (:mod:`agent.triage.ledger`): the content
        digest decides whether this is a redo (same revision, time and SR UID) or a new
        revision (new SR UID naming the one it replaces)."""
        digest = content_digest(result)
        sr_series = sr_uid = None
        if with_sr and self.pacs is not None:
            sr_series = sr_series_uid(result.study_uid, self.models.version)
            sr_uid = derive_uid("sr-instance", result.series_uid, self.models.version, digest)
        rev = self.ledger.revise(result.result_id, digest, result.timings.result_ready,
                                 sr_series, sr_uid)
        if rev.previous is not None:
            self._predecessors[result.result_id] = rev.previous
        if rev.redo:
            log.info("series %s: same content as revision %d: redone identically%s",
                     result.series_uid, rev.revision,
                     " (already published: nothing is sent again)" if rev.published else "")
        if rev.published:
            self._published.add((result.result_id, rev.revision))
        return result.model_copy(update={
            "revision": rev.revision, "sr_sop_instance_uid": rev.sr_instance_uid,
            "supersedes_sr_sop_instance_uid": None if rev.previous is None else rev.previous[1],
            "timings": result.timings.model_copy(update={"result_ready": rev.ready_at})})

    def _cf_scores(self, header: pydicom.Dataset, lookup: LabLookup | None
                   ) -> tuple[np.ndarray | None, str | None, list[LabResult]]:
        """CF scores of the patient and the values they came from, or None with the reason
        (CT-only triage then)."""
        patient_id = str(header.get("PatientID", "") or "")
        if not patient_id:
            return None, "no PatientID in the series: labs cannot be looked up", []
        if lookup is None:
            if self.lis is None:
                return None, "no LIS configured", []
            try:
                lookup = self.lis.lookup(patient_id, _study_date(header))
            except LisError as exc:
                log.warning("study %s: LIS lookup failed, triage is CT-only: %s",
                            header.get("StudyInstanceUID", ""), exc.message)
                return None, f"LIS unreachable: {exc.message}", []
        if not lookup.patient_found:
            return None, "patient not found in the LIS", []
        from schemas.features import by_code

        catalogue = by_code()
        labs = [c for c in lookup.values if c in catalogue and catalogue[c].kind in LAB_KINDS]
        if not labs:
            return None, "no lab values for the patient in the window", []
        vector = vectorise(lookup.values)
        proba = self.models.cf.predict(vector[None, :])[0]
        note = []
        if lookup.undated:
            note.append(f"{lookup.undated} lab value(s) without collection time used "
                        "(not time-matched to the study)")
        if lookup.unit_mismatches:
            note.append(f"unit mismatches not used: {', '.join(lookup.unit_mismatches)}")
        used = [LabResult(code=v.code, value=v.value, unit=v.unit, qualifier=v.qualifier,
                          low=v.low, high=v.high, lis_code=v.lis_code,
                          collected_at=v.collected_at)
                for _, v in sorted(lookup.values.items())]
        return np.asarray(proba), ("; ".join(note) or None), used

    def _write_sr(self, result: TriageResult, header: pydicom.Dataset,
                  ct: CtResult) -> TriageResult:
        """Build the SR and put it durably in the PACS outbox; on bad source UIDs the result
        goes out without an SR and a DLQ entry says why."""
        if self.pacs is None:
            return result
        try:
            source = SrSource.from_dataset(header, list(ct.top_uids))
            predecessor = None
            if result.supersedes_sr_sop_instance_uid is not None:
                # the replaced SR's own series (another model version wrote it in another)
                predecessor = self._predecessors.pop(result.result_id, None)
            ds = build_sr(result, source, algorithm_version=self.models.version,
                          device_name=self.settings.ae_title, predecessor=predecessor)
            self.pacs.enqueue(ds)
            self.metrics.outbox_depth.set(self.pacs.pending_count())
            return result.model_copy(update={"sr_destinations": [
                f"{d.ae_title}@{d.host}:{d.port}" for d in self.settings.pacs]})
        except InputError as exc:
            log.error("series %s: no SR written: %s", result.series_uid, exc.message)
            self._send_dlq(DeadLetter(
                reason=f"SR not written: {exc.message}", error_type=type(exc).__name__,
                source_topic=topics.DICOM_SERIES, source_partition=-1, source_offset=-1,
                key=result.series_uid, value_b64=base64.b64encode(dump_json(result)).decode(),
                study_uid=result.study_uid, series_uid=result.series_uid,
                failed_at=datetime.now(UTC)))
            return result.model_copy(update={"sr_sop_instance_uid": None})

    def _publish_evidence(self, result: TriageResult, ct: CtResult) -> None:
        """The evidence slices of ``result`` as thumbnails on ``triage.evidence``."""
        if not ct.thumbnails:
            return
        analysis = ct.analysis
        order = {} if analysis is None else {k: i for i, k in enumerate(analysis.keys)}
        per_slice = None if analysis is None else analysis.quant.slice_involvement()
        slices = []
        for uid, png, width, height in ct.thumbnails:
            i = order.get(uid)
            score = 0.0 if analysis is None or i is None else float(analysis.evidence[i])
            slices.append(EvidenceSlice(
                sop_instance_uid=uid, index=0 if i is None else i,
                score=min(max(score, 0.0), 1.0),
                involvement_percent=None if per_slice is None or i is None
                else round(100.0 * float(per_slice[i]), 3),
                png_b64=base64.b64encode(png).decode(), width=width, height=height))
        message = EvidenceThumbnails(
            result_id=result.result_id, revision=result.revision, study_uid=result.study_uid,
            series_uid=result.series_uid, window_center_hu=WINDOW_CENTER_HU,
            window_width_hu=WINDOW_WIDTH_HU, slices=slices)
        assert self._producer is not None
        self._producer.send(topics.TRIAGE_EVIDENCE, result.series_uid.encode(),
                            dump_json(message),
                            [(topics.H_SCHEMA, message.schema_.encode()),
                             (topics.H_SERIES_UID, result.series_uid.encode())])

    def _publish(self, result: TriageResult) -> None:
        """Publish ``result`` and record it in the ledger; a redo of a published revision
        sends nothing."""
        assert self._producer is not None
        key = (result.result_id, result.revision)
        if key in self._published:
            self._published.discard(key)
            return
        self._producer.send(topics.TRIAGE_RESULTS, result.study_uid.encode(), dump_json(result),
                            [(topics.H_SCHEMA, result.schema_.encode()),
                             (topics.H_SERIES_UID, result.series_uid.encode())])
        self._producer.flush()
        self.ledger.mark_published(result.result_id, result.revision)
        self.metrics.results.labels(flag=result.flag or "skipped").inc()

    def _run_retries(self) -> None:
        """Re-issue CT-only results whose labs were missing, once the labs are there."""
        now = time.monotonic()
        for uid, (due, st) in list(self._retries.items()):
            if now < due or st.event is None or st.header is None:
                continue
            del self._retries[uid]
            assert self.lis is not None
            try:
                lookup = self.lis.lookup(str(st.header.get("PatientID", "")),
                                         _study_date(st.header))
            except LisError as exc:
                log.info("series %s: LIS retry failed again: %s", uid, exc.message)
                continue
            if not lookup.patient_found:
                continue
            result = self._triage(st, st.event, lookup=lookup)
            if result.availability is not None and result.availability.cf:
                self._publish(result)
                log.info("series %s: result re-issued with lab values after LIS retry", uid)

    # --- errors ----------------------------------------------------------------------------
    def _dead_letter(self, msg: Message, reason: str, exc: BaseException | None, *,
                     study_uid: str | None = None, series_uid: str | None = None) -> None:
        log.error("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset,
                  reason)
        self._send_dlq(DeadLetter(
            reason=reason, error_type=type(exc).__name__ if exc else "InputError",
            source_topic=msg.topic, source_partition=msg.partition, source_offset=msg.offset,
            key=(msg.key or b"").decode("utf-8", "replace") or None,
            headers={k: v.decode("utf-8", "replace") for k, v in msg.headers},
            value_b64=base64.b64encode(msg.value).decode(),
            study_uid=study_uid or msg.header(topics.H_STUDY_UID),
            series_uid=series_uid or msg.header(topics.H_SERIES_UID),
            failed_at=datetime.now(UTC)))

    def _dead_letter_event(self, st: SeriesState, ev: SeriesEvent, exc: Hust19Error) -> None:
        self._send_dlq(DeadLetter(
            reason=f"series could not be triaged: {exc.message}", error_type=type(exc).__name__,
            source_topic=topics.DICOM_SERIES, source_partition=-1, source_offset=-1,
            key=ev.series_uid, value_b64=base64.b64encode(dump_json(ev)).decode(),
            study_uid=ev.study_uid, series_uid=ev.series_uid, failed_at=datetime.now(UTC)))

    def _send_dlq(self, entry: DeadLetter) -> None:
        assert self._producer is not None
        self._producer.send(topics.TRIAGE_DLQ, (entry.key or "").encode() or None,
                            dump_json(entry), [(topics.H_SCHEMA, entry.schema_.encode())])
        self._producer.flush()
        self.metrics.dlq.inc()

    def _commit(self) -> None:
        if self._consumer is None:
            return
        offsets = self._tracker.committable()
        if offsets:
            self._consumer.commit(offsets)
            self._tracker.mark_committed(offsets)

