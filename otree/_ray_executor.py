"""Pool jobs on Ray: ``otree.RayExecutor`` runs each job of a pool as a Ray task.

The pool stays local and decides everything: queue, priorities, lanes, ``max_concurrency``,
the budget gate, retries, dead letters, the circuit breaker. Only the job's body moves: the
local run of a job submits one task and holds its slot until the task has ended, so at most
``max_concurrency`` jobs are ever inside Ray, and priority order and the cap hold however many
nodes there are. Ray never retries (``max_retries=0``): a job lost with its worker or node is
an ``error`` that otree retries by its own ``max_attempts``, through the budget gate again.

On the node the handler runs under otree's runtime, in a trio loop each worker process keeps
for its jobs: ``current_child()``, ``report_cost``, ``emit`` and ``stopping`` work as in a local
job, and a ``process_job`` is a real process child there (own group, killed as a group when the
job ends or is stopped). What a job spent and emitted comes back with its outcome, once.

A stop (cancel, ``max_runtime``, the pool's stop) is a graceful ``ray.cancel``, which the task
turns into a stop of the remote run under the pool's ``job_shutdown``; once the local grace runs
out, ``ray.cancel(force=True)`` kills the worker. A job whose outcome never came back (its worker
or node died, it was killed) has an unknown cost: it is charged its full estimate.
"""

from __future__ import annotations

import functools
import math
import pickle
import signal
import threading
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

from ._errors import Shutdown, SpecError
from ._process import ProcessContext
from ._ray import _SESSION, RemoteError, _one_line, _send_tree_files_by_value, aref, check_options, import_ray
from ._spec import ShutdownValue
from ._task import RunningChild, current_child, describe

__all__ = ["RayExecutor"]

Handler = Callable[..., Awaitable[Any]]
# What a remote run sends back: how it ended ("ok", "error" or "stopped"), its value (the result,
# the exception, or the stop's detail), what it spent, and its events as (path, kind, reason, details).
Outcome = tuple[str, Any, float, list[tuple[str, str, str, dict[str, Any]]]]
# What a job's task is given (one argument: Ray serializes each one apart): its payload, its path
# (of its events) and the grace of a stop.
JobArgs = tuple[Any, str, ShutdownValue]

_KILLED_SECONDS = 5.0  # for a force-cancelled task to be out of Ray before its slot is given back
_SIGNAL_POLL = 0.05  # how often the task's thread looks for Ray's cancel (a signal handler runs then)


class RayExecutor:
    """Runs each job of a pool as a Ray task: ``otree.pool(..., executor=otree.RayExecutor(...))``.

    ``ray_options`` are Ray task options, passed through (``num_cpus``, ``num_gpus``,
    ``resources``, ``memory``, ``scheduling_strategy``, ``runtime_env``...), checked when the
    pool spec is built. ``max_retries`` is forced to 0 and ``retry_exceptions`` to False.

    Raises:
      SpecError: Ray is not installed.
    """

    __slots__ = ("_remotes", "options")

    def __init__(self, **ray_options: Any) -> None:
        import_ray("RayExecutor")
        self.options = ray_options
        self._remotes: dict[int, tuple[Handler, Handler]] = {}  # id(handler) -> (handler, its body)

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"otree.RayExecutor({options})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RayExecutor) and other.options == self.options

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.options)))

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial(RayExecutor, **self.options), ()

    def check(self, path: str, handlers: dict[str, Handler]) -> None:
        """Refuse an option Ray does not know or that would let it retry, a handler that cannot
        travel to a node, and a ``process_job`` with ``logs=True`` (its logs would be on the node)."""
        from ._pool import ProcessJob  # not at import: _pool -> _spec -> here

        check_options(path, self.options, "task")
        ray = import_ray(path)
        for kind, handler in handlers.items():
            if isinstance(handler, ProcessJob) and handler.logs:
                raise SpecError(path, f"handlers[{kind!r}]", "cannot keep logs on Ray (logs=True)", handler)
            try:
                ray.cloudpickle.dumps(handler)
            except Exception as error:  # noqa: BLE001 - whatever pickling raises, it cannot travel
                raise SpecError(
                    path, f"handlers[{kind!r}]", "must be picklable to run on a Ray node", _one_line(error)
                ) from None

    def check_payload(self, path: str, kind: str, payload: Any) -> None:
        """Refuse a payload that cannot be pickled to a node, at submit, in one line.

        Raises:
          ValueError: naming the pool and the job's kind.
        """
        try:
            import_ray(path).cloudpickle.dumps(payload)
        except Exception as error:  # noqa: BLE001 - whatever pickling raises, it cannot travel
            raise ValueError(
                f"{path}: payload of a {kind!r} job cannot be pickled to run on Ray: {_one_line(error)}"
            ) from None

    def body(self, handler: Handler) -> Handler:
        """The local body of a job of ``handler``: one Ray task, awaited (made once per handler)."""
        known = self._remotes.get(id(handler))
        if known is not None and known[0] is handler:
            return known[1]
        ray = import_ray("RayExecutor")
        _SESSION.connect(ray)
        _send_tree_files_by_value(ray)
        remote = ray.remote(**self.options, max_retries=0, retry_exceptions=False)(_task_of(handler))
        run = functools.partial(_run_job, ray, remote)
        self._remotes[id(handler)] = (handler, run)
        return run


