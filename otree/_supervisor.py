"""The supervisor runtime: start order, the restart loop, termination.

One supervisor is one trio task (the body of its children's nursery) that
serves one ordered queue of operations: API calls, child exits and restart
retries, as OTP's gen_server serves its mailbox. The decisions are pure
functions (``_strategy``, ``_intensity``); this module only carries them out.

Children run in the supervisor's nursery with shielded cancel scopes, so
nothing but their own supervisor stops them. Stopping a list of children is a
chain: the supervisor asks the last one to stop, and each child, as it exits,
asks the one before it, so children stop strictly one at a time in reverse
start order without a round trip through the supervisor for each.

The handles user code holds are built on this runtime (``_handles``); the
runtime makes them only through the factories its tree is given, so it does
not import them.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import trio

from ._errors import (
    AlreadyPresent,
    MaxChildren,
    NotFound,
    NotRunning,
    OtreeError,
    Restarting,
    RestartIntensityExceeded,
    Running,
    Shutdown,
    StartError,
)
from ._eventlog import EventLog
from ._events import EventBus
from ._info import ChildInfo, ChildState, ExitInfo
from ._intensity import RestartWindow
from ._lifecycle import Rest, joins_group_restart, wake_action
from ._logfiles import LOG_NAME
from ._onexit import run_on_exit
from ._paths import check_state_dir, pool_database
from ._pool import Pool
from ._process import ProcessContext, ProcessRun, run_process
from ._ray import run_ray
from ._reaper import Reaper
from ._reload import plan_reload, same_settings
from ._spec import ChildSpec, PoolSpec, ProcessSpec, RaySpec, SupervisorSpec, TaskSpec, takes_task_status
from ._stopchain import StopChain
from ._strategy import affected_children
from ._task import RunningChild
from ._windowfile import load_window, save_window, window_file

__all__ = ["Handles", "Tree"]


################################################################
# Runtime records
################################################################


@dataclass(slots=True, eq=False, repr=False)
class _Child:
    """What a supervisor holds for one child spec (OTP's ``#child{}``)."""

    spec: ChildSpec
    path: str
    state: ChildState = "stopped"
    run: RunningChild | None = None
    nested: _Supervisor | None = None
    pool: Pool | None = None
    restarts: int = 0
    started_at: float | None = None
    exit: ExitInfo | None = None  # the last run's exit
    error: BaseException | None = None  # the last run's exception, if any
    consecutive: int = 0  # automatic restarts in a row, for backoff
    pending: object | None = None  # token of a scheduled retry while restarting
    rest: Rest = ""  # parked or held: stopped until something starts it (_lifecycle)


class _GiveUp(Exception):
    """Restart intensity exceeded: the supervisor stops and exits ``shutdown``."""

    def __init__(self, error: RestartIntensityExceeded) -> None:
        self.error = error


class _AutoShutdown(Exception):
    """A significant child ended the supervisor (auto_shutdown)."""


class _StartFailed(Exception):
    def __init__(self, run: RunningChild) -> None:
        self.run = run


class _Call:
    """A pending API request in a supervisor's queue and its answer."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


_Op = tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], "_Call | None"]


@contextmanager
def _flatten() -> Iterator[None]:
    """Let no ExceptionGroup out of otree's nurseries: raise the one exception that matters.

    otree's own tasks never raise, so a group here holds cancellations or one
    exception that must pass through untouched (e.g. KeyboardInterrupt).
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        stack: list[BaseException] = [group]
        while stack:
            exc = stack.pop()
            if isinstance(exc, BaseExceptionGroup):
                stack.extend(reversed(exc.exceptions))
            else:
                leaves.append(exc)
        chosen = next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
        raise chosen from chosen.__cause__


@dataclass(frozen=True, slots=True)
class Handles:
    """How the runtime makes the handle of a supervisor or pool from its ids below the root
    (what ``current_child().supervisor`` returns); ``_handles.HANDLES`` is the one there is."""

    supervisor: Callable[[Tree, tuple[str, ...]], object]
    pool: Callable[[Tree, tuple[str, ...]], object]


class Tree:
    """What the supervisors of one tree share: the event bus, process services, the root's fate."""

    def __init__(
        self, spec: SupervisorSpec, state_dir: Path, *, durable: bool, event_log: bool, handles: Handles
    ) -> None:
        self.handles = handles
        self.bus = EventBus()
        self.log: EventLog | None = None
        if event_log:
            self.log = EventLog(check_state_dir(state_dir) / LOG_NAME)
            self.log.attach(self.bus)
        self.started_at = time.time()
        self.random = random.Random()
        self.state_dir = state_dir
        self.durable = durable  # pools with durable=None keep their jobs in SQLite
        self.root = _Supervisor(spec, spec.id, self, None)
        self.ready = False
        self.settled = trio.Event()  # the root is ready, or has ended
        self.body_scope = trio.CancelScope()
        self.services_scope = trio.CancelScope()
        self.services: trio.Nursery | None = None
        self.outcome: BaseException | None = None
        self._processes: ProcessContext | None = None

    def processes(self) -> ProcessContext:
        """The process services, set up when the first process child starts."""
        if self._processes is None:
            self._processes = ProcessContext(self.state_dir)
            if Reaper.adopting and self.services is not None:
                self.services.start_soon(self._serve_reaper, self._processes.reaper)
        return self._processes

    async def _serve_reaper(self, reaper: Reaper) -> None:
        with self.services_scope:
            await reaper.serve()

    async def serve(self) -> None:
        if self.log is not None:
            # not under services_scope: it writes the events of the whole stop, then is closed
            assert self.services is not None
            self.services.start_soon(self.log.serve)
        try:
            await self.root.serve(self._root_ready)
        except (Shutdown, OtreeError) as exc:
            if not isinstance(exc, Shutdown):
                self.outcome = exc
        finally:
            self.services_scope.cancel()
            if self._processes is not None:
                self._processes.close()
            self.body_scope.cancel()
            self.bus.close()
            if self.log is not None:
                self.log.finish()
            self.settled.set()

    def root_info(self) -> ChildInfo:
        """The root's own line in a status (it has no parent to report it)."""
        root = self.root
        return ChildInfo(
            id=root.spec.id,
            path=root.path,
            kind="supervisor",
            state=root.state,
            pid=os.getpid(),
            restarts=0,
            started_at=self.started_at,
            exit=None,
            status=None,
        )

    @contextmanager
    def closing_log(self) -> Iterator[None]:
        """Write the last events (the root's ``supervisor.stopped`` included) once the tree is gone."""
        try:
            yield
        finally:
            if self.log is not None:
                self.log.close()

    def _root_ready(self) -> None:
        self.ready = True
        self.settled.set()


################################################################
# The supervisor
################################################################


class _Supervisor:
    """One running supervisor (one run of a supervisor spec)."""

    def __init__(self, spec: SupervisorSpec, path: str, tree: Tree, run: RunningChild | None) -> None:
        self.spec = spec
        self.path = path
        self.tree = tree
        self.run = run
        self.children: dict[str, _Child] = {}  # in start order
        self.window = RestartWindow(spec.max_restarts, spec.max_seconds)
        if spec.persist_intensity:
            self._window_problem(load_window(window_file(tree.state_dir, path), self.window))
        self.state: ChildState = "starting"
        self._ops: deque[_Op] = deque()
        self._parked: trio.lowlevel.Task | None = None  # the supervisor's task, waiting for an op
        self._starting: RunningChild | None = None  # a process child restarting in its own task
        self._stop_requested = False
        self._kill_at = math.inf
        self._kill_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._timers: trio.Nursery | None = None

    # --- events -------------------------------------------------------------

    def _emit(self, path: str, kind: str, reason: str = "", /, **details: Any) -> None:
        self.tree.bus.emit(path, kind, reason, details)

    # --- serving --------------------------------------------------------------

    async def serve(self, ready: Callable[[], None]) -> None:
        """Start the children, call ``ready()``, serve the queue until stopped, stop the children.

        Raises:
          StartError: a child failed to start (the started ones were stopped).
          RestartIntensityExceeded: the supervisor gave up.
          Shutdown: a significant child shut the supervisor down (auto_shutdown).
        """
        outcome: BaseException | None = None
        with _flatten():
            async with trio.open_nursery() as children:
                self._nursery = children
                try:
                    async with trio.open_nursery() as timers:
                        self._timers = timers
                        outcome = await self._serve(ready)
                        timers.cancel_scope.cancel()
                finally:
                    self.state = "stopping"
                    with trio.CancelScope(shield=True):
                        await self._stop_children(list(reversed(self.children.values())), final=True)
                    self._close(outcome)
        if outcome is not None:
            raise outcome

    async def serve_child(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve as a nested supervisor: ready once every child is ready."""
        await self.serve(task_status.started)

    async def _serve(self, ready: Callable[[], None]) -> BaseException | None:
        for spec in self.spec.children:
            child = self._add(spec)
            if not spec.autostart:
                continue  # declared, shown stopped, started by a wake
            try:
                await self._start(child)
            except _StartFailed as failed:
                return self._start_error(child, failed.run)
        self.state = "running"
        self._emit(self.path, "supervisor.started")
        ready()
        return await self._loop()

    async def _loop(self) -> BaseException | None:
        ops = self._ops
        while True:
            if self._starting is not None:  # a restart in the child's own task: its start comes first
                await self._starting.wait_ready()
                continue
            if self._stop_requested:
                break
            if not ops:
                self._parked = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._unpark_on_cancel)
                continue
            op, args, call = ops.popleft()
            try:
                result = await op(*args)
            except _GiveUp as give_up:
                return give_up.error
            except _AutoShutdown:
                self._emit(self.path, "supervisor.auto_shutdown", "shutdown")
                return Shutdown("auto_shutdown")
            except OtreeError as error:
                if call is None:
                    raise
                call.error = error
                call.done.set()
            else:
                if call is not None:
                    call.result = result
                    call.done.set()
        return None

    def _wake(self) -> None:
        """Wake the supervisor's task if it waits for an operation (a one-task ParkingLot)."""
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def _unpark_on_cancel(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    def request_stop(self, kill_at: float = math.inf) -> None:
        """Ask the supervisor to stop its children in reverse order and exit (OTP's parent exit).

        At trio time ``kill_at`` whatever still runs of its subtree is killed at once.
        """
        self._stop_requested = True
        self._kill_at = min(self._kill_at, kill_at)
        if self._kill_scope is not None:
            self._kill_scope.deadline = self._kill_at
        self._wake()

    def _close(self, outcome: BaseException | None) -> None:
        self.state = "stopped"
        self._stop_requested = True
        while self._ops:
            _, _, call = self._ops.popleft()
            if call is not None:
                call.error = NotRunning(self.path, "stopped")
                call.done.set()
        reason = "error" if isinstance(outcome, StartError) else "shutdown"
        detail = "reached max restart intensity" if isinstance(outcome, RestartIntensityExceeded) else ""
        if isinstance(outcome, Shutdown):
            detail = outcome.reason
        self._emit(self.path, "supervisor.stopped", reason, detail=detail)

    def _post(self, op: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._ops.append((op, args, None))
        self._wake()

    async def call(self, op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Queue an API operation behind everything already queued and wait for its answer."""
        if self.state != "running" or self._stop_requested:
            raise NotRunning(self.path, self.state)
        call = _Call()
        self._ops.append((op, args, call))
        self._wake()
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    # --- start ----------------------------------------------------------------

    def _add(self, spec: ChildSpec) -> _Child:
        child = _Child(spec, f"{self.path}/{spec.id}")
        self.children[spec.id] = child
        return child

    async def _start(self, child: _Child) -> None:
        """Start one child and wait until it is ready (OTP's ``do_start_child``).

        A child restarting stays ``restarting`` through the attempt: until it runs again.
        """
        assert self._nursery is not None
        spec = child.spec
        run = RunningChild(self, child, child.path, previous_exit=child.exit)
        nested = None
        pool = None
        fn: Callable[..., Awaitable[Any]]
        if isinstance(spec, TaskSpec):
            fn, args, takes_status = spec.fn, spec.args, takes_task_status(spec.fn)
        elif isinstance(spec, ProcessSpec):
            run.proc = ProcessRun()
            fn, takes_status = run_process, True
            args = (spec, self.tree.processes(), self._emit)
        elif isinstance(spec, RaySpec):
            fn, args, takes_status = run_ray, (spec, self.tree), True
        elif isinstance(spec, PoolSpec):
            durable = self.tree.durable if spec.durable is None else spec.durable
            store_path = pool_database(self.tree.state_dir, child.path) if durable else None
            ids = tuple(child.path.split("/")[1:])
            pool = Pool(
                spec,
                child.path,
                self._emit,
                wants=self.tree.bus.wants,
                store_path=store_path,
                handle=lambda: self.tree.handles.pool(self.tree, ids),
                processes=self.tree.processes,
            )
            run.on_stop = pool.request_stop
            fn, args, takes_status = pool.serve, (), True
        else:
            nested = _Supervisor(spec, child.path, self.tree, run)
            run.on_stop = nested.request_stop
            fn, args, takes_status = nested.serve_child, (), True
        if isinstance(spec, (TaskSpec, ProcessSpec)):
            if spec.max_runtime is not None:
                run.runtime_limit = (spec.max_runtime, spec.shutdown)
            if spec.idle_timeout is not None:
                run.idle_limit = (spec.idle_timeout, spec.shutdown)
        if self.spec.backoff is not None:
            run.started_mono = trio.current_time()
        child.run = run
        child.nested = nested
        child.pool = pool
        before = child.state  # "restarting" for an automatic restart, else "stopped"
        if before != "restarting":
            child.state = "starting"
        child.started_at = time.time()
        self._nursery.start_soon(run.main, fn, args, takes_status, name=child.path)
        self._emit(child.path, "child.started")
        if not takes_status:
            run.ready = True
        elif not await run.wait_ready():
            self._start_failed(child, run, before)
        if child.run is run and child.state in ("starting", "restarting"):
            child.state = "running"
        child.rest = ""
        self._emit(child.path, "child.ready")

    def _start_failed(self, child: _Child, run: RunningChild, before: ChildState) -> NoReturn:
        """``run`` ended before it was ready: the child is back as it was, with that exit."""
        self._record_failed_start(child, run, before)
        raise _StartFailed(run)

    def _record_failed_start(self, child: _Child, run: RunningChild, before: ChildState) -> None:
        child.run = None
        child.state = before
        child.exit = run.exit
        child.error = run.error
        run.publish_end(self.tree.bus, "child.start_failed")
        self._call_on_exit(child)

    def _start_error(self, child: _Child, run: RunningChild) -> StartError:
        assert run.exit is not None
        error = StartError(child.path, run.exit.detail or run.exit.reason)
        error.__cause__ = run.error
        return error

    # --- exits and restarts -----------------------------------------------------

    def handle(self) -> object:
        """A handle naming this supervisor (what ``current_child().supervisor`` returns)."""
        return self.tree.handles.supervisor(self.tree, tuple(self.path.split("/")[1:]))

    def cost_reported(self, run: RunningChild) -> None:
        """A child reported spend: a supervisor only keeps it on the run (for its exit event)."""

    def run_exited(self, run: RunningChild) -> RunningChild | None:
        """A child's run ended by itself: queue its exit (OTP's ``'EXIT'`` message); or, when the
        supervisor is idle and restarts the child alone and at once, within the intensity, and the
        child is a task ready at once or a process, without time limits, handle it now, as the
        supervisor would next, and return the next run, to run in the same task. A process's next
        run is ready once it is spawned; until then the supervisor serves nothing else, as it would
        while it started the child itself."""
        child, spec, sup = run.child, run.child.spec, self.spec
        assert run.exit is not None
        process = isinstance(spec, ProcessSpec)
        if not (
            (self._parked is not None and self._starting is None and child.run is run)  # idle, not stale
            and (sup.strategy == "one_for_one" and sup.backoff is None and not sup.persist_intensity)
            and (process or (isinstance(spec, TaskSpec) and not takes_task_status(spec.fn)))
            and (spec.max_runtime is None and spec.idle_timeout is None and not run.parked)
            and spec.restarts_after(run.exit, own_exit=process and run.proc.own_exit)
            and self.window.in_window(trio.current_time()) < sup.max_restarts
        ):
            self._post(self._child_exited, run)
            return None
        self._settle(child, run, stopped=False)
        self._count_restart(child)  # within the intensity (checked above): no give-up, no delay
        again: RunningChild = run.successor(child.exit, self._parked.context.copy(), ready=not process)
        child.run = again
        child.started_at = time.time()
        if process:
            again.proc = ProcessRun()
            again.starting = self._restarted_in_task
            self._starting = again
            self._emit(child.path, "child.started")
            return again
        self._emit(child.path, "child.started")
        child.state = "running"
        self._emit(child.path, "child.ready")
        return again

    def _restarted_in_task(self, run: RunningChild) -> None:
        """A process child restarted in its own task is ready, or ended before it was."""
        self._starting = None
        child = run.child
        if run.ready:
            if child.run is run:
                child.state = "running"
            child.rest = ""
            self._emit(child.path, "child.ready")
        elif run.stopper is not None:  # the supervisor stops it meanwhile (it was cancelled)
            run.stopper(run)
        else:
            self._record_failed_start(child, run, "restarting")
            self._retry_later(child)

    def _settle(self, child: _Child, run: RunningChild, stopped: bool) -> None:
        """Record the end of ``run``: state, exit info, event; forget a temporary child."""
        child.run = None
        child.state = "stopped"
        child.exit = run.exit
        child.error = run.error
        run.publish_end(self.tree.bus, "child.stopped" if stopped else "child.exited")
        assert run.exit is not None
        self._call_on_exit(child)
        if stopped and (run.error is not None or (run.stop_mode == "grace" and run.exit.detail == "killed")):
            run.publish_end(self.tree.bus, "child.shutdown_error")
        if child.spec.restart == "temporary" and self.children.get(child.spec.id) is child:
            del self.children[child.spec.id]

    def _call_on_exit(self, child: _Child) -> None:
        """Start the child's ``on_exit`` hook beside the children: it never delays a restart."""
        hook = child.spec.on_exit
        if hook is not None and child.exit is not None:
            assert self._nursery is not None
            name = f"{child.path} on_exit"
            self._nursery.start_soon(run_on_exit, self.tree.bus, hook, child.path, child.exit, name=name)

    async def _child_exited(self, run: RunningChild) -> None:
        child = run.child
        if child.run is not run:
            return  # a stale exit: the child was stopped or replaced meanwhile
        if run.parked:  # idle: stopped until a wake, whatever its restart type, and never counted
            assert run.idle_limit is not None
            self._settle(child, run, True)
            child.rest = "parked"
            self._emit(child.path, "child.parked", "idle", idle_timeout=run.idle_limit[0])
            return
        self._settle(child, run, stopped=False)
        assert run.exit is not None
        if child.spec.restarts_after(run.exit, own_exit=run.proc is not None and run.proc.own_exit):
            backoff = self.spec.backoff
            if backoff is not None and trio.current_time() - run.started_mono >= backoff.reset_after:
                child.consecutive = 0
            await self._restart(child)
        elif child.spec.significant:
            self._check_auto_shutdown()

    def _check_auto_shutdown(self) -> None:
        mode = self.spec.auto_shutdown
        if mode == "any_significant":
            raise _AutoShutdown
        if mode == "all_significant" and not any(
            c.spec.significant and c.state != "stopped" for c in self.children.values()
        ):
            raise _AutoShutdown

    async def _restart(self, child: _Child) -> None:
        """Count one restart, then restart ``child`` and its group by the strategy."""
        delay = self._count_restart(child)
        group = self._group(child)
        if len(group) > 1:
            await self._stop_children([self.children[i] for i in reversed(group) if i != child.spec.id])
        if delay > 0:
            assert self._timers is not None
            token = child.pending = object()
            self._timers.start_soon(self._wake_after, delay, child, token)
        else:
            await self._start_group(child)

    def _count_restart(self, child: _Child) -> float:
        """Record one restart of ``child`` (give up beyond the intensity); its backoff delay."""
        now = trio.current_time()
        within = self.window.add_restart(now)
        if self.spec.persist_intensity:
            self._window_problem(save_window(window_file(self.tree.state_dir, self.path), self.window))
        if not within:
            child.state = "stopped"
            child.pending = None
            error = RestartIntensityExceeded(
                self.path, self.spec.max_restarts, self.spec.max_seconds, child.path
            )
            error.__cause__ = child.error
            self._emit(
                self.path,
                "supervisor.intensity_exceeded",
                "shutdown",
                max_restarts=self.spec.max_restarts,
                max_seconds=self.spec.max_seconds,
                child=child.path,
            )
            raise _GiveUp(error)
        child.restarts += 1
        child.state = "restarting"
        child.pending = None
        delay = 0.0
        if self.spec.backoff is not None:
            child.consecutive += 1
            delay = self.spec.backoff.delay(child.consecutive, self.tree.random.random())
        self._emit(
            child.path,
            "child.restarting",
            "restart",
            delay=delay,
            restarts_in_window=self.window.in_window(now),
        )
        return delay

    def _window_problem(self, problem: str) -> None:
        """A restart window that could not be read or kept: counted afresh, and said so."""
        if problem:
            self._emit(self.path, "supervisor.intensity_not_persisted", "error", detail=problem)

    def _group(self, child: _Child) -> list[str]:
        if self.spec.strategy == "one_for_one":  # spare listing every id on the hot path
            return [child.spec.id]
        return affected_children(self.spec.strategy, list(self.children), child.spec.id)

    async def _start_group(self, trigger: _Child) -> None:
        """Start the group in order; a failed start marks that child restarting and queues a retry."""
        for child_id in self._group(trigger):
            child = self.children.get(child_id)
            if child is None or child.run is not None:
                continue
            if child is not trigger and not self._joins(child):
                continue  # it waits for a wake
            child.pending = None
            try:
                await self._start(child)
            except _StartFailed:
                self._retry_later(child)
                return

    def _retry_later(self, child: _Child) -> None:
        """A restart's start failed: the child stays restarting, and its retry is queued."""
        child.state = "restarting"
        token = child.pending = object()
        self._post(self._retry, child, token)

    def _joins(self, child: _Child) -> bool:
        return joins_group_restart(child.spec.restart, child.rest, ever_started=child.started_at is not None)

    async def _retry(self, child: _Child, token: object) -> None:
        if child.pending is token and child.state == "restarting":
            await self._restart(child)

    async def _wake_after(self, delay: float, child: _Child, token: object) -> None:
        await trio.sleep(delay)
        self._post(self._resume, child, token)

    async def _resume(self, child: _Child, token: object) -> None:
        if child.pending is token and child.state == "restarting":
            await self._start_group(child)

    # --- stop -----------------------------------------------------------------

    async def _stop_children(self, children: list[_Child], *, final: bool = False) -> None:
        """Stop ``children`` one at a time in the given order (OTP's ``terminate_children``).

        In the ``final`` stop, once the parent's grace for this supervisor runs out
        (``_kill_at``), the rest of the subtree is killed at once, as OTP's links do.
        """
        if not any(c.run is not None for c in children):
            return
        chain = StopChain(children, self._settle)
        chain.advance()
        if final:
            with trio.CancelScope(deadline=self._kill_at) as self._kill_scope:
                await chain.done.wait()
            self._kill_scope = None
            if not chain.done.is_set():
                chain.make_brutal()
        await chain.done.wait()

    # --- API operations (run in the supervisor's task, in queue order) -----------

    def _get(self, child_id: str) -> _Child:
        child = self.children.get(child_id)
        if child is None:
            raise NotFound(self.path, child_id, list(self.children))
        return child

    async def op_start_child(self, spec: ChildSpec) -> ChildInfo:
        existing = self.children.get(spec.id)
        if existing is not None:
            raise AlreadyPresent(existing.path, running=existing.run is not None)
        limit = self.spec.max_children
        if limit is not None and len(self.children) >= limit:
            raise MaxChildren(self.path, limit)
        child = self._add(spec)
        try:
            await self._start(child)
        except _StartFailed as failed:
            del self.children[spec.id]
            raise self._start_error(child, failed.run) from failed.run.error
        return self.info(child)

    async def op_terminate_child(self, child_id: str) -> None:
        child = self._get(child_id)
        child.pending = None
        child.rest = "held"  # stopped by hand: no wake but an operator's start undoes it
        if child.run is not None:
            await self._stop_children([child])
        elif child.state == "restarting":
            child.state = "stopped"
            if child.spec.restart == "temporary":
                del self.children[child_id]

    async def op_restart_child(self, child_id: str) -> ChildInfo:
        child = self._get(child_id)
        if child.state == "restarting":  # checked first: during a start attempt it has a run too
            raise Restarting(child.path, "restart")
        if child.run is not None:
            raise Running(child.path, "restart")
        try:
            await self._start(child)
        except _StartFailed as failed:
            raise self._start_error(child, failed.run) from failed.run.error
        return self.info(child)

    async def op_wake(self, child_id: str, manual: bool) -> tuple[ChildInfo, bool]:
        """Start the child unless it runs ("wake or spawn"); its info, and whether this started it.

        Served in the queue like every call, so concurrent wakes of one child start it once.
        ``manual``: an operator's start, which also starts a child stopped by hand.
        """
        child = self._get(child_id)
        run = child.run
        running, ending = run is not None, run is not None and run.ending
        action = wake_action(child.state, running=running, ending=ending, rest=child.rest, manual=manual)
        if action in ("none", "held"):
            if action == "held":
                self._emit(child.path, "child.wake_refused", "held")
            return self.info(child), False
        if run is not None:  # on its way out by itself: let it end, then start it again
            if run.exit is None:
                ended = trio.Event()
                run.stopper = lambda _: ended.set()  # its exit comes here, not through the queue
                await ended.wait()
            self._settle(child, run, run.parked)
            self._get(child_id)  # NotFound if it was temporary: its spec went with its exit
            child.rest = "parked" if run.parked else ""
        was = child.rest or ("not_started" if child.started_at is None else "exited")
        self._emit(child.path, "child.woken", was, by="wake")
        try:
            await self._start(child)
        except _StartFailed as failed:
            raise self._start_error(child, failed.run) from failed.run.error
        return self.info(child), True

    async def op_delete_child(self, child_id: str) -> None:
        child = self._get(child_id)
        if child.state == "restarting":
            raise Restarting(child.path, "delete")
        if child.run is not None:
            raise Running(child.path, "delete")
        del self.children[child_id]

    async def op_reload(self, spec: SupervisorSpec) -> dict[str, list[str]]:
        """Apply a reloaded spec in place (DESIGN §10 "Reload"); the restart window is kept.

        Removed children stop in reverse order; changed ones stop and start again
        in place (one stopped by hand stays stopped, with the new spec); new ones
        start in order; supervisors and pools keep running, their settings
        applied in place and their children compared in turn.
        """
        plan = plan_reload([child.spec for child in self.children.values()], spec.children)
        summary: dict[str, list[str]] = {"changed": [], "removed": [], "added": [], "failed": []}
        # a group restart waiting out its backoff for a child the reload replaces would never
        # resume: its siblings, already stopped by the strategy, are started by the reload
        stranded = {
            sibling
            for child_id in [*plan.removed, *plan.changed]
            if self.children[child_id].state == "restarting"
            for sibling in self._group(self.children[child_id])
            if sibling != child_id
        }
        if not same_settings(self.spec, spec):
            summary["changed"].append(self.path)  # its own settings (strategy, intensity, ...)
        self.spec = spec
        self.window.max_restarts = spec.max_restarts
        self.window.max_seconds = spec.max_seconds
        removed = [self.children[child_id] for child_id in plan.removed]
        changed = [self.children[child_id] for child_id in reversed(plan.changed)]
        restart = {c.spec.id for c in changed if c.run is not None or c.state == "restarting"}
        for child in removed + changed:
            child.pending = None  # a restarting child stops retrying
            if child.run is None:
                child.state = "stopped"
        await self._stop_children(removed + changed)
        summary["removed"].extend(child.path for child in removed)
        summary["changed"].extend(child.path for child in reversed(changed))
        previous = {child.spec.id: child for child in removed + changed} | self.children
        self.children = {}
        for child_spec in spec.children:
            child = previous.get(child_spec.id) or _Child(child_spec, f"{self.path}/{child_spec.id}")
            child.spec = child_spec
            self.children[child_spec.id] = child
        for child_id in plan.order:
            child = self.children[child_id]
            if child_id in plan.added:
                summary["added"].append(child.path)  # autostart=False: added, started by a wake
            if child_id in plan.nested:
                await self._reload_nested(child, summary)
            elif (
                child_id in restart
                or (child_id in plan.added and child.spec.autostart)
                or (child_id in stranded and child.run is None and self._joins(child))
            ):
                try:
                    await self._start(child)
                except _StartFailed as failed:
                    summary["failed"].append(str(self._start_error(child, failed.run)))
        self._emit(self.path, "supervisor.reloaded", "reload", **{k: v for k, v in summary.items() if v})
        return summary

    async def _reload_nested(self, child: _Child, summary: dict[str, list[str]]) -> None:
        spec = child.spec
        try:
            if isinstance(spec, SupervisorSpec) and child.nested is not None and child.run is not None:
                nested: dict[str, list[str]] = await child.nested.call(child.nested.op_reload, spec)
                for key, paths in nested.items():
                    summary[key].extend(paths)
            elif isinstance(spec, PoolSpec) and child.pool is not None and child.run is not None:
                child.pool.reconfigure(spec)
                summary["changed"].append(child.path)
        except (OtreeError, ValueError) as error:
            summary["failed"].append(f"{child.path}: {error}")

    # --- reading state ------------------------------------------------------------

    def info(self, child: _Child) -> ChildInfo:
        run = child.run
        pid = status = node = None
        if run is not None:
            if run.proc is not None:
                pid, status = run.proc.pid, run.proc.status
            elif run.remote is not None:  # a Ray child: where it runs, as its actor last said
                pid, node, status = run.remote.where()
        return ChildInfo(
            id=child.spec.id,
            path=child.path,
            kind=child.spec.kind,
            state=child.state,
            pid=pid,
            restarts=child.restarts,
            started_at=child.started_at,
            exit=child.exit,
            status=status,
            node=node,
        )
