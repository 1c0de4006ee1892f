"""A plain one_for_one restart, made in the child's own task (issue 12).

A task child that is ready at once, under a one_for_one supervisor without backoff, is
restarted in the task it ran in when its supervisor has nothing else to do. These tests
hold that path to the rules of a restart through the supervisor's queue: the same
events with the same details, the same states, the same intensity, the same stops, and
a scheduler round between runs. Each compares a plain child with one that reports
readiness (``task_status``), which is still restarted in a new task.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import otree
from otree._events import EventBus
from otree._supervisor import _Supervisor
from tests.test_process import first, marker, state, wait_until

__all__ = ["marker", "state"]  # fixtures, imported for pytest

Seen = list[tuple[trio.lowlevel.Task, otree.RunningChild, float]]


async def crasher(seen: Seen, crashes: int, gap: float) -> None:
    """Records its task, run and start time; crashes ``crashes`` times after ``gap`` seconds."""
    seen.append((trio.lowlevel.current_task(), otree.current_child(), trio.current_time()))
    if gap:
        await trio.sleep(gap)
    if len(seen) <= crashes:
        raise RuntimeError(f"crash {len(seen)}")
    await trio.sleep_forever()


async def crasher_reporting_ready(
    seen: Seen, crashes: int, gap: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """As ``crasher``, but reports readiness itself: restarted through the supervisor's queue."""
    task_status.started()
    await crasher(seen, crashes, gap)


BOTH = pytest.mark.parametrize("fn", [crasher, crasher_reporting_ready], ids=["plain", "task_status"])


def plain(fn: Callable[..., Any]) -> bool:
    return fn is crasher


def event_tuples(events: list[otree.Event]) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [(e.path, e.kind, e.reason, e.details) for e in events]


