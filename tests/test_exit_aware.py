"""Exit-aware lifecycle: exit codes that count as normal or decide the restart, the last exit
passed to the next run, and ``on_exit`` hooks.

Task children run on trio's MockClock; exit codes and ``OTREE_PREVIOUS_EXIT`` use real
processes (the ``marker`` fixture of test_process kills and reports any left behind).
"""

from __future__ import annotations

import json
import math
import stat
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import otree
from otree._process import previous_exit_value
from otree._reload import plan_reload
from tests.helpers import Log, collect, crash_after
from tests.test_process import first, marker, proc

__all__ = ["marker"]  # a fixture, imported for pytest


async def forever() -> None:
    await trio.sleep_forever()


async def hook(path: str, exit_info: otree.ExitInfo) -> None:
    """An on_exit hook that does nothing."""


# --- specs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["ok_exit_codes", "restart_exit_codes", "no_restart_exit_codes"])
@pytest.mark.parametrize("bad", [[-1], [256], [True], ["3"], 3, None])
def test_exit_codes_must_be_lists_of_0_to_255(field: str, bad: Any) -> None:
    with pytest.raises(otree.SpecError) as error:
        otree.process("p", ["true"], **{field: bad})
    assert str(error.value) == f"p: {field} must be a list of exit codes (integers 0-255); got {bad!r}"


def test_exit_codes_are_kept_sorted_once_each() -> None:
    spec = otree.process(
        "p", ["true"], ok_exit_codes=[3, 1, 3], restart_exit_codes={7, 2}, no_restart_exit_codes=()
    )
    assert (spec.ok_exit_codes, spec.restart_exit_codes, spec.no_restart_exit_codes) == ((1, 3), (2, 7), ())


def test_a_code_cannot_both_force_and_prevent_a_restart() -> None:
    with pytest.raises(otree.SpecError) as error:
        otree.process("p", ["true"], restart_exit_codes=[1, 2, 3], no_restart_exit_codes=[3, 2])
    assert (
        str(error.value)
        == "p: restart_exit_codes must not share codes with no_restart_exit_codes; got [2, 3]"
    )


def test_a_temporary_child_cannot_be_forced_to_restart() -> None:
    with pytest.raises(otree.SpecError) as error:
        otree.process("p", ["true"], restart="temporary", restart_exit_codes=[3])
    assert (
        str(error.value)
        == "p: restart_exit_codes requires restart 'permanent' or 'transient'; got 'temporary'"
    )
    otree.process("p", ["true"], restart="temporary", no_restart_exit_codes=[3], ok_exit_codes=[3])


def sync_hook(path: str, exit_info: otree.ExitInfo) -> None:
    """Not async: refused."""


@pytest.mark.parametrize("bad", [sync_hook, "hook", 3])
def test_on_exit_must_be_an_async_function_on_every_kind_of_child(bad: Any) -> None:
    expected = f"c: on_exit must be None or an async function (path, ExitInfo); got {bad!r}"
    for build in (
        lambda: otree.task("c", forever, on_exit=bad),
        lambda: otree.process("c", ["true"], on_exit=bad),
        lambda: otree.supervisor("c", on_exit=bad),
        lambda: otree.pool("c", {"work": forever}, on_exit=bad),
    ):
        with pytest.raises(otree.SpecError) as error:
            build()
        assert str(error.value) == expected


def test_reload_compares_on_exit_like_task_functions_and_exit_codes_by_value() -> None:
    async def other(path: str, exit_info: otree.ExitInfo) -> None:
        raise RuntimeError(path)

    current = [otree.task("a", forever, on_exit=hook), otree.process("b", ["true"], ok_exit_codes=[3])]
    same = [otree.task("a", forever, on_exit=hook), otree.process("b", ["true"], ok_exit_codes=(3,))]
    assert plan_reload(current, same).changed == []
    changed = [otree.task("a", forever, on_exit=other), otree.process("b", ["true"], ok_exit_codes=[4])]
    assert plan_reload(current, changed).changed == ["a", "b"]


# --- OTREE_PREVIOUS_EXIT ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_info", "value"),
    [
        (otree.ExitInfo("normal", "", 0, None), "normal:0"),
        (otree.ExitInfo("normal", "", 3, None), "normal:3"),
        (otree.ExitInfo("error", "exit code 3", 3, None), "error:3"),
        (otree.ExitInfo("error", "killed by SIGKILL", None, 9), "error:SIGKILL"),
        (otree.ExitInfo("error", "stalled", None, 15), "error:stalled:SIGTERM"),
        (otree.ExitInfo("error", "max_runtime", 143, None), "error:max_runtime:143"),
        (otree.ExitInfo("error", "start_timeout", None, 9), "error:start_timeout:SIGKILL"),
        (otree.ExitInfo("shutdown", "", None, 15), "shutdown:SIGTERM"),
        (otree.ExitInfo("shutdown", "killed", None, 9), "shutdown:killed:SIGKILL"),
        (otree.ExitInfo("error", "ValueError: boom"), "error"),
        (otree.ExitInfo("error", "", None, 200), "error:SIG200"),
    ],
)
def test_previous_exit_value_format(exit_info: otree.ExitInfo, value: str) -> None:
    assert previous_exit_value(exit_info) == value


