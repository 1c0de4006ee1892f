"""The pool's waiting line: highest priority first, FIFO within a priority, flat cost.

Priorities are small integers, so the line is a FIFO deque per priority plus a
heap of the priorities in use: a push appends to its deque (O(1); O(log p) when
its priority is new), a pop takes from the front of the highest deque (O(1)),
whatever the number of jobs waiting. Cancelling a waiting job marks it dead
(O(1)), and a coalesced job takes over its entry (O(1)); dead entries are
dropped as they reach the front, and the line is compacted when they outnumber
the live ones. Each entry also carries its turn, drawn from a counter that several
queues may share, so the fronts of different queues (a pool's lanes) can be compared:
``(-priority, turn)`` is a job's rank, lowest first. Pure: no trio, no I/O.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["JobQueue", "Rank"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_COMPACT_AT = 1024  # dead entries tolerated before a rebuild is considered

Rank = tuple[int, int]  # (-priority, turn): the lower starts first


class _Entry(Generic[K, V]):
    __slots__ = ("alive", "key", "turn", "value")

    def __init__(self, key: K, value: V, turn: int) -> None:
        self.key = key
        self.value = value
        self.turn = turn
        self.alive = True


class JobQueue(Generic[K, V]):
    """Waiting jobs by key; ``pop`` gives the highest priority, oldest first. ``turns`` numbers
    the pushes (share one counter between queues whose fronts are compared)."""

    def __init__(self, turns: Iterator[int] | None = None) -> None:
        self._turns = turns if turns is not None else itertools.count()
        self._buckets: dict[int, deque[_Entry[K, V]]] = {}
        self._priorities: list[int] = []  # a heap of -priority, one per bucket
        self._live: dict[K, _Entry[K, V]] = {}
        self._dead = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def push(self, key: K, priority: int, value: V) -> None:
        """Queue ``value`` at the back of its priority class. ``key`` must not be queued already."""
        if key in self._live:
            raise KeyError(f"{key!r} is queued already")
        entry = _Entry(key, value, next(self._turns))
        self._live[key] = entry
        bucket = self._buckets.get(priority)
        if bucket is None:
            bucket = self._buckets[priority] = deque()
            heapq.heappush(self._priorities, -priority)
        bucket.append(entry)

    def _front(self) -> deque[_Entry[K, V]] | None:
        """The highest non-empty bucket, its dead front entries dropped (None when empty)."""
        while self._priorities:
            priority = -self._priorities[0]
            bucket = self._buckets[priority]
            while bucket and not bucket[0].alive:
                bucket.popleft()
                self._dead -= 1
            if bucket:
                return bucket
            heapq.heappop(self._priorities)
            del self._buckets[priority]
        return None

    def peek(self) -> tuple[K, V] | None:
        """The next job without taking it (None if the queue is empty)."""
        bucket = self._front()
        if bucket is None:
            return None
        return bucket[0].key, bucket[0].value

    def front_rank(self) -> Rank | None:
        """The rank of the next job (None if the queue is empty)."""
        bucket = self._front()
        if bucket is None:
            return None
        return self._priorities[0], bucket[0].turn

    def pop(self) -> tuple[K, V]:
        """Take the next job. Raises IndexError when empty."""
        bucket = self._front()
        if bucket is None:
            raise IndexError("pop from an empty JobQueue")
        entry = bucket.popleft()
        del self._live[entry.key]
        return entry.key, entry.value

    def pop_ranked(self) -> tuple[K, V, Rank]:
        """Take the next job, with the rank it had. Raises IndexError when empty."""
        bucket = self._front()
        if bucket is None:
            raise IndexError("pop from an empty JobQueue")
        entry = bucket.popleft()
        del self._live[entry.key]
        return entry.key, entry.value, (self._priorities[0], entry.turn)

    def remove(self, key: K) -> V | None:
        """Take ``key`` out of the line (a cancelled job); its value, or None if not queued."""
        entry = self._live.pop(key, None)
        if entry is None:
            return None
        entry.alive = False
        self._dead += 1
        if self._dead > _COMPACT_AT and self._dead > len(self._live):
            for priority, bucket in self._buckets.items():
                self._buckets[priority] = deque(e for e in bucket if e.alive)
            self._dead = 0
        return entry.value

    def replace(self, key: K, new_key: K, value: V) -> None:
        """Put ``new_key`` and ``value`` in the place of the queued ``key`` (a coalesced job),
        in O(1). Raises KeyError if ``key`` is not queued or ``new_key`` is."""
        if new_key in self._live:
            raise KeyError(f"{new_key!r} is queued already")
        entry = self._live.pop(key)
        entry.key = new_key
        entry.value = value
        self._live[new_key] = entry

    def __iter__(self) -> Iterator[tuple[K, V]]:
        """Waiting jobs in the order they would be popped (for listings)."""
        for _, key, value in self.ranked():
            yield key, value

    def ranked(self) -> Iterator[tuple[Rank, K, V]]:
        """Waiting jobs with their ranks, in the order they would be popped (for listings)."""
        for priority in sorted(self._buckets, reverse=True):
            for entry in self._buckets[priority]:
                if entry.alive:
                    yield (-priority, entry.turn), entry.key, entry.value
