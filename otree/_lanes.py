"""A pool's waiting line with lanes: what may start next when jobs are grouped by lane.

A lane (``submit(..., lane="agent-7")``) is one agent's, one destination's or one
cadence's jobs. It is held by its own state only: ``lane_concurrency`` of its jobs
running, its own circuit breaker open (or its half-open trial running), or, under
``lane_order="fifo"``, a retried job pinned at its head while it waits out its backoff.
A held lane holds its own jobs and no others.

Jobs without a lane wait in one ``JobQueue`` as they always did; each lane has its own
``JobQueue``; all of them draw their turns from one counter, so a job's rank
``(-priority, turn)`` compares across lanes. The lanes that may start a job now sit in a
heap keyed by the rank of their head. A lane leaves that heap while it is held and comes
back when that changes (one of its jobs ends, its breaker's cooldown ends, its pinned retry
is due), so the next job to start is the better of two fronts, found in O(log lanes) however
many lanes are held and jobs queued: nothing is rescanned. Heap entries of a lane that
moved or left are dropped lazily (a token per lane says which entry is its own).

A lane is created by its first job and forgotten once it has no job queued, pinned or
running and its breaker has nothing to remember. An idle lane whose breaker remembers
failures is kept, but at most ``IDLE_LANES_KEPT`` of them: past that, the one idle longest
is forgotten, so a pool whose lanes are one-off (a lane per conversation) stays bounded.
Pure: the clock is passed in, no trio, no I/O.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable, Iterator
from operator import itemgetter
from typing import Generic, TypeVar

from ._info import LaneStatus
from ._intensity import CircuitState
from ._jobqueue import JobQueue, Rank

__all__ = ["Line", "circuit_hold"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_SLACK = 64  # stale heap entries tolerated beyond twice the lanes before the heap is rebuilt


def circuit_hold(circuit: CircuitState, now: float) -> str | None:
    """What a circuit that keeps jobs from starting at ``now`` says (None: it does not)."""
    if not circuit.holds(now):
        return None
    if circuit.state == "open":
        return f"circuit open, half-open in {circuit.reopen_in(now):.1f} s"
    return "circuit half-open, a trial job is running"


class _Lane(Generic[K, V]):
    """One lane: its queue, its running jobs (with the ranks they started with), its breaker,
    and under ``lane_order="fifo"`` the retried job pinned at its head."""

    __slots__ = (
        "breaker",
        "name",
        "pin",
        "pin_due",
        "pin_waiting",
        "queue",
        "rank",
        "running",
        "timer",
        "token",
        "tripped",
    )

    def __init__(self, name: str, turns: Iterator[int], breaker: CircuitState | None) -> None:
        self.name = name
        self.queue: JobQueue[K, V] = JobQueue(turns)
        self.running: dict[K, Rank] = {}
        self.breaker = breaker
        self.tripped = False  # its breaker holds it (open, or a half-open trial runs)
        self.pin: tuple[K, V, Rank] | None = None
        self.pin_waiting = False  # the pinned retry waits out its backoff: the lane is held
        self.pin_due = 0.0
        self.token = -1  # the tie of its entry in the ready heap (-1: it has none)
        self.rank: Rank = (0, 0)  # the rank that entry was pushed with
        self.timer = math.inf  # when a wake is set for the end of its breaker's cooldown

    def head(self) -> tuple[K, V] | None:
        if self.pin is not None:
            return self.pin[0], self.pin[1]
        return self.queue.peek()

    def head_rank(self) -> Rank | None:
        if self.pin is not None:
            return self.pin[2]
        return self.queue.front_rank()

    def queued(self) -> int:
        return len(self.queue) + (self.pin is not None and not self.pin_waiting)

    def ranked(self) -> Iterator[tuple[Rank, K, V]]:
        if self.pin is not None and not self.pin_waiting:
            yield self.pin[2], self.pin[0], self.pin[1]
        yield from self.queue.ranked()


IDLE_LANES_KEPT = 10_000  # idle lanes whose breaker remembers failures; the longest idle goes first


class Line(Generic[K, V]):
    """The waiting jobs of a pool, with or without a lane; ``peek``/``take`` give the job that
    starts next: the best rank among the jobs without a lane and the heads of the lanes that
    are not held.

    ``concurrency``: the most running jobs per lane (None: no bound). ``breaker``:
    ``(failures, cooldown)`` of each lane's own circuit breaker (None: none). ``fifo``: a
    lane's retried job is pinned at its head and holds the lane until it starts again.
    """

    def __init__(
        self, *, concurrency: int | None = None, breaker: tuple[int, float] | None = None, fifo: bool = False
    ) -> None:
        self._turns = itertools.count()
        self.free: JobQueue[K, V] = JobQueue(self._turns)  # the jobs without a lane
        self._lanes: dict[str, _Lane[K, V]] = {}
        self._idle: dict[str, None] = {}  # lanes kept for their breaker alone, the longest idle first
        self._lane_of: dict[K, _Lane[K, V]] = {}  # queued jobs of lanes (a due pinned retry included)
        # lanes not held, by the rank of their head: (-priority, turn, tie, lane), flat for quick compares
        self._ready: list[tuple[int, int, int, _Lane[K, V]]] = []
        self._timers: list[tuple[float, int, _Lane[K, V]]] = []  # lanes whose breaker's cooldown ends then
        self._ties = itertools.count()
        self.concurrency = concurrency
        self.fifo = fifo
        self._breaker = breaker

    def configure(self, *, concurrency: int | None, breaker: tuple[int, float] | None, fifo: bool) -> None:
        """New lane settings (a reload): every lane is looked at again; a changed breaker starts
        afresh in every lane. A retry pinned already stays pinned until it starts."""
        renew = breaker != self._breaker
        self.concurrency, self._breaker, self.fifo = concurrency, breaker, fifo
        for lane in list(self._lanes.values()):
            if renew:
                lane.breaker = self._new_breaker()
                lane.tripped = False
                lane.timer = math.inf
            self._refresh(lane)

    def _new_breaker(self) -> CircuitState | None:
        return CircuitState(*self._breaker) if self._breaker is not None else None

    # --- the line ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Queued jobs (a pinned retry counts once it is due; while it waits it is a retry)."""
        return len(self.free) + len(self._lane_of)

    def __contains__(self, key: object) -> bool:
        return key in self._lane_of or key in self.free

    def __iter__(self) -> Iterator[tuple[K, V]]:
        """Queued jobs by rank (a lane's pinned retry first in its lane), for listings."""
        sources = [self.free.ranked(), *(lane.ranked() for lane in self._lanes.values())]
        for _, key, value in heapq.merge(*sources, key=itemgetter(0)):
            yield key, value

    def push(self, key: K, priority: int, value: V, lane: str | None = None) -> None:
        """Queue a job at the back of its priority class (in its lane, if it has one); a lane's
        pinned retry that is due becomes its lane's head again. Raises KeyError if queued already."""
        if lane is None:
            self.free.push(key, priority, value)
            return
        where = self._lanes.get(lane)
        if where is None:
            where = self._lanes[lane] = _Lane(lane, self._turns, self._new_breaker())
        self._idle.pop(lane, None)
        if key in self._lane_of:
            raise KeyError(f"{key!r} is queued already")
        pin = where.pin
        if pin is not None and pin[0] == key:
            where.pin_waiting = False
        else:
            where.queue.push(key, priority, value)
        self._lane_of[key] = where
        self._refresh(where)

    def _best_lane(self) -> _Lane[K, V] | None:
        """The lane whose head starts next, if it ranks before the front of the jobs without a lane."""
        ready = self._ready
        while ready and ready[0][3].token != ready[0][2]:
            heapq.heappop(ready)  # a lane that moved (a new head) or is held
        if not ready:
            return None
        lane = ready[0][3]
        free = self.free.front_rank()
        return lane if free is None or lane.rank < free else None

    def peek(self) -> tuple[K, V] | None:
        """The job that starts next, without taking it (None: nothing may start)."""
        if not self._ready:  # no lane may start a job (or there are none): as without lanes
            return self.free.peek()
        lane = self._best_lane()
        return lane.head() if lane is not None else self.free.peek()

    def take(self, now: float) -> tuple[K, V, str | None]:
        """Take the job ``peek`` gives, which starts at ``now``: its lane counts it running and,
        with a breaker, lets it through (a half-open one as its trial). Returns the job and the
        state its lane's breaker entered (``"half_open"``, or None). IndexError when empty."""
        lane = self._best_lane() if self._ready else None
        if lane is None:
            key, value = self.free.pop()
            return key, value, None
        if lane.pin is not None:
            key, value, rank = lane.pin
            lane.pin = None
        else:
            key, value, rank = lane.queue.pop_ranked()
        del self._lane_of[key]
        lane.running[key] = rank
        entered = None
        if lane.breaker is not None:
            _, entered = lane.breaker.allow(now, key)  # a lane in the heap is not held: it is let through
            lane.tripped = lane.breaker.holds(now)
        self._refresh(lane)
        return key, value, entered

    def remove(self, key: K, lane: str | None = None) -> V | None:
        """Take a queued job (or a lane's pinned retry) out of the line: cancelled, dropped.
        Its value, or None if the line does not hold it."""
        if lane is None:
            return self.free.remove(key)
        where = self._lanes.get(lane)
        if where is None:
            return None
        pin = where.pin
        if pin is not None and pin[0] == key:
            where.pin = None
            if not where.pin_waiting:
                del self._lane_of[key]
            where.pin_waiting = False
            value: V | None = pin[1]
        else:
            value = where.queue.remove(key)
            if value is None:
                return None
            del self._lane_of[key]
        self._refresh(where)
        return value

    def pinned(self, key: K, lane: str | None) -> bool:
        """Whether ``key`` is its lane's pinned retry (waiting out its backoff, or due)."""
        where = self._lanes.get(lane) if lane is not None else None
        return where is not None and where.pin is not None and where.pin[0] == key

    def replace(self, key: K, new_key: K, value: V, lane: str | None = None) -> None:
        """Put ``new_key`` and ``value`` in the place of the queued (or pinned) ``key``: a coalesced
        job keeps its place in its lane. Raises KeyError if ``key`` is not held or ``new_key`` is."""
        if lane is None:
            self.free.replace(key, new_key, value)
            return
        if new_key in self._lane_of:
            raise KeyError(f"{new_key!r} is queued already")
        where = self._lanes[lane]
        pin = where.pin
        if pin is not None and pin[0] == key:
            where.pin = (new_key, value, pin[2])
            if where.pin_waiting:
                return
        else:
            where.queue.replace(key, new_key, value)
        del self._lane_of[key]
        self._lane_of[new_key] = where

    # --- a lane's own state --------------------------------------------------------------

    def finished(
        self, key: K, lane: str | None, now: float, ok: bool | None, retry: tuple[V, float] | None = None
    ) -> str | None:
        """A started job of ``lane`` ended at ``now``: it succeeded or failed (``ok``), or was
        stopped (None: it says nothing about the service). ``retry``: it is to run again at that
        time; under ``fifo`` it is pinned at the head of its lane, which it holds until then.
        Returns the state the lane's breaker entered (``"opened"``, ``"closed"``, or None)."""
        where = self._lanes.get(lane) if lane is not None else None
        if where is None:
            return None
        rank = where.running.pop(key)
        entered = None
        breaker = where.breaker
        if breaker is not None:
            if ok is None:
                breaker.abandon(key)
            else:
                entered = breaker.record(key, ok, now)
            where.tripped = breaker.holds(now)
            if where.tripped and breaker.state == "open":
                self._wake_at(where, now + breaker.reopen_in(now))
        if retry is not None and self.fifo:
            where.pin = (key, retry[0], rank)
            where.pin_waiting = True
            where.pin_due = retry[1]
        self._refresh(where)
        return entered

    def _wake_at(self, lane: _Lane[K, V], at: float) -> None:
        if at < lane.timer:
            lane.timer = at
            heapq.heappush(self._timers, (at, next(self._ties), lane))

    def wake(self, now: float) -> float:
        """Let the lanes whose breaker's cooldown is over start again; the time of the next such
        end (inf: none)."""
        timers = self._timers
        while timers and (timers[0][0] <= now or timers[0][2].timer != timers[0][0]):
            at, _, lane = heapq.heappop(timers)
            if lane.timer != at:
                continue  # a wake set again, or dropped by a reload
            lane.timer = math.inf
            if lane.breaker is not None:
                lane.tripped = lane.breaker.holds(now)
                if lane.tripped and lane.breaker.state == "open":
                    self._wake_at(lane, now + lane.breaker.reopen_in(now))
            self._refresh(lane)
        return timers[0][0] if timers else math.inf

    def _refresh(self, lane: _Lane[K, V]) -> None:
        """Put ``lane`` in the ready heap under the rank of its head, take it out while it is held
        or empty, and forget it once it holds nothing at all."""
        concurrency = self.concurrency
        if lane.pin_waiting or lane.tripped or (concurrency is not None and len(lane.running) >= concurrency):
            lane.token = -1
            return
        rank = lane.head_rank()
        if rank is None:
            lane.token = -1
            if not lane.running:
                self._rest(lane)
            return
        if lane.token >= 0 and lane.rank == rank:
            return
        tie = next(self._ties)
        lane.token, lane.rank = tie, rank
        ready = self._ready
        heapq.heappush(ready, (rank[0], rank[1], tie, lane))
        if len(ready) > 2 * len(self._lanes) + _SLACK:
            self._ready = [entry for entry in ready if entry[3].token == entry[2]]
            heapq.heapify(self._ready)

    def _rest(self, lane: _Lane[K, V]) -> None:
        """``lane`` holds no job: forget it, unless its breaker remembers failures; then keep it
        among the idle lanes, forgetting the one idle longest beyond ``IDLE_LANES_KEPT``."""
        idle = self._idle
        idle.pop(lane.name, None)
        if lane.breaker is None or lane.breaker.pristine:
            self._lanes.pop(lane.name, None)
            return
        idle[lane.name] = None
        if len(idle) > IDLE_LANES_KEPT:
            oldest = next(iter(idle))
            del idle[oldest]
            self._lanes.pop(oldest).timer = math.inf  # a wake set for it is dropped

    # --- reading -------------------------------------------------------------------------

    @property
    def lanes(self) -> int:
        """Lanes known: with jobs queued, pinned or running, or a breaker that remembers failures."""
        return len(self._lanes)

    def names(self) -> list[str]:
        return sorted(self._lanes)

    def breaker(self, name: str) -> CircuitState | None:
        """A lane's own circuit breaker (None: no such lane, or no ``lane_circuit_breaker``)."""
        lane = self._lanes.get(name)
        return lane.breaker if lane is not None else None

    def held_lanes(self, now: float) -> int:
        """Lanes with queued jobs that their own state holds (O(lanes): for a status)."""
        return sum(1 for lane in self._lanes.values() if lane.queued() and self._hold(lane, now) is not None)

    def lane(self, name: str, now: float) -> LaneStatus | None:
        """A lane's jobs and breaker, and what holds it, as of ``now`` (None: no such lane)."""
        lane = self._lanes.get(name)
        if lane is None:
            return None
        return LaneStatus(
            lane=name,
            queued=lane.queued(),
            running=len(lane.running),
            circuit=lane.breaker.state if lane.breaker is not None else None,
            held=self._hold(lane, now),
        )

    def _hold(self, lane: _Lane[K, V], now: float) -> str | None:
        """What holds a lane, in words (None: nothing of its own)."""
        if lane.pin is not None and lane.pin_waiting:
            return f"job {lane.pin[0]} waits out its retry at the head of the lane, due in " + (
                f"{max(0.0, lane.pin_due - now):.1f} s"
            )
        if lane.breaker is not None:
            words = circuit_hold(lane.breaker, now)
            if words is not None:
                return words
        if self.concurrency is not None and len(lane.running) >= self.concurrency:
            return f"{len(lane.running)} of lane_concurrency {self.concurrency} running"
        return None
