"""Stopping a list of children strictly one at a time, in the order given (OTP's ``terminate_children``).

The chain asks the first child to stop, and each child, as it exits, asks the
next one, so children stop one at a time without a round trip through their
supervisor for each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

import trio

from ._info import ChildState
from ._spec import ChildSpec
from ._task import RunningChild

__all__ = ["StopChain"]


class _Stoppable(Protocol):
    spec: ChildSpec
    run: RunningChild | None
    state: ChildState


_C = TypeVar("_C", bound=_Stoppable)


class StopChain(Generic[_C]):
    """Stops ``children`` one at a time in the given order; ``done`` is set after the last.

    ``settle(child, run, stopped)`` records the end of each run: ``stopped`` is False
    for a run that had exited by itself before the chain reached it.
    """

    __slots__ = ("_brutal", "_children", "_current", "_index", "_settle", "done")

    def __init__(self, children: Sequence[_C], settle: Callable[[_C, RunningChild, bool], None]) -> None:
        self._children = children
        self._settle = settle
        self._brutal = False
        self._current: RunningChild | None = None
        self._index = 0
        self.done = trio.Event()

    def make_brutal(self) -> None:
        """Kill the child being stopped and every one after it at once (a grace ran out)."""
        self._brutal = True
        if self._current is not None:
            self._current.request_stop("brutal_kill", self._exited)

    def advance(self) -> None:
        """Ask the next child that runs to stop; set ``done`` when none is left."""
        children = self._children
        while self._index < len(children):
            child = children[self._index]
            self._index += 1
            run = child.run
            if run is None:
                continue
            if run.exit is not None:  # it exited by itself; its queued exit is now stale
                self._settle(child, run, False)
                continue
            child.state = "stopping"
            self._current = run
            run.request_stop("brutal_kill" if self._brutal else child.spec.shutdown, self._exited)
            return
        self._current = None
        self.done.set()

    def _exited(self, run: RunningChild) -> None:
        self._settle(run.child, run, True)
        self.advance()