def _task_of(handler: Handler) -> Callable[[JobArgs], Outcome]:
    """The Ray task of ``handler``'s jobs: the handler travels with it, once per worker (not with
    every job), and the task is named after it."""

    def job(args: JobArgs) -> Outcome:
        return _task(handler, args)  # a module function: the closure travels without this module's state

    job.__name__ = job.__qualname__ = getattr(handler, "__qualname__", type(handler).__name__)
    return job


# --- the local side: one job's run ------------------------------------------------------------


async def _run_job(ray: Any, remote: Any, payload: Any) -> Any:
    """Submit the job's task and wait for its outcome; a stop cancels the task (gracefully, then
    by force when the grace runs out). Ends as the remote run ended: returns its result, raises
    its error, or a ``Shutdown`` for a remote run that was stopped before it was done."""
    me = current_child()
    pool: Any = me.owner  # a Pool
    task = _Task(ray, remote.remote((payload, me.path, pool.spec.job_shutdown)))
    # a stop comes to the task first; the run is cancelled only when its grace runs out
    me.on_stop = task.stop
    try:
        outcome: Outcome = await aref(task.ref)
    except ray.exceptions.RayError as error:
        _charge_estimate(me)
        raise RemoteError(_one_line(getattr(error, "cause", None) or error)) from error
    except trio.Cancelled:  # the grace ran out, or a brutal stop
        ray.cancel(task.ref, force=True)  # kills its worker: whatever the task does, it stops now
        deadline = trio.current_time() + _KILLED_SECONDS
        with trio.CancelScope(shield=True, deadline=deadline), suppress(ray.exceptions.RayError):
            await aref(task.ref)  # out of Ray before the pool gives its slot to another job
        _charge_estimate(me)
        raise
    how, value, cost, events = outcome
    for path, kind, reason, details in events:
        pool._emit(path, kind, reason, **details)
    if cost:
        me.report_cost(cost)
    if how == "ok":
        return value
    if how == "error":
        raise value
    raise Shutdown(value)


def _charge_estimate(me: RunningChild) -> None:
    """The job's outcome never came back: its spend is unknown, so it is the most it was allowed."""
    estimate = me.child.estimate
    if estimate:
        me.report_cost(estimate / 1e6)


class _Task:
    """A job's Ray task, and the stop its run passes on to it."""

    __slots__ = ("asked", "ray", "ref")

    def __init__(self, ray: Any, ref: Any) -> None:
        self.ray = ray
        self.ref = ref
        self.asked = False

    def stop(self, kill_at: float) -> None:
        """The run is asked to stop by ``kill_at`` (its scope is cancelled then): the remote run
        is stopped in order (Ray interrupts the task, which stops it under the pool's grace)."""
        if not self.asked and kill_at != -math.inf:
            self.asked = True
            self.ray.cancel(self.ref)


# --- the remote side: in a Ray worker ---------------------------------------------------------


def _task(handler: Handler, args: JobArgs) -> Outcome:
    """A job's Ray task, in a worker: the job run in the worker's loop."""
    return _WORKER.run(_RemoteJob(handler, *args))


