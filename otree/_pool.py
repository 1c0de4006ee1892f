"""The pool child: a bounded priority job queue, a concurrency cap, a daily budget gate,
retries with backoff, dead letters, a circuit breaker, the queue policies (a full
queue, a duplicate key, an open circuit, a dead key, the start rate) and lanes, in memory
or durable in SQLite.

Each running job is a temporary child of the pool (a ``RunningChild`` running
``await handler(payload)``), so ``current_child().report_cost()`` works in a
handler and the job shows in the pool's ``which_children``. One task, the
dispatcher, decides what starts; the decisions are the pure ``Line`` (its lanes),
``Budget``, ``CircuitState``, ``StartRate`` and ``OldestFirst``.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import heapq
import itertools
import logging
import math
import random
import shutil
import time
import zoneinfo
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, Literal, TypedDict

import msgspec
import trio

from ._budget import (
    MAX_USD,
    Budget,
    budget_day,
    from_micros,
    local_zone,
    next_midnight,
    seconds_until_midnight,
    to_micros,
)
from ._errors import (
    BudgetExceeded,
    CircuitOpen,
    DeadLettered,
    JobFailed,
    NotFound,
    NotRunning,
    QueueFull,
    SpecError,
)
from ._events import level_of
from ._info import ChildInfo, DeadLetter, LaneStatus, PoolStatus
from ._intensity import CircuitState
from ._lanes import Line, circuit_hold
from ._paths import child_log_dir, ensure_private_dir
from ._policies import OldestFirst, StartRate
from ._process import ProcessContext, ProcessFailed, run_job_process
from ._spec import PoolSpec, ProcessSpec, ShutdownValue, process, valid_max_runtime
from ._store import INTERRUPTIONS_TO_DEAD, Store
from ._task import RunningChild, current_child

__all__ = ["Job", "Pool", "ProcessJob", "SubmitOptions", "process_job"]

JobState = Literal["queued", "waiting", "running", "done", "dead", "cancelled", "interrupted", "dropped"]
HoldReason = Literal["budget", "circuit"]
PRIORITY_RANGE = range(-1000, 1001)


class SubmitOptions(TypedDict, total=False):
    """The keywords of a submission (``Pool.submit_nowait`` says what each does), for the
    handle's methods that pass them on."""

    priority: int
    estimated_cost: float
    key: Hashable
    max_runtime: float | None
    lane: str | None


HISTORY = 1000  # finished jobs a pool remembers (in memory) for ``otree job``
MAX_LANE = 256  # characters of a lane's name


class Job:
    """A submitted job: ``await job.result()`` or ``job.cancel()``."""

    __slots__ = (
        "_done",
        "_handler",
        "_pool",
        "attempts",
        "cost",
        "dropped",
        "due",
        "ended_at",
        "error",
        "estimate",
        "id",
        "key",
        "kind",
        "lane",
        "logged",
        "max_runtime",
        "payload",
        "place",
        "priority",
        "run",
        "started_at",
        "state",
        "submitted_at",
        "value",
    )

    def __init__(
        self,
        pool: Pool,
        job_id: str,
        kind: str,
        payload: Any,
        *,
        priority: int,
        estimate: int,
        key: Hashable,
        lane: str | None = None,
    ) -> None:
        self._pool = pool
        self.id = job_id
        self.kind = kind
        self.payload = payload
        self.priority = priority
        self.estimate = estimate  # micro-dollars
        self.key = key
        self.lane = lane  # its lane (None: none)
        # its place in the line: its own submission, or the one it took over by replacing it
        self.place = int(job_id)
        self.due = 0.0  # when a retry waiting out its backoff is due (trio time)
        self.attempts = 0
        self.logged = 0  # micro-dollars of this run's spend already in the store's ledger
        self.cost = 0.0
        self.state: JobState = "queued"
        self.submitted_at = time.time()
        self.started_at: float | None = None  # wall time its last attempt started
        self.ended_at: float | None = None  # wall time it finished (any way)
        self.run: RunningChild | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.dropped = ""  # why the pool dropped it (the reason of its job.dropped event)
        self.max_runtime: float | None = None  # its own limit per attempt (None: its kind's)
        self._done: trio.Event | None = None  # created only if someone awaits the result
        self._handler: Callable[[Any], Awaitable[Any]] | None = None  # its running attempt's handler

    def __repr__(self) -> str:
        return f"<otree.Job {self.id} {self.kind} {self.state}>"

    async def result(self) -> Any:
        """The handler's return value once the job has succeeded.

        Raises:
          JobFailed: the job was dead-lettered (its last error chained), cancelled, dropped
            (naming why), or interrupted by a stop of its durable pool.
        """
        if not self.finished:  # a cancelled job still stopping may yet end done
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()
        else:
            await trio.lowlevel.checkpoint()  # an async call always checkpoints (trio's rule)
        if self.state == "done":
            return self.value
        why = self.why()
        if why is None:
            return self.value
        raise JobFailed(self.id, why) from self.error if self.state == "dead" else None

    def why(self) -> str | None:
        """Why a finished job has no result (None: it is done, or not finished)."""
        if self.state in ("done", "queued", "waiting", "running"):
            return None
        if self.state == "cancelled":
            return "cancelled"
        if self.state == "interrupted":
            return "interrupted: the pool stopped; it runs again when the pool starts"
        if self.state == "dropped":
            return f"dropped: {self.dropped}"
        tries = "1 attempt" if self.attempts == 1 else f"{self.attempts} attempts"
        return f"dead-lettered after {tries}"

    def cancel(self) -> None:
        """Remove a waiting job from the queue, or stop a running one (within the pool's
        ``job_shutdown``); one ``job.cancelled`` event once it is gone; nothing for a finished job."""
        self._pool.cancel(self)

    @property
    def finished(self) -> bool:
        """Whether it has ended for good (a cancelled job still stopping has not)."""
        return self.state not in ("queued", "waiting", "running") and self.run is None

    @property
    def pid(self) -> int | None:
        """The process of a running process job (None for a task job, or between attempts)."""
        proc = self.run.proc if self.run is not None else None
        return proc.pid if proc is not None else None


