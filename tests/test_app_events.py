"""Events from the application: `current_child().emit` in tasks and jobs, `OTREE_EVENT=` from processes."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import otree
from otree._appevents import MAX_DEPTH, MAX_DETAILS, app_event, parse_notify_event
from otree._info import Event
from otree._logfiles import read_events

PY = sys.executable


def app_events(events: list[Event]) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [(e.path, e.kind, e.reason, e.details) for e in events if e.kind.startswith("app.")]


def logged(state: Path) -> list[Event]:
    items = list(read_events(state))
    assert all(isinstance(item, Event) for item in items), items
    return [item for item in items if isinstance(item, Event)]


async def collect_until(stream: otree.EventStream, kind: str) -> list[Event]:
    """The events of ``stream`` up to and including the first of ``kind``."""
    seen = []
    async for event in stream:
        seen.append(event)
        if event.kind == kind:
            return seen
    raise AssertionError(f"no {kind} event in {seen}")


# --- task children --------------------------------------------------------------------------


async def decider(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ready at once; at t=1 it emits from its own task, then from a task it started, then stops."""
    me = otree.current_child()
    task_status.started()
    await trio.sleep(1)
    choices = ["resume"]
    me.emit("app.decision", reason="idle", choice=choices, n=1, ratio=0.5, ok=True, none=None)
    choices.append("changed after the emit")  # the event keeps what was sent
    async with trio.open_nursery() as nursery:
        nursery.start_soon(helper)
    # details named like the event's own fields are details like any other
    me.emit("app.fields", path="/tmp/x", kind="k", nested={"a": [1, {"b": "c"}]})
    raise otree.Shutdown("done")


async def helper() -> None:
    otree.current_child().emit("app.helper.said")


