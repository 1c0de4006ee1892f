"""The pool child (in memory): order, cap, budget gate, retries, dead letters, circuit breaker."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import sqlite3
from typing import Any, Literal

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import otree
from otree._budget import LEDGER_MAX
from otree._render import render_jobs, render_status
from otree._status import jobs_of, status_of
from otree._store import Store

T0 = dt.datetime(2026, 11, 22, 23, 0, tzinfo=dt.UTC)


def clock() -> dt.datetime:
    """A wall clock that follows trio's (Mock)clock, starting at 23:00 UTC."""
    return T0 + dt.timedelta(seconds=trio.current_time())


class Recorder:
    def __init__(self) -> None:
        self.started: list[Any] = []
        self.running = 0
        self.most = 0

    async def work(self, payload: dict[str, Any]) -> Any:
        self.started.append(payload["n"])
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            me = otree.current_child()
            me.report_cost(payload.get("cost", 0.0))
            await trio.sleep(payload.get("sleep", 1.0))
            if payload.get("fail"):
                raise RuntimeError(f"job {payload['n']} failed")
            return payload["n"] * 10
        finally:
            self.running -= 1


def tree_of(recorder: Recorder, **kw: Any) -> otree.SupervisorSpec:
    return otree.supervisor("root", children=[otree.pool("jobs", {"work": recorder.work}, now=clock, **kw)])


def pool_of(sup: otree.SupervisorHandle) -> otree.PoolHandle:
    handle = sup.child("jobs")
    assert isinstance(handle, otree.PoolHandle)
    return handle


@settings(max_examples=60, deadline=None)
@given(
    jobs=st.lists(st.tuples(st.integers(-2, 2), st.integers(1, 5)), min_size=1, max_size=25),
    cap=st.integers(1, 4),
)
def test_pool_starts_by_priority_fifo_within_a_class_never_above_the_cap(
    jobs: list[tuple[int, int]], cap: int
) -> None:
    recorder = Recorder()
    started: list[int] = []

    async def scenario() -> None:
        async with otree.open_supervisor(tree_of(recorder, max_concurrency=cap)) as sup:
            pool = pool_of(sup)
            stream = pool.events()
            handles = [
                pool.submit_nowait("work", {"n": n, "sleep": d}, priority=p) for n, (p, d) in enumerate(jobs)
            ]
            assert [await h.result() for h in handles] == [n * 10 for n in range(len(jobs))]
            async for event in stream:  # the order the pool started them in
                if event.kind == "job.started":
                    started.append(int(event.path.rsplit("/", 1)[1]) - 1)
                    if len(started) == len(jobs):
                        break

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert started == sorted(range(len(jobs)), key=lambda n: (-jobs[n][0], n))
    assert sorted(recorder.started) == list(range(len(jobs)))
    assert recorder.most == min(cap, len(jobs))


async def test_pool_queue_full_rejects_and_a_cancelled_job_leaves_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder, max_queue=2)) as sup:
        pool = pool_of(sup)
        first = pool.submit_nowait("work", {"n": 0})
        await trio.testing.wait_all_tasks_blocked()  # the first one runs: it does not count
        a = pool.submit_nowait("work", {"n": 1})
        pool.submit_nowait("work", {"n": 2})
        with pytest.raises(otree.QueueFull, match="root/jobs: queue full \\(max_queue=2\\)"):
            await pool.submit("work", {"n": 3})
        a.cancel()
        assert [j.id for j in pool.queued()] == ["3"]
        with pytest.raises(otree.JobFailed, match="cancelled"):
            await a.result()
        assert await first.result() == 0
        assert [info.id for info in pool.which_children()] in (["3"], [])


async def test_pool_submit_refuses_bad_input_and_queues_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder)) as sup:
        pool = pool_of(sup)
        with pytest.raises(ValueError, match="unknown job kind 'nope' \\(kinds: work\\)"):
            pool.submit_nowait("nope", {})
        with pytest.raises(ValueError, match="priority must be an integer in \\[-1000, 1000\\]"):
            pool.submit_nowait("work", {}, priority=5000)
        with pytest.raises(ValueError, match="estimated_cost must be a number of USD >= 0"):
            pool.submit_nowait("work", {}, estimated_cost=-1)
        with pytest.raises(ValueError, match="payload of a 'work' job cannot be encoded"):
            pool.submit_nowait("work", {"x": object()})
        assert pool.queued() == []


async def test_pool_key_makes_submission_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder)) as sup:
        pool = pool_of(sup)
        first = pool.submit_nowait("work", {"n": 1}, key="once")
        assert pool.submit_nowait("work", {"n": 1}, key="once") is first
        assert await first.result() == 10
    assert recorder.started == [1]


async def test_pool_reservations_prevent_overshoot_with_concurrent_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    tree = tree_of(recorder, max_concurrency=10, daily_budget=1.0, on_budget_exhausted="hold")
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        for n in range(6):
            pool.submit_nowait("work", {"n": n, "cost": 0.3}, estimated_cost=0.3)
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.most == 3  # 3 x 0.3 reserved; a 4th would pass 1.0
        await trio.sleep(1.5)
        assert sorted(recorder.started) == [0, 1, 2]  # 0.9 spent: 0.9 + 0.3 > 1.0, held until midnight


async def test_pool_warns_once_then_holds_until_midnight_in_the_budget_tz(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    tree = tree_of(
        recorder, daily_budget=1.0, budget_warn_at=0.5, on_budget_exhausted="hold", budget_tz="UTC"
    )
    kinds: list[str] = []
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        jobs = [pool.submit_nowait("work", {"n": n, "cost": 0.4}, estimated_cost=0.2) for n in range(4)]
        assert await jobs[2].result() == 20  # 1.2 spent after three: the 4th is held
        before = trio.current_time()
        assert await jobs[3].result() == 30
        assert trio.current_time() - before == pytest.approx(3600 - 3, abs=1)  # midnight UTC at t=3600

        # the same clock in New York: 23:00 UTC is 18:00 there, so midnight is six hours later
        async for event in stream:
            if event.path == "root/jobs":
                kinds.append(event.kind)
            if event.kind == "budget.reset":
                break
    assert kinds == ["budget.warning", "budget.exhausted", "budget.reset"]


async def test_budget_reset_is_reported_at_midnight_on_an_idle_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder, daily_budget=1.0, budget_tz="UTC")) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        await pool.submit_nowait("work", {"n": 0, "cost": 0.3}).result()
        reset = [e async for e in _until(stream, "budget.reset")][-1]
        assert trio.current_time() == pytest.approx(3600)  # midnight UTC, with nothing submitted since
        assert reset.path == "root/jobs"


