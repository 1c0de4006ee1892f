"""What ``otree status`` and ``otree jobs`` show: a running tree as the plain Structs of ``_info``.

Built in the tree's thread from the supervisors' own records (one pass, no
awaiting), so a status of a large tree is a consistent snapshot.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from ._budget import from_micros
from ._handles import PoolHandle, SupervisorHandle
from ._info import ChildInfo, JobInfo, Jobs, Status, StatusNode
from ._pool import Job
from ._protocol import carriable
from ._ray_handles import RemoteSupervisorHandle
from ._supervisor import _Child, _Supervisor
from ._task import describe

__all__ = ["child_status", "job_of", "jobs_of", "status_of"]


def _node(sup: _Supervisor, child: _Child) -> StatusNode:
    """One child's line and what is below it: a supervisor's children, a pool's queue, a Ray
    child's remote sub-tree (as its actor last reported it: no call to Ray here)."""
    info = sup.info(child)
    run = child.run
    if run is None:
        return StatusNode(info)
    if child.nested is not None:
        return _supervisor_node(child.nested, info)
    if child.pool is not None:
        return StatusNode(info, pool=child.pool.status())
    if run.remote is not None:
        node: StatusNode = run.remote.status_node(info)
        return node
    return StatusNode(info)


def _supervisor_node(sup: _Supervisor, info: ChildInfo) -> StatusNode:
    return StatusNode(
        info,
        restarts_in_window=sup.window.in_window(trio.current_time()),
        max_restarts=sup.spec.max_restarts,
        max_seconds=sup.spec.max_seconds,
        children=[_node(sup, child) for child in sup.children.values()],
    )


def status_of(handle: SupervisorHandle | PoolHandle, info: ChildInfo) -> Status:
    """The snapshot below ``handle``, whose own line is ``info``."""
    if isinstance(handle, PoolHandle):
        root = StatusNode(info, pool=handle._pool().status())
    else:
        root = _supervisor_node(handle._sup(), info)
    return Status(time.time(), root)


def child_status(parent: SupervisorHandle, child_id: str) -> Status:
    """The snapshot of one child of ``parent`` and what is below it (``otree status PATH``).

    Raises:
      NotFound: ``parent`` has no such child.
    """
    if isinstance(parent, RemoteSupervisorHandle):
        return Status(time.time(), parent.child_node(child_id))
    sup = parent._sup()
    return Status(time.time(), _node(sup, sup._get(child_id)))


def _job_info(job: Job, held: str | None = None, *, result: Any = None, error: str | None = None) -> JobInfo:
    return JobInfo(
        id=job.id,
        kind=job.kind,
        state=job.state,
        priority=job.priority,
        attempts=job.attempts,
        estimated_cost=from_micros(job.estimate),
        cost=job.cost,
        submitted_at=job.submitted_at,
        held=held,
        pid=job.pid,
        started_at=job.started_at,
        ended_at=job.ended_at,
        result=result,
        error=error,
        lane=job.lane,
    )


def job_of(handle: PoolHandle, job_id: str) -> JobInfo:
    """One running, waiting or recently finished job, with its result or why it has none
    (a result msgpack cannot carry is its repr). Raises NotFound naming the pool."""
    job = handle.job(job_id)
    result = carriable(job.value) if job.state == "done" else None
    error = job.why()
    if job.error is not None and job.state in ("dead", "waiting"):  # its last failure
        error = f"{error}: {describe(job.error)}" if error else describe(job.error)
    return _job_info(job, result=result, error=error)


def jobs_of(handle: PoolHandle) -> Jobs:
    """A pool's jobs now."""
    pool = handle._pool()
    held = pool.hold()  # the head job's: the first in start order
    return Jobs(
        running=[_job_info(job) for job in pool.running.values()],
        queued=[_job_info(job, held if n == 0 else None) for n, (_, job) in enumerate(pool.queue)],
        retrying=[_job_info(job) for job in pool.waiting_jobs()],
    )
