"""A process child's log files as ``otree logs`` reads them: straight from the state dir, free of trio.

No tree needs to run: the files are ``<state dir>/logs/<child path as nested
folders>/stdout.log`` (and ``stderr.log``; a logged process job's are in
``<pool path>/jobs/<job id>/``), rotated to ``.1`` (newest) ... ``.N``
by the writer in ``_process``. Following survives rotation: the file being read
is read to its end, then the files rotated after it, then the new one.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ._paths import ID_PATTERN

__all__ = ["FOLLOW_POLL", "NoLog", "find_log", "follow", "last_lines"]

FOLLOW_POLL = 0.2  # seconds between looks at a followed log that has nothing new
_BLOCK = 65536
_SHOWN = 10  # log paths named in a "no log" line


class NoLog(Exception):
    """No such log; the message is the one line for the user."""


def find_log(state: Path, path: str, stream: str) -> Path:
    """The log file of the child at ``path`` (with or without the root's id), for ``stream``;
    or of the logged process job ``path`` names as ``POOL/JOB_ID``.

    Raises:
      NoLog: none (not a process child, its stream is not ``"log"``, or it never
        ran), or ``path`` without the root's id names children of several trees.
    """
    logs = state / "logs"
    name = f"{stream}.log"
    ids = [part for part in path.split("/") if part]
    if not ids:
        raise NoLog(f"{path!r} names no child")
    strange = next((part for part in ids if not re.fullmatch(ID_PATTERN, part)), None)
    if strange is not None:  # such as ".." (never a child's id): nothing outside the logs is read
        raise NoLog(f"{path!r} is not a child path: {strange!r} does not match {ID_PATTERN}")
    roots = sorted(entry.name for entry in _entries(logs) if entry.is_dir() and entry.name != ids[0])
    # ``POOL/JOB_ID`` names a logged process job too: its logs are under ``<pool>/jobs/<id>``
    spellings = [ids, [*ids[:-1], "jobs", ids[-1]]] if ids[-1].isdigit() and len(ids) > 1 else [ids]
    bases = [logs, *(logs / root for root in roots)]
    candidates = [base.joinpath(*spelling) for base in bases for spelling in spellings]
    found = [candidate / name for candidate in candidates if (candidate / name).is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(str(log.parent.relative_to(logs)) for log in found)
        raise NoLog(f"{path} names the logs of several trees: {names} (give the whole path)")
    known = sorted(str(log.parent.relative_to(logs)) for log in logs.rglob(name)) if logs.is_dir() else []
    listed = ", ".join(known[:_SHOWN]) + (", ..." if len(known) > _SHOWN else "") if known else "none"
    raise NoLog(
        f'no {stream} log of {path} in {logs} (only a process child with {stream}="log", or a '
        "process job with logs=True, has one; "
        f"{stream} logs there: {listed})"
    )


def _entries(directory: Path) -> Iterator[Path]:
    try:
        yield from directory.iterdir()
    except FileNotFoundError:
        return


def _rotated(log: Path) -> list[Path]:
    """The rotated files of ``log``, newest first (``.1``, ``.2``, ...)."""
    found = []
    number = 1
    while (older := log.with_name(f"{log.name}.{number}")).is_file():
        found.append(older)
        number += 1
    return found


def _enough(data: bytes, count: int) -> bool:
    """Whether ``data`` holds the start of its ``count``-th line from the end."""
    return data.count(b"\n", 0, len(data) - 1) >= count


def _prepend(file: BinaryIO, data: bytes, count: int) -> bytes:
    """``data`` with as much of the end of ``file`` before it as ``count`` lines need."""
    start = file.seek(0, os.SEEK_END)
    while start > 0 and not _enough(data, count):
        block = max(0, start - _BLOCK)
        file.seek(block)
        data = file.read(start - block) + data
        start = block
    return data


def last_lines(log: Path, file: BinaryIO, count: int) -> bytes:
    """The last ``count`` lines of the log open as ``file`` (at ``log``), then positioned at its end.

    The rotated files continue the current one backwards (a rotation cuts at a
    byte, not at a line end); a last line without its newline counts.
    """
    end = file.seek(0, os.SEEK_END)
    if count <= 0:
        return b""
    data = _prepend(file, b"", count)
    for older in _rotated(log):
        if _enough(data, count):
            break
        with older.open("rb") as backup:
            data = _prepend(backup, data, count)
    file.seek(end)
    cut = len(data) - 1  # a newline ending the data ends the last line; it does not start one
    for _ in range(count):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1 :]


def follow(log: Path, file: BinaryIO, out: BinaryIO) -> None:
    """Copy what is appended to the log to ``out``, across rotations, until interrupted."""
    while True:
        data = file.read(_BLOCK)
        if data:
            out.write(data)
            out.flush()
            continue
        newer = _newer_files(log, file)
        if newer is None:  # nothing new, still the current file
            if os.fstat(file.fileno()).st_size < file.tell():  # truncated in place by someone
                file.seek(0)
            time.sleep(FOLLOW_POLL)
            continue
        # rotated: the writer closed this file before renaming it, so it is read to its end
        while data := file.read(_BLOCK):
            out.write(data)
        for path in newer:
            try:
                with path.open("rb") as rotated:
                    while data := rotated.read(_BLOCK):
                        out.write(data)
            except FileNotFoundError:  # rotated away meanwhile: it is lost to this follow
                continue
        out.flush()
        file.close()
        file = _open_when_there(log)


def _newer_files(log: Path, file: BinaryIO) -> list[Path] | None:
    """None while ``file`` is still the log; else the rotated files written after it, oldest first."""
    mine = os.fstat(file.fileno())
    try:
        current = log.stat()
    except FileNotFoundError:  # being replaced (log_backups=0 deletes, then creates)
        current = None
    if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
        return None
    rotated = _rotated(log)
    for index, path in enumerate(rotated):
        info = path.stat()
        if (info.st_ino, info.st_dev) == (mine.st_ino, mine.st_dev):
            return list(reversed(rotated[:index]))
    return []


def _open_when_there(log: Path) -> BinaryIO:
    while True:
        try:
            return log.open("rb")
        except FileNotFoundError:
            time.sleep(FOLLOW_POLL)
