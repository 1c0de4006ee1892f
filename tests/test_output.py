"""``otree run``'s own output: a gone reader never touches the tree, and a flood of refusals is summarised.

The losses are real ``python -m otree run`` subprocesses whose stderr goes away
under them: a pipe whose reader closed (``| head -1``), ``/dev/full``, and a
terminal that hangs up (the kernel then sends SIGHUP, a reload).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from otree._echo import EventEcho, Repeats, Summary
from otree._info import Event
from otree._output import OutputLosses, guard_output
from otree._paths import control_socket

from .otree_subprocess import DEADLINE, event_of, otree_process, run_otree, subprocess_env, write_tree

TREE = """\
import trio

import otree

print("tree file loaded")  # on stdout, at every load (reloads too)


async def steady(*, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep_forever()


tree = otree.supervisor("root", children=[CHILDREN])
"""
ONE_CHILD = 'otree.task("a", steady), otree.process("p", ["sleep", "600"])'
TWO_CHILDREN = ONE_CHILD + ', otree.task("b", steady)'


def tree_file(directory: Path, children: str = ONE_CHILD) -> Path:
    return write_tree(directory, TREE.replace("CHILDREN", children))


@contextmanager
def running(args: list[str], cwd: Path, **streams: Any) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m otree ARGS`` with the given stdin/stdout/stderr; killed if still there at the end.

    Buffered as for a user (not as under PYTHONUNBUFFERED): stdout to a pipe or a file is
    flushed at exit, so its loss comes in the exit-time flush, which must not change the exit code.
    """
    env = subprocess_env(cwd)
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen([sys.executable, "-m", "otree", *args], cwd=cwd, env=env, **streams)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)


def read_until(fd: int, marker: bytes) -> bytes:
    """What ``fd`` gives until ``marker`` has come (fails at the deadline or EOF)."""
    data = b""
    deadline = time.monotonic() + DEADLINE
    while marker not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {DEADLINE}s: {data!r}"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {marker!r}: {data!r}"
            data += chunk
    return data


def wait_status(cwd: Path, done: Callable[[str], bool]) -> str:
    """``otree status`` until it answers with what ``done`` wants (fails at the deadline)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = run_otree(["status"], cwd)
        if result.returncode == 0 and done(result.stdout):
            return result.stdout
        assert time.monotonic() < deadline, f"status never as wanted: {result}"
        time.sleep(0.1)


def logged_events(cwd: Path) -> list[dict[str, Any]]:
    text = (cwd / "state" / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]


def losses_logged(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted(
        (event["details"]["stream"], event["reason"])
        for event in events
        if event["kind"] == "tree.output_lost"
    )


def stop_and_check(
    proc: subprocess.Popen[bytes], cwd: Path, signum: signal.Signals = signal.SIGTERM
) -> list[dict[str, Any]]:
    """More events to the lost stream, then ``signum``: the run stops in order, exit 0, its process
    child gone, its socket removed, its last events logged."""
    assert run_otree(["restart", "root/a"], cwd).returncode == 0  # events written to the lost stream
    status = wait_status(cwd, lambda text: "\n  p " in text and " pid " in text)
    sleeper = int(status.split("\n  p ", 1)[1].split(" pid ", 1)[1].split()[0])
    proc.send_signal(signum)
    assert proc.wait(timeout=DEADLINE) == 0
    assert not control_socket(cwd / "state").exists()
    deadline = time.monotonic() + DEADLINE
    while Path(f"/proc/{sleeper}").exists():  # stopped with the tree (a zombie is reaped by init)
        assert time.monotonic() < deadline, f"the process child {sleeper} outlived the run"
        time.sleep(0.05)
    events = logged_events(cwd)
    last = events[-1]
    assert (last["path"], last["kind"], last["reason"]) == ("root", "supervisor.stopped", "shutdown")
    assert ("root", "tree.signal", signum.name) in [(e["path"], e["kind"], e["reason"]) for e in events]
    return events


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_stderr_pipe_whose_reader_closed(tmp_path: Path, log_format: str) -> None:
    """``otree run tree.py 2>&1 | head -1``: the tree keeps running, answers, and stops on SIGTERM."""
    tree = tree_file(tmp_path)
    reader, writer = os.pipe()
    try:
        with running(
            ["run", str(tree), "--log-format", log_format],
            tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=writer,
            stderr=writer,
        ) as proc:
            os.close(writer)
            writer = -1
            read_until(reader, b"control.listening")
            os.close(reader)  # the reader goes away, as head does after its line
            reader = -1
            # stdout is a pipe, so the reload's print waits in its buffer for the exit-time flush
            assert run_otree(["reload"], tmp_path).returncode == 0
            events = stop_and_check(proc, tmp_path)
    finally:
        for fd in (reader, writer):
            if fd >= 0:
                os.close(fd)
    assert losses_logged(events) == [("stderr", "EPIPE")]


def test_stderr_on_a_full_disk(tmp_path: Path) -> None:
    """``otree run tree.py 2>/dev/full``: every event line fails (ENOSPC); the tree does not notice."""
    tree = tree_file(tmp_path)
    with (
        open("/dev/full", "wb") as full,
        running(["run", str(tree)], tmp_path, stdin=subprocess.DEVNULL, stdout=full, stderr=full) as proc,
    ):
        wait_status(tmp_path, lambda text: "\n  a " in text)
        assert run_otree(["restart", "root/a"], tmp_path).returncode == 0  # more lines dropped
        status = wait_status(tmp_path, lambda text: "otree run's stderr is gone: " in text)
        dropped = int(
            status.split("otree run's stderr is gone: ", 1)[1].split(" writes", 1)[0].replace(",", "")
        )
        assert dropped >= 2
        events = stop_and_check(proc, tmp_path, signal.SIGINT)
    assert losses_logged(events) == [("stderr", "ENOSPC")]


def _take_terminal() -> None:
    """In the child: make the pty on stdin its controlling terminal, as a login shell's job has."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_terminal_hangs_up(tmp_path: Path) -> None:
    """The terminal goes away: SIGHUP reloads as ever (the tree file printing to the dead terminal)."""
    tree = tree_file(tmp_path)
    master, slave = pty.openpty()
    try:
        with running(
            ["run", str(tree)],
            tmp_path,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_terminal,
        ) as proc:
            os.close(slave)
            slave = -1
            read_until(master, b"control.listening")
            tree_file(tmp_path, TWO_CHILDREN)
            os.close(master)  # hang-up: the kernel sends SIGHUP to otree (the session leader), then EIO
            master = -1
            wait_status(tmp_path, lambda text: "\n  b " in text)  # the reload happened
            events = stop_and_check(proc, tmp_path)
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
    what = [(e["kind"], e["reason"]) for e in events]
    assert ("tree.signal", "SIGHUP") in what
    assert ("supervisor.reloaded", "reload") in what
    assert "supervisor.reload_failed" not in [kind for kind, _ in what]
    # the event lines in the trio thread, the tree file's print in the reload's thread
    assert losses_logged(events) == [("stderr", "EIO"), ("stdout", "EIO")]


