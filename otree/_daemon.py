"""What ``otree run`` does around a tree: one run per state dir, the control socket, signals, reload, systemd.

SIGTERM or SIGINT (or ``otree stop-tree``) stops the tree in order; a second
SIGINT during that stop kills what is left at once and the run exits 130.
SIGHUP (or ``otree reload``) re-reads the tree file; a file that does not load
leaves the running tree untouched. A terminal that hangs up sends SIGHUP too:
it is a reload like any other, and what the tree then writes to the dead
terminal is dropped (``_output``), its first loss told by a ``tree.output_lost``
event.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from ._control import ControlServer
from ._echo import EventEcho
from ._errors import OtreeError
from ._handles import HANDLES, SupervisorHandle
from ._info import Event
from ._loader import LoadError, load_tree
from ._output import OutputLosses
from ._paths import check_state_dir, control_socket, lock_file
from ._protocol import EXIT_INTERRUPTED
from ._run import open_tree, reload_tree
from ._sdnotify import SystemdNotifier
from ._spec import SupervisorSpec
from ._supervisor import Tree

__all__ = ["Daemon", "StateLocked", "lock_state"]


class StateLocked(Exception):
    """Another ``otree run`` holds the state dir."""


class SocketUnavailable(Exception):
    """The control socket cannot be served (the tree is stopped again)."""


def lock_state(state: Path) -> int:
    """Take the state dir's lock (held until the process ends) and write our pid in it.

    Raises:
      StateLocked: another run holds it (the message names its pid).
      OSError: the state dir is open to others (see ``check_state_dir``).
    """
    check_state_dir(state)
    fd = os.open(lock_file(state), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateLocked(f"a tree already runs on state dir {state} (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Daemon:
    """One ``otree run``: the tree from ``file``, served until it ends or is told to stop."""

    def __init__(
        self,
        file: str,
        attr: str,
        tree: SupervisorSpec,
        state: Path,
        *,
        echo: EventEcho,
        losses: OutputLosses,
    ) -> None:
        self.file = file
        self.attr = attr
        self.tree = tree
        self.state = state
        self.echo = echo
        self.losses = losses
        self.systemd = SystemdNotifier.from_environment()
        self.exit_code = 0
        # made before it starts, so a signal during the start reaches it (and its event log)
        self._tree = Tree(tree, state, durable=True, event_log=True, handles=HANDLES)
        self._sup: SupervisorHandle | None = None  # once the tree is up
        self._body = trio.CancelScope()  # cancelled to begin the orderly stop
        self._stopping = False
        self._reload_lock = trio.Lock()

    def _emit(self, path: str, kind: str, reason: str = "", **details: Any) -> None:
        self._tree.bus.emit(path, kind, reason, details)

    async def serve(self) -> Exception | None:
        """Run the tree until it ends or is stopped; its error, if any."""
        outcome: Exception | None = None
        self.losses.report_to(functools.partial(self._output_lost, trio.lowlevel.current_trio_token()))
        try:
            async with trio.open_nursery() as services:
                services.start_soon(self._watch_signals, services)
                services.start_soon(self.echo.serve)
                try:
                    with self._body:
                        async with open_tree(self._tree) as sup:
                            self._sup = sup
                            socket_path = control_socket(self.state)
                            try:
                                await services.start(self._control(sup).serve, socket_path)
                            except OSError as error:
                                raise SocketUnavailable(f"{socket_path}: {error.strerror or error}") from None
                            self._emit(sup.path, "control.listening", socket=str(socket_path))
                            self.systemd.send("READY=1", f"STATUS={self._summary()}")
                            services.start_soon(self.systemd.keep_alive)
                            await trio.sleep_forever()
                except (OtreeError, SocketUnavailable) as error:
                    outcome = error
                services.cancel_scope.cancel()
        finally:
            self.losses.report_to(None)  # the event log is closed
            if not self._stopping:  # the tree ended by itself (gave up, auto_shutdown)
                self.systemd.send("STOPPING=1")
            self.systemd.close()
        return outcome

    def _output_lost(self, token: trio.lowlevel.TrioToken, stream: str, error: OSError) -> None:
        """Tell the event log and subscribers that ``stream`` lost a write (once per stream).

        Called inside the failing write, so never through the ``otree`` logger, whose
        handlers write to that stream (NOTSET is never logged); from a thread, in trio's.
        """
        reason = errno.errorcode.get(error.errno or 0, "error")
        details = {"stream": stream, "detail": error.strerror or str(error)}
        event = Event(time.time(), self.tree.id, "tree.output_lost", reason, details)
        publish = functools.partial(self._tree.bus.publish, event, logging.NOTSET)
        if trio.lowlevel.in_trio_run():
            publish()
        else:
            with contextlib.suppress(trio.RunFinishedError):  # the run is over: nothing left to tell
                token.run_sync_soon(publish)

    def _control(self, sup: SupervisorHandle) -> ControlServer:
        return ControlServer(
            root=sup,
            root_info=self._tree.root_info,
            log=self._tree.log,
            reload=self.reload,
            set_level=self.echo.set_level,
            level=self.echo.level_name,
            stop_tree=self.stop,
            emit=self._tree.bus.emit,
            output_lost=self.losses.counts.copy,
        )

    def _summary(self) -> str:
        sup = self._sup
        if sup is None:
            return "starting"
        counts = sup.count_children()
        return f"{sup.path}: {counts.active} of {counts.specs} children running"

    def stop(self) -> None:
        """Begin the orderly stop (SIGTERM, SIGINT, ``otree stop-tree``)."""
        if not self._stopping:
            self._stopping = True
            self.systemd.send("STOPPING=1", "STATUS=stopping")
            self._body.cancel()

    def _kill(self) -> None:
        """A second Ctrl-C: whatever still runs is killed at once (mid-start too)."""
        self.exit_code = EXIT_INTERRUPTED
        self._body.cancel()
        self._tree.root.request_stop(kill_at=-math.inf)

    async def _watch_signals(self, services: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if not self._stopping:
                        self._signalled(name, "reload")
                        # in its own task: a stop signal during a long reload is served at once
                        services.start_soon(self._reload_quietly)
                elif self._stopping and signum == signal.SIGINT:
                    self._signalled(name, "kill")
                    self._kill()
                elif not self._stopping:
                    self._signalled(name, "stop")
                    self.stop()

    def _signalled(self, name: str, action: str) -> None:
        self._emit(self.tree.id, "tree.signal", name, action=action)

    async def _reload_quietly(self) -> None:
        """A SIGHUP reload: its outcome goes to the events, as nobody waits for an answer."""
        try:
            await self.reload()
        except (ValueError, OtreeError) as error:
            self._emit(self.tree.id, "supervisor.reload_failed", "error", detail=str(error))

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the tree file and apply it to the running tree.

        Raises:
          ValueError: the file does not load or names another root (the tree is untouched).
        """
        async with self._reload_lock:
            if self._sup is None or self._stopping:
                raise ValueError("the tree is starting or stopping")
            try:
                # in a thread: a tree file that takes its time to import must not freeze the tree
                tree = await trio.to_thread.run_sync(load_tree, self.file, self.attr, abandon_on_cancel=True)
            except LoadError as error:
                raise ValueError(str(error)) from None
            if self._stopping:
                raise ValueError("the tree is stopping")
            if tree.id != self.tree.id:
                raise ValueError(
                    f"the root's id changed ({self.tree.id} -> {tree.id}); restart otree to rename it"
                )
            summary: dict[str, Any] = await reload_tree(self._sup, tree)
            self.tree = tree
            self.systemd.send(f"STATUS={self._summary()}")
            return summary
