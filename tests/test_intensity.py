"""Restart intensity and backoff (DESIGN §4 "Intensity", §10 "Restart window", "Backoff"; OTP §5).

The window is checked three ways: hand-picked unit cases, a hypothesis property
against a brute-force count, and the same property end to end on the real
runtime under a MockClock.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from itertools import accumulate
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

import otree
from otree._intensity import RestartWindow, backoff_delay

################################################################
# Helpers
################################################################


def brute_force_refusal(times: Sequence[float], max_restarts: int, max_seconds: float) -> int | None:
    """The first index whose restart makes more than ``max_restarts`` within ``max_seconds``."""
    for i, now in enumerate(times):
        in_window = sum(1 for j in range(i + 1) if now - times[j] <= max_seconds)
        if in_window > max_restarts:
            return i
    return None


def brute_force_in_window(times: Sequence[float], now: float, max_seconds: float) -> int:
    return sum(1 for t in times if now - t <= max_seconds)


def feed(window: RestartWindow, times: Sequence[float]) -> int | None:
    """Feed restart times to ``window``; the index of the first refusal, or None."""
    for i, now in enumerate(times):
        if not window.add_restart(now):
            return i
    return None


def delay(attempt: int, *, initial: float = 0.1, maximum: float = 30.0, factor: float = 2.0) -> float:
    """``backoff_delay`` without jitter."""
    return backoff_delay(attempt, initial=initial, maximum=maximum, factor=factor, jitter=0.0, unit=0.5)


def run_mock(scenario: Callable[[], Awaitable[None]]) -> None:
    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


################################################################
# RestartWindow.add_restart: unit cases
################################################################


def test_add_restart_max_restarts_zero_refuses_the_first() -> None:
    window = RestartWindow(0, 5.0)
    assert window.add_restart(0.0) is False


def test_add_restart_three_in_five_seconds_allowed_fourth_refused() -> None:
    window = RestartWindow(3, 5.0)
    assert window.add_restart(0.0) is True
    assert window.add_restart(1.0) is True
    assert window.add_restart(2.0) is True
    assert window.add_restart(3.0) is False


def test_add_restart_three_at_the_same_instant_then_fourth_refused() -> None:
    window = RestartWindow(3, 5.0)
    assert [window.add_restart(7.0) for _ in range(4)] == [True, True, True, False]


def test_add_restart_entry_exactly_max_seconds_old_still_counts() -> None:
    window = RestartWindow(1, 5.0)
    assert window.add_restart(10.0) is True
    assert window.add_restart(15.0) is False  # 15 - 10 == 5 <= 5: two restarts in the window


def test_add_restart_entry_just_older_than_max_seconds_expires() -> None:
    window = RestartWindow(1, 5.0)
    assert window.add_restart(10.0) is True
    assert window.add_restart(math.nextafter(15.0, math.inf)) is True


def test_add_restart_expired_restarts_free_the_window() -> None:
    window = RestartWindow(3, 5.0)
    assert all(window.add_restart(t) for t in (0.0, 1.0, 2.0))
    assert window.add_restart(7.5) is True  # 0, 1 and 2 are all more than 5 s old
    assert window.add_restart(8.0) is True
    assert window.add_restart(9.0) is True
    assert window.add_restart(9.5) is False


def test_add_restart_spaced_restarts_never_give_up() -> None:
    window = RestartWindow(1, 1.0)
    assert all(window.add_restart(1.25 * k) for k in range(1000))


def test_add_restart_float_window_is_not_whole_seconds() -> None:
    # OTP's window is in whole seconds; otree's is in float seconds.
    window = RestartWindow(1, 0.5)
    assert window.add_restart(0.0) is True
    assert window.add_restart(0.75) is True
    assert window.add_restart(1.25) is False


def test_in_window_counts_restarts_still_within_max_seconds() -> None:
    window = RestartWindow(5, 5.0)
    assert window.in_window(0.0) == 0
    for t in (0.0, 1.0, 2.0):
        window.add_restart(t)
    assert window.in_window(2.0) == 3
    assert window.in_window(5.0) == 3  # 5 - 0 == 5 still counts
    assert window.in_window(5.5) == 2
    assert window.in_window(6.0) == 2  # 6 - 1 == 5 still counts
    assert window.in_window(7.0) == 1
    assert window.in_window(7.25) == 0


def test_in_window_after_a_refusal_includes_the_refused_restart() -> None:
    window = RestartWindow(1, 5.0)
    window.add_restart(0.0)
    assert window.add_restart(1.0) is False
    assert window.in_window(1.0) == 2


################################################################
# RestartWindow: property against a brute-force count
################################################################


@st.composite
def restart_schedules(draw: st.DrawFn) -> tuple[list[float], int, float]:
    """(sorted restart times, max_restarts, max_seconds), with duplicates and exact-boundary gaps."""
    max_restarts = draw(st.integers(0, 6))
    if draw(st.booleans()):
        # A grid of quarter seconds: gaps of exactly max_seconds (and sums of gaps that
        # add up to it) are exact in binary floating point.
        max_seconds = draw(st.integers(1, 16)) / 4
        gap = st.integers(0, 24).map(lambda k: k / 4)
        start = draw(st.integers(0, 400)) / 4
    else:
        max_seconds = draw(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False))
        gap = st.one_of(
            st.just(0.0),
            st.just(max_seconds),
            st.just(max_seconds / 2),
            st.floats(min_value=0.0, max_value=2 * max_seconds, allow_nan=False, allow_infinity=False),
        )
        start = draw(st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False))
    gaps = draw(st.lists(gap, min_size=1, max_size=30))
    times = [start + offset for offset in accumulate(gaps)]
    return times, max_restarts, max_seconds


@settings(max_examples=300)
@given(restart_schedules())
@example(([0.0], 0, 5.0))
@example(([0.0, 1.0, 2.0, 3.0], 3, 5.0))
@example(([0.0, 5.0], 1, 5.0))
@example(([0.0, 5.0, 10.0, 15.0], 1, 5.0))
@example(([1.0, 1.0, 1.0], 2, 0.25))
def test_add_restart_first_refusal_matches_brute_force(schedule: tuple[list[float], int, float]) -> None:
    times, max_restarts, max_seconds = schedule
    window = RestartWindow(max_restarts, max_seconds)
    expected = brute_force_refusal(times, max_restarts, max_seconds)
    for i, now in enumerate(times):
        allowed = window.add_restart(now)
        assert window.in_window(now) == brute_force_in_window(times[: i + 1], now, max_seconds)
        if expected is not None and i == expected:
            assert allowed is False
            break
        assert allowed is True, f"refused at {i}, expected {expected}"
        # Within the limit, the window holds at most max_restarts entries.
        assert window.in_window(now) <= max_restarts
    else:
        assert expected is None


################################################################
# The same property end to end: one permanent child crashing on schedule
################################################################


def crash_scenario(
    gaps: Sequence[float], max_restarts: int, max_seconds: float, *, use_run: bool
) -> tuple[int, list[float], otree.RestartIntensityExceeded | None, float, int | None]:
    """Run a root with one permanent child crashing at ``accumulate(gaps)``, on a MockClock.

    Returns (starts, crash times, the root's RestartIntensityExceeded or None,
    the time the root returned, the child's ``restarts`` seen by the handle or None).
    """
    offsets = list(accumulate(gaps))
    starts = 0
    crashes: list[float] = []
    outcome: list[otree.RestartIntensityExceeded | None] = [None]
    ended = [math.nan]
    restarts_seen: list[int | None] = [None]

    async def scenario() -> None:
        base = trio.current_time()

        async def crasher() -> None:
            nonlocal starts
            k = starts
            starts += 1
            if k >= len(offsets):
                await trio.sleep_forever()
            await trio.sleep_until(base + offsets[k])
            crashes.append(trio.current_time() - base)
            raise RuntimeError(f"crash {k}")

        spec = otree.supervisor(
            "root",
            children=[otree.task("worker", crasher)],
            max_restarts=max_restarts,
            max_seconds=max_seconds,
        )
        quiet_after = base + offsets[-1] + max_seconds + 1.0
        try:
            if use_run:
                with trio.move_on_at(quiet_after):
                    await otree.run(spec)
            else:
                async with otree.open_supervisor(spec) as sup:
                    await trio.sleep_until(quiet_after)
                    restarts_seen[0] = sup.which_children()[0].restarts
        except otree.RestartIntensityExceeded as exc:
            outcome[0] = exc
        ended[0] = trio.current_time() - base

    run_mock(scenario)
    return starts, crashes, outcome[0], ended[0], restarts_seen[0]


@settings(max_examples=75, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 12).map(lambda k: k / 4), min_size=1, max_size=8),
    max_restarts=st.integers(0, 6),
    max_seconds=st.integers(1, 16).map(lambda k: k / 4),
    use_run=st.booleans(),
)
@example(gaps=[1.0] * 4, max_restarts=3, max_seconds=5.0, use_run=False)
@example(gaps=[1.0] * 4, max_restarts=3, max_seconds=5.0, use_run=True)
@example(gaps=[1.0], max_restarts=0, max_seconds=5.0, use_run=False)
@example(gaps=[1.0, 2.0, 2.0], max_restarts=1, max_seconds=2.0, use_run=False)
@example(gaps=[0.0, 0.0, 0.0], max_restarts=2, max_seconds=0.25, use_run=True)
@example(gaps=[2.25, 2.25, 2.25, 2.25], max_restarts=1, max_seconds=2.0, use_run=False)
def test_supervisor_gives_up_at_the_brute_force_crash_index(
    gaps: list[float], max_restarts: int, max_seconds: float, use_run: bool
) -> None:
    offsets = list(accumulate(gaps))
    expected = brute_force_refusal(offsets, max_restarts, max_seconds)
    starts, crashes, error, ended, restarts_seen = crash_scenario(
        gaps, max_restarts, max_seconds, use_run=use_run
    )
    if expected is None:
        assert error is None
        assert crashes == offsets
        assert starts == len(offsets) + 1  # every crash restarted, the last run still up
        if not use_run:
            assert restarts_seen == len(offsets)
    else:
        assert isinstance(error, otree.RestartIntensityExceeded)
        assert error.child == "root/worker"
        assert (error.max_restarts, error.max_seconds) == (max_restarts, max_seconds)
        assert isinstance(error.__cause__, RuntimeError)
        assert str(error.__cause__) == f"crash {expected}"
        # Not before: every earlier crash was restarted; exactly at: this one was not.
        assert crashes == offsets[: expected + 1]
        assert starts == expected + 1  # restarts done == expected
        assert ended == offsets[expected]


################################################################
# Backoff on the real runtime (delays measured on the MockClock)
################################################################


async def restart_times(backoff: otree.Backoff, max_restarts: int, max_seconds: float) -> list[float]:
    """When a child that crashes at once started, from the tree's start until its supervisor gave up."""
    starts: list[float] = []

    async def crash_at_once() -> None:
        starts.append(trio.current_time())
        raise RuntimeError("boom")

    spec = otree.supervisor(
        "root",
        children=[otree.task("worker", crash_at_once)],
        max_restarts=max_restarts,
        max_seconds=max_seconds,
        backoff=backoff,
    )
    base = trio.current_time()
    with pytest.raises(otree.RestartIntensityExceeded):
        async with otree.open_supervisor(spec):
            await trio.sleep_forever()
    return [t - base for t in starts]


async def test_backoff_delays_restarts_and_counts_them_when_decided(
    autojump_clock: trio.testing.MockClock,
) -> None:
    base = trio.current_time()
    backoff = otree.Backoff(initial=1.0, maximum=3.0, factor=2.0, jitter=0.0)
    # Restarts decided at 0, 1, 3 (counted at once), started after 1, 2, 3 s;
    # the fourth restart, decided at 6, exceeds 3 in 100 s.
    assert await restart_times(backoff, max_restarts=3, max_seconds=100.0) == [0.0, 1.0, 3.0, 6.0]
    assert trio.current_time() - base == 6.0


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        (otree.Backoff.schedule([0, 5, 20]), [0.0, 0.0, 5.0, 25.0, 45.0]),
        (otree.Backoff(initial=1.0, factor=1, step=2.0, maximum=4.0, jitter=0.0), [0.0, 1.0, 4.0, 8.0, 12.0]),
    ],
    ids=["schedule", "linear"],
)
async def test_a_supervisor_restarts_on_an_explicit_schedule_and_a_linear_backoff(
    autojump_clock: trio.testing.MockClock, backoff: otree.Backoff, expected: list[float]
) -> None:
    """``Backoff.schedule`` and a linear ``Backoff`` on a supervisor, as on a pool."""
    assert await restart_times(backoff, max_restarts=4, max_seconds=1000.0) == expected