def test_guarded_stream_drops_what_a_closed_pipe_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    reader, writer = os.pipe()
    os.close(reader)
    with open(writer, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(sys, "stderr", sys.stderr)  # put back after the test too
        losses = guard_output()
        assert sys.stdout is not stream
        print("first", flush=True)
        print("second", flush=True)
        told: list[tuple[str, int | None]] = []
        losses.report_to(lambda name, error: told.append((name, error.errno)))
        print("third", flush=True)
        assert told == [("stdout", errno.EPIPE)]


def test_losses_are_told_once_per_stream() -> None:
    losses = OutputLosses()
    pipe = OSError(errno.EPIPE, "Broken pipe")
    full = OSError(errno.ENOSPC, "No space left on device")
    losses.lost("stderr", pipe)  # before anyone listens: kept until someone does
    losses.lost("stderr", pipe)
    told: list[tuple[str, OSError]] = []
    losses.report_to(lambda name, error: told.append((name, error)))
    assert told == [("stderr", pipe)]
    losses.lost("stdout", full)
    losses.lost("stderr", full)
    assert told == [("stderr", pipe), ("stdout", full)]
    losses.report_to(None)
    losses.lost("stdout", pipe)
    assert told == [("stderr", pipe), ("stdout", full)]
    assert losses.counts == {"stderr": 3, "stdout": 2}  # told once, every dropped write counted


# --- repeated refusals on stderr -------------------------------------------------------


def rejected(path: str = "root/jobs", reason: str = "budget", kind: str = "job.rejected") -> Event:
    return Event(0.0, path, kind, reason, {"job_kind": "work"})


def test_repeats_prints_the_first_then_one_summary_per_window() -> None:
    repeats = Repeats({"job.rejected"}, window=10.0)
    assert repeats.admit(rejected(), 0.0)
    assert not repeats.admit(rejected(), 0.3)
    assert not repeats.admit(rejected(), 9.9)
    assert repeats.due(9.9) == []
    assert repeats.due(10.0) == [Summary("root/jobs", "job.rejected", "budget", 2, 10.0)]
    assert not repeats.admit(rejected(), 12.0)
    assert repeats.due(19.0) == []
    assert repeats.due(20.5) == [Summary("root/jobs", "job.rejected", "budget", 1, 10.5)]


def test_repeats_forgets_a_quiet_key_and_keeps_keys_apart() -> None:
    repeats = Repeats({"job.rejected"}, window=10.0)
    assert repeats.admit(rejected(), 0.0)
    assert repeats.admit(rejected(reason="queue_full"), 1.0)
    assert repeats.admit(rejected(path="root/other"), 1.0)
    assert repeats.admit(rejected(kind="child.exited"), 1.0)  # not a summarised kind
    assert repeats.admit(rejected(kind="child.exited"), 1.1)
    assert repeats.due(30.0) == []  # nothing held: forgotten
    assert repeats.admit(rejected(), 30.0)  # so the next one prints in full
    assert not repeats.admit(rejected(), 35.0)


def test_repeats_final_summary_holds_everything_counted() -> None:
    repeats = Repeats({"job.rejected", "control.error"}, window=10.0)
    assert repeats.admit(rejected(), 0.0)
    assert repeats.admit(rejected(path="root", kind="control.error", reason="status"), 0.0)
    for moment in (1.0, 2.0, 3.0):
        assert not repeats.admit(rejected(), moment)
    assert repeats.due(4.0, final=True) == [Summary("root/jobs", "job.rejected", "budget", 3, 4.0)]
    assert repeats.due(5.0, final=True) == []


def record(event: Event) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": "%s", "args": (event,), "otree_event": event})


async def test_echo_summarises_a_flood_on_the_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    out = io.StringIO()
    echo = EventEcho(out, "text", clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo.serve)
        await trio.sleep(0.25)
        for _ in range(50):  # one refusal every 0.5 s from 0.25 s to 24.75 s
            echo.handle(record(rejected()))
            echo.handle(record(Event(0.0, "root/a", "child.started", "", {})))
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    echo.close()
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]  # without the time
    assert lines.count("root/a child.started") == 50
    assert [line for line in lines if "job.rejected" in line] == [
        "root/jobs job.rejected budget job_kind=work",
        "root/jobs 21 more job.rejected budget in the last 11s",
        "root/jobs 20 more job.rejected budget in the last 10s",
        "root/jobs 8 more job.rejected budget in the last 4s",
    ]


