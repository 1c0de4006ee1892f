"""The event log: every event of a tree as one JSON line in ``<state dir>/events.jsonl``.

Appending is a list append in the tree's thread; a writer task encodes and
writes the collected events in a worker thread every ``interval`` seconds and
at shutdown, so the log never blocks a supervisor. A tree with nothing to log
costs nothing: after an interval without events the writer sleeps until the
next one (the bus's sink wakes it once, then is the plain append again). The file is size-rotated: a
full ``events.jsonl`` becomes ``events.jsonl.<N>`` with N one more than the last
backup's (numbers are never reused, so a name always means the same file), the
oldest backups beyond ``backups`` are removed, and a line is never split across
files. ``mark()`` cuts the stream at a point in time and tells where that point
lies in the files, so a reader can take the history from the files and the rest
from a live subscription without a gap or a duplicate.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec
import trio

from ._info import Event
from ._logfiles import LOG_NAME, LogMark, rotated_files

__all__ = ["EventLog"]

DEFAULT_MAX_BYTES = 10 << 20
DEFAULT_BACKUPS = 5
_log = logging.getLogger("otree")


class _Bus(Protocol):
    sink: Callable[[Event], None] | None


class _Mark:
    """A pending ``LogMark``: set once everything appended before it is written."""

    __slots__ = ("done", "mark")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.mark = LogMark(0, 0)  # set when written


def _settle(work: list[tuple[list[Event], _Mark | None]]) -> None:
    """Tell the marks in ``work`` (now written) where they fell."""
    for _, mark in work:
        if mark is not None:
            mark.done.set()


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
        if backups < 1:  # a mark's file must still be findable right after a rotation
            raise ValueError(f"event log backups must be >= 1; got {backups}")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.interval = interval
        self._pending: list[Event] = []  # one list for the log's life: ``append`` is its bound method
        self.append = self._pending.append  # the bus's sink: no Python frame per event
        # batches sealed for the writer, in order, each with the mark to set once it is written
        self._sealed: list[tuple[list[Event], _Mark | None]] = []
        self._encoder = msgspec.json.Encoder(enc_hook=_plain)
        self._lock = threading.Lock()  # the worker thread and the final flush never interleave
        self._fd = -1
        self._size = 0
        # the number the live file will get when it is rotated: one past the newest backup
        self._generation = max((number for number, _ in rotated_files(path.parent)), default=0) + 1
        self._wake = trio.Event()
        self._bus: _Bus | None = None
        self._finishing = False
        self.lost = 0  # events a write error kept out of the file
        self._open()

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        self._fd = os.open(self.path, flags, 0o600)
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            os.write(self._fd, b"\n")  # a line torn by a killed writer: ours start on a line of their own
        self._size = os.fstat(self._fd).st_size

    def _take(self) -> list[Event]:
        """The events appended since the last take."""
        batch = self._pending.copy()
        self._pending.clear()
        return batch

    def attach(self, bus: _Bus) -> None:
        """Take every event ``bus`` publishes."""
        self._bus = bus
        bus.sink = self.append

    def _first(self, event: Event) -> None:
        """The sink while the writer sleeps: take the event, wake the writer, be the plain append again."""
        self.append(event)
        if self._bus is not None:
            self._bus.sink = self.append
        self._wake.set()

    def mark(self) -> _Mark:
        """Cut the log here; the mark's ``done`` is set once every event appended so far is written."""
        pending = _Mark()
        self._sealed.append((self._take(), pending))
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
            work = self._seal()
            if work:
                # not abandoned on cancel: the batch is written before the writer stops
                await trio.to_thread.run_sync(self._write_batches, work)
                _settle(work)
            elif self._bus is not None and not self._finishing:
                # a whole interval without events: sleep until the next one (or a mark, or finish)
                self._bus.sink = self._first
                await self._wake.wait()

    def close(self) -> None:
        """Write everything still queued and close the file (after the tree has stopped)."""
        work = self._seal()
        self._write_batches(work)
        _settle(work)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _seal(self) -> list[tuple[list[Event], _Mark | None]]:
        """Everything appended or marked so far, in order, as the next work for the writer."""
        if self._pending:
            self._sealed.append((self._take(), None))
        work, self._sealed = self._sealed, []
        return work

    def _write_batches(self, work: list[tuple[list[Event], _Mark | None]]) -> None:
        with self._lock:
            for events, mark in work:
                if events:
                    try:
                        self._write(self._encode(events))
                    except OSError as error:  # a full disk must not stop the tree: say so, go on
                        self.lost += len(events)
                        _log.warning("event log %s: %d events not written: %s", self.path, len(events), error)
                if mark is not None:
                    mark.mark = LogMark(self._generation, self._size)

    def _encode(self, events: list[Event]) -> bytes:
        try:
            return self._encoder.encode_lines(events)
        except Exception:  # noqa: BLE001 - one bad detail (a repr that raises) must not lose the batch
            return b"".join(self._encode_one(event) for event in events)

    def _encode_one(self, event: Event) -> bytes:
        try:
            return self._encoder.encode_lines([event])
        except Exception as error:  # noqa: BLE001 - the event is kept, its details replaced
            details = {"unencodable_details": f"{type(error).__name__}: {error}"}
            return self._encoder.encode_lines(
                [Event(event.time, event.path, event.kind, event.reason, details)]
            )

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.max_bytes - self._size
            if len(view) <= room:
                cut = len(view)
            else:
                cut = bytes(view[:room]).rfind(b"\n") + 1 if room > 0 else 0
                if cut == 0:
                    if self._size > 0:  # not even one more line fits: start a new file
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
        directory = self.path.parent
        self.path.replace(directory / f"{LOG_NAME}.{self._generation}")
        for number, backup in rotated_files(directory):
            if number <= self._generation - self.backups:
                backup.unlink(missing_ok=True)
        self._generation += 1
        self._open()