async def test_spend_reported_after_midnight_counts_for_the_new_day(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A job started before midnight, with nothing spent that day, reports its cost after it: the
    cost is today's (it used to go to the day before, and be lost when the day rolled)."""

    async def overnight(payload: Any) -> None:
        await trio.sleep(3700)  # midnight UTC is at t=3600
        otree.current_child().report_cost(0.4)

    spec = otree.pool("jobs", {"o": overnight}, daily_budget=1.0, budget_tz="UTC", now=clock)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        pool = pool_of(sup)
        await pool.submit_nowait("o", estimated_cost=0.5).result()
        assert pool.status().spent_today == pytest.approx(0.4)


async def test_pool_reject_mode_refuses_submissions_once_spent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    tree = tree_of(recorder, daily_budget=0.5)
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        with pytest.raises(otree.BudgetExceeded, match=r"does not admit an estimate of \$0\.6"):
            pool.submit_nowait("work", {"n": 0}, estimated_cost=0.6)
        assert await pool.submit_nowait("work", {"n": 1, "cost": 0.5}, estimated_cost=0.1).result() == 10
        with pytest.raises(otree.BudgetExceeded):
            pool.submit_nowait("work", {"n": 2})


async def test_pool_retries_with_backoff_then_dead_letters_and_requeues(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    backoff = otree.Backoff(initial=2.0, maximum=10.0, factor=2.0, jitter=0.0)
    tree = tree_of(recorder, max_attempts=3, backoff=backoff)
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        job = pool.submit_nowait("work", {"n": 7, "fail": True, "sleep": 0})
        with pytest.raises(otree.JobFailed, match="dead-lettered after 3 attempts") as info:
            await job.result()
        assert isinstance(info.value.__cause__, RuntimeError)
        assert trio.current_time() == pytest.approx(2.0 + 4.0)
        delays = [
            e.details["delay"] async for e in _until(stream, "job.dead_lettered") if e.kind == "job.retried"
        ]
        assert delays == [2.0, 4.0]
        (letter,) = pool.dead_letters()
        assert (letter.id, letter.attempts, letter.error) == ("1", 3, "RuntimeError: job 7 failed")
        again = await pool.requeue(letter.id)
        assert pool.dead_letters() == []
        with pytest.raises(otree.JobFailed):
            await again.result()


async def _until(stream: otree.EventStream, kind: str):  # type: ignore[no-untyped-def]
    async for event in stream:
        yield event
        if event.kind == kind:
            return


async def test_pool_circuit_breaker_holds_jobs_without_burning_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    tree = tree_of(recorder, circuit_breaker=otree.CircuitBreaker(failures=2, cooldown=60.0))
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        failing = [pool.submit_nowait("work", {"n": n, "fail": True, "sleep": 0}) for n in range(2)]
        held = pool.submit_nowait("work", {"n": 9, "sleep": 0})
        for job in failing:
            with pytest.raises(otree.JobFailed):
                await job.result()
        assert held.state == "queued" and held.attempts == 0
        assert await held.result() == 90
        assert trio.current_time() == pytest.approx(60.0)
        kinds = [e.kind async for e in _until(stream, "circuit.closed") if e.kind.startswith("circuit.")]
        assert kinds == ["circuit.opened", "circuit.half_open", "circuit.closed"]


async def test_a_job_started_before_the_circuit_opened_cannot_close_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 (4a): three jobs fail and open the circuit; a fourth, running since before the
    opening, succeeds 22 ms later. Only the half-open trial, after the cooldown, closes it."""
    recorder = Recorder()
    tree = tree_of(recorder, max_concurrency=4, circuit_breaker=otree.CircuitBreaker(failures=3, cooldown=5))
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        failing = [pool.submit_nowait("work", {"n": n, "fail": True, "sleep": 0.1}) for n in range(3)]
        late = pool.submit_nowait("work", {"n": 3, "sleep": 0.122})
        await trio.sleep(0.05)
        held = pool.submit_nowait("work", {"n": 4, "sleep": 0})  # waits behind the full cap
        for job in failing:
            with pytest.raises(otree.JobFailed):
                await job.result()
        assert await late.result() == 30
        assert pool._pool().circuit.state == "open"  # type: ignore[union-attr]
        assert held.state == "queued"
        assert await held.result() == 40
        events = [e async for e in _until(stream, "circuit.closed")]
    circuit = [(e.kind, round(e.time - events[0].time, 1)) for e in events if e.kind.startswith("circuit.")]
    assert [kind for kind, _ in circuit] == ["circuit.opened", "circuit.half_open", "circuit.closed"]
    assert trio.current_time() == pytest.approx(5.1)  # the trial started when the cooldown ended


async def test_pool_stop_stops_running_jobs_at_once_under_one_job_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stubborn(payload: Any) -> None:
        otree.current_child().stopping  # noqa: B018 - trapping: gets the job_shutdown grace
        await trio.sleep_forever()

    tree = otree.supervisor(
        "root", children=[otree.pool("jobs", {"s": stubborn}, max_concurrency=3, job_shutdown=4.0)]
    )
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        jobs = [pool.submit_nowait("s", n) for n in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(pool.which_children()) == 3
        before = trio.current_time()
        await sup.terminate_child("jobs")
        assert trio.current_time() - before == pytest.approx(4.0)  # not 3 x 4
    for job in jobs:
        with pytest.raises(otree.JobFailed, match="dropped: pool_stopped"):
            await job.result()


@pytest.mark.parametrize(("pool_shutdown", "took"), [(1.5, 1.5), ("brutal_kill", 0.0), (10.0, 4.0)])
async def test_the_pools_own_shutdown_cuts_job_shutdown_short(
    autojump_clock: trio.testing.MockClock, pool_shutdown: float | str, took: float
) -> None:
    async def stubborn(payload: Any) -> None:
        otree.current_child().stopping  # noqa: B018 - trapping: gets the job_shutdown grace
        await trio.sleep_forever()

    pool = otree.pool("jobs", {"s": stubborn}, max_concurrency=2, job_shutdown=4.0, shutdown=pool_shutdown)
    async with otree.open_supervisor(otree.supervisor("root", children=[pool])) as sup:
        handle = pool_of(sup)
        for n in range(2):
            handle.submit_nowait("s", n)
        await trio.testing.wait_all_tasks_blocked()
        before = trio.current_time()
        await sup.terminate_child("jobs")
        assert trio.current_time() - before == pytest.approx(took)
        assert sup.which_children()[0].exit == otree.ExitInfo("shutdown", "killed" if took < 4.0 else "")


def test_pool_spec_errors_name_the_field() -> None:
    async def work(payload: Any) -> None:
        pass

    with pytest.raises(otree.SpecError, match="jobs: max_concurrency must be an integer >= 1; got 0"):
        otree.pool("jobs", {"w": work}, max_concurrency=0)
    with pytest.raises(otree.SpecError, match='jobs: budget_tz must be "local" or an IANA zone name'):
        otree.pool("jobs", {"w": work}, budget_tz="Mars/Olympus")
    with pytest.raises(otree.SpecError, match="jobs: durable must be None, True or False; got 'yes'"):
        otree.pool("jobs", {"w": work}, durable="yes")  # type: ignore[arg-type]
    with pytest.raises(otree.SpecError, match="handlers\\['w'\\] must be an async function"):
        otree.pool("jobs", {"w": print})


def test_a_daily_budget_beyond_what_the_ledger_holds_is_a_spec_error() -> None:
    async def work(payload: Any) -> None:
        pass

    for budget in (1e13, float("inf"), float("nan")):
        with pytest.raises(otree.SpecError, match="jobs: daily_budget must be None or a number of USD >= 0"):
            otree.pool("jobs", {"w": work}, daily_budget=budget)
    assert otree.pool("jobs", {"w": work}, daily_budget=1e9).daily_budget == 1e9


async def test_an_estimate_beyond_the_bound_is_refused_naming_the_pool(tmp_path: Any) -> None:
    """Issue 10 (4b): ``--cost 1e13`` was an OverflowError from SQLite, not a refusal."""
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder, durable=True), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        for cost in (1e13, 1e9 + 0.01, float("inf"), float("nan")):
            with pytest.raises(
                ValueError, match=r"^root/jobs: estimated_cost must be a number of USD >= 0 and"
            ):
                pool.submit_nowait("work", {"n": 0}, estimated_cost=cost)
        assert pool.queued() == []
        job = pool.submit_nowait("work", {"n": 1, "sleep": 0}, estimated_cost=1e9)
        assert job.estimate == 10**15
        assert await job.result() == 10


async def test_reported_spend_beyond_what_the_ledger_holds_saturates_it(tmp_path: Any) -> None:
    """A job may report any finite cost: the day's spend stops at the ledger's largest integer,
    the gate is shut, and the ledger still adds up after a restart."""

    async def spender(payload: Any) -> str:
        for _ in range(3):
            otree.current_child().report_cost(1e300)
        return "spent"

    pool_spec = otree.pool("jobs", {"s": spender}, durable=True, daily_budget=1.0, budget_tz="UTC", now=clock)
    tree = otree.supervisor("root", children=[pool_spec])
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        assert await pool.submit_nowait("s").result() == "spent"
        assert pool.status().spent_today == LEDGER_MAX / 1e6
        with pytest.raises(otree.BudgetExceeded):
            pool.submit_nowait("s")
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        assert pool_of(sup)._pool().budget.spent == LEDGER_MAX  # the ledger's sum fits SQLite


# --- holds -----------------------------------------------------------------------------------------


async def test_a_queue_held_by_the_budget_says_why_once_per_hold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 (4c): the head job's hold is in the status, the job listing and one job.held event
    per hold (a new head job is a new hold; a wake that changes nothing is not)."""
    recorder = Recorder()
    tree = tree_of(recorder, max_concurrency=4, daily_budget=1.0, on_budget_exhausted="hold", budget_tz="UTC")
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        pool.submit_nowait("work", {"n": 0, "sleep": 60}, estimated_cost=0.5)  # reserves 0.5, spends 0
        pool.submit_nowait("work", {"n": 1, "cost": 0.42, "sleep": 30}, estimated_cost=0.42)
        head = pool.submit_nowait("work", {"n": 2, "sleep": 1}, estimated_cost=0.10)
        for n in range(3, 6):  # each submission wakes the dispatcher: the hold is the same
            pool.submit_nowait("work", {"n": n, "sleep": 1}, priority=-1)
        await trio.sleep(10)
        held = "budget: needs $0.10, $0.08 left ($0.50 reserved by running jobs), resets 00:00 UTC"
        assert pool.status().held == held
        jobs = jobs_of(pool)
        assert [job.held for job in jobs.queued] == [held, None, None, None]
        assert render_jobs(jobs).splitlines()[4].endswith(f"estimate $0.10 held: {held}")
        assert render_status(status_of(pool, sup.which_children()[0])).endswith(f"held: {held}")
        urgent = pool.submit_nowait("work", {"n": 6}, estimated_cost=0.5, priority=5)  # a new head
        await trio.sleep(1)
        assert pool.status().held == (
            "budget: needs $0.50, $0.08 left ($0.50 reserved by running jobs), resets 00:00 UTC"
        )
        await trio.sleep(30)  # job 1 ended: a wake that changes no hold
        urgent.cancel()  # the job behind it is the head again: a new hold
        await trio.sleep(1)
        assert pool.status().held == held
        await trio.sleep(20)  # job 0 ended having spent nothing: its reservation is free
        assert pool.status().held is None and pool.queued() == []
        await pool.submit_nowait("work", {"n": 7, "cost": 0.6, "sleep": 0}).result()
        last = pool.submit_nowait("work", {"n": 8, "sleep": 0})
        await trio.sleep(1)
        assert pool.status().held == "budget: $1.02 of $1.00 spent, resets 00:00 UTC"
        assert await last.result() == 80  # at midnight
        holds = [e async for e in _until(stream, "budget.reset") if e.kind == "job.held"]
    assert [(e.path, e.reason) for e in holds] == [
        (f"root/jobs/{head.id}", "budget"),
        (f"root/jobs/{urgent.id}", "budget"),
        (f"root/jobs/{head.id}", "budget"),
        (f"root/jobs/{last.id}", "budget"),
    ]
    # when the hold began, job 1 had not reported its spend yet: its whole estimate was reserved
    assert holds[0].details == {
        "job_kind": "work",
        "detail": "budget: needs $0.10, $0.08 left ($0.92 reserved by running jobs), resets 00:00 UTC",
    }


async def test_a_queue_held_by_the_circuit_says_when_it_half_opens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    tree = tree_of(recorder, max_concurrency=2, circuit_breaker=otree.CircuitBreaker(failures=1, cooldown=5))
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        with pytest.raises(otree.JobFailed):
            await pool.submit_nowait("work", {"n": 0, "fail": True, "sleep": 0.8}).result()
        trial = pool.submit_nowait("work", {"n": 1, "sleep": 10})
        behind = pool.submit_nowait("work", {"n": 2, "sleep": 0})
        await trio.sleep(1.8)
        assert pool.status().held == "circuit open, half-open in 3.2 s"
        assert render_jobs(jobs_of(pool)).splitlines()[2].endswith("held: circuit open, half-open in 3.2 s")
        await trio.sleep(4)  # the trial runs: the job behind it is held by the half-open circuit
        assert trial.state == "running"
        assert pool.status().held == "circuit half-open, a trial job is running"
        assert await behind.result() == 20
        assert pool.status().held is None
        holds = [e async for e in _until(stream, "job.finished") if e.kind == "job.held"]
    assert [(e.path, e.reason) for e in holds] == [
        (f"root/jobs/{trial.id}", "circuit"),
        (f"root/jobs/{behind.id}", "circuit"),
    ]


# --- durability ----------------------------------------------------------------------------------


async def test_durable_pool_keeps_jobs_spend_and_dead_letters_across_restarts(tmp_path: Any) -> None:
    seen: list[int] = []
    gate = trio.Event()

    async def work(payload: dict[str, Any]) -> int:
        otree.current_child().report_cost(0.25)
        if payload.get("fail"):
            raise RuntimeError("no")
        if payload.get("block"):
            await gate.wait()
        seen.append(payload["n"])
        return int(payload["n"])

    def tree() -> otree.SupervisorSpec:
        pool = otree.pool("jobs", {"w": work}, max_concurrency=1, daily_budget=10.0, durable=True)
        return otree.supervisor("root", children=[pool])

    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        assert await pool.submit_nowait("w", {"n": 0}).result() == 0
        with pytest.raises(otree.JobFailed):
            await pool.submit_nowait("w", {"n": 9, "fail": True}).result()
        pool.submit_nowait("w", {"n": 1, "block": True})  # running when the tree stops
        pool.submit_nowait("w", {"n": 2}, priority=5, key="k")
        pool.submit_nowait("w", {"n": 3})
        await trio.testing.wait_all_tasks_blocked()
    database = tmp_path / "pools" / "root" / "jobs.sqlite3"
    assert oct(database.stat().st_mode & 0o777) == "0o600"
    gate.set()
    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        assert [letter.id for letter in pool.dead_letters()] == ["2"]
        await trio.testing.wait_all_tasks_blocked()  # everything recovered has run
        assert pool.submit_nowait("w", {"n": 2}, key="k").id == "6"  # the key is free again once done
        budget = sup.find("jobs")._pool().budget  # type: ignore[union-attr]
        assert budget.spent >= to_micros(0.75)  # the earlier run's spend is still today's
    assert seen[:4] == [0, 2, 1, 3]  # the interrupted job runs again, after the higher priority


def to_micros(usd: float) -> int:
    return round(usd * 1_000_000)


async def test_corrupt_pool_database_is_a_start_error_naming_the_file(tmp_path: Any) -> None:
    async def work(payload: Any) -> None:
        pass

    database = tmp_path / "pools" / "root" / "jobs.sqlite3"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"this is not a database" * 100)
    tree = otree.supervisor("root", children=[otree.pool("jobs", {"w": work}, durable=True)])
    with pytest.raises(otree.StartError, match=f"pool database {database}"):
        async with otree.open_supervisor(tree, state_dir=tmp_path):
            pass


KILL_TREE = """
import json, pathlib, trio, otree
log = pathlib.Path({log!r})

async def work(payload):
    with log.open("a") as out:
        out.write(json.dumps(payload) + "\\n")
    otree.current_child().report_cost(0.5)
    if payload.get("block"):
        await trio.sleep_forever()

tree = otree.supervisor("t", children=[otree.pool("jobs", {{"w": work}}, max_concurrency=1)])
"""


def test_kill_9_of_otree_run_loses_no_job_and_counts_no_spend_twice(tmp_path: Any) -> None:
    import subprocess
    import sys
    import time as systime

    log = tmp_path / "log.jsonl"
    state = tmp_path / "state"
    tree_file = tmp_path / "tree.py"
    tree_file.write_text(KILL_TREE.format(log=str(log)))

    async def submit_three() -> None:  # through the library, on the same state dir, before otree run
        async def idle(payload: Any) -> None:
            await trio.sleep_forever()

        tree = otree.supervisor("t", children=[otree.pool("jobs", {"w": idle}, max_concurrency=1)])
        async with otree.open_supervisor(tree, state_dir=state) as sup:
            pool = pool_of(sup)
            pool.submit_nowait("w", {"n": 1})  # starts (and is interrupted by this stop: put back)
            pool.submit_nowait("w", {"n": 2, "block": True})
            pool.submit_nowait("w", {"n": 3})

    trio.run(submit_three)
    proc = subprocess.Popen([sys.executable, "-m", "otree", "run", str(tree_file), "--state-dir", str(state)])
    try:
        deadline = systime.monotonic() + 20
        while systime.monotonic() < deadline and (not log.exists() or '"block"' not in log.read_text()):
            systime.sleep(0.02)
        assert '"block"' in log.read_text()
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert log.read_text().splitlines() == ['{"n": 1}', '{"n": 2, "block": true}']

    async def finish() -> tuple[list[Any], int]:
        done: list[Any] = []

        async def record(payload: Any) -> None:
            done.append(payload["n"])

        tree = otree.supervisor("t", children=[otree.pool("jobs", {"w": record}, max_concurrency=1)])
        async with otree.open_supervisor(tree, state_dir=state) as sup:
            await trio.testing.wait_all_tasks_blocked()
            handle = sup.find("jobs")
            return done, handle._pool().budget.spent  # type: ignore[union-attr]

    done, spent = trio.run(finish)
    assert done == [2, 3]  # the interrupted job again, then the queued one; job 1 not twice
    # job 1's spend and the spend job 2 reported before the kill (written through), each once
    assert spent == to_micros(1.0)


async def test_children_reach_their_supervisor_and_jobs_their_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    results: list[Any] = []

    async def work(payload: int) -> int:
        if payload < 3:  # a job can queue a follow-up on its own pool
            otree.current_child().supervisor.submit_nowait("w", payload + 1)
        return payload

    async def feeder() -> None:
        pool = otree.current_child().supervisor.child("jobs")
        results.append(await pool.submit_nowait("w", 0).result())
        await trio.sleep_forever()

    tree = otree.supervisor("root", children=[otree.pool("jobs", {"w": work}), otree.task("feeder", feeder)])
    async with otree.open_supervisor(tree) as sup:
        await trio.testing.wait_all_tasks_blocked()
        assert results == [0]
        assert pool_of(sup).queued() == []


async def test_process_job_gets_the_payload_on_stdin_and_returns_stdout(tmp_path: Any) -> None:
    import sys

    code = (
        "import json, os, socket, sys\n"
        "payload = json.load(sys.stdin)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'OTREE_COST=0.5', os.environ['NOTIFY_SOCKET'])\n"
        "if payload.get('fail'):\n"
        "    sys.stderr.write('tool crashed\\n'); sys.exit(3)\n"
        "print(json.dumps({'echo': payload['n'] * 2}))\n"
    )
    handler = otree.process_job([sys.executable, "-c", code])
    tree = otree.supervisor("root", children=[otree.pool("jobs", {"p": handler}, daily_budget=5.0)])
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        assert await pool.submit_nowait("p", {"n": 21}).result() == {"echo": 42}
        with pytest.raises(otree.JobFailed) as info:
            await pool.submit_nowait("p", {"n": 1, "fail": True}).result()
        assert str(info.value.__cause__) == "exit code 3: tool crashed"
        (letter,) = pool.dead_letters()
        assert letter.error == "exit code 3: tool crashed"  # the stderr tail is kept with the letter
        budget = sup.find("jobs")._pool().budget  # type: ignore[union-attr]
        assert budget.spent == to_micros(1.0)  # 0.5 from each run, reported over the notify socket


async def test_pool_budget_day_follows_budget_tz(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder()
    tree = tree_of(recorder, daily_budget=0.5, on_budget_exhausted="hold", budget_tz="America/New_York")
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        spend = pool.submit_nowait("work", {"n": 0, "cost": 0.5, "sleep": 0})
        held = pool.submit_nowait("work", {"n": 1, "sleep": 0})
        await spend.result()
        assert await held.result() == 10
        # 23:00 UTC is 18:00 in New York (EST): the budget day ends six hours later
        assert trio.current_time() == pytest.approx(6 * 3600)


async def test_an_in_memory_pool_that_stops_drops_its_jobs_with_one_event_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    tree = tree_of(recorder, max_attempts=3, backoff=otree.Backoff(initial=50.0, jitter=0.0))
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = sup.events()
        failing = pool.submit_nowait("work", {"n": 0, "fail": True, "sleep": 0}, priority=1)
        running, queued = (pool.submit_nowait("work", {"n": n, "sleep": 100}) for n in (1, 2))
        await trio.sleep(1)  # 0 failed and waits out its backoff; 1 runs; 2 waits in the queue
        was = {job.id: job.state for job in (failing, running, queued)}
        assert sorted(was.values()) == ["queued", "running", "waiting"]
        await sup.terminate_child("jobs")
        dropped = {e.path: e async for e in _until(stream, "child.stopped") if e.kind == "job.dropped"}
    for job in (failing, running, queued):
        with pytest.raises(otree.JobFailed, match=f"job {job.id}: dropped: pool_stopped"):
            await job.result()
        event = dropped.pop(f"root/jobs/{job.id}")
        assert (event.reason, event.details) == ("pool_stopped", {"job_kind": "work", "state": was[job.id]})
    assert dropped == {}


async def test_a_durable_pool_that_stops_keeps_its_jobs_and_drops_none(
    tmp_path: Any, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = Recorder()
    tree = tree_of(recorder, durable=True, max_attempts=3, backoff=otree.Backoff(initial=50.0, jitter=0.0))
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        stream = sup.events()
        failing = pool.submit_nowait("work", {"n": 0, "fail": True, "sleep": 0}, priority=1)
        others = [pool.submit_nowait("work", {"n": n, "sleep": 100}) for n in (1, 2)]
        await trio.sleep(0.5)
        await sup.terminate_child("jobs")
        kinds = [e.kind async for e in _until(stream, "child.stopped")]
    assert "job.dropped" not in kinds
    for job in (failing, *others):
        with pytest.raises(otree.JobFailed, match="interrupted: the pool stopped; it runs again"):
            await job.result()
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        status = pool_of(sup).status()
        assert status.queued + status.retrying + status.running == 3


async def test_stored_job_of_a_kind_the_tree_dropped_is_dead_lettered(tmp_path: Any) -> None:
    async def block(payload: Any) -> None:
        await trio.sleep_forever()

    async def other(payload: Any) -> None:
        pass

    first = otree.supervisor("root", children=[otree.pool("jobs", {"a": block, "b": other}, durable=True)])
    async with otree.open_supervisor(first, state_dir=tmp_path) as sup:
        pool_of(sup).submit_nowait("b", 0)
        pool_of(sup).submit_nowait("a", 1)
        await trio.testing.wait_all_tasks_blocked()
    second = otree.supervisor("root", children=[otree.pool("jobs", {"b": other}, durable=True)])
    with trio.fail_after(5):
        async with otree.open_supervisor(second, state_dir=tmp_path) as sup:
            await trio.testing.wait_all_tasks_blocked()
            (letter,) = pool_of(sup).dead_letters()
            assert (letter.kind, letter.error) == ("a", "unknown job kind 'a'")


async def test_a_job_interrupted_three_times_is_dead_lettered_at_start(tmp_path: Any) -> None:
    import sqlite3

    async def hang(payload: Any) -> None:
        await trio.sleep_forever()

    def tree() -> otree.SupervisorSpec:
        return otree.supervisor("root", children=[otree.pool("jobs", {"h": hang}, durable=True)])

    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        job = pool_of(sup).submit_nowait("h", {"n": 1})
        await trio.testing.wait_all_tasks_blocked()
    # as if otree had been killed mid-job, for the third time
    with sqlite3.connect(tmp_path / "pools" / "root" / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET running = 1, interruptions = 2 WHERE id = ?", (int(job.id),))
    db.close()
    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        (letter,) = pool_of(sup).dead_letters()
        assert (letter.id, letter.payload) == (job.id, {"n": 1})
        assert letter.error == "interrupted 3 times (it may be what kills otree)"
        assert pool_of(sup).queued() == []
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert {
        "path": f"root/jobs/{job.id}",
        "kind": "job.dead_lettered",
        "reason": "interrupted",
    }.items() <= next(e for e in events if e["kind"] == "job.dead_lettered").items()


async def test_an_interruption_gives_its_attempt_back(tmp_path: Any) -> None:
    gate = trio.Event()
    tries: list[int] = []

    async def flaky(payload: Any) -> None:
        if not gate.is_set():
            await trio.sleep_forever()  # the first run is interrupted by the stop
        tries.append(1)
        raise RuntimeError("down")

    def tree() -> otree.SupervisorSpec:
        pool = otree.pool("jobs", {"f": flaky}, max_attempts=2, durable=True)
        return otree.supervisor("root", children=[pool])

    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool_of(sup).submit_nowait("f", None, estimated_cost=0.25)
        await trio.testing.wait_all_tasks_blocked()
    gate.set()
    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        await trio.testing.wait_all_tasks_blocked()
        assert len(tries) == 2  # both tries after the restart: the interrupted one did not count
        (letter,) = pool_of(sup).dead_letters()
        assert (letter.attempts, letter.estimated_cost) == (2, 0.25)
        again = await pool_of(sup).requeue(letter.id)
        assert again.estimate == 250_000  # the estimate comes back with it


async def test_a_queued_job_whose_kind_a_reload_removed_does_not_take_the_circuits_trial(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def fails(payload: Any) -> None:
        raise RuntimeError("down")

    async def works(payload: Any) -> str:
        return "ok"

    breaker = otree.CircuitBreaker(failures=1, cooldown=10.0)
    spec = otree.pool("jobs", {"a": fails, "b": works}, circuit_breaker=breaker)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        pool = pool_of(sup)
        with pytest.raises(otree.JobFailed):
            await pool.submit_nowait("a", 1).result()  # opens the circuit
        stranded = pool.submit_nowait("a", 2)  # held by the open circuit
        pool._pool().reconfigure(otree.pool("jobs", {"b": works}, circuit_breaker=breaker))
        with pytest.raises(otree.JobFailed):
            await stranded.result()  # dead-lettered: its kind is gone
        assert await pool.submit_nowait("b", 3).result() == "ok"  # the trial is still there for it


async def test_the_midnight_reset_is_not_delayed_by_a_later_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    tree = tree_of(
        recorder,
        daily_budget=1.0,
        budget_tz="UTC",
        max_attempts=2,
        backoff=otree.Backoff(initial=7200.0, jitter=0.0),
    )
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        await pool.submit_nowait("work", {"n": 0, "cost": 0.3}).result()
        pool.submit_nowait("work", {"n": 1, "fail": True})  # fails, retries in two hours
        [e async for e in _until(stream, "budget.reset")]
        assert trio.current_time() == pytest.approx(3600)  # midnight UTC, not the retry at ~7200


async def test_a_job_that_finishes_while_its_pool_stops_is_done_not_run_again(
    tmp_path: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """Its handler returned before the stop reached it: finished (result kept, out of the store)."""
    runs: list[int] = []

    async def finish_on_stop(payload: Any) -> str:
        runs.append(payload)
        await otree.current_child().stopping.wait()  # the stop is heard: the work is wrapped up
        return f"done {payload}"

    tree = otree.supervisor("root", children=[otree.pool("jobs", {"w": finish_on_stop}, durable=True)])
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        stream = sup.events()
        job = pool_of(sup).submit_nowait("w", 1)
        await trio.sleep(1)
        await sup.terminate_child("jobs")
        kinds = [e.kind async for e in _until(stream, "child.stopped") if e.path == f"root/jobs/{job.id}"]
    assert await job.result() == "done 1"
    assert kinds[-1] == "job.finished"
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        await trio.sleep(1)
        status = pool_of(sup).status()
        assert status.queued + status.retrying + status.running == 0
    assert runs == [1]  # not run again after the restart


# --- queue policies --------------------------------------------------------------------------------


async def test_drop_oldest_drops_the_job_that_waited_longest_never_a_running_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A full queue under ``on_full="drop_oldest"`` drops the jobs submitted first that are still
    waiting (a retry waiting out its backoff included), whatever their priority; submit raises
    nothing; the running job is left alone."""
    recorder = Recorder()
    backoff = otree.Backoff(initial=50.0, jitter=0.0)
    tree = tree_of(recorder, max_queue=3, on_full="drop_oldest", max_attempts=2, backoff=backoff)
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        retrying = pool.submit_nowait("work", {"n": 0, "fail": True, "sleep": 0}, priority=9)
        await trio.sleep(0.5)  # it failed: it waits out its backoff until t=50
        running = pool.submit_nowait("work", {"n": 1, "sleep": 100})
        await trio.testing.wait_all_tasks_blocked()
        queued = [pool.submit_nowait("work", {"n": n}) for n in (2, 3)]
        assert (retrying.state, running.state) == ("waiting", "running")
        newer = [pool.submit_nowait("work", {"n": 4}, priority=5), await pool.submit("work", {"n": 5})]
        assert retrying.state == queued[0].state == "dropped"
        assert [job.id for job in pool.queued()] == [newer[0].id, queued[1].id, newer[1].id]
        status = pool.status()
        assert (status.queued, status.retrying, status.running) == (3, 0, 1)
        for job in (retrying, queued[0]):
            with pytest.raises(otree.JobFailed, match=f"job {job.id}: dropped: queue_full"):
                await job.result()
        assert [await job.result() for job in (running, queued[1], *newer)] == [10, 30, 40, 50]
        dropped = [e async for e in _until(stream, "job.finished") if e.kind == "job.dropped"]
    assert trio.current_time() > 50  # the dropped retry's time came and went: it did not run again
    assert recorder.started == [0, 1, 4, 3, 5]
    assert [(e.path, e.reason, e.details) for e in dropped] == [
        (f"root/jobs/{retrying.id}", "queue_full", {"job_kind": "work", "state": "waiting"}),
        (f"root/jobs/{queued[0].id}", "queue_full", {"job_kind": "work", "state": "queued"}),
    ]


async def test_drop_oldest_refuses_nothing_else_and_drops_nothing_for_a_refused_submission(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()

    def spec(on_full: Literal["reject", "drop_oldest"]) -> otree.PoolSpec:
        return otree.pool(
            "jobs", {"work": recorder.work}, max_queue=1, on_full=on_full, daily_budget=1.0, now=clock
        )

    async with otree.open_supervisor(otree.supervisor("root", children=[spec("drop_oldest")])) as sup:
        pool = pool_of(sup)
        running = pool.submit_nowait("work", {"n": 0, "sleep": 10})
        await trio.testing.wait_all_tasks_blocked()
        waiting = pool.submit_nowait("work", {"n": 1})
        with pytest.raises(otree.BudgetExceeded):
            pool.submit_nowait("work", {"n": 2}, estimated_cost=2.0)
        assert (running.state, waiting.state) == ("running", "queued")  # the refused one made no room
        pool._pool().reconfigure(spec("reject"))  # a reload: a full queue refuses again
        with pytest.raises(otree.QueueFull):
            pool.submit_nowait("work", {"n": 3})
        assert waiting.state == "queued"
        pool._pool().reconfigure(spec("drop_oldest"))  # and back: the jobs queued meanwhile are known
        newest = pool.submit_nowait("work", {"n": 4})
        assert (waiting.state, newest.state) == ("dropped", "queued")
        assert await newest.result() == 40


async def test_drop_oldest_in_a_durable_pool_removes_the_dropped_job_from_the_store(tmp_path: Any) -> None:
    async def idle(payload: Any) -> None:
        await trio.sleep_forever()

    def tree() -> otree.SupervisorSpec:
        pool = otree.pool("jobs", {"w": idle}, max_queue=2, on_full="drop_oldest", durable=True)
        return otree.supervisor("root", children=[pool])

    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        jobs = [pool.submit_nowait("w", 0)]
        await trio.testing.wait_all_tasks_blocked()
        jobs += [pool.submit_nowait("w", n) for n in range(1, 4)]  # 0 runs; 1 is dropped for 3
        assert [job.state for job in jobs] == ["running", "dropped", "queued", "queued"]
    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        await trio.testing.wait_all_tasks_blocked()
        assert [info.id for info in pool.which_children()] == [jobs[0].id]  # interrupted: runs again
        assert [job.payload for job in pool.queued()] == [2, 3]


async def test_replace_gives_a_queued_jobs_place_to_the_new_payload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``on_duplicate_key="replace"``: the queued job's handle is dropped (reason ``replaced``);
    the new submission is a new job, with its own id and payload, in the old one's place and
    priority class."""
    recorder = Recorder()
    tree = tree_of(recorder, on_duplicate_key="replace")
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        pool.submit_nowait("work", {"n": 0, "sleep": 10})
        await trio.testing.wait_all_tasks_blocked()
        old = pool.submit_nowait("work", {"n": 1}, key="k")
        behind = pool.submit_nowait("work", {"n": 2})
        new = pool.submit_nowait("work", {"n": 3}, key="k", priority=7)
        assert (new.id, new.key, new.priority, new.state) == ("4", "k", 0, "queued")
        assert [job.id for job in pool.queued()] == [new.id, behind.id]
        assert pool.submit_nowait("work", {"n": 3}, key="k") is not new  # each submission replaces
        newest = pool.queued()[0]
        with pytest.raises(otree.JobFailed, match=f"job {old.id}: dropped: replaced"):
            await old.result()
        assert await newest.result() == 30
        assert await behind.result() == 20
        events = [e async for e in _until(stream, "job.finished") if e.kind in ("job.dropped", "job.queued")]
    assert recorder.started == [0, 3, 2]

    def replaced(old: otree.Job, new: otree.Job) -> list[tuple[str, str, str, dict[str, Any]]]:
        return [
            (
                "job.dropped",
                f"root/jobs/{old.id}",
                "replaced",
                {"job_kind": "work", "state": "queued", "replaced_by": new.id},
            ),
            (
                "job.queued",
                f"root/jobs/{new.id}",
                "replacing",
                {"job_kind": "work", "priority": 0, "replaces": old.id},
            ),
        ]

    assert [(e.kind, e.path, e.reason, e.details) for e in events[3:]] == replaced(old, new) + replaced(
        new, newest
    )


async def test_replace_leaves_a_running_job_alone_and_queues_behind_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder, on_duplicate_key="replace")) as sup:
        pool = pool_of(sup)
        running = pool.submit_nowait("work", {"n": 1, "sleep": 5}, key="k")
        await trio.testing.wait_all_tasks_blocked()
        behind = pool.submit_nowait("work", {"n": 2}, key="k")
        assert (running.state, behind.state) == ("running", "queued")
        last = pool.submit_nowait("work", {"n": 3}, key="k")  # replaces the queued one, not the running one
        assert behind.state == "dropped" and running.state == "running"
        assert [await running.result(), await last.result()] == [10, 30]
    assert recorder.started == [1, 3]


async def test_replace_of_a_job_waiting_for_its_retry_takes_its_retry_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    backoff = otree.Backoff(initial=10.0, jitter=0.0)
    tree = tree_of(recorder, on_duplicate_key="replace", max_attempts=3, backoff=backoff)
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        failing = pool.submit_nowait("work", {"n": 1, "fail": True, "sleep": 0}, key="k")
        await trio.sleep(1)
        assert failing.state == "waiting"
        fixed = pool.submit_nowait("work", {"n": 2, "sleep": 0}, key="k")
        assert (fixed.state, fixed.attempts) == ("waiting", 0)
        assert (pool.status().queued, pool.status().retrying) == (0, 1)
        assert await fixed.result() == 20
        assert trio.current_time() == pytest.approx(10.0)  # when the replaced retry was due
        assert fixed.attempts == 1
        with pytest.raises(otree.JobFailed, match="dropped: replaced"):
            await failing.result()
    assert recorder.started == [1, 2]


async def test_a_durable_replacement_keeps_its_place_across_a_restart(tmp_path: Any) -> None:
    async def idle(payload: Any) -> None:
        await trio.sleep_forever()

    def tree() -> otree.SupervisorSpec:
        pool = otree.pool("jobs", {"w": idle}, on_duplicate_key="replace", durable=True)
        return otree.supervisor("root", children=[pool])

    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        pool.submit_nowait("w", "blocker")
        await trio.testing.wait_all_tasks_blocked()
        pool.submit_nowait("w", "first", key="k")
        pool.submit_nowait("w", "second")
        new = pool.submit_nowait("w", "first, again", key="k")
        assert [job.payload for job in pool.queued()] == ["first, again", "second"]
    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        await trio.testing.wait_all_tasks_blocked()
        assert [(job.id, job.payload) for job in pool.queued()] == [(new.id, "first, again"), ("3", "second")]
        assert pool.submit_nowait("w", "third", key="k").payload == "third"  # the key survived too
        assert [job.payload for job in pool.queued()] == ["third", "second"]


async def test_on_circuit_open_reject_refuses_submissions_while_the_circuit_is_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    breaker = otree.CircuitBreaker(failures=1, cooldown=30.0)
    tree = tree_of(recorder, circuit_breaker=breaker, on_circuit_open="reject")
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        with pytest.raises(otree.JobFailed):
            await pool.submit_nowait("work", {"n": 0, "fail": True, "sleep": 0}).result()
        await trio.sleep(10)
        with pytest.raises(otree.CircuitOpen, match=r"root/jobs: circuit open, half-open in 20\.0 s") as info:
            await pool.submit("work", {"n": 1})
        assert info.value.half_open_in == pytest.approx(20.0)
        assert pool.queued() == []
        await trio.sleep(20)  # the cooldown is over: the next submission is the trial
        trial = pool.submit_nowait("work", {"n": 2, "sleep": 5})
        await trio.sleep(1)
        assert pool.status().circuit == "half_open"
        assert pool.submit_nowait("work", {"n": 3}).state == "queued"  # half-open: it waits for the trial
        assert await trial.result() == 20
        rejected = [e async for e in _until(stream, "circuit.closed") if e.kind == "job.rejected"]
    assert [(e.path, e.reason, e.details) for e in rejected] == [
        ("root/jobs", "circuit", {"job_kind": "work"})
    ]


async def test_refuse_dead_keys_refuses_a_dead_key_until_it_is_cleared_or_requeued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder, refuse_dead_keys=True)) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        with pytest.raises(otree.JobFailed):
            await pool.submit_nowait("work", {"n": 0, "fail": True, "sleep": 0}, key="order-7").result()
        (letter,) = pool.dead_letters()
        assert letter.key == "order-7"
        with pytest.raises(
            otree.DeadLettered, match=f"key 'order-7' is dead-lettered \\(dead letter {letter.id}\\)"
        ):
            pool.submit_nowait("work", {"n": 1}, key="order-7")
        assert pool.submit_nowait("work", {"n": 2, "sleep": 0}, key="order-8").state == "queued"
        assert pool.clear_dead_letter(letter.id) == letter
        assert pool.dead_letters() == []
        with pytest.raises(
            otree.NotFound, match=f"root/jobs: no dead letter {letter.id} \\(dead letters: none\\)"
        ):
            pool.clear_dead_letter(letter.id)
        with pytest.raises(otree.JobFailed):  # the key is free again: it dies again
            await pool.submit_nowait("work", {"n": 3, "fail": True, "sleep": 0}, key="order-7").result()
        (letter,) = pool.dead_letters()
        with pytest.raises(otree.DeadLettered):
            pool.submit_nowait("work", {"n": 4}, key="order-7")
        await pool.requeue(letter.id)  # requeued without its key: the key is free again
        assert await pool.submit_nowait("work", {"n": 5, "sleep": 0}, key="order-7").result() == 50
        events = [
            e
            async for e in _until(stream, "job.finished")
            if e.kind in ("job.rejected", "dead_letter.cleared")
        ]
    assert [(e.kind, e.reason, e.details) for e in events[:2]] == [
        ("job.rejected", "dead_key", {"job_kind": "work", "dead_letter": "1"}),
        ("dead_letter.cleared", "", {"job_kind": "work"}),
    ]
    assert events[1].path == "root/jobs/1"


async def test_without_refuse_dead_keys_a_dead_key_is_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder)) as sup:
        pool = pool_of(sup)
        with pytest.raises(otree.JobFailed):
            await pool.submit_nowait("work", {"n": 0, "fail": True, "sleep": 0}, key="k").result()
        assert await pool.submit_nowait("work", {"n": 1, "sleep": 0}, key="k").result() == 10


