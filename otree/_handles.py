"""The handles: what user code holds on a running supervisor or pool.

A handle is a tree and a path of ids from its root, resolved on every call,
so it stays valid across the restarts of what it names. It works through the
supervisors' queues and records; the runtime (``_supervisor``) makes handles
only through the ``HANDLES`` factories it is given, so it never imports this
module and the import graph stays one way.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Unpack

import trio

from ._errors import JobFailed, NotRunning
from ._events import EventStream
from ._info import ChildInfo, Counts, DeadLetter, LaneStatus, PoolStatus
from ._pool import Job, Pool, SubmitOptions
from ._spec import ChildSpec
from ._supervisor import Handles, Tree, _Supervisor

if TYPE_CHECKING:
    from ._ray_handles import RemotePoolHandle

__all__ = ["HANDLES", "PoolHandle", "SupervisorHandle"]


def _supervisor_at(tree: Tree, ids: tuple[str, ...]) -> _Supervisor:
    """The running supervisor at ``ids`` below the root. Raises NotFound, NotRunning."""
    sup = tree.root
    for child_id in ids:
        child = sup._get(child_id)
        if child.nested is None or child.run is None:
            raise NotRunning(child.path, child.state)
        sup = child.nested
    return sup


class _Handle:
    """What the handles share: a tree and a path of ids from its root, resolved on each call."""

    __slots__ = ("_ids", "_tree", "path")

    def __init__(self, tree: Tree, ids: tuple[str, ...]) -> None:
        self._tree = tree
        self._ids = ids
        self.path = "/".join((tree.root.path, *ids))

    def __repr__(self) -> str:
        return f"<otree.{type(self).__name__} {self.path}>"

    def events(self, *, buffer: int = 10_000) -> EventStream:
        """Live events of this supervisor or pool and all below it, from now on."""
        return self._tree.bus.subscribe(self.path, buffer)

    @property
    def parent(self) -> SupervisorHandle | None:
        """The handle of the supervisor this one belongs to, None for the root: how a pool's
        job (``current_child().supervisor`` is its pool) reaches the pool's siblings."""
        return SupervisorHandle(self._tree, self._ids[:-1]) if self._ids else None