def _lane_settings(spec: PoolSpec) -> dict[str, Any]:
    """What the line needs of a pool's lane settings."""
    breaker = spec.lane_circuit_breaker
    return {
        "concurrency": spec.lane_concurrency,
        "breaker": (breaker.failures, breaker.cooldown) if breaker is not None else None,
        "fifo": spec.lane_order == "fifo",
    }


def _zone(name: str) -> dt.tzinfo:
    """The budget day's time zone: ``"local"`` is the machine's zone, with its DST rules."""
    if name == "local":
        return local_zone()
    return zoneinfo.ZoneInfo(name)


class Pool:
    """One running pool (one run of a pool spec)."""

    def __init__(
        self,
        spec: PoolSpec,
        path: str,
        emit: Callable[..., None],
        *,
        wants: Callable[[int], bool],
        store_path: Path | None,
        handle: Callable[[], Any],
        processes: Callable[[], ProcessContext],
    ) -> None:
        self.spec = spec
        self.processes = processes  # the tree's process services, for process_job handlers
        self.handle = handle  # the PoolHandle its jobs reach through current_child().supervisor
        self.path = path
        self._emit = emit
        self._wants = wants  # whether an event at a level would reach anyone (the bus's ``wants``)
        self._store_path = store_path
        self.store: Store | None = None
        self.serving = False
        self.queue: Line[str, Job] = Line(**_lane_settings(spec))
        self.running: dict[str, Job] = {}
        # a heap of retries waiting out their backoff; a job that left it early (cancelled,
        # dropped, replaced) stays until due and is skipped then, so ``retrying`` counts the live ones
        self.waiting: list[tuple[float, int, Job]] = []
        self.retrying = 0
        self.dead: dict[str, DeadLetter] = {}
        self._dead_keys: dict[Hashable, dict[str, None]] = {}  # key -> ids of its dead letters
        self._by_key: dict[Hashable, Job] = {}
        self._ids = itertools.count(1)
        self._retries = itertools.count()  # orders retries due at the same time (and spares comparing Jobs)
        self._tz = _zone(spec.budget_tz)
        self.budget = Budget(spec.daily_budget, spec.budget_warn_at, spec.budget_rule)
        self.budget.roll(budget_day(self._now(), self._tz))
        breaker = spec.circuit_breaker
        self.circuit = CircuitState(breaker.failures, breaker.cooldown) if breaker is not None else None
        self._rate = StartRate(spec.max_starts_per_second) if spec.max_starts_per_second else None
        self._oldest: OldestFirst[Job] | None = None
        self._order_for_drops()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._context = contextvars.Context()  # the dispatcher's: what a job's run starts with
        self._idle: dict[RunningChild, None] = {}  # runs whose task waits for a job
        self._stopping = False
        self._stop_requested = False
        self._kill_at = math.inf  # the pool's own stop deadline (trio time)
        self.held: tuple[Job, HoldReason] | None = None  # the head job the budget or circuit holds
        self.history: OrderedDict[str, Job] = OrderedDict()  # the last HISTORY finished jobs, oldest first

    def reconfigure(self, spec: PoolSpec) -> None:
        """Apply a reloaded spec in place: queued jobs, today's spend and dead letters are kept.

        New handlers, limits, budget, retry policy and breaker apply from the next
        job on; running jobs finish under the settings they started with.

        Raises:
          ValueError: ``durable`` changed, which needs the pool restarted.
        """
        if spec.durable != self.spec.durable:
            raise ValueError(f"durable={spec.durable} needs the pool restarted (otree restart {self.path})")
        old = self.spec
        self.spec = spec
        self._tz = _zone(spec.budget_tz)
        if (spec.daily_budget, spec.budget_warn_at) != (old.daily_budget, old.budget_warn_at):
            budget = self.budget
            budget.limit = None if spec.daily_budget is None else to_micros(spec.daily_budget)
            budget.warn_at = spec.budget_warn_at
            budget.restore(budget.spent)  # thresholds passed under the new limit do not warn again
        self.budget.rule = spec.budget_rule
        if spec.circuit_breaker != old.circuit_breaker:
            breaker = spec.circuit_breaker
            self.circuit = CircuitState(breaker.failures, breaker.cooldown) if breaker is not None else None
        if spec.max_starts_per_second != old.max_starts_per_second:
            self._rate = StartRate(spec.max_starts_per_second) if spec.max_starts_per_second else None
        if spec.on_full != old.on_full:
            self._order_for_drops()
        self.queue.configure(**_lane_settings(spec))
        self._wake.set()

    def _order_for_drops(self) -> None:
        """Under ``on_full="drop_oldest"``, order the jobs in the line (queued, or waiting for a
        retry) by place, so the one that has waited longest is found in O(log n)."""
        self._oldest = None
        if self.spec.on_full == "drop_oldest":
            self._oldest = OldestFirst(lambda job: job.state in ("queued", "waiting"))
            for job in [job for _, job in self.queue] + self.waiting_jobs():
                self._track(job)

    def _track(self, job: Job) -> None:
        """``job`` entered the line: the drop order learns its place."""
        if self._oldest is not None:
            self._oldest.push(job.place, job, len(self.queue) + self.retrying)

    def waiting_jobs(self) -> list[Job]:
        """Retries waiting out their backoff, the soonest due first."""
        return [job for _, _, job in sorted(self.waiting, key=lambda e: e[:2]) if job.state == "waiting"]

    # --- submission -----------------------------------------------------------------

    def _now(self) -> dt.datetime:
        clock = self.spec.now
        return clock() if clock is not None else dt.datetime.now(self._tz)

    def submit_nowait(
        self,
        kind: str,
        payload: Any = None,
        *,
        priority: int = 0,
        estimated_cost: float = 0.0,
        key: Hashable = None,
        max_runtime: float | None = None,
        lane: str | None = None,
    ) -> Job:
        """Queue a job at once; never waits. ``max_runtime`` (seconds per attempt) overrides its kind's.
        ``lane``: the lane it runs in (``lane_concurrency``, ``lane_circuit_breaker``, ``lane_order``).

        Raises:
          ValueError: unknown kind, priority out of range, negative cost, bad max_runtime,
            unencodable payload, a lane that is not a short non-empty str, a replacement in
            another lane than the job it replaces.
          NotRunning: the pool is not running.
          DeadLettered: under ``refuse_dead_keys``, the key belongs to a dead letter.
          CircuitOpen: under ``on_circuit_open="reject"``, the circuit (or the lane's) is open.
          QueueFull: under ``on_full="reject"``, ``max_queue`` jobs wait already.
          BudgetExceeded: under ``"reject"``, the estimate does not fit today's budget.
        """
        encoded = self._encode(kind, payload, priority, estimated_cost)
        if self.spec.executor is not None:  # a job run elsewhere gets its payload there
            self.spec.executor.check_payload(self.path, kind, payload)
        if max_runtime is not None and not valid_max_runtime(max_runtime):
            raise ValueError(f"{self.path}: max_runtime must be a number > 0 or None; got {max_runtime!r}")
        if lane is not None and not (
            isinstance(lane, str) and 0 < len(lane) <= MAX_LANE and lane.isprintable()
        ):
            raise ValueError(
                f"{self.path}: lane must be None or a str of 1 to {MAX_LANE} printable characters; "
                f"got {lane!r}"
            )
        if not self.serving:
            raise NotRunning(self.path, "starting" if not self._stopping else "stopping")
        known = self._key_in_use(kind, key) if key is not None else None
        if known is not None and self.spec.on_duplicate_key == "keep":
            return known
        # on_duplicate_key="replace": a job still in the line gives its place to this one; a
        # running one is left alone, and this one queues behind it
        taken_over = known if known is not None and known.state in ("queued", "waiting") else None
        if taken_over is not None and taken_over.lane != lane:
            raise ValueError(
                f"{self.path}: key {key!r} belongs to job {taken_over.id} in lane {taken_over.lane!r}; "
                f"its replacement must name the same lane, not {lane!r}"
            )
        estimate = self._admit(kind, estimated_cost, lane, adds=taken_over is None)
        if taken_over is not None:
            priority = taken_over.priority  # its place in the line includes its priority class
        store = self.store
        if store is None:
            job_id = next(self._ids)
        elif taken_over is None:
            stored_key = key if isinstance(key, str) or key is None else str(key)
            job_id = store.add(
                kind,
                encoded,
                priority=priority,
                estimate=estimate,
                key=stored_key,
                at=time.time(),
                max_runtime=max_runtime,
                lane=lane,
            )
        else:
            job_id = store.replace(
                int(taken_over.id), kind, encoded, estimate=estimate, at=time.time(), max_runtime=max_runtime
            )
        job = Job(self, str(job_id), kind, payload, priority=priority, estimate=estimate, key=key, lane=lane)
        job.max_runtime = max_runtime
        if key is not None:
            self._by_key[key] = job
        if taken_over is None:
            self.queue.push(job.id, priority, job, lane)
            if self._wants(logging.INFO):
                self._job_event(job, "job.queued", "", job_kind=kind, priority=priority)
        else:
            self._take_place(taken_over, job)
        if self._oldest is not None:
            self._track(job)
        self._wake.set()
        return job

    def _encode(self, kind: str, payload: Any, priority: int, estimated_cost: float) -> bytes:
        """Check a submission's arguments; its payload as JSON. Raises ValueError naming the pool."""
        spec = self.spec
        if kind not in spec.handlers:
            kinds = ", ".join(sorted(spec.handlers))
            raise ValueError(f"{self.path}: unknown job kind {kind!r} (kinds: {kinds})")
        if isinstance(priority, bool) or not isinstance(priority, int) or priority not in PRIORITY_RANGE:
            raise ValueError(f"{self.path}: priority must be an integer in [-1000, 1000]; got {priority!r}")
        if (
            isinstance(estimated_cost, bool)
            or not isinstance(estimated_cost, (int, float))
            or not (0 <= estimated_cost <= MAX_USD)
        ):
            raise ValueError(
                f"{self.path}: estimated_cost must be a number of USD >= 0 and <= {MAX_USD:,}; "
                f"got {estimated_cost!r}"
            )
        try:
            return msgspec.json.encode(payload)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"{self.path}: payload of a {kind!r} job cannot be encoded: {exc}") from None

    def _key_in_use(self, kind: str, key: Hashable) -> Job | None:
        """The unfinished job that holds ``key`` (None: it is free). Raises ValueError for a
        durable pool's non-str key, ``DeadLettered`` for a dead key under ``refuse_dead_keys``."""
        if self._store_path is not None and not isinstance(key, str):
            raise ValueError(f"{self.path}: a durable pool's job keys must be str; got {key!r}")
        dead = self._dead_keys.get(key) if self.spec.refuse_dead_keys else None
        if dead:
            letter = next(iter(dead))
            self._emit(self.path, "job.rejected", "dead_key", job_kind=kind, dead_letter=letter)
            raise DeadLettered(self.path, key, letter)
        return self._by_key.get(key)

    def _admit(self, kind: str, estimated_cost: float, lane: str | None, *, adds: bool) -> int:
        """Refuse a submission the circuit (the pool's or its lane's), a full queue or the budget
        refuses (a ``job.rejected`` event and the error), then, under ``drop_oldest``, make room for
        it (``adds``: it takes a new place in the line). Nothing is dropped for a submission that is
        refused. Returns the estimate in micro-dollars."""
        spec = self.spec
        if self.circuit is not None:
            self._refuse_if_circuit_open(kind, self.circuit)
        if lane is not None:
            self._refuse_if_circuit_open(kind, self.queue.breaker(lane), lane)
        full = adds and len(self.queue) + self.retrying >= spec.max_queue
        if full and spec.on_full == "reject":
            self._emit(self.path, "job.rejected", "queue_full", job_kind=kind)
            raise QueueFull(self.path, spec.max_queue)
        estimate = to_micros(estimated_cost)
        self._roll()
        if spec.on_budget_exhausted == "reject" and not self.budget.can_start(estimate):
            self._emit(self.path, "job.rejected", "budget", job_kind=kind, estimated_cost=estimated_cost)
            raise BudgetExceeded(
                self.path, f"the daily budget does not admit an estimate of ${estimated_cost:g}"
            )
        if full:
            self._drop_oldest()
        return estimate

    def _refuse_if_circuit_open(
        self, kind: str, circuit: CircuitState | None, lane: str | None = None
    ) -> None:
        """``on_circuit_open="reject"``: while the circuit (the pool's, or the submission's lane's)
        is open (cooling down), a submission raises ``CircuitOpen``; a half-open circuit takes
        submissions (they wait for the trial)."""
        if self.spec.on_circuit_open != "reject" or circuit is None or circuit.state != "open":
            return
        now = trio.current_time()
        if circuit.holds(now):
            lanes = {} if lane is None else {"lane": lane}
            self._emit(self.path, "job.rejected", "circuit", job_kind=kind, **lanes)
            raise CircuitOpen(self.path, circuit.reopen_in(now), lane)

    def _drop_oldest(self) -> None:
        """``on_full="drop_oldest"``: drop the jobs that have waited longest (queued, or waiting
        for a retry; never a running one) until a new one fits under ``max_queue``."""
        oldest = self._oldest
        assert oldest is not None
        while len(self.queue) + self.retrying >= self.spec.max_queue:
            job = oldest.oldest()
            assert job is not None, "the line holds the jobs it counts"
            self._leave_line(job)
            self._forget(job)
            self._drop(job, "queue_full")

    def _take_place(self, old: Job, job: Job) -> None:
        """``on_duplicate_key="replace"``: ``job`` takes ``old``'s place, in the queue or in the
        retry heap (then it is due when ``old`` was; pinned at the head of a FIFO lane, it stays
        there), and ``old`` is dropped as ``replaced``."""
        job.place = old.place
        if old.state == "queued" or self.queue.pinned(old.id, old.lane):
            self.queue.replace(old.id, job.id, job, old.lane)
        if old.state == "waiting":  # old's heap entry is skipped when due; the count of retries stays
            job.state = "waiting"
            job.due = old.due
            heapq.heappush(self.waiting, (old.due, next(self._retries), job))
        self._drop(old, "replaced", replaced_by=job.id)
        self._job_event(
            job, "job.queued", "replacing", job_kind=job.kind, priority=job.priority, replaces=old.id
        )

    def _leave_line(self, job: Job) -> None:
        """``job`` leaves the line before it starts: out of the queue, or (lazily) out of the retry
        heap (and, pinned at the head of a FIFO lane, out of it)."""
        self.queue.remove(job.id, job.lane)
        if job.state == "waiting":
            self.retrying -= 1  # its heap entry is skipped when due

    def cancel(self, job: Job) -> None:
        """``job.cancel()``: a queued or waiting job leaves the line at once; a running one is
        stopped within ``job_shutdown`` (its ``job.cancelled`` comes once it has exited).
        Neither a failure nor a retry: the circuit and the retry count do not see it."""
        if job.state in ("queued", "waiting"):
            was = job.state
            self._leave_line(job)
            self._cancelled(job, was)
            self._wake.set()  # the job behind it may be the new head (and held)
        elif job.state == "running" and job.run is not None:
            job.state = "cancelled"
            job.run.request_stop(self._job_grace(), self._job_stopped)

    def _cancelled(self, job: Job, was: str) -> None:
        """A cancelled job is gone (out of a durable pool's store too): one ``job.cancelled`` event."""
        self._forget(job)
        self._finish(job, "cancelled")
        self._job_event(job, "job.cancelled", "", job_kind=job.kind, state=was, attempts=job.attempts)

    def find(self, job_id: str) -> Job:
        """A running, waiting or recently finished job (the last ``HISTORY``) by id.

        Raises:
          NotFound: no such job here (naming the pool and what it holds).
        """
        job = self.running.get(job_id) or self.history.get(job_id)
        if job is None:
            job = next((job for job in self.waiting_jobs() if job.id == job_id), None)
        if job is None and job_id in self.queue:
            job = next(job for _, job in self.queue if job.id == job_id)
        if job is None:
            held = (
                f"{len(self.running)} running",
                f"{len(self.queue)} queued",
                f"{self.retrying} retrying",
                f"{len(self.history)} recent finished",
            )
            raise NotFound(self.path, job_id, list(held), what="job")
        return job

    def requeue(self, dead_letter_id: str) -> Job:
        """Queue a dead letter again (a fresh count of attempts, no key, its kind's max_runtime, in its
        lane); its key is free again.

        Raises:
          NotFound: no such dead letter (and what ``submit_nowait`` raises: the letter stays).
        """
        letter = self._letter(dead_letter_id)
        job = self.submit_nowait(  # may refuse: the letter stays until it is queued
            letter.kind,
            letter.payload,
            priority=letter.priority,
            estimated_cost=letter.estimated_cost,
            lane=letter.lane,
        )
        self._unbury(letter)
        return job

    def clear_dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """Remove a dead letter for good (a ``dead_letter.cleared`` event); its key is free again.

        Raises:
          NotFound: no such dead letter.
        """
        letter = self._letter(dead_letter_id)
        self._unbury(letter)
        self._emit(f"{self.path}/{letter.id}", "dead_letter.cleared", "", job_kind=letter.kind)
        return letter

    def _letter(self, dead_letter_id: str) -> DeadLetter:
        letter = self.dead.get(dead_letter_id)
        if letter is None:
            raise NotFound(self.path, dead_letter_id, list(self.dead), what="dead letter")
        return letter

    def _unbury(self, letter: DeadLetter) -> None:
        del self.dead[letter.id]
        letters = self._dead_keys.get(letter.key) if letter.key is not None else None
        if letters is not None:
            letters.pop(letter.id, None)
            if not letters:
                del self._dead_keys[letter.key]
        if self.store is not None:
            self.store.unbury(int(letter.id))

    def _add_letter(self, letter: DeadLetter) -> None:
        self.dead[letter.id] = letter
        if letter.key is not None:
            self._dead_keys.setdefault(letter.key, {})[letter.id] = None

    def _forget(self, job: Job) -> None:
        if self.store is not None:
            self.store.remove(int(job.id))

    def _open_store(self) -> None:
        """Open the database and take back what it holds: queued and interrupted jobs, dead
        letters, today's spend. Raises StoreError (naming the file) if it cannot be used."""
        if self._store_path is None:
            return
        store = Store(self._store_path)
        try:
            queued, doomed = store.recover()
            now = time.time()
            reason = f"interrupted {INTERRUPTIONS_TO_DEAD} times (it may be what kills otree)"
            for stored in doomed:
                store.bury(stored.id, reason, now)
            letters = store.dead_letters()
        except BaseException:
            store.close()
            raise
        self.store = store
        for stored in doomed:
            self._emit(
                f"{self.path}/{stored.id}",
                "job.dead_lettered",
                "interrupted",
                job_kind=stored.kind,
                detail=reason,
            )
        for stored in queued:
            job = Job(
                self,
                str(stored.id),
                stored.kind,
                stored.payload,
                priority=stored.priority,
                estimate=stored.estimate,
                key=stored.key,
                lane=stored.lane,
            )
            job.attempts = stored.attempts
            job.submitted_at = stored.submitted_at
            job.place = stored.place
            job.max_runtime = stored.max_runtime
            if stored.key is not None:
                self._by_key[stored.key] = job
            self.queue.push(job.id, job.priority, job, job.lane)
            self._track(job)
            self._job_event(job, "job.queued", "recovered", job_kind=job.kind, priority=job.priority)
        for row in letters:
            self._add_letter(DeadLetter(*row))
        self.budget.restore(store.spent(str(self.budget.day)))

    # --- dispatch ---------------------------------------------------------------------

    def request_stop(self, kill_at: float) -> None:
        """The pool's supervisor stops it (its run's ``on_stop``): the dispatcher ends, then the
        running jobs are stopped at once, each within ``job_shutdown`` but never after the
        pool's own deadline ``kill_at`` (a pool killed brutally kills its jobs)."""
        self._stop_requested = True
        tighter = kill_at < self._kill_at
        self._kill_at = min(self._kill_at, kill_at)
        if tighter and self._stopping:  # jobs are stopping already: the new deadline applies to them
            for job in self.running.values():
                if job.run is not None:
                    job.run.request_stop(self._job_grace(), self._job_stopped)
        self._wake.set()

    def _job_grace(self) -> float | str:
        """A job's stop grace: ``job_shutdown``, cut short by the pool's own deadline."""
        left = self._kill_at - trio.current_time()
        shutdown = self.spec.job_shutdown
        if left <= 0 or shutdown == "brutal_kill":
            return "brutal_kill"
        if shutdown == "infinity":
            return "infinity" if left == math.inf else left
        return min(float(shutdown), left)

    def _roll(self) -> None:
        if self.budget.limit is None and self.store is None:
            return  # nothing depends on the day: no gate, no ledger
        if self.budget.roll(budget_day(self._now(), self._tz)):
            self._emit(self.path, "budget.reset", "")
            if self.store is not None:
                self.budget.restore(self.store.spent(str(self.budget.day)))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the dispatcher until the pool is asked to stop; then stop running jobs at once."""
        self._open_store()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._context = contextvars.copy_context()
            self.serving = True
            task_status.started()
            try:
                while not self._stop_requested:
                    deadline = self._dispatch()
                    self._wake = trio.Event()
                    if deadline == math.inf:  # nothing timed: spare a cancel scope per wake
                        await self._wake.wait()
                    else:
                        with trio.move_on_at(deadline):
                            await self._wake.wait()
            finally:
                self._stopping = True
                self.serving = False
                with trio.CancelScope(shield=True):
                    await self._stop_running()
                self._release_waiters()
                if self.store is not None:
                    self.store.close()

    def _dispatch(self) -> float:
        """Start what may start now; the trio time at which to look again (inf: on the next event)."""
        now = trio.current_time()
        look_again = self._catch_up(now)
        running, limit = self.running, self.spec.max_concurrency
        held: tuple[Job, HoldReason] | None = None
        while len(running) < limit:
            job, held, wake = self._next_job(now)
            if job is None:
                look_again = min(look_again, wake)
                break
            self._start(job, now)
        self._set_hold(held)
        budget = self.budget
        if budget.limit is not None and budget.spent:
            # wake at midnight, so the reset is reported (and reject mode opens) when it happens
            look_again = min(look_again, now + seconds_until_midnight(self._now(), self._tz))
        return look_again

    def _catch_up(self, now: float) -> float:
        """Before a decision at ``now``: retries that are due join the line, lanes whose breaker
        cooled down may start again, the budget day rolls. The time of the next such change."""
        waiting = self.waiting
        while waiting and waiting[0][0] <= now:
            _, _, job = heapq.heappop(waiting)
            if job.state != "waiting":  # cancelled, dropped or replaced while it waited
                continue
            self.retrying -= 1
            job.state = "queued"
            self.queue.push(job.id, job.priority, job, job.lane)  # a FIFO lane's pinned retry: its head again
        look_again = min(waiting[0][0] if waiting else math.inf, self.queue.wake(now))
        self._roll()
        return look_again

    def _next_job(self, now: float) -> tuple[Job | None, tuple[Job, HoldReason] | None, float]:
        """Take the job that starts next out of the line; or None, with what holds the head (None:
        nothing, or only the start rate) and when to look again (inf: on the next event)."""
        queue, budget, rate = self.queue, self.budget, self._rate
        while True:
            head = queue.peek()
            if head is None:
                return None, None, math.inf
            job = head[1]
            if job.kind not in self.spec.handlers:  # its kind left the tree file: it can never run
                queue.remove(job.id, job.lane)
                self._bury(job, f"unknown job kind {job.kind!r}")
                self._job_event(job, "job.dead_lettered", "error", detail="unknown job kind")
                continue
            if not budget.can_start(job.estimate):
                # strict priority order: the head that does not fit holds the jobs behind it until
                # a running job ends (a wake) or the budget day does (a timer)
                return None, (job, "budget"), now + seconds_until_midnight(self._now(), self._tz)
            if rate is not None and not rate.allows(now):  # max_starts_per_second: wake for the token
                return None, None, rate.ready_at()
            circuit = self.circuit
            if circuit is not None:
                allowed, entered = circuit.allow(now, job.id)
                if entered:
                    self._emit(self.path, f"circuit.{entered}", "")
                if not allowed:
                    # open: wake when it turns half-open; half-open: the trial's end wakes us
                    wake = now + circuit.reopen_in(now) if circuit.state == "open" else math.inf
                    return None, (job, "circuit"), wake
            # a job its own lane holds is not the head: the line gives the best of the lanes not held
            _, _, entered = queue.take(now)
            if entered:
                self._emit(self.path, f"circuit.{entered}", "", lane=job.lane)
            if rate is not None:
                rate.take(now)
            return job, None, math.inf

    def _set_hold(self, held: tuple[Job, HoldReason] | None) -> None:
        """Record what holds the head job; a new hold (a new head, or a new reason) is one
        ``job.held`` event, however often the dispatcher wakes to find it unchanged."""
        if held == self.held:
            return
        self.held = held
        if held is not None:
            job, reason = held
            self._job_event(job, "job.held", reason, job_kind=job.kind, detail=self.hold())

    def hold(self) -> str | None:
        """What holds the head job, in words, as of now (``budget: needs $0.10, $0.08 left,
        resets 00:00 UTC``); None when nothing does (a change since the dispatcher last looked,
        such as a cancel or a reload, counts: its next wake decides again)."""
        if self.held is None:
            return None
        job, reason = self.held
        head = self.queue.peek()
        if head is None or head[1] is not job:
            return None
        if reason == "budget":
            if self.budget.can_start(job.estimate):
                return None
            midnight = next_midnight(self._now(), self._tz)
            return f"budget: {self.budget.shortfall(job.estimate)}, resets {midnight:%H:%M %Z}".rstrip()
        circuit = self.circuit
        return circuit_hold(circuit, trio.current_time()) if circuit is not None else None

    def status(self) -> PoolStatus:
        """The queue, concurrency, budget and circuit now, what holds the head job, and the lanes."""
        spec = self.spec
        budget = self.budget
        queue = self.queue
        return PoolStatus(
            queued=len(self.queue),
            retrying=self.retrying,
            running=len(self.running),
            max_concurrency=spec.max_concurrency,
            max_queue=spec.max_queue,
            dead_letters=len(self.dead),
            daily_budget=spec.daily_budget,
            spent_today=from_micros(budget.spent),
            reserved=from_micros(budget.reserved),
            circuit=self.circuit.state if self.circuit is not None else None,
            held=self.hold(),
            lanes=queue.lanes,
            lanes_held=queue.held_lanes(trio.current_time()) if queue.lanes else 0,
        )

    def lane(self, name: str) -> LaneStatus:
        """A lane's queued and running jobs, its breaker and what holds it, now.

        Raises:
          NotFound: the pool knows no such lane (it has no job, and its breaker nothing to remember).
        """
        status = self.queue.lane(name, trio.current_time())
        if status is None:
            names = self.queue.names()
            shown = names[:10] + ([f"and {len(names) - 10} more"] if len(names) > 10 else [])
            raise NotFound(self.path, repr(name), shown, what="lane")
        return status

    def _start(self, job: Job, now: float) -> None:
        """Start ``job``'s attempt at ``now``: in the task of an idle run (one whose job just ended),
        else in a task of its own."""
        limit = self._runtime_limit(job)
        if self._idle and limit is None:  # a task's first run sets up the watchers of a time limit
            run, _ = self._idle.popitem()  # its task, due to run in this scheduler round, runs it
            self._begin(job, now, run, None)
            return
        assert self._nursery is not None
        run = RunningChild(self, job, self.path)
        self._begin(job, now, run, limit)
        self._nursery.start_soon(run.main, self._run_job, (), True, name=run.path)

    def _begin(self, job: Job, now: float, run: RunningChild, limit: float | None) -> None:
        """``job``'s attempt starts at ``now`` as ``run`` (``limit``: its max_runtime): counted
        running, its estimate reserved."""
        handler = self.spec.handlers[job.kind]
        executor = self.spec.executor
        if executor is not None:  # it runs elsewhere (Ray); its slot is held here until it ends
            handler = executor.body(handler)
        job._handler = handler
        job.attempts += 1
        job.state = "running"
        job.started_at = time.time()
        if self.store is not None:
            self.store.started(int(job.id))
        self.budget.reserve(job.id, job.estimate)
        run.child = job
        run.path = f"{self.path}/{job.id}"
        run.ready = True
        run.started_mono = now
        if limit is not None:
            run.runtime_limit = (limit, self.spec.job_shutdown)
        job.run = run
        self.running[job.id] = job
        if self._wants(logging.INFO):
            self._job_event(job, "job.started", "", job_kind=job.kind, attempt=job.attempts)

    def _runtime_limit(self, job: Job) -> float | None:
        """Seconds ``job``'s attempt may run: its own ``max_runtime``, else its kind's (None: no limit)."""
        spec = self.spec
        limit = job.max_runtime
        if limit is None and spec.max_runtime is not None:
            limit = spec.runtime_of(job.kind)
        return limit

    async def _run_job(self, *, task_status: RunningChild) -> Any:
        """The body of a job's run (``RunningChild.main`` passes the run): its handler on its payload.
        An idle run that the dispatcher gave no job meanwhile takes the next itself, or ends."""
        run = task_status
        if run.child is None and not self._claim(run):
            return None
        job: Job = run.child
        assert job._handler is not None
        return await job._handler(job.payload)

    def _claim(self, run: RunningChild) -> bool:
        """An idle run takes the job that starts next, as the dispatcher would if it woke now (it
        is woken, and decides instead when it has a hold to look at); whether it got one."""
        del self._idle[run]
        if self.held is not None or self._stop_requested or len(self.running) >= self.spec.max_concurrency:
            return False
        now = trio.current_time()
        self._catch_up(now)
        job = self._next_job(now)[0]
        if job is None:
            return False
        limit = self._runtime_limit(job)
        if limit is not None:
            self._start(job, now)  # in a task of its own
            return False
        self._begin(job, now, run, None)
        return True

    # --- spend and the end of a job -------------------------------------------------------

    def cost_reported(self, run: RunningChild) -> None:
        """A job reported spend: charge it today, in memory and in the ledger, as it comes in,
        so a crash cannot lose it and a job spanning midnight splits its spend the same way."""
        self._roll()  # the dispatcher may not have woken since midnight
        self._charge(run.child, run)

    def _charge(self, job: Job, run: RunningChild) -> None:
        delta = self.budget.capped(to_micros(run.cost) - job.logged)
        if not delta:
            return
        job.logged += delta
        if self.store is not None:
            self.store.spend(str(self.budget.day), int(job.id), delta)
        for crossed in self.budget.charge(job.id, delta):
            self._emit(self.path, f"budget.{crossed}", "", spent=self.budget.spent / 1e6)

    def _settle(self, job: Job, run: RunningChild) -> None:
        """The run ended: whatever is left of its estimate is released."""
        self._roll()
        if run.cost:  # a run that reported no spend has nothing to charge (nor was charged)
            self._charge(job, run)
            job.cost += run.cost
        job.logged = 0
        self.budget.release(job.id)

    def run_exited(self, run: RunningChild) -> RunningChild | None:
        """A job's handler returned or raised (the owner protocol of ``RunningChild``).

        Its task runs on as an idle run (returned), which runs the next job in the next scheduler
        round, when the dispatcher would decide it: a task and a cancel scope per job cost as much
        as the rest of a short job. Not after a run with a time limit (a task's first run sets up
        the watchers; its stop cancels the scope), nor once the pool stops."""
        if run.child is None:  # an idle run that found no job: its task ends
            return None
        self._ended(run, ok=run.exit is not None and run.exit.reason == "normal")
        if run.runtime_limit is not None or self._stop_requested:
            return None
        idle = RunningChild(self, None, self.path, scope=run.scope)
        self._idle[idle] = None
        trio.lowlevel.current_task().context = self._context.copy()  # a fresh one, as a new task's
        return idle

    def _ended(self, run: RunningChild, *, ok: bool) -> None:
        """A job's run is over: it succeeded (``ok``), or it failed and is retried or buried."""
        job: Job = run.child
        del self.running[job.id]
        job.run = None
        self._settle(job, run)
        now = trio.current_time()
        if self.circuit is not None:
            entered = self.circuit.record(job.id, ok, now)
            if entered:
                self._emit(self.path, f"circuit.{entered}", "")
        if ok:
            if job.lane is not None:
                self._lane_ended(job, now, True)
            job.value = run.result
            if self._wants(logging.INFO):
                self._job_event(job, "job.finished", "normal", duration=now - run.started_mono, cost=run.cost)
            if self.store is not None:
                self.store.remove(int(job.id))
            self._finish(job, "done")
        else:
            job.error = run.error
            self._failed(job, run, now)
        self._wake.set()

    def _failed(self, job: Job, run: RunningChild, now: float) -> None:
        detail = run.exit.detail if run.exit is not None else "error"
        if isinstance(run.error, ProcessFailed):  # a process job: its message adds the stderr tail
            detail = str(run.error)
        if job.attempts < self.spec.max_attempts and not self._stopping:
            backoff = self.spec.backoff
            delay = backoff.delay(job.attempts, random.random()) if backoff is not None else 0.0
            job.state = "waiting"
            if self.store is not None:
                self.store.waiting(int(job.id))
            job.due = now + delay
            heapq.heappush(self.waiting, (job.due, next(self._retries), job))
            self.retrying += 1
            self._track(job)
            self._lane_ended(job, now, False, retry=True)
            self._job_event(job, "job.retried", "error", delay=delay, attempt=job.attempts, detail=detail)
            return
        self._lane_ended(job, now, False)
        self._bury(job, detail)
        self._job_event(job, "job.dead_lettered", "error", attempts=job.attempts, detail=detail)

    def _lane_ended(self, job: Job, now: float, ok: bool | None, *, retry: bool = False) -> None:
        """A job with a lane ended (``ok``; None: stopped): its lane counts it no longer and its
        lane's breaker hears of it; a ``retry`` of a FIFO lane stays at the head of its lane."""
        if job.lane is None:
            return
        entered = self.queue.finished(job.id, job.lane, now, ok, (job, job.due) if retry else None)
        if entered:
            self._emit(self.path, f"circuit.{entered}", "", lane=job.lane)

    def _job_event(self, job: Job, kind: str, reason: str, **details: Any) -> None:
        """An event under the job's path, if anyone wants it; it names the job's lane, if it has one."""
        if not self._wants(level_of(kind, reason)):
            return
        if job.lane is not None:
            details["lane"] = job.lane
        self._emit(f"{self.path}/{job.id}", kind, reason, **details)

    def _bury(self, job: Job, error: str) -> None:
        """Move a job to the dead letters (memory and store) and tell whoever awaits it."""
        letter = DeadLetter(
            id=job.id,
            kind=job.kind,
            payload=job.payload,
            priority=job.priority,
            estimated_cost=job.estimate / 1e6,
            attempts=job.attempts,
            error=error,
            submitted_at=job.submitted_at,
            failed_at=time.time(),
            key=job.key,
            lane=job.lane,
        )
        self._add_letter(letter)
        if self.store is not None:
            self.store.bury(int(job.id), error, time.time())
        self._finish(job, "dead")

    def _job_stopped(self, run: RunningChild) -> None:
        """A job the pool stopped (a cancel, or the pool's own stop) has exited.

        One whose handler returned (or process exited 0) before the stop reached it has
        done its work: it is finished, not put back to run again nor reported cancelled.
        """
        job: Job = run.child
        if run.returned:
            self._ended(run, ok=True)
            return
        self.running.pop(job.id, None)
        job.run = None
        self._settle(job, run)
        if self.circuit is not None:
            self.circuit.abandon(job.id)  # a stopped job says nothing about the service
        self._lane_ended(job, trio.current_time(), None)
        if job.state == "cancelled":  # job.cancel(): it is gone
            self._cancelled(job, "running")
        else:
            self._pool_stopped(job)
        self._wake.set()

    def _finish(self, job: Job, state: JobState) -> None:
        job.state = state
        job.ended_at = time.time()
        history = self.history
        history[job.id] = job
        if len(history) > HISTORY:
            history.popitem(last=False)
        if job.key is not None and self._by_key.get(job.key) is job:
            del self._by_key[job.key]
        if job._done is not None:
            job._done.set()

    def _pool_stopped(self, job: Job) -> None:
        """The pool stopped with ``job`` running, queued or waiting: a durable pool keeps it and
        runs it next time (its attempt given back); an in-memory one drops it."""
        if self.store is None:
            self._drop(job, "pool_stopped")
            return
        if job.state == "running":
            self.store.put_back(int(job.id))
        self._finish(job, "interrupted")

    def _drop(self, job: Job, reason: str, **details: Any) -> None:
        """``job`` is gone without running to its end: one ``job.dropped`` event says why, and
        whoever awaits it hears so."""
        self._job_event(job, "job.dropped", reason, job_kind=job.kind, state=job.state, **details)
        job.dropped = reason
        self._finish(job, "dropped")

    def _release_waiters(self) -> None:
        """The pool stopped: whoever awaits a queued or waiting job hears so."""
        for _, job in list(self.queue):
            self.queue.remove(job.id, job.lane)
            self._pool_stopped(job)
        for _, _, job in self.waiting:
            if job.state == "waiting":
                self._pool_stopped(job)
        self.waiting.clear()
        self.retrying = 0

    async def _stop_running(self) -> None:
        """Stop every running job at once under one ``job_shutdown`` timer (OTP's simple_one_for_one)."""
        grace = self._job_grace()
        for job in list(self.running.values()):
            if job.run is not None:
                job.run.request_stop(grace, self._job_stopped)
        while any(job.run is not None for job in self.running.values()):
            self._wake = trio.Event()
            await self._wake.wait()

    # --- reading ---------------------------------------------------------------------------

    def which_children(self) -> list[ChildInfo]:
        """Running jobs, newest first."""
        return [
            ChildInfo(
                id=job.id,
                path=f"{self.path}/{job.id}",
                kind="job",
                state="running",
                pid=job.pid,
                restarts=job.attempts - 1,
                started_at=None,
                exit=None,
                status=job.kind,
            )
            for job in reversed(self.running.values())
        ]


