"""What is flushed to disk, and when (issue 20: nothing recorded the fsyncs of the embedded
bus flush, the PACS outbox or the offset files), and what happens when a step of
enqueue -> flush -> commit fails (the "offsets only after durable work" claim).

The fsyncs are recorded as they happen (tests/fixtures/syncs.py: each ``os.fsync`` with what
its file descriptor names), on the real code paths."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from pydicom import Dataset

from agent.app import ALL_ROLES, Agent
from agent.bus.embedded import EmbeddedBus
from agent.bus.interface import Bus, Consumer, Headers, Producer
from agent.config import PacsDestination
from agent.triage.pacs import PacsSender
from schemas import topics
from schemas.errors import BusError
from schemas.messages import TriageResult
from tests.fixtures.dicom import SAMPLE, read_topic, run_storescu, wait_for
from tests.fixtures.syncs import record_syncs


def test_embedded_bus_appends_without_fsync_and_flush_fsyncs_before_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = EmbeddedBus(tmp_path / "bus")
    bus.ensure_topics(["t"])
    producer = bus.producer()
    producer.send("t", b"k", b"first")  # the topic's files exist now
    producer.flush()
    syncs = record_syncs(monkeypatch)
    for i in range(3):
        producer.send("t", b"k", f"v{i}".encode())
    assert syncs.calls == []  # appended (readers see them), not yet durable
    producer.flush()
    assert syncs.of("file") == ["fsync"]  # one fsync of the active segment for the batch
    syncs.clear()
    producer.flush()  # nothing new: nothing to flush
    assert syncs.calls == []
    producer.close()
    bus.close()


def test_embedded_bus_offsets_are_written_durably_on_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = EmbeddedBus(tmp_path / "bus")
    producer = bus.producer()
    producer.send("t", b"k", b"v")
    producer.flush()
    consumer = bus.consumer("g", ["t"])
    (msg,) = consumer.poll(2.0, 10)
    syncs = record_syncs(monkeypatch)
    consumer.commit({(msg.topic, msg.partition): msg.offset + 1})
    # the offsets file by write + fsync + rename, then its folder: survives a power loss
    assert syncs.kinds() == ["file", "dir"]
    consumer.close()
    again = bus.consumer("g", ["t"])
    assert again.poll(0.3, 10) == []  # resumes after the committed offset
    again.close()
    producer.close()
    bus.close()


def _sr(uid: str = "1.2.3.4.5") -> Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.9"
    ds.Modality = "SR"
    return ds


def test_pacs_outbox_enqueue_is_durable_before_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SR file and one marker per destination, each fsync'd and its folder fsync'd:
    what enqueue returned from survives a power loss."""
    dests = [PacsDestination(host="127.0.0.1", port=1, ae_title="A"),
             PacsDestination(host="127.0.0.1", port=2, ae_title="B")]
    sender = PacsSender(dests, tmp_path / "outbox", "HUST19")
    syncs = record_syncs(monkeypatch, thread=threading.current_thread())
    sender.enqueue(_sr())
    assert syncs.kinds() == ["file", "dir"] * 3  # the object, then the two markers
    assert sender.pending_count() == 2


class FailingFlushBus(Bus):
    """A real embedded bus whose producers' flush raises while ``failing`` is set and a
    message for one of ``topics`` waits in them: a bus outage at the flush, injected."""

    def __init__(self, inner: EmbeddedBus, failing_topics: Sequence[str]) -> None:
        self.inner = inner
        self.failing = threading.Event()
        self.failing_topics = set(failing_topics)
        self.failed = 0

    def producer(self) -> Producer:
        bus = self
        inner = self.inner.producer()

        class _Producer(Producer):
            def __init__(self) -> None:
                self.pending: list[str] = []

            def send(self, topic: str, key: bytes | None, value: bytes,
                     headers: Headers | None = None) -> None:
                if bus.failing.is_set() and topic in bus.failing_topics:
                    self.pending.append(topic)  # held back: never durable
                    return
                inner.send(topic, key, value, headers)

            def flush(self, timeout_s: float = 30.0) -> None:
                if self.pending:
                    self.pending.clear()
                    bus.failed += 1
                    raise BusError("injected: the bus failed during flush")
                inner.flush(timeout_s)

            def close(self) -> None:
                inner.close()

        return _Producer()

    def consumer(self, group_id: str | None, topics_: Sequence[str]) -> Consumer:
        return self.inner.consumer(group_id, topics_)

    def ensure_topics(self, topics_: Sequence[str]) -> None:
        self.inner.ensure_topics(topics_)

    def topic_exists(self, topic: str) -> bool:
        return self.inner.topic_exists(topic)

    def ping(self, timeout_s: float = 5.0) -> None:
        self.inner.ping(timeout_s)

    def describe(self) -> str:
        return "embedded (flush failures injected) " + self.inner.describe()

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
def test_offsets_are_committed_only_after_the_result_is_durable(
        running_agent: Callable[..., Agent], tmp_path: Path) -> None:
    """The worker's result flush fails (injected) while a series completes: no offset of the
    series is committed and no result is on the topic; once the bus heals the series is
    finished and its result is on the topic once, and only then are the offsets committed
    up to the end of both topics."""
    inner = EmbeddedBus(tmp_path / "data" / "bus")
    bus = FailingFlushBus(inner, [topics.TRIAGE_RESULTS])
    bus.failing.set()
    agent = running_agent(bus_obj=bus, roles=ALL_ROLES, data_dir=tmp_path / "data",
                          series_quiet_s=0.5, lis=f"sqlite:///{tmp_path / 'lis.sqlite'}")
    files = sorted(SAMPLE.glob("*.dcm"))
    assert run_storescu(files, agent.port, "HUST19").returncode == 0
    wait_for(lambda: bus.failed >= 2, "the result flush to fail (twice: it is retried)", 90)
    group = agent.settings.consumer_group
    for topic in (topics.DICOM_INSTANCES, topics.DICOM_SERIES):
        assert inner.committed_offsets(topic).get(group, 0) == 0, topic
    assert not inner.topic_exists(topics.TRIAGE_RESULTS) or \
        inner.log(topics.TRIAGE_RESULTS).count() == 0
    bus.failing.clear()  # the bus heals
    (message,) = read_topic(inner, topics.TRIAGE_RESULTS, 1, timeout_s=90)
    result = TriageResult.model_validate_json(message.value)
    assert result.instance_count == len(files)
    ends = {t: inner.log(t).count() for t in (topics.DICOM_INSTANCES, topics.DICOM_SERIES)}
    wait_for(lambda: all(inner.committed_offsets(t).get(group) == end
                         for t, end in ends.items()), "the offsets committed to the end", 30)
    agent.stop()
    assert inner.log(topics.TRIAGE_RESULTS).count() == 1  # exactly one, after the stop

