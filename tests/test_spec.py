"""Spec validation: every SpecError rule, with its exact message, plus defaults and immutability."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Coroutine
from typing import Any

import pytest
import trio

import otree
from otree._spec import ID_PATTERN, takes_task_status

ID_RULE = f"id must match {ID_PATTERN}"
SHUTDOWN_RULE = 'shutdown must be >= 0, "brutal_kill" or "infinity"'


async def idle() -> None:
    await trio.sleep_forever()


async def greet(name: str, times: int = 1) -> None:
    await trio.sleep_forever()


async def ready_first(name: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await trio.sleep_forever()


def not_async() -> None:
    pass


def spec_error(build: Any, *args: Any, **kwargs: Any) -> otree.SpecError:
    """Call ``build(*args, **kwargs)`` and return the SpecError it raises."""
    with pytest.raises(otree.SpecError) as info:
        build(*args, **kwargs)
    return info.value


# --- ids --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_id", "shown"),
    [("a/b", "a/b"), ("", "<child>"), (".", "."), ("..", ".."), ("-a", "-a"), ("_a", "_a"), ("a b", "a b")],
)
def test_id_bad_characters(bad_id: str, shown: str) -> None:
    error = spec_error(otree.task, bad_id, idle)
    assert str(error) == f"{shown}: {ID_RULE}; got {bad_id!r}"


def test_id_bad_characters_supervisor() -> None:
    error = spec_error(otree.supervisor, "x/y")
    assert str(error) == f"x/y: {ID_RULE}; got 'x/y'"


@pytest.mark.parametrize("bad_id", [5, None, b"a"])
def test_id_not_a_string(bad_id: object) -> None:
    error = spec_error(otree.task, bad_id, idle)
    assert str(error) == f"<child>: {ID_RULE}; got {bad_id!r}"


@pytest.mark.parametrize("good_id", ["a", "A9", "agent-1", "db.primary", "x_y", "0"])
def test_id_valid(good_id: str) -> None:
    assert otree.task(good_id, idle).id == good_id


# --- restart / shutdown / significant ----------------------------------------


def test_restart_bad_value() -> None:
    error = spec_error(otree.task, "a", idle, restart="sometimes")
    assert (
        str(error)
        == "a: restart must be one of 'permanent', 'transient', 'temporary', 'on_demand'; got 'sometimes'"
    )


def test_restart_bad_value_supervisor() -> None:
    error = spec_error(otree.supervisor, "s", restart="always")
    assert (
        str(error)
        == "s: restart must be one of 'permanent', 'transient', 'temporary', 'on_demand'; got 'always'"
    )


@pytest.mark.parametrize(
    ("shutdown", "shown"), [(-1, "-1"), (-0.5, "-0.5"), ("soon", "'soon'"), (True, "True"), (math.nan, "nan")]
)
def test_shutdown_bad_value(shutdown: object, shown: str) -> None:
    error = spec_error(otree.task, "a", idle, shutdown=shutdown)
    assert str(error) == f"a: {SHUTDOWN_RULE}; got {shown}"


def test_shutdown_bad_value_supervisor() -> None:
    error = spec_error(otree.supervisor, "s", shutdown=None)
    assert str(error) == f"s: {SHUTDOWN_RULE}; got None"


@pytest.mark.parametrize("shutdown", [0, 0.0, 2.5, "brutal_kill", "infinity"])
def test_shutdown_valid(shutdown: Any) -> None:
    assert otree.task("a", idle, shutdown=shutdown).shutdown == shutdown
    assert otree.supervisor("s", shutdown=shutdown).shutdown == shutdown


def test_significant_with_permanent() -> None:
    error = spec_error(otree.task, "a", idle, significant=True)
    assert (
        str(error)
        == "a: significant=True requires restart 'transient', 'temporary' or 'on_demand'; got 'permanent'"
    )


def test_significant_with_permanent_supervisor() -> None:
    error = spec_error(otree.supervisor, "s", significant=True)
    assert (
        str(error)
        == "s: significant=True requires restart 'transient', 'temporary' or 'on_demand'; got 'permanent'"
    )


def test_significant_not_a_bool() -> None:
    error = spec_error(otree.task, "a", idle, restart="transient", significant=1)
    assert str(error) == "a: significant must be True or False; got 1"


def test_significant_under_auto_shutdown_never() -> None:
    child = otree.task("a", idle, restart="transient", significant=True)
    error = spec_error(otree.supervisor, "parent", children=[child])
    assert str(error) == (
        "parent/a: significant=True requires the supervisor's auto_shutdown "
        "'any_significant' or 'all_significant'; got 'never'"
    )


@pytest.mark.parametrize("auto_shutdown", ["any_significant", "all_significant"])
def test_significant_under_auto_shutdown_valid(auto_shutdown: str) -> None:
    child = otree.task("a", idle, restart="temporary", significant=True)
    tree = otree.supervisor("parent", auto_shutdown=auto_shutdown, children=[child])  # type: ignore[arg-type]
    assert tree.children == (child,)


# --- supervisor fields ---------------------------------------------------------


def test_strategy_bad_value() -> None:
    error = spec_error(otree.supervisor, "s", strategy="all_for_one")
    assert (
        str(error)
        == "s: strategy must be one of 'one_for_one', 'one_for_all', 'rest_for_one'; got 'all_for_one'"
    )


def test_auto_shutdown_bad_value() -> None:
    error = spec_error(otree.supervisor, "s", auto_shutdown="sometimes")
    assert str(error) == (
        "s: auto_shutdown must be one of 'never', 'any_significant', 'all_significant'; got 'sometimes'"
    )


def test_max_restarts_negative() -> None:
    error = spec_error(otree.supervisor, "s", max_restarts=-1)
    assert str(error) == "s: max_restarts must be an integer >= 0; got -1"


@pytest.mark.parametrize(("value", "shown"), [(1.5, "1.5"), (True, "True"), ("3", "'3'"), (None, "None")])
def test_max_restarts_not_an_int(value: object, shown: str) -> None:
    error = spec_error(otree.supervisor, "s", max_restarts=value)
    assert str(error) == f"s: max_restarts must be an integer >= 0; got {shown}"


def test_max_restarts_zero_valid() -> None:
    assert otree.supervisor("s", max_restarts=0).max_restarts == 0


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0, "0"), (0.0, "0.0"), (-1.0, "-1.0"), (math.nan, "nan"), (math.inf, "inf"), ("5", "'5'")],
)
def test_max_seconds_not_positive(value: object, shown: str) -> None:
    error = spec_error(otree.supervisor, "s", max_seconds=value)
    assert str(error) == f"s: max_seconds must be a number > 0; got {shown}"


def test_max_seconds_small_valid() -> None:
    assert otree.supervisor("s", max_seconds=0.001).max_seconds == 0.001


@pytest.mark.parametrize(("value", "shown"), [(-1, "-1"), (1.0, "1.0"), (True, "True"), ("2", "'2'")])
def test_max_children_bad_value(value: object, shown: str) -> None:
    error = spec_error(otree.supervisor, "s", max_children=value)
    assert str(error) == f"s: max_children must be None or an integer >= 0; got {shown}"


def test_max_children_exceeded() -> None:
    children = [otree.task("a", idle), otree.task("b", idle), otree.task("c", idle)]
    error = spec_error(otree.supervisor, "s", max_children=2, children=children)
    assert str(error) == "s: children must number at most max_children=2; got 3"


def test_max_children_exactly_full_valid() -> None:
    tree = otree.supervisor("s", max_children=2, children=[otree.task("a", idle), otree.task("b", idle)])
    assert len(tree.children) == 2
    assert otree.supervisor("s", max_children=0).max_children == 0


def test_duplicate_sibling_ids() -> None:
    children = [otree.task("a", idle), otree.task("b", idle), otree.task("a", greet, "x")]
    error = spec_error(otree.supervisor, "parent", children=children)
    assert str(error) == "parent/a: id must be unique among siblings; got 'a'"


def test_duplicate_sibling_ids_across_kinds() -> None:
    children = [otree.supervisor("db"), otree.task("db", idle)]
    error = spec_error(otree.supervisor, "parent", children=children)
    assert str(error) == "parent/db: id must be unique among siblings; got 'db'"


def test_same_id_in_different_branches_valid() -> None:
    tree = otree.supervisor(
        "root",
        children=[
            otree.supervisor("x", children=[otree.task("a", idle)]),
            otree.supervisor("y", children=[otree.task("a", idle)]),
        ],
    )
    assert [child.id for child in tree.children] == ["x", "y"]


def test_child_not_a_spec() -> None:
    error = spec_error(otree.supervisor, "s", children=[otree.task("a", idle), "b"])
    assert str(error) == "s: children must hold child specs (otree.task, otree.process...); got 'b'"


def test_children_not_a_list() -> None:
    error = spec_error(otree.supervisor, "s", children="ab")
    assert str(error) == "s: children must be a list of child specs; got 'ab'"


def test_children_not_a_list_by_hand() -> None:
    error = spec_error(otree.SupervisorSpec, id="s", children={"a": 1})
    assert str(error) == "s: children must be a list of child specs; got {'a': 1}"


def test_children_list_becomes_tuple() -> None:
    child = otree.task("a", idle)
    assert otree.SupervisorSpec(id="s", children=[child]).children == (child,)  # type: ignore[arg-type]


def test_backoff_not_a_backoff() -> None:
    error = spec_error(otree.supervisor, "s", backoff=0.5)
    assert str(error) == "s: backoff must be None or an otree.Backoff; got 0.5"


# --- nested supervisors ------------------------------------------------------------


def test_nested_supervisor_duplicate_ids() -> None:
    # The inner builder runs (and fails) before the outer one sees it: the path starts at the inner id.
    with pytest.raises(otree.SpecError) as info:
        otree.supervisor(
            "outer",
            children=[otree.supervisor("inner", children=[otree.task("a", idle), otree.task("a", idle)])],
        )
    assert str(info.value) == "inner/a: id must be unique among siblings; got 'a'"


def test_nested_supervisor_bad_field() -> None:
    with pytest.raises(otree.SpecError) as info:
        otree.supervisor("outer", children=[otree.supervisor("inner", max_seconds=0)])
    assert str(info.value) == "inner: max_seconds must be a number > 0; got 0"


def test_nested_supervisor_bad_task() -> None:
    with pytest.raises(otree.SpecError) as info:
        otree.supervisor("outer", children=[otree.supervisor("inner", children=[otree.task("a", 42)])])  # type: ignore[arg-type]
    assert str(info.value) == "a: fn must be an async function; got 42"


def test_nested_supervisor_significant_child_names_parent() -> None:
    inner = otree.supervisor("inner", restart="transient", significant=True)
    error = spec_error(otree.supervisor, "outer", children=[inner])
    assert error.path == "outer/inner"
    assert error.field == "significant=True"


# --- task fn and args -----------------------------------------------------------------


@pytest.mark.parametrize(("fn", "shown"), [(42, "42"), (None, "None"), ("idle", "'idle'")])
def test_task_fn_not_callable(fn: object, shown: str) -> None:
    error = spec_error(otree.task, "a", fn)
    assert str(error) == f"a: fn must be an async function; got {shown}"


def test_task_fn_sync_function() -> None:
    error = spec_error(otree.task, "a", not_async)
    assert str(error) == f"a: fn must be an async function; got {not_async!r}"


def test_task_fn_sync_returning_coroutine() -> None:
    def starts_idle() -> Coroutine[Any, Any, None]:
        return idle()

    error = spec_error(otree.task, "a", starts_idle)
    assert str(error) == f"a: fn must be an async function; got {starts_idle!r}"


def test_task_fn_sync_builtin() -> None:
    error = spec_error(otree.task, "a", print)
    assert str(error) == "a: fn must be an async function; got <built-in function print>"


def test_task_fn_sync_partial() -> None:
    fn = functools.partial(not_async)
    error = spec_error(otree.task, "a", fn)
    assert str(error) == f"a: fn must be an async function; got {fn!r}"


def test_task_fn_sync_staticmethod() -> None:
    class Holder:
        @staticmethod
        def tick() -> None:
            pass

    error = spec_error(otree.task, "a", Holder.tick)
    assert error.field == "fn"


def test_task_fn_sync_bound_method() -> None:
    class Agent:
        def loop(self) -> None:
            pass

    agent = Agent()
    error = spec_error(otree.task, "a", agent.loop)
    assert str(error) == f"a: fn must be an async function; got {agent.loop!r}"


def test_task_fn_sync_classmethod() -> None:
    class Holder:
        @classmethod
        def tick(cls) -> None:
            pass

    error = spec_error(otree.task, "a", Holder.tick)
    assert error.field == "fn"


def test_task_fn_sync_callable_instance() -> None:
    class Ticker:
        def __call__(self) -> None:
            pass

    ticker = Ticker()
    error = spec_error(otree.task, "a", ticker)
    assert str(error) == f"a: fn must be an async function; got {ticker!r}"


def test_task_fn_async_variants_valid() -> None:
    class Agent:
        async def loop(self) -> None:
            await trio.sleep_forever()

    class Callable:
        async def __call__(self) -> None:
            await trio.sleep_forever()

    for fn in (idle, functools.partial(greet, "x"), Agent().loop, Callable()):
        assert otree.task("a", fn).fn is fn


def test_task_args_too_many() -> None:
    error = spec_error(otree.task, "a", idle, 1)
    assert str(error) == "a: args must fit idle() -> 'None' (too many positional arguments); got (1,)"


def test_task_args_missing() -> None:
    error = spec_error(otree.task, "a", greet)
    assert str(error) == (
        "a: args must fit greet(name: 'str', times: 'int' = 1) -> 'None' "
        "(missing a required argument: 'name'); got ()"
    )


def test_task_args_too_many_for_defaults() -> None:
    error = spec_error(otree.task, "a", greet, "x", 2, 3)
    assert error.field == "args"
    assert error.got == ("x", 2, 3)
    assert str(error).endswith("(too many positional arguments); got ('x', 2, 3)")


def test_task_args_fit() -> None:
    assert otree.task("a", greet, "x").args == ("x",)
    assert otree.task("a", greet, "x", 2).args == ("x", 2)
    assert otree.task("a", functools.partial(greet, times=3), "x").args == ("x",)


def test_task_args_not_a_tuple_by_hand() -> None:
    error = spec_error(otree.TaskSpec, id="a", fn=greet, args=["x"])
    assert str(error) == "a: args must be a tuple; got ['x']"


def test_task_args_filling_task_status_rejected() -> None:
    async def positional_status(
        name: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()

    error = spec_error(otree.task, "a", positional_status, "x", "y")
    assert error.field == "args"
    assert error.got == ("x", "y")
    assert str(error).endswith("(multiple values for argument 'task_status'); got ('x', 'y')")


# --- task_status detection -------------------------------------------------------------


def test_task_detects_task_status() -> None:
    spec = otree.task("a", ready_first, "x")
    assert spec.fn is ready_first
    assert spec.args == ("x",)
    assert takes_task_status(ready_first) is True
    assert takes_task_status(functools.partial(ready_first, "x")) is True


def test_task_without_task_status() -> None:
    assert takes_task_status(idle) is False
    assert takes_task_status(greet) is False


def test_task_status_without_default_accepted() -> None:
    async def strict_status(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()

    assert otree.task("a", strict_status).fn is strict_status


def test_task_status_unhashable_callable() -> None:
    @dataclasses.dataclass
    class Job:
        name: str

        async def __call__(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()

    job = Job("x")
    assert otree.task("a", job).fn is job
    assert takes_task_status(job) is True


# --- Backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["initial", "maximum", "reset_after"])
@pytest.mark.parametrize(("value", "shown"), [(-1, "-1"), (math.nan, "nan"), ("1", "'1'"), (True, "True")])
def test_backoff_non_negative_fields(field: str, value: object, shown: str) -> None:
    error = spec_error(otree.Backoff, **{field: value})
    assert str(error) == f"backoff: {field} must be a number >= 0; got {shown}"


@pytest.mark.parametrize(("value", "shown"), [(0.5, "0.5"), (0, "0"), (math.nan, "nan"), ("2", "'2'")])
def test_backoff_factor_below_one(value: object, shown: str) -> None:
    error = spec_error(otree.Backoff, factor=value)
    assert str(error) == f"backoff: factor must be a number >= 1; got {shown}"


@pytest.mark.parametrize(
    ("value", "shown"), [(-0.1, "-0.1"), (1.5, "1.5"), (math.nan, "nan"), (None, "None")]
)
def test_backoff_jitter_out_of_range(value: object, shown: str) -> None:
    error = spec_error(otree.Backoff, jitter=value)
    assert str(error) == f"backoff: jitter must be a number in [0, 1]; got {shown}"


def test_backoff_defaults_and_bounds() -> None:
    backoff = otree.Backoff()
    assert (backoff.initial, backoff.maximum, backoff.factor, backoff.jitter, backoff.reset_after) == (
        0.1,
        30.0,
        2.0,
        0.1,
        60.0,
    )
    edge = otree.Backoff(initial=0, maximum=0, factor=1, jitter=1, reset_after=0)
    assert otree.supervisor("s", backoff=edge).backoff is edge
    assert otree.Backoff(jitter=0).jitter == 0


@pytest.mark.parametrize(("value", "shown"), [(-1, "-1"), (math.inf, "inf"), (math.nan, "nan"), ("2", "'2'")])
def test_backoff_step_not_a_number(value: object, shown: str) -> None:
    error = spec_error(otree.Backoff, factor=1, step=value)
    assert str(error) == f"backoff: step must be a number >= 0; got {shown}"


def test_backoff_step_needs_factor_one() -> None:
    error = spec_error(otree.Backoff, step=5)
    assert str(error) == "backoff: step must be 0 unless factor is 1 (a linear backoff); got 5"
    assert otree.Backoff(initial=1, factor=1, step=5).step == 5


def test_backoff_jitter_mode() -> None:
    error = spec_error(otree.Backoff, jitter_mode="up")
    assert str(error) == "backoff: jitter_mode must be one of 'symmetric', 'down'; got 'up'"
    assert otree.Backoff().jitter_mode == "symmetric"


@pytest.mark.parametrize(
    ("delays", "shown"), [([1, -1], "[1, -1]"), ([math.inf], "[inf]"), ("30", "'30'"), ([None], "[None]")]
)
def test_backoff_schedule_bad_delays(delays: object, shown: str) -> None:
    error = spec_error(otree.Backoff.schedule, delays)
    assert str(error) == f"backoff: delays must be a list of seconds >= 0; got {shown}"


def test_backoff_schedule_empty() -> None:
    error = spec_error(otree.Backoff.schedule, [])
    assert str(error) == "backoff: delays must be a non-empty list of seconds >= 0; got []"


def test_backoff_schedule_is_described_by_its_first_and_largest_delay() -> None:
    backoff = otree.Backoff.schedule([0, 120, 30], reset_after=10)
    assert (backoff.delays, backoff.initial, backoff.maximum, backoff.factor, backoff.jitter) == (
        (0, 120, 30),
        0,
        120,
        1.0,
        0.0,
    )
    assert backoff.reset_after == 10
    # a schedule decides alone: the other growth fields are set to describe it
    assert otree.Backoff(delays=[0, 120, 30], initial=5, jitter=0.0) == otree.Backoff.schedule([0, 120, 30])  # type: ignore[arg-type]
    assert otree.pool("jobs", {"w": idle_job}, backoff=backoff).backoff is backoff


async def idle_job(payload: object) -> None:
    await trio.sleep_forever()


# --- pool queue policies ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("on_full", "x", "must be one of 'reject', 'drop_oldest'"),
        ("on_duplicate_key", "merge", "must be one of 'keep', 'replace'"),
        ("on_circuit_open", None, "must be one of 'hold', 'reject'"),
        ("budget_rule", "<=", "must be one of 'le', 'lt'"),
        ("refuse_dead_keys", 1, "must be True or False"),
        ("max_starts_per_second", 0, "must be None or a number > 0"),
        ("max_starts_per_second", math.inf, "must be None or a number > 0"),
        ("max_starts_per_second", "5", "must be None or a number > 0"),
        ("max_starts_per_second", True, "must be None or a number > 0"),
    ],
)
def test_pool_queue_policy_errors(field: str, value: object, rule: str) -> None:
    error = spec_error(otree.pool, "jobs", {"w": idle_job}, **{field: value})
    assert str(error) == f"jobs: {field} {rule}; got {value!r}"
    assert (error.path, error.field) == ("jobs", field)


def test_pool_queue_policy_defaults_and_values() -> None:
    spec = otree.pool("jobs", {"w": idle_job})
    assert (
        spec.on_full,
        spec.on_duplicate_key,
        spec.on_circuit_open,
        spec.refuse_dead_keys,
        spec.max_starts_per_second,
        spec.budget_rule,
    ) == ("reject", "keep", "hold", False, None, "le")
    policies: dict[str, Any] = {
        "on_full": "drop_oldest",
        "on_duplicate_key": "replace",
        "on_circuit_open": "reject",
        "refuse_dead_keys": True,
        "max_starts_per_second": 0.5,
        "budget_rule": "lt",
    }
    spec = otree.pool("jobs", {"w": idle_job}, **policies)
    assert {name: getattr(spec, name) for name in policies} == policies
    assert spec == otree.PoolSpec(id="jobs", handlers={"w": idle_job}, **policies)
    with pytest.raises(otree.SpecError, match="jobs: on_full must be one of"):
        otree.PoolSpec(id="jobs", handlers={"w": idle_job}, on_full="drop_newest")  # type: ignore[arg-type]


# --- specs by hand, frozen, defaults ------------------------------------------------


def test_spec_by_hand_validated() -> None:
    error = spec_error(otree.TaskSpec, id="a", fn=idle, shutdown=-2)
    assert str(error) == f"a: {SHUTDOWN_RULE}; got -2"
    error = spec_error(otree.SupervisorSpec, id="s", strategy="nope")
    assert error.path == "s"
    assert error.field == "strategy"


def test_spec_by_hand_checks_children() -> None:
    error = spec_error(otree.SupervisorSpec, id="s", children=(otree.task("a", idle), otree.task("a", idle)))
    assert str(error) == "s/a: id must be unique among siblings; got 'a'"


def test_task_spec_frozen() -> None:
    spec = otree.task("a", idle)
    with pytest.raises(AttributeError):
        spec.id = "b"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        spec.shutdown = 1.0  # type: ignore[misc]
    assert spec.id == "a"


def test_supervisor_spec_frozen() -> None:
    spec = otree.supervisor("s", children=[otree.task("a", idle)])
    with pytest.raises(AttributeError):
        spec.children = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        spec.max_restarts = 10  # type: ignore[misc]
    assert len(spec.children) == 1


def test_backoff_frozen() -> None:
    backoff = otree.Backoff()
    with pytest.raises(AttributeError):
        backoff.initial = 1.0  # type: ignore[misc]


def test_specs_equal_as_values() -> None:
    assert otree.task("a", greet, "x") == otree.task("a", greet, "x")
    assert otree.task("a", greet, "x") != otree.task("a", greet, "y")


def test_task_defaults() -> None:
    spec = otree.task("a", idle)
    assert spec.kind == "task"
    assert spec.restart == "permanent"
    assert spec.shutdown == 5.0
    assert spec.significant is False
    assert spec.args == ()
    assert otree.TaskSpec(id="a", fn=idle) == spec


def test_supervisor_defaults() -> None:
    spec = otree.supervisor("s")
    assert spec.kind == "supervisor"
    assert spec.restart == "permanent"
    assert spec.shutdown == "infinity"
    assert spec.significant is False
    assert spec.strategy == "one_for_one"
    assert spec.max_restarts == 3
    assert spec.max_seconds == 5.0
    assert spec.max_children is None
    assert spec.auto_shutdown == "never"
    assert spec.backoff is None
    assert spec.children == ()
    assert otree.SupervisorSpec(id="s") == spec


def test_task_keeps_given_fields() -> None:
    spec = otree.task("a", greet, "x", 2, restart="transient", shutdown="brutal_kill", significant=True)
    assert (spec.restart, spec.shutdown, spec.significant, spec.args) == (
        "transient",
        "brutal_kill",
        True,
        ("x", 2),
    )


# --- SpecError ---------------------------------------------------------------------------


def test_spec_error_attributes() -> None:
    error = spec_error(otree.task, "alice", idle, shutdown=-1)
    assert error.path == "alice"
    assert error.field == "shutdown"
    assert error.expected == 'must be >= 0, "brutal_kill" or "infinity"'
    assert error.got == -1
    assert str(error) == 'alice: shutdown must be >= 0, "brutal_kill" or "infinity"; got -1'
    assert isinstance(error, otree.OtreeError)


def test_spec_error_message_format() -> None:
    error = otree.SpecError("p/c", "field", "must be right", ["x"])
    assert str(error) == "p/c: field must be right; got ['x']"
    assert error.got == ["x"]
