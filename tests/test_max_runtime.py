"""max_runtime: a task or process child, or a pool job, stopped once it has run too long.

Task children and jobs run on trio's MockClock; real processes check a process child's
group getting SIGTERM, then SIGKILL after the grace, and a process job's stop.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import otree
from otree._paths import child_log_dir
from tests.test_process import first, marked_pids, marker

__all__ = ["marker"]  # a fixture, imported for pytest


async def forever() -> None:
    await trio.sleep_forever()


# --- specs and submissions --------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 0, "30", True, float("nan")])
def test_a_bad_max_runtime_is_a_spec_error_naming_the_child(bad: Any) -> None:
    expected = f"alice: max_runtime must be a number > 0 or None; got {bad!r}"
    with pytest.raises(otree.SpecError) as task_error:
        otree.task("alice", forever, max_runtime=bad)
    assert str(task_error.value) == expected
    with pytest.raises(otree.SpecError) as process_error:
        otree.process("alice", ["true"], max_runtime=bad)
    assert str(process_error.value) == expected
    with pytest.raises(otree.SpecError) as pool_error:
        otree.pool("alice", {"work": forever}, max_runtime=bad)
    assert str(pool_error.value) == expected


def test_a_pools_max_runtime_per_kind_names_known_kinds_and_takes_seconds() -> None:
    with pytest.raises(otree.SpecError) as unknown:
        otree.pool("jobs", {"work": forever}, max_runtime={"wrok": 5})
    assert str(unknown.value) == "jobs: max_runtime must name kinds of handlers; got 'wrok'"
    with pytest.raises(otree.SpecError) as negative:
        otree.pool("jobs", {"work": forever}, max_runtime={"work": -1})
    assert str(negative.value) == "jobs: max_runtime['work'] must be a number > 0 or None; got -1"
    spec = otree.pool("jobs", {"work": forever, "other": forever}, max_runtime={"work": 5})
    assert (spec.runtime_of("work"), spec.runtime_of("other")) == (5, None)
    assert otree.pool("jobs", {"work": forever}, max_runtime=7).runtime_of("work") == 7


async def test_submit_refuses_a_bad_max_runtime_naming_the_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tree = otree.supervisor("root", children=[otree.pool("jobs", {"work": forever})])
    async with otree.open_supervisor(tree) as sup:
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        with pytest.raises(
            ValueError, match=r"^root/jobs: max_runtime must be a number > 0 or None; got -1$"
        ):
            await pool.submit("work", max_runtime=-1)
        assert pool.queued() == []


# --- task children ------------------------------------------------------------------------------


async def test_a_permanent_task_past_max_runtime_exits_error_and_restarts_with_a_new_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tree = otree.supervisor(
        "root", max_restarts=5, max_seconds=100, children=[otree.task("slow", forever, max_runtime=10)]
    )
    async with otree.open_supervisor(tree) as sup:
        stream = sup.events()
        exits = []
        for _ in range(2):
            event = await first(stream, "child.exited")
            exits.append((trio.current_time(), event.reason, event.details["detail"]))
            await first(stream, "child.ready")
        assert exits == [(10.0, "error", "max_runtime"), (20.0, "error", "max_runtime")]
        assert event.details["exception"] == "TimeLimitExceeded"
        assert event.details["message"] == "max_runtime: still running after 10s"
        info = sup.which_children()[0]
        assert info.restarts == 2
        assert info.state == "running"


async def test_max_runtime_counts_for_intensity(autojump_clock: trio.testing.MockClock) -> None:
    tree = otree.supervisor(
        "root", max_restarts=2, max_seconds=100, children=[otree.task("slow", forever, max_runtime=10)]
    )
    with pytest.raises(otree.RestartIntensityExceeded):
        async with otree.open_supervisor(tree):
            await trio.sleep_forever()
    assert trio.current_time() == 30.0  # three exits, the third over the limit of two restarts


async def test_a_trapping_task_gets_its_grace_and_still_exits_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[float] = []

    async def polite() -> None:
        await otree.current_child().stopping.wait()
        seen.append(trio.current_time())
        await trio.sleep(1)  # tidies up within its grace, then returns

    async def deaf() -> None:
        otree.current_child().stopping  # noqa: B018 - trapping, but it never stops by itself
        await trio.sleep_forever()

    tree = otree.supervisor(
        "root",
        children=[
            otree.task("polite", polite, restart="transient", max_runtime=10, shutdown=5),
            otree.task("deaf", deaf, restart="transient", max_runtime=10, shutdown=5),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        stream = sup.events()
        polite_exit = await first(stream, "child.exited", "root/polite")
        assert (trio.current_time(), polite_exit.reason, polite_exit.details["detail"]) == (
            11.0,
            "error",
            "max_runtime",
        )
        assert seen == [10.0]
        deaf_exit = await first(stream, "child.exited", "root/deaf")
        assert (trio.current_time(), deaf_exit.reason, deaf_exit.details["detail"]) == (
            15.0,
            "error",
            "max_runtime",
        )


async def test_a_task_done_in_time_is_untouched(autojump_clock: trio.testing.MockClock) -> None:
    async def quick() -> None:
        await trio.sleep(5)

    tree = otree.supervisor(
        "root", children=[otree.task("quick", quick, restart="transient", max_runtime=10)]
    )
    async with otree.open_supervisor(tree) as sup:
        event = await first(sup.events(), "child.exited")
        assert (event.reason, event.details["detail"]) == ("normal", "")
        await trio.sleep(20)
        assert sup.which_children()[0].exit == otree.ExitInfo("normal", "")


async def test_a_task_past_max_runtime_before_it_is_ready_fails_to_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never_ready(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep_forever()

    tree = otree.supervisor("root", children=[otree.task("late", never_ready, max_runtime=3)])
    with pytest.raises(otree.StartError, match=r"root/late.*max_runtime"):
        async with otree.open_supervisor(tree):
            pass


# --- pool jobs --------------------------------------------------------------------------------------


async def sleepy(payload: dict[str, Any]) -> str:
    await trio.sleep(payload["sleep"])
    return "done"


def pool_tree(**kw: Any) -> otree.SupervisorSpec:
    return otree.supervisor("root", children=[otree.pool("jobs", {"work": sleepy}, **kw)])


def pool_of(sup: otree.SupervisorHandle) -> otree.PoolHandle:
    handle = sup.child("jobs")
    assert isinstance(handle, otree.PoolHandle)
    return handle


async def test_a_job_past_its_kinds_max_runtime_is_retried_then_dead_lettered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with otree.open_supervisor(pool_tree(max_runtime={"work": 5}, max_attempts=2)) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        job = await pool.submit("work", {"sleep": 100})
        with pytest.raises(otree.JobFailed, match="dead-lettered after 2 attempts") as failed:
            await job.result()
        assert trio.current_time() == 10.0  # each attempt has its own 5 s
        cause = failed.value.__cause__
        assert isinstance(cause, TimeoutError)
        assert str(cause) == "max_runtime: still running after 5s"
        retried = await first(stream, "job.retried")
        assert (retried.reason, retried.details["detail"]) == ("error", "max_runtime")
        dead = await first(stream, "job.dead_lettered")
        assert dead.details["detail"] == "max_runtime"
        assert [letter.error for letter in pool.dead_letters()] == ["max_runtime"]


async def test_max_runtime_per_submit_overrides_the_kinds(autojump_clock: trio.testing.MockClock) -> None:
    async with otree.open_supervisor(pool_tree(max_runtime=5, max_concurrency=4)) as sup:
        pool = pool_of(sup)
        longer = await pool.submit("work", {"sleep": 20}, max_runtime=30)
        shorter = await pool.submit("work", {"sleep": 3}, max_runtime=1)
        by_kind = await pool.submit("work", {"sleep": 20})
        unlimited = await pool.submit("work", {"sleep": 20}, max_runtime=math.inf)
        assert await longer.result() == "done"
        assert await unlimited.result() == "done"
        assert trio.current_time() == 20.0
        for job in (shorter, by_kind):
            with pytest.raises(otree.JobFailed) as failed:
                await job.result()
            assert isinstance(failed.value.__cause__, TimeoutError)
        assert {letter.id: letter.error for letter in pool.dead_letters()} == {
            shorter.id: "max_runtime",
            by_kind.id: "max_runtime",
        }


async def test_a_job_without_a_limit_runs_as_long_as_it_takes(autojump_clock: trio.testing.MockClock) -> None:
    async with otree.open_supervisor(pool_tree(max_runtime={"work": None})) as sup:
        job = await pool_of(sup).submit("work", {"sleep": 10_000})
        assert await job.result() == "done"


# --- a real process child --------------------------------------------------------------------------


async def test_a_process_past_max_runtime_gets_sigterm_then_sigkill_and_exits_error(
    marker: str, tmp_path: Path
) -> None:
    # it logs the SIGTERM and ignores it; a grandchild in its group must go with it
    code = (
        "import signal, subprocess, time\n"
        "subprocess.Popen(['sleep', '1000'])\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('TERM', flush=True))\n"
        "print('up', flush=True)\n"
        "time.sleep(1000)\n"
    )
    spec = otree.process(
        "p",
        [sys.executable, "-c", code],
        env={"OTREE_TEST_MARKER": marker},
        restart="temporary",
        ready=0.3,
        max_runtime=1.0,
        shutdown=0.5,
    )
    state = tmp_path / "state"
    tree = otree.supervisor("t", children=[spec])
    async with otree.open_supervisor(tree, state_dir=state) as sup:
        stream = sup.events()
        assert len(marked_pids(marker)) == 2  # the child and its sleep (ready: up for 0.3 s)
        before = time.monotonic()
        event = await first(stream, "child.exited")
        took = time.monotonic() - before
        assert (event.reason, event.details["detail"]) == ("error", "max_runtime")
        assert event.details["signal"] == signal.SIGKILL
        assert 1.0 <= took < 5.0  # the rest of its second (0.7 s), the grace (0.5 s), then SIGKILL
        assert marked_pids(marker) == []  # the whole group
    log = (child_log_dir(state, "t/p") / "stdout.log").read_text()
    assert log.splitlines() == ["up", "TERM"]


async def test_a_process_job_past_max_runtime_is_stopped_and_dead_lettered(
    marker: str, tmp_path: Path
) -> None:
    handler = otree.process_job(
        [sys.executable, "-c", "import time; time.sleep(1000)"],
        env={"OTREE_TEST_MARKER": marker},
        shutdown=0.2,
    )
    pool = otree.pool("jobs", {"tool": handler}, max_runtime={"tool": 0.5}, durable=False)
    async with otree.open_supervisor(otree.supervisor("root", children=[pool]), state_dir=tmp_path) as sup:
        jobs = sup.child("jobs")
        assert isinstance(jobs, otree.PoolHandle)
        job = await jobs.submit("tool", {})
        with pytest.raises(otree.JobFailed) as failed:
            await job.result()
        assert str(failed.value.__cause__) == "max_runtime: still running after 0.5s"
        assert [letter.error for letter in jobs.dead_letters()] == ["max_runtime"]
        assert marked_pids(marker) == []
