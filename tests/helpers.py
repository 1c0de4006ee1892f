"""Children for runtime tests (they record what happens to them in a shared log), and readers
of /proc for tests of real processes."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

import otree


class Log:
    """An ordered record of ("start" | "stop" | "crash", name) entries."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def add(self, what: str, name: str) -> None:
        self.entries.append((what, name))

    def of(self, what: str) -> list[str]:
        return [name for kind, name in self.entries if kind == what]

    def clear(self) -> None:
        self.entries.clear()


async def worker(
    log: Log, name: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ready at once, runs until stopped; logs its start and its stop."""
    log.add("start", name)
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        log.add("stop", name)


async def crash_after(
    log: Log, name: str, delay: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ready at once, raises RuntimeError after ``delay`` seconds."""
    log.add("start", name)
    task_status.started()
    await trio.sleep(delay)
    log.add("crash", name)
    raise RuntimeError(f"{name} crashed")


class Switch:
    """A flag a test flips to make a child's next start fail."""

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing
        self.attempts = 0


async def fails_to_start(
    switch: Switch,
    crash_after: float | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fails before reporting ready while ``switch.failing``; otherwise runs until stopped.

    With ``crash_after``, a run that started crashes after that many seconds and
    flips ``switch``, so every later start fails.
    """
    switch.attempts += 1
    if switch.failing:
        raise ConnectionError("cannot connect")
    task_status.started()
    if crash_after is None:
        await trio.sleep_forever()
    await trio.sleep(crash_after)
    switch.failing = True
    raise RuntimeError("crash")


async def exits_with(kind: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ready, then ends with ``kind``: "return", "shutdown" (otree.Shutdown) or "error"."""
    task_status.started()
    await trio.sleep(1)
    if kind == "shutdown":
        raise otree.Shutdown("done")
    if kind == "error":
        raise ValueError("boom")


def states(sup: otree.SupervisorHandle) -> dict[str, str]:
    return {info.id: info.state for info in sup.which_children()}


async def collect(stream: otree.EventStream, until: Any) -> list[otree.Event]:
    """Events from ``stream`` up to and including the first for which ``until(event)`` holds."""
    seen: list[otree.Event] = []
    async for event in stream:
        seen.append(event)
        if until(event):
            break
    return seen


def pids_where(test: Callable[[int], bool]) -> list[int]:
    """Pids in /proc for which ``test(pid)`` holds (processes that vanish meanwhile are skipped)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if test(int(entry)):
                    found.append(int(entry))
    return found


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state, parent, group, session, ..."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def state_and_parent(pid: int) -> tuple[str, int]:
    fields = proc_stat(pid)
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        return proc_stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(root: int) -> set[int]:
    """Every live process below ``root``, by the parent links in /proc."""
    parents: dict[int, int] = {}
    for pid in pids_where(lambda pid: True):
        with contextlib.suppress(OSError):  # gone meanwhile
            parents[pid] = int(proc_stat(pid)[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def with_cmdline(text: str) -> set[int]:
    """The processes whose command line holds ``text``."""
    return set(pids_where(lambda pid: text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()))


def with_environ(text: str) -> set[int]:
    """The processes whose environment holds ``text`` (``NAME=value``): what a program started,
    however its processes renamed themselves or were reparented."""
    wanted = text.encode()
    return set(pids_where(lambda pid: wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")))


def wait_gone(pids: set[int], seconds: float = 20.0) -> set[int]:
    """Poll until none of ``pids`` is alive; those still alive at the deadline."""
    deadline = time.monotonic() + seconds
    while (left := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
