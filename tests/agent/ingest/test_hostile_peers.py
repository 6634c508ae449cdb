"""The listener against hostile peers (issue 20): what it bounds before a peer has associated,
and what it refuses in an instance, over real sockets on loopback.

Hostile connections come from 127.0.0.2 and up, the legitimate sender from 127.0.0.1
(:mod:`tests.fixtures.hostile`). Timings are generous bounds, not benchmarks
(``bench/faults.py`` measures them)."""

from __future__ import annotations

import logging
import resource
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.app import Agent
from agent.ingest.guard import EVICT_AFTER_S, MAX_ASSOCIATE_RQ_BYTES, MAX_PDU_BYTES
from agent.ingest.status import StoreStatus
from tests.fixtures.dicom import SAMPLE, associate, dataset_offset, wait_for
from tests.fixtures.fuzz import deep_sequence, mutants, send_raw
from tests.fixtures.hostile import (
    A_ASSOCIATE_RQ,
    P_DATA_TF,
    client_tls,
    connect_from,
    idle_connections,
    make_tls_files,
    oversized_header,
    peer_closed,
    timed_echo,
)

LEGIT_WITHIN_S = 1.0
"""Issue 20: a legitimate sender gets through within 1 s beside hostile connections."""
CLOSED_WITHIN_S = 2.0
MIB = 1 << 20
GUARD_LOGGER = "agent.ingest.guard"


def _refusals(caplog: pytest.LogCaptureFixture, reason: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == GUARD_LOGGER and f"refused ({reason})" in r.getMessage()]


def _metric(agent: Agent, reason: str) -> float:
    value = agent.metrics.registry.get_sample_value("hust19_connections_refused_total",
                                                    {"reason": reason})
    return float(value or 0.0)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_4_gib_pdu_header_is_refused_before_anything_is_allocated(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture) -> None:
    """The 6-byte A-ASSOCIATE-RQ header declaring 0xFFFFFFFF bytes (issue 20, item 1): the
    connection is aborted at once, logged with the peer, and this process's peak memory
    does not move (it held 4 GiB per such connection before)."""
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent()
    before = _maxrss_mib()
    with idle_connections(agent.port, 4, send=oversized_header()) as socks:
        assert all(peer_closed(s, CLOSED_WITHIN_S) for s in socks)
    with idle_connections(agent.port, 1, first=10, send=oversized_header(
            A_ASSOCIATE_RQ, MAX_ASSOCIATE_RQ_BYTES + 1)) as (sock,):
        assert peer_closed(sock, CLOSED_WITHIN_S)
    assert _maxrss_mib() - before < 10
    lines = _refusals(caplog, "pdu_length")
    assert any("127.0.0.2:" in line and "4294967295 bytes" in line for line in lines), lines
    assert _metric(agent, "pdu_length") == 5
    assert timed_echo(agent.port).established  # the listener is unharmed


