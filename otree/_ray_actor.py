"""Ray children, the remote side: the actor that runs a wrapped spec under otree's own runtime.

``Host`` is a plain class; ``_ray`` makes it a threaded Ray actor with two concurrency
groups: ``run`` (one thread, holding the remote tree's trio loop for the actor's life) and
``ctl`` (``ready``, ``ping``, ``stop``, answered while ``run`` is busy). The remote tree is a
root supervisor holding the wrapped spec alone, run once: its exit ends the tree, and
``run`` returns that exit for the local child to end the same way.

No module of Ray is imported here: the actor's methods only use trio, threads and otree.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import msgspec
import trio

from ._errors import OtreeError
from ._info import ExitInfo
from ._reaper import adopt_orphans
from ._spec import SupervisorSpec

__all__ = ["Host"]


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

    def run(self) -> dict[str, Any]:
        """Run the remote tree until its child exits or a stop; how the child's last run ended."""
        # the actor process is this tree's alone: orphans of its process children come to it
        adopt_orphans()
        try:
            trio.run(self._serve)
        finally:
            self._settled.set()
        return {"reason": self._exit.reason, "detail": self._exit.detail}

    async def _serve(self) -> None:
        from ._run import open_supervisor  # not at import: _run -> _supervisor -> _ray -> here

        stop = trio.Event()
        with self._lock:
            self._token, self._stop = trio.lowlevel.current_trio_token(), stop
            if self._stop_asked:
                stop.set()
        # the hook is made here: a bound method of this actor cannot travel in the pickled spec
        child = msgspec.structs.replace(self._root.children[0], on_exit=self._record)
        hooked = msgspec.structs.replace(self._root, children=(child,))
        try:
            async with open_supervisor(hooked, state_dir=self._state_dir, event_log=False):
                self._ready = True
                self._settled.set()
                await stop.wait()
        except OtreeError:
            pass  # a failed start: its exit was recorded by the hook

    async def _record(self, path: str, exit_info: ExitInfo) -> None:
        self._exit = exit_info

    def ready(self) -> bool:
        """Wait until the remote child is ready (True) or failed to start (False)."""
        self._settled.wait()
        return self._ready

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
