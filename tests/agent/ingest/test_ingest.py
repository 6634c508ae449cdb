"""The Storage SCP against real peers: dcmtk storescu, pynetdicom SCUs (plain and TLS), the
embedded bus and the Kafka-protocol test broker."""

from __future__ import annotations

import json
import logging
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.app import Agent
from agent.bus.factory import open_bus
from agent.bus.interface import Bus, Message
from agent.ingest.spool import InstanceInfo, Spool
from agent.ingest.status import StoreStatus
from schemas import topics
from schemas.messages import INSTANCE_SCHEMA
from tests.fixtures.dicom import (
    SAMPLE,
    associate,
    copy_series,
    dataset_offset,
    free_port,
    read_topic,
    run_storescu,
    stored_spool_files,
)
from tests.fixtures.filesystems import xattr_folder
from tests.fixtures.kafka import kafka_test_overrides

StoreScp = Callable[..., tuple[int, Path]]
def wait_published(agent: Agent, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    assert agent.spool is not None
    while time.monotonic() < deadline:
        if agent.spool.instance_count() >= count and agent.spool.pending_count() == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"{agent.spool.instance_count()} stored, {agent.spool.pending_count()} pending "
                f"after {timeout_s} s (want {count} published)")


def assert_byte_identical(messages: list[Message], files: list[Path],
                          reference: Path | None = None) -> None:
    """Every file arrived exactly once, with the right key and headers, and its dataset bytes
    (after the file meta) are those that were sent.

    ``storescu`` re-encodes a file when it sends it (dcmtk writes sequences with explicit
    lengths), so what was *sent* is taken from dcmtk ``storescp``, which received the same
    files from the same ``storescu`` (``reference``: its ``-od`` folder, one file per arrival,
    matched by the SOP Instance UID inside). Without a reference the file bytes themselves are
    what was sent. Pixel data is also compared with the original file's."""
    received: dict[str, Path] = {}
    for copy in sorted(reference.iterdir()) if reference is not None else []:
        uid = str(dcmread(copy, stop_before_pixels=True).SOPInstanceUID)
        assert uid not in received, f"storescp received {uid} twice"
        received[uid] = copy
    by_sop: dict[str, Message] = {}
    for m in messages:
        sop = m.header(topics.H_SOP_INSTANCE_UID)
        assert sop is not None and sop not in by_sop, f"duplicate or missing SOP header {sop}"
        by_sop[sop] = m
    assert len(by_sop) == len(files)
    for path in files:
        ds = dcmread(path)
        sop = str(ds.SOPInstanceUID)
        m = by_sop[sop]
        sent = (received[sop] if reference is not None else path).read_bytes()
        assert m.key == str(ds.SeriesInstanceUID).encode()
        assert m.header(topics.H_SCHEMA) == INSTANCE_SCHEMA
        assert m.header(topics.H_STUDY_UID) == ds.StudyInstanceUID
        assert m.header(topics.H_SERIES_UID) == ds.SeriesInstanceUID
        assert m.header(topics.H_TRANSFER_SYNTAX) == ds.file_meta.TransferSyntaxUID
        assert m.value[128:132] == b"DICM"
        assert m.value[dataset_offset(m.value):] == sent[dataset_offset(sent):], path.name
        assert dcmread(BytesIO(m.value)).PixelData == ds.PixelData, path.name


def _with_full_meta(path: Path, out: Path) -> Path:
    """``path`` itself, or a copy (same dataset bytes) whose file meta names the SOP
    Instance UID, which pynetdicom's chunked sender needs."""
    ds = dcmread(path, stop_before_pixels=True)
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        return path
    raw = path.read_bytes()
    meta = ds.file_meta
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = "1.2.3.4"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta)
    copy = out / path.name
    copy.write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + raw[dataset_offset(raw):])
    return copy


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus_url(request: pytest.FixtureRequest) -> str:
    """The bus the agent publishes to: embedded, or a fresh Kafka test broker."""
    if request.param == "embedded":
        return "embedded"
    return str(request.getfixturevalue("fresh_kafka_broker"))