# --- exit codes and the previous exit, with real processes -------------------------------------------

# Exits with the code in $CODE on its first run; on a later one, records $OTREE_PREVIOUS_EXIT and exits 0.
RECORD = (
    "import os, sys\n"
    "prev = os.environ.get('OTREE_PREVIOUS_EXIT')\n"
    "if prev is None: sys.exit(int(os.environ['CODE']))\n"
    "open(os.environ['OUT'], 'w').write(prev)\n"
)


def alone(child: otree.ProcessSpec, tmp_path: Path) -> AbstractAsyncContextManager[otree.SupervisorHandle]:
    """A tree ``t`` of just ``child``."""
    return otree.open_supervisor(otree.supervisor("t", children=[child]), state_dir=tmp_path / "s")


async def exit_then_settle(sup: otree.SupervisorHandle) -> tuple[otree.Event, otree.ChildInfo]:
    """The only child's first ``child.exited`` event, and the child once the supervisor acted on it."""
    event = await first(sup.events(), "child.exited", "t/p")
    await trio.testing.wait_all_tasks_blocked()
    [info] = sup.which_children()
    return event, info


async def test_an_ok_exit_code_is_normal_and_a_transient_child_stays_stopped(
    marker: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    child = proc(
        "p", RECORD, marker, restart="transient", ok_exit_codes=[3], env={"CODE": "3", "OUT": str(out)}
    )
    async with alone(child, tmp_path) as sup:
        event, info = await exit_then_settle(sup)
        assert (event.reason, event.details["exit_code"]) == ("normal", 3)
        assert (info.state, info.restarts, info.exit) == ("stopped", 0, otree.ExitInfo("normal", "", 3, None))
    assert not out.exists()


async def test_a_no_restart_code_leaves_a_permanent_child_stopped(marker: str, tmp_path: Path) -> None:
    child = proc("p", "import sys; sys.exit(4)", marker, no_restart_exit_codes=[4])
    async with alone(child, tmp_path) as sup:
        event, info = await exit_then_settle(sup)
        assert (event.reason, event.details["exit_code"]) == ("error", 4)
        assert (info.state, info.restarts) == ("stopped", 0)


async def test_a_restart_code_restarts_a_transient_child_whose_exit_is_normal_and_it_sees_that_exit(
    marker: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    child = proc(
        "p",
        RECORD,
        marker,
        restart="transient",
        ok_exit_codes=[5],
        restart_exit_codes=[5],
        env={"CODE": "5", "OUT": str(out)},
    )
    async with alone(child, tmp_path) as sup:
        seen = await collect(sup.events(), lambda e: e.kind == "child.exited" and e.details["exit_code"] == 0)
        exits = [(e.reason, e.details["exit_code"]) for e in seen if e.kind == "child.exited"]
        assert exits == [("normal", 5), ("normal", 0)]
        await trio.testing.wait_all_tasks_blocked()
        [info] = sup.which_children()
        assert (info.state, info.restarts) == ("stopped", 1)  # exit 0 is not forced: transient stops
    assert out.read_text() == "normal:5"


async def test_a_crashed_process_is_told_its_error_exit(marker: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = proc("p", RECORD + "import time; time.sleep(1000)\n", marker, env={"CODE": "3", "OUT": str(out)})
    async with alone(child, tmp_path) as sup:
        stream = sup.events()
        await first(stream, "child.exited", "t/p")
        await first(stream, "child.ready", "t/p")
        with trio.fail_after(10):
            while not out.exists() or not out.read_text():
                await trio.sleep(0.01)
        assert out.read_text() == "error:3"


# --- previous_exit and on_exit, for tasks on the MockClock --------------------------------------------


async def test_a_task_sees_none_then_its_previous_exit(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[otree.ExitInfo | None] = []

    async def remembers() -> None:
        seen.append(otree.current_child().previous_exit)
        await trio.sleep(1)
        if len(seen) == 1:
            raise ValueError("boom")

    tree = otree.supervisor("t", children=[otree.task("a", remembers)])
    async with otree.open_supervisor(tree) as sup:
        await trio.sleep(1.5)
        assert seen == [None, otree.ExitInfo("error", "ValueError: boom")]
        await trio.sleep(1)
        assert seen[2] == otree.ExitInfo("normal")
        assert sup.which_children()[0].restarts == 2


async def test_on_exit_is_called_once_per_exit_with_its_exit_info(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[str, otree.ExitInfo, float]] = []

    async def record(path: str, exit_info: otree.ExitInfo) -> None:
        calls.append((path, exit_info, trio.current_time()))

    log = Log()
    tree = otree.supervisor(
        "t", max_restarts=10, children=[otree.task("a", crash_after, log, "a", 2.0, on_exit=record)]
    )
    async with otree.open_supervisor(tree):
        await trio.sleep(5)
        assert calls == [
            ("t/a", otree.ExitInfo("error", "RuntimeError: a crashed"), 2.0),
            ("t/a", otree.ExitInfo("error", "RuntimeError: a crashed"), 4.0),
        ]
    assert calls[-1][:2] == ("t/a", otree.ExitInfo("shutdown"))  # the final stop is an exit too
    assert len(calls) == 3


async def test_a_failing_on_exit_is_one_event_and_the_tree_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def broken(path: str, exit_info: otree.ExitInfo) -> None:
        raise OSError(f"cannot tell the parent about {path}")

    log = Log()
    tree = otree.supervisor(
        "t",
        children=[
            otree.task("a", crash_after, log, "a", 1.0, on_exit=broken),
            otree.task("b", forever),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        stream = sup.events()
        failed = await first(stream, "child.on_exit_failed", "t/a")
        assert (failed.reason, failed.details) == (
            "error",
            {"exception": "OSError", "message": "cannot tell the parent about t/a", "exit": "error"},
        )
        await first(stream, "child.ready", "t/a")
        await trio.testing.wait_all_tasks_blocked()
        assert {info.id: info.state for info in sup.which_children()} == {"a": "running", "b": "running"}
        assert sup.which_children()[1].restarts == 1


async def test_on_exit_does_not_block_the_restart(autojump_clock: trio.testing.MockClock) -> None:
    started: list[float] = []
    hooks_done: list[float] = []

    async def slow(path: str, exit_info: otree.ExitInfo) -> None:
        await trio.sleep(100)
        hooks_done.append(trio.current_time())

    async def crashes() -> None:
        started.append(trio.current_time())
        await trio.sleep(1)
        if len(started) == 1:
            raise ValueError("boom")
        await trio.sleep(math.inf)

    tree = otree.supervisor("t", children=[otree.task("a", crashes, on_exit=slow)])
    async with otree.open_supervisor(tree):
        await trio.sleep(2)
        assert started == [0.0, 1.0] and hooks_done == []
        await trio.sleep(100)
        assert hooks_done == [101.0]


async def test_codes_decide_only_an_exit_the_process_made_by_itself(marker: str, tmp_path: Path) -> None:
    """Stopped at max_runtime, it exits 4 from its SIGTERM handler: still a max_runtime error, restarted."""
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(4))\n"
        "print('up', flush=True)\n"
        "time.sleep(1000)\n"
    )
    child = proc("p", code, marker, max_runtime=0.5, no_restart_exit_codes=[4], ok_exit_codes=[4])
    async with alone(child, tmp_path) as sup:
        event, info = await exit_then_settle(sup)
        assert (event.reason, event.details["detail"], event.details["exit_code"]) == (
            "error",
            "max_runtime",
            4,
        )
        assert info.restarts == 1


# --- persist_intensity --------------------------------------------------------------------------------


def test_persist_intensity_must_be_a_bool() -> None:
    with pytest.raises(otree.SpecError) as error:
        otree.supervisor("s", persist_intensity="yes")  # type: ignore[arg-type]
    assert str(error.value) == "s: persist_intensity must be True or False; got 'yes'"


def crash_loop(persist: bool) -> otree.SupervisorSpec:
    """Its child crashes 1 s after each start; more than 2 restarts in 100 s is too many."""
    child = otree.task("a", crash_after, Log(), "a", 1.0)
    return otree.supervisor(
        "loop", max_restarts=2, max_seconds=100, persist_intensity=persist, children=[child]
    )


@pytest.mark.parametrize("persist", [True, False])
async def test_a_crash_loop_is_still_one_after_otree_restarts(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, persist: bool
) -> None:
    window = tmp_path / "intensity" / "loop.json"
    async with otree.open_supervisor(crash_loop(persist), state_dir=tmp_path) as sup:
        await trio.sleep(2.5)
        assert sup.which_children()[0].restarts == 2
        if persist:  # written at each restart, not at exit: a kill -9 now loses nothing
            assert len(json.loads(window.read_bytes())) == 2
            assert stat.S_IMODE(window.stat().st_mode) == 0o600
            assert stat.S_IMODE(window.parent.stat().st_mode) == 0o700
    assert window.exists() is persist
    if persist:
        with pytest.raises(otree.RestartIntensityExceeded):
            async with otree.open_supervisor(crash_loop(persist), state_dir=tmp_path):
                await trio.sleep(1.5)  # the first crash of this run is the third in the window
    else:
        async with otree.open_supervisor(crash_loop(persist), state_dir=tmp_path) as sup:
            await trio.sleep(2.5)
            assert sup.which_children()[0].restarts == 2


async def test_an_unreadable_window_is_an_event_and_counting_starts_afresh(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    window = tmp_path / "intensity" / "loop.json"
    window.parent.mkdir(parents=True)
    window.write_text("[1, 2")
    async with otree.open_supervisor(crash_loop(True), state_dir=tmp_path) as sup:
        await trio.sleep(2.5)
        assert sup.which_children()[0].restarts == 2
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    [problem] = [e for e in logged if e["kind"] == "supervisor.intensity_not_persisted"]
    assert (problem["path"], problem["reason"]) == ("loop", "error")
    assert problem["details"]["detail"].startswith(f"{window}: ")
    assert len(json.loads(window.read_bytes())) == 2  # rewritten whole at the next restart
