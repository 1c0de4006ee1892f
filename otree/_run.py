"""Running a tree: ``open_supervisor``, ``run`` and what ``otree run`` builds them on.

The entry points put the runtime (``_supervisor``) and the handles it serves
(``_handles``) together: they make the tree with the handle factories, serve
it, and give the caller the root's handle once every child is ready.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._errors import SpecError
from ._handles import HANDLES, SupervisorHandle
from ._paths import state_dir as default_state_dir
from ._ray import ray_session
from ._spec import SupervisorSpec
from ._supervisor import Tree, _flatten

__all__ = ["open_supervisor", "open_tree", "reload_tree", "run"]


def _check_root(spec: object) -> SupervisorSpec:
    if not isinstance(spec, SupervisorSpec):
        raise SpecError("<tree>", "root", "must be a supervisor spec (otree.supervisor(...))", spec)
    return spec


@asynccontextmanager
async def open_supervisor(
    spec: SupervisorSpec,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    event_log: bool | None = None,
) -> AsyncIterator[SupervisorHandle]:
    """Run a supervision tree for the duration of the block.

    Returns once every child is ready; leaving the block stops the whole tree
    in reverse order. If the tree shuts itself down (auto_shutdown) the block
    is cancelled and the context manager exits quietly; if the root gives up,
    the block is cancelled and ``RestartIntensityExceeded`` is raised.

    ``state_dir`` (default ``$OTREE_STATE_DIR`` or the platform's user state dir)
    holds the process children's logs and the pools' databases; pools are durable
    by default when a state dir is given (the argument or the environment variable),
    and so is the event log (``<state dir>/events.jsonl``); ``event_log`` forces it
    on or off.

    Raises:
      StartError: a child failed to start (the started ones were stopped).
      RestartIntensityExceeded: the root gave up (the child's exception chained).
    """
    explicit = state_dir is not None or bool(os.environ.get("OTREE_STATE_DIR"))
    tree = Tree(
        _check_root(spec),
        default_state_dir(state_dir),
        durable=explicit,
        event_log=explicit if event_log is None else event_log,
        handles=HANDLES,
    )
    async with open_tree(tree) as handle:
        yield handle


@asynccontextmanager
async def open_tree(tree: Tree) -> AsyncIterator[SupervisorHandle]:
    """``open_supervisor`` for a tree made beforehand (``otree run`` needs it before it is up)."""
    body_error: BaseException | None = None
    spec = tree.root.spec
    with ray_session(spec), _flatten(), tree.closing_log():
        async with trio.open_nursery() as nursery:
            tree.services = nursery
            nursery.start_soon(tree.serve, name=f"otree supervisor {spec.id}")
            await tree.settled.wait()
            if tree.ready:
                try:
                    with tree.body_scope:
                        yield SupervisorHandle(tree, ())
                except BaseException as exc:  # noqa: BLE001 - re-raised once the tree has stopped
                    body_error = exc
                tree.root.request_stop()
    if body_error is not None:
        raise body_error
    if tree.outcome is not None:
        raise tree.outcome


async def reload_tree(handle: SupervisorHandle, spec: SupervisorSpec) -> dict[str, list[str]]:
    """Apply a reloaded tree below ``handle``; the paths changed, removed, added, and failures."""
    sup = handle._sup()
    summary: dict[str, list[str]] = await sup.call(sup.op_reload, spec)
    return summary


async def run(
    spec: SupervisorSpec,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    event_log: bool | None = None,
    task_status: trio.TaskStatus[SupervisorHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a tree until it shuts itself down, gives up, or the caller is cancelled.

    With ``nursery.start(otree.run, tree)`` the handle is returned once the tree is up.
    Cancelling it stops the tree in order first, then honours the cancellation.

    Raises:
      StartError, RestartIntensityExceeded: as ``open_supervisor``.
    """
    async with open_supervisor(spec, state_dir=state_dir, event_log=event_log) as sup:
        task_status.started(sup)
        await trio.sleep_forever()