@pytest.fixture
def bus(bus_url: str, tmp_path: Path) -> Iterator[Bus]:
    """The bus at ``bus_url`` for an agent with data in ``tmp_path / "data"``; closed after the
    agent (request it before ``running_agent``)."""
    if bus_url == "embedded":
        opened = open_bus(bus_url, tmp_path / "data")
    else:
        from agent.bus.kafka import KafkaBus

        opened = KafkaBus([bus_url.removeprefix("kafka://")], **kafka_test_overrides())
    yield opened
    opened.close()


def test_normal001_jpeg_lossless_lands_byte_identical(
        bus: Bus, running_agent: Callable[..., Agent], storescp: StoreScp,
        chest_series: Path, tmp_path: Path) -> None:
    files = sorted((chest_series / "normal001").iterdir())
    data_dir = tmp_path / "data"
    agent = running_agent(bus_obj=bus, data_dir=data_dir, allow_ae=["STORESCU"])
    result = run_storescu(files, agent.port, "HUST19", extra=["-xs"])
    assert result.returncode == 0, result.stderr
    ref_port, ref_dir = storescp()
    assert run_storescu(files, ref_port, "PACS", extra=["-xs"]).returncode == 0
    wait_published(agent, len(files))
    messages = read_topic(bus, topics.DICOM_INSTANCES, len(files))
    assert {m.header(topics.H_CALLING_AE) for m in messages} == {"STORESCU"}
    assert_byte_identical(messages, files, ref_dir)


def test_raw_bytes_are_kept_exactly_as_received(running_agent: Callable[..., Agent],
                                                chest_series: Path, tmp_path: Path) -> None:
    """A pynetdicom SCU sending files' bytes unchanged (chunked mode): the bus value holds
    the very same dataset bytes (JPEG Lossless SV1, undefined-length sequences and all)."""
    files = sorted((chest_series / "normal001").iterdir())[:5]
    agent = running_agent()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.70"])
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = associate(ae, agent.port)
        # normal001 lacks Media Storage SOP Instance UID in its file meta: give it one
        for path in files:
            assert assoc.send_c_store(_with_full_meta(path, tmp_path)).Status == StoreStatus.SUCCESS
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    wait_published(agent, len(files))
    assert_byte_identical(read_topic(agent.bus, topics.DICOM_INSTANCES, len(files)), files)


