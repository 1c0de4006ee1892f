"""A pool's queue policies: pure decisions, the clock passed in, no trio, no I/O.

* ``StartRate``: at most ``rate`` job starts per second (``max_starts_per_second``),
  a token bucket kept as the one time at which the next token is due, so the
  dispatcher sleeps until exactly then instead of polling.
* ``OldestFirst``: which waiting job has waited longest (``on_full="drop_oldest"``),
  a heap by place in the line that forgets the jobs that left it as they surface.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["OldestFirst", "StartRate"]

V = TypeVar("V")

_SLACK = 64  # entries tolerated beyond twice the live ones before the heap is rebuilt


class StartRate:
    """A token bucket of one token, refilled at ``rate`` per second; a job start takes it.

    Kept as the time the next token is due (GCRA's theoretical arrival time), so two
    starts are at least ``1 / rate`` seconds apart (one start per tick) and the waiting
    side knows the exact time to wake. The bucket starts full.
    """

    __slots__ = ("_due", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._due = -math.inf  # no start yet: the token is there

    def ready_at(self) -> float:
        """The time from which the next start is allowed (``-inf``: at once)."""
        return self._due

    def allows(self, now: float) -> bool:
        """Whether a start at ``now`` finds the token."""
        return now >= self._due

    def take(self, now: float) -> None:
        """A job starts at ``now`` (``allows(now)`` was true): the next token is due a tick later."""
        self._due = now + 1 / self.rate


class OldestFirst(Generic[V]):
    """Jobs in the line by ``place`` (lowest first: the one that has waited longest).

    ``in_line(value)`` says whether a value is still in the line; values that left it
    (started, finished) are dropped lazily when they surface, and the heap is rebuilt
    once it holds more than twice the jobs in line, so each operation costs amortised
    O(log n). A value that leaves and comes back (a retry) is pushed again; a duplicate
    entry is harmless (both surface as the same value).
    """

    __slots__ = ("_heap", "_in_line", "_ties")

    def __init__(self, in_line: Callable[[V], bool]) -> None:
        self._heap: list[tuple[int, int, V]] = []
        self._in_line = in_line
        self._ties = itertools.count()  # orders equal places (and spares comparing values)

    def __len__(self) -> int:
        """Entries held, stale ones included."""
        return len(self._heap)

    def push(self, place: int, value: V, live: int) -> None:
        """``value`` entered the line at ``place``; ``live`` is how many values are in the line now."""
        heapq.heappush(self._heap, (place, next(self._ties), value))
        if len(self._heap) > 2 * live + _SLACK:
            seen: set[int] = set()
            kept = []
            for entry in self._heap:
                value_id = id(entry[2])
                if value_id not in seen and self._in_line(entry[2]):
                    seen.add(value_id)
                    kept.append(entry)
            heapq.heapify(kept)
            self._heap = kept

    def oldest(self) -> V | None:
        """The value in the line with the lowest place (None when the line is empty)."""
        heap = self._heap
        while heap and not self._in_line(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][2] if heap else None
