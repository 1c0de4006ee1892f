"""Leaving no process behind: the spawner thread, the subreaper, orphan reaping, the guard.

* Process children are forked from one dedicated thread that lives as long as
  the interpreter. Each gets ``PR_SET_PDEATHSIG(SIGKILL)`` between fork and exec;
  Linux sends it when the *thread* that forked exits, so trio's short-lived
  worker threads would kill children at random. After setting it the child
  checks ``getppid()``, in case otree died before the flag was set, then tells
  the guard its process group itself, before its program runs.
* ``adopt_orphans()`` marks otree child subreaper, so descendants orphaned by a
  child are re-parented to otree instead of init; ``Reaper`` reaps them (never a
  direct child, whose status its own runner waits for) and, when the tree stops,
  kills every process left of the tree, each with its whole group, until none is left.
* The guard is a tiny process outside every child's group that learns each
  child's process group through a socket; when the socket closes because otree
  died (even by SIGKILL), it kills the groups that still have members. A thread
  watches it and replaces it the moment it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import queue
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
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


def _prepare_child(parent: int, setup: ChildSetup, guard: socket.socket | None) -> None:
    """Runs in the child between fork and exec: limits, the user, the death signal, then the guard.

    Limits come first (raising one may need root); the death signal comes after the
    user, because the kernel clears it when the credentials change. No lookups here:
    the groups were resolved in otree (NSS must not run in a child forked from threads).
    The child tells the guard its group itself: otree learns the pid only once the
    program runs, and a program that forks at once would otherwise leave a window in
    which a SIGKILL of otree strands its grandchildren.
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
    if guard is not None:
        with contextlib.suppress(OSError):  # a dead guard: its replacement learns the group from otree
            guard.send(b"+%d\n" % os.getpid(), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)


_Job = tuple[
    dict[str, Any],
    Callable[[int], None],
    "Guard | None",
    Callable[[BaseException | subprocess.Popen[bytes]], None],
]

# Held while a child is forked and registered, while orphans are swept and while a guard
# starts: a child that exits at once must not be reaped as an orphan before its runner
# knows its pid, nor a new guard before otree waits for it.
REAP_LOCK = threading.Lock()


def _popen(kwargs: dict[str, Any], guard: Guard | None) -> subprocess.Popen[bytes]:
    """``Popen(**kwargs)``, with the guard's list kept true whether the exec succeeds or not."""
    popen: subprocess.Popen[bytes] = subprocess.Popen.__new__(subprocess.Popen)
    try:
        popen.__init__(**kwargs)  # type: ignore[misc]  # two steps: the pid outlives a failed exec
    except BaseException:
        pid = getattr(popen, "pid", None)
        if guard is not None and pid is not None:
            guard.forget(pid)  # the child told the guard before its exec failed; the pid is free again
        raise
    if guard is not None:
        guard.watch(popen.pid)
    return popen


class _Spawner:
    """One long-lived thread that forks every process child."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _serve(self) -> None:
        while True:
            kwargs, register, guard, deliver = self._jobs.get()
            result: BaseException | subprocess.Popen[bytes]
            try:
                with REAP_LOCK:
                    result = popen = _popen(kwargs, guard)
                    register(popen.pid)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
                result = exc
            deliver(result)

    async def spawn(
        self, register: Callable[[int], None], setup: ChildSetup, guard: Guard | None, **kwargs: Any
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

        channel = guard.channel if guard is not None else None
        kwargs["preexec_fn"] = functools.partial(_prepare_child, os.getpid(), setup, channel)
        self._jobs.put((kwargs, register, guard, deliver))
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
    guard: Guard | None = None,
    **kwargs: Any,
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, start_new_session=True, ...)`` from the spawner thread, never a shell.

    ``register(pid)`` runs in that thread, under ``REAP_LOCK``, before the orphan reaper
    can see the new child; ``setup`` runs in the child before exec; ``guard`` learns the
    child's group before its program runs.
    """
    return await _spawner.spawn(
        register, setup, guard, args=argv, shell=False, start_new_session=True, **kwargs
    )


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

# Its groups: its arguments, then "+pgid" / "-pgid" messages on stdin (a SOCK_SEQPACKET socket),
# until end of file: otree is gone.
_GUARD = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups = {int(word) for word in sys.argv[1:]}
try:
    while message := os.read(0, 65536):
        for word in message.split():
            if word[:1] == b"+":
                groups.add(int(word[1:]))
            elif word[:1] == b"-":
                groups.discard(int(word[1:]))
except OSError:
    pass
for pgid in groups:
    try:
        os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""

GUARD_EXIT_SECONDS = 5.0  # how long a clean stop waits for the guard to exit before killing it
GUARD_RETRY_SECONDS = 1.0  # how soon the keeper tries again when no guard could be started


