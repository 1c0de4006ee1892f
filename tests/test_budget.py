"""Budget arithmetic and the circuit breaker: pure, exact, under hypothesis."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otree._budget import (
    LEDGER_MAX,
    MAX_USD,
    Budget,
    BudgetRule,
    budget_day,
    local_zone,
    seconds_until_midnight,
    to_micros,
    usd_text,
)
from otree._intensity import CircuitState
from otree._store import Store

DAY = dt.date(2026, 11, 22)


@given(
    limit=st.integers(1, 10_000),
    jobs=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3000)), max_size=60),
    order=st.randoms(use_true_random=False),
    rule=st.sampled_from(["le", "lt"]),
)
def test_budget_reservations_never_start_jobs_beyond_the_limit(limit: int, jobs: list, order, rule) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Start what the gate admits, end jobs in random order: what is started never exceeds the budget
    on the estimates (never reaches it under the rule "lt"), and spend exceeds it only through
    jobs that overspent their estimate."""
    budget = Budget(limit / 1000, rule=rule)
    budget.roll(DAY)
    running: dict[int, tuple[int, int]] = {}
    for key, (estimate, actual) in enumerate(jobs):
        estimate_m, actual_m = estimate * 1000, actual * 1000
        total = budget.spent + budget.reserved + estimate_m
        assert budget.can_start(estimate_m) == (
            budget.spent < budget.limit and (total < budget.limit if rule == "lt" else total <= budget.limit)  # type: ignore[operator]
        )
        if budget.can_start(estimate_m):
            budget.reserve(key, estimate_m)
            running[key] = (estimate_m, actual_m)
            committed = budget.spent + budget.reserved
            assert committed < budget.limit if rule == "lt" else committed <= budget.limit  # type: ignore[operator]
        if running and order.random() < 0.5:
            done = order.choice(sorted(running))
            before = budget.spent
            budget.settle(done, running.pop(done)[1])
            assert budget.spent == before + jobs[done][1] * 1000
    assert budget.reserved == sum(e for e, _ in running.values())


def test_budget_start_rule_allows_equal_and_refuses_after_overspend() -> None:
    budget = Budget(1.0)
    budget.roll(DAY)
    assert budget.can_start(to_micros(1.0))  # equal is allowed
    budget.reserve("a", to_micros(0.6))
    assert not budget.can_start(to_micros(0.5))  # 0.6 reserved + 0.5 > 1.0
    assert budget.can_start(to_micros(0.4))
    assert budget.settle("a", to_micros(1.2)) == ["warning", "exhausted"]  # spent more than estimated
    assert not budget.can_start(0)  # spent >= budget: nothing starts today


def test_budget_rule_lt_refuses_a_job_that_would_reach_the_budget() -> None:
    budget = Budget(1.0, rule="lt")
    budget.roll(DAY)
    assert not budget.can_start(to_micros(1.0))  # reaching the budget is refused
    assert budget.can_start(to_micros(1.0) - 1)
    budget.reserve("a", to_micros(0.6))
    assert not budget.can_start(to_micros(0.4))  # 0.6 + 0.4 == 1.0
    assert budget.can_start(to_micros(0.4) - 1)
    assert budget.shortfall(to_micros(0.4)) == (
        "needs $0.40, $0.40 left ($0.60 reserved by running jobs), "
        "and budget_rule 'lt' keeps the total below it"
    )
    assert (
        budget.shortfall(to_micros(1.0))
        == "needs $1.00, the whole daily budget, and budget_rule 'lt' keeps the total below it"
    )
    budget.rule = "le"
    assert budget.can_start(to_micros(0.4))


def test_budget_warns_once_a_day_and_resets_at_the_next_day() -> None:
    budget = Budget(10.0, warn_at=0.5)
    assert budget.roll(DAY) is False  # the first day is not a reset
    assert budget.settle("a", to_micros(4.0)) == []
    assert budget.settle("b", to_micros(1.0)) == ["warning"]
    assert budget.settle("c", to_micros(1.0)) == []
    assert budget.roll(DAY + dt.timedelta(days=1)) is True
    assert (budget.spent, budget.warned) == (0, False)


def test_budget_without_a_limit_admits_everything() -> None:
    budget = Budget(None)
    budget.roll(DAY)
    assert budget.can_start(10**12)
    assert budget.settle("a", 10**12) == []


