"""Nothing of a process tree survives it: the stop sweep, the guard and its replacement, socket dirs.

Real processes throughout. Each carries a marker in its environment; the ``marker``
fixture kills (by pid) whatever still carries it when the test ends, and fails the
test if anything did.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing

import otree
from otree import _reaper
from otree._reaper import Reaper
from tests.test_process import (
    GRANDCHILDREN,
    PY,
    SLEEP,
    _guards_of,
    launch_otree_run,
    marked_pids,
    marker,
    proc,
    sigkill_leaves_nothing,
    start_otree_run,
    state,
    wait_until,
)

__all__ = ["marker", "state"]  # fixtures, imported for pytest


def one_child_tree(marker: str, argv: list[str]) -> str:
    return (
        "import otree\n"
        f"tree = otree.supervisor('t', children=[otree.process('p', {argv!r}, "
        f"env={{'OTREE_TEST_MARKER': {marker!r}}})])\n"
    )


def stop_cleanly(run: subprocess.Popen[str]) -> None:
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 0


# --- the stop sweep ---------------------------------------------------------------------------------

# the escaper: a grandchild leaves the child's session (setsid) and starts a process of its own
ESCAPER = ["sh", "-c", "(setsid sh -c 'sleep 600; true' &); exec sleep 599"]

# an escaper that, after a delay, starts a second escaper in a session of its own
DOUBLE_ESCAPE = """
import os, time
def escape(then):
    if os.fork() == 0:
        os.setsid()
        then()
        os._exit(0)
def second():
    time.sleep(1000)
def first():
    time.sleep(0.2)
    escape(second)
    time.sleep(1000)
escape(first)
time.sleep(1000)
"""

# an escaper that starts a new escaper every 20 ms for as long as it lives
ESCAPING_FOREVER = """
import os, time
if os.fork() == 0:
    os.setsid()
    while True:
        if os.fork() == 0:
            os.setsid()
            time.sleep(1000)
            os._exit(0)
        time.sleep(0.02)
time.sleep(1000)
"""


def test_a_clean_stop_kills_the_whole_group_of_an_escaper(tmp_path: Path, marker: str) -> None:
    run = launch_otree_run(tmp_path, one_child_tree(marker, ESCAPER))
    try:
        # sleep 599 (the child), the escaped sh and its sleep 600
        assert wait_until(lambda: len(marked_pids(marker)) == 3, 5.0)
        stop_cleanly(run)
        assert marked_pids(marker) == []
    finally:
        run.kill()
        run.wait()


@pytest.mark.parametrize("code", [DOUBLE_ESCAPE, ESCAPING_FOREVER], ids=["double", "forever"])
def test_a_clean_stop_sweeps_escapers_of_escapers(tmp_path: Path, marker: str, code: str) -> None:
    run = launch_otree_run(tmp_path, one_child_tree(marker, [PY, "-c", code]))
    try:
        assert wait_until(lambda: len(marked_pids(marker)) >= 3, 5.0)  # the child, an escaper, its escaper
        stop_cleanly(run)
        assert marked_pids(marker) == []
    finally:
        run.kill()
        run.wait()


# --- the guard -------------------------------------------------------------------------------------


def test_a_killed_guard_is_replaced_at_once_knowing_every_group(tmp_path: Path, marker: str) -> None:
    run = start_otree_run(tmp_path, marker, GRANDCHILDREN)  # two children, three sleeps each
    try:
        assert wait_until(lambda: len(_guards_of(run.pid)) == 1 and len(marked_pids(marker)) == 8, 5.0)
        (old,) = _guards_of(run.pid)
        os.kill(old, signal.SIGKILL)
        # no child starts or stops from here on: only the guard's own death can bring a new one
        assert wait_until(lambda: _guards_of(run.pid) not in ([], [old]), 2.0)
        assert sigkill_leaves_nothing(run, marker)
    finally:
        run.kill()
        run.wait()


def test_a_child_that_kills_otree_at_once_leaves_nothing(tmp_path: Path, marker: str) -> None:
    # The child starts a grandchild and SIGKILLs otree at once, before otree's own code has
    # seen its pid: the guard must know the group from before the child's first instruction.
    argv = ["sh", "-c", "sleep 1000 & kill -KILL $PPID; exec sleep 1000"]
    tree = tmp_path / "tree.py"
    tree.write_text(one_child_tree(marker, argv))
    run = subprocess.Popen(
        [PY, "-m", "otree", "run", str(tree), "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.DEVNULL,
    )
    try:
        assert run.wait(timeout=30) == -signal.SIGKILL
        assert wait_until(lambda: marked_pids(marker) == [], 1.0)
    finally:
        run.kill()
        run.wait()


async def test_a_child_whose_exec_fails_is_taken_off_the_guards_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The helper lists the child's group as it clones it; if the exec then fails its pid is
    # free again, and a stale entry could one day name a stranger's group.
    from otree import _spawner
    from otree._reaper import Reaper

    told = tmp_path / "groups"  # the helper's list when otree lets it go
    last = "for pgid in leaders.values():"
    record = f"open({str(told)!r}, 'w').write(repr(sorted(leaders.values())))\n{last}"
    monkeypatch.setattr(_spawner, "_HELPER", _spawner._HELPER.replace(last, record))
    reaper = Reaper()
    spawner = _spawner.Spawner(reaper)
    try:
        with pytest.raises(FileNotFoundError):
            await spawner.spawn([str(tmp_path / "missing")], env={})
    finally:
        spawner.close()
    assert told.read_text() == "[]"
    assert reaper.waited == reaper.groups == set()  # reaped, and nothing left for otree to wait for


# --- notify socket directories ------------------------------------------------------------------------


async def test_the_notify_dir_of_a_dead_tree_is_swept(
    marker: str, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="otree-t-"))  # short: socket paths must fit in 108 bytes
    monkeypatch.setenv("OTREE_RUNTIME_DIR", str(runtime))
    try:
        # as a SIGKILLed otree of another pid leaves it: a lock file nobody holds
        dead = runtime / f"notify-{os.getpid() + 1}-deadbeef"
        dead.mkdir(mode=0o700)
        (dead / ".lock").touch()
        (dead / "1.sock").touch()
        tree = otree.supervisor("t", children=[proc("p", SLEEP, marker)])
        async with otree.open_supervisor(tree, state_dir=state):
            assert not dead.exists()
            assert [p.name.startswith(f"notify-{os.getpid()}-") for p in runtime.iterdir()] == [True]
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


# --- orphan reaping under otree run ------------------------------------------------------------


async def test_between_two_sweeps_a_crash_loop_runs_no_sigchld_handler(
    marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``otree run`` the reaper takes SIGCHLD only while it waits for one: during the pause
    after a sweep the signal has no handler (no Python code, no wake per exit), and the sweep
    that follows the pause reaps what exited meanwhile."""
    monkeypatch.setattr(_reaper, "SIGCHLD_COALESCE", 0.5)
    monkeypatch.setattr(Reaper, "reap_all", True)
    env = {**os.environ, "OTREE_TEST_MARKER": marker}
    reaper = Reaper()

    def gone(pid: int) -> bool:
        return not Path(f"/proc/{pid}").exists()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reaper.serve)
        await trio.testing.wait_all_tasks_blocked()
        assert signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, signal.SIG_IGN)
        first = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 0"], env)
        assert await trio.to_thread.run_sync(wait_until, lambda: gone(first), 5.0)  # reaped at once
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL  # the pause: no handler
        second = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 0"], env)
        assert await trio.to_thread.run_sync(wait_until, lambda: gone(second), 5.0)  # after the pause
        nursery.cancel_scope.cancel()
