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
from ._supervisor import _Supervisor
from ._task import describe

__all__ = ["job_of", "jobs_of", "status_of"]


def _supervisor_node(sup: _Supervisor, info: ChildInfo) -> StatusNode:
    children = []
    for child in sup.children.values():
        child_info = sup.info(child)
        if child.nested is not None and child.run is not None:
            children.append(_supervisor_node(child.nested, child_info))
        elif child.pool is not None and child.run is not None:
            children.append(StatusNode(child_info, pool=child.pool.status()))
        else:
            children.append(StatusNode(child_info))
    return StatusNode(
        info,
        restarts_in_window=sup.window.in_window(trio.current_time()),
        max_restarts=sup.spec.max_restarts,
        max_seconds=sup.spec.max_seconds,
        children=children,
    )


def status_of(handle: SupervisorHandle | PoolHandle, info: ChildInfo) -> Status:
    """The snapshot below ``handle``, whose own line is ``info``."""
    if isinstance(handle, PoolHandle):
        root = StatusNode(info, pool=handle._pool().status())
    else:
        root = _supervisor_node(handle._sup(), info)
    return Status(time.time(), root)


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