################################################################
# backoff_delay
################################################################


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.6), (8, 12.8), (9, 25.6), (10, 30.0), (50, 30.0)],
)
def test_backoff_delay_nth_attempt(attempt: int, expected: float) -> None:
    assert delay(attempt) == pytest.approx(expected)


@given(
    attempt=st.integers(1, 2000),
    initial=st.floats(1e-6, 100.0),
    maximum=st.floats(0.0, 1000.0),
    factor=st.floats(1.0, 10.0),
)
def test_backoff_delay_is_min_of_maximum_and_growth(
    attempt: int, initial: float, maximum: float, factor: float
) -> None:
    try:
        growth = initial * factor ** (attempt - 1)
    except OverflowError:
        growth = math.inf
    assert delay(attempt, initial=initial, maximum=maximum, factor=factor) == pytest.approx(
        min(maximum, growth)
    )


def test_backoff_delay_factor_one_is_constant() -> None:
    assert {delay(n, initial=0.5, factor=1.0) for n in (1, 2, 10, 10**6)} == {0.5}


def test_backoff_delay_jitter_unit_zero_is_the_lower_bound() -> None:
    got = backoff_delay(3, initial=1.0, maximum=30.0, factor=2.0, jitter=0.1, unit=0.0)
    assert got == pytest.approx(4.0 * 0.9)


