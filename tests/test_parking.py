"""Parking and waking: idle_timeout, the on_demand restart type, autostart=False, wake, otree start.

Task children run on trio's MockClock; process children are real processes (cleaned up by
the ``marker`` fixture); ``otree start`` goes through a real control socket.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import otree
from otree._cli import main
from otree._info import ChildInfo, Status, StatusNode
from otree._lifecycle import joins_group_restart, wake_action
from otree._paths import child_log_dir
from otree._render import render_status
from otree._run import reload_tree
from tests.helpers import Log, crash_after, worker
from tests.test_control_server import serving
from tests.test_process import first, marked_pids, marker

__all__ = ["marker"]  # a fixture, imported for pytest


async def returns(log: Log, name: str) -> None:
    log.add("start", name)
    await trio.sleep(1)


async def remembers(
    seen: list[otree.ExitInfo | None], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    seen.append(otree.current_child().previous_exit)
    task_status.started()
    await trio.sleep_forever()


async def busy_until(until: float, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Shows a sign of life every 5 s (from a task of its own) until trio time ``until``, then idles."""
    task_status.started()

    async def beat() -> None:
        while trio.current_time() < until:
            await trio.sleep(5)
            otree.current_child().alive()  # found from a task the child started, too

    async with trio.open_nursery() as nursery:
        nursery.start_soon(beat)
    await trio.sleep_forever()