async def test_a_durable_pool_refuses_a_dead_key_after_a_restart(tmp_path: Any) -> None:
    async def fails(payload: Any) -> None:
        raise RuntimeError("poison")

    def tree() -> otree.SupervisorSpec:
        pool = otree.pool("jobs", {"f": fails}, refuse_dead_keys=True, durable=True)
        return otree.supervisor("root", children=[pool])

    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        with pytest.raises(otree.JobFailed):
            await pool_of(sup).submit_nowait("f", key="poison-1").result()
    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        assert [letter.key for letter in pool.dead_letters()] == ["poison-1"]
        with pytest.raises(otree.DeadLettered):
            pool.submit_nowait("f", key="poison-1")
        pool.clear_dead_letter("1")
    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        assert pool.dead_letters() == []  # cleared for good
        assert pool.submit_nowait("f", key="poison-1").key == "poison-1"


async def test_max_starts_per_second_spaces_the_starts_one_per_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def note(payload: Any) -> None:
        starts.append(trio.current_time())

    spec = otree.pool("jobs", {"n": note}, max_concurrency=10, max_starts_per_second=2)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec])) as sup:
        pool = pool_of(sup)
        t0 = trio.current_time()
        jobs = [pool.submit_nowait("n", n) for n in range(5)]
        for job in jobs:
            await job.result()
        await trio.sleep(10)  # the bucket refills, but holds one token: no burst after a pause
        more = [pool.submit_nowait("n", n) for n in range(2)]
        for job in more:
            await job.result()
    assert [round(t - t0, 6) for t in starts] == [0.0, 0.5, 1.0, 1.5, 2.0, 12.0, 12.5]


