"""Lanes inside a pool (issue 11, item 1): the pure ``Line`` against a plain model, and the pool
with lanes on trio's MockClock: one turn per agent at a time, a lane's breaker and FIFO retry
holding only their lane, the budget and the pool's breaker still holding everything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import otree
import otree._lanes
from otree._intensity import CircuitState
from otree._lanes import Line
from otree._render import render_jobs, render_status
from otree._status import jobs_of, status_of
from tests.test_control_server import Gate, serving

# --- the pure line against a model ------------------------------------------------------------


class _ModelLane:
    def __init__(self, breaker: CircuitState | None) -> None:
        self.queued: list[tuple[tuple[int, int], int]] = []  # (rank, key)
        self.running: dict[int, tuple[int, int]] = {}
        self.breaker = breaker
        self.pin: tuple[tuple[int, int], int] | None = None
        self.pin_waiting = False


class _Model:
    """What the line must do, by scanning everything on every question."""

    def __init__(self, cap: int | None, breaker: tuple[int, float] | None, fifo: bool) -> None:
        self.cap, self.breaker, self.fifo = cap, breaker, fifo
        self.free: list[tuple[tuple[int, int], int]] = []
        self.lanes: dict[str, _ModelLane] = {}
        self.turn = 0

    def lane(self, name: str) -> _ModelLane:
        if name not in self.lanes:
            self.lanes[name] = _ModelLane(CircuitState(*self.breaker) if self.breaker else None)
        return self.lanes[name]

    def push(self, key: int, priority: int, lane: str | None) -> None:
        if lane is not None and self.lane(lane).pin is not None and self.lane(lane).pin[1] == key:  # type: ignore[index]
            self.lane(lane).pin_waiting = False
            return
        entry = ((-priority, self.turn), key)
        self.turn += 1
        (self.free if lane is None else self.lane(lane).queued).append(entry)

    def head(self, lane: _ModelLane, now: float) -> tuple[tuple[int, int], int] | None:
        if lane.pin_waiting or (self.cap is not None and len(lane.running) >= self.cap):
            return None
        if lane.breaker is not None and lane.breaker.holds(now):
            return None
        if lane.pin is not None:
            return lane.pin
        return min(lane.queued) if lane.queued else None

    def best(self, now: float) -> tuple[tuple[int, int], int, str | None] | None:
        candidates = [(rank, key, None) for rank, key in self.free]
        for name, lane in self.lanes.items():
            head = self.head(lane, now)
            if head is not None:
                candidates.append((head[0], head[1], name))
        return min(candidates, key=lambda c: c[0]) if candidates else None

    def queued(self) -> set[int]:
        keys = {key for _, key in self.free}
        for lane in self.lanes.values():
            keys |= {key for _, key in lane.queued}
            if lane.pin is not None and not lane.pin_waiting:
                keys.add(lane.pin[1])
        return keys

    def take(self, rank: tuple[int, int], key: int, lane: str | None, now: float) -> None:
        if lane is None:
            self.free.remove((rank, key))
            return
        mlane = self.lanes[lane]
        if mlane.pin is not None and mlane.pin[1] == key:
            mlane.pin = None
        else:
            mlane.queued.remove((rank, key))
        mlane.running[key] = rank
        if mlane.breaker is not None:
            mlane.breaker.allow(now, key)

    def end(self, key: int, lane: str | None, ok: bool | None, retry: bool, now: float) -> None:
        if lane is None:
            return
        mlane = self.lanes[lane]
        rank = mlane.running.pop(key)
        if mlane.breaker is not None:
            if ok is None:
                mlane.breaker.abandon(key)
            else:
                mlane.breaker.record(key, ok, now)
        if retry and self.fifo:
            mlane.pin, mlane.pin_waiting = (rank, key), True

    def remove(self, key: int, lane: str | None) -> bool:
        mlane = self.lanes.get(lane) if lane is not None else None
        if mlane is not None and mlane.pin is not None and mlane.pin[1] == key:
            mlane.pin, mlane.pin_waiting = None, False
            return True
        if key not in self.queued():
            return False
        entries = self.free if mlane is None else mlane.queued
        entries[:] = [entry for entry in entries if entry[1] != key]
        return True


line_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from([None, "a", "b", "c"]), st.integers(-1, 1)),
        st.tuples(st.just("take")),
        st.tuples(st.just("end"), st.integers(0, 50), st.sampled_from([True, False, None]), st.booleans()),
        st.tuples(st.just("remove"), st.integers(0, 80)),
        st.tuples(st.just("due"), st.integers(0, 50)),
        st.tuples(st.just("time"), st.floats(0.0, 20.0)),
    ),
    max_size=150,
)


@settings(max_examples=300, deadline=None)
@given(
    operations=line_ops,
    cap=st.sampled_from([None, 1, 2]),
    breaker=st.sampled_from([None, (1, 5.0), (2, 10.0)]),
    fifo=st.booleans(),
)
def test_line_takes_the_best_job_of_the_lanes_not_held(
    operations: list[tuple[Any, ...]], cap: int | None, breaker: tuple[int, float] | None, fifo: bool
) -> None:
    """Whatever pushes, starts, ends (ok, failed, stopped; retried or not), removals, due retries
    and clock steps happen, ``take`` gives the best-ranked job among the jobs without a lane and
    the heads of the lanes that are not full, not held by their breaker and not waiting for a
    pinned retry: what a scan of everything gives."""
    line: Line[int, int] = Line(concurrency=cap, breaker=breaker, fifo=fifo)
    model = _Model(cap, breaker, fifo)
    lane_of: dict[int, str | None] = {}
    running: list[int] = []
    retries: list[int] = []  # failed jobs waiting out a backoff (pinned or not)
    now, keys = 0.0, 0
    for op in operations:
        if op[0] == "push":
            line.push(keys, op[2], keys, op[1])
            model.push(keys, op[2], op[1])
            lane_of[keys] = op[1]
            keys += 1
        elif op[0] == "take":
            line.wake(now)
            expected = model.best(now)
            assert line.peek() == (None if expected is None else (expected[1], expected[1]))
            if expected is not None:
                assert line.take(now)[0] == expected[1]
                model.take(*expected, now)
                running.append(expected[1])
        elif op[0] == "end" and running:
            key = running.pop(op[1] % len(running))
            ok, retry = op[2], op[3] and op[2] is not True
            line.finished(key, lane_of[key], now, ok, (key, now + 1) if retry else None)
            model.end(key, lane_of[key], ok, retry, now)
            if retry:
                retries.append(key)
        elif op[0] == "due" and retries:
            key = retries.pop(op[1] % len(retries))
            line.push(key, 0, key, lane_of[key])
            model.push(key, 0, lane_of[key])
        elif op[0] == "remove":
            lane = lane_of.get(op[1])
            assert (line.remove(op[1], lane) is not None) == model.remove(op[1], lane)
            if op[1] in retries:
                retries.remove(op[1])
        elif op[0] == "time":
            now += op[1]
        assert len(line) == len(model.queued())
        assert {key for key, _ in line} == model.queued()


def test_held_lanes_leave_the_ready_heap_so_nothing_is_rescanned() -> None:
    """A thousand full lanes with jobs queued: none of them is in the ready heap, so finding the
    next job looks at the one lane not held (and at the jobs without a lane) only."""
    line: Line[int, str] = Line(concurrency=1)
    for n in range(1000):
        line.push(2 * n, 0, f"turn {n}", f"agent-{n}")
        line.push(2 * n + 1, 0, f"next {n}", f"agent-{n}")
    for _ in range(1000):
        line.take(0.0)
    assert line.peek() is None and len(line._ready) == 0  # every lane holds one running job
    line.push(5000, -5, "late", "agent-new")
    assert line.peek() == (5000, "late") and len(line._ready) == 1
    line.finished(0, "agent-0", 1.0, True)  # agent-0's turn ended: its next turn is ready
    assert line.peek() == (1, "next 0")  # priority 0 before the late job's -5
    assert line.lanes == 1001 and line.held_lanes(1.0) == 999


def test_a_lane_is_forgotten_when_empty_unless_its_breaker_remembers() -> None:
    line: Line[int, int] = Line(breaker=(2, 10.0))
    line.push(1, 0, 1, "a")
    line.take(0.0)
    line.finished(1, "a", 0.0, False)  # one failure of two: the lane remembers it
    assert line.lanes == 1 and line.lane("a", 0.0) == otree.LaneStatus("a", 0, 0, "closed")
    line.push(2, 0, 2, "a")
    line.take(0.0)
    assert line.finished(2, "a", 1.0, False) == "opened"
    line.push(3, 0, 3, "a")
    assert line.peek() is None and line.wake(1.0) == 11.0
    assert line.lane("a", 1.0) == otree.LaneStatus("a", 1, 0, "open", "circuit open, half-open in 10.0 s")
    assert line.wake(11.0) == float("inf") and line.peek() == (3, 3)
    assert line.take(11.0)[2] == "half_open"
    assert line.finished(3, "a", 12.0, True) == "closed"
    assert line.lanes == 0 and line.lane("a", 12.0) is None


def test_idle_lanes_kept_for_their_breaker_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane per conversation, each failing once and never used again: the line keeps the
    ``IDLE_LANES_KEPT`` idle the shortest, and a lane used again moves to the back of that order."""
    monkeypatch.setattr(otree._lanes, "IDLE_LANES_KEPT", 3)
    line: Line[int, int] = Line(breaker=(3, 10.0))  # two failures in a row leave it closed

    def fail_once(key: int, lane: str) -> None:
        line.push(key, 0, key, lane)
        line.take(0.0)
        line.finished(key, lane, 0.0, False)

    for key, lane in enumerate(["a", "b", "c", "a", "d", "e"]):  # "a" again: idle since its second failure
        fail_once(key, lane)
    assert line.names() == ["a", "d", "e"] and line.lanes == 3
    assert line.lane("b", 0.0) is None
    line.push(10, 0, 10, "d")  # a lane with a job running is not idle: never forgotten
    line.take(0.0)
    fail_once(11, "f")
    fail_once(12, "g")
    assert line.names() == ["d", "e", "f", "g"]
    assert line.lane("d", 0.0) == otree.LaneStatus("d", 0, 1, "closed")


