"""Ray children, the remote side: the actor that runs a wrapped spec under otree's own runtime.

``Host`` is a plain class; ``_ray`` makes it a threaded Ray actor with two concurrency
groups: ``run`` (one thread, holding the remote tree's trio loop for the actor's life) and
``ctl`` (``ready``, ``ping``, ``stop``, answered while ``run`` is busy). The remote tree is a
root supervisor holding the wrapped spec alone, run once: its exit ends the tree, and
``run`` returns that exit for the local child to end the same way.

Ray itself is imported only by ``ready``, which runs in an actor, to say where it runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections import deque
from typing import Any

import msgspec
import trio

from ._errors import OtreeError
from ._info import Event, ExitInfo
from ._reaper import adopt_orphans
from ._spec import SupervisorSpec

__all__ = ["EVENT_BUFFER", "Batch", "Host"]

# Remote events as (path, kind, reason, details), and how many were dropped before them.
Batch = tuple[list[tuple[str, str, str, dict[str, Any]]], int]
# The events that end a run of a child (their details carry its spend).
_EXITS = frozenset({"child.exited", "child.stopped", "child.start_failed"})
EVENT_BUFFER = 10_000  # remote events held for the local side, as a subscriber's buffer


class Host:
    """One remote run of a wrapped spec (one actor per run: a restart is a new actor)."""

    def __init__(self, root: SupervisorSpec, state_dir: str) -> None:
        self._root = root
        self._state_dir = state_dir
        self._settled = threading.Event()  # the remote child is ready, or the run has ended
        self._ready = False
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._stop_asked = False
        self._exit = ExitInfo("error", "the remote tree ended without an exit")
        # the remote tree's events, until the local side takes them (bounded: oldest dropped)
        self._events: deque[tuple[str, str, str, dict[str, Any]]] = deque()
        self._dropped = 0
        self._arrived = threading.Condition(self._lock)
        self._finished = False  # run() has returned: no event will come
        self._child_path = f"{root.id}/{root.children[0].id}"
        self._cost = 0.0

    def run(self) -> dict[str, Any]:
        """Run the remote tree until its child exits or a stop; how the child's last run ended."""
        # the actor process is this tree's alone: orphans of its process children come to it
        adopt_orphans()
        try:
            trio.run(self._serve)
        finally:
            self._settled.set()
            with self._lock:
                self._finished = True
                self._arrived.notify_all()  # a fetch of events waiting for one returns now
        return {"reason": self._exit.reason, "detail": self._exit.detail, "cost": self._cost}

    async def _serve(self) -> None:
        # not at import: _run -> _supervisor -> _ray -> here
        from ._handles import HANDLES
        from ._paths import state_dir
        from ._run import open_tree
        from ._supervisor import Tree

        stop = trio.Event()
        with self._lock:
            self._token, self._stop = trio.lowlevel.current_trio_token(), stop
            if self._stop_asked:
                stop.set()
        # the hook is made here: a bound method of this actor cannot travel in the pickled spec
        child = msgspec.structs.replace(self._root.children[0], on_exit=self._record)
        hooked = msgspec.structs.replace(self._root, children=(child,))
        tree = Tree(hooked, state_dir(self._state_dir), durable=True, event_log=False, handles=HANDLES)
        tree.bus.sink = self._collect  # every event, from the first: the local side forwards them
        try:
            async with open_tree(tree):
                self._ready = True
                self._settled.set()
                await stop.wait()
        except OtreeError:
            pass  # a failed start: its exit was recorded by the hook

    def _collect(self, event: Event) -> None:
        with self._lock:
            if len(self._events) >= EVENT_BUFFER:
                self._events.popleft()
                self._dropped += 1
            self._events.append((event.path, event.kind, event.reason, event.details))
            self._arrived.notify_all()
        if event.path == self._child_path and event.kind in _EXITS:
            self._cost = event.details.get("cost", 0.0)  # the wrapped child's spend, at its exit

    def events(self, wait: float) -> Batch:
        """The events collected since the last call (waiting up to ``wait`` s for one), and how
        many were dropped meanwhile because nobody took them."""
        with self._lock:
            if not self._events and not self._finished:
                self._arrived.wait(wait)
            return self._take()

    def _take(self) -> Batch:
        taken, dropped = list(self._events), self._dropped
        self._events.clear()
        self._dropped = 0
        return taken, dropped

    async def _record(self, path: str, exit_info: ExitInfo) -> None:
        self._exit = exit_info

    def ready(self) -> tuple[bool, dict[str, Any], Batch]:
        """Wait until the remote child is ready (True) or failed to start (False); with where the
        actor runs, and the events of the start, published before the local child is ready."""
        ray: Any = importlib.import_module("ray")  # only in an actor, where Ray is: to say where

        self._settled.wait()
        where = {
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }
        with self._lock:
            return self._ready, where, self._take()

    def ping(self, seconds: float) -> bool:
        """Whether the remote trio loop answers within ``seconds`` (False: it is blocked)."""
        with self._lock:
            token = self._token
        if token is None:
            return True  # not started yet: the start has its own timeout
        answered = threading.Event()
        try:
            token.run_sync_soon(answered.set)
        except trio.RunFinishedError:
            return True  # ended: run() is returning
        return answered.wait(seconds)

    def stop(self) -> None:
        """Stop the remote tree in order (its children's own graces apply)."""
        with self._lock:
            self._stop_asked = True
            token, stop = self._token, self._stop
        if token is not None and stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)