class SupervisorHandle(_Handle):
    """A running supervisor, named by its path in the tree.

    The handle resolves its path on every call, so a handle of a nested
    supervisor stays valid across that supervisor's restarts. Calls that
    change the tree go through the supervisor's queue, in order, as OTP's do.
    """

    __slots__ = ()

    def _sup(self) -> _Supervisor:
        return _supervisor_at(self._tree, self._ids)

    async def start_child(self, spec: ChildSpec) -> ChildInfo:
        """Add and start a child at the end of the start order.

        Raises:
          AlreadyPresent: the id is held already (``running`` tells which kind).
          MaxChildren: the supervisor holds ``max_children`` specs.
          SpecError: ``spec`` is not a child spec or does not fit this supervisor.
          StartError: it failed to start; nothing is stored (cause chained).
        """
        sup = self._sup()
        sup.spec.check_child(spec, (), sup.path)
        info: ChildInfo = await sup.call(sup.op_start_child, spec)
        return info

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child and keep its spec (a temporary child's spec is dropped).

        A stopped child is left as it is; a restarting one stops retrying.
        """
        sup = self._sup()
        await sup.call(sup.op_terminate_child, child_id)

    async def restart_child(self, child_id: str) -> ChildInfo:
        """Start a stopped child again (OTP's meaning: not counted as a restart).

        Raises:
          Running, Restarting: the child is not stopped.
          StartError: it failed to start; the spec is kept, stopped.
        """
        sup = self._sup()
        info: ChildInfo = await sup.call(sup.op_restart_child, child_id)
        return info

    async def _restart_by_operator(self, child_id: str) -> ChildInfo:
        """``otree restart``: stop the child if it runs, then start it again (supervisorctl's
        meaning; ``restart_child`` keeps OTP's)."""
        spec = self.get_childspec(child_id)
        await self.terminate_child(child_id)
        if spec.restart == "temporary":  # terminating dropped its spec: add it again
            return await self.start_child(spec)
        return await self.restart_child(child_id)

    async def wake(self, child_id: str) -> ChildInfo:
        """Start a child unless it runs ("wake or spawn"), and return its info.

        For a parked child (``idle_timeout``), an ``on_demand`` child that exited, one
        declared ``autostart=False``: what brings it back. A running child is left as it is,
        no error; so is a restarting one (its supervisor brings it back) and one stopped by
        hand (``terminate_child``, ``otree stop``: only ``otree start`` or ``restart_child``
        undo that). Wakes are served in the supervisor's queue, so concurrent wakes of one
        child start it once. Not counted as a restart.

        Raises:
          NotFound: no such child.
          StartError: it failed to start; the spec is kept, stopped.
        """
        info, _ = await self._wake(child_id, manual=False)
        return info

    async def _wake(self, child_id: str, *, manual: bool) -> tuple[ChildInfo, bool]:
        """``wake``, and whether it started the child; ``manual``: an operator's start."""
        sup = self._sup()
        woken: tuple[ChildInfo, bool] = await sup.call(sup.op_wake, child_id, manual)
        return woken

    async def delete_child(self, child_id: str) -> None:
        """Forget a stopped child's spec.

        Raises:
          Running, Restarting: the child is not stopped.
        """
        sup = self._sup()
        await sup.call(sup.op_delete_child, child_id)

    def which_children(self) -> list[ChildInfo]:
        """Every child, newest first (as OTP)."""
        sup = self._sup()
        return [sup.info(child) for child in reversed(sup.children.values())]

    def count_children(self) -> Counts:
        """Specs held, children running, and specs that are supervisors / workers."""
        children = self._sup().children.values()
        # a pool supervises its jobs (OTP's simple_one_for_one): it counts as a supervisor
        supervisors = sum(1 for c in children if c.spec.kind in ("supervisor", "pool"))
        return Counts(
            specs=len(children),
            active=sum(1 for c in children if c.run is not None and c.state != "restarting"),
            supervisors=supervisors,
            workers=len(children) - supervisors,
        )

    def get_childspec(self, child_id: str) -> ChildSpec:
        """The spec of a child."""
        return self._sup()._get(child_id).spec

    def child(self, child_id: str) -> SupervisorHandle | PoolHandle | RemotePoolHandle:
        """The handle of the nested supervisor or pool ``child_id``.

        Raises:
          NotFound: no such child.
          TypeError: the child is a worker (task or process).
        """
        return self.find(child_id)

    def find(self, path: str) -> SupervisorHandle | PoolHandle | RemotePoolHandle:
        """The handle of a nested supervisor or pool by a path relative to this one (``"db/jobs"``);
        through a Ray child that wraps one, the handle of the supervisor or pool on its node."""
        ids = tuple(part for part in path.split("/") if part)
        sup = self._sup()
        for depth, child_id in enumerate(ids):
            child = sup._get(child_id)
            last = depth == len(ids) - 1
            if child.spec.kind == "pool" and last:
                return PoolHandle(self._tree, self._ids + ids)
            if child.spec.kind == "ray":
                from ._ray_handles import remote_handle  # only for a tree that holds a Ray child

                return remote_handle(self._tree, self._ids + ids[: depth + 1], child, ids[depth + 1 :])
            if child.spec.kind != "supervisor":
                raise TypeError(f"{child.path} is a {child.spec.kind}, not a supervisor or pool")
            if last:
                break
            if child.nested is None or child.run is None:
                raise NotRunning(child.path, child.state)
            sup = child.nested
        return SupervisorHandle(self._tree, self._ids + ids)


class PoolHandle(_Handle):
    """A running pool child, named by its path; resolved on every call, like SupervisorHandle."""

    __slots__ = ()

    def _pool(self) -> Pool:
        ids = self._ids
        child = _supervisor_at(self._tree, ids[:-1])._get(ids[-1])
        if child.pool is None or child.run is None:
            raise NotRunning(child.path, child.state)
        return child.pool

    def submit_nowait(self, kind: str, payload: Any = None, **options: Unpack[SubmitOptions]) -> Job:
        """Queue a job at once (never waits); see ``Pool.submit_nowait`` for the options and errors."""
        return self._pool().submit_nowait(kind, payload, **options)

    async def submit(self, kind: str, payload: Any = None, **options: Unpack[SubmitOptions]) -> Job:
        """Queue a job. Raises ``QueueFull`` at once when the queue is full (never waits)."""
        job = self.submit_nowait(kind, payload, **options)
        await trio.lowlevel.checkpoint()
        return job

    def dead_letters(self) -> list[DeadLetter]:
        """Jobs that used all their attempts, oldest first."""
        return list(self._pool().dead.values())

    async def requeue(self, dead_letter_id: str) -> Job:
        """Queue a dead letter again (``NotFound`` if there is no such letter)."""
        job = self._pool().requeue(dead_letter_id)
        await trio.lowlevel.checkpoint()
        return job

    def clear_dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """Remove a dead letter for good, freeing its key (``NotFound`` if there is no such letter)."""
        return self._pool().clear_dead_letter(dead_letter_id)

    def job(self, job_id: str) -> Job:
        """A running, waiting or recently finished job (the pool keeps the last 1,000 finished
        in memory) by id; ``NotFound`` naming the pool if there is none."""
        return self._pool().find(job_id)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job and wait until it is gone: a waiting one at once, a running one stopped
        like a child within the pool's ``job_shutdown`` (one that returned before the stop
        reached it ends ``done``). A finished job is left as it is. ``NotFound`` if there is none."""
        job = self.job(job_id)
        job.cancel()
        with contextlib.suppress(JobFailed):
            await job.result()
        return job

    def queued(self) -> list[Job]:
        """Waiting jobs in the order they would start."""
        return [job for _, job in self._pool().queue]

    def which_children(self) -> list[ChildInfo]:
        """Running jobs, newest first."""
        return self._pool().which_children()

    def status(self) -> PoolStatus:
        """The queue, concurrency, budget and circuit now; ``held`` says what keeps the head job
        from starting (``budget: needs $0.10, $0.08 left, resets 00:00 UTC``), None if nothing."""
        return self._pool().status()

    def lane(self, name: str) -> LaneStatus:
        """A lane's queued and running jobs, its own breaker's state and what holds it, now;
        ``NotFound`` naming the pool if it knows no such lane."""
        return self._pool().lane(name)


HANDLES = Handles(supervisor=SupervisorHandle, pool=PoolHandle)
