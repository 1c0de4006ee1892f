"""Pure restart decisions: ``should_restart`` and ``affected_children`` (DESIGN §4, OTP §3-§4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otree._strategy import ExitReason, Restart, Strategy, affected_children, should_restart

# OTP's do_restart/3 table (otp-semantics §4): permanent always, transient only
# after an abnormal exit, temporary never.
RESTART_TABLE: list[tuple[Restart, ExitReason, bool]] = [
    ("permanent", "normal", True),
    ("permanent", "shutdown", True),
    ("permanent", "error", True),
    ("transient", "normal", False),
    ("transient", "shutdown", False),
    ("transient", "error", True),
    ("temporary", "normal", False),
    ("temporary", "shutdown", False),
    ("temporary", "error", False),
]

STRATEGIES: tuple[Strategy, ...] = ("one_for_one", "one_for_all", "rest_for_one")

ids_strategy = st.lists(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,8}", fullmatch=True), min_size=1, max_size=12, unique=True
)


@st.composite
def ids_and_failed(draw: st.DrawFn) -> tuple[list[str], str]:
    ids = draw(ids_strategy)
    failed = draw(st.sampled_from(ids))
    return ids, failed


def is_subsequence(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(item in it for item in sub)


@pytest.mark.parametrize(("restart", "reason", "expected"), RESTART_TABLE)
def test_should_restart_table(restart: Restart, reason: ExitReason, expected: bool) -> None:
    assert should_restart(restart, reason) is expected


def test_should_restart_table_is_complete() -> None:
    assert {(r, e) for r, e, _ in RESTART_TABLE} == {
        (r, e) for r in ("permanent", "transient", "temporary") for e in ("normal", "shutdown", "error")
    }


def test_affected_children_examples() -> None:
    ids = ["a", "b", "c", "d"]
    assert affected_children("one_for_one", ids, "b") == ["b"]
    assert affected_children("one_for_all", ids, "b") == ["a", "b", "c", "d"]
    assert affected_children("rest_for_one", ids, "b") == ["b", "c", "d"]
    assert affected_children("rest_for_one", ids, "a") == ids
    assert affected_children("rest_for_one", ids, "d") == ["d"]


def test_affected_children_returns_a_fresh_list() -> None:
    ids = ["a", "b", "c"]
    for strategy in STRATEGIES:
        result = affected_children(strategy, ids, "a")
        result.append("zz")
        assert ids == ["a", "b", "c"]


def test_affected_children_accepts_a_tuple() -> None:
    ids = ("a", "b", "c")
    assert affected_children("one_for_all", ids, "b") == ["a", "b", "c"]
    assert affected_children("rest_for_one", ids, "b") == ["b", "c"]


@given(ids_and_failed())
def test_affected_children_one_for_one_is_the_failed_child(case: tuple[list[str], str]) -> None:
    ids, failed = case
    assert affected_children("one_for_one", ids, failed) == [failed]


@given(ids_and_failed())
def test_affected_children_one_for_all_is_every_child_in_order(case: tuple[list[str], str]) -> None:
    ids, failed = case
    assert affected_children("one_for_all", ids, failed) == ids


@given(ids_and_failed())
def test_affected_children_rest_for_one_is_the_suffix_from_failed(case: tuple[list[str], str]) -> None:
    ids, failed = case
    result = affected_children("rest_for_one", ids, failed)
    assert result == ids[ids.index(failed) :]
    assert result[0] == failed
    assert result[-1] == ids[-1]


@given(ids_and_failed(), st.sampled_from(STRATEGIES))
def test_affected_children_invariants(case: tuple[list[str], str], strategy: Strategy) -> None:
    ids, failed = case
    result = affected_children(strategy, ids, failed)
    assert failed in result
    assert len(set(result)) == len(result)
    # In start order: an ordered subsequence of ids ...
    assert is_subsequence(result, ids)
    assert [ids.index(i) for i in result] == sorted(ids.index(i) for i in result)
    # ... and contiguous: a slice of ids.
    start = ids.index(result[0])
    assert ids[start : start + len(result)] == result
    # Every child before the failed one is spared unless the strategy is one_for_all.
    if strategy != "one_for_all":
        assert not set(result) & set(ids[: ids.index(failed)])


# Exit codes decide before the restart type (systemd: RestartPreventExitStatus, then
# RestartForceExitStatus); an exit without a code of its own falls back to the table.
@pytest.mark.parametrize(("restart", "reason", "_expected"), RESTART_TABLE)
def test_should_restart_no_code_follows_the_restart_type(
    restart: Restart, reason: ExitReason, _expected: bool
) -> None:
    assert should_restart(restart, reason, None, restart_codes={3}, no_restart_codes={4}) is _expected


@pytest.mark.parametrize("restart", ["permanent", "transient"])
@pytest.mark.parametrize("reason", ["normal", "error"])
def test_no_restart_code_prevents_and_restart_code_forces(restart: Restart, reason: ExitReason) -> None:
    assert should_restart(restart, reason, 4, restart_codes={3}, no_restart_codes={4}) is False
    assert should_restart(restart, reason, 3, restart_codes={3}, no_restart_codes={4}) is True


def test_a_code_in_neither_set_follows_the_restart_type() -> None:
    assert should_restart("transient", "normal", 0, restart_codes={3}, no_restart_codes={4}) is False
    assert should_restart("transient", "error", 1, restart_codes={3}, no_restart_codes={4}) is True
    assert should_restart("permanent", "normal", 0, restart_codes={3}, no_restart_codes={4}) is True


def test_prevent_wins_over_force() -> None:
    """The spec keeps the sets disjoint; the decision still has one defined order."""
    assert should_restart("permanent", "error", 5, restart_codes={5}, no_restart_codes={5}) is False
