"""One run of a child as a trio task: readiness, exit classification, the stop request.

A child's cancel scope is shielded, so only its own supervisor ever cancels it:
a cancellation from outside the tree reaches the supervisor, which then stops
its children one at a time in reverse order.

Stopping follows OTP's split between processes that trap exits and those that
do not. A task that has looked at ``current_child().stopping`` is trapping: it
is asked to stop (the event is set) and cancelled only when its ``shutdown``
grace runs out. A task that never looked cannot hear the request, so it is
cancelled at once, as an Erlang process that does not trap exits dies at once
on ``exit(Pid, shutdown)``.
"""

from __future__ import annotations

import contextvars
import functools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from ._appevents import app_event
from ._errors import RestartIntensityExceeded, Shutdown
from ._events import EventBus, level_of
from ._info import Event, ExitInfo
from ._strategy import ExitReason

__all__ = ["Active", "RunningChild", "TimeLimitExceeded", "current_child", "describe", "wait_quiet"]


class TimeLimitExceeded(TimeoutError):
    """A run was stopped for running too long: its exit is an ``error`` with ``exit_detail``
    (``max_runtime``); whatever the run raised while it stopped is chained."""

    def __init__(self, exit_detail: str, message: str) -> None:
        self.exit_detail = exit_detail
        super().__init__(message)


class Active(Protocol):
    """Something that shows signs of life: a task's run (``alive()``), a process's run (output,
    ``WATCHDOG=1``). ``last_activity`` is the trio time of the last one."""

    last_activity: float


async def wait_quiet(source: Active, seconds: float) -> None:
    """Return once ``source`` has shown no sign of life for ``seconds`` (the stall watchdog's
    clock, and ``idle_timeout``'s)."""
    while (left := source.last_activity + seconds - trio.current_time()) > 0:
        await trio.sleep(left)


class _Owner(Protocol):
    def handle(self) -> Any: ...

    def cost_reported(self, run: RunningChild) -> None: ...

    def _emit(self, path: str, kind: str, reason: str = "", /, **details: Any) -> None: ...

    def run_exited(self, run: RunningChild) -> RunningChild | None: ...


def current_child() -> RunningChild:
    """The child run the calling task belongs to (inside a task child and its own tasks).

    Raises:
      RuntimeError: called outside a child of an otree supervisor.
    """
    try:
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
    except RuntimeError:
        task = None
    # Found through the task tree rather than a ContextVar: setting a ContextVar in
    # every child costs about as much as the rest of its start. A child's task runs
    # RunningChild.main, whose frame holds the current run (``run``: a child restarted
    # in its own task has a new one); tasks the child spawned in its own nurseries find
    # it through their parents.
    while task is not None:
        coro = task.coro
        if getattr(coro, "cr_code", None) is _MAIN_CODE and coro.cr_frame is not None:
            run: RunningChild | None = coro.cr_frame.f_locals["run"]
            if run is not None:
                return run
        nursery = task.parent_nursery
        task = nursery.parent_task if nursery is not None else None
    raise RuntimeError("otree.current_child() called outside an otree task child")


