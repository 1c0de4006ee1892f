"""The supervisor runtime: every rule of DESIGN §4, on MockClock(autojump_threshold=0)."""

from __future__ import annotations

import functools
import itertools

import pytest
import trio
import trio.testing

import otree
from otree._status import status_of
from tests.helpers import (
    Log,
    Switch,
    crash_after,
    exits_with,
    fails_to_start,
    states,
    worker,
)


def three(log: Log, strategy: str = "one_for_one", **kw: object) -> otree.SupervisorSpec:
    return otree.supervisor(
        "root",
        strategy=strategy,  # type: ignore[arg-type]
        children=[otree.task(n, worker, log, n) for n in ("a", "b", "c")],
        **kw,  # type: ignore[arg-type]
    )


# --- start -------------------------------------------------------------------


async def test_start_children_in_list_order_each_ready_before_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    order: list[str] = []

    async def slow_ready(name: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        order.append(f"begin {name}")
        await trio.sleep(1)
        order.append(f"ready {name}")
        task_status.started()
        await trio.sleep_forever()

    tree = otree.supervisor("root", children=[otree.task(n, slow_ready, n) for n in ("a", "b")])
    async with otree.open_supervisor(tree) as sup:
        assert order == ["begin a", "ready a", "begin b", "ready b"]
        assert set(states(sup).values()) == {"running"}


async def test_start_failure_stops_started_children_in_reverse_and_raises_start_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        children=[
            otree.task("a", worker, log, "a"),
            otree.task("b", worker, log, "b"),
            otree.task("bad", fails_to_start, Switch(failing=True)),
            otree.task("never", worker, log, "never"),
        ],
    )
    with pytest.raises(otree.StartError) as info:
        async with otree.open_supervisor(tree):
            pytest.fail("the block must not run")
    assert str(info.value) == "root/bad: failed to start: ConnectionError: cannot connect"
    assert isinstance(info.value.__cause__, ConnectionError)
    assert log.of("start") == ["a", "b"]
    assert log.of("stop") == ["b", "a"]


async def test_task_without_task_status_is_ready_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async def plain() -> None:
        await trio.sleep_forever()

    async with otree.open_supervisor(otree.supervisor("root", children=[otree.task("p", plain)])) as sup:
        assert states(sup) == {"p": "running"}


# --- stop ----------------------------------------------------------------------


async def test_stop_children_in_reverse_start_order_when_the_block_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)):
        pass
    assert log.of("stop") == ["c", "b", "a"]