async def slow_to_start(log: Log, seconds: float, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    log.add("start", "a")
    await trio.sleep(seconds)
    task_status.started()
    await trio.sleep_forever()


async def slow_to_stop(log: Log, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Trapping: takes 3 s to tidy up once asked to stop."""
    me = otree.current_child()
    log.add("start", "a")
    task_status.started()
    await me.stopping.wait()
    await trio.sleep(3)
    log.add("stop", "a")


async def next_of(
    stream: otree.EventStream, kind: str, path: str | None = None, *, within: float = 200
) -> otree.Event:
    """The next ``kind`` event, within ``within`` seconds (of MockClock time, or real time)."""
    with trio.fail_after(within):
        return await first(stream, kind, path)


def child(sup: otree.SupervisorHandle, child_id: str) -> ChildInfo:
    return next(info for info in sup.which_children() if info.id == child_id)


async def kinds_until(stream: otree.EventStream, kind: str, path: str) -> list[tuple[str, str, str]]:
    """(path, kind, reason) of every event up to the first ``kind`` of ``path`` (within 200 s)."""
    seen = []
    with trio.fail_after(200):
        async for event in stream:
            seen.append((event.path, event.kind, event.reason))
            if (event.kind, event.path) == (kind, path):
                return seen
    raise AssertionError(f"no {kind} of {path}")


# --- the spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 0, "30", True, float("nan")])
def test_a_bad_idle_timeout_is_a_spec_error_naming_the_child(bad: Any) -> None:
    expected = f"alice: idle_timeout must be a number > 0 or None; got {bad!r}"
    with pytest.raises(otree.SpecError) as task_error:
        otree.task("alice", worker, Log(), "a", idle_timeout=bad)
    assert str(task_error.value) == expected
    with pytest.raises(otree.SpecError) as process_error:
        otree.process("alice", ["true"], idle_timeout=bad)
    assert str(process_error.value) == expected


def test_a_temporary_child_cannot_be_parked() -> None:
    with pytest.raises(otree.SpecError) as error:
        otree.task("alice", worker, Log(), "a", restart="temporary", idle_timeout=30)
    assert str(error.value) == (
        "alice: idle_timeout requires restart 'permanent', 'transient' or 'on_demand'; got 'temporary'"
    )


def test_autostart_must_be_a_bool_on_every_kind_of_child() -> None:
    builders = [
        lambda bad: otree.task("alice", worker, Log(), "a", autostart=bad),
        lambda bad: otree.process("alice", ["true"], autostart=bad),
        lambda bad: otree.supervisor("alice", autostart=bad),
        lambda bad: otree.pool("alice", {"work": returns}, autostart=bad),
    ]
    for build in builders:
        with pytest.raises(otree.SpecError) as error:
            build("no")
        assert str(error.value) == "alice: autostart must be True or False; got 'no'"


def test_on_demand_is_a_restart_type_that_no_exit_code_can_force() -> None:
    assert otree.task("a", worker, Log(), "a", restart="on_demand").restart == "on_demand"
    assert otree.process("p", ["true"], restart="on_demand", no_restart_exit_codes=[3]).restart == "on_demand"
    with pytest.raises(otree.SpecError) as error:
        otree.process("p", ["true"], restart="on_demand", restart_exit_codes=[3])
    assert (
        str(error.value)
        == "p: restart_exit_codes requires restart 'permanent' or 'transient'; got 'on_demand'"
    )


def test_otree_check_shows_the_new_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "tree.py"
    file.write_text(
        "import otree\n"
        "async def peer(): pass\n"
        "tree = otree.supervisor('fleet', children=[\n"
        "    otree.task('peer', peer, restart='on_demand', idle_timeout=3600, autostart=False),\n"
        "    otree.process('tool', ['tool'], idle_timeout=1.5),\n"
        "    otree.task('plain', peer)])\n"
    )
    assert main(["check", str(file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "  peer  task  restart=on_demand  shutdown=5.0  autostart=False  idle_timeout=3600"
    assert lines[2] == "  tool  process  restart=permanent  shutdown=5.0  argv=tool  idle_timeout=1.5"
    assert lines[3] == "  plain  task  restart=permanent  shutdown=5.0"


# --- the pure decisions ------------------------------------------------------------------------------


def test_which_children_join_a_group_restart() -> None:
    assert joins_group_restart("permanent", "", ever_started=True)
    assert joins_group_restart("transient", "held", ever_started=True)  # stopped by hand: as OTP
    assert not joins_group_restart("on_demand", "", ever_started=True)
    assert not joins_group_restart("permanent", "parked", ever_started=True)
    assert not joins_group_restart("permanent", "", ever_started=False)


def test_what_a_wake_does() -> None:
    cases: list[tuple[Any, bool, bool, Any, bool, str]] = [
        ("running", True, False, "", False, "none"),
        ("running", True, True, "", False, "finish_then_start"),
        ("restarting", False, False, "", True, "none"),
        ("stopped", False, False, "parked", False, "start"),
        ("stopped", False, False, "", False, "start"),
        ("stopped", False, False, "held", False, "held"),
        ("stopped", False, False, "held", True, "start"),
    ]
    for state, running, ending, rest, manual, action in cases:
        assert wake_action(state, running=running, ending=ending, rest=rest, manual=manual) == action


# --- idle_timeout: task children -------------------------------------------------------------------


async def test_an_idle_task_is_parked_not_restarted_and_not_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    # max_restarts=0: a restart counted for the park would make the root give up
    spec = otree.task("a", worker, log, "a", idle_timeout=10)
    tree = otree.supervisor("root", max_restarts=0, children=[spec])
    async with otree.open_supervisor(tree) as sup:
        events = sup.events()
        began = trio.current_time()
        seen = await kinds_until(events, "child.parked", "root/a")
        assert trio.current_time() - began == pytest.approx(10)
        assert seen == [("root/a", "child.stopped", "shutdown"), ("root/a", "child.parked", "idle")]
        await trio.sleep(1000)  # a permanent child, parked: it stays parked
        info = child(sup, "a")
        assert (info.state, info.restarts, info.exit) == ("stopped", 0, otree.ExitInfo("shutdown", "idle"))
        assert log.of("start") == ["a"]
        assert sup.count_children().active == 0


async def test_the_parked_event_says_why(autojump_clock: trio.testing.MockClock) -> None:
    tree = otree.supervisor("root", children=[otree.task("a", worker, Log(), "a", idle_timeout=10)])
    async with otree.open_supervisor(tree) as sup:
        events = sup.events()
        stopped = await next_of(events, "child.stopped")
        assert stopped.details["detail"] == "idle"
        parked = await next_of(events, "child.parked")
        assert (parked.path, parked.reason, parked.details) == ("root/a", "idle", {"idle_timeout": 10})


async def test_alive_resets_the_idle_clock(autojump_clock: trio.testing.MockClock) -> None:
    began = trio.current_time()
    spec = otree.task("a", busy_until, began + 100, idle_timeout=10)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        await next_of(sup.events(), "child.parked")
        # the last sign of life at +100 (beats every 5 s), parked 10 s after it
        assert trio.current_time() - began == pytest.approx(110)


async def test_idle_counts_from_readiness(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    spec = otree.task("a", slow_to_start, log, 25, idle_timeout=10)
    began = trio.current_time()
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        assert trio.current_time() - began == pytest.approx(25)  # a slow start is not idleness
        await next_of(sup.events(), "child.parked")
        assert trio.current_time() - began == pytest.approx(35)


# --- wake ------------------------------------------------------------------------------------------


async def test_wake_brings_a_parked_child_back_knowing_it_was_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[otree.ExitInfo | None] = []
    spec = otree.task("a", remembers, seen, idle_timeout=10)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        events = sup.events()
        await next_of(events, "child.parked")
        info = await sup.wake("a")
        assert (info.state, info.restarts) == ("running", 0)  # a wake is not a restart
        assert seen == [None, otree.ExitInfo("shutdown", "idle")]
        woken = await next_of(events, "child.woken")
        assert (woken.path, woken.reason, woken.details) == ("root/a", "parked", {"by": "wake"})
        woke_at = trio.current_time()
        await next_of(events, "child.parked")  # and its idle clock starts afresh
        assert trio.current_time() - woke_at == pytest.approx(10)


async def test_wake_of_a_running_child_changes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with otree.open_supervisor(
        otree.supervisor("root", children=[otree.task("a", worker, log, "a")])
    ) as sup:
        before = child(sup, "a")
        after = await sup.wake("a")
        assert after == before
        assert log.of("start") == ["a"]


async def test_concurrent_wakes_start_the_child_once(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    spec = otree.task("a", slow_to_start, log, 5, restart="on_demand", autostart=False)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        events = sup.events()
        answers: list[ChildInfo] = []

        async def wake() -> None:
            answers.append(await sup.wake("a"))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(wake)
        assert log.of("start") == ["a"]
        assert [info.state for info in answers] == ["running"] * 3
        assert len({info.started_at for info in answers}) == 1
        await sup.terminate_child("a")  # an event to stop reading at
        kinds = [kind for _, kind, _ in await kinds_until(events, "child.stopped", "root/a")]
        assert kinds == ["child.woken", "child.started", "child.ready", "child.stopped"]


async def test_a_wake_during_a_parks_grace_waits_for_it_then_starts_the_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    spec = otree.task("a", slow_to_stop, log, idle_timeout=10, shutdown=5)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        events = sup.events()
        await trio.sleep(11)  # parking began at +10; it takes 3 s to stop
        assert log.of("stop") == []
        info = await sup.wake("a")
        assert info.state == "running"
        assert log.entries == [("start", "a"), ("stop", "a"), ("start", "a")]
        assert await kinds_until(events, "child.ready", "root/a") == [
            ("root/a", "child.stopped", "shutdown"),
            ("root/a", "child.woken", "parked"),
            ("root/a", "child.started", ""),
            ("root/a", "child.ready", ""),
        ]
        await trio.sleep(1)  # the parked run's own exit, stale now, is not a park
        assert child(sup, "a").state == "running"


@pytest.mark.parametrize("restart", ["on_demand", "temporary"])
async def test_a_wake_queued_before_a_crash_is_handled_finds_the_child_ended(
    restart: str, autojump_clock: trio.testing.MockClock
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        children=[
            otree.task("slow", slow_to_start, log, 5, restart="on_demand", autostart=False),
            otree.task("t", crash_after, log, "t", 2, restart=restart),  # type: ignore[arg-type]
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        outcome: list[object] = []

        async def wake_t() -> None:
            await trio.sleep(1)  # queued behind the slow start; t crashes at +2, its exit behind this
            try:
                outcome.append(await sup.wake("t"))
            except otree.NotFound as error:
                outcome.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wake_t)
            await sup.wake("slow")  # holds the queue for 5 s
        await trio.sleep(1)  # the crash's own exit, stale by now, changes nothing
        if restart == "temporary":  # its spec went with its exit: nothing to wake
            assert [str(e) for e in outcome] == ["no child at root/t (children of root: slow)"]
            assert [info.id for info in sup.which_children()] == ["slow"]
        else:
            [info] = outcome
            assert isinstance(info, ChildInfo) and info.state == "running"
            assert child(sup, "t").state == "running"
        assert log.of("start").count("t") == (1 if restart == "temporary" else 2)


async def test_wake_of_a_restarting_child_leaves_it_to_its_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        backoff=otree.Backoff(initial=10, jitter=0),
        children=[otree.task("a", crash_after, log, "a", 1)],
    )
    async with otree.open_supervisor(tree) as sup:
        await next_of(sup.events(), "child.restarting")
        assert (await sup.wake("a")).state == "restarting"
        assert log.of("start") == ["a"]  # not started early: its backoff stands


async def test_wake_of_an_unknown_child_is_not_found_naming_the_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tree = otree.supervisor(
        "root", children=[otree.supervisor("team", children=[otree.task("a", worker, Log(), "a")])]
    )
    async with otree.open_supervisor(tree) as sup:
        team = sup.find("team")
        assert isinstance(team, otree.SupervisorHandle)
        with pytest.raises(otree.NotFound) as error:
            await team.wake("nobody")
        assert str(error.value) == "no child at root/team/nobody (children of root/team: a)"
        assert (await team.wake("a")).path == "root/team/a"  # a nested child: through its handle


async def test_a_wake_that_fails_to_start_keeps_the_spec(autojump_clock: trio.testing.MockClock) -> None:
    async def broken(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raise ValueError("no config")

    spec = otree.task("a", broken, restart="on_demand", autostart=False)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        with pytest.raises(otree.StartError) as error:
            await sup.wake("a")
        assert str(error.value) == "root/a: failed to start: ValueError: no config"
        assert child(sup, "a").state == "stopped"


# --- on_demand and autostart=False ---------------------------------------------------------------


async def test_an_on_demand_child_is_never_restarted_and_keeps_its_spec(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        max_restarts=0,
        children=[
            otree.task("crashes", crash_after, log, "crashes", 5, restart="on_demand"),
            otree.task("returns", returns, log, "returns", restart="on_demand"),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        await trio.sleep(1000)
        assert {
            info.id: (info.state, info.exit.reason if info.exit else None) for info in sup.which_children()
        } == {
            "crashes": ("stopped", "error"),
            "returns": ("stopped", "normal"),
        }
        assert log.of("start") == ["crashes", "returns"]
        assert sup.get_childspec("crashes").restart == "on_demand"
        assert (await sup.wake("crashes")).state == "running"
        assert (await sup.wake("returns")).state == "running"
        await trio.testing.wait_all_tasks_blocked()  # ready at once: it logs once it runs
        assert log.of("start") == ["crashes", "returns", "crashes", "returns"]


async def test_an_autostart_false_child_is_shown_and_started_by_a_wake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        children=[
            otree.task("a", worker, log, "a", autostart=False),
            otree.supervisor("team", autostart=False, children=[otree.task("b", worker, log, "b")]),
            otree.task("c", worker, log, "c"),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        events = sup.events()
        shown = {info.id: (info.state, info.started_at, info.exit) for info in sup.which_children()}
        assert shown == {"a": ("stopped", None, None), "team": ("stopped", None, None), "c": shown["c"]}
        assert log.of("start") == ["c"]
        assert (await sup.wake("team")).state == "running"
        team = sup.child("team")
        assert isinstance(team, otree.SupervisorHandle)
        assert [info.state for info in team.which_children()] == ["running"]
        woken = await next_of(events, "child.woken")
        assert (woken.path, woken.reason) == ("root/team", "not_started")
        assert log.of("start") == ["c", "b"]


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
async def test_group_restarts_leave_on_demand_parked_and_never_started_children_alone(
    strategy: str, autojump_clock: trio.testing.MockClock
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        strategy=strategy,  # type: ignore[arg-type]
        children=[
            otree.task("trigger", crash_after, log, "trigger", 20),
            otree.task("plain", worker, log, "plain"),
            otree.task("demand", worker, log, "demand", restart="on_demand"),
            otree.task("later", worker, log, "later", autostart=False),
            otree.task("idle", worker, log, "idle", idle_timeout=5),
            otree.task("held", worker, log, "held"),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        events = sup.events()
        await sup.terminate_child("held")
        await next_of(events, "child.restarting")
        await next_of(events, "child.ready", "root/plain")
        await trio.testing.wait_all_tasks_blocked()
        states = {info.id: info.state for info in sup.which_children()}
        assert states == {
            "trigger": "running",
            "plain": "running",
            "demand": "stopped",  # stopped with the group, not started: it waits for a wake
            "later": "stopped",
            "idle": "stopped",
            "held": "running",  # stopped by hand: a group restart starts it, as OTP's one_for_all
        }
        assert child(sup, "idle").exit == otree.ExitInfo("shutdown", "idle")
        assert child(sup, "later").started_at is None
        assert log.of("start") == ["trigger", "plain", "demand", "idle", "held", "trigger", "plain", "held"]


async def test_a_reload_adds_an_autostart_false_child_without_starting_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    before = otree.supervisor("root", children=[otree.task("a", worker, log, "a")])
    after = otree.supervisor(
        "root",
        children=[otree.task("a", worker, log, "a"), otree.task("b", worker, log, "b", autostart=False)],
    )
    async with otree.open_supervisor(before) as sup:
        summary = await reload_tree(sup, after)
        assert summary["added"] == ["root/b"] and summary["failed"] == []
        assert (child(sup, "b").state, child(sup, "b").started_at) == ("stopped", None)
        await trio.testing.wait_all_tasks_blocked()
        assert log.of("start") == ["a"]


# --- stopped by hand ------------------------------------------------------------------------------


async def test_a_child_stopped_by_hand_stays_stopped_until_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    spec = otree.task("a", worker, log, "a", restart="on_demand", idle_timeout=10)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        events = sup.events()
        await sup.terminate_child("a")
        assert (await sup.wake("a")).state == "stopped"  # an application's wake does not undo it
        refused = await next_of(events, "child.wake_refused")
        assert (refused.path, refused.reason) == ("root/a", "held")
        await trio.sleep(1000)
        assert child(sup, "a").state == "stopped"
        assert log.of("start") == ["a"]
        assert (await sup.restart_child("a")).state == "running"  # starting it does
        await sup.terminate_child("a")
        await sup.wake("a")
        assert child(sup, "a").state == "stopped"


# --- otree start over a real control socket -------------------------------------------------------


async def test_otree_start_wakes_or_spawns_over_the_control_socket(tmp_path: Path) -> None:
    log = Log()
    spec = otree.task("a", worker, log, "a", restart="on_demand", autostart=False)
    async with serving(tmp_path, [spec]) as served:
        reply = await served.request("start", path="a")
        assert reply.ok, reply.error
        assert (reply.result["state"], reply.result["started"]) == ("running", True)
        reply = await served.request("start", path="root/a")  # running: nothing to do, no error
        assert reply.ok and (reply.result["state"], reply.result["started"]) == ("running", False)
        assert log.of("start") == ["a"]
        await served.sup.terminate_child("a")
        reply = await served.request("start", path="a")  # an operator's start undoes a stop by hand
        assert reply.ok and (reply.result["state"], reply.result["started"]) == ("running", True)
        reply = await served.request("start", path="nobody")
        assert (reply.ok, reply.code, reply.error) == (
            False,
            4,
            "no child at root/nobody (children of root: a)",
        )


# --- status ---------------------------------------------------------------------------------------


def test_status_says_not_started_and_parked() -> None:
    def node(child_id: str, started_at: float | None, exit_info: otree.ExitInfo | None) -> StatusNode:
        info = ChildInfo(
            child_id, f"root/{child_id}", "task", "stopped", None, 0, started_at, exit_info, None
        )
        return StatusNode(info)

    root = ChildInfo("root", "root", "supervisor", "running", 1, 0, 0.0, None, None)
    status = Status(
        10.0,
        StatusNode(
            root,
            children=[
                node("later", None, None),
                node("peer", 1.0, otree.ExitInfo("shutdown", "idle")),
                node("done", 1.0, otree.ExitInfo("normal")),
            ],
        ),
    )
    lines = [" ".join(line.split()) for line in render_status(status).splitlines()]
    assert lines[1:] == [
        "later task stopped not started",
        "peer task stopped parked last exit: shutdown (idle)",
        "done task stopped last exit: normal",
    ]


# --- idle_timeout: real process children ------------------------------------------------------------


def _process(child_id: str, code: str, marker: str, **kw: Any) -> otree.ProcessSpec:
    return otree.process(child_id, [sys.executable, "-c", code], env={"OTREE_TEST_MARKER": marker}, **kw)


async def test_an_idle_process_is_parked_and_its_next_run_knows(marker: str, tmp_path: Path) -> None:
    code = (
        "import os, time\n"
        "print(os.environ.get('OTREE_PREVIOUS_EXIT', 'first run'), flush=True)\n"
        "time.sleep(1000)\n"
    )
    state = tmp_path / "state"
    spec = _process("p", code, marker, idle_timeout=0.5, shutdown=2.0)
    async with otree.open_supervisor(otree.supervisor("t", children=[spec]), state_dir=state) as sup:
        events = sup.events()
        stopped = await next_of(events, "child.stopped", within=30)
        assert (stopped.reason, stopped.details["detail"], stopped.details["signal"]) == (
            "shutdown",
            "idle",
            15,
        )
        await next_of(events, "child.parked", within=30)
        assert marked_pids(marker) == []  # the group got its SIGTERM
        await sup.wake("p")
        await next_of(events, "child.parked", within=30)
    log = (child_log_dir(state, "t/p") / "stdout.log").read_text().splitlines()
    assert log == ["first run", "shutdown:idle:SIGTERM"]


@pytest.mark.parametrize(
    ("sign", "stdout"),
    [
        ("print('working', flush=True)", "log"),  # output on a captured stream
        ("notify(b'WATCHDOG=1')", "null"),  # WATCHDOG=1 over the notify socket
    ],
    ids=["output", "watchdog"],
)
async def test_signs_of_life_keep_a_process_from_being_parked(
    sign: str, stdout: str, marker: str, tmp_path: Path
) -> None:
    code = (
        "import os, socket, time\n"
        "def notify(message):\n"
        "    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:\n"
        "        sock.sendto(message, os.environ['NOTIFY_SOCKET'])\n"
        "end = time.monotonic() + 1.5\n"
        "while time.monotonic() < end:\n"
        f"    {sign}\n"
        "    time.sleep(0.1)\n"
        "time.sleep(1000)\n"
    )
    spec = _process("p", code, marker, idle_timeout=0.6, shutdown=2.0, stdout=stdout)
    async with otree.open_supervisor(otree.supervisor("t", children=[spec]), state_dir=tmp_path) as sup:
        began = time.monotonic()
        await next_of(sup.events(), "child.parked", within=30)
        assert time.monotonic() - began >= 1.5 + 0.6 - 0.2  # busy 1.5 s, then idle 0.6 s
        assert marked_pids(marker) == []


async def test_the_event_log_says_why_a_child_was_parked_and_woken(tmp_path: Path) -> None:
    spec = otree.task("a", worker, Log(), "a", idle_timeout=0.2, restart="on_demand")
    state = tmp_path / "state"
    async with otree.open_supervisor(otree.supervisor("root", children=[spec]), state_dir=state) as sup:
        await next_of(sup.events(), "child.parked", within=30)
        await sup.wake("a")
    lines = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    kinds = [(line["kind"], line["reason"]) for line in lines if line["path"] == "root/a"]
    assert ("child.parked", "idle") in kinds and ("child.woken", "parked") in kinds