async def test_a_task_childs_events_reach_subscribers_and_the_event_log(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tree = otree.supervisor("t", children=[otree.task("d", decider, restart="transient")])
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        stream = sup.events()
        seen = await collect_until(stream, "child.exited")
    expected = [
        (
            "t/d",
            "app.decision",
            "idle",
            {"choice": ["resume"], "n": 1, "ratio": 0.5, "ok": True, "none": None},
        ),
        ("t/d", "app.helper.said", "", {}),
        ("t/d", "app.fields", "", {"path": "/tmp/x", "kind": "k", "nested": {"a": [1, {"b": "c"}]}}),
    ]
    assert app_events(seen) == expected
    assert [e.kind for e in seen][-1] == "child.exited"  # the events came before the exit
    assert app_events(logged(tmp_path)) == expected


async def test_a_pool_jobs_events_carry_the_jobs_path(autojump_clock: trio.testing.MockClock) -> None:
    async def step(payload: int) -> int:
        otree.current_child().emit("app.step", reason="begin", n=payload)
        await trio.sleep(1)
        return payload

    tree = otree.supervisor("t", children=[otree.pool("jobs", {"step": step})])
    async with otree.open_supervisor(tree) as sup:
        stream = sup.events()
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        job = pool.submit_nowait("step", 7)
        assert await job.result() == 7
        seen = await collect_until(stream, "job.finished")
    assert app_events(seen) == [(f"t/jobs/{job.id}", "app.step", "begin", {"n": 7})]


class Unplain:
    pass


@pytest.mark.parametrize(
    ("kind", "reason", "details", "wrong"),
    [
        ("decision", "", {}, "kind 'decision' is not an application kind"),
        ("app", "", {}, "kind 'app' is not an application kind"),
        ("app.", "", {}, "kind 'app.' is not"),
        ("app.Decision", "", {}, "kind 'app.Decision' is not"),
        ("app.a-b", "", {}, "kind 'app.a-b' is not"),
        ("app..a", "", {}, "kind 'app..a' is not"),
        ("child.exited", "", {}, "kind 'child.exited' is not"),
        ("app." + "x" * 100, "", {}, "at most 100 characters"),
        (3, "", {}, "kind 3 is not"),
        ("app.x", 5, {}, "reason must be a str of at most 100 characters; got 5"),
        ("app.x", "r" * 101, {}, "reason must be a str"),
        ("app.x", "", {"when": datetime.date(2026, 1, 1)}, "detail when is a date, not a plain value"),
        ("app.x", "", {"v": [1, Unplain()]}, "detail v[1] is a Unplain, not a plain value"),
        ("app.x", "", {"v": {"a": {"b": math.nan}}}, "detail v['a']['b'] is nan, which JSON cannot hold"),
        ("app.x", "", {"v": math.inf}, "detail v is inf"),
        ("app.x", "", {"v": {1: "a"}}, "detail v has the key 1: keys must be str"),
        ("app.x", "", {"v": {1, 2}}, "detail v is a set"),
        ("app.x", "", {"v": b"bytes"}, "detail v is a bytes"),
        ("app.x", "", {"v": "x" * MAX_DETAILS}, f"details are {MAX_DETAILS + 8} bytes of JSON; at most 4096"),
    ],
)
async def test_emit_refuses_a_bad_kind_reason_or_detail_naming_the_child(
    kind: Any, reason: Any, details: dict[str, Any], wrong: str, autojump_clock: trio.testing.MockClock
) -> None:
    outcome: list[BaseException] = []

    async def emitter(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            otree.current_child().emit(kind, reason=reason, **details)
        except ValueError as error:
            outcome.append(error)
        await trio.sleep_forever()

    tree = otree.supervisor("t", children=[otree.task("e", emitter)])
    async with otree.open_supervisor(tree) as sup:
        stream = sup.events()
        await trio.sleep(1)
        await sup.terminate_child("e")
        seen = await collect_until(stream, "child.stopped")
    (error,) = outcome
    assert str(error).startswith("t/e: emit: "), error
    assert wrong in str(error), error
    assert app_events(seen) == []  # nothing was published


def test_a_cyclic_detail_is_refused_by_its_depth() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match=f"detail v(\\[0\\])+ is nested more than {MAX_DEPTH} deep"):
        app_event("app.x", "", {"v": loop})


def test_a_subclass_json_cannot_encode_is_refused() -> None:
    class Text(str):
        pass

    with pytest.raises(ValueError, match=r"details are not plain JSON: .*Text"):
        app_event("app.x", "", {"v": Text("a")})


def test_plain_details_at_the_bounds_are_taken() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_DEPTH - 1):
        deep = [deep]
    padded = {"v": "x" * (MAX_DETAILS - 8)}  # {"v":"..."} is 8 bytes around the text
    assert app_event("app.a_1.b2", "", {"v": deep}) == ("app.a_1.b2", "", {"v": deep})
    assert app_event("app.x", "", padded) == ("app.x", "", padded)
    assert app_event("app.x", "", {"t": (1, (2,))}) == ("app.x", "", {"t": [1, [2]]})  # tuples become lists


@pytest.mark.parametrize(
    ("value", "event"),
    [
        ('app.step {"n": 1}', ("app.step", "", {"n": 1})),
        ("app.step", ("app.step", "", {})),
        ("app.step   ", ("app.step", "", {})),
        ('app.wake {"reason": "message", "from": "ada"}', ("app.wake", "message", {"from": "ada"})),
        ('app.s {"s": "a\u2028b"}', ("app.s", "", {"s": "a\u2028b"})),
    ],
)
def test_notify_event_lines_parse(value: str, event: tuple[str, str, dict[str, Any]]) -> None:
    assert parse_notify_event(value) == event