async def test_stop_waits_for_each_child_before_stopping_the_previous(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trace: list[str] = []

    async def slow_stopper(name: str) -> None:
        me = otree.current_child()
        await me.stopping.wait()
        trace.append(f"stopping {name}")
        await trio.sleep(1)
        trace.append(f"stopped {name}")

    tree = otree.supervisor("root", children=[otree.task(n, slow_stopper, n) for n in ("a", "b")])
    async with otree.open_supervisor(tree):
        pass
    assert trace == ["stopping b", "stopped b", "stopping a", "stopped a"]


async def test_trapping_child_that_returns_in_grace_exits_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def polite() -> None:
        await otree.current_child().stopping.wait()

    tree = otree.supervisor("root", children=[otree.task("p", polite, shutdown=10)])
    async with otree.open_supervisor(tree) as sup:
        await sup.terminate_child("p")
        (info,) = sup.which_children()
        assert info.exit == otree.ExitInfo("shutdown")


async def test_trapping_child_is_cancelled_after_its_shutdown_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stubborn() -> None:
        otree.current_child().stopping  # noqa: B018 - looking at it makes the child trapping
        await trio.sleep_forever()

    tree = otree.supervisor("root", children=[otree.task("s", stubborn, shutdown=7)])
    async with otree.open_supervisor(tree) as sup:
        stream = sup.events()
        before = trio.current_time()
        await sup.terminate_child("s")
        assert trio.current_time() - before == pytest.approx(7)
        (info,) = sup.which_children()
        assert info.exit == otree.ExitInfo("shutdown", "killed")
        kinds = [e.kind async for e in _until(stream, "child.shutdown_error")]
        assert kinds == ["child.stopped", "child.shutdown_error"]


async def _until(stream: otree.EventStream, kind: str):  # type: ignore[no-untyped-def]
    async for event in stream:
        yield event
        if event.kind == kind:
            return


async def test_non_trapping_child_is_cancelled_at_once(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        before = trio.current_time()
        await sup.terminate_child("b")
        assert trio.current_time() == before
        assert states(sup) == {"c": "running", "b": "stopped", "a": "running"}


async def test_brutal_kill_cancels_a_trapping_child_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async def stubborn() -> None:
        otree.current_child().stopping  # noqa: B018
        await trio.sleep_forever()

    tree = otree.supervisor("root", children=[otree.task("s", stubborn, shutdown="brutal_kill")])
    async with otree.open_supervisor(tree) as sup:
        before = trio.current_time()
        await sup.terminate_child("s")
        assert trio.current_time() == before
        assert sup.which_children()[0].exit == otree.ExitInfo("shutdown", "killed")


async def test_infinity_shutdown_waits_for_the_child(autojump_clock: trio.testing.MockClock) -> None:
    async def slow() -> None:
        await otree.current_child().stopping.wait()
        await trio.sleep(1000)

    tree = otree.supervisor("root", children=[otree.task("s", slow, shutdown="infinity")])
    async with otree.open_supervisor(tree) as sup:
        before = trio.current_time()
        await sup.terminate_child("s")
        assert trio.current_time() - before == pytest.approx(1000)
        assert sup.which_children()[0].exit == otree.ExitInfo("shutdown")


# --- exit reasons and restart types ---------------------------------------------

RESTART_TABLE = [
    ("permanent", "return", True),
    ("permanent", "shutdown", True),
    ("permanent", "error", True),
    ("transient", "return", False),
    ("transient", "shutdown", False),
    ("transient", "error", True),
    ("temporary", "return", False),
    ("temporary", "shutdown", False),
    ("temporary", "error", False),
]
REASONS = {"return": "normal", "shutdown": "shutdown", "error": "error"}


@pytest.mark.parametrize(("restart", "exit_kind", "restarted"), RESTART_TABLE)
async def test_restart_type_by_exit_kind(
    autojump_clock: trio.testing.MockClock, restart: str, exit_kind: str, restarted: bool
) -> None:
    tree = otree.supervisor(
        "root",
        max_restarts=100,
        children=[otree.task("c", exits_with, exit_kind, restart=restart)],  # type: ignore[arg-type]
    )
    async with otree.open_supervisor(tree) as sup:
        stream = sup.events()
        exited = await _first(stream, "child.exited")
        assert exited.reason == REASONS[exit_kind]
        await trio.testing.wait_all_tasks_blocked()
        children = sup.which_children()
        if restarted:
            assert [(c.state, c.restarts) for c in children] == [("running", 1)]
        elif restart == "temporary":
            assert children == []  # a temporary child's spec is removed when it exits
        else:
            assert [(c.state, c.exit.reason if c.exit else None) for c in children] == [
                ("stopped", REASONS[exit_kind])
            ]


async def _first(stream: otree.EventStream, kind: str) -> otree.Event:
    async for event in stream:
        if event.kind == kind:
            return event
    raise AssertionError(f"no {kind} event")


async def test_exit_info_records_the_exception(autojump_clock: trio.testing.MockClock) -> None:
    tree = otree.supervisor(
        "root", max_restarts=0, children=[otree.task("c", exits_with, "error", restart="temporary")]
    )
    async with otree.open_supervisor(tree) as sup:
        event = await _first(sup.events(), "child.exited")
        assert (event.reason, event.details["detail"], event.details["exception"]) == (
            "error",
            "ValueError: boom",
            "ValueError",
        )


# --- strategies -------------------------------------------------------------------


def crashable(log: Log, names: tuple[str, ...], strategy: str, **kw: object):  # type: ignore[no-untyped-def]
    """A tree whose children crash when their trio.Event in ``triggers`` is set."""
    triggers = {n: trio.Event() for n in names}

    async def child(name: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.add("start", name)
        try:
            task_status.started()
            await triggers[name].wait()
            triggers[name] = trio.Event()  # the next run waits for a fresh trigger
            log.add("crash", name)
            raise RuntimeError(f"{name} crashed")
        finally:
            log.add("stop", name)

    specs = [
        otree.task(n, child, n, restart="temporary" if n.startswith("tmp") else "permanent") for n in names
    ]
    tree = otree.supervisor("root", strategy=strategy, children=specs, **kw)  # type: ignore[arg-type]
    return tree, triggers


async def test_one_for_one_restarts_only_the_failed_child(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    tree, triggers = crashable(log, ("a", "b", "c"), "one_for_one")
    async with otree.open_supervisor(tree) as sup:
        log.clear()
        triggers["b"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert log.entries == [("crash", "b"), ("stop", "b"), ("start", "b")]
        assert [c.restarts for c in sup.which_children()] == [0, 1, 0]


async def test_one_for_all_stops_others_in_reverse_then_restarts_all_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree, triggers = crashable(log, ("a", "b", "c"), "one_for_all")
    async with otree.open_supervisor(tree):
        log.clear()
        triggers["b"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert log.entries == [
            ("crash", "b"),
            ("stop", "b"),
            ("stop", "c"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
        ]


async def test_rest_for_one_restarts_the_failed_child_and_those_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree, triggers = crashable(log, ("a", "b", "c", "d"), "rest_for_one")
    async with otree.open_supervisor(tree):
        log.clear()
        triggers["b"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert log.entries == [
            ("crash", "b"),
            ("stop", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]


async def test_temporary_bystander_is_stopped_and_removed_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree, triggers = crashable(log, ("a", "tmp", "c"), "one_for_all")
    async with otree.open_supervisor(tree) as sup:
        log.clear()
        triggers["a"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert "tmp" in log.of("stop")
        assert "tmp" not in log.of("start")
        assert [c.id for c in sup.which_children()] == ["c", "a"]


async def test_one_for_all_restarts_a_child_stopped_by_hand(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    tree, triggers = crashable(log, ("a", "b", "c"), "one_for_all")
    async with otree.open_supervisor(tree) as sup:
        await sup.terminate_child("c")
        log.clear()
        triggers["a"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert log.of("start") == ["a", "b", "c"]
        assert set(states(sup).values()) == {"running"}


async def test_group_restart_counts_one_restart_per_triggering_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree, triggers = crashable(log, ("a", "b", "c"), "one_for_all", max_restarts=1, max_seconds=5)
    async with otree.open_supervisor(tree) as sup:
        triggers["a"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert set(states(sup).values()) == {"running"}  # 3 children restarted, 1 restart counted
    with pytest.raises(otree.RestartIntensityExceeded):
        async with otree.open_supervisor(tree) as sup:
            triggers["a"].set()
            await trio.testing.wait_all_tasks_blocked()
            triggers["b"].set()
            await trio.sleep_forever()


# --- restart intensity ---------------------------------------------------------------


async def test_intensity_gives_up_after_max_restarts_within_max_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root", max_restarts=3, max_seconds=5, children=[otree.task("c", crash_after, log, "c", 1.0)]
    )
    with pytest.raises(otree.RestartIntensityExceeded) as info:
        await otree.run(tree)
    assert log.of("crash") == ["c"] * 4
    assert str(info.value) == (
        "root: reached max restart intensity (3 restarts in 5s); last failing child: root/c"
    )
    assert (info.value.max_restarts, info.value.max_seconds, info.value.child) == (3, 5, "root/c")
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_intensity_zero_gives_up_at_the_first_restart_and_stops_siblings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        max_restarts=0,
        children=[otree.task("a", worker, log, "a"), otree.task("c", crash_after, log, "c", 1.0)],
    )
    with pytest.raises(otree.RestartIntensityExceeded):
        await otree.run(tree)
    assert log.of("start") == ["a", "c"]
    assert log.of("stop") == ["a"]


async def test_crashes_spread_beyond_the_window_never_give_up(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    tree = otree.supervisor(
        "root", max_restarts=1, max_seconds=5, children=[otree.task("c", crash_after, log, "c", 5.01)]
    )
    with trio.move_on_after(100):
        await otree.run(tree)
    assert len(log.of("crash")) == 19


async def test_failed_restart_is_retried_and_every_retry_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = Switch()
    tree = otree.supervisor("root", max_restarts=3, children=[otree.task("c", fails_to_start, switch, 1.0)])
    seen: list[str] = []
    with pytest.raises(otree.RestartIntensityExceeded) as info:
        async with otree.open_supervisor(tree) as sup:
            async for event in sup.events():
                seen.append(event.kind)
    assert switch.attempts == 1 + 3  # the first start, then 3 counted failed restarts
    assert seen.count("child.start_failed") == 3
    assert isinstance(info.value.__cause__, ConnectionError)


async def test_manual_operations_never_count_toward_intensity(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with otree.open_supervisor(three(log, max_restarts=0)) as sup:
        for _ in range(10):
            await sup.terminate_child("b")
            await sup.restart_child("b")
        assert set(states(sup).values()) == {"running"}
        assert [c.restarts for c in sup.which_children()] == [0, 0, 0]


# --- escalation -----------------------------------------------------------------------


def nested(log: Log, inner_restart: str, outer_max: int = 3) -> otree.SupervisorSpec:
    inner = otree.supervisor(
        "inner",
        restart=inner_restart,  # type: ignore[arg-type]
        max_restarts=0,
        children=[otree.task("c", crash_after, log, "c", 1.0)],
    )
    return otree.supervisor(
        "root", max_restarts=outer_max, max_seconds=60, children=[otree.task("a", worker, log, "a"), inner]
    )


async def test_permanent_parent_restarts_a_supervisor_that_gave_up_and_counts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    with pytest.raises(otree.RestartIntensityExceeded) as info:
        await otree.run(nested(log, "permanent", outer_max=2))
    assert len(log.of("crash")) == 3  # the inner gave up 3 times; the root's 3rd restart was refused
    assert info.value.child == "root/inner"
    assert isinstance(info.value.__cause__, otree.RestartIntensityExceeded)
    assert info.value.__cause__.path == "root/inner"


async def test_transient_supervisor_that_gave_up_is_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(nested(log, "transient")) as sup:
        event = await _first(sup.events(), "child.exited")
        while event.path != "root/inner":
            event = await _first(sup.events(), "child.exited")
        assert (event.reason, event.details["detail"]) == ("shutdown", "reached max restart intensity")
        await trio.testing.wait_all_tasks_blocked()
        assert states(sup) == {"inner": "stopped", "a": "running"}


# --- restarting state and the operation queue ---------------------------------------------


async def test_restarting_child_answers_the_api_as_otp(autojump_clock: trio.testing.MockClock) -> None:
    switch = Switch()

    backoff = otree.Backoff(initial=10, maximum=10, jitter=0)
    tree = otree.supervisor(
        "root",
        max_restarts=100,
        backoff=backoff,
        children=[otree.task("c", fails_to_start, switch, 1.0)],
    )
    async with otree.open_supervisor(tree) as sup:
        await _first(sup.events(), "child.restarting")
        assert states(sup) == {"c": "restarting"}
        assert sup.count_children() == otree.Counts(specs=1, active=0, supervisors=0, workers=1)
        with pytest.raises(otree.Restarting):
            await sup.restart_child("c")
        with pytest.raises(otree.Restarting):
            await sup.delete_child("c")
        with pytest.raises(otree.AlreadyPresent) as present:
            await sup.start_child(otree.task("c", fails_to_start, switch, 1.0))
        assert present.value.running is False
        attempts = switch.attempts
        await sup.terminate_child("c")
        assert states(sup) == {"c": "stopped"}
        await trio.sleep(100)
        assert switch.attempts == attempts  # terminate_child ended the retries


async def test_a_child_is_restarting_while_a_retry_start_is_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 (5): ``restarting`` from the restart decision until the child runs again, through
    slow start attempts that fail and the one that succeeds (it used to show ``starting``)."""
    outcomes = iter(["crash", "slow failure", "slow success"])

    async def flaky(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        outcome = next(outcomes)
        if outcome == "crash":
            task_status.started()
            await trio.sleep(1)
            raise RuntimeError("crash")
        await trio.sleep(10)  # a slow start
        if outcome == "slow failure":
            raise ConnectionError("cannot connect")
        task_status.started()
        await trio.sleep_forever()

    log = Log()
    tree = otree.supervisor(
        "root", max_restarts=10, children=[otree.task("a", worker, log, "a"), otree.task("c", flaky)]
    )
    async with otree.open_supervisor(tree) as sup, trio.open_nursery() as nursery:
        seen: list[tuple[float, str]] = []

        async def watch() -> None:
            while True:
                seen.append((trio.current_time(), states(sup)["c"]))
                await trio.sleep(0.5)

        nursery.start_soon(watch)
        await trio.sleep(6)  # the crash at 1 s, the first attempt runs from 1 s to 11 s
        assert states(sup) == {"c": "restarting", "a": "running"}
        assert status_of(sup, sup._tree.root_info()).root.children[1].info.state == "restarting"
        assert sup.count_children().active == 1  # as OTP: no live child yet
        with pytest.raises(otree.Restarting):  # answered once the attempt in flight has failed
            await sup.restart_child("c")
        assert trio.current_time() == pytest.approx(11)
        await trio.sleep(5)  # the second attempt, from 11 s to 21 s
        with pytest.raises(otree.Running):  # answered once it succeeded
            await sup.delete_child("c")
        assert trio.current_time() == pytest.approx(21)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert {state for at, state in seen if 1 < at < 21} == {"restarting"}
    assert {state for at, state in seen if at > 21} == {"running"}


async def test_api_calls_queue_behind_a_start_in_progress(autojump_clock: trio.testing.MockClock) -> None:
    order: list[str] = []

    async def slow(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(5)
        order.append("slow ready")
        task_status.started()
        await trio.sleep_forever()

    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.start_child, otree.task("slow", slow))
            await trio.testing.wait_all_tasks_blocked()

            async def terminate() -> None:
                await sup.terminate_child("a")
                order.append("a terminated")

            nursery.start_soon(terminate)
        assert order == ["slow ready", "a terminated"]


# --- backoff ------------------------------------------------------------------------------


async def test_backoff_delays_each_consecutive_restart_without_blocking_the_api(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    starts: list[float] = []

    async def crash(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        starts.append(trio.current_time())
        task_status.started()
        raise RuntimeError("x")

    backoff = otree.Backoff(initial=1, maximum=4, factor=2, jitter=0)
    tree = otree.supervisor(
        "root",
        max_restarts=100,
        max_seconds=1,
        backoff=backoff,
        children=[otree.task("a", worker, log, "a"), otree.task("c", crash)],
    )
    async with otree.open_supervisor(tree) as sup:
        await trio.sleep(0.5)
        assert states(sup) == {"c": "restarting", "a": "running"}
        await sup.terminate_child("a")  # served during the wait
        await sup.restart_child("a")
        await trio.sleep(20)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps[:5] == [1, 2, 4, 4, 4]


async def test_backoff_count_resets_after_the_child_ran_reset_after_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []
    lifetimes = iter([0, 0, 50, 0, 0])

    async def crash(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        starts.append(trio.current_time())
        task_status.started()
        await trio.sleep(next(lifetimes, 1000))
        raise RuntimeError("x")

    backoff = otree.Backoff(initial=1, maximum=100, factor=10, jitter=0, reset_after=30)
    tree = otree.supervisor("root", max_restarts=100, backoff=backoff, children=[otree.task("c", crash)])
    async with otree.open_supervisor(tree):
        await trio.sleep(200)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps == [1, 10, 51, 10, 100]


# --- auto_shutdown --------------------------------------------------------------------------


async def test_auto_shutdown_any_significant_stops_the_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        auto_shutdown="any_significant",
        children=[
            otree.task("a", worker, log, "a"),
            otree.task("sig", exits_with, "return", restart="transient", significant=True),
        ],
    )
    async with otree.open_supervisor(tree):
        await trio.sleep_forever()  # cancelled when the tree shuts itself down
    assert log.of("stop") == ["a"]


async def test_auto_shutdown_all_significant_waits_for_the_last_significant_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def ends_after(delay: float) -> None:
        await trio.sleep(delay)

    tree = otree.supervisor(
        "root",
        auto_shutdown="all_significant",
        children=[
            otree.task("s1", ends_after, 1, restart="temporary", significant=True),
            otree.task("s2", ends_after, 5, restart="transient", significant=True),
        ],
    )
    before = trio.current_time()
    await otree.run(tree)
    assert trio.current_time() - before == pytest.approx(5)


async def test_auto_shutdown_never_for_terminate_child(autojump_clock: trio.testing.MockClock) -> None:
    async def idle() -> None:
        await trio.sleep_forever()

    tree = otree.supervisor(
        "root",
        auto_shutdown="any_significant",
        children=[otree.task("sig", idle, restart="transient", significant=True)],
    )
    async with otree.open_supervisor(tree) as sup:
        await sup.terminate_child("sig")
        await trio.sleep(10)
        assert states(sup) == {"sig": "stopped"}


async def test_auto_shutdown_never_for_a_bystander_or_a_restarted_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    triggers = {"a": trio.Event()}

    async def crasher(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await triggers["a"].wait()
        triggers["a"] = trio.Event()
        raise RuntimeError("a")

    async def idle() -> None:
        await trio.sleep_forever()

    tree = otree.supervisor(
        "root",
        strategy="one_for_all",
        auto_shutdown="any_significant",
        children=[
            otree.task("a", crasher),
            otree.task("sig", idle, restart="transient", significant=True),
            otree.task("w", worker, log, "w"),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        triggers["a"].set()  # sig is stopped as a bystander and restarted
        await trio.testing.wait_all_tasks_blocked()
        assert set(states(sup).values()) == {"running"}


async def test_significant_transient_error_is_restarted_not_shut_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tree = otree.supervisor(
        "root",
        auto_shutdown="any_significant",
        max_restarts=100,
        children=[otree.task("sig", exits_with, "error", restart="transient", significant=True)],
    )
    async with otree.open_supervisor(tree) as sup:
        await trio.sleep(3.5)
        assert sup.which_children()[0].restarts == 3


# --- the handle ------------------------------------------------------------------------------


async def test_which_children_lists_newest_first(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        await sup.start_child(otree.task("d", worker, log, "d"))
        assert [c.id for c in sup.which_children()] == ["d", "c", "b", "a"]
        info = sup.which_children()[0]
        assert (info.path, info.kind, info.state, info.pid, info.restarts, info.exit) == (
            "root/d",
            "task",
            "running",
            None,
            0,
            None,
        )
        assert info.started_at is not None


async def test_count_children_counts_specs_active_supervisors_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        children=[
            otree.task("a", worker, log, "a"),
            otree.supervisor("s"),
            otree.task("b", worker, log, "b"),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        await sup.terminate_child("b")
        assert sup.count_children() == otree.Counts(specs=3, active=2, supervisors=1, workers=2)


async def test_start_child_with_a_running_id_is_already_present_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        with pytest.raises(otree.AlreadyPresent) as info:
            await sup.start_child(otree.task("a", worker, log, "a"))
        assert info.value.running is True
        assert str(info.value) == "root/a: already running"
        await sup.terminate_child("a")
        with pytest.raises(otree.AlreadyPresent) as info:
            await sup.start_child(otree.task("a", worker, log, "a"))
        assert info.value.running is False


async def test_unknown_id_is_not_found_naming_supervisor_and_listing_ids(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        for call in (sup.terminate_child, sup.restart_child, sup.delete_child):
            with pytest.raises(otree.NotFound) as info:
                await call("zed")
            assert str(info.value) == "no child at root/zed (children of root: a, b, c)"
        with pytest.raises(otree.NotFound):
            sup.get_childspec("zed")
        with pytest.raises(otree.NotFound):
            sup.child("zed")


async def test_restart_and_delete_of_a_running_child_raise_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        with pytest.raises(otree.Running, match="root/a: cannot restart a running child"):
            await sup.restart_child("a")
        with pytest.raises(otree.Running, match="root/a: cannot delete a running child"):
            await sup.delete_child("a")


async def test_terminate_restart_delete_a_child(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        await sup.terminate_child("b")
        await sup.terminate_child("b")  # a stopped child: a no-op
        assert states(sup)["b"] == "stopped"
        info = await sup.restart_child("b")
        assert (info.state, info.restarts) == ("running", 0)
        await sup.terminate_child("b")
        await sup.delete_child("b")
        assert [c.id for c in sup.which_children()] == ["c", "a"]
        assert sup.get_childspec("a").id == "a"


async def test_terminate_child_of_a_temporary_child_removes_its_spec(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        await sup.start_child(otree.task("t", worker, log, "t", restart="temporary"))
        await sup.terminate_child("t")
        assert "t" not in states(sup)


async def test_failed_start_child_raises_start_error_and_stores_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        with pytest.raises(otree.StartError) as info:
            await sup.start_child(otree.task("bad", fails_to_start, Switch(failing=True)))
        assert isinstance(info.value.__cause__, ConnectionError)
        assert "bad" not in states(sup)


async def test_failed_restart_child_raises_start_error_and_keeps_the_spec(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    switch = Switch()
    tree = otree.supervisor("root", children=[otree.task("f", fails_to_start, switch)])
    async with otree.open_supervisor(tree) as sup:
        await sup.terminate_child("f")
        switch.failing = True
        with pytest.raises(otree.StartError):
            await sup.restart_child("f")
        assert states(sup) == {"f": "stopped"}
    del log


async def test_max_children_refuses_start_child(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with otree.open_supervisor(three(log, max_children=3)) as sup:
        await sup.terminate_child("c")  # stopped specs still count
        with pytest.raises(otree.MaxChildren, match="root: holds max_children=3 specs already"):
            await sup.start_child(otree.task("d", worker, log, "d"))


async def test_start_child_checks_significance_against_this_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        with pytest.raises(otree.SpecError, match="root/s: significant=True requires"):
            await sup.start_child(otree.task("s", worker, log, "s", restart="transient", significant=True))
        with pytest.raises(otree.SpecError, match="must hold child specs"):
            await sup.start_child("not a spec")  # type: ignore[arg-type]


async def test_child_and_find_return_nested_handles_and_refuse_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        children=[
            otree.task("w", worker, log, "w"),
            otree.supervisor(
                "db", children=[otree.supervisor("cache", children=[otree.task("x", worker, log, "x")])]
            ),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        cache = sup.find("db/cache")
        assert cache.path == "root/db/cache"
        assert sup.child("db").find("cache").path == "root/db/cache"
        assert [c.path for c in cache.which_children()] == ["root/db/cache/x"]
        await cache.terminate_child("x")
        with pytest.raises(TypeError, match="root/w is a task, not a supervisor"):
            sup.child("w")
        await sup.terminate_child("db")
        with pytest.raises(otree.NotRunning):
            cache.which_children()


async def test_nested_handle_stays_valid_across_the_supervisor_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    inner = otree.supervisor("inner", children=[otree.task("x", worker, log, "x")])
    tree = otree.supervisor("root", children=[inner])
    async with otree.open_supervisor(tree) as sup:
        handle = sup.child("inner")
        await sup.terminate_child("inner")
        await sup.restart_child("inner")
        assert [c.id for c in handle.which_children()] == ["x"]


async def test_handle_calls_after_the_tree_stopped_raise_not_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        pass
    with pytest.raises(otree.NotRunning):
        await sup.terminate_child("a")


# --- current_child ---------------------------------------------------------------------------------


async def test_current_child_gives_path_and_records_cost(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[str] = []

    async def spender() -> None:
        me = otree.current_child()
        seen.append(me.path)
        me.report_cost(0.25)
        me.report_cost(0.5)
        with pytest.raises(ValueError, match="finite number"):
            me.report_cost(-1)
        raise otree.Shutdown("finished")

    tree = otree.supervisor("root", children=[otree.task("s", spender, restart="transient")])
    async with otree.open_supervisor(tree) as sup:
        event = await _first(sup.events(), "child.exited")
        assert (event.reason, event.details["detail"], event.details["cost"]) == (
            "shutdown",
            "finished",
            0.75,
        )
    assert seen == ["root/s"]


def test_current_child_outside_a_child_raises() -> None:
    with pytest.raises(RuntimeError, match="outside an otree task child"):
        otree.current_child()


async def test_started_twice_raises(autojump_clock: trio.testing.MockClock) -> None:
    errors: list[str] = []

    async def twice(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            task_status.started()
        except RuntimeError as exc:
            errors.append(str(exc))
        await trio.sleep_forever()

    async with otree.open_supervisor(otree.supervisor("root", children=[otree.task("t", twice)])):
        pass
    assert errors == ["called 'started' twice on the same task status"]


# --- events -------------------------------------------------------------------------------------------


async def test_events_report_every_decision_in_order(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    tree = otree.supervisor("root", max_restarts=1, children=[otree.task("c", crash_after, log, "c", 1.0)])
    seen: list[tuple[str, str, str]] = []
    with pytest.raises(otree.RestartIntensityExceeded):
        async with otree.open_supervisor(tree) as sup:
            async for event in sup.events():
                seen.append((event.path, event.kind, event.reason))
    assert seen == [
        ("root/c", "child.exited", "error"),
        ("root/c", "child.restarting", "restart"),
        ("root/c", "child.started", ""),
        ("root/c", "child.ready", ""),
        ("root/c", "child.exited", "error"),
        ("root", "supervisor.intensity_exceeded", "shutdown"),
        ("root", "supervisor.stopped", "shutdown"),
    ]


async def test_events_of_a_nested_handle_are_only_its_subtree(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        children=[
            otree.task("a", worker, log, "a"),
            otree.supervisor("s", children=[otree.task("x", worker, log, "x")]),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        stream = sup.child("s").events()
        await sup.terminate_child("a")
        await sup.child("s").terminate_child("x")
        event = await stream.__anext__()
        assert (event.path, event.kind) == ("root/s/x", "child.stopped")


async def test_slow_subscriber_loses_the_oldest_events_and_is_told_how_many(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        stream = sup.events(buffer=2)
        for _ in range(3):
            await sup.terminate_child("a")
            await sup.restart_child("a")
        first = await stream.__anext__()
        assert first.details["dropped"] == 7  # 9 events (3 x stopped, started, ready), 2 kept
        second = await stream.__anext__()
        assert "dropped" not in second.details


async def test_event_stream_ends_when_the_tree_stops(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with otree.open_supervisor(three(log)) as sup:
        stream = sup.events()
    kinds = [event.kind async for event in stream]
    assert kinds == ["child.stopped"] * 3 + ["supervisor.stopped"]


# --- leaving the tree -------------------------------------------------------------------------------


async def test_body_exception_passes_through_bare_after_the_tree_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    with pytest.raises(KeyError):
        async with otree.open_supervisor(three(log)):
            raise KeyError("mine")
    assert log.of("stop") == ["c", "b", "a"]


async def test_cancelling_run_stops_the_tree_in_order_then_cancels(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    with trio.move_on_after(10) as scope:
        await otree.run(three(log))
    assert scope.cancelled_caught
    assert log.of("stop") == ["c", "b", "a"]


async def test_run_reports_the_handle_through_task_status(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(otree.run, three(log))
        assert [c.id for c in sup.which_children()] == ["c", "b", "a"]
        nursery.cancel_scope.cancel()
    assert log.of("stop") == ["c", "b", "a"]


async def test_root_giving_up_cancels_the_block_and_raises(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    tree = otree.supervisor("root", max_restarts=0, children=[otree.task("c", crash_after, log, "c", 1.0)])
    reached = False
    with pytest.raises(otree.RestartIntensityExceeded):
        async with otree.open_supervisor(tree):
            await trio.sleep(100)
            reached = True
    assert not reached


async def test_open_supervisor_refuses_a_worker_spec(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    with pytest.raises(otree.SpecError, match="must be a supervisor spec"):
        async with otree.open_supervisor(otree.task("a", worker, log, "a")):  # type: ignore[arg-type]
            pass


async def test_functools_partial_children_work(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    tree = otree.supervisor("root", children=[otree.task("p", functools.partial(worker, log, "p"))])
    async with otree.open_supervisor(tree):
        assert log.of("start") == ["p"]


async def test_cancelling_during_a_start_stops_the_starting_child_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()

    async def never_ready(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.sleep_forever()
        finally:
            log.add("stop", "hang")

    tree = otree.supervisor(
        "root", children=[otree.task("a", worker, log, "a"), otree.task("hang", never_ready)]
    )
    with trio.move_on_after(5) as scope:
        await otree.run(tree)
    assert scope.cancelled_caught
    assert log.of("stop") == ["hang", "a"]


async def test_supervisor_child_killed_after_its_grace_takes_its_subtree_down_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stubborn() -> None:
        otree.current_child().stopping  # noqa: B018 - trapping
        await trio.sleep_forever()

    inner = otree.supervisor("inner", shutdown=2, children=[otree.task("s", stubborn, shutdown=100)])
    async with otree.open_supervisor(otree.supervisor("root", children=[inner])) as sup:
        before = trio.current_time()
        await sup.terminate_child("inner")
        assert trio.current_time() - before == pytest.approx(2)
        assert sup.which_children()[0].exit == otree.ExitInfo("shutdown", "killed")


async def test_supervisor_child_with_infinity_waits_for_its_subtree_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(name: str, log: Log) -> None:
        await otree.current_child().stopping.wait()
        await trio.sleep(3)
        log.add("stop", name)

    log = Log()
    inner = otree.supervisor(
        "inner", children=[otree.task(n, slow, n, log, shutdown=100) for n in ("x", "y")]
    )
    async with otree.open_supervisor(otree.supervisor("root", children=[inner])) as sup:
        before = trio.current_time()
        await sup.terminate_child("inner")
        assert trio.current_time() - before == pytest.approx(6)
        assert log.of("stop") == ["y", "x"]
