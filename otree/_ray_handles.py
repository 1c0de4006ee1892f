"""Handles of what runs inside a Ray child: the wrapped supervisor or pool, and what is below it.

``SupervisorHandle.find`` returns one of these when its path goes through a Ray child that wraps
a supervisor or pool, so ``otree stop|start|restart PATH``, ``otree submit`` and the library reach
into the remote sub-tree the same way as into a local one. Like the local handles, they name a
path and resolve it on every call: through the local tree to the Ray child, then to its actor
of the moment, so a handle stays valid across the actor's restarts.

What they read (``which_children``, ``count_children``, a pool's ``status``, which paths exist)
comes from the status the actor last reported with its events (``RemoteRun.snapshot``): no call
to Ray, so a hung actor cannot hang them. What they change is carried out on the actor
(``Host.control``), in the remote tree's own queue; its errors are raised here as themselves,
under local paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Unpack

from ._errors import NotFound, NotRunning
from ._handles import PoolHandle, SupervisorHandle, _Handle
from ._info import ChildInfo, Counts, JobInfo, PoolStatus, StatusNode
from ._pool import SubmitOptions
from ._spec import ChildSpec, RaySpec

if TYPE_CHECKING:
    from ._ray import RemoteRun
    from ._supervisor import Tree, _Child

__all__ = ["REMOTE_OPS", "RemotePoolHandle", "RemoteSupervisorHandle", "remote_handle"]

_RUNNING = ("starting", "running", "stopping")


def remote_handle(
    tree: Tree, ids: tuple[str, ...], child: _Child, rest: tuple[str, ...]
) -> SupervisorHandle | PoolHandle | RemotePoolHandle:
    """The handle of the supervisor or pool a Ray child wraps (``ids`` names the Ray child), or of
    the one at ``rest`` below it.

    Raises:
      TypeError: the Ray child wraps a task or process, or ``rest`` goes through a worker.
      NotFound, NotRunning: as ``find`` on a local supervisor.
    """
    assert isinstance(child.spec, RaySpec)
    kind = child.spec.spec.kind
    at = len(ids) - 1
    if kind == "pool" and not rest:
        return RemotePoolHandle(tree, ids, at)
    if kind != "supervisor":
        raise TypeError(f"{child.path} is a ray {kind}, not a supervisor or pool")
    handle = RemoteSupervisorHandle(tree, ids, at)
    return handle.find("/".join(rest)) if rest else handle


def _child_node(node: StatusNode, child_id: str) -> StatusNode:
    for child in node.children:
        if child.info.id == child_id:
            return child
    raise NotFound(node.info.path, child_id, [child.info.id for child in node.children])


class _Remote(_Handle):
    """What the remote handles share: the Ray child they go through (``_ids[_at]``)."""

    __slots__ = ("_at",)

    def __init__(self, tree: Tree, ids: tuple[str, ...], at: int) -> None:
        super().__init__(tree, ids)
        self._at = at

    def _run(self) -> RemoteRun:
        """The Ray child's run of the moment (NotRunning while it has no ready actor)."""
        parent = SupervisorHandle(self._tree, self._ids[: self._at])._sup()
        child = parent._get(self._ids[self._at])
        remote: RemoteRun | None = child.run.remote if child.run is not None else None
        if remote is None or remote.snapshot is None:
            raise NotRunning(child.path, child.state)
        return remote

    def _node(self) -> StatusNode:
        """This supervisor's or pool's status as its actor last reported it."""
        node = self._run().snapshot
        assert node is not None
        for child_id in self._ids[self._at + 1 :]:
            node = _child_node(node, child_id)
            if node.info.state not in _RUNNING:
                raise NotRunning(node.info.path, node.info.state)
        return node

    async def _call(self, op: str, about: str, *args: Any) -> Any:
        """``op(*args)`` carried out on the actor; the events it causes there about the child
        ``about`` (or this handle's own, for "") carry what the local bus would add to events of
        its path here (``by: operator``)."""
        path = f"{self.path}/{about}" if about else self.path
        cause = (about, self._tree.bus.causes(path))
        return await self._run().call(op, self._ids[self._at + 1 :], args, cause)

    @property
    def parent(self) -> SupervisorHandle | None:
        if len(self._ids) - 1 > self._at:
            return RemoteSupervisorHandle(self._tree, self._ids[:-1], self._at)
        return SupervisorHandle(self._tree, self._ids[:-1])