@pytest.mark.parametrize(
    ("value", "wrong"),
    [
        ('step {"n": 1}', "kind 'step' is not an application kind"),
        ("", "kind '' is not"),
        ("app.step [1]", "details must be a JSON object; got a list"),
        ('app.step {"n": ', "details are not JSON"),
        ("app.step {'n': 1}", "details are not JSON"),
        ('app.step {"n": NaN}', "details are not JSON"),
        ('app.step {"reason": 3}', "reason must be a str"),
        ("app.step " + "[" * 40 + "]" * 40, "details must be a JSON object"),
        ('app.step {"v": ' + "[" * 40 + "]" * 40 + "}", "nested more than 32 deep"),
    ],
)
def test_malformed_notify_event_lines_say_what_is_wrong(value: str, wrong: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_notify_event(value)
    assert wrong in str(info.value)


# --- process children and process jobs ------------------------------------------------------------

SENDER = """
import json, os, signal, socket, sys
def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), os.environ["NOTIFY_SOCKET"])
"""


@pytest.fixture
def marker() -> Iterator[str]:
    """Marks the test's processes; any still running at the end is killed and fails the test."""
    value = uuid.uuid4().hex
    yield value
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if f"OTREE_TEST_MARKER={value}".encode() in Path(f"/proc/{entry}/environ").read_bytes():
                    left.append(int(entry))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes left running: {left}"


async def test_a_process_childs_otree_event_lines_are_events_and_malformed_ones_ignored(
    tmp_path: Path, marker: str
) -> None:
    code = SENDER + (
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "notify('READY=1')\n"
        "signal.sigwait({signal.SIGUSR1})  # the test has subscribed to events\n"
        "notify('OTREE_EVENT=app.step {\"n\": 1}')\n"
        "notify('OTREE_EVENT=step {\"n\": 1}')\n"
        "notify('OTREE_EVENT=app.step [1]')\n"
        "notify('OTREE_EVENT=app.step {\"n\": ')\n"
        'notify(\'OTREE_EVENT=app.step {"pad": "\' + "x" * 5000 + \'"}\')\n'
        'notify(\'WATCHDOG=1\\nOTREE_EVENT=app.wake {"reason": "message", "s": "a\\u2028b"}\\n\')\n'
        "notify('OTREE_EVENT=app.done')\n"
        "signal.sigwait({signal.SIGUSR1})\n"
    )
    child = otree.process("p", [PY, "-c", code], env={"OTREE_TEST_MARKER": marker}, ready="notify")
    tree = otree.supervisor("t", children=[child])
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        stream = sup.events()
        (info,) = sup.which_children()
        assert info.pid is not None
        os.kill(info.pid, signal.SIGUSR1)
        with trio.fail_after(10):
            seen = await collect_until(stream, "app.done")
    told = [
        (e.kind, e.reason, e.details.get("detail", e.details))
        for e in seen
        if e.kind.startswith("app.") or e.kind == "notify.ignored"
    ]
    assert told == [
        ("app.step", "", {"n": 1}),
        (
            "notify.ignored",
            "malformed",
            "kind 'step' is not an application kind: 'app.' then dot-separated "
            "words of a-z, 0-9 and _ (at most 100 characters), e.g. 'app.decision'",
        ),
        ("notify.ignored", "malformed", "details must be a JSON object; got a list"),
        ("notify.ignored", "malformed", "details are not JSON: Input data was truncated"),
        ("notify.ignored", "malformed", "over 4096 bytes"),
        ("app.wake", "message", {"s": "a\u2028b"}),
        ("app.done", "", {}),
    ]
    assert {e.path for e in seen if e.kind.startswith(("app.", "notify."))} == {"t/p"}
    assert app_events(logged(tmp_path)) == app_events(seen)


async def test_a_process_jobs_otree_event_carries_the_jobs_path(tmp_path: Path, marker: str) -> None:
    code = SENDER + (
        "n = json.load(sys.stdin)\n"
        "notify('OTREE_EVENT=app.step {\"n\": %d}' % n)\n"
        "notify('OTREE_EVENT=step')\n"
        "print(n)\n"
    )
    handler = otree.process_job([PY, "-c", code], env={"OTREE_TEST_MARKER": marker})
    tree = otree.supervisor("t", children=[otree.pool("jobs", {"run": handler})])
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        stream = sup.events()
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        job = pool.submit_nowait("run", 1)
        with trio.fail_after(10):
            assert await job.result() == 1
            seen = await collect_until(stream, "job.finished")
    path = f"t/jobs/{job.id}"
    assert app_events(seen) == [(path, "app.step", "", {"n": 1})]
    (ignored,) = [e for e in seen if e.kind == "notify.ignored"]
    assert (ignored.path, ignored.reason, ignored.details["message"]) == (
        path,
        "malformed",
        "OTREE_EVENT=step",
    )
    assert app_events(logged(tmp_path)) == app_events(seen)
