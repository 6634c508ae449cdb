"""The dashboard store on real databases (SQLite file and PostgreSQL): idempotence and
revisions as the worker issues them (and the fallback for equal revisions), the worklist's
order, filters (the study date, else the arrival day) and search, the name and study date on
the rows, the upgrade of a store made by an earlier dashboard, evidence, dead letters,
acknowledgements with their audit and undo, sessions."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from agent.dashboard.store import (
    CONTENT_EXCLUDED,
    STUDY_DATE_INDEX,
    DeadLetterItem,
    EvidenceItem,
    PruneStats,
    ResultItem,
    Store,
    WorklistFilter,
    audit,
    content_digest,
    decode_thumbnail,
    local_midnight_utc,
    results,
    revisions,
)
from agent.dashboard.synthetic import make_evidence, make_result
from schemas.errors import InputError
from schemas.messages import DeadLetter, TriageResult, TriageResultV1, dump_json, parse_result
from tests.fixtures.databases import fresh_database

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with fresh_database(request.param, tmp_path) as url:
        s = Store(url)
        s.create()
        yield s
        s.close()


def evidence_item(result):  # type: ignore[no-untyped-def]
    ev = make_evidence(result, seed=1)
    return EvidenceItem(ev, tuple(decode_thumbnail(s.png_b64) for s in ev.slices))


def test_redelivery_changes_nothing_and_a_higher_revision_replaces(store: Store) -> None:
    r1 = make_result(1, flag="type1", ready=T0)
    stats = store.apply([ResultItem(r1)])
    assert (stats.new, stats.replaced) == (1, 0)
    assert store.apply([ResultItem(r1)]).unchanged == 1  # the same message again

    r2 = make_result(1, flag="type2", revision=2, ready=T0 + timedelta(minutes=5))
    assert store.apply([ResultItem(r2)]).replaced == 1
    row = store.row(r1.result_id)
    assert row is not None and (row.revision, row.flag) == (2, "type2")

    # a late, lower revision goes into the history only
    assert store.apply([ResultItem(r1)]).replaced == 0
    detail = store.detail(r1.result_id)
    assert detail is not None and detail.row.flag == "type2"
    assert [(v.revision, v.current) for v in detail.revisions] == [(2, True), (1, False)]
    assert store.worklist(WorklistFilter()).total == 1


def redo(result: TriageResult, **changes: object) -> TriageResult:
    """``result`` as the worker's redo of it sends it again: the same revision, content, time
    and SR UID; what is not content may differ (arrival times, generation, destinations)."""
    t = result.timings
    assert t.first_instance_received is not None
    timings = t.model_copy(update={
        "first_instance_received": t.first_instance_received + timedelta(seconds=3)})
    return result.model_copy(update={"timings": timings, "generation": result.generation + 1,
                                     "sr_destinations": ["OTHER@10.9.9.9:104"], **changes})


def test_revisions_as_the_worker_issues_them(store: Store) -> None:
    """Labs that arrive later: revision 2 with a new SR naming revision 1's; a redo repeats
    revision 2 with the same content (and perhaps other destinations): nothing changes."""
    ct_only = make_result(2, flag="type1", labs=False, ready=T0)
    with_labs = make_result(2, flag="type1", labs=True, revision=2,
                            ready=T0 + timedelta(minutes=10))
    assert with_labs.lab_values and not ct_only.lab_values
    assert with_labs.supersedes_sr_sop_instance_uid == ct_only.sr_sop_instance_uid
    assert store.apply([ResultItem(ct_only)]).new == 1
    assert store.apply([ResultItem(with_labs)]).replaced == 1
    stats = store.apply([ResultItem(redo(with_labs)), ResultItem(with_labs),
                         ResultItem(redo(ct_only))])
    assert (stats.unchanged, stats.history, stats.replaced, stats.changed) == (3, 0, 0, False)

    row = store.row(ct_only.result_id)
    assert row is not None and (row.revision, row.availability) == (2, "both")
    detail = store.detail(ct_only.result_id)
    assert detail is not None
    assert detail.result.lab_values == with_labs.lab_values
    assert detail.result.sr_destinations == with_labs.sr_destinations  # the first copy kept
    assert [(v.revision, v.current, v.sr_sop_instance_uid, v.supersedes_sr_sop_instance_uid)
            for v in detail.revisions] == [
        (2, True, with_labs.sr_sop_instance_uid, ct_only.sr_sop_instance_uid),
        (1, False, ct_only.sr_sop_instance_uid, None)]


def test_content_digest_leaves_out_what_the_worker_leaves_out() -> None:
    from agent.triage.worker import CONTENT_EXCLUDED as WORKER_EXCLUDED
    from agent.triage.worker import content_digest as worker_digest

    assert CONTENT_EXCLUDED == WORKER_EXCLUDED
    r = make_result(4, labs=True)
    assert content_digest(r) == worker_digest(r) == content_digest(redo(r))
    assert content_digest(r) != content_digest(r.model_copy(update={"lab_values": []}))


def test_same_revision_with_other_content_falls_back_to_the_later(store: Store) -> None:
    """The fallback: the same revision with other content (a worker with another ledger after
    a partition moved; version-1 agents re-issued a result under the same identity when the
    labs arrived): the later ``result_ready`` wins, the other goes into the history."""
    ct_only = make_result(3, flag="type1", labs=False, ready=T0)
    with_labs = make_result(3, flag="type1", labs=True, ready=T0 + timedelta(minutes=1))
    store.apply([ResultItem(with_labs)])
    assert store.apply([ResultItem(ct_only)]).history == 1  # older content arriving late
    row = store.row(ct_only.result_id)
    assert row is not None and row.availability == "both" and row.p_labs is not None

    later = make_result(3, flag="type2", labs=True, ready=T0 + timedelta(minutes=2))
    assert store.apply([ResultItem(later)]).replaced == 1
    row = store.row(ct_only.result_id)
    assert row is not None and row.flag == "type2"
    detail = store.detail(ct_only.result_id)
    assert detail is not None and [v.current for v in detail.revisions] == [True, False, False]


def test_version_1_results_are_stored_upgraded(store: Store) -> None:
    v1 = TriageResultV1(status="triaged", study_uid="1.2.3", series_uid="1.2.3.4",
                        patient_id="P-V1", flag="control", threshold="general",
                        timings={"result_ready": T0})
    result = parse_result(dump_json(v1))
    store.apply([ResultItem(result)])
    page = store.worklist(WorklistFilter(search="p-v1"))
    assert [r.patient_id for r in page.rows] == ["P-V1"]
    assert page.rows[0].involvement is None and page.rows[0].turnaround_s is None


def test_worklist_order_filters_search_and_pages(store: Store) -> None:
    items = [ResultItem(make_result(n, ready=T0 + timedelta(hours=n))) for n in range(40)]
    first = items[0].result
    assert first.patient_name and first.study_date
    items.append(ResultItem(make_result(99, status="skipped", ready=T0 + timedelta(hours=99))))
    items.append(ResultItem(make_result(98, flag="control", patient_id="odd_100%",
                                        ready=T0)))
    store.apply(items)
    page = store.worklist(WorklistFilter(), page=1, page_size=500)
    urgency = {"type2": 0, "type1": 1, "control": 2, None: 3}
    keys = [(urgency[r.flag], -r.result_ready.timestamp()) for r in page.rows]
    assert keys == sorted(keys) and page.rows[-1].status == "skipped"

    type2 = store.worklist(WorklistFilter(flag="type2"), page_size=500)
    assert type2.total > 0 and {r.flag for r in type2.rows} == {"type2"}
    assert store.worklist(WorklistFilter(flag="skipped")).total == 1
    for avail in ("both", "ct"):
        rows = store.worklist(WorklistFilter(availability=avail), page_size=500).rows
        assert rows and {r.availability for r in rows} == {avail}

    # search: a substring of the patient ID or the accession, case-insensitive, and LIKE's
    # wildcards are literal
    assert [r.patient_id for r in store.worklist(WorklistFilter(search="syn-000007")).rows] \
        == ["SYN-000007"]
    assert store.worklist(WorklistFilter(search="ACC0000012")).total == 1
    assert [r.patient_id for r in store.worklist(WorklistFilter(search="_100%")).rows] \
        == ["odd_100%"]
    assert store.worklist(WorklistFilter(search="%")).total == 1

    # the rows carry the name and the study date
    row = store.row(first.result_id)
    assert row is not None and row.patient_name == first.patient_name
    assert row.study_date is not None and row.study_date.strftime("%Y%m%d") == first.study_date

    p1 = store.worklist(WorklistFilter(), page=1, page_size=10)
    p2 = store.worklist(WorklistFilter(), page=2, page_size=10)
    assert p1.total == 42 and p1.pages == 5
    assert not {r.result_id for r in p1.rows} & {r.result_id for r in p2.rows}
    assert store.worklist(WorklistFilter(), page=99, page_size=10).page == 5
    assert len(list(store.export(WorklistFilter(), batch=7))) == 42


def test_date_filter_on_the_study_date_else_the_arrival_day(store: Store) -> None:
    """Study dates decide where results carry them, whatever the day the series arrived;
    results without one (older agents) are filtered on the local day they arrived."""
    day = date(2026, 12, 2)
    arrived = local_midnight_utc(day).replace(tzinfo=UTC) + timedelta(hours=12)
    inside = make_result(1, study_date="20261202", ready=arrived + timedelta(days=5))
    sent_late = make_result(2, study_date="20261202", ready=arrived + timedelta(days=30))
    other_day = make_result(3, study_date="20261130", ready=arrived)  # arrived that day
    undated = make_result(4, ready=arrived).model_copy(update={"study_date": None})
    undated_before = make_result(5, ready=arrived - timedelta(days=1)).model_copy(
        update={"study_date": None})
    not_a_date = make_result(6, ready=arrived).model_copy(update={"study_date": "2026120"})
    store.apply([ResultItem(r) for r in (inside, sent_late, other_day, undated, undated_before,
                                         not_a_date)])

    def ids(**bounds: date) -> set[str]:
        page = store.worklist(WorklistFilter(**bounds), page_size=500)  # type: ignore[arg-type]
        return {str(r.patient_id) for r in page.rows}

    assert ids(date_from=day, date_to=day) == {"SYN-000001", "SYN-000002", "SYN-000004",
                                               "SYN-000006"}
    assert ids(date_from=day) == ids(date_from=day, date_to=day)
    assert ids(date_to=day - timedelta(days=1)) == {"SYN-000003", "SYN-000005"}
    assert ids(date_from=date(2026, 11, 30), date_to=date(2026, 11, 30)) == {"SYN-000003"}
    row = store.row(not_a_date.result_id)
    assert row is not None and row.study_date is None


def test_acknowledge_audit_undo_and_new_revisions(store: Store) -> None:
    r = make_result(5, flag="type2", ready=T0)
    store.apply([ResultItem(r)])
    now = datetime(2026, 12, 1, 9, 0)
    assert store.acknowledge(r.result_id, "alice", 1, now=now).ok
    second = store.acknowledge(r.result_id, "bob", 1, now=now)
    assert not second.ok and "alice" in second.message
    assert store.worklist(WorklistFilter(acknowledged=True)).total == 1
    assert store.worklist(WorklistFilter(acknowledged=False)).total == 0

    assert not store.undo(r.result_id, "bob", now=now + timedelta(seconds=5)).ok
    late = store.undo(r.result_id, "alice", now=now + timedelta(seconds=61))
    assert not late.ok and "cannot be undone" in late.message
    assert store.undo(r.result_id, "alice", now=now + timedelta(seconds=30)).ok
    assert store.worklist(WorklistFilter(acknowledged=False)).total == 1

    assert store.acknowledge(r.result_id, "alice", 1, now=now + timedelta(seconds=40)).ok
    # an acknowledgement of revision 1 does not cover revision 2
    store.apply([ResultItem(make_result(5, flag="type2", revision=2, ready=T0))])
    row = store.row(r.result_id)
    assert row is not None and not row.acked and row.ack_user == "alice"
    stale = store.acknowledge(r.result_id, "alice", 1)
    assert not stale.ok and "newer revision" in stale.message
    assert store.acknowledge(r.result_id, "alice", 2).ok

    detail = store.detail(r.result_id)
    assert detail is not None
    assert [(a.action, a.revision) for a in detail.audit] == [
        ("acknowledge", 2), ("acknowledge", 1), ("undo", 1), ("acknowledge", 1)]


def test_evidence_keeps_the_newest_set(store: Store) -> None:
    r1 = make_result(7, ready=T0)
    r2 = make_result(7, revision=2, ready=T0)
    store.apply([ResultItem(r2), evidence_item(r2)])
    assert store.apply([evidence_item(r1)]).evidence == 0  # older set: ignored
    assert store.apply([evidence_item(r2)]).evidence == 0  # redelivered: ignored
    detail = store.detail(r1.result_id)
    assert detail is not None and detail.evidence is not None
    assert detail.evidence.revision == 2 and len(detail.evidence.slices) == 10
    png = store.thumbnail(r1.result_id, 2, detail.evidence.slices[0].position)
    assert png is not None and png.startswith(b"\x89PNG")
    assert store.thumbnail(r1.result_id, 1, 0) is None


def test_thumbnails_must_be_png() -> None:
    with pytest.raises(InputError, match="not a PNG"):
        decode_thumbnail(base64.b64encode(b"GIF89a....").decode())
    with pytest.raises(InputError, match="base64"):
        decode_thumbnail("not base64!")


def test_dead_letters_once_per_offset(store: Store) -> None:
    entry = DeadLetter(reason="instance is not readable DICOM", error_type="InvalidDicomError",
                       source_topic="dicom.instances", source_partition=0, source_offset=4,
                       value_b64=base64.b64encode(b"x" * 10).decode(), series_uid="1.2.3",
                       failed_at=T0)
    assert store.apply([DeadLetterItem(entry, 0, 8), DeadLetterItem(entry, 0, 8)]) \
        .dead_letters == 1
    store.apply([DeadLetterItem(entry, 0, 9)])
    rows, total = store.dead_letters()
    assert total == 2 and rows[0].value_size == 10 and rows[0].reason == entry.reason


def test_sessions_expire_and_end(store: Store) -> None:
    now = datetime(2026, 12, 1, 9, 0)
    token, csrf = store.create_session("alice", "reader", timedelta(hours=1), now=now)
    session = store.session(token, timedelta(minutes=30), now=now + timedelta(minutes=10))
    assert session is not None and session.user_name == "alice" and session.csrf == csrf
    # last seen at +10 min: at +45 it has been idle 35 min, more than the 30 allowed
    assert store.session(token, timedelta(minutes=30), now=now + timedelta(minutes=45)) is None
    token, _ = store.create_session("alice", "reader", timedelta(hours=1), now=now)
    assert store.session(token, timedelta(hours=5), now=now + timedelta(hours=2)) is None
    token, _ = store.create_session("alice", "reader", timedelta(hours=1), now=now)
    store.end_session(token)
    assert store.session(token, timedelta(hours=5), now=now) is None
    assert store.session("made-up", timedelta(hours=5), now=now) is None


def test_secret_is_made_once_and_kept(store: Store) -> None:
    first = store.secret()
    again = Store(store.url.render_as_string(hide_password=False))
    try:
        assert again.secret() == first and len(first) == 64
    finally:
        again.close()


def test_counts(store: Store) -> None:
    store.apply([ResultItem(make_result(n, flag=f)) for n, f in
                 enumerate(["type2", "type2", "type1", "control"])])
    store.apply([ResultItem(make_result(9, status="skipped"))])
    counts = store.counts()
    assert {k: counts[k] for k in ("type2", "type1", "control", "skipped",
                                   "unacknowledged")} == {
        "type2": 2, "type1": 1, "control": 1, "skipped": 1, "unacknowledged": 4}


def test_upgrade_of_a_store_from_an_earlier_dashboard(store: Store) -> None:
    """A store made before the study date column and content digests: ``create`` adds the
    column and its index, fills the name and the study date from the stored results, and
    recomputes the digests, so a redelivery of an old message still changes nothing and the
    history holds each revision once."""
    r1 = make_result(6, labs=False, ready=T0)
    r2 = make_result(6, labs=True, revision=2, ready=T0 + timedelta(minutes=5))
    other = make_result(7, ready=T0)
    store.apply([ResultItem(r1), ResultItem(r2), ResultItem(other)])
    twice = redo(r2)  # an earlier dashboard kept a redo with other destinations as its own row
    with store._write.begin() as conn:
        conn.execute(revisions.insert().values(
            result_id=r2.result_id, revision=2, digest="0" * 64, status="triaged",
            flag=r2.flag, result_ready=datetime(2026, 12, 1, 8, 5), stored_at=datetime.now(),
            doc=dump_json(twice).decode()))
        for rid, rev, digest, doc in conn.execute(select(
                revisions.c.result_id, revisions.c.revision, revisions.c.digest,
                revisions.c.doc)).all():
            old = hashlib.sha256(doc.encode()).hexdigest()  # the digest of the whole message
            conn.execute(update(revisions).where(
                revisions.c.result_id == rid, revisions.c.revision == rev,
                revisions.c.digest == digest).values(digest=old))
            if digest == content_digest(TriageResult.model_validate_json(doc)):
                conn.execute(update(results).where(results.c.result_id == rid,
                                                   results.c.revision == rev)
                             .values(digest=old, patient_name=None))
        conn.execute(text(f"DROP INDEX {STUDY_DATE_INDEX.name}"))
        conn.execute(text(f"ALTER TABLE {results.name} DROP COLUMN study_date"))

    store.create()
    row = store.row(r1.result_id)
    assert row is not None and row.revision == 2 and row.patient_name == r2.patient_name
    assert row.study_date is not None and row.study_date.strftime("%Y%m%d") == r2.study_date
    assert store.worklist(WorklistFilter(date_from=row.study_date,
                                         date_to=row.study_date)).total >= 1
    stats = store.apply([ResultItem(r2), ResultItem(r1), ResultItem(twice)])
    assert (stats.unchanged, stats.history, stats.changed) == (3, 0, False)
    detail = store.detail(r1.result_id)
    assert detail is not None and [(v.revision, v.current) for v in detail.revisions] == [
        (2, True), (1, False)]
    store.create()  # once upgraded, nothing more to do


def test_date_bounds_are_local_days() -> None:
    """Local days become UTC bounds for the results without a study date; the store compares
    UTC: a sanity check of the conversion the filter relies on."""
    start = local_midnight_utc(date(2026, 12, 2))
    local = start.replace(tzinfo=UTC).astimezone()
    assert (local.year, local.month, local.day, local.hour, local.minute) == (2026, 12, 2, 0, 0)


def test_retention_deletes_old_results_and_dead_letters_and_keeps_the_audit(
        store: Store) -> None:
    old, new = make_result(30, ready=T0), make_result(31, ready=T0 + timedelta(days=10))
    store.apply([ResultItem(old), evidence_item(old), ResultItem(new), evidence_item(new)])
    assert store.acknowledge(old.result_id, "alice", 1, now=datetime(2026, 12, 1, 9, 0)).ok
    letter = DeadLetter(reason="instance is not readable DICOM", error_type="InvalidDicomError",
                        source_topic="dicom.instances", source_partition=0, source_offset=4,
                        value_b64="", series_uid="1.2.3", failed_at=T0)
    store.apply([DeadLetterItem(letter, 0, 1), DeadLetterItem(
        letter.model_copy(update={"failed_at": T0 + timedelta(days=10)}), 0, 2)])

    stats = store.prune(T0 + timedelta(days=5), batch=1)
    assert (stats.results, stats.dead_letters) == (1, 1)
    assert store.row(old.result_id) is None and store.detail(old.result_id) is None
    assert store.thumbnail(old.result_id, 1, 0) is None
    assert store.row(new.result_id) is not None and store.thumbnail(new.result_id, 1, 0)
    rows, total = store.dead_letters()
    assert total == 1 and rows[0].dlq_offset == 2
    assert store.prune(T0 + timedelta(days=5)) == PruneStats(0, 0)
    with store._read.begin() as conn:  # the audit of the deleted result stays
        assert conn.execute(select(audit.c.user_name).where(
            audit.c.result_id == old.result_id)).scalars().all() == ["alice"]
