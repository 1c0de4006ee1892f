"""The pool's waiting line: highest priority first, FIFO within a priority, O(log n).

A binary heap of ``(-priority, sequence)`` entries; cancelling a waiting job
marks its entry dead (O(1)) and the heap drops dead entries as they surface,
compacting itself when they outnumber the live ones. Pure: no trio, no I/O.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["JobQueue"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_COMPACT_AT = 1024  # dead entries tolerated before a rebuild is considered


class _Entry(Generic[K, V]):
    __slots__ = ("alive", "key", "value")

    def __init__(self, key: K, value: V) -> None:
        self.key = key
        self.value = value
        self.alive = True


# Heap items are (-priority, sequence, entry): tuples compare in C, and the unique
# sequence decides before the entry is ever compared.
_Item = tuple[int, int, _Entry[Any, Any]]


class JobQueue(Generic[K, V]):
    """Waiting jobs by key; ``pop`` gives the highest priority, oldest first."""

    def __init__(self) -> None:
        self._heap: list[_Item] = []
        self._live: dict[K, _Entry[K, V]] = {}
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def push(self, key: K, priority: int, value: V) -> None:
        """Queue ``value`` at the back of its priority class. ``key`` must not be queued already."""
        if key in self._live:
            raise KeyError(f"{key!r} is queued already")
        entry = _Entry(key, value)
        self._live[key] = entry
        heapq.heappush(self._heap, (-priority, next(self._sequence), entry))

    def peek(self) -> tuple[K, V] | None:
        """The next job without taking it (None if the queue is empty)."""
        heap = self._heap
        while heap and not heap[0][2].alive:
            heapq.heappop(heap)
        if not heap:
            return None
        entry = heap[0][2]
        return entry.key, entry.value

    def pop(self) -> tuple[K, V]:
        """Take the next job. Raises IndexError when empty."""
        if self.peek() is None:
            raise IndexError("pop from an empty JobQueue")
        entry = heapq.heappop(self._heap)[2]
        del self._live[entry.key]
        return entry.key, entry.value

    def remove(self, key: K) -> V | None:
        """Take ``key`` out of the line (a cancelled job); its value, or None if not queued."""
        entry = self._live.pop(key, None)
        if entry is None:
            return None
        entry.alive = False
        dead = len(self._heap) - len(self._live)
        if dead > _COMPACT_AT and dead > len(self._live):
            self._heap = [item for item in self._heap if item[2].alive]
            heapq.heapify(self._heap)
        return entry.value

    def __iter__(self) -> Iterator[tuple[K, V]]:
        """Waiting jobs in the order they would be popped (O(n log n); for listings)."""
        for _, _, entry in sorted(item for item in self._heap if item[2].alive):
            yield entry.key, entry.value
