"""The event log: every event of a tree as one JSON line in ``<state dir>/events.jsonl``.

Appending is a list append in the tree's thread; a writer task encodes and
writes the collected events in a worker thread every ``interval`` seconds and
at shutdown, so the log never blocks a supervisor. The file is size-rotated
(``events.jsonl.1`` is the newest backup) and a line is never split across
files. ``mark()`` cuts the stream at a point in time and tells where that point
lies in the files, so a reader can take the history from the files and the rest
from a live subscription without a gap or a duplicate.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import trio

from ._events import Event

__all__ = ["LOG_NAME", "EventFilter", "EventLog", "LogMark", "log_files", "read_events"]

LOG_NAME = "events.jsonl"
DEFAULT_MAX_BYTES = 10 << 20
DEFAULT_BACKUPS = 5


class LogMark(msgspec.Struct, frozen=True):
    """A point in the log: the file (by inode) and the byte offset every earlier event ends by."""

    inode: int
    offset: int


class _Mark:
    """A pending ``LogMark``: set once everything appended before it is written."""

    __slots__ = ("done", "mark")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.mark = LogMark(0, 0)


def _plain(value: object) -> str:
    """Details are plain values; anything else is written as its repr rather than lost."""
    return repr(value)


class EventLog:
    """Buffered, size-rotated JSON-lines writer of one tree's events."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        interval: float = 0.2,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.interval = interval
        self._pending: list[Event] = []
        # batches sealed for the writer, in order, each with the mark to set once it is written
        self._sealed: list[tuple[list[Event], _Mark | None]] = []
        self._encoder = msgspec.json.Encoder(enc_hook=_plain)
        self._lock = threading.Lock()  # the worker thread and the final flush never interleave
        self._fd = -1
        self._size = 0
        self._inode = 0
        self._wake = trio.Event()
        self._finishing = False
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        stat = os.fstat(self._fd)
        self._size = stat.st_size
        self._inode = stat.st_ino

    def append(self, event: Event) -> None:
        """Queue ``event`` for the file (the bus's sink)."""
        self._pending.append(event)

    def mark(self) -> _Mark:
        """Cut the log here; the mark's ``done`` is set once every event appended so far is written."""
        pending = _Mark()
        self._sealed.append((self._pending, pending))
        self._pending = []
        self._wake.set()
        return pending

    def finish(self) -> None:
        """Let ``serve`` write what it holds and return (the tree has stopped)."""
        self._finishing = True
        self._wake.set()

    async def serve(self) -> None:
        """Write what was appended every ``interval`` seconds (at once after a mark) until ``finish()``."""
        while not self._finishing:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._pending:
                self._sealed.append((self._pending, None))
                self._pending = []
            if self._sealed:
                work, self._sealed = self._sealed, []
                # not abandoned on cancel: the batch is written before the writer stops
                await trio.to_thread.run_sync(self._write_batches, work)
                for _, mark in work:
                    if mark is not None:
                        mark.done.set()

    def close(self) -> None:
        """Write everything still queued and close the file (after the tree has stopped)."""
        work, self._sealed = self._sealed, []
        if self._pending:
            work.append((self._pending, None))
            self._pending = []
        self._write_batches(work)
        for _, mark in work:
            if mark is not None:
                mark.done.set()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _write_batches(self, work: list[tuple[list[Event], _Mark | None]]) -> None:
        with self._lock:
            for events, mark in work:
                if events:
                    self._write(self._encoder.encode_lines(events))
                if mark is not None:
                    mark.mark = LogMark(self._inode, self._size)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.max_bytes - self._size
            if len(view) <= room:
                cut = len(view)
            else:
                cut = bytes(view[:room]).rfind(b"\n") + 1
                if cut == 0:
                    if self._size > 0:  # not even one line fits: start a new file
                        self._rotate()
                        continue
                    cut = bytes(view).find(b"\n") + 1  # a line longer than max_bytes gets a file
            os.write(self._fd, view[:cut])
            self._size += cut
            view = view[cut:]
            if view:
                self._rotate()

    def _rotate(self) -> None:
        os.close(self._fd)
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{LOG_NAME}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{LOG_NAME}.{index + 1}"))
        if self.backups > 0:
            self.path.replace(self.path.with_name(f"{LOG_NAME}.1"))
        else:
            self.path.unlink()
        self._open()


class EventFilter(msgspec.Struct, frozen=True):
    """Which events a reader wants: a subtree ``path``, a ``kind`` glob, events at or after ``since``.

    ``path`` may leave out the root's id (``alice`` matches ``fleet/alice``), as
    the control commands allow.
    """

    path: str = ""
    kind: str = ""
    since: float | None = None

    def _under(self, path: str) -> bool:
        wanted = self.path
        if path == wanted or path.startswith(wanted + "/"):
            return True
        _, _, below_root = path.partition("/")
        return below_root == wanted or below_root.startswith(wanted + "/")

    def __call__(self, event: Event) -> bool:
        if self.path and not self._under(event.path):
            return False
        if self.kind and not fnmatch.fnmatchcase(event.kind, self.kind):
            return False
        return self.since is None or event.time >= self.since


def log_files(state: Path) -> list[Path]:
    """The log's files, oldest first."""
    backups = []
    for candidate in state.glob(f"{LOG_NAME}.*"):
        suffix = candidate.name[len(LOG_NAME) + 1 :]
        if suffix.isdigit():
            backups.append((int(suffix), candidate))
    files = [path for _, path in sorted(backups, reverse=True)]
    current = state / LOG_NAME
    if current.exists():
        files.append(current)
    return files


def read_events(state: Path, until: LogMark | None = None) -> Iterator[Event | str]:
    """The logged events, oldest first, up to ``until`` when given.

    A line that does not decode (the torn last line of a log whose writer was
    killed) is yielded as a one-line description instead of being skipped silently.
    """
    decoder = msgspec.json.Decoder(Event)
    files = log_files(state)
    limit: dict[Path, int] = {}
    if until is not None:
        for index, path in enumerate(files):
            try:
                inode = path.stat().st_ino
            except FileNotFoundError:
                continue
            if inode == until.inode:
                limit[path] = until.offset
                files = files[: index + 1]
                break
    for path in files:
        try:
            with path.open("rb") as file:
                data: Any = file.read(limit[path]) if path in limit else file.read()
        except FileNotFoundError:  # rotated away while we read the older files
            continue
        for number, line in enumerate(data.splitlines(), 1):
            if not line:
                continue
            try:
                yield decoder.decode(line)
            except msgspec.DecodeError as error:
                yield f"{path}:{number}: unreadable line skipped ({error})"
