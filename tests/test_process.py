"""Process children with real processes: groups, signals, logs, readiness, watchdog, orphans.

Every process a test starts carries a marker in its environment; the ``marker``
fixture fails the test if any process with it is still alive afterwards (and
kills it, so nothing leaks into the next test).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import otree
from otree import _pool
from otree._childlogs import find_log

from .helpers import pids_where, state_and_parent

PY = sys.executable


def marked_pids(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``OTREE_TEST_MARKER=marker``."""
    needle = f"OTREE_TEST_MARKER={marker}".encode()
    return pids_where(lambda pid: needle in Path(f"/proc/{pid}/environ").read_bytes())


def zombies_of(parent: int) -> list[int]:
    return pids_where(lambda pid: state_and_parent(pid) == ("Z", parent))


def wait_until(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


@pytest.fixture
def marker() -> Iterator[str]:
    value = uuid.uuid4().hex
    yield value
    left = marked_pids(value)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes left running: {left}"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def proc(child_id: str, code: str, marker: str, **kw: object) -> otree.ProcessSpec:
    env = {"OTREE_TEST_MARKER": marker, **kw.pop("env", {})}  # type: ignore[dict-item]
    return otree.process(child_id, [PY, "-c", code], env=env, **kw)  # type: ignore[arg-type]


async def first(stream: otree.EventStream, kind: str, path: str | None = None) -> otree.Event:
    async for event in stream:
        if event.kind == kind and (path is None or event.path == path):
            return event
    raise AssertionError(f"no {kind} event")


SLEEP = "import time; time.sleep(1000)"


# --- exits ----------------------------------------------------------------------------------


async def test_process_exit_zero_is_normal(marker: str, state: Path) -> None:
    tree = otree.supervisor("t", children=[proc("p", "pass", marker, restart="transient")])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        event = await first(sup.events(), "child.exited")
        assert event.reason == "normal"
        await trio.testing.wait_all_tasks_blocked()
        assert sup.which_children()[0].exit == otree.ExitInfo("normal", "", 0, None)


async def test_process_nonzero_exit_is_error_with_code_and_stderr_tail(marker: str, state: Path) -> None:
    code = "import sys; sys.stderr.write('x' * 5000 + 'last words\\n'); sys.exit(3)"
    tree = otree.supervisor("t", children=[proc("p", code, marker, restart="transient")])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        event = await first(sup.events(), "child.exited")
        assert (event.reason, event.details["detail"], event.details["exit_code"]) == (
            "error",
            "exit code 3",
            3,
        )
        tail = event.details["stderr_tail"]
        assert tail.endswith("last words\n") and len(tail) == 4096


async def test_process_killed_by_a_foreign_signal_is_error(marker: str, state: Path) -> None:
    tree = otree.supervisor("t", children=[proc("p", SLEEP, marker, restart="transient")])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        stream = sup.events()
        pid = sup.which_children()[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        event = await first(stream, "child.exited")
        assert (event.reason, event.details["detail"], event.details["signal"]) == (
            "error",
            "killed by SIGKILL",
            9,
        )


async def test_missing_executable_is_a_start_error_naming_errno_and_path(marker: str, state: Path) -> None:
    tree = otree.supervisor(
        "t", children=[otree.process("p", ["/nonexistent/agent"], env={"OTREE_TEST_MARKER": marker})]
    )
    with pytest.raises(otree.StartError) as info:
        async with otree.open_supervisor(tree, state_dir=state):
            pass
    assert str(info.value) == (
        "t/p: failed to start: FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/agent'"
    )


async def test_bad_cwd_is_a_start_error(marker: str, state: Path) -> None:
    tree = otree.supervisor("t", children=[proc("p", SLEEP, marker, cwd="/nonexistent-dir")])
    with pytest.raises(otree.StartError, match="No such file or directory: '/nonexistent-dir'"):
        async with otree.open_supervisor(tree, state_dir=state):
            pass


# --- stopping -------------------------------------------------------------------------------------

GRANDCHILDREN = (
    "import subprocess, time; [subprocess.Popen(['sleep', '1000']) for _ in range(3)]; time.sleep(1000)"
)


async def test_stop_kills_the_whole_process_group(marker: str, state: Path) -> None:
    tree = otree.supervisor("t", children=[proc("p", GRANDCHILDREN, marker, ready=0.3)])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        assert len(marked_pids(marker)) == 4  # the child and its three sleeps
        await sup.terminate_child("p")
        assert marked_pids(marker) == []
        assert sup.which_children()[0].exit == otree.ExitInfo("shutdown", "", None, signal.SIGTERM)


async def test_crash_of_the_leader_kills_its_grandchildren(marker: str, state: Path) -> None:
    code = (
        "import subprocess, time; subprocess.Popen(['sleep', '1000']); time.sleep(0.3); raise SystemExit(1)"
    )
    # temporary: a restarted leader (transient restarts an exit 1) would be counted as left behind
    tree = otree.supervisor("t", children=[proc("p", code, marker, restart="temporary")])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        await first(sup.events(), "child.exited")
        assert marked_pids(marker) == []


async def test_sigterm_ignored_means_sigkill_after_shutdown(marker: str, state: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"
    tree = otree.supervisor("t", children=[proc("p", code, marker, shutdown=0.5, ready=0.2)])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        before = time.monotonic()
        await sup.terminate_child("p")
        took = time.monotonic() - before
        assert 0.5 <= took < 2.0
        assert sup.which_children()[0].exit == otree.ExitInfo("shutdown", "killed", None, signal.SIGKILL)
        assert marked_pids(marker) == []


async def test_brutal_kill_sends_sigkill_at_once(marker: str, state: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"
    tree = otree.supervisor("t", children=[proc("p", code, marker, shutdown="brutal_kill", ready=0.2)])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        before = time.monotonic()
        await sup.terminate_child("p")
        assert time.monotonic() - before < 0.5
        assert sup.which_children()[0].exit == otree.ExitInfo("shutdown", "killed", None, signal.SIGKILL)


async def test_custom_stop_signal(marker: str, state: Path) -> None:
    tree = otree.supervisor("t", children=[proc("p", SLEEP, marker, stop_signal=signal.SIGINT, ready=0.2)])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        await sup.terminate_child("p")
        exit_info = sup.which_children()[0].exit
        assert exit_info is not None and exit_info.reason == "shutdown"
        assert (exit_info.exit_code, exit_info.signal) == (None, signal.SIGINT)


async def test_one_for_all_across_task_and_process_children(marker: str, state: Path) -> None:
    trigger = trio.Event()
    starts: list[str] = []

    async def crasher() -> None:
        starts.append("task")
        await trigger.wait()
        raise RuntimeError("task crashed")

    tree = otree.supervisor(
        "t",
        strategy="one_for_all",
        children=[proc("p", SLEEP, marker), otree.task("c", crasher)],
    )
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        old = sup.which_children()[1].pid
        stream = sup.events()
        trigger.set()
        await first(stream, "child.ready", "t/c")
        new = sup.which_children()[1].pid
        assert old is not None and new is not None and new != old
        assert marked_pids(marker) == [new]


# --- logs -------------------------------------------------------------------------------------------


async def test_output_goes_to_rotated_log_files(marker: str, state: Path) -> None:
    code = (
        "import sys\n"
        "for i in range(40): print(f'{i:05d}' + 'x' * 200, flush=True)\n"
        "sys.stderr.write('err\\n')"
    )
    tree = otree.supervisor(
        "t", children=[proc("p", code, marker, restart="transient", log_max_bytes=2048, log_backups=2)]
    )
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        await first(sup.events(), "child.exited")
    logs = state / "logs" / "t" / "p"
    assert sorted(f.name for f in logs.iterdir()) == [
        "stderr.log",
        "stdout.log",
        "stdout.log.1",
        "stdout.log.2",
    ]
    assert (logs / "stderr.log").read_bytes() == b"err\n"
    written = "".join(f"{i:05d}" + "x" * 200 + "\n" for i in range(40)).encode()  # 8240 bytes
    kept = b"".join((logs / name).read_bytes() for name in ("stdout.log.2", "stdout.log.1", "stdout.log"))
    assert kept == written[-(2048 * 2 + 8240 % 2048) :]  # two full backups and the current file
    assert all(f.stat().st_size <= 2048 for f in logs.iterdir())
    assert oct(logs.stat().st_mode & 0o777) == "0o700"
    assert oct((logs / "stdout.log").stat().st_mode & 0o777) == "0o600"


async def test_non_utf8_output_is_kept_as_bytes_and_replaced_in_events(marker: str, state: Path) -> None:
    code = "import sys; sys.stderr.buffer.write(b'bad \\xff byte\\n'); sys.exit(2)"
    # temporary: a restart could write the line again before the stop
    tree = otree.supervisor("t", children=[proc("p", code, marker, restart="temporary")])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        event = await first(sup.events(), "child.exited")
    assert event.details["stderr_tail"] == "bad \ufffd byte\n"
    assert (state / "logs" / "t" / "p" / "stderr.log").read_bytes() == b"bad \xff byte\n"


# the child writes two lines and the start of a third, then the rest on SIGUSR1
IN_PIECES = """
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
sys.stdout.write("one\\ntwo\\nthr"); sys.stdout.flush()
signal.sigwait({signal.SIGUSR1})
sys.stdout.write("ee\\nfour\\n"); sys.stdout.flush()
signal.sigwait({signal.SIGUSR1})
"""


def stamps_and_lines(data: bytes) -> tuple[list[datetime.datetime], list[bytes]]:
    """Each line's time stamp and text; fails on a line without a stamp."""
    stamps, lines = [], []
    for line in data.splitlines():
        match = re.fullmatch(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (.*)", line)
        assert match is not None, line
        stamps.append(datetime.datetime.fromisoformat(match[1].decode() + "+00:00"))
        lines.append(match[2])
    return stamps, lines


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_log_timestamps_stamp_each_line_and_a_partial_line_is_written_at_once(
    marker: str, state: Path
) -> None:
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    tree = otree.supervisor("t", children=[proc("p", IN_PIECES, marker, log_timestamps=True)])
    log = state / "logs" / "t" / "p" / "stdout.log"
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        await until(lambda: log.exists() and log.read_bytes().endswith(b"thr"))  # no newline yet
        pid = sup.which_children()[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGUSR1)
        await until(lambda: log.read_bytes().endswith(b"four\n"))
    end = datetime.datetime.now(datetime.UTC)
    stamps, lines = stamps_and_lines(log.read_bytes())
    assert lines == [b"one", b"two", b"three", b"four"]  # the line written in two pieces: one stamp
    assert start <= stamps[0] <= stamps[1] <= stamps[2] <= stamps[3] <= end


async def test_a_process_jobs_stderr_tail_is_stamped_and_its_result_is_not(marker: str, state: Path) -> None:
    code = "import sys; print('[1, 2]'); sys.stderr.write('bad\\nworse'); sys.exit(int(sys.stdin.read()))"
    handler = otree.process_job([PY, "-c", code], env={"OTREE_TEST_MARKER": marker}, log_timestamps=True)
    tree = otree.supervisor("t", children=[otree.pool("jobs", {"run": handler}, daily_budget=1.0)])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        assert await pool.submit_nowait("run", 0).result() == [1, 2]
        with pytest.raises(otree.JobFailed) as info:
            await pool.submit_nowait("run", 3).result()
    detail, _, tail = str(info.value.__cause__).partition(": ")
    assert detail == "exit code 3"
    assert stamps_and_lines(tail.encode())[1] == [b"bad", b"worse"]


def test_log_timestamps_is_checked_in_the_spec() -> None:
    with pytest.raises(otree.SpecError, match="log_timestamps"):
        otree.process("p", ["true"], log_timestamps="yes")  # type: ignore[arg-type]


# --- readiness and notify ---------------------------------------------------------------------------

NOTIFY = """
import os, socket, time
def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), os.environ["NOTIFY_SOCKET"])
"""


async def test_notify_ready_gates_the_start_and_status_and_cost_are_kept(marker: str, state: Path) -> None:
    code = NOTIFY + (
        "import signal; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "time.sleep(0.3); notify('STATUS=warming up\\nREADY=1')\n"
        "signal.sigwait({signal.SIGUSR1})  # the test has subscribed to events\n"
        "notify('OTREE_COST=0.25'); notify('garbage'); time.sleep(1000)\n"
    )
    tree = otree.supervisor("t", children=[proc("p", code, marker, ready="notify")])
    before = time.monotonic()
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        assert time.monotonic() - before >= 0.3
        (info,) = sup.which_children()
        assert info.status == "warming up"
        stream = sup.events()
        assert info.pid is not None
        os.kill(info.pid, signal.SIGUSR1)
        ignored = await first(stream, "notify.ignored")
        assert ignored.reason == "malformed"
        await sup.terminate_child("p")
        stopped = await first(stream, "child.stopped")
        assert stopped.details["cost"] == 0.25


async def test_notify_start_timeout_fails_the_start(marker: str, state: Path) -> None:
    tree = otree.supervisor("t", children=[proc("p", SLEEP, marker, ready="notify", start_timeout=0.3)])
    with pytest.raises(otree.StartError, match="t/p: failed to start: start_timeout"):
        async with otree.open_supervisor(tree, state_dir=state):
            pass


async def test_ready_after_seconds_fails_if_it_exits_first(marker: str, state: Path) -> None:
    code = "import time, sys; time.sleep(0.1); sys.exit(4)"
    tree = otree.supervisor("t", children=[proc("p", code, marker, ready=1.0)])
    with pytest.raises(otree.StartError, match="exit code 4"):
        async with otree.open_supervisor(tree, state_dir=state):
            pass


# --- stall watchdog --------------------------------------------------------------------------------


async def test_stall_watchdog_stops_a_silent_child_as_error_stalled(marker: str, state: Path) -> None:
    code = "print('one line', flush=True); import time; time.sleep(1000)"
    tree = otree.supervisor("t", children=[proc("p", code, marker, stall_timeout=0.4, shutdown=0.2)])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        event = await first(sup.events(), "child.exited")
        assert (event.reason, event.details["detail"]) == ("error", "stalled")
        await first(sup.events(), "child.ready")


async def test_watchdog_pings_keep_a_quiet_child_alive(marker: str, state: Path) -> None:
    code = NOTIFY + "for _ in range(10):\n    notify('WATCHDOG=1'); time.sleep(0.1)\n"
    tree = otree.supervisor(
        "t", children=[proc("p", code, marker, stall_timeout=0.5, restart="transient", stdout="null")]
    )
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        event = await first(sup.events(), "child.exited")
        assert event.reason == "normal"


async def test_a_slow_start_is_not_a_stall(marker: str, state: Path) -> None:
    # silent for longer than stall_timeout before READY=1: the stall clock starts at readiness
    pings = "for _ in range(5):\n    time.sleep(0.1); notify('WATCHDOG=1')\n"
    code = NOTIFY + "time.sleep(0.6)\nnotify('READY=1')\n" + pings
    tree = otree.supervisor(
        "t",
        children=[
            proc("p", code, marker, ready="notify", stall_timeout=0.4, restart="transient", stdout="null")
        ],
    )
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        event = await first(sup.events(), "child.exited")
        assert (event.reason, event.details["detail"]) == ("normal", "")


# --- orphans and otree's own death ----------------------------------------------------------------------

TREE_FILE = """
import sys, otree
marker = {marker!r}
env = {{"OTREE_TEST_MARKER": marker}}
code = {code!r}
tree = otree.supervisor("t", children=[
    otree.process("p", [sys.executable, "-c", code], env=env, ready=0.3),
    otree.process("q", [sys.executable, "-c", code], env=env, ready=0.3),
])
"""


def start_otree_run(tmp_path: Path, marker: str, code: str) -> subprocess.Popen[str]:
    """``otree run`` of two process children running ``code``, once its root has started."""
    return launch_otree_run(tmp_path, TREE_FILE.format(marker=marker, code=code))


def launch_otree_run(tmp_path: Path, tree_text: str) -> subprocess.Popen[str]:
    """``otree run`` of the tree file ``tree_text`` (root ``t``), once its root has started."""
    tree = tmp_path / "tree.py"
    tree.write_text(tree_text)
    proc = subprocess.Popen(
        [PY, "-m", "otree", "run", str(tree), "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if " t supervisor.started" in line:
            return proc
        if not line:
            break
    proc.kill()
    proc.wait()
    raise AssertionError("otree run did not start")


def sigkill_leaves_nothing(run: subprocess.Popen[Any], marker: str) -> bool:
    """SIGKILL ``run`` (an ``otree run``): whether nothing with ``marker`` is left a second later."""
    run.kill()
    run.wait()
    return wait_until(lambda: marked_pids(marker) == [], 1.0)


def test_kill_9_of_otree_run_leaves_nothing_within_a_second(tmp_path: Path, marker: str) -> None:
    proc = start_otree_run(tmp_path, marker, GRANDCHILDREN)
    try:
        assert len(marked_pids(marker)) == 8
        assert sigkill_leaves_nothing(proc, marker)
    finally:
        proc.kill()
        proc.wait()


def test_otree_run_reaps_orphans_of_its_children(tmp_path: Path, marker: str) -> None:
    # each child double-forks a short-lived orphan: it is re-parented to otree (the subreaper)
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(0.2); os._exit(0)\n"
        "    os._exit(0)\n"
        "os.wait(); time.sleep(1000)\n"
    )
    proc = start_otree_run(tmp_path, marker, code)
    try:
        # the orphans live 0.2 s; once they have exited, none may stay a zombie of otree
        assert wait_until(lambda: len(marked_pids(marker)) == 2 and zombies_of(proc.pid) == [], 3.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert marked_pids(marker) == []
    finally:
        proc.kill()
        proc.wait()


def test_parent_death_signal_kills_direct_children_even_without_the_guard(
    tmp_path: Path, marker: str
) -> None:
    # A host that spawns through otree's helper, stops the helper (so that it cannot act as the
    # guard), then dies without any cleanup: the kernel's PR_SET_PDEATHSIG, set in the child
    # before exec, kills the child.
    script = tmp_path / "host.py"
    script.write_text(
        "import os, signal, trio\n"
        "from otree._reaper import Reaper\n"
        "from otree._spawner import Spawner\n"
        "async def main():\n"
        "    spawner = Spawner(Reaper())\n"
        f"    await spawner.spawn(['sleep', '1000'], env={{'OTREE_TEST_MARKER': {marker!r}}})\n"
        "    helper = spawner._proc.pid\n"
        "    os.kill(helper, signal.SIGSTOP)\n"
        "    while open(f'/proc/{helper}/stat').read().rsplit(')', 1)[1].split()[0] != 'T':\n"
        "        await trio.sleep(0.001)  # stopped before otree dies: it cannot act as the guard\n"
        "    print(helper, flush=True)\n"
        "    os._exit(0)\n"
        "trio.run(main)\n"
    )
    host = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=30, check=True)
    helper = int(host.stdout)
    try:
        assert state_and_parent(helper)[0] == "T"  # the guard could not have killed it
        assert wait_until(lambda: marked_pids(marker) == [], 1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)


def test_otree_run_kills_escaped_orphans_when_the_tree_stops(tmp_path: Path, marker: str) -> None:
    # the child's grandchild leaves the child's process group (setsid), so a group kill misses it;
    # re-parented to otree (the subreaper), it is killed when the tree stops
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1000)\n"
        "    os._exit(0)\n"
        "os.wait(); time.sleep(1000)\n"
    )
    proc = start_otree_run(tmp_path, marker, code)
    try:
        assert wait_until(lambda: len(marked_pids(marker)) == 4, 3.0)  # two children, two escapers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert marked_pids(marker) == []
    finally:
        proc.kill()
        proc.wait()


def test_check_prints_process_children_with_argv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from otree._cli import main

    tree = tmp_path / "tree.py"
    tree.write_text(
        "import otree\n"
        "tree = otree.supervisor('t', children=[\n"
        "    otree.process('p', ['agent', '--model', 'a b'], ready='notify', stall_timeout=30),\n"
        "    otree.process('q', ['python3', '-c', 'import sys\\nprint(1)\\tx'])])\n"
    )
    assert main(["check", str(tree)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        "  p  process  restart=permanent  shutdown=5.0  argv=agent --model 'a b'  "
        "ready=notify  stall_timeout=30"
    )
    # a script given with -c stays on its child's line: control characters are shown escaped
    assert (
        lines[2]
        == "  q  process  restart=permanent  shutdown=5.0  argv=python3 -c 'import sys\\nprint(1)\\tx'"
    )
    assert len(lines) == 3


def _guards_of(parent: int) -> list[int]:
    def is_guard(pid: int) -> bool:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return state_and_parent(pid)[1] == parent and b"-I" in cmdline and b"-c" in cmdline

    return pids_where(is_guard)


def test_a_killed_guard_is_replaced_and_told_every_group(tmp_path: Path, marker: str) -> None:
    tree = tmp_path / "tree.py"
    tree.write_text(
        "import sys, otree\n"
        f"env = {{'OTREE_TEST_MARKER': {marker!r}}}\n"
        f"keeper = {GRANDCHILDREN!r}\n"
        "tree = otree.supervisor('t', max_restarts=1000, children=[\n"
        "    otree.process('p', [sys.executable, '-c', keeper], env=env, ready=0.3),\n"
        "    otree.process('q', [sys.executable, '-c', 'import time; time.sleep(0.3)'], env=env),\n"
        "])\n"
    )
    proc = subprocess.Popen(
        [PY, "-m", "otree", "run", str(tree), "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: len(_guards_of(proc.pid)) == 1 and len(marked_pids(marker)) >= 4, 15)
        (old,) = _guards_of(proc.pid)
        os.kill(old, signal.SIGKILL)
        # q keeps exiting and restarting meanwhile: the new guard learns its groups as they change
        assert wait_until(lambda: _guards_of(proc.pid) not in ([], [old]), 5)
        assert sigkill_leaves_nothing(proc, marker)  # p's grandchildren too
    finally:
        proc.kill()
        proc.wait()


def test_socket_dirs_of_dead_trees_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import fcntl

    from otree._notify import _remove_abandoned, _SocketDir

    live = _SocketDir(tmp_path, "notify-", 0o700)
    live_path = live.ensure()
    dead = tmp_path / "notify-2-abc"  # as a killed otree leaves it: a lock file nobody holds
    dead.mkdir()
    (dead / ".lock").touch()
    (dead / "1.sock").touch()
    busy = tmp_path / "notify-3-def"  # another namespace's live tree: its lock is held
    busy.mkdir()
    holder = os.open(busy / ".lock", os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        _remove_abandoned(tmp_path, "notify-")
        assert live_path.is_dir() and busy.is_dir()
        assert not dead.exists()
    finally:
        os.close(holder)
        live.close()
    assert not live_path.exists()


def test_a_socket_dir_removed_behind_our_back_is_made_again(tmp_path: Path) -> None:
    from otree._notify import _SocketDir

    sockets = _SocketDir(tmp_path, "notify-", 0o700)
    first = sockets.ensure()
    shutil.rmtree(first)  # e.g. a tmp cleaner
    second = sockets.ensure()
    assert second.is_dir() and (second / ".lock").exists()
    sockets.close()


def test_a_socket_dir_removed_between_two_binds_is_made_again_by_the_next(tmp_path: Path) -> None:
    """A bind does not look at the directory first: one that finds it gone makes it again."""
    from otree import _notify

    sockets = _notify.NotifySockets()
    sockets._own = _notify._SocketDir(tmp_path, "notify-", 0o700)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as one,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as two,
    ):
        first_path = sockets.bind(one, None)
        shutil.rmtree(Path(first_path).parent)  # e.g. a tmp cleaner
        second_path = sockets.bind(two, None)
        assert Path(second_path).parent != Path(first_path).parent
        assert Path(second_path).is_socket() and (Path(second_path).parent / ".lock").exists()
        assert stat.S_IMODE(os.stat(second_path).st_mode) == 0o600
        sockets.release(second_path)
        assert not Path(second_path).exists()
    sockets.close()


def test_a_socket_dir_swept_while_being_made_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from otree import _notify

    real_flock = fcntl.flock
    swept: list[Path] = []

    def flock(fd: int, operation: int) -> None:
        if not swept:  # another tree sweeps the new directory between its making and its lock
            swept.append(Path(os.readlink(f"/proc/self/fd/{fd}")).parent)
            _notify._remove_abandoned(tmp_path, "notify-")
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    sockets = _notify._SocketDir(tmp_path, "notify-", 0o700)
    path = sockets.ensure()
    try:
        assert not swept[0].exists()
        assert path != swept[0] and (path / ".lock").exists()
    finally:
        sockets.close()


# --- user and resource limits ------------------------------------------------------------------

IDENTITY = """
import ctypes, json, os, resource, socket
libc = ctypes.CDLL(None, use_errno=True)
signal_number = ctypes.c_int(0)
libc.prctl(2, ctypes.byref(signal_number), 0, 0, 0)  # PR_GET_PDEATHSIG
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"OTREE_COST=0.25", os.environ["NOTIFY_SOCKET"])
where = os.path.dirname(os.environ["NOTIFY_SOCKET"])
try:
    open(os.path.join(where, "planted"), "w").close()
    planted = True
except OSError:
    planted = False
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "core": resource.getrlimit(resource.RLIMIT_CORE),
    "pdeathsig": signal_number.value, "home": os.environ["HOME"], "user": os.environ.get("USER"),
    "dir_uid": os.stat(where).st_uid, "dir_mode": os.stat(where).st_mode & 0o777,
    "socket_uid": os.stat(os.environ["NOTIFY_SOCKET"]).st_uid, "planted": planted,
}))
"""


# an interpreter any user may run (this venv may live under a private home)
SYSTEM_PY = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)


async def _identity(state: Path, marker: str, python: str = PY, **kw: Any) -> dict[str, Any]:
    handler = otree.process_job([python, "-c", IDENTITY], env={"OTREE_TEST_MARKER": marker}, **kw)
    tree = otree.supervisor("t", children=[otree.pool("jobs", {"who": handler}, daily_budget=1.0)])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        result: dict[str, Any] = await pool.submit_nowait("who", None).result()
        assert pool._pool().budget.spent == 250_000  # the notify socket reached otree
        return result


async def test_rlimits_are_set_before_the_child_runs(marker: str, state: Path) -> None:
    result = await _identity(state, marker, rlimits={"nofile": (64, 128), "core": 0})
    assert result["nofile"] == [64, 128]
    assert result["core"] == [0, 0]
    assert result["pdeathsig"] == signal.SIGKILL


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a child as another user needs root")
@pytest.mark.skipif(SYSTEM_PY is None, reason="no system python3 that another user may run")
async def test_a_child_runs_as_its_user_with_its_groups_and_still_dies_with_otree(
    marker: str, state: Path
) -> None:

    nobody = pwd.getpwnam("nobody")
    assert SYSTEM_PY is not None
    result = await _identity(state, marker, SYSTEM_PY, user="nobody", rlimits={"nofile": 32})
    assert (result["uid"], result["gid"]) == (nobody.pw_uid, nobody.pw_gid)
    assert result["groups"] == sorted({nobody.pw_gid, *os.getgrouplist("nobody", nobody.pw_gid)})
    assert result["nofile"] == [32, 32]
    # the kernel clears the death signal when credentials change: otree sets it after the switch
    assert result["pdeathsig"] == signal.SIGKILL
    assert (result["home"], result["user"]) == (nobody.pw_dir, "nobody")
    # its socket is its user's, in a directory of otree's it can pass through but not write in
    assert (result["dir_uid"], result["dir_mode"], result["socket_uid"]) == (0, 0o711, nobody.pw_uid)
    assert result["planted"] is False
    assert not list(Path(tempfile.gettempdir()).glob(f"otree-notify-{os.getpid()}-*"))  # its socket dir


def test_user_and_rlimits_are_checked_in_the_spec() -> None:
    with pytest.raises(
        otree.SpecError, match="p: user must name a user of this machine; got 'no-such-user-x'"
    ):
        otree.process("p", ["true"], user="no-such-user-x")
    with pytest.raises(otree.SpecError, match=r"p: rlimits\['files'\] must be one of .*nofile"):
        otree.process("p", ["true"], rlimits={"files": 10})
    with pytest.raises(
        otree.SpecError, match=r"p: rlimits\['nofile'\] must be N or \(soft, hard\) with soft <= hard"
    ):
        otree.process("p", ["true"], rlimits={"nofile": (10, 5)})
    with pytest.raises(otree.SpecError, match=r"rlimits\['nofile'\] must be N or"):
        otree.process("p", ["true"], rlimits={"nofile": "many"})
    spec = otree.process("p", ["true"], rlimits={"nofile": 10, "core": None, "as": (1 << 30, None)})
    infinity = resource.RLIM_INFINITY
    assert spec.rlimits == {"nofile": (10, 10), "core": (infinity, infinity), "as": (1 << 30, infinity)}


def test_without_root_another_user_and_higher_limits_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from otree._process import child_setup

    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(PermissionError, match="user='nobody': otree must run as root to start a child"):
        child_setup(otree.process("p", ["true"], user="nobody"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        with pytest.raises(
            PermissionError, match=r"rlimits\['nofile'\]: hard limit .* raising it needs root"
        ):
            child_setup(otree.process("p", ["true"], rlimits={"nofile": (10, hard + 1)}))
    assert child_setup(otree.process("p", ["true"], rlimits={"nofile": 10}))[0].rlimits == (
        (resource.RLIMIT_NOFILE, 10, 10),
    )
    # already that user: nothing to switch, and no privilege needed
    monkeypatch.setattr(os, "geteuid", lambda: pwd.getpwnam("nobody").pw_uid)
    setup, entry = child_setup(otree.process("p", ["true"], user="nobody"))
    assert setup.user is None and entry is not None and entry.pw_name == "nobody"


def test_a_nofile_limit_above_the_kernels_is_refused_in_otree() -> None:
    from otree._process import _NR_OPEN, child_setup

    if _NR_OPEN == resource.RLIM_INFINITY:
        pytest.skip("no /proc/sys/fs/nr_open")
    with pytest.raises(ValueError, match=r"rlimits\['nofile'\]: hard limit .* above the kernel's fs.nr_open"):
        child_setup(otree.process("p", ["true"], rlimits={"nofile": _NR_OPEN + 1}))


# --- per-run logs of process jobs -------------------------------------------------------------------

JOB_LOGGING = """
import json, sys
size = json.load(sys.stdin)
sys.stdout.write("x" * size)
sys.stdout.flush()
sys.stderr.write(f"wrote {size}\\n")
"""


async def test_a_logged_process_job_tees_its_whole_output_to_its_own_private_files(
    marker: str, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pool, "JOB_LOGS_KEPT", 2)
    handler = otree.process_job([PY, "-c", JOB_LOGGING], env={"OTREE_TEST_MARKER": marker}, logs=True)
    tree = otree.supervisor("t", children=[otree.pool("jobs", {"run": handler})])
    big = 3 << 19  # 1.5 MiB: more than the result keeps
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        assert await pool.submit_nowait("run", big).result() == "x" * (1 << 20)  # the result stays bounded
        job_dir = state / "logs" / "t" / "jobs" / "jobs" / "1"
        assert (job_dir / "stdout.log").read_bytes() == b"x" * big  # the log has all of it
        assert (job_dir / "stderr.log").read_bytes() == f"wrote {big}\n".encode()
        for path in (job_dir / "stdout.log", job_dir / "stderr.log"):
            assert path.stat().st_mode & 0o777 == 0o600, path
        for path in (job_dir, job_dir.parent):
            assert path.stat().st_mode & 0o777 == 0o700, path
        assert find_log(state, "t/jobs/1", "stderr") == job_dir / "stderr.log"  # otree logs POOL/JOB_ID
        assert find_log(state, "jobs/1", "stdout") == job_dir / "stdout.log"
        for size in (1, 2):
            assert await pool.submit_nowait("run", size).result() == "x" * size
    kept = sorted(entry.name for entry in (state / "logs" / "t" / "jobs" / "jobs").iterdir())
    assert kept == ["2", "3"]  # the oldest job's logs went once more than JOB_LOGS_KEPT jobs ran


async def test_a_process_job_without_logs_writes_none(marker: str, state: Path) -> None:
    handler = otree.process_job([PY, "-c", JOB_LOGGING], env={"OTREE_TEST_MARKER": marker})
    tree = otree.supervisor("t", children=[otree.pool("jobs", {"run": handler})])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        assert await pool.submit_nowait("run", 3).result() == "xxx"
    assert not (state / "logs").exists()


def test_process_job_logs_is_checked_in_the_spec() -> None:
    with pytest.raises(otree.SpecError, match="job: logs must be True or False; got 'yes'"):
        otree.process_job(["true"], logs="yes")  # type: ignore[arg-type]


WAIT_FOR_FILE = """
import json, os, sys, time
gate = json.load(sys.stdin)
print("started", flush=True)
while gate and not os.path.exists(gate):
    time.sleep(0.01)
"""


async def test_a_running_jobs_logs_are_never_pruned(
    marker: str, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pool, "JOB_LOGS_KEPT", 1)
    handler = otree.process_job([PY, "-c", WAIT_FOR_FILE], env={"OTREE_TEST_MARKER": marker}, logs=True)
    tree = otree.supervisor("t", children=[otree.pool("jobs", {"run": handler}, max_concurrency=2)])
    gate = tmp_path / "gate"
    jobs = state / "logs" / "t" / "jobs" / "jobs"
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        with trio.fail_after(10):
            held = pool.submit_nowait("run", str(gate))
            while not (jobs / "1" / "stdout.log").is_file() or not (jobs / "1" / "stdout.log").read_bytes():
                await trio.sleep(0.01)
            await pool.submit_nowait("run", "").result()  # beyond the bound, but job 1 still runs
            assert sorted(entry.name for entry in jobs.iterdir()) == ["1", "2"]
            gate.touch()
            await held.result()
            await pool.submit_nowait("run", "").result()
    assert sorted(entry.name for entry in jobs.iterdir()) == ["3"]
    assert (jobs / "3" / "stdout.log").read_bytes() == b"started\n"