def test_backoff_delay_jitter_unit_near_one_approaches_the_upper_bound() -> None:
    unit = math.nextafter(1.0, 0.0)
    got = backoff_delay(3, initial=1.0, maximum=30.0, factor=2.0, jitter=0.1, unit=unit)
    assert got == pytest.approx(4.0 * 1.1)


def test_backoff_delay_jitter_unit_half_is_the_base() -> None:
    assert backoff_delay(3, initial=1.0, maximum=30.0, factor=2.0, jitter=0.5, unit=0.5) == 4.0


def test_backoff_delay_full_jitter_unit_zero_is_zero() -> None:
    assert backoff_delay(3, initial=1.0, maximum=30.0, factor=2.0, jitter=1.0, unit=0.0) == 0.0


def test_backoff_delay_jitter_applies_to_the_capped_delay() -> None:
    got = backoff_delay(100, initial=1.0, maximum=30.0, factor=2.0, jitter=0.2, unit=0.0)
    assert got == pytest.approx(24.0)


@given(
    attempt=st.integers(1, 100),
    jitter=st.floats(0.0, 1.0),
    unit=st.floats(0.0, 1.0, exclude_max=True),
)
def test_backoff_delay_jitter_stays_within_bounds(attempt: int, jitter: float, unit: float) -> None:
    base = delay(attempt)
    got = backoff_delay(attempt, initial=0.1, maximum=30.0, factor=2.0, jitter=jitter, unit=unit)
    assert got >= 0.0
    assert base * (1 - jitter) - 1e-9 <= got <= base * (1 + jitter) + 1e-9


