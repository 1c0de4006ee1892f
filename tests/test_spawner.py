"""The spawn helper: children cloned for otree by a small process that is also the guard.

Real processes throughout; the ``marker`` fixture kills (by pid) whatever still carries
the test's marker when it ends, and fails the test if anything did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import otree
from otree import _spawner
from otree._reaper import Reaper
from otree._spawner import MESSAGE_LIMIT, ChildSetup, Spawner
from tests.test_process import (
    PY,
    _guards_of,
    first,
    marked_pids,
    marker,
    state,
    state_and_parent,
    wait_until,
    zombies_of,
)

__all__ = ["marker", "state"]  # fixtures, imported for pytest


@contextlib.asynccontextmanager
async def open_spawner() -> AsyncIterator[tuple[Spawner, Reaper]]:
    reaper = Reaper()
    spawner = Spawner(reaper)
    try:
        yield spawner, reaper
    finally:
        spawner.close()


async def exit_status(pid: int) -> int:
    """Wait for a child of this process (with its pidfd) and reap it."""
    pidfd = os.pidfd_open(pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# --- what a spawn gives --------------------------------------------------------------------------


async def test_the_child_is_otrees_own_in_a_session_of_its_own(marker: str) -> None:
    async with open_spawner() as (spawner, reaper):
        child = await spawner.spawn(["sh", "-c", "exit 7"], env={"OTREE_TEST_MARKER": marker})
        # cloned by the helper, but otree is its parent: otree reaps it and reads its status
        assert child.pid in reaper.waited and child.pid in reaper.groups
        assert await exit_status(child.pid) == 7
        running = await spawner.spawn(["sleep", "1000"], env={"OTREE_TEST_MARKER": marker})
        try:
            assert state_and_parent(running.pid)[1] == os.getpid()
            assert os.getsid(running.pid) == os.getpgid(running.pid) == running.pid
        finally:
            os.kill(running.pid, signal.SIGKILL)
            assert await exit_status(running.pid) == -signal.SIGKILL


async def test_a_request_too_big_for_one_message_goes_through_a_memfd(marker: str) -> None:
    big = "x" * (2 * MESSAGE_LIMIT)
    env = {"OTREE_TEST_MARKER": marker, "BIG": big}
    read_end, write_end = os.pipe()
    async with open_spawner() as (spawner, _):
        try:
            child = await spawner.spawn(
                [PY, "-c", "import os; print(len(os.environ['BIG']))"], env=env, stdio=(None, write_end, None)
            )
        finally:
            os.close(write_end)
        assert await exit_status(child.pid) == 0
    with os.fdopen(read_end) as output:
        assert output.read() == f"{len(big)}\n"


async def test_a_spawn_is_woken_once_when_its_report_ends(
    marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not by the pid line the child writes at once: that wake took the CPU from the child on its
    way to exec, and cost otree a scheduler round per spawn."""
    waits: list[int] = []
    wait_readable = trio.lowlevel.wait_readable

    async def counted(fd: int) -> None:
        waits.append(fd)
        await wait_readable(fd)

    async with open_spawner() as (spawner, _):
        monkeypatch.setattr(_spawner.trio.lowlevel, "wait_readable", counted)
        children = [
            await spawner.spawn(["sh", "-c", "exit 3"], env={"OTREE_TEST_MARKER": marker}) for _ in range(20)
        ]
        spawns = len(waits)
        with pytest.raises(FileNotFoundError):
            await spawner.spawn(["/nonexistent/agent"], env={"OTREE_TEST_MARKER": marker})
        monkeypatch.undo()
        for child in children:
            assert await exit_status(child.pid) == 3
    assert spawns == 20 and len(waits) == 21