def test_budget_arithmetic_is_exact_in_micro_dollars() -> None:
    budget = Budget(0.3)
    budget.roll(DAY)
    for key in range(3):
        budget.reserve(key, to_micros(0.1))
    assert not budget.can_start(1)  # 0.1 + 0.1 + 0.1 == 0.3 exactly, not 0.30000000000000004
    for key in range(3):
        budget.settle(key, to_micros(0.1))
    assert budget.spent == budget.limit


def test_budget_day_and_midnight_follow_the_budget_timezone() -> None:
    tz = ZoneInfo("America/New_York")
    now = dt.datetime(2026, 11, 23, 4, 30, tzinfo=dt.UTC)  # 23:30 the day before in New York
    assert budget_day(now, tz) == dt.date(2026, 11, 22)
    assert seconds_until_midnight(now, tz) == 30 * 60
    spring = dt.datetime(2026, 3, 8, 4, 0, tzinfo=dt.UTC)  # 23:00 EST, the night clocks go forward
    assert seconds_until_midnight(spring, tz) == 3600


def test_circuit_opens_after_failures_in_a_row_then_half_opens_after_cooldown() -> None:
    circuit = CircuitState(failures=2, cooldown=10.0)
    assert circuit.allow(0, "a") == (True, None)
    assert circuit.record("a", False, 0) is None
    assert circuit.record("b", True, 1) is None  # a success resets the count
    assert circuit.record("c", False, 2) is None
    assert circuit.record("d", False, 3) == "opened"
    assert circuit.allow(12.9, "e") == (False, None)
    assert circuit.reopen_in(12.9) == pytest.approx(0.1)
    assert circuit.allow(13, "e") == (True, "half_open")
    assert circuit.allow(13, "f") == (False, None)  # one trial at a time
    assert circuit.record("e", False, 14) == "opened"  # the trial failed
    assert circuit.allow(24, "f") == (True, "half_open")
    assert circuit.record("f", True, 25) == "closed"
    assert circuit.allow(25, "g") == (True, None)


def test_only_the_half_open_trial_closes_the_circuit() -> None:
    """Issue 10 (4a): jobs started before the opening are counted but never close it."""
    circuit = CircuitState(failures=3, cooldown=5.0)
    for job in "abcd":
        assert circuit.allow(0, job) == (True, None)
    for job in "abc":
        circuit.record(job, False, 0.1)
    assert circuit.state == "open"
    assert circuit.record("d", True, 0.122) is None  # started before the opening
    assert (circuit.state, circuit.allow(1, "e")) == ("open", (False, None))
    assert circuit.allow(5.1, "e") == (True, "half_open")
    assert circuit.record("old", False, 6) is None  # an old failure: counted, the trial decides
    assert circuit.record("old", True, 6) is None
    assert circuit.allow(6, "f") == (False, None)  # the trial still runs
    assert circuit.record("e", True, 7) == "closed"


def test_only_the_trial_being_stopped_frees_the_trial() -> None:
    circuit = CircuitState(failures=1, cooldown=5.0)
    circuit.allow(0, "old")
    circuit.record("a", False, 0)
    assert circuit.allow(5, "trial") == (True, "half_open")
    circuit.abandon("old")  # a job from before the opening was cancelled: the trial still runs
    assert circuit.allow(5, "b") == (False, None)
    circuit.abandon("trial")
    assert circuit.allow(5, "b") == (True, None)  # the next trial
    assert circuit.record("b", True, 6) == "closed"


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["start", "ok", "fail", "stop"]), st.floats(0, 3), st.integers(0, 20)),
        max_size=80,
    )
)
def test_the_circuit_closes_only_by_its_trial_and_runs_one_trial_at_a_time(
    ops: list[tuple[str, float, int]],
) -> None:
    """Any interleaving of starts and ends: a circuit that opened is closed only by the job it let
    through as a trial after the opening, and never runs two trials at once."""
    circuit = CircuitState(failures=2, cooldown=2.0)
    now = 0.0
    running: list[int] = []
    trials: set[int] = set()  # jobs let through a non-closed circuit, still running
    ids = iter(range(10**6))
    for op, step, pick in ops:
        now += step
        if op == "start":
            job = next(ids)
            was = circuit.state
            allowed, _ = circuit.allow(now, job)
            if allowed:
                running.append(job)
                if was != "closed":
                    trials.add(job)
            assert len(trials) <= 1
        elif running:
            job = running.pop(pick % len(running))
            if op == "stop":
                circuit.abandon(job)
                trials.discard(job)
                continue
            was = circuit.state
            entered = circuit.record(job, op == "ok", now)
            if entered == "closed":
                assert job in trials and was == "half_open"
            if was != "closed" and job not in trials:
                assert entered is None  # an old job's end changes nothing while it is open
            trials.discard(job)


