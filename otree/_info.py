"""What otree reports: children, events, dead letters, status snapshots. Plain, frozen Structs.

Kept free of trio and the runtime, so the ``otree`` client commands can decode
and print them without importing the tree's machinery.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ._strategy import ExitReason

__all__ = [
    "ChildInfo",
    "ChildState",
    "Counts",
    "DeadLetter",
    "Event",
    "ExitInfo",
    "JobInfo",
    "Jobs",
    "PoolStatus",
    "Status",
    "StatusNode",
]

ChildState = Literal["starting", "running", "restarting", "stopping", "stopped"]


class ExitInfo(msgspec.Struct, frozen=True):
    """How a child's last run ended.

    Attributes:
      reason: ``normal`` (returned / exit 0), ``shutdown`` (stopped by its
        supervisor, or raised ``otree.Shutdown``) or ``error``.
      detail: the exception as ``Type: message``, ``killed`` when a stop ran
        out of grace, the ``Shutdown`` reason, or empty.
      exit_code, signal: for process children; None for tasks.
    """

    reason: ExitReason
    detail: str = ""
    exit_code: int | None = None
    signal: int | None = None


class ChildInfo(msgspec.Struct, frozen=True):
    """One child as ``which_children`` reports it.

    ``restarts`` counts automatic restarts only; ``started_at`` is the
    wall-clock time of the last start (None if never started). ``node`` is the
    address of the Ray node a child runs on (``otree.ray`` children and what runs
    inside them; then ``pid`` is a process on that node), None for a local child.
    """

    id: str
    path: str
    kind: str
    state: ChildState
    pid: int | None
    restarts: int
    started_at: float | None
    exit: ExitInfo | None
    status: str | None
    node: str | None = None


class Counts(msgspec.Struct, frozen=True):
    """OTP's ``count_children``: specs held, children running, and specs by type."""

    specs: int
    active: int
    supervisors: int
    workers: int


class Event(msgspec.Struct, frozen=True, gc=False):
    """One decision of the tree.

    Attributes:
      time: wall-clock ``time.time()`` of the decision.
      path: the child concerned (a supervisor's own path for supervisor events).
      kind: dotted kind, e.g. ``child.exited`` or ``supervisor.intensity_exceeded``.
      reason: the exit reason or a short word.
      details: plain values (exception, delay, restarts in window, ...).
    """

    time: float
    path: str
    kind: str
    reason: str = ""
    details: dict[str, Any] = {}


class DeadLetter(msgspec.Struct, frozen=True):
    """A job that used all its attempts: its last error, attempts and times."""

    id: str
    kind: str
    payload: Any
    priority: int
    estimated_cost: float
    attempts: int
    error: str
    submitted_at: float
    failed_at: float
    key: Any = None  # the job's idempotency key (``refuse_dead_keys`` refuses it while the letter stays)
    lane: str | None = None  # the job's lane (``requeue`` queues it in that lane again)


class PoolStatus(msgspec.Struct, frozen=True):
    """A pool's queue, concurrency, budget and circuit; ``held`` says what keeps the job at the
    head of the queue from starting (the budget or the circuit), None when nothing does."""

    queued: int
    retrying: int
    running: int
    max_concurrency: int
    max_queue: int
    dead_letters: int
    daily_budget: float | None
    spent_today: float
    reserved: float
    circuit: str | None
    held: str | None = None
    lanes: int = 0  # lanes known: with jobs, or a lane breaker that remembers failures
    lanes_held: int = 0  # lanes whose own state (full, circuit, a FIFO retry) holds their queued jobs


class LaneStatus(msgspec.Struct, frozen=True):
    """One lane of a pool (``pool.lane(name)``): its queued and running jobs, its own circuit
    breaker's state (None without ``lane_circuit_breaker``) and what holds it, None if nothing."""

    lane: str
    queued: int
    running: int
    circuit: str | None
    held: str | None = None


class StatusNode(msgspec.Struct, frozen=True):
    """One child and, for a supervisor or pool, what is below it (children in start order)."""

    info: ChildInfo
    restarts_in_window: int | None = None  # a supervisor's restart window, now
    max_restarts: int | None = None
    max_seconds: float | None = None
    children: list[StatusNode] = []
    pool: PoolStatus | None = None


class Status(msgspec.Struct, frozen=True):
    """A snapshot of a (sub)tree at wall-clock ``now``; ``output_lost`` (the whole tree's status
    under ``otree run`` only) counts the writes to its own stdout/stderr that were dropped."""

    now: float
    root: StatusNode
    output_lost: dict[str, int] = {}


class JobInfo(msgspec.Struct, frozen=True):
    """One job of a listing; ``held`` is set on the head job when the budget or the circuit holds it,
    ``pid`` on a running process job. ``otree job`` adds how it ended: ``result`` (a job that is
    ``done``) or ``error`` (why it is dead, cancelled, dropped or interrupted)."""

    id: str
    kind: str
    state: str
    priority: int
    attempts: int
    estimated_cost: float
    cost: float
    submitted_at: float
    held: str | None = None
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    result: Any = None
    error: str | None = None
    lane: str | None = None


class Jobs(msgspec.Struct, frozen=True):
    """A pool's running jobs (oldest first) and waiting ones (in the order they would start)."""

    running: list[JobInfo]
    queued: list[JobInfo]
    retrying: list[JobInfo]