JOB_LOGS_KEPT = 100  # per pool: the logs of the newest jobs (by id) are kept, and of running ones


def _job_log_dir(pool: Pool, job_id: str) -> Path:
    """``<state dir>/logs/<pool path>/jobs/<job id>``, after removing the folders of the pool's
    oldest jobs (by id) beyond ``JOB_LOGS_KEPT``; a running job's folder is never removed."""
    jobs = child_log_dir(pool.processes().state_dir, pool.path) / "jobs"
    try:
        entries = [entry for entry in jobs.iterdir() if entry.name.isdigit() and entry.name != job_id]
    except FileNotFoundError:
        entries = []
    entries.sort(key=lambda entry: int(entry.name))
    removable = [entry for entry in entries if entry.name not in pool.running]
    for entry in removable[: max(0, len(entries) + 1 - JOB_LOGS_KEPT)]:
        shutil.rmtree(entry, ignore_errors=True)
    return ensure_private_dir(jobs / job_id)


class ProcessJob(msgspec.Struct, frozen=True):
    """A pool handler that runs each job as a process child (see ``otree.process_job``)."""

    template: ProcessSpec
    logs: bool = False  # each run's stdout and stderr also to <state dir>/logs/<pool path>/jobs/<id>/

    async def __call__(self, payload: Any) -> Any:
        run = current_child()
        pool = run.owner
        if not isinstance(pool, Pool):
            raise TypeError("a process_job handler runs only as a pool's job")
        log_dir = _job_log_dir(pool, run.path.rpartition("/")[2]) if self.logs else None
        return await self.execute(payload, run, pool.processes(), pool._emit, log_dir)

    async def execute(
        self,
        payload: Any,
        run: RunningChild,
        processes: ProcessContext,
        emit: Callable[..., None],
        log_dir: Path | None = None,
    ) -> Any:
        """Run the job ``run`` as a process with ``processes``' services (the pool's, or a Ray
        worker's); its result, or ``ProcessFailed``."""
        encoded = msgspec.json.encode(payload)
        out = await run_job_process(self.template, encoded, run, processes, emit, log_dir=log_dir)
        if run.stop_mode and run.proc.exit_code != 0:  # stopped (a cancel, the pool's stop): not done
            raise ProcessFailed("shutdown", "stopped before it was done")
        try:
            return msgspec.json.decode(out)
        except msgspec.DecodeError:
            return out.decode("utf-8", "replace")