# --- the pool with lanes ----------------------------------------------------------------------


class Turns:
    """A handler that records who runs, and how many at once per lane and in all."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.most_in_all = 0
        self.runs: dict[str, int] = {}
        self.at: dict[str, float] = {}  # when each started (its last attempt)

    async def turn(self, payload: dict[str, Any]) -> str:
        name, lane = payload["n"], payload.get("lane", "")
        self.started.append(name)
        self.at[name] = trio.current_time()
        self.runs[name] = self.runs.get(name, 0) + 1
        self.running[lane] = self.running.get(lane, 0) + 1
        self.most[lane] = max(self.most.get(lane, 0), self.running[lane])
        self.most_in_all = max(self.most_in_all, sum(self.running.values()))
        try:
            await trio.sleep(payload.get("sleep", 1.0))
            if payload.get("fail"):
                raise RuntimeError(f"{name} failed")
            return name
        finally:
            self.running[lane] -= 1


def tree_of(turns: Turns, **settings: Any) -> otree.SupervisorSpec:
    return otree.supervisor("root", children=[otree.pool("jobs", {"turn": turns.turn}, **settings)])


def pool_of(sup: otree.SupervisorHandle) -> otree.PoolHandle:
    handle = sup.child("jobs")
    assert isinstance(handle, otree.PoolHandle)
    return handle


def submit(pool: otree.PoolHandle, name: str, lane: str | None, **payload: Any) -> otree.Job:
    options = {k: payload.pop(k) for k in ("priority", "key", "estimated_cost") if k in payload}
    return pool.submit_nowait("turn", {"n": name, "lane": lane or "", **payload}, lane=lane, **options)


async def test_one_turn_per_agent_at_a_time_with_agents_in_parallel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns()
    async with otree.open_supervisor(tree_of(turns, max_concurrency=10, lane_concurrency=1)) as sup:
        pool = pool_of(sup)
        jobs = [submit(pool, f"{agent}{n}", agent) for agent in ("a", "b", "c") for n in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(pool.which_children()) == 3  # one turn of each agent
        assert pool.lane("a") == otree.LaneStatus("a", 2, 1, None, "1 of lane_concurrency 1 running")
        assert pool.status().lanes == 3 and pool.status().lanes_held == 3
        assert [await job.result() for job in jobs] == [j.payload["n"] for j in jobs]
    assert trio.current_time() == pytest.approx(3.0)  # three turns each, agents side by side
    assert turns.most == {"a": 1, "b": 1, "c": 1} and turns.most_in_all == 3
    for agent in "abc":  # each agent's turns in the order submitted
        assert [name for name in turns.started if name[0] == agent] == [f"{agent}{n}" for n in range(3)]


async def test_a_lane_breaker_holds_only_its_lane_while_others_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns()
    tree = tree_of(
        turns, max_concurrency=4, lane_circuit_breaker=otree.CircuitBreaker(failures=2, cooldown=30)
    )
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        bad = [submit(pool, f"bad{n}", "bad", fail=True) for n in range(2)]
        for job in bad:
            with pytest.raises(otree.JobFailed):
                await job.result()
        held = submit(pool, "bad-held", "bad")
        good = [submit(pool, f"good{n}", "good", priority=-1) for n in range(3)]
        for job in good:
            assert await job.result() == job.payload["n"]
        assert trio.current_time() == pytest.approx(2.0)  # the good lane never waited
        assert held.state == "queued" and held.attempts == 0
        assert pool.lane("bad") == otree.LaneStatus("bad", 1, 0, "open", "circuit open, half-open in 29.0 s")
        with pytest.raises(otree.NotFound):  # a lane with no job and nothing to remember is forgotten
            pool.lane("good")
        assert pool.status().circuit is None and pool.status().held is None  # the pool's own state
        assert await held.result() == "bad-held"
        assert trio.current_time() == pytest.approx(32.0)  # the trial, after the cooldown
        events = [(e.kind, e.details.get("lane")) async for e in _until(stream, "circuit.closed")]
    assert [e for e in events if e[0].startswith("circuit.")] == [
        ("circuit.opened", "bad"),
        ("circuit.half_open", "bad"),
        ("circuit.closed", "bad"),
    ]


async def _until(stream: otree.EventStream, kind: str):  # type: ignore[no-untyped-def]
    async for event in stream:
        yield event
        if event.kind == kind:
            return


@pytest.mark.parametrize("order", ["fifo", "retry_at_back"])
async def test_a_fifo_lane_retry_keeps_the_head_and_holds_only_its_lane(
    autojump_clock: trio.testing.MockClock, order: str
) -> None:
    """Under ``lane_order="fifo"`` the failed first message of lane ``a`` is retried before the
    second one may start (strict order per destination), while lane ``b`` goes on; under the
    default, the second starts during the first one's backoff (today's behaviour)."""
    turns = Turns()
    tree = tree_of(
        turns,
        max_concurrency=4,
        lane_concurrency=1,
        lane_order=order,
        max_attempts=2,
        backoff=otree.Backoff.schedule([10]),
    )
    flaky = {"attempt": 0}

    async def once_failing(payload: dict[str, Any]) -> str:
        flaky["attempt"] += 1
        if payload["n"] == "a0" and flaky["attempt"] == 1:
            await trio.sleep(1)
            raise RuntimeError("503")
        return await turns.turn(payload)

    tree = otree.supervisor(
        "root", children=[otree.pool("jobs", {"turn": once_failing}, **_pool_settings(tree))]
    )
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        first = submit(pool, "a0", "a")
        await trio.sleep(2)  # the first failed at 1 s and waits out 10 s: lane a runs nothing
        second = submit(pool, "a1", "a")
        b = submit(pool, "b0", "b")
        assert await b.result() == "b0"
        assert trio.current_time() == pytest.approx(3.0)  # lane b was never held
        if order == "fifo":
            assert second.state == "queued"
            assert pool.lane("a").held == "job 1 waits out its retry at the head of the lane, due in 8.0 s"
        await first.result()
        await second.result()
    if order == "fifo":  # a0's retry at 11 s, then a1
        assert turns.at == {"b0": 2.0, "a0": 11.0, "a1": 12.0}
    else:  # a1 went during a0's backoff
        assert turns.at == {"b0": 2.0, "a1": 2.0, "a0": 11.0}


def _pool_settings(tree: otree.SupervisorSpec) -> dict[str, Any]:
    spec = tree.children[0]
    assert isinstance(spec, otree.PoolSpec)
    fields = ("max_concurrency", "lane_concurrency", "lane_order", "max_attempts", "backoff")
    return {field: getattr(spec, field) for field in fields}


async def test_the_budget_still_holds_every_lane_behind_the_head(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns()
    tree = tree_of(turns, max_concurrency=4, daily_budget=1.0, on_budget_exhausted="hold", lane_concurrency=1)
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        first = submit(pool, "a0", "a", estimated_cost=0.6, priority=5)
        await trio.testing.wait_all_tasks_blocked()
        big = submit(pool, "b0", "b", estimated_cost=0.6, priority=5)  # does not fit beside a0
        small = submit(pool, "c0", "c", estimated_cost=0.1)  # would fit, but is behind b0
        await trio.testing.wait_all_tasks_blocked()
        assert big.state == "queued" and small.state == "queued"
        assert pool.status().held is not None and pool.status().held.startswith("budget: needs $0.60")  # type: ignore[union-attr]
        await first.result()
        await big.result()
        await small.result()
    assert turns.at == {"a0": 0.0, "b0": 1.0, "c0": 1.0}  # c0 waited for b0, which waited for a0


async def test_the_pool_breaker_still_holds_every_lane(autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns()
    tree = tree_of(
        turns,
        max_concurrency=4,
        lane_concurrency=1,
        circuit_breaker=otree.CircuitBreaker(failures=1, cooldown=20),
        lane_circuit_breaker=otree.CircuitBreaker(failures=5, cooldown=1),
    )
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        with pytest.raises(otree.JobFailed):
            await submit(pool, "a0", "a", fail=True).result()
        others = [submit(pool, f"{lane}1", lane) for lane in ("b", "c")]
        await trio.sleep(5)
        assert [job.state for job in others] == ["queued", "queued"]
        assert pool.status().held == "circuit open, half-open in 15.0 s"
        for job in others:
            await job.result()
    assert trio.current_time() == pytest.approx(
        23.0
    )  # a0 opened it at 1 s: the trial at 21 s alone, then the other


async def test_priorities_hold_across_lanes(autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns()
    async with otree.open_supervisor(tree_of(turns, max_concurrency=1, lane_concurrency=1)) as sup:
        pool = pool_of(sup)
        busy = submit(pool, "busy", None)
        await trio.testing.wait_all_tasks_blocked()
        jobs = [
            submit(pool, "a-low", "a", priority=-1),
            submit(pool, "b-mid", "b"),
            submit(pool, "free-mid", None),
            submit(pool, "a-high", "a", priority=3),
            submit(pool, "c-high", "c", priority=3),
        ]
        assert [job.payload["n"] for job in pool.queued()] == [
            "a-high",
            "c-high",
            "b-mid",
            "free-mid",
            "a-low",
        ]
        for job in [busy, *jobs]:
            await job.result()
    assert turns.started == ["busy", "a-high", "c-high", "b-mid", "free-mid", "a-low"]


@settings(max_examples=40, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(st.sampled_from([None, "a", "b", "c", "d"]), st.integers(-2, 2), st.integers(1, 4)),
        min_size=1,
        max_size=30,
    ),
    cap=st.integers(1, 4),
    lane_cap=st.integers(1, 2),
)
def test_lanes_keep_the_order_and_both_caps_and_lose_nothing(
    jobs: list[tuple[str | None, int, int]], cap: int, lane_cap: int
) -> None:
    """Random submissions over lanes, random run times: replaying the pool's events, every start is
    the head of its lane, no lane head ranked before it was free to start (its lane not full), the
    pool and lane caps hold, and every job ran once."""
    turns = Turns()
    events: list[otree.Event] = []

    async def scenario() -> None:
        tree = tree_of(turns, max_concurrency=cap, lane_concurrency=lane_cap, max_queue=100)
        async with otree.open_supervisor(tree) as sup:
            pool = pool_of(sup)
            stream = pool.events()
            handles = [
                submit(pool, str(n), lane, priority=priority, sleep=duration)
                for n, (lane, priority, duration) in enumerate(jobs)
            ]
            for handle in handles:
                await handle.result()
            async for event in stream:
                events.append(event)
                if sum(e.kind == "job.finished" for e in events) == len(jobs):
                    break

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert turns.runs == {str(n): 1 for n in range(len(jobs))}
    rank = {str(n): (-priority, n) for n, (_, priority, _) in enumerate(jobs)}
    lane_of = {str(n): lane for n, (lane, _, _) in enumerate(jobs)}
    queued: set[str] = set()
    running: dict[str | None, int] = {}
    for event in events:
        job = event.path.rsplit("/", 1)[1]
        job = str(int(job) - 1)
        lane = lane_of[job]
        assert event.details.get("lane") == lane
        if event.kind == "job.queued":
            queued.add(job)
        elif event.kind == "job.started":
            mine = [other for other in queued if lane_of[other] == lane]
            assert lane is None or rank[job] == min(rank[o] for o in mine)  # the head of its lane
            for other in queued:
                other_lane = lane_of[other]
                if rank[other] < rank[job]:  # skipped: only a full lane may hold it
                    assert other_lane is not None and running.get(other_lane, 0) >= lane_cap
            queued.remove(job)
            running[lane] = running.get(lane, 0) + 1
            assert sum(running.values()) <= cap
            assert lane is None or running[lane] <= lane_cap
        elif event.kind == "job.finished":
            running[lane] -= 1
    assert not queued and all(count == 0 for count in running.values())


@settings(max_examples=30, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 2), st.integers(1, 3)),
        min_size=1,
        max_size=15,
    ),
)
def test_a_fifo_lane_runs_its_jobs_strictly_in_order_through_retries(
    jobs: list[tuple[str, int, int]],
) -> None:
    """An outbox: one message at a time per destination, each retried until it goes through
    (``failures`` first attempts fail), and a destination's messages go out in the order sent."""
    attempts: dict[str, int] = {}
    sent: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    tries: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    async def deliver(payload: dict[str, Any]) -> None:
        name, lane = payload["n"], payload["lane"]
        tries[lane].append(name)
        attempts[name] = attempts.get(name, 0) + 1
        await trio.sleep(payload["sleep"])
        if attempts[name] <= payload["failures"]:
            raise RuntimeError("503")
        sent[lane].append(name)

    async def scenario() -> None:
        tree = otree.supervisor(
            "root",
            children=[
                otree.pool(
                    "jobs",
                    {"send": deliver},
                    max_concurrency=3,
                    lane_concurrency=1,
                    lane_order="fifo",
                    max_attempts=3,
                    backoff=otree.Backoff(initial=1.0, maximum=4.0, jitter=0.5),
                )
            ],
        )
        async with otree.open_supervisor(tree) as sup:
            pool = pool_of(sup)
            handles = [
                pool.submit_nowait("send", {"n": str(n), "lane": lane, "failures": f, "sleep": s}, lane=lane)
                for n, (lane, f, s) in enumerate(jobs)
            ]
            for handle in handles:
                await handle.result()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    for lane in "abc":
        mine = [str(n) for n, job in enumerate(jobs) if job[0] == lane]
        assert sent[lane] == mine
        expected_tries = [name for name in mine for _ in range(jobs[int(name)][1] + 1)]
        assert tries[lane] == expected_tries  # each message's attempts in a row, nothing between


