"""The commit point never passes unfinished work."""

from __future__ import annotations

from agent.bus.offsets import OffsetTracker

TP = ("dicom.instances", 0)


def test_commit_point_stops_at_lowest_unfinished_offset() -> None:
    t = OffsetTracker()
    for off in range(6):  # series A at 0,2,4 and B at 1,3,5
        t.read(TP, off)
    assert t.committable() == {TP: 0}
    t.done(TP, [1, 3, 5])  # B finished first
    assert t.committable() == {TP: 0}
    t.mark_committed({TP: 0})
    assert t.committable() == {}
    t.done(TP, [0, 2, 4])
    assert t.committable() == {TP: 6}
    assert t.in_flight_count() == 0


def test_not_in_flight_messages_advance_and_forget_on_revoke() -> None:
    t = OffsetTracker()
    t.read(TP, 0, in_flight=False)
    t.read(TP, 1)
    assert t.committable() == {TP: 1}
    t.mark_committed({TP: 1})
    t.forget(TP)
    assert t.committable() == {}
    assert t.in_flight_count() == 0