@pytest.fixture(scope="module")
def long_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The 300-slice uncompressed series, built once for the module."""
    return copy_series(tmp_path_factory.mktemp("series"), copies=10)


@pytest.mark.slow
def test_uncompressed_300_slice_series_lands_byte_identical(
        bus: Bus, running_agent: Callable[..., Agent], storescp: StoreScp,
        long_series: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = long_series
    assert len(files) == 300
    data_dir = tmp_path / "data"
    agent = running_agent(bus_obj=bus, data_dir=data_dir)
    t0 = time.monotonic()
    result = run_storescu(files, agent.port, "HUST19")
    elapsed = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert agent.spool is not None and agent.spool.instance_count() == 300
    with capsys.disabled():
        print(f"\n[ingest {type(bus).__name__}] 300 uncompressed instances over storescu in "
              f"{elapsed:.2f} s = {300 / elapsed:.1f} instances/s")
    ref_port, ref_dir = storescp()
    assert run_storescu(files, ref_port, "PACS").returncode == 0
    wait_published(agent, 300)
    assert_byte_identical(read_topic(bus, topics.DICOM_INSTANCES, 300), files, ref_dir)


def test_unknown_calling_ae_is_rejected(running_agent: Callable[..., Agent],
                                        caplog: pytest.LogCaptureFixture) -> None:
    agent = running_agent(allow_ae=["STORESCU"])
    result = run_storescu([sorted(SAMPLE.glob("*.dcm"))[0]], agent.port, "HUST19",
                          aet="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr
    assert agent.spool is not None and agent.spool.instance_count() == 0
    assert any("INTRUDER" in r.getMessage() and "allow-list" in r.getMessage()
               for r in caplog.records)


def _quarantine_reasons(agent: Agent) -> list[dict[str, object]]:
    assert agent.spool is not None
    return [json.loads(p.read_text()) for p in sorted(agent.spool.quarantine_dir.glob("*.json"))]


def test_bad_datasets_get_failure_status_and_quarantine_while_good_ones_succeed(
        running_agent: Callable[..., Agent], chest_series: Path, tmp_path: Path) -> None:
    agent = running_agent()
    good = sorted(SAMPLE.glob("*.dcm"))
    truncated = dcmread(good[2])
    truncated.SOPInstanceUID = generate_uid()
    truncated.PixelData = truncated.PixelData[:-1000]
    no_pixels = dcmread(good[3])
    no_pixels.SOPInstanceUID = generate_uid()
    del no_pixels.PixelData
    p002 = dcmread(sorted((chest_series / "P002").iterdir())[0])  # empty SOP Instance UID
    assert p002.SOPInstanceUID == ""

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [p002.file_meta.TransferSyntaxUID])
    ae.add_requested_context(CTImageStorage, [truncated.file_meta.TransferSyntaxUID])
    assoc = associate(ae, agent.port)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(good[0]).Status,
                    assoc.send_c_store(truncated).Status,
                    assoc.send_c_store(no_pixels).Status,
                    assoc.send_c_store(p002).Status]
        rsp = assoc.send_c_store(good[1])
        statuses.append(rsp.Status)
        assert assoc.is_established  # the association went on after the failures
    finally:
        assoc.release()
    assert statuses == [StoreStatus.SUCCESS, StoreStatus.CANNOT_PARSE,
                        StoreStatus.MISSING_PIXEL_DATA, StoreStatus.MISSING_UID,
                        StoreStatus.SUCCESS]
    assert agent.spool is not None and agent.spool.instance_count() == 2
    reasons = _quarantine_reasons(agent)
    assert len(reasons) == 3
    text = [str(r["reason"]) for r in reasons]
    assert any("truncated" in t for t in text)
    assert any("no Pixel Data" in t for t in text)
    p002_reason = next(t for t in text if "SOP Instance UID (0008,0018) is empty" in t)
    assert "is not a valid DICOM UID" in p002_reason  # the UUID-style study/series UIDs
    kept = sorted(agent.spool.quarantine_dir.glob("*.dcm"))
    assert len(kept) == 3 and all(p.stat().st_size > 1000 for p in kept)


def test_unparseable_bytes_are_refused_and_quarantined(running_agent: Callable[..., Agent],
                                                       tmp_path: Path) -> None:
    agent = running_agent()
    src = sorted(SAMPLE.glob("*.dcm"))[0]
    raw = src.read_bytes()
    bad = tmp_path / "bad.dcm"
    # valid file meta, then garbage instead of the dataset
    bad.write_bytes(raw[:dataset_offset(raw)] + b"\xff\xff\xff\xff" * 64)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        assoc = associate(ae, agent.port)
        status = assoc.send_c_store(bad).Status
        ok = assoc.send_c_store(src).Status
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status == StoreStatus.CANNOT_PARSE
    assert ok == StoreStatus.SUCCESS
    (reason,) = _quarantine_reasons(agent)
    assert "cannot be parsed" in str(reason["reason"])


def test_duplicate_sop_instance_is_stored_once(running_agent: Callable[..., Agent]) -> None:
    """Sent twice in one association (the second request arrives right after the first's
    answer, which goes out before the index row), then again in another."""
    agent = running_agent(series_quiet_s=60.0)
    one = sorted(SAMPLE.glob("*.dcm"))[:1]
    for files in (one * 2, one):
        result = run_storescu(files, agent.port, "HUST19")
        assert result.returncode == 0, result.stderr
    assert agent.spool is not None and agent.spool.instance_count() == 1
    wait_published(agent, 1)
    assert len(stored_spool_files(agent.spool)) == 1
    assert len(read_topic(agent.bus, topics.DICOM_INSTANCES, 1, timeout_s=2)) == 1


def test_an_index_row_that_fails_after_the_answer_is_written_later(
        running_agent: Callable[..., Agent], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A sealed spool file is the durable record, so Success goes out before the index row
    (``Spool.durable_before_index``). When that row fails, the file is kept and the outbox
    indexes it on its next pass: the instance is published, without a restart."""
    real = Spool._index_locked
    failed: list[str] = []

    def fails_once(db: sqlite3.Connection, info: InstanceInfo, rel: str, size: int) -> bool:
        if not failed:
            failed.append(info.sop_instance_uid)
            raise sqlite3.OperationalError("database or disk is full")
        return real(db, info, rel, size)

    caplog.set_level(logging.INFO, "agent.ingest.spool")
    (tmp_path / "data").mkdir()
    with xattr_folder(tmp_path / "data") as folder:
        agent = running_agent(data_dir=folder, series_quiet_s=60.0)
        assert agent.spool is not None and agent.spool.durable_before_index
        monkeypatch.setattr(Spool, "_index_locked", staticmethod(fails_once))
        result = run_storescu(sorted(SAMPLE.glob("*.dcm"))[:2], agent.port, "HUST19")
        assert result.returncode == 0, result.stderr  # both answered Success
        wait_published(agent, 2)
        assert len(failed) == 1 and len(stored_spool_files(agent.spool)) == 2
        assert any("answered Success, then: cannot index" in r.getMessage()
                   and "kept and indexed once the index works again" in r.getMessage()
                   for r in caplog.records)
        assert any("1 answered instances indexed after their index row had failed"
                   in r.getMessage() for r in caplog.records)
        agent.stop()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_tls_with_client_certificates(running_agent: Callable[..., Agent],
                                      tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ccert, ckey = tmp_path / "client.pem", tmp_path / "client.key"
    for c, k, cn in ((cert, key, "localhost"), (ccert, ckey, "scanner")):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                 f"/CN={cn}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                 "-keyout", str(k), "-out", str(c))
    agent = running_agent(tls_cert=cert, tls_key=key, tls_ca=ccert)

    def client(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        if with_cert:
            ctx.load_cert_chain(ccert, ckey)
        return ctx

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = associate(ae, agent.port, tls_args=(client(True), "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == StoreStatus.SUCCESS
    assert assoc.send_c_store(sorted(SAMPLE.glob("*.dcm"))[0]).Status == StoreStatus.SUCCESS
    assoc.release()
    # no client certificate: the handshake fails, nothing is stored
    ae.acse_timeout = ae.network_timeout = 5
    refused = ae.associate("127.0.0.1", agent.port, ae_title="HUST19",
                           tls_args=(client(False), "localhost"))
    assert not refused.is_established
    # plain TCP to the TLS port: no association either
    plain = ae.associate("127.0.0.1", agent.port, ae_title="HUST19")
    assert not plain.is_established
    assert agent.spool is not None and agent.spool.instance_count() == 1


def test_verification_echo(running_agent: Callable[..., Agent]) -> None:
    agent = running_agent()
    result = subprocess.run(["echoscu", "-aec", "HUST19", "127.0.0.1", str(agent.port)],
                            capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_port_in_use_is_a_config_error(running_agent: Callable[..., Agent]) -> None:
    from schemas.errors import ConfigError

    agent = running_agent()
    with pytest.raises(ConfigError, match="cannot listen"):
        running_agent(port=agent.port)
    assert free_port() != agent.port


# -- the file meta, checked against the library it stands in for -------------------------


@pytest.mark.parametrize(("sop_instance", "source_ae"),
                         [("1.2.826.0.1.3680043.8.498.1", "STORESCU"), ("", "AE"),
                          ("1.2.3", "SIXTEEN_CHARS_AE")])
def test_file_meta_is_encoded_as_pydicom_encodes_it(sop_instance: str, source_ae: str) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    from agent.ingest.instance import encode_file_meta

    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(str(CTImageStorage))
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.70")
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = source_ae
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=False)
    assert encode_file_meta(sop_class_uid=str(CTImageStorage), sop_instance_uid=sop_instance,
                            transfer_syntax_uid="1.2.840.10008.1.2.4.70",
                            source_ae=source_ae) == buf.getvalue()