def test_usd_text_shows_cents_or_every_decimal_there_is() -> None:
    assert [usd_text(m) for m in (0, 80_000, 3_500, 1, 1_250_000_000)] == [
        "$0.00",
        "$0.08",
        "$0.0035",
        "$0.000001",
        "$1,250.00",
    ]
    assert usd_text(to_micros(MAX_USD)) == "$1,000,000,000.00"


def test_shortfall_says_what_the_held_job_needs_and_what_is_left() -> None:
    budget = Budget(1.0)
    budget.roll(DAY)
    budget.reserve("a", to_micros(0.5))
    budget.charge("a", to_micros(0.42))
    assert budget.shortfall(to_micros(0.6)) == "needs $0.60, $0.50 left ($0.08 reserved by running jobs)"
    assert budget.shortfall(to_micros(2)) == "needs $2.00, more than the whole daily budget of $1.00"
    budget.release("a")
    budget.charge("b", to_micros(0.6))
    assert budget.shortfall(0) == "$1.02 of $1.00 spent"


micros = st.integers(0, to_micros(MAX_USD))


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("start"), micros),
            st.tuples(st.just("exact"), st.just(0)),  # an estimate of exactly what is left
            st.tuples(st.just("report"), st.one_of(micros, st.integers(0, 2**80))),
        ),
        max_size=24,
    ),
    rule=st.sampled_from(["le", "lt"]),
)
def test_budget_arithmetic_at_the_bound_fits_the_ledger(ops: list[tuple[str, int]], rule: BudgetRule) -> None:
    """A budget of MAX_USD, estimates up to it, reported spend of any size: what starts never
    passes the budget on its estimates (nor reaches it under "lt"), an estimate of exactly what
    is left starts under "le" and not under "lt" (where a micro-dollar less does), the day's
    spend saturates at LEDGER_MAX, and the SQLite ledger holds it and sums to the same."""
    budget = Budget(MAX_USD, rule=rule)
    budget.roll(DAY)
    limit = to_micros(MAX_USD)
    reported: list[int] = []
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory) / "pool.sqlite3")
        try:
            for key, (op, value) in enumerate(ops):
                if op == "report":
                    amount = budget.capped(value)
                    store.spend(str(DAY), key, amount)  # OverflowError if beyond SQLite's INTEGER
                    budget.charge(key, amount)
                    reported.append(value)
                    continue
                estimate = value
                if op == "exact":
                    estimate = limit - budget.spent - budget.reserved
                    if budget.spent >= limit or estimate < 0:  # nothing is left (an overspend)
                        continue
                    assert budget.can_start(estimate) == (rule == "le")
                    if rule == "lt" and estimate:
                        estimate -= 1
                        assert budget.can_start(estimate)
                if budget.can_start(estimate):
                    budget.reserve(key, estimate)
                    committed = budget.spent + budget.reserved
                    assert committed < limit if rule == "lt" else committed <= limit
            assert budget.reserved >= 0
            assert budget.spent == store.spent(str(DAY)) == min(LEDGER_MAX, sum(reported))
        finally:
            store.close()


def test_local_zone_follows_dst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", ":America/New_York")
    zone = local_zone()
    winter = dt.datetime(2026, 1, 15, 12, tzinfo=zone)
    summer = dt.datetime(2026, 7, 15, 12, tzinfo=zone)
    assert (winter.utcoffset(), summer.utcoffset()) == (dt.timedelta(hours=-5), dt.timedelta(hours=-4))
    # the budget day after the March change ends at local midnight, 23 hours after the last one
    before = dt.datetime(2026, 3, 8, 0, 0, tzinfo=zone)
    assert seconds_until_midnight(before, zone) == 23 * 3600


def test_local_zone_without_tz_reads_the_machine_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TZ", raising=False)
    zone = local_zone()
    now = dt.datetime.now(dt.UTC)
    assert now.astimezone(zone).utcoffset() == now.astimezone().utcoffset()
