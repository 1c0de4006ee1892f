"""``otree run``'s own stdout and stderr: a reader that went away never reaches the tree.

A pipe whose reader closed (``otree run tree.py 2>&1 | head -1``: EPIPE), a
terminal that hung up (EIO) or a full disk (``2>/dev/full``: ENOSPC) makes a
write fail. ``otree run`` writes from inside the tree (every event line, under
whatever supervisor decision logged it), from tree files (``print``, also in the
reload thread), in its final message and in the interpreter's exit-time flush;
any of them raising would break the code that wrote. So ``otree run`` replaces
``sys.stdout`` and ``sys.stderr`` with streams whose lowest layer, the one
every writer goes through, drops what such a write refuses. Each stream's first
loss is told once (``OutputLosses.report_to``); other errors still raise.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["OutputLosses", "guard_output"]

# The reader is gone (EPIPE), the terminal hung up (EIO), the disk is full (ENOSPC).
_LOST = frozenset({errno.EPIPE, errno.EIO, errno.ENOSPC})

Report = Callable[[str, OSError], None]


class OutputLosses:
    """Which of otree's own streams lost a write, told once per stream to whoever listens.

    A loss is told from inside the failing write, in the thread that wrote and
    with the stream's buffer locked, so ``report`` must not write to the stream.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.counts: dict[str, int] = {}  # writes dropped per stream (``otree status`` shows them)
        self._untold: list[tuple[str, OSError]] = []  # losses before anyone listened
        self._report: Report | None = None

    def lost(self, stream: str, error: OSError) -> None:
        """A write to ``stream`` was dropped because of ``error``."""
        with self._lock:
            self.counts[stream] = self.counts.get(stream, 0) + 1
            if stream in self._seen:
                return
            self._seen.add(stream)
            report = self._report
            if report is None:
                self._untold.append((stream, error))
                return
        report(stream, error)

    def report_to(self, report: Report | None) -> None:
        """Tell ``report`` each stream's first loss: any already seen at once, later ones as they happen."""
        with self._lock:
            self._report = report
            if report is None:
                return
            untold, self._untold = self._untold, []
        for stream, error in untold:
            report(stream, error)


class _DroppingWriter(io.RawIOBase):
    """An fd written as is, except that a write refused for a gone reader is dropped (and told)."""

    def __init__(self, fd: int, stream: str, losses: OutputLosses) -> None:
        super().__init__()
        self.name = f"<{stream}>"  # as the stream it replaces
        self._fd = fd
        self._stream = stream
        self._losses = losses

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data: ReadableBuffer, /) -> int:
        try:
            return os.write(self._fd, data)
        except OSError as error:
            if error.errno not in _LOST:
                raise
            self._losses.lost(self._stream, error)
            return memoryview(data).nbytes  # taken: the buffer above must not hold it and fail again


def guard_output() -> OutputLosses:
    """Make this process's stdout and stderr drop what a gone reader refuses (``otree run`` owns its process).

    A stream that is not an open fd (a test's capture) is left as it is.
    """
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # EPIPE, not death (Python's default, made certain)
    losses = OutputLosses()
    for name in ("stdout", "stderr"):
        old = getattr(sys, name)
        try:
            fd = old.fileno()
        except (AttributeError, OSError, ValueError):  # None, a capture without an fd, a closed stream
            continue
        with contextlib.suppress(OSError):
            old.flush()  # nothing is left in the old buffer for the exit-time flush to fail on
        new = io.TextIOWrapper(
            io.BufferedWriter(_DroppingWriter(fd, name, losses)),
            encoding=old.encoding,
            errors=getattr(old, "errors", None),
            # unbuffered (python -u) becomes line-buffered: a whole line per write
            line_buffering=getattr(old, "line_buffering", False) or getattr(old, "write_through", False),
        )
        setattr(sys, name, new)
    return losses