class RemoteSupervisorHandle(_Remote, SupervisorHandle):
    """A supervisor running inside a Ray child (see the module docstring)."""

    __slots__ = ()

    def _sup(self) -> Any:
        raise TypeError(f"{self.path} runs on a Ray node: its records are there, not here")

    def child_node(self, child_id: str) -> StatusNode:
        """A child's status and what is below it (NotFound naming this supervisor)."""
        return _child_node(self._node(), child_id)

    async def start_child(self, spec: ChildSpec) -> ChildInfo:
        from ._ray import check_picklable  # imports Ray: a remote handle exists only with it

        check_picklable(f"{self.path}/{spec.id}", spec)
        return self._run().rehome_info(await self._call("start_child", spec.id, spec))

    async def terminate_child(self, child_id: str) -> None:
        await self._call("terminate_child", child_id, child_id)

    async def restart_child(self, child_id: str) -> ChildInfo:
        return self._run().rehome_info(await self._call("restart_child", child_id, child_id))

    async def _restart_by_operator(self, child_id: str) -> ChildInfo:
        return self._run().rehome_info(await self._call("restart_by_operator", child_id, child_id))

    async def _wake(self, child_id: str, *, manual: bool) -> tuple[ChildInfo, bool]:
        info, started = await self._call("wake", child_id, child_id, manual)
        return self._run().rehome_info(info), started

    async def delete_child(self, child_id: str) -> None:
        await self._call("delete_child", child_id, child_id)

    def which_children(self) -> list[ChildInfo]:
        return [child.info for child in reversed(self._node().children)]

    def count_children(self) -> Counts:
        children = [child.info for child in self._node().children]
        supervisors = sum(1 for info in children if info.kind in ("supervisor", "pool"))
        return Counts(
            specs=len(children),
            active=sum(1 for info in children if info.state in _RUNNING),
            supervisors=supervisors,
            workers=len(children) - supervisors,
        )

    def get_childspec(self, child_id: str) -> ChildSpec:
        raise TypeError(f"{self.path} runs on a Ray node: the specs of its children stay there")

    def find(self, path: str) -> SupervisorHandle | PoolHandle | RemotePoolHandle:
        ids = tuple(part for part in path.split("/") if part)
        node = self._node()
        for depth, child_id in enumerate(ids):
            node = _child_node(node, child_id)
            info, last = node.info, depth == len(ids) - 1
            if info.kind == "pool" and last:
                return RemotePoolHandle(self._tree, self._ids + ids, self._at)
            if info.kind != "supervisor":
                raise TypeError(f"{info.path} is a {info.kind}, not a supervisor or pool")
            if last:
                break
            if info.state not in _RUNNING:
                raise NotRunning(info.path, info.state)
        return RemoteSupervisorHandle(self._tree, self._ids + ids, self._at)


class RemotePoolHandle(_Remote):
    """A pool running inside a Ray child: ``submit`` and ``status`` reach it, and what the
    control plane asks of a pool (``request``); its queue, jobs and dead letters stay on the node."""

    __slots__ = ()

    async def request(self, op: str, about: str, *args: Any) -> Any:
        """``POOL_OPS[op](pool, *args)`` carried out on the actor (``about``: the job it concerns,
        if any, whose events say who caused them); its errors raised here as themselves."""
        return await self._call(op, about, *args)

    async def submit(self, kind: str, payload: Any = None, **options: Unpack[SubmitOptions]) -> JobInfo:
        """Queue a job in the remote pool; the job as it stands once queued there (its ``id``,
        ``state``). Raises what the pool's own ``submit`` raises (``QueueFull``, ...)."""
        info: JobInfo = await self._call("submit", "", kind, payload, options)
        return info

    def status(self) -> PoolStatus:
        """The pool's queue, concurrency, budget and circuit as its actor last reported them."""
        pool = self._node().pool
        if pool is None:
            raise NotRunning(self.path, "stopped")
        return pool


# --- the requests, as the actor carries them out on its own handles -------------------------


async def _start_child(target: SupervisorHandle, spec: ChildSpec) -> ChildInfo:
    return await target.start_child(spec)


async def _terminate_child(target: SupervisorHandle, child_id: str) -> None:
    await target.terminate_child(child_id)


async def _restart_child(target: SupervisorHandle, child_id: str) -> ChildInfo:
    return await target.restart_child(child_id)


async def _restart_by_operator(target: SupervisorHandle, child_id: str) -> ChildInfo:
    return await target._restart_by_operator(child_id)


async def _wake(target: SupervisorHandle, child_id: str, manual: bool) -> tuple[ChildInfo, bool]:
    return await target._wake(child_id, manual=manual)


async def _delete_child(target: SupervisorHandle, child_id: str) -> None:
    await target.delete_child(child_id)


async def _submit(target: PoolHandle, kind: str, payload: Any, options: SubmitOptions) -> JobInfo:
    from ._status import job_of  # not at import: _status imports this module

    job = await target.submit(kind, payload, **options)
    return job_of(target, job.id)


REMOTE_OPS: dict[str, Any] = {
    "start_child": _start_child,
    "terminate_child": _terminate_child,
    "restart_child": _restart_child,
    "restart_by_operator": _restart_by_operator,
    "wake": _wake,
    "delete_child": _delete_child,
    "submit": _submit,
}