async def test_events_status_and_listings_name_the_lane(autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns()
    async with otree.open_supervisor(tree_of(turns, lane_concurrency=1, max_concurrency=2)) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        running = submit(pool, "a0", "agent-7")
        waiting = submit(pool, "a1", "agent-7")
        plain = submit(pool, "x", None)
        await trio.testing.wait_all_tasks_blocked()
        listing = jobs_of(pool)
        assert [(job.id, job.lane) for job in listing.running] == [("1", "agent-7"), ("3", None)]
        assert [(job.id, job.lane) for job in listing.queued] == [("2", "agent-7")]
        lines = render_jobs(listing).splitlines()
        assert "priority 0 lane agent-7" in lines[1] and "lane" not in lines[2]
        info = sup.which_children()[0]
        assert "lanes 1 (1 held)" in render_status(status_of(pool, info))
        for job in (running, waiting, plain):
            await job.result()
        seen = [e async for e in _until(stream, "job.finished")]
        seen += [e async for e in _until(stream, "job.finished")]
        seen += [e async for e in _until(stream, "job.finished")]
    by_job = {(e.path.rsplit("/", 1)[1], e.kind): e.details.get("lane") for e in seen}
    assert (
        by_job[("1", "job.queued")]
        == by_job[("1", "job.started")]
        == by_job[("1", "job.finished")]
        == "agent-7"
    )
    assert (
        by_job[("3", "job.queued")] is None
        and "lane" not in next(e for e in seen if e.path.endswith("/3")).details
    )


async def test_bad_lanes_are_refused_naming_the_pool(autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns()
    tree = tree_of(turns, on_duplicate_key="replace", lane_concurrency=1)
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        for bad in ("", 7, "x" * 257, "a\nb", b"lane"):
            with pytest.raises(
                ValueError, match=r"^root/jobs: lane must be None or a str of 1 to 256 printable"
            ):
                pool.submit_nowait("turn", {"n": "x"}, lane=bad)  # type: ignore[arg-type]
        with pytest.raises(otree.NotFound, match=r"^root/jobs: no lane 'nope' \(lanes: none\)$"):
            pool.lane("nope")
        submit(pool, "busy", "a")
        await trio.testing.wait_all_tasks_blocked()
        queued = submit(pool, "a1", "a", key="k")
        with pytest.raises(
            ValueError, match=r"key 'k' belongs to job 2 in lane 'a'; its replacement must name"
        ):
            submit(pool, "b1", "b", key="k")
        assert queued.state == "queued" and len(pool.queued()) == 1
        with pytest.raises(otree.NotFound, match=r"no lane 'b' \(lanes: a\)"):
            pool.lane("b")


def test_lane_settings_are_checked_in_the_spec() -> None:
    async def h(payload: Any) -> None:
        pass

    for settings_, message in (
        ({"lane_concurrency": 0}, "jobs: lane_concurrency must be None or an integer >= 1; got 0"),
        ({"lane_concurrency": 1.5}, "jobs: lane_concurrency must be None or an integer >= 1; got 1.5"),
        ({"lane_order": "lifo"}, "jobs: lane_order must be one of 'retry_at_back', 'fifo'; got 'lifo'"),
        (
            {"lane_circuit_breaker": 3},
            "jobs: lane_circuit_breaker must be None or an otree.CircuitBreaker; got 3",
        ),
    ):
        with pytest.raises(otree.SpecError, match=f"^{message}$"):
            otree.pool("jobs", {"h": h}, **settings_)


async def test_a_replaced_job_keeps_its_place_in_its_lane_and_drops_are_oldest_across_the_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns()
    tree = tree_of(
        turns,
        max_concurrency=1,
        max_queue=3,
        on_full="drop_oldest",
        on_duplicate_key="replace",
        lane_concurrency=1,
    )
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        busy = submit(pool, "busy", None)
        await trio.testing.wait_all_tasks_blocked()
        oldest = submit(pool, "a1", "a")
        submit(pool, "b1", "b", key="k")
        submit(pool, "a2", "a")
        newer = submit(pool, "b1-v2", "b", key="k")  # takes b1's place: no new room needed
        assert [job.payload["n"] for job in pool.queued()] == ["a1", "b1-v2", "a2"]
        submit(pool, "c1", "c")  # full: the oldest in the whole pool goes, whatever its lane
        assert oldest.state == "dropped" and oldest.dropped == "queue_full"
        assert [job.payload["n"] for job in pool.queued()] == ["b1-v2", "a2", "c1"]
        await busy.result()
        await newer.result()
    assert turns.started[:2] == ["busy", "b1-v2"]


async def test_a_cancelled_or_replaced_fifo_retry_frees_or_keeps_the_head_of_its_lane(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns()
    tree = tree_of(
        turns,
        max_concurrency=2,
        lane_concurrency=1,
        lane_order="fifo",
        max_attempts=2,
        backoff=otree.Backoff.schedule([30]),
        on_duplicate_key="replace",
    )
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        failing = submit(pool, "a0", "a", fail=True, key="k")
        behind = submit(pool, "a1", "a")
        await trio.sleep(2)  # a0 failed at 1 s and holds lane a until 31 s
        assert failing.state == "waiting" and behind.state == "queued"
        replacement = submit(pool, "a0-v2", "a", key="k")  # takes the pinned place, due at 31 s
        await trio.sleep(5)
        assert behind.state == "queued" and replacement.state == "waiting"
        assert pool.lane("a").held is not None and f"job {replacement.id} waits" in pool.lane("a").held  # type: ignore[operator]
        replacement.cancel()  # the lane is free again: the next message goes
        assert await behind.result() == "a1"
        assert trio.current_time() == pytest.approx(8.0)
    assert turns.started == ["a0", "a1"]


async def test_a_lane_circuit_rejects_submissions_under_on_circuit_open_reject(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns()
    tree = tree_of(
        turns, lane_circuit_breaker=otree.CircuitBreaker(failures=1, cooldown=60), on_circuit_open="reject"
    )
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        stream = pool.events()
        with pytest.raises(otree.JobFailed):
            await submit(pool, "a0", "a", fail=True).result()
        with pytest.raises(
            otree.CircuitOpen, match=r"^root/jobs: lane 'a': circuit open, half-open in 60.0 s$"
        ):
            submit(pool, "a1", "a")
        assert await submit(pool, "b0", "b").result() == "b0"  # another lane is not refused
        rejected = [e async for e in _until(stream, "job.rejected")][-1]
    assert rejected.reason == "circuit" and rejected.details["lane"] == "a"


async def test_a_durable_pool_keeps_lanes_across_a_restart(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    turns = Turns()
    tree = tree_of(turns, lane_concurrency=1, max_concurrency=3, max_attempts=1)
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        for n in range(2):
            for lane in ("a", "b"):
                submit(pool, f"{lane}{n}", lane, sleep=100)
        await trio.sleep(1)  # a0 and b0 run; a1 and b1 wait behind them
        with pytest.raises(otree.JobFailed):
            await submit(pool, "dead", "c", fail=True).result()
    async with otree.open_supervisor(tree, state_dir=tmp_path) as sup:
        pool = pool_of(sup)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted((job.lane, job.payload["n"]) for job in pool.queued()) == [("a", "a1"), ("b", "b1")]
        assert sorted(job.lane for job in [pool.job(info.id) for info in pool.which_children()]) == ["a", "b"]
        letter = pool.dead_letters()[0]
        assert letter.lane == "c"
        again = await pool.requeue(letter.id)
        assert again.lane == "c"


async def test_a_reload_changes_the_lane_settings_in_place(autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns()
    async with otree.open_supervisor(tree_of(turns, max_concurrency=4, lane_concurrency=1)) as sup:
        pool = pool_of(sup)
        jobs = [submit(pool, f"a{n}", "a", sleep=10) for n in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(pool.which_children()) == 1
        live = pool._pool()
        live.reconfigure(otree.pool("jobs", {"turn": turns.turn}, max_concurrency=4, lane_concurrency=3))
        await trio.testing.wait_all_tasks_blocked()
        assert len(pool.which_children()) == 3
        for job in jobs:
            await job.result()


async def test_lanes_share_the_start_rate_and_otree_check_shows_the_settings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from otree._treecmd import _describe

    turns = Turns()
    tree = tree_of(turns, max_concurrency=4, lane_concurrency=1, max_starts_per_second=1)
    assert "lane_concurrency=1" in _describe(tree.children[0])
    async with otree.open_supervisor(tree) as sup:
        pool = pool_of(sup)
        jobs = [submit(pool, lane, lane, sleep=0) for lane in "abc"]
        for job in jobs:
            await job.result()
    assert trio.current_time() == pytest.approx(2.0)  # one start per second, whatever the lane


async def test_a_submit_over_the_control_socket_carries_the_lane(tmp_path: Path) -> None:
    """What ``otree submit --lane`` sends: the job runs in that lane; a bad lane is the pool's
    one-line refusal (exit 4)."""
    gate = Gate()
    async with serving(tmp_path, [gate.pool()]) as served:
        pool = served.sup.find("jobs")
        assert isinstance(pool, otree.PoolHandle)
        reply = await served.request("submit", pool="jobs", kind="quick", lane="agent-7")
        assert reply.ok, reply
        assert pool.job(reply.result["id"]).lane == "agent-7"
        reply = await served.request("submit", pool="jobs", kind="quick", lane="")
        assert (reply.ok, reply.code) == (False, 4)
        assert reply.error == "root/jobs: lane must be None or a str of 1 to 256 printable characters; got ''"
        gate.open.set()
