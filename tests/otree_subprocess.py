"""Running ``python -m otree`` as a real subprocess, isolated in a test's own state and runtime dirs."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 10.0


def write_tree(directory: Path, text: str, name: str = "tree.py") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def event_of(line: str) -> tuple[str, str, str] | None:
    """``(path, kind, reason)`` of a text event line, or None for an ``otree:`` message line."""
    if line.startswith("otree:"):
        return None
    parts = line.split()
    reason = parts[3] if len(parts) > 3 else ""
    return parts[1], parts[2], reason


def subprocess_env(cwd: Path) -> dict[str, str]:
    """The environment of an otree subprocess: this checkout importable, its dirs under ``cwd``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OTREE_STATE_DIR", str(cwd / "state"))
    env.setdefault("OTREE_RUNTIME_DIR", str(cwd / "run"))  # conftest sets a short one
    return env


def run_otree(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m otree ARGS`` to completion (it must finish within the deadline); ``env`` overrides."""
    return subprocess.run(
        [sys.executable, "-m", "otree", *args],
        cwd=cwd,
        env={**subprocess_env(cwd), **env},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


@contextmanager
def follow_events(cwd: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``otree events --follow --json ARGS``, running (stdout and stderr piped) until the block ends."""
    follower = subprocess.Popen(
        [sys.executable, "-m", "otree", "events", "--follow", "--json", *args],
        cwd=cwd,
        env=subprocess_env(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield follower
    finally:
        follower.terminate()
        follower.wait(timeout=DEADLINE)
        for pipe in (follower.stdout, follower.stderr):
            if pipe is not None:
                pipe.close()


class OtreeProcess:
    """A running ``python -m otree ...`` whose stderr lines are read by a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otree", *args],
            cwd=cwd,
            env=subprocess_env(cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = DEADLINE) -> str:
        """The first new stderr line that satisfies ``predicate``; fails at EOF or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching line within {timeout}s; stderr so far: {self.lines}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"stderr ended without a matching line: {self.lines}")
            self.lines.append(line)
            if predicate(line):
                return line

    def finish(self, timeout: float = DEADLINE) -> int:
        """Wait for the exit, then collect every remaining stderr line."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return code
            if line is None:
                return code
            self.lines.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextmanager
def otree_process(args: list[str], cwd: Path) -> Iterator[OtreeProcess]:
    process = OtreeProcess(args, cwd)
    try:
        yield process
    finally:
        process.stop()


def is_text_event(path: str, kind: str) -> Callable[[str], bool]:
    def matches(line: str) -> bool:
        event = event_of(line)
        return event is not None and event[:2] == (path, kind)

    return matches
