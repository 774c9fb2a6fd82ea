"""The local spool's index of due times: which queued messages are due when, in little memory.

A dict id -> due time and a heap of (due, id) with lazy deletion: re-indexing a message pushes a new heap
entry and leaves the old one to be skipped when it surfaces. A queue whose messages are rescheduled over and
over would let stale entries pile up, so the heap is rebuilt from the dict when they outnumber the live
ones. About 200 bytes per queued message, whatever the size of its envelope: the envelopes themselves stay
on disk (docs/architecture.md, "Memory").
"""

from __future__ import annotations

import heapq

COMPACT_SLACK = 10_000  # stale heap entries tolerated beyond the live ones before a rebuild


class DueIndex:
    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._due

    def get(self, queue_id: str) -> float | None:
        return self._due.get(queue_id)

    def set(self, queue_id: str, due: float) -> None:
        """Index (or re-index) `queue_id` as due at `due` (epoch seconds)."""
        if self._due.get(queue_id) == due:
            return
        self._due[queue_id] = due
        heapq.heappush(self._heap, (due, queue_id))
        if len(self._heap) > 2 * len(self._due) + COMPACT_SLACK:
            self._compact()

    def discard(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)

    def pop_due(self, now: float, limit: int) -> list[str]:
        """Up to `limit` ids due at `now`, earliest first; they leave the index."""
        out: list[str] = []
        heap, live = self._heap, self._due
        while heap and len(out) < limit and heap[0][0] <= now:
            due, queue_id = heapq.heappop(heap)
            if live.get(queue_id) != due:
                continue  # stale: re-indexed or removed since
            del live[queue_id]
            out.append(queue_id)
        return out

    def next_due(self) -> float | None:
        """The earliest due time, or None when nothing is indexed."""
        heap, live = self._heap, self._due
        while heap:
            due, queue_id = heap[0]
            if live.get(queue_id) == due:
                return due
            heapq.heappop(heap)
        return None

    def ids(self) -> list[str]:
        return list(self._due)

    def _compact(self) -> None:
        self._heap = [(due, queue_id) for queue_id, due in self._due.items()]
        heapq.heapify(self._heap)