def _associated_socket(agent: Agent, abstract_syntax: str = Verification,
                       transfer_syntax: str = ImplicitVRLittleEndian
                       ) -> tuple[Association, socket.socket]:
    """An established association with the agent (one presentation context, ID 1), and its
    raw socket (to send what a pynetdicom requestor would not)."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(abstract_syntax, [transfer_syntax])
    assoc = associate(ae, agent.port)
    assert assoc.is_established
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    assert isinstance(raw, socket.socket)
    return assoc, raw


def test_a_p_data_pdu_longer_than_announced_aborts_the_association(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    assoc, raw = _associated_socket(running_agent())
    assert assoc.acceptor.maximum_length == MAX_PDU_BYTES  # what the SCP announced
    raw.sendall(oversized_header(P_DATA_TF, MAX_PDU_BYTES + 1))
    wait_for(lambda: assoc.is_aborted, "the SCP to abort the association", CLOSED_WITHIN_S)
    assert any(f"P-DATA-TF PDU declares {MAX_PDU_BYTES + 1} bytes" in line
               for line in _refusals(caplog, "pdu_length"))


def _p_data_tf(items: bytes) -> bytes:
    return struct.pack(">BBL", P_DATA_TF, 0, len(items)) + items


@pytest.mark.parametrize(("items", "says"), [
    (struct.pack(">LBB", 4000, 1, 0x03) + bytes(10), "a PDV item declares 4000 bytes"),
    (struct.pack(">LBB", 1, 1, 0x03), "a PDV item declares 1 bytes"),
    (struct.pack(">LBB", 4, 1, 0x03) + b"\x00\x00" + b"\x00\x00\x00", "too few for an item"),
    (b"", "without PDV items"),
], ids=["item-past-the-pdu", "item-without-control-header", "trailing-bytes", "no-items"])
def test_a_p_data_pdu_with_malformed_items_aborts_the_association(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture, items: bytes,
        says: str) -> None:
    """P-DATA-TF PDUs of an established association go straight to the DIMSE decoder
    (``BoundedDUL.direct_pdata``): their PDV items are checked on the way, the association is
    aborted and the listener serves the next peer."""
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent()
    assoc, raw = _associated_socket(agent)
    raw.sendall(_p_data_tf(items))
    wait_for(lambda: assoc.is_aborted, "the SCP to abort the association", CLOSED_WITHIN_S)
    refused = _refusals(caplog, "bad_pdu")
    assert any(says in line for line in refused), refused
    assert timed_echo(agent.port).established


def _pdv(context_id: int, control: int, value: bytes) -> bytes:
    return struct.pack(">LBB", len(value) + 2, context_id, control) + value


def _store_command(sop_instance: str) -> bytes:
    """A C-STORE-RQ command set for a CT instance with a data set, as pynetdicom encodes it."""
    req = C_STORE()
    req.MessageID, req.Priority = 1, 0
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, sop_instance
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    message.command_set.CommandDataSetType = 0x0001
    return bytes(encode(message.command_set, True, True))


@pytest.mark.parametrize("third", [_pdv(1, 0x03, _store_command("1.2.3.4")),
                                   _pdv(3, 0x02, b"\x00" * 8)],
                         ids=["command-inside-data-set", "other-context"])
def test_a_c_store_data_set_interrupted_by_other_fragments_aborts_the_association(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture,
        third: bytes) -> None:
    """A C-STORE request read directly from its bytes (``serve_stores_directly``) takes only
    data set fragments of its own presentation context until the last one."""
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent()
    assoc, raw = _associated_socket(agent, CTImageStorage)
    raw.sendall(_p_data_tf(_pdv(1, 0x03, _store_command(generate_uid()))))
    raw.sendall(_p_data_tf(_pdv(1, 0x00, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")))
    raw.sendall(_p_data_tf(third))
    wait_for(lambda: assoc.is_aborted, "the SCP to abort the association", CLOSED_WITHIN_S)
    refused = _refusals(caplog, "bad_pdu")
    assert any("a command fragment or another presentation context's fragment inside a "
               "C-STORE data set" in line for line in refused), refused
    assert agent.spool is not None and agent.spool.instance_count() == 0
    assert timed_echo(agent.port).established


def test_a_c_store_request_whole_in_one_p_data_pdu_is_stored(
        running_agent: Callable[..., Agent]) -> None:
    """Command and data set in one PDU (dcmtk and pynetdicom send them apart, the standard
    allows both): the request is served directly and the instance stored."""
    agent = running_agent()
    sample = sorted(SAMPLE.glob("*.dcm"))[0]
    source = dcmread(sample, stop_before_pixels=True)
    data = sample.read_bytes()
    assoc, raw = _associated_socket(agent, CTImageStorage,
                                    str(source.file_meta.TransferSyntaxUID))
    raw.sendall(_p_data_tf(_pdv(1, 0x03, _store_command(str(source.SOPInstanceUID)))
                           + _pdv(1, 0x02, data[dataset_offset(data):])))
    wait_for(lambda: agent.spool is not None and agent.spool.instance_count() == 1,
             "the instance to be stored")
    assert not assoc.is_aborted


def test_a_legitimate_sender_gets_through_beside_idle_and_hostile_connections(
        running_agent: Callable[..., Agent]) -> None:
    """12 idle connections (one per hostile address) and 12 more from one address past its
    limit: the legitimate sender associates and echoes within a second."""
    agent = running_agent(max_associations_per_peer=8)
    with idle_connections(agent.port, 12), idle_connections(
            agent.port, 12, first=20, same_source=True) as crowd:
        wait_for(lambda: agent.scp is not None and agent.scp.guard.open_connections == 20,
                 "12 + 8 connections admitted")
        assert sum(peer_closed(s, 0.2) for s in crowd) == 4  # past the per-address limit
        timing = timed_echo(agent.port)
        assert timing.established and timing.seconds < LEGIT_WITHIN_S, timing


def test_connection_limits_refuse_at_once_and_give_slots_back(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture) -> None:
    """Every slot held by an association: the next connection is refused at once, logged;
    the slots come back as soon as the associations end."""
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent(max_associations=3)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", agent.port, ae_title="HUST19") for _ in range(3)]
    assert all(a.is_established for a in held)
    assert not timed_echo(agent.port, timeout_s=2).established
    (line,) = _refusals(caplog, "max_associations")
    assert "127.0.0.1:" in line and "the limit is 3 (max_associations)" in line
    for assoc in held:
        assoc.release()
    wait_for(lambda: agent.scp is not None and agent.scp.guard.open_connections == 0,
             "the slots to be given back", CLOSED_WITHIN_S)
    assert timed_echo(agent.port).established


def test_an_idle_flood_from_many_addresses_makes_room_for_a_sender(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture) -> None:
    """More idle connections than slots, each from its own address (no per-address limit
    helps): the oldest one that never associated is closed to make room, so the sender gets
    through at once instead of waiting for ARTIM."""
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent(max_associations=4)
    with idle_connections(agent.port, 4) as idle:
        wait_for(lambda: agent.scp is not None and agent.scp.guard.open_connections == 4,
                 "4 idle connections admitted")
        time.sleep(EVICT_AFTER_S)  # the idle connections age (the fault's own timing)
        timing = timed_echo(agent.port)
        assert timing.established and timing.seconds < LEGIT_WITHIN_S, timing
        assert peer_closed(idle[0], CLOSED_WITHIN_S)  # the oldest made room
    (line,) = _refusals(caplog, "evicted")
    assert line.startswith("DICOM peer 127.0.0.2:") and "without an A-ASSOCIATE-RQ" in line


def test_artim_closes_a_connection_that_never_associates(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent(artim_timeout_s=0.5)
    with idle_connections(agent.port, 2) as socks:
        started = time.monotonic()
        assert all(peer_closed(s, 0.5 + CLOSED_WITHIN_S) for s in socks)
        assert time.monotonic() - started >= 0.4
    wait_for(lambda: bool(_refusals(caplog, "artim")), "the ARTIM line")
    assert "no A-ASSOCIATE-RQ within 0.5 s (ARTIM)" in _refusals(caplog, "artim")[0]


def test_the_called_ae_title_is_checked(running_agent: Callable[..., Agent],
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent()
    assert not timed_echo(agent.port, called_ae="NOTHUST").established
    (line,) = _refusals(caplog, "association_rejected")
    assert "called AE 'NOTHUST' is not this agent's 'HUST19'" in line and "127.0.0.1:" in line
    assert timed_echo(agent.port).established
    lenient = running_agent(require_called_ae=False)
    assert timed_echo(lenient.port, called_ae="NOTHUST").established


@pytest.mark.slow
def test_tls_handshakes_run_beside_the_accept_thread_with_a_timeout(
        running_agent: Callable[..., Agent], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Idle TCP connections on the TLS port no longer block every TLS sender (issue 20, item
    2); a handshake that does not finish in time, or fails, is logged with the peer."""
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    files = make_tls_files(tmp_path / "tls")
    agent = running_agent(tls_cert=files["server_cert"], tls_key=files["server_key"],
                          tls_ca=files["ca"], tls_handshake_timeout_s=0.5)
    with idle_connections(agent.port, 12) as idle:
        timing = timed_echo(agent.port, tls=client_tls(files))
        assert timing.established and timing.seconds < LEGIT_WITHIN_S, timing
        assert all(peer_closed(s, 0.5 + CLOSED_WITHIN_S) for s in idle)
    no_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files["ca"]))
    with idle_connections(agent.port, 1, first=30):  # another address: its own log line
        pass
    assert not timed_echo(agent.port, tls=no_cert, timeout_s=2).established
    lines = _refusals(caplog, "tls_handshake")
    assert any("127.0.0.2:" in s and "no TLS handshake within 0.5 s" in s for s in lines), lines
    assert any("127.0.0.1:" in s and "certificate" in s for s in lines), lines


