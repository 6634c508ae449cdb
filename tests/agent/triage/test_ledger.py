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
