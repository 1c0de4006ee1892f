"""What is left of a local Ray instance dies with otree, however otree ends.

A Ray instance that otree starts for a tree (the embedded default, ``--ray local:N``) is a
set of otree's descendants: the GCS and raylets die with otree by Ray's own parent-death
signal, but the agents each raylet starts (``DashboardAgent``, ``RuntimeEnvAgent``) were
seen to outlive a SIGKILL of otree for good: they notice their raylet is gone, then hang
reporting it to the dead GCS. A small watcher process, started once the instance is up,
holds a pidfd of every process of the instance and waits for the end of its standard
input, which only otree holds open: when otree ends (a clean stop, a crash or SIGKILL),
it SIGKILLs whatever of them is still alive. Pidfds make a reused pid harmless.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable

__all__ = ["RayGuard", "descendants"]

_WATCHER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for otree, which stops Ray itself
fds = []
for word in sys.argv[1:]:
    try:
        fds.append(os.pidfd_open(int(word)))
    except OSError:  # gone already
        pass
sys.stdin.buffer.read()  # end of file: otree has ended or is done with this instance
for fd in fds:
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:  # exited already
        pass
"""


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
    """The watcher of one local Ray instance's processes (``pids``)."""

    def __init__(self, pids: Iterable[int]) -> None:
        self._watcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHER, *map(str, sorted(pids))],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a signal to otree's process group is not one to the watcher
        )

    def close(self) -> None:
        """Otree is done with the instance (it has shut it down): whatever is left of it dies now."""
        assert self._watcher.stdin is not None
        self._watcher.stdin.close()
        self._watcher.wait()
