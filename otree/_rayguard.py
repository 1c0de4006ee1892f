"""What is left of a local Ray instance dies with otree, however otree ends.

A Ray instance that otree starts for a tree (the embedded default, ``--ray local:N``) is a
set of otree's descendants: the GCS and raylets die with otree by Ray's own parent-death
signal, but the agents each raylet starts (``DashboardAgent``, ``RuntimeEnvAgent``) were
seen to outlive a SIGKILL of otree for good: they notice their raylet is gone, then hang
reporting it to the dead GCS. A small watcher process, started once the instance is up,
holds a pidfd of every process of the instance and waits for the end of its standard
input, which only otree holds open: when otree ends (a clean stop, a crash or SIGKILL),
it SIGKILLs whatever of them is still alive. Pidfds make a reused pid harmless. The watcher
starts before the instance does and is told of each of its processes as it appears, so a
SIGKILL of otree while the instance comes up (seconds, for several nodes) leaves nothing either.
A watcher that dies (``kill -9``, the OOM killer) is replaced at once by one that holds them all.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RayGuard"]

_WATCHER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for otree, which stops Ray itself
fds = []
for line in sys.stdin.buffer:  # a pid a line; the end of file: otree has ended or is done with them
    try:
        fds.append(os.pidfd_open(int(line)))
    except OSError:  # gone already
        pass
for fd in fds:
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:  # exited already
        pass
"""

POLL_SECONDS = 0.05  # how often otree looks for new processes while an instance comes up
RESTART_SECONDS = 1.0  # how soon the keeper tries again when no watcher could be started


def descendants(root: int) -> set[int]:
    """Every live process below ``root``, by the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry))
    found: set[int] = set()
    frontier = [root]
    while frontier:
        below = [pid for parent in frontier for pid in children.get(parent, ())]
        found.update(below)
        frontier = below
    return found


class RayGuard:
    """The watcher of one local Ray instance's processes: every process below otree that was not
    there when the guard was made, and that ``holding_what_starts`` saw appear."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the watcher of the moment, and what it was told
        self._held: list[int] = []  # the instance's processes, in the order the watcher was told
        self._ignored: set[int] = set()  # the watchers, and what otree ran before: not Ray's
        self._closing = False
        self._wake, self._waker = os.pipe()  # written by close(): the keeper stops
        self._watcher, self._pidfd = self._start()
        self._ignored |= descendants(os.getpid())
        self._keeper = threading.Thread(target=self._keep, name="otree-rayguard", daemon=True)
        self._keeper.start()

    def _start(self) -> tuple[subprocess.Popen[bytes], int]:
        """A watcher told of every process held so far (under ``_lock``, or before the keeper runs)."""
        watcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a signal to otree's process group is not one to the watcher
        )
        self._ignored.add(watcher.pid)
        _tell(watcher, self._held)
        return watcher, os.pidfd_open(watcher.pid)

    def _keep(self) -> None:
        """The keeper thread: replace the watcher the moment it dies, until ``close``."""
        while True:
            waiter = select.poll()
            waiter.register(self._pidfd, select.POLLIN)  # readable once the watcher has exited
            waiter.register(self._wake, select.POLLIN)
            waiter.poll()
            with self._lock:
                if self._closing:
                    return
                os.close(self._pidfd)
                self._watcher.wait()
                while True:
                    try:
                        self._watcher, self._pidfd = self._start()
                        break
                    except OSError:  # no process can be started right now: try again shortly
                        time.sleep(RESTART_SECONDS)

    @contextmanager
    def holding_what_starts(self) -> Iterator[None]:
        """While the block starts the instance, tell the watcher of each new process below otree
        as it appears (every ``POLL_SECONDS``), and of the last ones once the block is done."""
        done = threading.Event()
        poller = threading.Thread(target=self._poll, args=(done,), name="otree-rayguard-poll", daemon=True)
        poller.start()
        try:
            yield
        finally:
            done.set()
            poller.join()
            self._hold_new()

    def _poll(self, done: threading.Event) -> None:
        while not done.wait(POLL_SECONDS):
            self._hold_new()

    def _hold_new(self) -> None:
        with self._lock:
            new = sorted(descendants(os.getpid()) - self._ignored.union(self._held))
            self._held.extend(new)
            _tell(self._watcher, new)

    def close(self) -> None:
        """Otree is done with the instance (it has shut it down, or failed to start it): whatever
        is left of it dies now."""
        with self._lock:
            self._closing = True
            os.write(self._waker, b"x")
            assert self._watcher.stdin is not None
            with contextlib.suppress(OSError):
                self._watcher.stdin.close()
        self._keeper.join()
        self._watcher.wait()
        for fd in (self._pidfd, self._wake, self._waker):
            os.close(fd)


def _tell(watcher: subprocess.Popen[bytes], pids: list[int]) -> None:
    """Tell ``watcher`` to hold ``pids`` (a watcher that died cannot be told: its keeper replaces it)."""
    assert watcher.stdin is not None
    with contextlib.suppress(OSError):
        watcher.stdin.write(b"".join(b"%d\n" % pid for pid in pids))
        watcher.stdin.flush()
