"""Leaving no process behind: the spawner thread, the subreaper, orphan reaping, the guard.

* Process children are forked from one dedicated thread that lives as long as
  the interpreter. Each gets ``PR_SET_PDEATHSIG(SIGKILL)`` between fork and exec;
  Linux sends it when the *thread* that forked exits, so trio's short-lived
  worker threads would kill children at random. After setting it the child
  checks ``getppid()``, in case otree died before the flag was set.
* ``adopt_orphans()`` marks otree child subreaper, so descendants orphaned by a
  child are re-parented to otree instead of init; ``Reaper`` reaps them (never a
  direct child, whose status its own runner waits for) and kills the ones still
  alive when the tree stops.
* The guard is a tiny process outside every child's group that learns each
  child's process group through a pipe; when the pipe closes because otree
  died (even by SIGKILL), it kills the groups that still have members.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import trio

__all__ = ["ChildSetup", "Guard", "Reaper", "adopt_orphans", "spawn"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def adopt_orphans() -> None:
    """Make this process child subreaper: orphaned descendants of its children come to it.

    ``otree run`` does this itself; in library mode it is opt-in, because the
    host then owns whatever orphans appear.
    """
    if _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
    Reaper.adopting = True


# --- the spawner thread -----------------------------------------------------------


class ChildSetup(NamedTuple):
    """What a child sets up between fork and exec, besides dying with otree."""

    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard)
    user: tuple[int, int, tuple[int, ...]] | None = None  # (uid, gid, supplementary groups)


def _prepare_child(parent: int, setup: ChildSetup) -> None:
    """Runs in the child between fork and exec: limits, then the user, then the death signal.

    Limits come first (raising one may need root); the death signal comes last,
    because the kernel clears it when the credentials change. No lookups here:
    the groups were resolved in otree (NSS must not run in a child forked from threads).
    """
    for which, soft, hard in setup.rlimits:
        resource.setrlimit(which, (soft, hard))
    if setup.user is not None:
        uid, gid, groups = setup.user
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # otree died before the flag was set
        os._exit(127)


_Job = tuple[dict[str, Any], Callable[[int], None], Callable[[BaseException | subprocess.Popen[bytes]], None]]

# Held while a child is forked and registered, and while orphans are swept: a child that
# exits at once must not be reaped as an orphan before its runner knows its pid.
REAP_LOCK = threading.Lock()


class _Spawner:
    """One long-lived thread that forks every process child."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _serve(self) -> None:
        while True:
            kwargs, register, deliver = self._jobs.get()
            try:
                with REAP_LOCK:
                    result: BaseException | subprocess.Popen[bytes] = subprocess.Popen(**kwargs)  # type: ignore[assignment]
                    register(result.pid)  # type: ignore[union-attr]
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
                result = exc
            deliver(result)

    async def spawn(
        self, register: Callable[[int], None], setup: ChildSetup, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="otree-spawner", daemon=True)
                self._thread.start()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[BaseException | subprocess.Popen[bytes]] = []

        def deliver(result: BaseException | subprocess.Popen[bytes]) -> None:
            box.append(result)
            token.run_sync_soon(done.set)

        kwargs["preexec_fn"] = functools.partial(_prepare_child, os.getpid(), setup)
        self._jobs.put((kwargs, register, deliver))
        with trio.CancelScope(shield=True):  # a fork in flight finishes; the caller then owns it
            await done.wait()
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result


_spawner = _Spawner()