# -- instances whose bytes contradict themselves ------------------------------------------


def _part10(tmp_path: Path, name: str, head: bytes, body: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(head + body)
    return path


def _sample(tmp_path: Path, syntax: str) -> tuple[bytes, bytes]:
    """A sample instance with a new SOP Instance UID in ``syntax``: (preamble + meta,
    dataset)."""
    ds = dcmread(sorted(SAMPLE.glob("*.dcm"))[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=syntax == "1.2.840.10008.1.2", little_endian=True,
               enforce_file_format=True)
    data = buf.getvalue()
    return data[:dataset_offset(data)], data[dataset_offset(data):]


def _meta(syntax: str, sop_uid: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.3.4"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta)
    return b"\x00" * 128 + b"DICM" + buf.getvalue()


def test_instances_whose_lengths_or_syntax_contradict_the_bytes_are_refused(
        running_agent: Callable[..., Agent], tmp_path: Path) -> None:
    """Issue 20, item 4: Pixel Data declaring 0x7FFFFFF0 bytes and an Explicit VR dataset
    announced as Implicit VR were answered Success; now each gets 0xC210 with an Error
    Comment naming the problem, is quarantined, and the association goes on."""
    agent = running_agent()
    explicit, implicit = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    head, body = _sample(tmp_path, explicit)
    pixel = body.rfind(b"\xe0\x7f\x10\x00OW")
    huge = bytearray(body)
    struct.pack_into("<I", huge, pixel + 8, 0x7FFFFFF0)
    sop = str(dcmread(BytesIO(head + body), stop_before_pixels=True).SOPInstanceUID)
    mislabelled = _meta(implicit, sop)
    ihead, ibody = _sample(tmp_path, implicit)
    isop = str(dcmread(BytesIO(ihead + ibody), stop_before_pixels=True).SOPInstanceUID)
    deep_head, deep_body = _sample(tmp_path, explicit)
    files = [
        _part10(tmp_path, "huge-pixel-length.dcm", head, bytes(huge)),
        _part10(tmp_path, "explicit-as-implicit.dcm", mislabelled, body),
        _part10(tmp_path, "implicit-as-explicit.dcm", _meta(explicit, isop), ibody),
        _part10(tmp_path, "deep.dcm", deep_head, deep_sequence(64, closed=True) + deep_body),
        _part10(tmp_path, "good.dcm", head, body),
    ]
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [explicit])
    ae.add_requested_context(CTImageStorage, [implicit])
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = associate(ae, agent.port)
        answers = [assoc.send_c_store(f) for f in files]
        assert assoc.is_established
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert [int(a.Status) for a in answers] == [StoreStatus.CANNOT_PARSE] * 4 + [0]
    comments = [str(a.get("ErrorComment", "")) for a in answers[:4]]
    assert comments[0].startswith("(7FE0,0010) declares 2147483632 bytes"), comments
    assert comments[1].startswith("Explicit VR data, transfer syntax says Implicit VR")
    assert comments[2].startswith("Implicit VR data, transfer syntax says Explicit VR")
    assert comments[3].startswith("sequences nested deeper than 32")
    assert agent.spool is not None and agent.spool.instance_count() == 1
    assert len(list(agent.spool.quarantine_dir.glob("*.dcm"))) == 4


def test_a_deflate_bomb_is_refused_without_inflating_it() -> None:
    from agent.ingest.element_scan import StructureError, inflate

    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = bomb.compress(bytes(64 * MIB)) + bomb.flush()
    assert len(data) < MIB // 8
    with pytest.raises(StructureError, match="inflates past 1048576 bytes"):
        inflate(data, max_bytes=MIB)
    assert len(inflate(data, max_bytes=64 * MIB)) == 64 * MIB


def test_an_instance_past_max_instance_mib_aborts_its_association(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent(max_instance_mib=1)
    ds = dcmread(sorted(SAMPLE.glob("*.dcm"))[0])
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 1024  # 2 MiB of pixels
    ds.PixelData = bytes(1024 * 1024 * 2)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = associate(ae, agent.port)
    assert assoc.is_established
    answer = assoc.send_c_store(ds)
    assert "Status" not in answer
    wait_for(lambda: not assoc.is_established, "the association to end", CLOSED_WITHIN_S)
    assert any("past 1048576 bytes (max_instance_mib)" in line
               for line in _refusals(caplog, "instance_size"))
    assert agent.spool is not None and agent.spool.instance_count() == 0


def test_seeded_fuzzed_datasets_are_all_answered_and_the_listener_lives_on(
        running_agent: Callable[..., Agent], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """120 mutants of the sample (bytes flipped, cut, huge lengths, moved, the other VR
    encoding declared, 5000-deep sequences; seed 20): each gets an answer (Success or a
    named failure; a broken association is reopened), nothing escapes as a traceback, and
    a good instance still goes through. ``bench/faults.py`` runs 1,000 and more."""
    caplog.set_level(logging.WARNING)
    agent = running_agent()
    files = []
    for i, mutant in enumerate(mutants(120, seed=20)):
        files.append(tmp_path / f"m{i:04d}.dcm")
        files[-1].write_bytes(mutant.data)
    statuses = send_raw(files, agent.port)
    assert len(statuses) == len(files)
    allowed = {0, *(int(s) for s in StoreStatus)}
    assert {s for s in statuses if s is not None} <= allowed
    assert statuses.count(None) == 0, "an association broke down"
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert timed_echo(agent.port).established
    good = send_raw([sorted(SAMPLE.glob("*.dcm"))[0]], agent.port)
    assert good == [0]


def test_a_hostile_connect_from_a_free_address_is_refused_with_its_address(
        running_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal line names the peer's address and the reason; the log is throttled to
    one line per address and reason every 10 s, the next line counting what was left out."""
    caplog.set_level(logging.INFO, GUARD_LOGGER)
    agent = running_agent()
    for _ in range(5):
        sock = connect_from("127.0.0.9", agent.port)
        sock.sendall(oversized_header())
        assert peer_closed(sock, CLOSED_WITHIN_S)
        sock.close()
    lines = [line for line in _refusals(caplog, "pdu_length") if "127.0.0.9:" in line]
    assert len(lines) == 1
    assert _metric(agent, "pdu_length") == 5
