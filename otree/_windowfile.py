"""``persist_intensity``: a supervisor's restart window kept in the state dir, so a crash
loop is still one after otree itself is restarted (even by ``kill -9``).

The window is stored as wall-clock times (the monotonic clock starts again with each
boot and process), one JSON list per supervisor, written whole on each restart through a
private temporary file and a rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import trio

from ._intensity import RestartWindow
from ._paths import ensure_private_dir

__all__ = ["load_window", "save_window", "window_file"]


def window_file(state: Path, supervisor_path: str) -> Path:
    """``<state dir>/intensity/<supervisor path>.json``."""
    *parents, name = supervisor_path.split("/")
    return state.joinpath("intensity", *parents, f"{name}.json")


def load_window(path: Path, window: RestartWindow) -> str:
    """Add the restarts stored at ``path`` to ``window``; return why they could not be read, or ""."""
    try:
        times = json.loads(path.read_bytes())
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as exc:
        return f"{path}: {exc}"
    if not isinstance(times, list) or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) for t in times
    ):
        return f"{path}: not a list of times"
    window.restore(times, trio.current_time(), time.time())
    return ""


def save_window(path: Path, window: RestartWindow) -> str:
    """Write the restarts still counting in ``window`` to ``path`` (0600, atomically);
    return why it could not be written, or ""."""
    data = json.dumps(window.wall_times(trio.current_time(), time.time())).encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        ensure_private_dir(path.parent)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        return f"{path}: {exc}"
    return ""