class Guard:
    """The process that kills every child's group if otree dies without stopping them.

    Each child tells the guard its group before exec, and otree tells it again and
    keeps the same list. A keeper thread waits on the guard's pidfd and replaces a
    guard that died at once, with one that has every group as its arguments, so it
    knows them all from its first instruction. ``channel`` keeps its descriptor
    number across replacements (the new socket is ``dup2``'d onto it): a child
    forked at any moment reaches the current guard.
    """

    def __init__(self, waited: set[int]) -> None:
        self._waited = waited  # the reaper's: the guard is a child otree waits for itself
        self._groups: set[int] = set()
        self._lock = threading.Lock()  # what otree lists and what the guard was told stay the same
        self._closing = False
        self.channel, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        with REAP_LOCK, contextlib.suppress(OSError):  # none can start right now: the keeper tries again
            self._start(far)
        self._keeper = threading.Thread(target=self._keep, name="otree-guard", daemon=True)
        self._keeper.start()

    def _start(self, far: socket.socket) -> None:
        """Start a guard reading ``far`` (under REAP_LOCK: otree waits for it, the reaper must not)."""
        # Its own session: a Ctrl-C to otree's terminal must not reach it first.
        with far:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _GUARD, *map(str, sorted(self._groups))],
                stdin=far.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        self._waited.add(proc.pid)
        self._proc, self._pidfd = proc, os.pidfd_open(proc.pid)

    def _keep(self) -> None:
        """The keeper thread: replace the guard the moment it dies, until ``close``."""
        while True:
            if self._proc is not None:
                waiter = select.poll()
                waiter.register(self._pidfd, select.POLLIN)
                waiter.poll()  # the pidfd is readable once the guard has exited
            with REAP_LOCK, self._lock:
                if self._closing:
                    return
                self._release()
                near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                with near:
                    try:
                        self._start(far)
                    except OSError:  # no process can be started right now: try again shortly
                        pass
                    else:
                        os.dup2(near.fileno(), self.channel.fileno(), inheritable=False)
            if self._proc is None:
                time.sleep(GUARD_RETRY_SECONDS)

    def _release(self) -> None:
        """Reap the guard (it has exited) and stop waiting for it."""
        if self._proc is not None:
            self._proc.wait()
            os.close(self._pidfd)
            self._waited.discard(self._proc.pid)
            self._proc, self._pidfd = None, -1

    def _tell(self, line: str) -> None:
        with contextlib.suppress(OSError):  # a dead guard: the keeper's replacement gets every group
            self.channel.send(f"{line}\n".encode(), socket.MSG_NOSIGNAL)

    def watch(self, pgid: int) -> None:
        with self._lock:
            self._groups.add(pgid)
            self._tell(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        with self._lock:
            self._groups.discard(pgid)
            self._tell(f"-{pgid}")

    def close(self) -> None:
        """The tree has stopped: let the guard go (it kills whatever is still listed) and reap it."""
        with self._lock:
            self._closing = True
            self.channel.close()
            proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=GUARD_EXIT_SECONDS)
            except subprocess.TimeoutExpired:  # stopped by someone: it has nothing left to kill
                proc.kill()
                proc.wait()
        self._keeper.join()
        self._release()


# --- orphans and the stop sweep -----------------------------------------------------------

SWEEP_SECONDS = 5.0  # the most a stop spends killing what is left of the tree
SWEEP_PAUSE = 0.005  # between two passes: the processes just killed exit, their children come to otree


def _children(pid: int | str) -> set[int]:
    """Pids whose parent is ``pid`` (any of its threads); empty once ``pid`` is gone."""
    pids: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return pids
    for task in tasks:
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        pids.update(int(child) for child in text.split())
    return pids


def _group_and_session(pid: int) -> tuple[int, int] | None:
    """``(process group, session)`` of a live process; None for a zombie or a process that is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, _ppid, pgrp, session = text[text.rindex(")") + 2 :].split()[:4]
    return None if state in ("Z", "X") else (int(pgrp), int(session))


def _descendants(roots: set[int]) -> dict[int, tuple[int, int]]:
    """The live processes among ``roots`` and all their descendants, with their group and session."""
    found: dict[int, tuple[int, int]] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        ids = _group_and_session(pid)
        if ids is not None and pid not in found:
            found[pid] = ids
            todo.extend(_children(pid))
    return found


class Reaper:
    """Reaps orphans re-parented to otree, never a status someone else waits for.

    Under ``otree run`` (``reap_all``) every zombie child but the waited ones is
    reaped, and every process of the tree is killed when it stops; in library mode
    only those in process groups otree created, so the host's own subprocesses are
    left to the host.
    """

    adopting = False  # set by adopt_orphans()
    reap_all = False  # set by `otree run`, which owns the whole process

    def __init__(self) -> None:
        self.waited: set[int] = set()  # direct children whose runners wait for them
        self.groups: set[int] = set()  # process groups otree created and still owns

    def sweep(self) -> None:
        """Reap every exited orphan."""
        with REAP_LOCK:
            self._reap()

    def _reap(self) -> set[int]:
        """Reap every exited orphan of ours; return the live ones."""
        live: set[int] = set()
        for pid in _children("self") - self.waited:
            if not self.reap_all and _pgid(pid) not in self.groups:
                continue  # the host's own child, in library mode: not ours to touch
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if not reaped:
                live.add(pid)
        return live

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

    def kill_all(self, timeout: float = SWEEP_SECONDS) -> None:
        """The tree has stopped: kill what is left of it, pass after pass, until nothing is.

        Each pass takes the live orphans, all their descendants, and the whole process
        group of each one that lives in a session other than otree's (an escaper's
        group, and so its session, goes at once); processes that were children of the
        ones killed come to otree (the subreaper) and are found by the next pass.
        ``timeout`` bounds it: a process stuck in the kernel can outlast SIGKILL.
        """
        deadline = time.monotonic() + timeout
        own_session = os.getsid(0)
        while True:
            with REAP_LOCK:
                signalled = False
                for pid, (pgid, session) in _descendants(self._reap()).items():
                    if session != own_session:
                        kill_group(pgid, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                        signalled = True
            if not signalled or time.monotonic() >= deadline:
                return
            time.sleep(SWEEP_PAUSE)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return -1
        raise