@BOTH
async def test_a_crash_loop_gives_the_same_events_states_and_runs(
    fn: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    seen: Seen = []
    tree = otree.supervisor("root", max_restarts=10, children=[otree.task("c", fn, seen, 3, 1.0)])
    events: list[otree.Event] = []
    async with otree.open_supervisor(tree) as sup:
        async with sup.events() as stream:
            async for event in stream:
                events.append(event)
                if len(events) == 12:
                    break
        [info] = sup.which_children()
        assert (info.state, info.restarts) == ("running", 3)
        assert info.exit == otree.ExitInfo("error", "RuntimeError: crash 3")
    expected: list[tuple[str, str, str, dict[str, Any]]] = []
    for n in (1, 2, 3):
        message = f"crash {n}"
        expected += [
            (
                "root/c",
                "child.exited",
                "error",
                {"detail": f"RuntimeError: {message}", "exception": "RuntimeError", "message": message},
            ),
            ("root/c", "child.restarting", "restart", {"delay": 0.0, "restarts_in_window": n}),
            ("root/c", "child.started", "", {}),
            ("root/c", "child.ready", "", {}),
        ]
    assert event_tuples(events) == expected
    tasks, runs, times = zip(*seen, strict=True)
    assert times == (0.0, 1.0, 2.0, 3.0)
    assert len(set(tasks)) == (1 if plain(fn) else 4)  # the plain child's runs share its task
    assert len({id(run) for run in runs}) == 4  # each run is its own (current_child, cost, stopping)
    assert [run.previous_exit for run in runs] == [None] + [
        otree.ExitInfo("error", f"RuntimeError: crash {n}") for n in (1, 2, 3)
    ]


@BOTH
@pytest.mark.parametrize(("gap", "runs", "gave_up_at"), [(1.5, 4, 6.0), (2.0, 21, None)])
async def test_restarts_in_the_task_count_for_intensity(
    fn: Callable[..., Any],
    gap: float,
    runs: int,
    gave_up_at: float | None,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_restarts=3 in 5 s: a crash every 1.5 s gives up at the 4th restart (t=6: 1.5, 3, 4.5
    and 6 are in the window); every 2 s never does (t-6 has left the window at t)."""
    seen: Seen = []
    tree = otree.supervisor(
        "root", max_restarts=3, max_seconds=5.0, children=[otree.task("c", fn, seen, 20, gap)]
    )
    ended_at = None
    with pytest.raises(otree.RestartIntensityExceeded) if gave_up_at else contextlib.nullcontext():
        async with otree.open_supervisor(tree):
            await trio.sleep(100)
    ended_at = trio.current_time()
    assert len(seen) == runs
    assert ended_at == (gave_up_at if gave_up_at else 100.0)


@BOTH
async def test_the_restart_waits_while_the_supervisor_serves_an_earlier_request(
    fn: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """A crash while the supervisor starts another child (t=0.5 to 1.5) is handled after it."""

    async def slow(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(1)
        task_status.started()
        await trio.sleep_forever()

    seen: Seen = []
    tree = otree.supervisor("root", children=[otree.task("c", fn, seen, 1, 1.0)])
    order: list[tuple[str, str]] = []
    async with otree.open_supervisor(tree) as sup, trio.open_nursery() as nursery:

        async def watch() -> None:
            async for event in sup.events():
                order.append((event.path, event.kind))

        nursery.start_soon(watch)
        await trio.sleep(0.5)
        await sup.start_child(otree.task("slow", slow))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert order == [  # an exit is reported when the supervisor handles it
        ("root/slow", "child.started"),
        ("root/slow", "child.ready"),
        ("root/c", "child.exited"),
        ("root/c", "child.restarting"),
        ("root/c", "child.started"),
        ("root/c", "child.ready"),
    ]
    assert [t for _, _, t in seen] == [0.0, 1.5]
    assert len({task for task, _, _ in seen}) == 2  # a queued exit restarts in a new task


_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("otree_test_var", default="unset")


@pytest.mark.parametrize("reports_ready", [False, True], ids=["plain", "task_status"])
async def test_each_run_starts_in_a_fresh_copy_of_the_supervisors_context(
    reports_ready: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """What a run sets in its context is gone at the next run, restarted in its task or not."""
    values: list[str] = []

    async def child(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        values.append(_VAR.get())
        _VAR.set(f"set by run {len(values)}")
        task_status.started()
        await trio.sleep(1)
        if len(values) <= 2:
            raise RuntimeError("crash")
        await trio.sleep_forever()

    async def plain_child() -> None:
        await child()

    token = _VAR.set("from the caller")
    try:
        tree = otree.supervisor("root", children=[otree.task("c", child if reports_ready else plain_child)])
        async with otree.open_supervisor(tree):
            await trio.sleep(5)
    finally:
        _VAR.reset(token)
    assert values == ["from the caller"] * 3


async def test_other_tasks_run_between_two_runs_in_the_same_task() -> None:
    """A child that crashes at once, in a loop, yields to the scheduler before each new run."""
    ticks = 0
    at_runs: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async def instant_crasher() -> None:
        at_runs.append(ticks)
        if len(at_runs) <= 50:
            raise RuntimeError("crash")
        await trio.sleep_forever()

    tree = otree.supervisor("root", max_restarts=100, children=[otree.task("c", instant_crasher)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        async with otree.open_supervisor(tree):
            while len(at_runs) <= 50:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    # one scheduler round per run at least: the ticker ran in the round between runs n and n+2
    assert all(at_runs[n + 2] > at_runs[n] for n in range(len(at_runs) - 2))


@BOTH
async def test_a_crash_looping_child_stops_cleanly(fn: Callable[..., Any]) -> None:
    """A child that crashes at once, restarted as fast as it goes, is stopped by terminate_child:
    the run it finds is stopped (a shutdown, the crash while stopping in its detail), or had
    already crashed (its own exit, now stale); either way it is not restarted."""
    seen: Seen = []
    tree = otree.supervisor("root", max_restarts=10**9, children=[otree.task("c", fn, seen, 10**9, 0.0)])
    async with otree.open_supervisor(tree) as sup:
        while len(seen) < 100:
            await trio.sleep(0)
        await sup.terminate_child("c")
        [info] = sup.which_children()
        assert info.state == "stopped"
        assert info.exit is not None
        stopped = {"shutdown": "error while stopping: RuntimeError: crash ", "error": "RuntimeError: crash "}
        assert info.exit.detail.startswith(stopped[info.exit.reason])
        runs = len(seen)
        for _ in range(10):
            await trio.sleep(0)
        assert len(seen) == runs
        await sup.restart_child("c")  # and it runs again, restarted as before
        while len(seen) < runs + 10:
            await trio.sleep(0)


async def test_exits_that_do_not_restart_are_handled_as_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """transient: an error restarts it in its task, a normal return does not; temporary: gone."""
    runs: list[trio.lowlevel.Task] = []

    async def once_error_then_return() -> None:
        runs.append(trio.lowlevel.current_task())
        await trio.sleep(1)
        if len(runs) == 1:
            raise ValueError("boom")

    async def temporary_crasher() -> None:
        await trio.sleep(2)  # not while t's exit is handled: that would queue it
        raise ValueError("boom")

    tree = otree.supervisor(
        "root",
        children=[
            otree.task("t", once_error_then_return, restart="transient"),
            otree.task("tmp", temporary_crasher, restart="temporary"),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        await trio.sleep(5)
        [info] = sup.which_children()
        assert (info.id, info.state, info.restarts, info.exit) == (
            "t",
            "stopped",
            1,
            otree.ExitInfo("normal"),
        )
    assert len(runs) == 2 and runs[0] is runs[1]


@pytest.mark.parametrize(
    "settings",
    [
        {"strategy": "one_for_all"},
        {"strategy": "rest_for_one"},
        {"backoff": otree.Backoff(initial=0.5, jitter=0.0)},
        {"persist_intensity": True},
    ],
    ids=["one_for_all", "rest_for_one", "backoff", "persist_intensity"],
)
async def test_other_restarts_go_through_the_queue_in_a_new_task(
    settings: dict[str, Any], autojump_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    seen: Seen = []
    tree = otree.supervisor("root", children=[otree.task("c", crasher, seen, 2, 1.0)], **settings)
    async with otree.open_supervisor(tree, state_dir=tmp_path):
        await trio.sleep(10)
    assert len(seen) == 3
    assert len({task for task, _, _ in seen}) == 3


# --- log records --------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def bare_logging() -> Iterator[list[logging.LogRecord]]:
    """Logging as Python starts it (no handler on the root logger, not even pytest's); yields
    every LogRecord built meanwhile."""
    built: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        built.append(record)
        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.getLogger(), "handlers", [])
        logging.setLogRecordFactory(counting)
        try:
            yield built
        finally:
            logging.setLogRecordFactory(factory)


async def test_no_log_record_is_built_when_logging_is_not_configured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: Seen = []
    tree = otree.supervisor("root", children=[otree.task("c", crasher, seen, 3, 1.0)])
    with bare_logging() as built:
        async with otree.open_supervisor(tree):
            await trio.sleep(10)
    assert len(seen) == 4
    assert built == []


async def test_a_crash_is_logged_with_its_exception_once_a_handler_is_there(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = _Records(logging.WARNING)
    seen: Seen = []
    tree = otree.supervisor("root", children=[otree.task("c", crasher, seen, 3, 1.0)])
    with bare_logging():
        logging.getLogger().addHandler(handler)
        async with otree.open_supervisor(tree):
            await trio.sleep(10)
    crashes = [r for r in handler.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(" ", 2)[:2] for r in crashes] == [["root/c", "child.exited"]] * 3
    assert all(r.exc_info is not None and isinstance(r.exc_info[1], RuntimeError) for r in crashes)


@pytest.mark.parametrize("setup", ["root handler", "otree handler", "otree filter", "no handler at all"])
def test_a_record_is_built_whenever_logging_would_see_it(setup: str, monkeypatch: pytest.MonkeyPatch) -> None:
    otree_log = logging.getLogger("otree")
    seen = _Records()
    bus = EventBus()
    with bare_logging() as built:
        if setup == "root handler":
            logging.getLogger().addHandler(seen)
        elif setup == "otree handler":
            monkeypatch.setattr(otree_log, "handlers", [*otree_log.handlers, seen])
        elif setup == "otree filter":
            monkeypatch.setattr(otree_log, "filters", [lambda record: seen.records.append(record) or True])
        else:  # without otree's NullHandler, logging's last resort prints it
            monkeypatch.setattr(otree_log, "handlers", [])
            monkeypatch.setattr(logging, "lastResort", seen)
        bus.publish(otree.Event(0.0, "root/c", "child.exited", "error"), logging.WARNING, ValueError("boom"))
        bus.publish(otree.Event(0.0, "root/c", "child.started"), logging.DEBUG)  # not enabled: not built
    assert [r.getMessage() for r in seen.records] == ["root/c child.exited error {}"]
    assert len(built) == 1


# --- the same history either way ----------------------------------------------------------------


async def _history(
    reports_ready: bool, crashes: dict[str, list[float]], ops: list[tuple[float, str, str]], intensity: int
) -> list[Any]:
    """Run three one_for_one children that crash at the given times while an operator stops and
    restarts them at others; everything the tree said and the end state, with ``reports_ready``
    children (restarted through the queue) or plain ones (restarted in their task when idle)."""

    async def child(name: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        later = [t for t in crashes[name] if t > trio.current_time()]
        if not later:
            await trio.sleep_forever()
        await trio.sleep_until(later[0])
        raise RuntimeError(f"{name} at {later[0]}")

    async def plain(name: str) -> None:
        await child(name)

    fn = child if reports_ready else plain
    tree = otree.supervisor(
        "root", max_restarts=intensity, max_seconds=4.0, children=[otree.task(n, fn, n) for n in "abc"]
    )
    said: list[Any] = []
    try:
        async with otree.open_supervisor(tree) as sup, trio.open_nursery() as nursery:

            async def listen() -> None:
                async for e in sup.events():
                    said.append((trio.current_time(), e.path, e.kind, e.reason, e.details))

            nursery.start_soon(listen)
            for at, op, name in ops:
                await trio.sleep_until(at)
                try:
                    await (sup.terminate_child(name) if op == "stop" else sup.restart_child(name))
                except otree.OtreeError as error:
                    said.append((at, op, name, type(error).__name__))
            await trio.sleep_until(30)
            said.append([(i.id, i.state, i.restarts, i.exit) for i in sup.which_children()])
            nursery.cancel_scope.cancel()
    except otree.RestartIntensityExceeded as error:
        said.append(("gave up", trio.current_time(), str(error)))
    return said


@settings(max_examples=100, deadline=None)
@given(
    crashes=st.fixed_dictionaries({n: st.lists(st.integers(1, 25), max_size=8, unique=True) for n in "abc"}),
    ops=st.lists(st.tuples(st.integers(1, 25), st.sampled_from(["stop", "restart"]), st.sampled_from("abc"))),
    intensity=st.integers(0, 6),
)
def test_restarts_in_the_task_leave_the_same_history_as_restarts_through_the_queue(
    crashes: dict[str, list[float]], ops: list[tuple[float, str, str]], intensity: int
) -> None:
    # distinct moments: a crashes at n.1, b at n.2, c at n.3, the operator acts at n.5
    crashes = {n: [t + 0.1 * (1 + "abc".index(n)) for t in ts] for n, ts in crashes.items()}
    ops = sorted({(t + 0.5, op, n) for t, op, n in ops})

    def history(reports_ready: bool) -> list[Any]:
        clock = trio.testing.MockClock(autojump_threshold=0)
        return trio.run(_history, reports_ready, crashes, ops, intensity, clock=clock)

    queued = history(True)
    assert history(False) == queued
    with mock.patch.object(_Supervisor, "run_exited", _always_queued):  # plain children, the old way
        assert history(False) == queued


def _always_queued(self: _Supervisor, run: otree.RunningChild) -> None:
    self._post(self._child_exited, run)


# --- process children ---------------------------------------------------------------------------


def _child_tasks(sup: otree.SupervisorHandle) -> set[trio.lowlevel.Task]:
    nursery = sup._sup()._nursery
    assert nursery is not None
    return set(nursery.child_tasks)


async def test_a_crash_looping_process_restarts_in_its_task_with_the_same_events(
    marker: str, state: Path
) -> None:
    """Each run after the first is told how the last one ended, and the supervisor reports it
    as it reports a restart through its queue."""
    runs = state.parent / "runs"
    script = (
        f'echo "run ${{OTREE_PREVIOUS_EXIT:-first}}" >> {runs}; '
        f'[ "$(wc -l < {runs})" -gt 3 ] && exec sleep 1000; exit 3'
    )
    spec = otree.process("p", ["sh", "-c", script], env={"OTREE_TEST_MARKER": marker}, shutdown=0.0)
    tree = otree.supervisor("root", max_restarts=5, children=[spec])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        tasks = _child_tasks(sup)
        events: list[otree.Event] = []
        async with sup.events() as stream:
            async for event in stream:
                events.append(event)
                if len(events) == 12:
                    break
        assert _child_tasks(sup) == tasks  # the same one task ran every run
        [info] = sup.which_children()
        assert (info.state, info.restarts, info.exit) == (
            "running",
            3,
            otree.ExitInfo("error", "exit code 3", 3),
        )
        # ready at its exec: the fourth run's shell may not have written its line yet
        assert wait_until(lambda: len(runs.read_text().splitlines()) == 4, 10.0)
    assert runs.read_text().splitlines() == ["run first", "run error:3", "run error:3", "run error:3"]
    detail = {"detail": "exit code 3", "exception": "ProcessFailed", "message": "exit code 3", "exit_code": 3}
    expected: list[tuple[str, str, str, dict[str, Any]]] = []
    for n in (1, 2, 3):
        expected += [
            ("root/p", "child.exited", "error", detail),
            ("root/p", "child.restarting", "restart", {"delay": 0.0, "restarts_in_window": n}),
            ("root/p", "child.started", "", {}),
            ("root/p", "child.ready", "", {}),
        ]
    assert event_tuples(events) == expected


async def test_a_process_restart_in_its_task_that_fails_to_start_is_retried_through_the_queue(
    marker: str, state: Path
) -> None:
    """The program removes itself on its first run: the restart's spawn fails, and each retry too."""
    program = state.parent / "agent"
    program.write_text(f"#!/bin/sh\nrm {program}\nexit 1\n")
    program.chmod(0o700)
    spec = otree.process("p", [str(program)], env={"OTREE_TEST_MARKER": marker})
    tree = otree.supervisor("root", max_restarts=2, max_seconds=60.0, children=[spec])
    events: list[tuple[str, str]] = []
    with pytest.raises(otree.RestartIntensityExceeded):
        async with otree.open_supervisor(tree, state_dir=state) as sup, sup.events() as stream:
            async for event in stream:
                events.append((event.kind, event.reason))
    assert events == [
        ("child.exited", "error"),
        ("child.restarting", "restart"),
        ("child.started", ""),
        ("child.start_failed", "error"),
        ("child.restarting", "restart"),
        ("child.started", ""),
        ("child.start_failed", "error"),
        ("supervisor.intensity_exceeded", "shutdown"),
        ("supervisor.stopped", "shutdown"),
    ]


async def test_a_request_during_a_process_restart_in_its_task_waits_for_its_start(
    marker: str, state: Path
) -> None:
    """OTP's synchronous start: the supervisor serves nothing while the restarted process is not
    ready (here for 0.3 s after its spawn)."""
    spec = otree.process(
        "p", ["sh", "-c", "sleep 0.5; exit 1"], env={"OTREE_TEST_MARKER": marker}, ready=0.3, shutdown=0.0
    )
    tree = otree.supervisor("root", max_restarts=5, children=[spec])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        tasks = _child_tasks(sup)
        async with sup.events() as stream:
            await first(stream, "child.restarting")
            await sup.start_child(otree.task("t", trio.sleep_forever))
            after = [(event.path, event.kind) async for event in _until(stream, "root/t", "child.ready")]
        assert tasks <= _child_tasks(sup)  # the process still runs in the task it started in
    assert after == [
        ("root/p", "child.started"),
        ("root/p", "child.ready"),
        ("root/t", "child.started"),
        ("root/t", "child.ready"),
    ]


async def _until(stream: otree.EventStream, path: str, kind: str) -> AsyncIterator[otree.Event]:
    async for event in stream:
        yield event
        if (event.path, event.kind) == (path, kind):
            return
