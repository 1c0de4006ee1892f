"""Leaving no process behind: the subreaper, orphan reaping, the stop sweep.

(Spawning, the parent-death signal and the guard that outlives a SIGKILL of
otree are the spawn helper's, in ``_spawner``.)

* ``adopt_orphans()`` marks otree child subreaper, so descendants orphaned by a
  child are re-parented to otree instead of init; ``Reaper`` reaps them (never a
  direct child, whose status its own runner waits for) and, when the tree stops,
  kills every process left of the tree, each with its whole group, until none is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio

__all__ = ["REAP_LOCK", "Reaper", "adopt_orphans", "kill_group"]

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


# Held while an orphan sweep runs and while a helper starts: a new helper must not be reaped
# as an orphan before otree waits for it.
REAP_LOCK = threading.Lock()


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


# --- orphans and the stop sweep -----------------------------------------------------------

SIGCHLD_COALESCE = 0.02  # the least time between two orphan sweeps under `otree run`
SWEEP_SECONDS = 5.0  # the most a stop spends killing what is left of the tree
SWEEP_PAUSE = 0.005  # between two passes: the processes just killed exit, their children come to otree


def _children(pid: int | str) -> set[int]:
    """Pids whose parent is ``pid`` (any of its threads); empty once ``pid`` is gone."""
    pids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            fd = os.open(f"/proc/{pid}/task/{task}/children", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            text = _read_all(fd)
        except OSError:
            continue
        finally:
            os.close(fd)
        pids.update(map(int, text.split()))
    return pids


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


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
        # called first by every sweep: registers the children just spawned whose pids are already known
        self.collect: Callable[[], None] = _nothing

    def sweep(self) -> None:
        """Reap every exited orphan."""
        with REAP_LOCK:
            self._reap()

    def _reap(self) -> set[int]:
        """Reap every exited orphan of ours; return the live ones."""
        live: set[int] = set()
        self.collect()
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
        """Sweep on SIGCHLD (main thread) or every half second (otherwise). Runs until cancelled.

        On SIGCHLD at most once per ``SIGCHLD_COALESCE``: a crash loop's exits are its runners'
        to reap, and one sweep then covers every orphan that exited meanwhile.
        """
        if threading.current_thread() is threading.main_thread() and self.reap_all:
            # otree run owns the process: while it waits out the pause, SIGCHLD has no handler (no
            # Python code and no wake per exit of a crash loop); the sweep that follows finds the
            # zombies (SIG_DFL keeps them)
            while True:
                with trio.open_signal_receiver(signal.SIGCHLD) as signals:
                    self.sweep()
                    await signals.__anext__()
                self.sweep()
                await trio.sleep(SIGCHLD_COALESCE)
        elif threading.current_thread() is threading.main_thread():
            # a host's own SIGCHLD handler must never run in between: it could reap otree's children
            with trio.open_signal_receiver(signal.SIGCHLD) as signals:
                self.sweep()
                async for _ in signals:
                    self.sweep()
                    await trio.sleep(SIGCHLD_COALESCE)
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


def _nothing() -> None:
    pass
