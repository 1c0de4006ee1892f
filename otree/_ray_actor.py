"""Ray children, the remote side: the actor that runs a wrapped spec under otree's own runtime.

``Host`` is a plain class; ``_ray`` makes it a threaded Ray actor with three concurrency
groups: ``run`` (one thread, holding the remote tree's trio loop for the actor's life),
``ctl`` (``ready``, ``where``, ``ping``, ``stop``, ``control``, answered while ``run`` is busy)
and ``events`` (the local side's long poll, apart so that nothing queues behind it). The
remote tree is a root supervisor holding the wrapped spec alone, run once: its exit ends the
tree, and ``run`` returns that exit for the local child to end the same way.

The local side sees the remote tree through what ``events`` hands over: the events, and a
status snapshot of the wrapped child, remade in the remote trio loop after each burst of
events (and at least every ``SNAPSHOT_SECONDS`` while something in it may age) and sent only
when it changed. ``control`` carries an operator's or a handle's request into the remote tree.

Ray itself is imported only by ``where``, which runs in an actor, to say where it runs.
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

from ._errors import NotRunning, OtreeError
from ._info import Event, ExitInfo
from ._reaper import adopt_orphans
from ._spec import SupervisorSpec

__all__ = ["EVENT_BUFFER", "Batch", "Host", "Reply"]

# Remote events as (path, kind, reason, details), how many were dropped before them, and the
# wrapped child's status (a msgpack StatusNode) with its version, when newer than the caller's.
Batch = tuple[list[tuple[str, str, str, dict[str, Any]]], int, tuple[int, bytes] | None]
# What ``control`` answers: (True, the result) or (False, (error class name, its attributes, message)).
Reply = tuple[bool, Any]
SNAPSHOT_SECONDS = 1.0  # a quiet remote tree's status is remade this often (restart windows age)
# Events closer together than this share a snapshot: one costs ~50 us on the actor and ~80 us
# here for 100 remote children, ~1.3 ms and ~1.6 ms for 1,000 (msgpack both ways).
SNAPSHOT_GAP = 0.05
# The events that end a run of a child (their details carry its spend).
_EXITS = frozenset({"child.exited", "child.stopped", "child.start_failed"})
EVENT_BUFFER = 10_000  # remote events held for the local side, as a subscriber's buffer


class Host:
    """One remote run of a wrapped spec (one actor per run: a restart is a new actor)."""

    def __init__(self) -> None:
        # what to run comes with ``run``: an actor made ahead (a spare) is warm before it is needed,
        # the runtime it will run imported (not at module import: _run -> _supervisor -> _ray -> here)
        for module in ("_run", "_handles", "_status", "_ray_handles", "_paths"):
            importlib.import_module(f"{__package__}.{module}")
        self._root: SupervisorSpec | None = None
        self._state_dir = ""
        self._durable = False  # as the local tree's pools: a library tree without a state dir keeps none
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
        self._root_child_id = ""
        self._child_path = ""
        self._cost = 0.0
        self._top: Any = None  # the remote tree's root handle, while it runs
        self._snapshot: tuple[int, bytes] = (0, b"")  # the wrapped child's status, and its version
        self._changed: trio.Event | None = None  # an event since the last snapshot

    def run(self, root: SupervisorSpec, state_dir: str, durable: bool) -> dict[str, Any]:
        """Run the remote tree ``root`` (a root supervisor holding the wrapped spec alone) until
        its child exits or a stop; how the child's last run ended."""
        self._root, self._state_dir, self._durable = root, state_dir, durable
        self._root_child_id = root.children[0].id
        self._child_path = f"{root.id}/{self._root_child_id}"
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
        assert self._root is not None
        child = msgspec.structs.replace(self._root.children[0], on_exit=self._record)
        hooked = msgspec.structs.replace(self._root, children=(child,))
        tree = Tree(
            hooked, state_dir(self._state_dir), durable=self._durable, event_log=False, handles=HANDLES
        )
        tree.bus.sink = self._collect  # every event, from the first: the local side forwards them
        try:
            async with open_tree(tree) as root, trio.open_nursery() as nursery:
                self._top = root
                self._take_snapshot()  # the first, with the events of the start
                self._ready = True
                self._settled.set()
                nursery.start_soon(self._keep_snapshot)
                await stop.wait()
                nursery.cancel_scope.cancel()
        except OtreeError:
            pass  # a failed start: its exit was recorded by the hook
        finally:
            self._top = None

    async def _keep_snapshot(self) -> None:
        """Remake the status snapshot after each burst of events (at most one per
        ``SNAPSHOT_GAP``, however many events came), or every ``SNAPSHOT_SECONDS`` when none came."""
        while True:
            changed = self._changed = trio.Event()
            with trio.move_on_after(SNAPSHOT_SECONDS):
                await changed.wait()
            await trio.sleep(SNAPSHOT_GAP)  # the rest of the burst first
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        """The wrapped child's status now (in the remote trio loop, where its records live)."""
        from ._status import child_status  # not at import (see __init__)

        root = self._top
        if root is None:
            return
        data = msgspec.msgpack.encode(child_status(root, self._root_child_id).root)
        with self._lock:
            version, last = self._snapshot
            if data != last:
                self._snapshot = (version + 1, data)
                self._arrived.notify_all()

    def _collect(self, event: Event) -> None:
        with self._lock:
            if len(self._events) >= EVENT_BUFFER:
                self._events.popleft()
                self._dropped += 1
            self._events.append((event.path, event.kind, event.reason, event.details))
            self._arrived.notify_all()
        if self._changed is not None:
            self._changed.set()  # the sink is called in the remote trio loop
        if event.path == self._child_path and event.kind in _EXITS:
            self._cost = event.details.get("cost", 0.0)  # the wrapped child's spend, at its exit

    def events(self, wait: float, version: int) -> Batch:
        """The events collected since the last call (waiting up to ``wait`` s for one, or for a
        status newer than ``version``), how many were dropped meanwhile because nobody took
        them, and the status snapshot if it is newer than ``version``."""
        with self._lock:
            if not self._events and not self._finished and self._snapshot[0] == version:
                self._arrived.wait(wait)
            return self._take(version)

    def _take(self, version: int) -> Batch:
        taken, dropped = list(self._events), self._dropped
        self._events.clear()
        self._dropped = 0
        return taken, dropped, self._snapshot if self._snapshot[0] != version else None

    async def _record(self, path: str, exit_info: ExitInfo) -> None:
        self._exit = exit_info

    def ready(self) -> tuple[bool, dict[str, Any], Batch]:
        """Wait until the remote child is ready (True) or failed to start (False); with where the
        actor runs, and the events of the start, published before the local child is ready."""
        self._settled.wait()
        where = self.where()
        with self._lock:
            return self._ready, where, self._take(0)

    def where(self) -> dict[str, Any]:
        """Where the actor runs: the node's address and Ray id, and its process (answered at once:
        a spare's answer says it is up, warm and where)."""
        ray: Any = importlib.import_module("ray")  # only in an actor, where Ray is
        return {
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

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

    def control(
        self, op: str, ids: tuple[str, ...], args: tuple[Any, ...], cause: tuple[str, dict[str, Any]]
    ) -> Reply:
        """Carry out a request on the remote tree (``_ray_handles`` sends them): ``op(*args)`` on
        the supervisor or pool at ``ids`` below the remote root, in the remote trio loop, with
        ``cause`` = (the child it is about, details its events carry meanwhile: ``by``). Its
        errors come back as values, to be raised on the local side as themselves."""
        with self._lock:
            token = self._token
        if token is None:  # not yet: the local side sends requests only once the run is ready
            return _carried(NotRunning(self._child_path, "starting"))
        try:
            return trio.from_thread.run(self._control, op, ids, args, cause, trio_token=token)
        except trio.RunFinishedError:
            return _carried(NotRunning(self._child_path, "stopped"))

    async def _control(
        self, op: str, ids: tuple[str, ...], args: tuple[Any, ...], cause: tuple[str, dict[str, Any]]
    ) -> Reply:
        from ._poolops import POOL_OPS  # not at import (see __init__)
        from ._ray_handles import REMOTE_OPS

        root = self._top
        try:
            if root is None:
                raise NotRunning(self._child_path, "stopped")
            target = root.find("/".join(ids))
            about, details = cause
            end = root._tree.bus.attribute(f"{target.path}/{about}" if about else target.path, details)
            try:
                return True, await (REMOTE_OPS.get(op) or POOL_OPS[op])(target, *args)
            finally:
                end()
        except (OtreeError, ValueError, TypeError) as error:
            return _carried(error)


def _carried(error: Exception) -> Reply:
    """An error as ``control`` answers it: its class name, attributes and message."""
    return False, (type(error).__name__, dict(vars(error)), str(error))
