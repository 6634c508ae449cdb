"""The spool: durable store, duplicate handling, queue order, orphan recovery, quarantine."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from agent.ingest.spool import InstanceInfo, Spool, StoreOutcome
from tests.fixtures.dicom import stored_spool_files


def _info(sop: str, series: str = "1.2.3.4", at: float = 1.0) -> InstanceInfo:
    return InstanceInfo(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        study_uid="1.2.3", series_uid=series,
                        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="T",
                        received_at=at)


def test_store_is_durable_indexed_and_deduplicated(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.store(_info("1.1"), [b"head", b"body"]) is StoreOutcome.STORED
    assert spool.store(_info("1.1"), [b"other"]) is StoreOutcome.DUPLICATE
    assert spool.store(_info("1.2", at=2.0), [b"second"]) is StoreOutcome.STORED
    pending = spool.pending()
    assert [p.sop_instance_uid for p in pending] == ["1.1", "1.2"]
    assert spool.read(pending[0]) == b"headbody"
    state = spool.series("1.2.3.4")
    assert state is not None and state.instance_count == 2 and state.unpublished == 2
    spool.mark_published([pending[0].id])
    spool.close()
    # reopened: the queue and the totals are still there
    again = Spool(tmp_path)
    assert [p.sop_instance_uid for p in again.pending()] == ["1.2"]
    assert again.instance_count() == 2
    assert len(stored_spool_files(again)) == 2
    again.close()


def test_pending_respects_the_byte_budget(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(5):
        spool.store(_info(f"1.{i}"), [b"x" * 100])
    assert len(spool.pending(limit=10, max_bytes=250)) == 2
    assert len(spool.pending(limit=10, max_bytes=10)) == 1  # always at least one
    spool.close()


def test_recover_removes_unindexed_files_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(_info("1.1"), [b"kept"])
    orphan = spool.root / "ab" / "deadbeef.00000000.dcm"  # a crash before the index commit
    orphan.write_bytes(b"partial")
    assert spool.recover() == 1
    assert not orphan.exists()
    assert spool.read(spool.pending()[0]) == b"kept"
    spool.close()


def test_missing_spool_file_is_taken_out_of_the_queue(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(_info("1.1"), [b"gone"])
    (row,) = spool.pending()
    row.path.unlink()
    spool.mark_failed(row.id, "file vanished")
    assert spool.pending() == [] and spool.pending_count() == 0
    spool.close()


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.quarantine([b"bad", b"bytes"], "no Pixel Data", {"calling_ae": "X"})
    assert path.read_bytes() == b"badbytes"
    reason = json.loads(path.with_suffix(".json").read_text())
    assert reason["reason"] == "no Pixel Data" and reason["calling_ae"] == "X"
    assert reason["size"] == 8
    spool.close()


def _spool_files(spool: Spool) -> set[str]:
    return {p.name for p in stored_spool_files(spool)}


def test_prune_deletes_only_files_published_before_the_cut(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(4):
        spool.store(_info(f"1.{i}", at=float(i)), [f"bytes {i}".encode()])
    rows = spool.pending()
    spool.mark_published([rows[0].id, rows[1].id], when=100.0)
    spool.mark_published([rows[2].id], when=200.0)  # row 3 stays unpublished
    assert spool.prune(published_before=150.0) == 2
    assert _spool_files(spool) == {rows[2].path.name, rows[3].path.name}
    assert spool.prune(published_before=150.0) == 0  # already pruned: nothing more
    # the rows stay: a re-sent instance is still a duplicate, the count still counts it
    assert spool.contains("1.0") and spool.instance_count() == 4
    assert spool.store(_info("1.0"), [b"again"]) is StoreOutcome.DUPLICATE
    assert [p.sop_instance_uid for p in spool.pending()] == ["1.3"]
    # an unpublished file is never pruned, whatever the cut
    assert spool.prune(published_before=1e12) == 1
    assert _spool_files(spool) == {rows[3].path.name}
    spool.close()
    # pruned rows are not taken for orphans or lost files after a restart
    again = Spool(tmp_path)
    assert again.recover() == 0
    assert again.instance_count() == 4 and again.pending_count() == 1
    again.close()


def test_prune_respects_its_limit_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(5):
        spool.store(_info(f"2.{i}", at=float(i)), [b"x" * (i + 1)])
    rows = spool.pending()
    for n, row in enumerate(reversed(rows)):  # the last stored was published first
        spool.mark_published([row.id], when=10.0 + n)
    assert spool.prune(published_before=1e12, limit=2) == 2
    assert _spool_files(spool) == {r.path.name for r in rows[:3]}
    spool.close()


def test_index_written_before_pruning_existed_is_migrated(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(_info("3.1"), [b"old"])
    spool.mark_published([spool.pending()[0].id], when=5.0)
    spool.close()
    db = sqlite3.connect(tmp_path / "spool.sqlite")
    db.execute("DROP INDEX instances_prunable")
    db.execute("ALTER TABLE instances DROP COLUMN pruned_at")
    db.commit()
    db.close()
    again = Spool(tmp_path)
    assert again.prune(published_before=10.0) == 1
    assert again.contains("3.1") and not _spool_files(again)
    again.close()