def process_job(
    argv: list[str] | tuple[str, ...],
    *,
    env: dict[str, str] | None = None,
    inherit_env: bool = True,
    cwd: str | None = None,
    shutdown: ShutdownValue = 5.0,
    stop_signal: int = 15,
    stall_timeout: float | None = None,
    log_timestamps: bool = False,
    user: str | None = None,
    rlimits: dict[str, Any] | None = None,
    logs: bool = False,
) -> ProcessJob:
    """A pool handler that runs each job as a process, with every process-child guarantee.

    The payload arrives as JSON on stdin; exit 0 succeeds with stdout as the result
    (JSON if it parses, else text; at most 1 MiB); any other exit fails with the
    stderr tail; ``OTREE_COST=<usd>`` on ``$NOTIFY_SOCKET`` reports spend. ``user`` and
    ``rlimits`` as for ``otree.process``: a tool run for an agent as an unprivileged user.
    ``log_timestamps``: each line of the stderr tail starts with its UTC time.
    ``logs``: each run's whole stdout and stderr are also written to
    ``<state dir>/logs/<pool path>/jobs/<job id>/stdout.log`` and ``stderr.log`` (the
    newest ``JOB_LOGS_KEPT`` jobs of the pool keep theirs).

    Raises:
      SpecError: a field is invalid.
    """
    if not isinstance(logs, bool):
        raise SpecError("job", "logs", "must be True or False", logs)
    template = process(
        "job",
        argv,
        env=env,
        inherit_env=inherit_env,
        cwd=cwd,
        shutdown=shutdown,
        stop_signal=stop_signal,
        stall_timeout=stall_timeout,
        log_timestamps=log_timestamps,
        user=user,
        rlimits=rlimits,
    )
    return ProcessJob(template=template, logs=logs)
