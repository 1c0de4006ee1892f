"""Reload: deciding what changed (pure) and applying it to a running tree in OTP order."""

from __future__ import annotations

import functools
import textwrap
from typing import Any

import trio

import otree
from otree._reload import plan_reload, same_value
from otree._run import reload_tree

from .helpers import Log, crash_after, states, worker


def compile_function(source: str, name: str = "agent") -> Any:
    namespace: dict[str, Any] = {"__name__": "tree_module"}
    exec(compile(textwrap.dedent(source), "tree.py", "exec"), namespace)
    return namespace[name]


BODY = """
async def agent(name, delay=1.0):
    return name * 2
"""


def test_a_function_imported_afresh_is_the_same() -> None:
    assert same_value(compile_function(BODY), compile_function(BODY))


def test_a_moved_function_is_the_same() -> None:
    assert same_value(compile_function(BODY), compile_function("\n\n\n# moved down\n" + BODY))


def test_an_edited_body_or_default_is_a_change() -> None:
    assert not same_value(compile_function(BODY), compile_function(BODY.replace("* 2", "* 3")))
    assert not same_value(compile_function(BODY), compile_function(BODY.replace("1.0", "2.0")))
    assert not same_value(compile_function(BODY), compile_function(BODY.replace("agent", "other"), "other"))


def test_nested_code_is_compared() -> None:
    source = """
    def agent():
        def inner():
            return 1
        return inner
    """
    assert same_value(compile_function(source), compile_function(source))
    assert not same_value(compile_function(source), compile_function(source.replace("return 1", "return 2")))


def test_values_compare_by_equality_through_containers_and_partials() -> None:
    fn = compile_function(BODY)
    again = compile_function(BODY)
    assert same_value(functools.partial(fn, 1, k=[1]), functools.partial(again, 1, k=[1]))
    assert not same_value(functools.partial(fn, 1), functools.partial(again, 2))
    assert same_value({"a": (1, fn)}, {"a": (1, again)})
    assert not same_value((1, 2), [1, 2])
    assert not same_value({"a": 1}, {"b": 1})


def test_specs_compare_field_by_field() -> None:
    fn = compile_function(BODY)
    again = compile_function(BODY)
    assert same_value(otree.task("a", fn, "x"), otree.task("a", again, "x"))
    assert not same_value(otree.task("a", fn, "x"), otree.task("a", again, "y"))
    assert not same_value(otree.task("a", fn, "x"), otree.task("a", again, "x", shutdown=9.0))


def test_plan_reload_orders_its_lists() -> None:
    fn = compile_function(BODY)
    current = [otree.task(i, fn, i) for i in ("a", "b", "c", "d")]
    current.append(otree.supervisor("s", children=[otree.task("x", fn, "x")]))
    new = [
        otree.task("e", fn, "e"),
        otree.task("b", fn, "changed"),
        otree.task("a", fn, "a"),
        otree.supervisor("s", strategy="one_for_all", children=[otree.task("x", fn, "x")]),
        otree.task("d", fn, "d", restart="transient"),
    ]
    plan = plan_reload(current, new)
    assert plan.removed == ["c"]
    assert plan.changed == ["b", "d"]
    assert plan.added == ["e"]
    assert plan.nested == ["s"]
    assert plan.order == ["e", "b", "a", "s", "d"]


def test_a_kind_change_is_a_change_not_a_nested_reload() -> None:
    fn = compile_function(BODY)
    plan = plan_reload([otree.task("s", fn, "s")], [otree.supervisor("s", children=[])])
    assert plan.changed == ["s"] and plan.nested == []


