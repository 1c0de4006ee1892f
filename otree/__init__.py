"""otree: Erlang/OTP-style supervision trees for Python, on trio.

A worker that crashes is restarted by its supervisor::

    import trio, otree

    async def flaky(name):
        await trio.sleep(1)
        raise RuntimeError(f"{name} crashed")     # restarted, at most 3 times in 5 s

    tree = otree.supervisor("fleet", children=[otree.task("alice", flaky, "alice")])

    async def main():
        async with otree.open_supervisor(tree) as sup:
            async for event in sup.events():
                print(event.path, event.kind, event.reason)

    trio.run(main)

Run a tree file with ``otree run tree.py``; check one with ``otree check tree.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:
    from ._errors import AlreadyPresent as AlreadyPresent
    from ._errors import BudgetExceeded as BudgetExceeded
    from ._errors import CircuitOpen as CircuitOpen
    from ._errors import DeadLettered as DeadLettered
    from ._errors import JobFailed as JobFailed
    from ._errors import MaxChildren as MaxChildren
    from ._errors import NotFound as NotFound
    from ._errors import NotRunning as NotRunning
    from ._errors import OtreeError as OtreeError
    from ._errors import QueueFull as QueueFull
    from ._errors import Restarting as Restarting
    from ._errors import RestartIntensityExceeded as RestartIntensityExceeded
    from ._errors import Running as Running
    from ._errors import Shutdown as Shutdown
    from ._errors import SpecError as SpecError
    from ._errors import StartError as StartError
    from ._errors import SupervisorFailed as SupervisorFailed
    from ._events import EventStream as EventStream
    from ._handles import PoolHandle as PoolHandle
    from ._handles import SupervisorHandle as SupervisorHandle
    from ._info import ChildInfo as ChildInfo
    from ._info import Counts as Counts
    from ._info import DeadLetter as DeadLetter
    from ._info import Event as Event
    from ._info import ExitInfo as ExitInfo
    from ._info import LaneStatus as LaneStatus
    from ._info import PoolStatus as PoolStatus
    from ._pool import Job as Job
    from ._pool import ProcessJob as ProcessJob
    from ._pool import process_job as process_job
    from ._ray_executor import RayExecutor as RayExecutor
    from ._ray_handles import RemotePoolHandle as RemotePoolHandle
    from ._ray_handles import RemoteSupervisorHandle as RemoteSupervisorHandle
    from ._reaper import adopt_orphans as adopt_orphans
    from ._run import open_supervisor as open_supervisor
    from ._run import run as run
    from ._spec import Backoff as Backoff
    from ._spec import CircuitBreaker as CircuitBreaker
    from ._spec import PoolSpec as PoolSpec
    from ._spec import ProcessSpec as ProcessSpec
    from ._spec import RaySpec as RaySpec
    from ._spec import SupervisorSpec as SupervisorSpec
    from ._spec import TaskSpec as TaskSpec
    from ._spec import pool as pool
    from ._spec import process as process
    from ._spec import ray as ray
    from ._spec import supervisor as supervisor
    from ._spec import task as task
    from ._task import RunningChild as RunningChild
    from ._task import current_child as current_child

__all__ = [
    "AlreadyPresent",
    "Backoff",
    "BudgetExceeded",
    "ChildInfo",
    "CircuitBreaker",
    "CircuitOpen",
    "Counts",
    "DeadLetter",
    "DeadLettered",
    "Event",
    "EventStream",
    "ExitInfo",
    "Job",
    "JobFailed",
    "LaneStatus",
    "MaxChildren",
    "NotFound",
    "NotRunning",
    "OtreeError",
    "PoolHandle",
    "PoolSpec",
    "PoolStatus",
    "ProcessJob",
    "ProcessSpec",
    "QueueFull",
    "RayExecutor",
    "RaySpec",
    "RemotePoolHandle",
    "RemoteSupervisorHandle",
    "RestartIntensityExceeded",
    "Restarting",
    "Running",
    "RunningChild",
    "Shutdown",
    "SpecError",
    "StartError",
    "SupervisorFailed",
    "SupervisorHandle",
    "SupervisorSpec",
    "TaskSpec",
    "adopt_orphans",
    "current_child",
    "open_supervisor",
    "pool",
    "process",
    "process_job",
    "ray",
    "run",
    "supervisor",
    "task",
]

_SOURCES = {
    "AlreadyPresent": "._errors",
    "BudgetExceeded": "._errors",
    "CircuitOpen": "._errors",
    "DeadLettered": "._errors",
    "JobFailed": "._errors",
    "MaxChildren": "._errors",
    "NotFound": "._errors",
    "NotRunning": "._errors",
    "OtreeError": "._errors",
    "QueueFull": "._errors",
    "Restarting": "._errors",
    "RestartIntensityExceeded": "._errors",
    "Running": "._errors",
    "Shutdown": "._errors",
    "SpecError": "._errors",
    "StartError": "._errors",
    "SupervisorFailed": "._errors",
    "EventStream": "._events",
    "ChildInfo": "._info",
    "Counts": "._info",
    "DeadLetter": "._info",
    "Event": "._info",
    "ExitInfo": "._info",
    "LaneStatus": "._info",
    "PoolStatus": "._info",
    "Job": "._pool",
    "ProcessJob": "._pool",
    "process_job": "._pool",
    "RayExecutor": "._ray_executor",
    "adopt_orphans": "._reaper",
    "Backoff": "._spec",
    "CircuitBreaker": "._spec",
    "PoolSpec": "._spec",
    "ProcessSpec": "._spec",
    "RaySpec": "._spec",
    "SupervisorSpec": "._spec",
    "TaskSpec": "._spec",
    "pool": "._spec",
    "process": "._spec",
    "ray": "._spec",
    "supervisor": "._spec",
    "task": "._spec",
    "PoolHandle": "._handles",
    "RemotePoolHandle": "._ray_handles",
    "RemoteSupervisorHandle": "._ray_handles",
    "SupervisorHandle": "._handles",
    "open_supervisor": "._run",
    "run": "._run",
    "RunningChild": "._task",
    "current_child": "._task",
}


def _load() -> None:
    """Import the public names into this namespace, once, on first use of any of them.

    ``import otree`` stays light (the ``otree`` client commands never load the
    runtime). Tracebacks and reprs say ``otree.SpecError``, not
    ``otree._errors.SpecError``; a Struct's annotations are resolved in its own
    module first, so msgspec learns its fields before the rename.
    """
    import importlib
    from contextlib import suppress

    import msgspec

    namespace = globals()
    for name, module in _SOURCES.items():
        namespace[name] = getattr(importlib.import_module(module, __name__), name)
    for name in __all__:  # every Struct first: one may refer to another, not yet renamed
        value = namespace[name]
        if isinstance(value, type) and issubclass(value, msgspec.Struct):
            with suppress(TypeError):  # specs of a tree are never decoded (untagged unions)
                msgspec.msgpack.Decoder(value)
    for name in __all__:
        value = namespace[name]
        if getattr(value, "__module__", "").startswith("otree."):
            with suppress(AttributeError, TypeError):
                value.__module__ = "otree"


def __getattr__(name: str) -> object:
    if name not in _SOURCES:
        raise AttributeError(f"module 'otree' has no attribute {name!r}")
    _load()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
