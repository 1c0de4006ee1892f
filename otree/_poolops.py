"""What the control plane asks of a pool (``otree jobs``, ``job``, ``dead-letters``, ``lane``,
``cancel``, ``requeue``), as functions of the pool's handle.

One definition serves both places a pool can be: the control server calls them on a local
pool's handle, and the Ray actor of a pool on a node calls the same ones on its own handle
when the control server's request arrives through ``RemotePoolHandle.request``. So a pool on a
Ray node answers as a local one does, with the same records and the same refusals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ._handles import PoolHandle
from ._info import DeadLetter, JobInfo, Jobs, LaneStatus
from ._status import job_of, jobs_of

__all__ = ["POOL_OPS"]


async def _jobs(pool: PoolHandle) -> Jobs:
    return jobs_of(pool)


async def _job(pool: PoolHandle, job_id: str) -> JobInfo:
    return job_of(pool, job_id)


async def _dead_letters(pool: PoolHandle) -> list[DeadLetter]:
    return pool.dead_letters()


async def _lane(pool: PoolHandle, name: str) -> LaneStatus:
    return pool.lane(name)


async def _cancel(pool: PoolHandle, job_id: str) -> JobInfo:
    """Cancel a job that has not finished (ValueError for one that has); the job as it stands."""
    job = pool.job(job_id)
    if job.finished:
        raise ValueError(f"job {job.id} of {pool.path} already finished ({job.state})")
    await pool.cancel(job.id)
    return job_of(pool, job.id)


async def _requeue(pool: PoolHandle, dead_letter_id: str) -> JobInfo:
    job = await pool.requeue(dead_letter_id)
    return job_of(pool, job.id)


POOL_OPS: dict[str, Callable[..., Awaitable[Any]]] = {
    "jobs": _jobs,
    "job": _job,
    "dead_letters": _dead_letters,
    "lane": _lane,
    "cancel": _cancel,
    "requeue": _requeue,
}