@pytest.mark.parametrize("attempt", [1_100, 10**6, 10**12, 2**63])
def test_backoff_delay_huge_attempt_does_not_overflow(attempt: int) -> None:
    assert delay(attempt) == 30.0
    got = backoff_delay(attempt, initial=0.1, maximum=30.0, factor=2.0, jitter=0.1, unit=0.0)
    assert got == pytest.approx(27.0)


def test_backoff_delay_huge_product_without_pow_overflow_is_capped() -> None:
    # 2.0**99 is finite, 1e300 * 2.0**99 is inf: still capped at maximum.
    assert delay(100, initial=1e300) == 30.0


@pytest.mark.parametrize("attempt", [1_025, 10**6])
def test_backoff_delay_zero_initial_stays_zero_for_huge_attempt(attempt: int) -> None:
    assert delay(attempt, initial=0.0) == 0.0


@settings(max_examples=200)
@given(
    delays=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=8),
    attempt=st.integers(1, 10**6),
)
def test_backoff_schedule_is_the_nth_delay_then_the_last_repeated(delays: list[float], attempt: int) -> None:
    got = backoff_delay(
        attempt, initial=0.1, maximum=30.0, factor=2.0, jitter=0.0, unit=0.5, delays=tuple(delays)
    )
    assert got == delays[min(attempt, len(delays)) - 1]


@given(delays=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=8))
def test_backoff_schedule_is_monotone_when_its_delays_are(delays: list[float]) -> None:
    schedule = tuple(sorted(delays))
    got = [
        backoff_delay(n, initial=0, maximum=0, factor=1, jitter=0.0, unit=0.0, delays=schedule)
        for n in range(1, len(schedule) + 3)
    ]
    assert got == sorted(got)
    assert got[-1] == got[-2] == schedule[-1]