async def test_reload_applies_in_otp_order(autojump_clock: trio.abc.Clock) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        children=[
            otree.task("a", worker, log, "a"),
            otree.task("b", worker, log, "b"),
            otree.task("c", worker, log, "c"),
            otree.supervisor("s", children=[otree.task("x", worker, log, "x")]),
        ],
    )
    new = otree.supervisor(
        "root",
        max_restarts=7,
        children=[
            otree.task("a", worker, log, "a"),
            otree.task("b", worker, log, "b2"),
            otree.task("n", worker, log, "n"),
            otree.supervisor(
                "s", children=[otree.task("x", worker, log, "x2"), otree.task("y", worker, log, "y")]
            ),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        log.clear()
        async with sup.events() as events:
            summary = await reload_tree(sup, new)
            assert summary == {
                "changed": ["root", "root/b", "root/s/x"],  # root: its max_restarts
                "removed": ["root/c"],
                "added": ["root/n", "root/s/y"],
                "failed": [],
            }
            # removed and changed stop in reverse start order, then start in the new order
            assert log.of("stop") == ["c", "b", "x"]
            assert log.of("start") == ["b2", "n", "x2", "y"]
            assert [c.id for c in reversed(sup.which_children())] == ["a", "b", "n", "s"]
            assert states(sup) == {"a": "running", "b": "running", "n": "running", "s": "running"}
            assert sup._sup().window.max_restarts == 7
            kinds = []
            async for event in events:
                kinds.append((event.path, event.kind))
                if event.path == "root" and event.kind == "supervisor.reloaded":
                    break
            assert ("root/s", "supervisor.reloaded") in kinds


async def test_reload_keeps_a_hand_stopped_child_stopped_and_the_restart_window(
    autojump_clock: trio.abc.Clock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        max_restarts=3,
        max_seconds=100,
        children=[otree.task("a", worker, log, "a"), otree.task("bad", crash_after, log, "bad", 1.0)],
    )
    async with otree.open_supervisor(tree) as sup:
        await trio.sleep(2.5)  # two crashes of "bad" restarted: two restarts in the window
        assert sup._sup().window.in_window(trio.current_time()) == 2
        await sup.terminate_child("a")
        new = otree.supervisor(
            "root",
            max_restarts=3,
            max_seconds=100,
            children=[otree.task("a", worker, log, "a2"), otree.task("bad", crash_after, log, "bad", 1.0)],
        )
        summary = await reload_tree(sup, new)
        assert summary["changed"] == ["root/a"]
        assert states(sup)["a"] == "stopped"
        assert sup.get_childspec("a").args == (log, "a2")
        assert sup._sup().window.in_window(trio.current_time()) == 2
        await sup.restart_child("a")
        assert log.of("start")[-1] == "a2"


async def test_a_failed_start_is_reported_and_the_rest_applied(autojump_clock: trio.abc.Clock) -> None:
    log = Log()

    async def never_ready(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise RuntimeError("cannot start")

    tree = otree.supervisor("root", children=[otree.task("a", worker, log, "a")])
    new = otree.supervisor(
        "root",
        children=[
            otree.task("a", worker, log, "a"),
            otree.task("f", never_ready),
            otree.task("g", worker, log, "g"),
        ],
    )
    async with otree.open_supervisor(tree) as sup:
        summary = await reload_tree(sup, new)
        assert summary["failed"] == ["root/f: failed to start: RuntimeError: cannot start"]
        assert states(sup) == {"a": "running", "f": "stopped", "g": "running"}


async def test_a_reload_during_a_group_restarts_backoff_starts_the_stranded_siblings(
    autojump_clock: trio.abc.Clock,
) -> None:
    log = Log()
    tree = otree.supervisor(
        "root",
        strategy="one_for_all",
        backoff=otree.Backoff(initial=5.0, jitter=0.0),
        children=[
            otree.task("crasher", crash_after, log, "crasher", 1.0),
            otree.task("sib", worker, log, "sib"),
        ],
    )
    fixed = otree.supervisor(
        "root",
        strategy="one_for_all",
        backoff=otree.Backoff(initial=5.0, jitter=0.0),
        children=[otree.task("crasher", worker, log, "fixed"), otree.task("sib", worker, log, "sib")],
    )
    async with otree.open_supervisor(tree) as sup:
        await trio.sleep(2.0)  # crashed at 1.0: the group waits until 6.0 to start again
        assert states(sup) == {"crasher": "restarting", "sib": "stopped"}
        summary = await reload_tree(sup, fixed)
        assert summary["changed"] == ["root/crasher"]
        assert states(sup) == {"crasher": "running", "sib": "running"}
        await trio.sleep(10.0)  # and the cancelled backoff does not start anything twice
        assert log.of("start").count("sib") == 2 and log.of("start").count("fixed") == 1