def describe(exc: BaseException) -> str:
    """``Type: message`` (or just ``Type``) for exit details and events."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RunningChild:
    """One run of a child; inside a task child, ``otree.current_child()`` returns it.

    Attributes:
      path: the child's path in the tree, e.g. ``"fleet/alice"``.
      cost: spend reported by this run through ``report_cost``.
      previous_exit: how the child's previous run ended (an ``ExitInfo``), None on its
        first run: the "resume or start fresh" decision.
    """

    __slots__ = (
        "_ready_waiter",
        "_stopping",
        "_trapping",
        "child",
        "cost",
        "error",
        "exit",
        "fault",
        "idle_limit",
        "last_activity",
        "on_stop",
        "owner",
        "parked",
        "path",
        "previous_exit",
        "proc",
        "ready",
        "remote",
        "result",
        "returned",
        "runtime_limit",
        "scope",
        "started_mono",
        "starting",
        "stop_mode",
        "stopper",
    )

    def __init__(
        self,
        owner: _Owner,
        child: Any,
        path: str,
        *,
        previous_exit: ExitInfo | None = None,
        scope: trio.CancelScope | None = None,
    ) -> None:
        self.owner = owner
        self.child = child
        self.path = path
        # a run restarted in its predecessor's task shares its scope (never cancelled: see main)
        self.scope = trio.CancelScope(shield=True) if scope is None else scope
        self.ready = False
        self._ready_waiter: trio.Event | None = None
        self._stopping: trio.Event | None = None
        self._trapping = False
        # How a stop was asked for: "" (not asked), "cancel", "grace" or "brutal".
        self.stop_mode = ""
        # Called once this run, asked to stop, has exited (a supervisor's stop chain).
        self.stopper: Callable[[RunningChild], None] | None = None
        # Set for a nested supervisor: how to ask it to stop its subtree by a deadline.
        self.on_stop: Callable[[float], None] | None = None
        self.exit: ExitInfo | None = None
        self.error: BaseException | None = None
        self.cost = 0.0
        self.proc: Any = None  # a process child's ProcessRun (pid, status, stderr tail)
        self.remote: Any = None  # a Ray child's running actor (_ray.RemoteRun), once it is ready
        self.result: Any = None  # what the function returned (a pool job's result)
        self.returned = False  # the function returned (so ``result`` is its value), even under a stop
        self.started_mono = 0.0  # trio time of the start, set where backoff needs it
        # max_runtime: seconds this run may last and the grace of the stop past them
        self.runtime_limit: tuple[float, float | str] | None = None
        self.fault: TimeLimitExceeded | None = None  # why it was stopped as misbehaving (an error exit)
        # idle_timeout: seconds without a sign of life before it is parked, and the grace of that stop
        self.idle_limit: tuple[float, float | str] | None = None
        self.last_activity = 0.0  # trio time of a task's last sign of life (a process's is on its proc)
        self.parked = False  # stopped for idleness: its supervisor parks it instead of restarting it
        # how the child's last run ended (None on its first run): resume, or start fresh
        self.previous_exit = previous_exit
        # a run restarted in its predecessor's task that is not ready at once (a process): told to
        # its supervisor when it is ready, or when it ends before it was
        self.starting: Callable[[RunningChild], None] | None = None

    # --- what a child sees -------------------------------------------------

    @property
    def stopping(self) -> trio.Event:
        """Set when the supervisor begins to stop this child.

        Looking at it makes the child trapping: from then on a stop waits up to
        its ``shutdown`` grace for it to return before cancelling it.
        """
        self._trapping = True
        if self._stopping is None:
            self._stopping = trio.Event()
            if self.stop_mode:
                self._stopping.set()
        return self._stopping

    @property
    def supervisor(self) -> Any:
        """The handle of what this child belongs to: its supervisor (a ``SupervisorHandle``), or,
        for a pool job, its pool (a ``PoolHandle``). A child reaches its siblings through it."""
        return self.owner.handle()

    def report_cost(self, usd: float) -> None:
        """Add ``usd`` to this run's spend (reported in its exit event)."""
        if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 <= usd < math.inf:
            raise ValueError(f"report_cost needs a finite number of USD >= 0; got {usd!r}")
        self.cost += usd
        self.owner.cost_reported(self)

    def emit(self, kind: str, /, reason: str = "", **details: Any) -> None:
        """Publish an application event with this child's path (subscribers, event log, ``otree events``).

        ``kind`` is ``app.`` then dot-separated words of ``[a-z0-9_]`` (``"app.decision"``);
        ``reason`` a short word; ``details`` plain JSON values (at most 4 KiB encoded).

        Raises:
          ValueError: a bad kind, reason or detail (the message names this child and what is wrong).
        """
        try:
            kind, reason, checked = app_event(kind, reason, details)
        except ValueError as error:
            raise ValueError(f"{self.path}: emit: {error}") from None
        self.owner._emit(self.path, kind, reason, **checked)

    def alive(self) -> None:
        """A sign of life: the child is busy even if it says nothing. Resets the clock of its
        ``idle_timeout`` (a process child's output and ``WATCHDOG=1`` do the same)."""
        self.last_activity = trio.current_time()

    def started(self, value: object = None) -> None:
        """``task_status.started()``: the child is ready; the supervisor starts the next one."""
        if self.ready:
            raise RuntimeError("called 'started' twice on the same task status")
        self.ready = True
        if self._ready_waiter is not None:
            self._ready_waiter.set()
        if self.starting is not None:
            self.starting(self)

    # --- what the supervisor does ------------------------------------------

    def successor(
        self, previous_exit: ExitInfo | None, context: contextvars.Context, *, ready: bool = True
    ) -> RunningChild:
        """The child's next run, to run in this run's task (its supervisor restarts it there),
        ``ready`` at once or not: it shares this run's scope and runs in ``context`` (call from
        this task)."""
        trio.lowlevel.current_task().context = context
        run = RunningChild(self.owner, self.child, self.path, previous_exit=previous_exit, scope=self.scope)
        run.ready = ready
        return run

    async def wait_ready(self) -> bool:
        """Wait until the child is ready (True) or has exited without being ready (False)."""
        if not self.ready and self.exit is None:
            if self._ready_waiter is None:
                self._ready_waiter = trio.Event()
            await self._ready_waiter.wait()
        return self.ready

    @property
    def ending(self) -> bool:
        """Whether this run is on its way out by itself: it has exited (its exit is queued for its
        supervisor), or is being stopped for idleness or for running too long."""
        return self.exit is not None or (bool(self.stop_mode) and self.stopper is None)

    def request_stop(self, shutdown: float | str, stopper: Callable[[RunningChild], None]) -> None:
        """Begin to stop this run; ``stopper(run)`` is called once it has exited.

        May be called again to make a stop brutal (``shutdown="brutal_kill"``).
        """
        self.stopper = stopper
        self._stop(shutdown)

    def fail_stop(self, fault: TimeLimitExceeded, shutdown: float | str) -> None:
        """Stop this run because it misbehaved (it ran past ``max_runtime``): a stop like any other
        (its grace, or at once for a task that never looked at ``stopping``), but it ends as an
        ``error`` exit with ``fault``'s detail and is reported as the run's own exit, so the usual
        restart (or retry) rules apply. A stop already in progress is left alone."""
        if self.stop_mode:
            return
        self.fault = fault
        self._stop(shutdown)

    def park(self, shutdown: float | str) -> None:
        """Stop this run because it has been idle for its ``idle_timeout``: a stop like any other,
        ending as a ``shutdown`` exit with detail ``idle`` that its supervisor parks (not restarted,
        not counted) until a wake. A stop already in progress is left alone."""
        if self.stop_mode:
            return
        self.parked = True
        self._stop(shutdown)

    def _stop(self, shutdown: float | str) -> None:
        if shutdown == "brutal_kill":
            kill_at = -math.inf
        elif shutdown == "infinity":
            kill_at = math.inf
        else:
            kill_at = trio.current_time() + float(shutdown)
        if self.on_stop is not None:
            # A nested supervisor stops its subtree in order and goes brutal itself at
            # kill_at; its scope deadline then reports the run as killed.
            self.stop_mode = "grace"
            self.on_stop(kill_at)
        elif kill_at == -math.inf:
            self.stop_mode = "brutal"
        elif not self._trapping:
            self.stop_mode = "cancel"
            kill_at = -math.inf
        else:
            self.stop_mode = "grace"
            self.stopping.set()
        if kill_at == -math.inf:
            self.scope.cancel()  # at once: a past deadline would be registered, then expired
        else:
            self.scope.deadline = min(self.scope.deadline, kill_at)

    async def main(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], takes_status: bool
    ) -> None:
        """Run the child's function and report how it ended to the supervisor; run it again in
        this task, as the next run, when the supervisor restarts it here (``run_exited`` returns
        that run) instead of in a new task.

        The runs share one cancel scope: only a stop cancels it, and a stopped run is never
        restarted here, so the scope is never cancelled under a later run.
        """
        if self.runtime_limit is not None or self.idle_limit is not None:
            fn = functools.partial(self._watched, fn)
        run: RunningChild | None = self
        with self.scope:
            while run is not None:
                try:
                    if takes_status:
                        run.result = await fn(*args, task_status=run)
                    else:
                        run.result = await fn(*args)
                    run.returned = True
                except Exception as exc:  # noqa: BLE001 - a child's exception is its exit reason
                    run.error = exc
                run = run._ended()
                if run is not None:  # the next run starts in a later scheduler round, as a new task would
                    await trio.lowlevel.cancel_shielded_checkpoint()
        if run is not None:  # a stop cancelled it
            run._ended()

    def _ended(self) -> RunningChild | None:
        """Classify this run's end and report it; the next run when it restarts in this task."""
        if self.fault is not None:
            self.fault.__cause__ = self.error
            self.error = self.fault
        self.exit = self._classify(self.returned)
        if self.starting is not None and not self.ready:  # restarted in this task, never ready
            if self._ready_waiter is not None:
                self._ready_waiter.set()
            self.starting(self)
        elif self._ready_waiter is not None and not self.ready:
            self._ready_waiter.set()  # a failed start: the waiting supervisor handles it
            if self.stopper is not None:  # unless the supervisor is stopping it meanwhile
                self.stopper(self)
        elif self.stopper is not None:
            self.stopper(self)
        else:
            return self.owner.run_exited(self)
        return None

    async def _watched(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """``await fn(...)`` under its time limits: stopped as misbehaving once it has run
        ``runtime_limit`` seconds, parked once it has been idle ``idle_limit`` seconds."""
        result: Any = None
        error: Exception | None = None
        async with trio.open_nursery() as watchers:
            if self.runtime_limit is not None:
                watchers.start_soon(self._stop_at_limit)
            if self.idle_limit is not None:
                watchers.start_soon(self._park_when_idle)
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - raised below, outside the nursery (no group)
                error = exc
            watchers.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    async def _stop_at_limit(self) -> None:
        assert self.runtime_limit is not None
        seconds, grace = self.runtime_limit
        await trio.sleep(seconds)
        self.fail_stop(
            TimeLimitExceeded("max_runtime", f"max_runtime: still running after {seconds:g}s"), grace
        )

    def publish_end(self, bus: EventBus, kind: str) -> None:
        """Publish how this run ended as a ``kind`` event, if anyone wants it (its exception
        goes to the log record)."""
        exit_info = self.exit
        assert exit_info is not None
        level = level_of(kind, exit_info.reason)
        if bus.wants(level):
            event = Event(time.time(), self.path, kind, exit_info.reason, self.exit_details())
            bus.publish(event, level, self.error)

    def exit_details(self) -> dict[str, Any]:
        """How this run ended, as an exit event's details: its detail, exception, spend, and
        for a process its exit code or signal and, after an error, the tail of its stderr."""
        exit_info = self.exit
        assert exit_info is not None
        details: dict[str, Any] = {"detail": exit_info.detail}
        error = self.error
        if error is not None:
            details["exception"] = type(error).__name__
            details["message"] = str(error)
        if self.cost:
            details["cost"] = self.cost
        if self.proc is not None:
            if exit_info.exit_code is not None:
                details["exit_code"] = exit_info.exit_code
            if exit_info.signal is not None:
                details["signal"] = exit_info.signal
            if exit_info.reason == "error" and self.proc.tail:
                details["stderr_tail"] = self.proc.tail.decode("utf-8", "replace")
        return details

    async def _park_when_idle(self) -> None:
        """Park this run once it has shown no sign of life for ``idle_limit`` seconds since it was
        ready (a slow start is ``start_timeout``'s business): a process's signs are on its proc."""
        assert self.idle_limit is not None
        seconds, grace = self.idle_limit
        if not await self.wait_ready():
            return
        source: Active = self.proc if self.proc is not None else self
        source.last_activity = trio.current_time()
        await wait_quiet(source, seconds)
        self.park(grace)

    def _classify(self, returned: bool) -> ExitInfo:
        reason, detail = self._reason(returned)
        proc = self.proc
        if proc is None:
            return ExitInfo(reason, detail)
        return ExitInfo(reason, detail, proc.exit_code, proc.signal)

    def _reason(self, returned: bool) -> tuple[ExitReason, str]:
        if self.parked:  # however it went (an exception while stopping is still its event's)
            return "shutdown", "idle"
        exc = self.error
        if exc is None:
            if returned:
                if not self.stop_mode:
                    return "normal", ""
                # A nested supervisor returns even when its grace ran out (it killed its subtree).
                killed = self.stop_mode != "cancel" and self.scope.cancel_called
                return "shutdown", "killed" if killed else ""
            if self.stop_mode == "cancel":
                return "shutdown", ""
            if self.stop_mode:
                return "shutdown", "killed"
            return "error", "cancelled"
        if isinstance(exc, TimeLimitExceeded) and exc is self.fault:
            return "error", exc.exit_detail
        if isinstance(exc, Shutdown):
            return "shutdown", exc.reason
        if isinstance(exc, RestartIntensityExceeded) and self.on_stop is not None:
            return "shutdown", "reached max restart intensity"
        detail = getattr(exc, "exit_detail", None) or describe(exc)
        if self.stop_mode:
            return "shutdown", f"error while stopping: {detail}"
        return "error", detail


_MAIN_CODE = RunningChild.main.__code__