async def test_a_program_is_looked_up_on_the_path_of_each_spawn(marker: str, tmp_path: Path) -> None:
    """The search paths are kept per (program, PATH): a spawn with another PATH finds another program."""
    for name, code in (("one", 11), ("two", 12)):
        (tmp_path / name).mkdir()
        tool = tmp_path / name / "tool"
        tool.write_text(f"#!/bin/sh\nexit {code}\n")
        tool.chmod(0o700)
    async with open_spawner() as (spawner, _):
        for name, code in (("one", 11), ("two", 12), ("one", 11)):
            env = {"OTREE_TEST_MARKER": marker, "PATH": f"{tmp_path / name}:/usr/bin:/bin"}
            child = await spawner.spawn(["tool"], env=env)
            assert await exit_status(child.pid) == code
        with pytest.raises(FileNotFoundError):
            await spawner.spawn(["tool"], env={"OTREE_TEST_MARKER": marker, "PATH": "/usr/bin:/bin"})


# --- a spawn that fails --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "cwd", "setup", "error", "names"),
    [
        (["/nonexistent/agent"], None, ChildSetup(), FileNotFoundError, "'/nonexistent/agent'"),
        (["no-such-program-x"], None, ChildSetup(), FileNotFoundError, "'no-such-program-x'"),
        (["true"], "/nonexistent-dir", ChildSetup(), FileNotFoundError, "'/nonexistent-dir'"),
        (["/etc/passwd"], None, ChildSetup(), PermissionError, "'/etc/passwd'"),
        # a limit the kernel refuses inside the child (soft above hard)
        (["true"], None, ChildSetup(((7, 64, 32),)), OSError, "\"rlimits['nofile'] = (64, 32)\""),
    ],
    ids=["missing", "not-on-path", "bad-cwd", "not-executable", "limit"],
)
async def test_a_failed_spawn_is_one_error_naming_what_and_leaves_nothing(  # noqa: PLR0917
    marker: str, argv: list[str], cwd: str | None, setup: ChildSetup, error: type[OSError], names: str
) -> None:
    async with open_spawner() as (spawner, reaper):
        with pytest.raises(error) as raised:
            await spawner.spawn(
                argv, env={"OTREE_TEST_MARKER": marker, "PATH": "/usr/bin:/bin"}, cwd=cwd, setup=setup
            )
        assert str(raised.value).endswith(names)
        assert raised.value.errno is not None and str(raised.value).startswith(
            f"[Errno {raised.value.errno}]"
        )
        # reaped, and nothing left listed for otree to wait for
        assert zombies_of(os.getpid()) == []
        assert reaper.waited == {spawner._proc.pid} if spawner._proc is not None else set()
        assert reaper.groups == set()


# --- the helper's death ------------------------------------------------------------------------


async def test_a_killed_helper_is_replaced_and_spawns_go_on(marker: str) -> None:
    async with open_spawner() as (spawner, _):
        env = {"OTREE_TEST_MARKER": marker}
        running = await spawner.spawn(["sleep", "1000"], env=env)
        try:
            (old,) = _guards_of(os.getpid())
            os.kill(old, signal.SIGKILL)
            assert await trio.to_thread.run_sync(
                lambda: wait_until(lambda: _guards_of(os.getpid()) not in ([], [old]), 5)
            )
            # the fleet is untouched, and the next spawn goes through the new helper
            assert state_and_parent(running.pid) == ("S", os.getpid())
            child = await spawner.spawn(["sh", "-c", "exit 5"], env=env)
            assert await exit_status(child.pid) == 5
        finally:
            os.kill(running.pid, signal.SIGKILL)
            await exit_status(running.pid)


async def test_a_stopped_helper_is_replaced_and_the_spawn_goes_on(
    marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spawner, "WEDGED_SECONDS", 0.5)
    async with open_spawner() as (spawner, _):
        env = {"OTREE_TEST_MARKER": marker}
        child = await spawner.spawn(["true"], env=env)
        assert await exit_status(child.pid) == 0
        (old,) = _guards_of(os.getpid())
        os.kill(old, signal.SIGSTOP)
        try:
            with trio.fail_after(10):
                child = await spawner.spawn(["sh", "-c", "exit 4"], env=env)
            assert await exit_status(child.pid) == 4
            assert old not in _guards_of(os.getpid())  # killed and reaped
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGKILL)