async def test_budget_rule_lt_refuses_an_estimate_that_would_reach_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder, daily_budget=1.0, budget_rule="lt")) as sup:
        pool = pool_of(sup)
        with pytest.raises(otree.BudgetExceeded):
            pool.submit_nowait("work", {"n": 0}, estimated_cost=1.0)
        assert await pool.submit_nowait("work", {"n": 1, "sleep": 0}, estimated_cost=0.99).result() == 10
    async with otree.open_supervisor(tree_of(recorder, daily_budget=1.0)) as sup:  # "le": equal is allowed
        assert (
            await pool_of(sup).submit_nowait("work", {"n": 2, "sleep": 0}, estimated_cost=1.0).result() == 20
        )


async def test_a_pool_retries_on_an_explicit_backoff_schedule(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder()
    tree = tree_of(recorder, max_attempts=5, backoff=otree.Backoff.schedule([0, 30, 120]))
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        with pytest.raises(otree.JobFailed, match="dead-lettered after 5 attempts"):
            await pool.submit_nowait("work", {"n": 0, "fail": True, "sleep": 0}).result()
        delays = [
            e.details["delay"] async for e in _until(stream, "job.dead_lettered") if e.kind == "job.retried"
        ]
    assert delays == [0, 30, 120, 120]
    assert trio.current_time() == pytest.approx(270)


def test_otree_submit_refused_by_a_queue_policy_is_one_line_and_exit_4(tmp_path: Any) -> None:
    """``CircuitOpen`` and ``DeadLettered`` through ``otree run``'s control socket: one
    ``otree: ...`` line each, exit 4."""
    from .otree_subprocess import is_text_event, otree_process, run_otree, write_tree

    file = write_tree(
        tmp_path,
        "import otree\n\n\nasync def fail(payload):\n    raise RuntimeError('nope')\n\n\n"
        "tree = otree.supervisor('fleet', children=[otree.pool('jobs', {'fail': fail}, "
        "circuit_breaker=otree.CircuitBreaker(failures=1, cooldown=600), on_circuit_open='reject', "
        "refuse_dead_keys=True)])\n",
    )
    with otree_process(["run", str(file)], tmp_path) as tree:
        tree.wait_for(is_text_event("fleet", "control.listening"))
        assert run_otree(["submit", "jobs", "fail", "--key", "k"], tmp_path).returncode == 0
        tree.wait_for(is_text_event("fleet/jobs", "circuit.opened"))
        refused = run_otree(["submit", "jobs", "fail"], tmp_path)
        assert refused.returncode == 4
        assert refused.stderr.startswith("otree: fleet/jobs: circuit open, half-open in 59")
        assert refused.stderr.count("\n") == 1
        refused = run_otree(["submit", "jobs", "fail", "--key", "k"], tmp_path)
        assert (refused.returncode, refused.stderr) == (
            4,
            "otree: fleet/jobs: key 'k' is dead-lettered (dead letter 1); requeue or clear it first\n",
        )


OLD_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload BLOB NOT NULL,
    priority INTEGER NOT NULL, estimate INTEGER NOT NULL, key TEXT, attempts INTEGER NOT NULL,
    interruptions INTEGER NOT NULL, running INTEGER NOT NULL, submitted_at REAL NOT NULL);