@given(
    initial=st.floats(0.0, 100.0),
    step=st.floats(0.0, 100.0),
    maximum=st.floats(0.0, 1e4),
    attempts=st.lists(st.integers(1, 10**9), min_size=2, max_size=10),
)
def test_linear_backoff_grows_by_step_is_monotone_and_capped(
    initial: float, step: float, maximum: float, attempts: list[int]
) -> None:
    def linear(n: int) -> float:
        return backoff_delay(n, initial=initial, maximum=maximum, factor=1.0, jitter=0.0, unit=0.9, step=step)

    for n in attempts:
        assert linear(n) == pytest.approx(min(maximum, initial + step * (n - 1)))
        assert 0.0 <= linear(n) <= maximum
    ordered = sorted(attempts)
    assert [linear(n) for n in ordered] == sorted(linear(n) for n in ordered)


@given(
    initial=st.floats(1e-6, 100.0),
    maximum=st.floats(0.0, 1e4),
    factor=st.floats(1.0, 10.0),
    attempts=st.lists(st.integers(1, 5000), min_size=2, max_size=10),
)
def test_exponential_backoff_is_monotone_and_capped(
    initial: float, maximum: float, factor: float, attempts: list[int]
) -> None:
    ordered = sorted(attempts)
    got = [delay(n, initial=initial, maximum=maximum, factor=factor) for n in ordered]
    assert got == sorted(got)
    assert all(0.0 <= d <= maximum for d in got)


@given(
    attempt=st.integers(1, 100),
    jitter=st.floats(0.0, 1.0),
    unit=st.floats(0.0, 1.0, exclude_max=True),
    step=st.sampled_from([0.0, 0.7]),
)
def test_backoff_down_jitter_stays_between_its_fraction_and_the_base(
    attempt: int, jitter: float, unit: float, step: float
) -> None:
    """``jitter_mode="down"`` never waits longer than the base delay (nor the maximum), and no
    less than ``1 - jitter`` of it: with ``jitter=0.5``, between half and the full delay."""
    factor = 1.0 if step else 2.0
    base = backoff_delay(attempt, initial=0.1, maximum=30.0, factor=factor, jitter=0.0, unit=unit, step=step)
    got = backoff_delay(
        attempt, initial=0.1, maximum=30.0, factor=factor, jitter=jitter, unit=unit, step=step, mode="down"
    )
    assert base * (1 - jitter) - 1e-9 <= got <= base <= 30.0
    half = backoff_delay(
        attempt, initial=0.1, maximum=30.0, factor=factor, jitter=0.5, unit=unit, step=step, mode="down"
    )
    assert base / 2 - 1e-9 <= half <= base


def test_backoff_down_jitter_draw_ends() -> None:
    kwargs: dict[str, Any] = dict(initial=1.0, maximum=30.0, factor=2.0, jitter=0.5, mode="down")
    assert backoff_delay(3, unit=0.0, **kwargs) == 4.0  # the full delay
    assert backoff_delay(3, unit=math.nextafter(1.0, 0.0), **kwargs) == pytest.approx(2.0)  # half of it
    assert otree.Backoff(initial=1.0, jitter=0.5, jitter_mode="down").delay(3, 0.5) == 3.0


# --- persisted windows (persist_intensity) ----------------------------------------------------


def test_a_window_round_trips_through_wall_clock_times() -> None:
    window = RestartWindow(3, 10.0)
    for t in (1.0, 5.0, 8.0):
        window.add_restart(t)
    walls = window.wall_times(now=12.0, wall_now=1000.0)
    assert walls == [993.0, 996.0]  # the restart at 1.0 has left the window
    again = RestartWindow(3, 10.0)
    again.restore(walls, now=500.0, wall_now=1001.0)  # a new process: its own monotonic clock
    assert again.in_window(500.0) == 2
    assert again.in_window(503.5) == 1  # 993 was 8 s before: it left at 502
    assert again.add_restart(504.0) and again.add_restart(504.5)
    assert not again.add_restart(505.0)


def test_restore_drops_old_times_clamps_future_ones_and_keeps_at_most_max_plus_one() -> None:
    window = RestartWindow(2, 10.0)
    window.restore([0.0, 85.0, 95.0, 96.0, 99.0, 150.0], now=7.0, wall_now=100.0)
    assert window.in_window(7.0) == 3  # 96, 99 and 150 of 95, 96, 99, 150: the newest three
    assert window.in_window(15.5) == 2  # 96 (at 3.0) left; 99 (6.0) and 150, clamped to 7.0, count
    assert window.in_window(17.5) == 0  # and leaves 10 s later, not 10 s after 150