async def test_the_fleet_outlives_its_helper_and_is_still_supervised(marker: str, state: Path) -> None:
    trigger = state.parent / "exit-now"
    code = f"while [ ! -e {trigger} ]; do sleep 0.02; done; rm {trigger}; exit 3"
    env = {"OTREE_TEST_MARKER": marker}
    tree = otree.supervisor(
        "t",
        children=[
            otree.process("p", ["sh", "-c", code], env=env),
            otree.process("q", ["sleep", "1000"], env=env),
        ],
    )
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        before = {info.id: info.pid for info in sup.which_children()}
        (helper,) = _guards_of(os.getpid())
        os.kill(helper, signal.SIGKILL)
        replaced = await trio.to_thread.run_sync(
            lambda: wait_until(lambda: _guards_of(os.getpid()) not in ([], [helper]), 5)
        )
        assert replaced
        assert {info.id: info.pid for info in sup.which_children()} == before  # nobody died with it
        async with sup.events() as events:
            trigger.touch()
            exited = await first(events, "child.exited", "t/p")
            await first(events, "child.ready", "t/p")
        # its exit status still reached otree, and it was restarted through the new helper
        assert (exited.reason, exited.details["exit_code"]) == ("error", 3)
        after = {info.id: info.pid for info in sup.which_children()}
        assert after["q"] == before["q"] and after["p"] not in (None, before["p"])


async def test_a_helper_that_did_not_clone_a_child_is_told_its_group(marker: str) -> None:
    # a helper replaced between the clone and otree reading the pid: otree tells the new one
    async with open_spawner() as (cloner, _):
        child = await cloner.spawn(
            ["sh", "-c", "sleep 1000 & exec sleep 1000"], env={"OTREE_TEST_MARKER": marker}
        )
        assert await trio.to_thread.run_sync(lambda: wait_until(lambda: len(marked_pids(marker)) == 2, 5))
        async with open_spawner() as (other, _):
            other._known(child.pid, other.generation - 1)
        # the other helper learned the group: when its otree went away, it killed all of it
        with trio.fail_after(5):
            assert await exit_status(child.pid) == -signal.SIGKILL
        assert await trio.to_thread.run_sync(lambda: wait_until(lambda: marked_pids(marker) == [], 1))


# --- no window ------------------------------------------------------------------------------------


HOST = """
import functools, os, signal, sys, time, trio, trio.testing
from otree._reaper import Reaper
from otree._spawner import Spawner
from tests.test_process import marked_pids
async def main():
    spawner = Spawner(Reaper())
    env = {"OTREE_TEST_MARKER": sys.argv[1]}
    async with trio.open_nursery() as nursery:
        argv = ["sh", "-c", "sleep 1000 & sleep 1000 & exec sleep 1000"]
        nursery.start_soon(functools.partial(spawner.spawn, argv, env=env))
        await trio.testing.wait_all_tasks_blocked()  # the request is sent
        # the child runs its program and has forked, but otree has not read its pid: die now
        deadline = time.monotonic() + 10
        while len(marked_pids(sys.argv[1])) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)
trio.run(main)
"""


@pytest.mark.parametrize("attempt", range(5))
def test_otree_killed_with_a_spawn_in_flight_leaves_nothing(
    tmp_path: Path, marker: str, attempt: int
) -> None:
    # otree dies after its child has started a program that forked, before otree learned the
    # child's pid: the helper listed the group as its clone returned (before it could read that
    # otree is gone), so it kills the grandchildren too (the child's death signal takes only it)
    host = subprocess.run([PY, "-c", HOST, marker], timeout=30, check=False, cwd=Path(__file__).parent.parent)
    assert host.returncode == -signal.SIGKILL
    assert wait_until(lambda: marked_pids(marker) == [], 1.0)
