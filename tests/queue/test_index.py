"""DueIndex: the local spool's due times (queue/index.py)."""

from __future__ import annotations

import pytest

from smtpsvc.queue import index
from smtpsvc.queue.index import DueIndex


def test_due_messages_come_out_earliest_first_and_leave_the_index() -> None:
    due = DueIndex()
    for queue_id, when in [("c", 30.0), ("a", 10.0), ("b", 20.0), ("later", 99.0)]:
        due.set(queue_id, when)
    assert due.pop_due(now=50.0, limit=10) == ["a", "b", "c"]
    assert "a" not in due and len(due) == 1 and due.next_due() == 99.0


def test_the_limit_is_respected_and_the_rest_stays_due() -> None:
    due = DueIndex()
    for n in range(5):
        due.set(f"m{n}", float(n))
    assert due.pop_due(now=10.0, limit=2) == ["m0", "m1"]
    assert due.pop_due(now=10.0, limit=10) == ["m2", "m3", "m4"]


def test_a_reindexed_message_is_due_at_its_new_time_only() -> None:
    due = DueIndex()
    due.set("m", 10.0)
    due.set("m", 100.0)
    assert due.pop_due(now=50.0, limit=10) == []
    assert due.next_due() == 100.0
    assert due.pop_due(now=100.0, limit=10) == ["m"]


def test_a_discarded_message_is_never_due() -> None:
    due = DueIndex()
    due.set("m", 10.0)
    due.discard("m")
    assert due.pop_due(now=50.0, limit=10) == [] and due.next_due() is None


def test_stale_heap_entries_are_compacted_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index, "COMPACT_SLACK", 10)
    due = DueIndex()
    for step in range(1000):
        due.set("m", float(step))  # the same message rescheduled again and again
    assert len(due._heap) <= 2 * len(due) + 10
    assert due.pop_due(now=1e9, limit=10) == ["m"]
