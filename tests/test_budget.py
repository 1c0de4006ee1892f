"""Budget arithmetic and the circuit breaker: pure, exact, under hypothesis."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otree._budget import Budget, budget_day, local_zone, seconds_until_midnight, to_micros
from otree._intensity import CircuitState

DAY = dt.date(2026, 11, 22)


@given(
    limit=st.integers(1, 10_000),
    jobs=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3000)), max_size=60),
    order=st.randoms(use_true_random=False),
)
def test_budget_reservations_never_start_jobs_beyond_the_limit(limit: int, jobs: list, order) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Start what the gate admits, end jobs in random order: what is started never exceeds the budget
    on the estimates, and spend exceeds it only through jobs that overspent their estimate."""
    budget = Budget(limit / 1000)
    budget.roll(DAY)
    running: dict[int, tuple[int, int]] = {}
    for key, (estimate, actual) in enumerate(jobs):
        estimate_m, actual_m = estimate * 1000, actual * 1000
        if budget.can_start(estimate_m):
            budget.reserve(key, estimate_m)
            running[key] = (estimate_m, actual_m)
            assert budget.spent + budget.reserved <= budget.limit  # type: ignore[operator]
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
    assert not budget.admits(0)


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
    assert budget.can_start(10**12) and budget.admits(10**12)
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
    assert circuit.allow(0) == (True, None)
    assert circuit.record(False, 0) is None
    assert circuit.record(True, 1) is None  # a success resets the count
    assert circuit.record(False, 2) is None
    assert circuit.record(False, 3) == "opened"
    assert circuit.allow(12.9) == (False, None)
    assert circuit.reopen_in(12.9) == 0.1 or abs(circuit.reopen_in(12.9) - 0.1) < 1e-9
    assert circuit.allow(13) == (True, "half_open")
    assert circuit.allow(13) == (False, None)  # one trial at a time
    assert circuit.record(False, 14) == "opened"  # the trial failed
    assert circuit.allow(24) == (True, "half_open")
    assert circuit.record(True, 25) == "closed"
    assert circuit.allow(25) == (True, None)


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