class _RemoteJob:
    """One job run in a worker: the owner of its ``RunningChild`` (spend and events kept for the
    outcome, no pool handle), and the stop that Ray's cancel asks for."""

    def __init__(self, handler: Handler, payload: Any, path: str, grace: ShutdownValue) -> None:
        self.handler = handler
        self.payload = payload
        self.path = path
        self.grace = grace
        self.done = threading.Lock()
        self.done.acquire()  # released once the outcome is in
        self.outcome: Outcome | None = None
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.run: RunningChild | None = None
        self.stop_asked = False

    def handle(self) -> Any:
        raise RuntimeError(f"{self.path} runs on Ray: its pool's handle is not reachable from there")

    def cost_reported(self, run: RunningChild) -> None:
        """Kept in ``run.cost``: it goes home with the outcome."""

    def _emit(self, path: str, kind: str, reason: str = "", /, **details: Any) -> None:
        self.events.append((path, kind, reason, details))

    def run_exited(self, run: RunningChild) -> None:
        self.finish(run)

    def finish(self, run: RunningChild) -> None:
        """The run has ended: its outcome, with an error that can travel home."""
        if run.returned:
            outcome: Outcome = ("ok", run.result, run.cost, self.events)
        elif run.error is not None and not run.stop_mode:
            outcome = ("error", _portable(run.error), run.cost, self.events)
        else:
            outcome = ("stopped", run.exit.detail if run.exit is not None else "", run.cost, self.events)
        self.outcome = outcome
        self.done.release()

    def interrupt(self) -> None:
        """Ray's cancel (in the task's thread): stop the run in order, in the worker's loop."""
        self.stop_asked = True  # seen by the loop when it starts the run, if it has not yet
        _WORKER.soon(self.stop)

    def stop(self) -> None:
        if self.run is not None and self.run.exit is None:
            self.run.request_stop(self.grace, self.finish)


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a ``RemoteError`` with its one-line description."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - whatever pickling raises, it cannot travel
        return RemoteError(describe(error))
    return error


class _Worker:
    """This worker process's trio loop, in a thread of its own, started by its first job and
    kept for the next ones (a trio loop per job would cost more than a Ray task)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._processes: ProcessContext | None = None
        self._current: _RemoteJob | None = None  # the job of the task running now

    def run(self, job: _RemoteJob) -> Outcome:
        """Run ``job`` in the loop and wait for its outcome, in the task's thread, which Ray's
        cancel interrupts: the job is then stopped under its grace."""
        with self._lock:
            if self._token is None:
                self._start()
        self._current = job
        try:
            self.soon(self._spawn, job)
            # a signal handler runs only between bytecodes of this thread: wake up to let it
            while not job.done.acquire(timeout=_SIGNAL_POLL):
                pass
        finally:
            self._current = None
        assert job.outcome is not None
        return job.outcome

    def _start(self) -> None:
        ready = threading.Event()
        loop = threading.Thread(target=trio.run, args=(self._serve, ready), name="otree-jobs", daemon=True)
        loop.start()
        ready.wait()
        if (
            threading.current_thread() is threading.main_thread()
        ):  # where Ray runs tasks (and interrupts them)
            signal.signal(signal.SIGINT, self._interrupt)

    def _interrupt(self, signum: int, frame: object) -> None:
        """Ray cancels the task running now: if it is a job's, the job stops in order."""
        job = self._current
        if job is None:  # another task's, or none: what Python's own handler does
            raise KeyboardInterrupt
        job.interrupt()

    def soon(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` in the loop, soon, if it runs (from any thread, a signal handler too)."""
        if self._token is not None:
            self._token.run_sync_soon(fn, *args)

    async def _serve(self, ready: threading.Event) -> None:
        async with trio.open_nursery() as nursery:
            self._token, self._nursery = trio.lowlevel.current_trio_token(), nursery
            ready.set()
            await trio.sleep_forever()

    def _spawn(self, job: _RemoteJob) -> None:
        from ._pool import ProcessJob  # not at import: _pool -> _spec -> here

        assert self._nursery is not None
        run = job.run = RunningChild(job, None, job.path)
        run.ready = True
        if isinstance(job.handler, ProcessJob):
            body: Handler = functools.partial(self._process_job, job.handler)
        else:
            body = job.handler
        self._nursery.start_soon(run.main, body, (job.payload,), False, name=job.path)
        if job.stop_asked:  # Ray cancelled it before it was here
            job.stop()

    async def _process_job(self, handler: Any, payload: Any) -> Any:
        """A ``process_job`` run here: a process child of this worker, with otree's guarantees."""
        run = current_child()
        return await handler.execute(payload, run, self.processes(), run.owner._emit)

    def processes(self) -> ProcessContext:
        """This worker's process services (its reaper served in the loop), made at its first process job."""
        if self._processes is None:
            assert self._nursery is not None
            self._processes = ProcessContext(Path("/nonexistent"))  # jobs keep no logs on Ray
            self._nursery.start_soon(self._processes.reaper.serve)
        return self._processes


_WORKER = _Worker()
