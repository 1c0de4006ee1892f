"""The pool's queue policies, pure: the start rate and the drop order, against plain models."""

from __future__ import annotations

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from otree._policies import OldestFirst, StartRate


@given(
    rate=st.floats(0.01, 1000.0),
    tries=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=60),
)
def test_start_rate_never_lets_two_starts_closer_than_a_tick(rate: float, tries: list[float]) -> None:
    """Whatever the times a dispatcher asks at, the starts allowed are at least 1/rate apart,
    and a start asked at exactly ``ready_at()`` is allowed (a timed wake is never too early)."""
    bucket = StartRate(rate)
    starts: list[float] = []
    now = 0.0
    for gap in tries:
        now += gap
        if bucket.allows(now):
            bucket.take(now)
            starts.append(now)
        else:
            assert now < bucket.ready_at() <= now + 1 / rate
            woken = bucket.ready_at()
            assert bucket.allows(woken)
    tick = 1 / rate
    assert all(b - a >= tick * (1 - 1e-12) for a, b in itertools.pairwise(starts))


def test_start_rate_starts_full_and_holds_one_token() -> None:
    bucket = StartRate(2.0)
    assert bucket.ready_at() == -math.inf and bucket.allows(0.0)
    bucket.take(0.0)
    assert (bucket.allows(0.49), bucket.ready_at()) == (False, 0.5)
    assert bucket.allows(100.0)
    bucket.take(100.0)  # after a long pause: one start, then one per tick again (no burst)
    assert not bucket.allows(100.0) and bucket.ready_at() == 100.5


# ops: ("enter", place) a new value enters the line | ("leave", index) it starts (leaves)
#      | ("back", index) a value that left comes back (a retry) | ("drop",) the oldest is dropped
ops = st.lists(
    st.one_of(
        st.tuples(st.just("enter"), st.integers(0, 10_000)),
        st.tuples(st.just("leave"), st.integers(0, 300)),
        st.tuples(st.just("back"), st.integers(0, 300)),
        st.tuples(st.just("drop")),
    ),
    max_size=400,
)


class Value:
    def __init__(self, place: int) -> None:
        self.place = place
        self.in_line = True


@given(ops)
def test_oldest_first_finds_the_lowest_place_in_line_and_stays_small(operations: list[tuple]) -> None:  # type: ignore[type-arg]
    order: OldestFirst[Value] = OldestFirst(lambda value: value.in_line)
    values: list[Value] = []
    for op in operations:
        live = [value for value in values if value.in_line]
        if op[0] == "enter":
            value = Value(op[1])
            values.append(value)
            order.push(value.place, value, len(live) + 1)
        elif op[0] in ("leave", "back") and values:
            value = values[op[1] % len(values)]
            if op[0] == "leave":
                value.in_line = False
            elif not value.in_line:
                value.in_line = True
                order.push(value.place, value, len(live) + 1)
        elif op[0] == "drop":
            oldest = order.oldest()
            if not live:
                assert oldest is None
                continue
            assert oldest is not None and oldest.in_line
            assert oldest.place == min(value.place for value in live)
            oldest.in_line = False
            values.remove(oldest)  # dropped for good
        live = [value for value in values if value.in_line]
        assert len(order) <= 2 * len(live) + 64 + 1