async def spawn(
    argv: list[str],
    register: Callable[[int], None] = lambda pid: None,
    setup: ChildSetup = ChildSetup(),  # noqa: B008 - an immutable NamedTuple
    **kwargs: Any,
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, start_new_session=True, ...)`` from the spawner thread, never a shell.

    ``register(pid)`` runs in that thread, under ``REAP_LOCK``, before the orphan reaper
    can see the new child; ``setup`` runs in the child before exec.
    """
    return await _spawner.spawn(register, setup, args=argv, shell=False, start_new_session=True, **kwargs)


# --- process groups -----------------------------------------------------------------


def kill_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the group; False if it has no members left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed uid; nothing otree may do about it
        return False
    return True


# --- the guard -----------------------------------------------------------------------

_GUARD = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups = set()
for line in sys.stdin.buffer:
    word = line.strip()
    if word[:1] == b"+":
        groups.add(int(word[1:]))
    elif word[:1] == b"-":
        groups.discard(int(word[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class Guard:
    """The process that kills every child's group if otree dies without stopping them.

    A guard that died (killed by someone) is replaced at the next change and told
    every group still watched.
    """

    def __init__(self, waited: set[int]) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._waited = waited  # the reaper's: the guard is a child otree waits for itself
        self._groups: set[int] = set()

    def _start(self) -> subprocess.Popen[bytes]:
        # Its own session: a Ctrl-C to otree's terminal must not reach it first.
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self._waited.add(proc.pid)
        return proc

    def _tell(self, proc: subprocess.Popen[bytes], lines: list[str]) -> bool:
        assert proc.stdin is not None
        try:
            proc.stdin.write("".join(f"{line}\n" for line in lines).encode())
            proc.stdin.flush()
        except BrokenPipeError:
            return False
        return True

    def _send(self, line: str) -> None:
        if self._proc is not None and self._tell(self._proc, [line]):
            return
        if self._proc is not None:  # it died: reap it, start another and tell it everything
            self._discard(self._proc)
        self._proc = self._start()
        self._tell(self._proc, [f"+{pgid}" for pgid in sorted(self._groups)])

    def watch(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self._groups.discard(pgid)
        if self._proc is not None:
            self._send(f"-{pgid}")

    def _discard(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # a guard that died cannot be told
            proc.stdin.close()
        proc.wait()
        self._waited.discard(proc.pid)

    def close(self) -> None:
        """The tree has stopped: let the guard go (it kills whatever is still listed)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._discard(proc)


# --- orphans ---------------------------------------------------------------------------


def _direct_children() -> set[int]:
    """Pids whose parent is this process (any of its threads)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        pids.update(int(pid) for pid in text.split())
    return pids


class Reaper:
    """Reaps orphans re-parented to otree, never a status someone else waits for.

    Under ``otree run`` (``reap_all``) every zombie child but the waited ones is
    reaped; in library mode only those in process groups otree created, so the
    host's own subprocesses are left to the host.
    """

    adopting = False  # set by adopt_orphans()
    reap_all = False  # set by `otree run`, which owns the whole process

    def __init__(self) -> None:
        self.waited: set[int] = set()  # direct children whose runners wait for them
        self.groups: set[int] = set()  # process groups otree created and still owns
        self.orphans: set[int] = set()  # adopted descendants seen alive

    def sweep(self) -> None:
        """Reap every exited orphan; remember the live ones (to kill when the tree stops)."""
        with REAP_LOCK:
            self._sweep()

    def _sweep(self) -> None:
        for pid in _direct_children() - self.waited:
            if not self.reap_all and _pgid(pid) not in self.groups:
                continue  # the host's own child, in library mode: not ours to touch
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped = pid
            if reaped:
                self.orphans.discard(pid)
            else:
                self.orphans.add(pid)

    async def serve(self) -> None:
        """Sweep on SIGCHLD (main thread) or every half second (otherwise). Runs until cancelled."""
        if threading.current_thread() is threading.main_thread():
            with trio.open_signal_receiver(signal.SIGCHLD) as signals:
                self.sweep()
                async for _ in signals:
                    self.sweep()
        else:
            while True:
                self.sweep()
                await trio.sleep(0.5)

    def kill_orphans(self) -> None:
        """Kill the adopted descendants still alive (those that left their group with setsid)."""
        self.sweep()
        self.orphans &= _direct_children()  # never signal a pid that is no longer ours
        for pid in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.orphans:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.orphans.clear()


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return -1
        raise
