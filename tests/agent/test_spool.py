"""The spool: durable store, duplicate handling, queue order, orphan recovery, quarantine."""

from __future__ import annotations

import json
from pathlib import Path

from agent.spool import InstanceInfo, Spool, StoreOutcome


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
    assert len(list(again.root.glob("*/*.dcm"))) == 2
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