CREATE TABLE dead (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload BLOB NOT NULL, priority INTEGER NOT NULL,
    estimate INTEGER NOT NULL, attempts INTEGER NOT NULL, error TEXT NOT NULL,
    submitted_at REAL NOT NULL, failed_at REAL NOT NULL);
CREATE TABLE ledger (day TEXT NOT NULL, job INTEGER NOT NULL, micros INTEGER NOT NULL);
INSERT INTO jobs VALUES (1, 'w', '"queued before"', 0, 0, 'k', 0, 0, 0, 1.0);
INSERT INTO dead VALUES (2, 'w', '"died before"', 0, 0, 1, 'RuntimeError: no', 1.0, 2.0);
"""


async def test_a_pool_database_from_before_the_queue_policies_is_upgraded_at_open(tmp_path: Any) -> None:
    """A database written before ``jobs.place`` and ``dead.key`` existed gets both columns: its
    queued job and its dead letter come back, and replacing and burying work on it."""
    import sqlite3

    database = tmp_path / "pools" / "root" / "jobs.sqlite3"
    database.parent.mkdir(parents=True)
    with sqlite3.connect(database) as db:
        db.executescript(OLD_SCHEMA)
    gate = trio.Event()

    async def work(payload: Any) -> Any:
        await gate.wait()
        if payload == "fail":
            raise RuntimeError("no")
        return payload

    spec = otree.pool("jobs", {"w": work}, durable=True, on_duplicate_key="replace", max_concurrency=1)
    async with otree.open_supervisor(otree.supervisor("root", children=[spec]), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        (letter,) = pool.dead_letters()
        assert (letter.id, letter.payload, letter.key) == ("2", "died before", None)
        await trio.testing.wait_all_tasks_blocked()
        assert [info.id for info in pool.which_children()] == ["1"]
        queued = pool.submit_nowait("w", "queued after", key="q")
        replacement = pool.submit_nowait("w", "fail", key="q")
        assert queued.state == "dropped" and replacement.state == "queued"
        gate.set()
        with pytest.raises(otree.JobFailed):
            await replacement.result()
        assert [letter.key for letter in pool.dead_letters()] == [None, "q"]


async def test_cancel_is_one_job_cancelled_event_neither_a_failure_nor_a_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    breaker = otree.CircuitBreaker(failures=1, cooldown=60.0)
    tree = tree_of(recorder, max_concurrency=1, max_attempts=3, circuit_breaker=breaker)
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = sup.events()
        running = pool.submit_nowait("work", {"n": 1, "sleep": 100})
        queued = pool.submit_nowait("work", {"n": 2, "sleep": 0})
        await trio.sleep(1)
        assert (running.state, queued.state) == ("running", "queued")
        assert (await pool.cancel("2")) is queued
        assert (await pool.cancel("1")) is running
        assert trio.current_time() < 2  # a task that never looks at stopping is cancelled at once
        for job in (running, queued):
            with pytest.raises(otree.JobFailed, match="cancelled"):
                await job.result()
        assert running.attempts == 1 and pool.dead_letters() == []
        assert sup.find("jobs")._pool().circuit.state == "closed"  # type: ignore[union-attr]
        after = pool.submit_nowait("work", {"n": 3, "sleep": 0})
        assert await after.result() == 30  # the circuit did not open: a cancel is not a failure
        events = [e async for e in _until(stream, "job.finished")]
        cancelled = {e.path: e.details["state"] for e in events if e.kind == "job.cancelled"}
        assert cancelled == {"root/jobs/2": "queued", "root/jobs/1": "running"}
        assert not [e for e in events if e.kind in ("job.retried", "job.dead_lettered", "circuit.open")]
        running.cancel()  # a finished job: nothing happens
        assert running.state == "cancelled"


async def test_a_cancelled_job_of_a_durable_pool_is_gone_from_its_store(tmp_path: Any) -> None:
    gate = trio.Event()

    async def wait(payload: Any) -> None:
        await gate.wait()

    tree = otree.supervisor(
        "root", children=[otree.pool("jobs", {"w": wait}, durable=True, max_concurrency=1)]
    )
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        pool.submit_nowait("w")
        pool.submit_nowait("w")
        pool.submit_nowait("w")
        await trio.testing.wait_all_tasks_blocked()
        await pool.cancel("1")  # running
        await pool.cancel("3")  # queued
        await trio.testing.wait_all_tasks_blocked()
        assert [info.id for info in pool.which_children()] == ["2"]
        await sup.terminate_child("jobs")
        await sup.restart_child("jobs")
        await trio.testing.wait_all_tasks_blocked()
        again = pool_of(sup)
        # only the job not cancelled came back (and runs again)
        assert ([info.id for info in again.which_children()], again.queued()) == (["2"], [])
        gate.set()


async def test_a_pool_remembers_its_last_finished_jobs_with_how_they_ended(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from otree import _pool
    from otree._render import render_job
    from otree._status import job_of

    monkeypatch.setattr(_pool, "HISTORY", 3)
    recorder = Recorder()
    async with otree.open_supervisor(tree_of(recorder, max_concurrency=1)) as sup:
        pool = pool_of(sup)
        jobs = [pool.submit_nowait("work", {"n": n, "sleep": 1, "cost": 0.25}) for n in range(4)]
        failing = pool.submit_nowait("work", {"n": 4, "sleep": 0, "fail": True})
        waiting = pool.submit_nowait("work", {"n": 5, "sleep": 10})
        for job in jobs:
            await job.result()
        with pytest.raises(otree.JobFailed):
            await failing.result()
        await trio.testing.wait_all_tasks_blocked()
        assert job_of(pool, "6").state == "running"  # a live job too
        with pytest.raises(otree.NotFound) as missing:
            pool.job("2")  # the oldest finished ones are forgotten
        assert str(missing.value) == (
            "root/jobs: no job 2 (jobs: 1 running, 0 queued, 0 retrying, 3 recent finished)"
        )
        done = job_of(pool, "4")
        assert (done.state, done.result, done.error, done.attempts, done.cost) == ("done", 30, None, 1, 0.25)
        assert done.started_at is not None and done.ended_at is not None
        dead = job_of(pool, "5")
        assert (dead.state, dead.result) == ("dead", None)
        assert dead.error == "dead-lettered after 1 attempt: RuntimeError: job 4 failed"
        text = render_job(dead)
        assert text.splitlines()[0].split()[:3] == ["5", "work", "dead"]
        assert text.splitlines()[-1] == "error: dead-lettered after 1 attempt: RuntimeError: job 4 failed"
        assert render_job(done).splitlines()[-1] == "result: 30"
        waiting.cancel()


async def test_a_running_process_job_shows_its_pid_and_a_cancel_stops_its_group(tmp_path: Any) -> None:
    import os
    import sys

    from otree._status import job_of

    code = "import sys, time\nsys.stdin.read()\nprint('up', flush=True)\ntime.sleep(60)\n"
    handler = otree.process_job([sys.executable, "-c", code], shutdown=5.0)
    tree = otree.supervisor("root", children=[otree.pool("jobs", {"p": handler})])
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        job = pool.submit_nowait("p", {})
        pid = None
        try:
            with trio.fail_after(10):
                while job.pid is None:
                    await trio.sleep(0.01)
            pid = job.pid
            assert os.getpgid(pid) == pid  # the leader of its own group
            assert [info.pid for info in pool.which_children()] == [pid]
            assert [info.pid for info in jobs_of(pool).running] == [pid]
            assert f" pid {pid} " in render_jobs(jobs_of(pool))
            assert job_of(pool, job.id).pid == pid
            await pool.cancel(job.id)
            assert job.state == "cancelled" and job.pid is None
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)  # the whole group is gone
        finally:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, 9)


async def test_a_durable_pool_keeps_a_jobs_own_max_runtime_across_a_restart(
    tmp_path: Any, autojump_clock: trio.testing.MockClock
) -> None:
    gate = trio.Event()

    async def work(payload: dict[str, Any]) -> str:
        if payload.get("block"):
            await gate.wait()
        await trio.sleep(payload.get("sleep", 0))
        return "done"

    def tree() -> otree.SupervisorSpec:
        pool = otree.pool("jobs", {"w": work}, max_concurrency=1, max_attempts=1, durable=True)
        return otree.supervisor("root", children=[pool])

    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        pool.submit_nowait("w", {"block": True})  # holds the only slot: the next one stays queued
        limited = pool.submit_nowait("w", {"sleep": 100}, max_runtime=5)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.job(limited.id).state == "queued"
    gate.set()
    async with otree.open_supervisor(tree(), state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        recovered = pool.job(limited.id)
        assert recovered.max_runtime == 5
        started = trio.current_time()
        with pytest.raises(otree.JobFailed) as failed:
            await recovered.result()
        assert isinstance(failed.value.__cause__, TimeoutError)
        assert trio.current_time() - started == 5.0
        assert [letter.error for letter in pool.dead_letters()] == ["max_runtime"]


def test_an_older_pool_database_gains_the_max_runtime_and_lane_columns_when_opened(tmp_path: Any) -> None:
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload BLOB NOT NULL, "
        "priority INTEGER NOT NULL, estimate INTEGER NOT NULL, key TEXT, attempts INTEGER NOT NULL, "
        "interruptions INTEGER NOT NULL, running INTEGER NOT NULL, submitted_at REAL NOT NULL, "
        "place INTEGER);"
        "CREATE TABLE dead (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload BLOB NOT NULL, "
        "priority INTEGER NOT NULL, estimate INTEGER NOT NULL, attempts INTEGER NOT NULL, "
        "error TEXT NOT NULL, submitted_at REAL NOT NULL, failed_at REAL NOT NULL);"
        "INSERT INTO jobs (kind, payload, priority, estimate, key, attempts, interruptions, running, "
        "submitted_at) VALUES ('w', '1', 0, 0, NULL, 0, 0, 0, 1.0);"
    )
    old.commit()
    old.close()
    store = Store(path)
    try:
        added = store.add(
            "w", b"2", priority=0, estimate=0, key=None, at=2.0, max_runtime=30.0, lane="agent-7"
        )
        queued, _ = store.recover()
        assert [(job.id, job.max_runtime, job.lane) for job in queued] == [
            (1, None, None),
            (added, 30.0, "agent-7"),
        ]
        store.started(added)
        store.bury(added, "boom", 3.0)  # a dead letter keeps its lane (a requeue goes back to it)
        assert store.dead_letters()[0][-2:] == (None, "agent-7")
    finally:
        store.close()


async def test_a_job_reaches_its_pools_siblings_through_parent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``current_child().supervisor`` of a job is its pool; the pool's ``parent`` is the supervisor
    holding it (the root's parent is None), so a job can wake or look up a sibling."""

    async def look(payload: Any) -> Any:
        pool = otree.current_child().supervisor
        assert isinstance(pool, otree.PoolHandle) and pool.parent is not None
        return [child.id for child in pool.parent.child("team").which_children()], pool.parent

    tree = otree.supervisor(
        "root",
        children=[
            otree.supervisor("team", children=[otree.task("worker", trio.sleep_forever)]),
            otree.pool("jobs", {"look": look}),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        job = await sup.child("jobs").submit("look")
        siblings, holder = await job.result()
        assert siblings == ["worker"]
        assert holder.path == "root" and holder.parent is None


async def test_a_jobs_task_runs_the_next_jobs_each_as_its_own_child_in_a_fresh_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A job's task runs on with the next job (no task per job), and each job still has its own
    run (``current_child()``: its path, its pool) and a fresh context: a ContextVar a job set is
    not seen by the job after it in the same task."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="fresh")
    seen: list[tuple[trio.lowlevel.Task, str, str]] = []

    async def work(payload: int) -> int:
        me = otree.current_child()
        assert isinstance(me.supervisor, otree.PoolHandle) and me.supervisor.path == "root/jobs"
        seen.append((trio.lowlevel.current_task(), me.path, var.get()))
        var.set(f"set by job {payload}")
        if payload % 3 == 0:
            await trio.sleep(0.1)
        return payload

    tree = otree.supervisor("root", children=[otree.pool("jobs", {"work": work}, max_concurrency=4)])
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        jobs = [pool.submit_nowait("work", n) for n in range(200)]
        assert [await job.result() for job in jobs] == list(range(200))
    assert sorted(path for _, path, _ in seen) == sorted(f"root/jobs/{job.id}" for job in jobs)
    assert {value for _, _, value in seen} == {"fresh"}
    assert len({task for task, _, _ in seen}) <= 8  # 200 jobs, 4 at once: the tasks ran many each


async def test_a_job_with_a_time_limit_never_runs_in_the_task_of_a_job_without_and_vice_versa(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A task's watchers of ``max_runtime`` are its first run's: a job with a limit after one without
    is still stopped at its limit, and a job without one after one with it is not stopped at it."""

    async def nap(seconds: float) -> float:
        await trio.sleep(seconds)
        return seconds

    tree = otree.supervisor("root", children=[otree.pool("jobs", {"nap": nap}, max_concurrency=1)])
    with trio.fail_after(100):
        async with otree.open_supervisor(tree) as sup:
            pool = pool_of(sup)
            quick = pool.submit_nowait("nap", 0.5)
            limited = pool.submit_nowait("nap", 50.0, max_runtime=1.0)
            after = pool.submit_nowait("nap", 0.5, max_runtime=1.0)
            unlimited = pool.submit_nowait("nap", 2.0)
            assert await quick.result() == 0.5
            with pytest.raises(otree.JobFailed, match="dead-lettered after 1 attempt"):
                await limited.result()
            assert pool.dead_letters()[0].error == "max_runtime"
            assert await after.result() == 0.5
            assert await unlimited.result() == 2.0
            assert trio.current_time() == pytest.approx(4.0)  # 0.5 + 1 (stopped) + 0.5 + 2


async def test_a_retry_due_at_once_starts_before_a_lower_priority_job_queued_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A retry due when a job ends is in the line when the next job is chosen, whether the
    dispatcher or the ended job's own task chooses it (either may come first: ten rounds)."""
    starts: list[str] = []
    tries: dict[str, int] = {}

    async def work(name: str) -> None:
        starts.append(name)
        tries[name] = tries.get(name, 0) + 1
        await trio.sleep(0.1)
        if name.startswith("high") and tries[name] == 1:
            raise RuntimeError("first attempt fails")

    pool_spec = otree.pool("jobs", {"work": work}, max_concurrency=1, max_attempts=2)
    async with otree.open_supervisor(otree.supervisor("root", children=[pool_spec])) as sup:
        pool = pool_of(sup)
        for n in range(10):
            high = pool.submit_nowait("work", f"high {n}", priority=5)
            low = pool.submit_nowait("work", f"low {n}")
            await high.result()
            await low.result()
    assert starts == [name for n in range(10) for name in (f"high {n}", f"high {n}", f"low {n}")]
