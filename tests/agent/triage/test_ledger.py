"""The result ledger: a redo reuses its revision, changed content is a new revision that names
the SR it replaces, and what was recorded survives a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.triage.ledger import ResultLedger

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_same_digest_is_a_redo_and_other_content_a_new_revision(tmp_path: Path) -> None:
    ledger = ResultLedger(tmp_path / "results.sqlite")
    first = ledger.revise("r1", "aaa", T0, "1.2.3", "1.2.3.1")
    assert (first.revision, first.redo, first.previous) == (1, False, None)
    again = ledger.revise("r1", "aaa", T0 + timedelta(minutes=5), "1.2.3", "1.2.3.1")
    assert (again.revision, again.redo, again.ready_at) == (1, True, T0)
    second = ledger.revise("r1", "bbb", T0 + timedelta(hours=1), "1.2.3", "1.2.3.2")
    assert (second.revision, second.redo) == (2, False)
    assert second.previous == ("1.2.3", "1.2.3.1")
    assert second.ready_at == T0 + timedelta(hours=1)
    other = ledger.revise("r2", "aaa", T0, None, None)
    assert (other.revision, other.previous) == (1, None)
    ledger.close()


def test_revisions_survive_a_restart_and_skip_results_without_an_sr(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    ledger = ResultLedger(path)
    ledger.revise("r1", "aaa", T0, "1.2.3", "1.2.3.1")
    ledger.revise("r1", "bbb", T0, None, None)  # e.g. a skipped revision, no SR
    ledger.close()
    reopened = ResultLedger(path)
    redo = reopened.revise("r1", "bbb", T0 + timedelta(days=1), None, None)
    assert (redo.revision, redo.redo, redo.ready_at) == (2, True, T0)
    assert redo.previous == ("1.2.3", "1.2.3.1")
    third = reopened.revise("r1", "ccc", T0, "1.2.3", "1.2.3.3")
    assert third.revision == 3 and third.previous == ("1.2.3", "1.2.3.1")
    reopened.close()


def test_a_published_revision_is_not_sent_again_and_old_ledgers_are_upgraded(
        tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "results.sqlite"
    old = sqlite3.connect(path)  # a ledger written before the published column existed
    old.execute("CREATE TABLE result_revision (result_id TEXT NOT NULL, revision INTEGER NOT "
                "NULL, digest TEXT NOT NULL, ready_at TEXT NOT NULL, sr_series_uid TEXT, "
                "sr_instance_uid TEXT, PRIMARY KEY (result_id, revision))")
    old.execute("INSERT INTO result_revision VALUES ('r1', 1, 'aaa', ?, NULL, NULL)",
                (T0.isoformat(),))
    old.commit()
    old.close()
    ledger = ResultLedger(path)
    first = ledger.revise("r1", "aaa", T0, None, None)
    assert first.redo and not first.published
    ledger.mark_published("r1", 1)
    again = ledger.revise("r1", "aaa", T0, None, None)
    assert again.redo and again.published
    changed = ledger.revise("r1", "bbb", T0, None, None)
    assert changed.revision == 2 and not changed.redo and not changed.published
    ledger.close()


def test_a_worker_marks_results_a_crash_left_flushed_but_unmarked(tmp_path: Path) -> None:
    """A worker killed between the producer's flush and the ledger's mark: the next worker
    finds the result on ``triage.results`` at start and marks it, so its redo sends nothing."""
    import json

    from agent.bus.embedded import EmbeddedBus
    from agent.config import Settings
    from agent.triage.worker import TriageModels, TriageWorker
    from schemas import topics

    settings = Settings(data_dir=tmp_path / "data")
    ledger = ResultLedger(tmp_path / "results.sqlite")
    assert not ledger.revise("r1", "aaa", T0, None, None).published
    bus = EmbeddedBus(tmp_path / "bus")
    bus.ensure_topics(topics.ALL_TOPICS)
    producer = bus.producer()
    producer.send(topics.TRIAGE_RESULTS, b"study", json.dumps(
        {"result_id": "r1", "revision": 1, "series_uid": "1.2.3"}).encode())
    producer.send(topics.TRIAGE_RESULTS, b"study", b"not a result")  # skipped, not fatal
    producer.flush()
    worker = TriageWorker(settings, bus, pacs=None, lis=None, models=TriageModels.load("cpu"),
                          ledger=ledger)
    try:
        worker.open()
        assert ledger.revise("r1", "aaa", T0, None, None).published
    finally:
        worker.close()
        bus.close()