async def test_echo_wakes_only_while_it_watches_a_repeat(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle tree is never woken by the summaries' ticker; a burst wakes it until its window ends."""
    echo = EventEcho(io.StringIO(), "text", clock=trio.current_time)
    ticks: list[float] = []
    summarise = echo._summarise

    def counted(*, final: bool = False) -> None:
        ticks.append(trio.current_time())
        summarise(final=final)

    monkeypatch.setattr(echo, "_summarise", counted)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo.serve)
        echo.handle(record(Event(0.0, "root/a", "child.started", "", {})))  # never summarised
        await trio.sleep(3600)
        assert ticks == []
        echo.handle(record(rejected()))  # at 3600: watched for one window
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert ticks == [3600.0 + n for n in range(1, 11)]  # whole ticks until the window is over
    echo.close()


def test_echo_json_prints_every_event() -> None:
    out = io.StringIO()
    echo = EventEcho(out, "json")
    for _ in range(5):
        echo.handle(record(rejected()))
    echo.close()
    assert [json.loads(line)["kind"] for line in out.getvalue().splitlines()] == ["job.rejected"] * 5


def test_event_lines_are_stamped_with_their_own_second_across_a_burst() -> None:
    """Stamps reuse the formatted second while events stay in it, and only then."""
    from otree._render import time_of_day

    base = float(int(time.time()))
    for stamp in (base + 0.25, base + 0.999, base + 1.0, base + 1.5, base - 59.5, base + 0.25):
        expected = time.strftime("%H:%M:%S", time.localtime(int(stamp))) + f".{int(stamp % 1 * 1000):03d}"
        assert time_of_day(stamp) == expected


FLOOD_TREE = """\
import trio

import otree


async def feeder():
    pool = otree.current_child().supervisor.child("jobs")
    for _ in range(50):
        try:
            pool.submit_nowait("work", estimated_cost=1.0)
        except otree.BudgetExceeded:
            pass
    await trio.sleep_forever()


async def work(payload):
    return None


tree = otree.supervisor(
    "root",
    children=[otree.pool("jobs", {"work": work}, daily_budget=0.5), otree.task("feeder", feeder)],
)
"""


def test_run_summarises_repeated_rejections_on_stderr(tmp_path: Path) -> None:
    """50 refused submissions: one line, then at the stop one summary; the event log has all 50."""
    tree = write_tree(tmp_path, FLOOD_TREE)
    with otree_process(["run", str(tree)], tmp_path) as otree:
        otree.wait_for(lambda line: "control.listening" in line)
        deadline = time.monotonic() + DEADLINE
        while sum(e["kind"] == "job.rejected" for e in logged_events(tmp_path)) < 50:
            assert time.monotonic() < deadline, "the feeder's 50 refusals never reached the event log"
            time.sleep(0.1)
        otree.proc.send_signal(signal.SIGTERM)
        assert otree.finish() == 0
    shown = [line for line in otree.lines if "job.rejected" in line]
    assert len(shown) == 2, otree.lines
    assert event_of(shown[0]) == ("root/jobs", "job.rejected", "budget")
    assert shown[1].split(" ", 1)[1].startswith("root/jobs 49 more job.rejected budget in the last ")
    assert sum(e["kind"] == "job.rejected" for e in logged_events(tmp_path)) == 50
