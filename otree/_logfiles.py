"""Reading the event log: its files in order, a cut at a mark, and filters. Free of trio.

The writer is ``_eventlog``; the ``otree events`` command reads the files with
this module alone, with no tree running.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from pathlib import Path

import msgspec

from ._info import Event

__all__ = ["LOG_NAME", "EventFilter", "LogMark", "log_files", "read_events", "rotated_files"]

LOG_NAME = "events.jsonl"


class LogMark(msgspec.Struct, frozen=True):
    """A point in the log: the file's number (its name once rotated) and the offset it ends by."""

    generation: int
    offset: int


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


def rotated_files(state: Path) -> list[tuple[int, Path]]:
    """The rotated files and their numbers, oldest first."""
    found = []
    for candidate in state.glob(f"{LOG_NAME}.*"):
        suffix = candidate.name[len(LOG_NAME) + 1 :]
        if suffix.isdigit():
            found.append((int(suffix), candidate))
    return sorted(found)


def log_files(state: Path) -> list[Path]:
    """The log's files, oldest first."""
    files = [path for _, path in rotated_files(state)]
    current = state / LOG_NAME
    if current.exists():
        files.append(current)
    return files


def _read(path: Path, limit: int | None = None) -> bytes:
    try:
        with path.open("rb") as file:
            return file.read() if limit is None else file.read(limit)
    except FileNotFoundError:  # rotated away while we read the older files
        return b""


def _history(state: Path, until: LogMark | None) -> Iterator[tuple[Path, bytes]]:
    """The bytes of each log file, oldest first; with ``until``, only what precedes the mark."""
    if until is None:
        yield from ((path, _read(path)) for path in log_files(state))
        return
    rotated = rotated_files(state)
    current = state / LOG_NAME
    yield from ((path, _read(path)) for number, path in rotated if number < until.generation)
    marked = state / f"{LOG_NAME}.{until.generation}"
    if marked.exists():
        yield marked, _read(marked, until.offset)
        return
    if rotated and rotated[-1][0] > until.generation:
        return  # the marked file was rotated away: nothing from before the mark is left
    try:
        file = current.open("rb")
    except FileNotFoundError:
        return
    with file:
        if marked.exists():  # rotated between the listing and the open: the backup is the marked file
            yield marked, _read(marked, until.offset)
        else:  # the open file is the marked one, whatever happens to its name from now on
            yield current, file.read(until.offset)


def read_events(state: Path, until: LogMark | None = None) -> Iterator[Event | str]:
    """The logged events, oldest first, up to ``until`` when given.

    A line that does not decode (the torn last line of a log whose writer was
    killed) is yielded as a one-line description instead of being skipped silently.
    """
    decoder = msgspec.json.Decoder(Event)
    for path, data in _history(state, until):
        for number, line in enumerate(data.splitlines(), 1):
            if not line:
                continue
            try:
                yield decoder.decode(line)
            except msgspec.DecodeError as error:
                yield f"{path}:{number}: unreadable line skipped ({error})"
