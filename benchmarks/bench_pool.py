"""The pool: no-op jobs per second (in memory and durable) and queue cost as it grows.

``python -m benchmarks.bench_pool`` prints:

* jobs/s of no-op async jobs through a pool, in memory and durable (SQLite, WAL),
  at ``max_concurrency`` 1, 64 and 1024 (all submitted first, then drained),
  the pool alone, then at 64 with the event log written as under ``otree run``;
* µs per submit and per pop with 1k, 10k, 100k and 1M jobs already queued
  (``JobQueue``, the pool's queue, and ``submit_nowait`` on a pool whose one
  worker is busy), to show the cost stays flat (O(log n));
* lanes: µs of dispatch per job with 1M jobs queued, without lanes and over 100 and
  10,000 lanes (``lane_concurrency=1``), as ratios to no lanes: the pure ``Line``
  (take, and end the oldest of 64 running) and a real pool (no-op jobs, 64 at once);
  then the same 1M over 10,000 lanes of which 9,990 are held (full: their one running
  job never ends), where a dispatcher that rescanned held lanes would pay 9,990 looks
  per job.

``python -m benchmarks.bench_pool lanes`` runs the lanes part only; ``... bench_pool ab`` (``ab durable``)
three runs of 20,000 in-memory (5,000 durable) no-op jobs at concurrency 64, for A/B runs of checkouts
(``PYTHONPATH=CHECKOUT``, from outside any checkout).
"""

from __future__ import annotations

import collections
import logging
import sys
import tempfile
import time
from typing import Any

import trio

import otree
from otree._jobqueue import JobQueue
from otree._lanes import Line


async def noop(payload: Any) -> None:
    return None


async def jobs_per_second(n: int, concurrency: int, durable: bool, event_log: bool = False) -> float:
    tree = otree.supervisor(
        "bench",
        children=[
            otree.pool("jobs", {"noop": noop}, max_concurrency=concurrency, max_queue=n, durable=durable)
        ],
    )
    with tempfile.TemporaryDirectory() as state:
        async with otree.open_supervisor(tree, state_dir=state, event_log=event_log) as sup:
            pool = sup.child("jobs")
            assert isinstance(pool, otree.PoolHandle)
            t0 = time.perf_counter()
            jobs = [pool.submit_nowait("noop", i) for i in range(n)]
            for job in jobs:
                await job.result()
            return n / (time.perf_counter() - t0)


def queue_costs(size: int, probes: int = 2000) -> tuple[float, float]:
    queue: JobQueue[int, None] = JobQueue()
    for key in range(size):
        queue.push(key, key % 7, None)
    t0 = time.perf_counter()
    for key in range(size, size + probes):
        queue.push(key, key % 7, None)
    t1 = time.perf_counter()
    for _ in range(probes):
        queue.pop()
    t2 = time.perf_counter()
    return (t1 - t0) / probes * 1e6, (t2 - t1) / probes * 1e6


async def submit_cost(size: int, probes: int = 2000) -> float:
    async def block(payload: Any) -> None:
        await trio.sleep_forever()

    tree = otree.supervisor(
        "bench", children=[otree.pool("jobs", {"b": block}, max_queue=size + probes + 1, durable=False)]
    )
    async with otree.open_supervisor(tree) as sup:
        pool = sup.child("jobs")
        assert isinstance(pool, otree.PoolHandle)
        for i in range(size):
            pool.submit_nowait("b", None, priority=i % 7)
        t0 = time.perf_counter()
        for i in range(probes):
            pool.submit_nowait("b", None, priority=i % 7)
        return (time.perf_counter() - t0) / probes * 1e6


def lane_of(n: int, lanes: int) -> str | None:
    return f"agent-{n % lanes}" if lanes else None


def line_dispatch_cost(
    size: int, lanes: int, *, held: int = 0, probes: int = 50_000, window: int = 8
) -> float:
    """µs per job through a ``Line`` of ``size`` queued jobs over ``lanes`` lanes (0: none), one
    running per lane: take the next job, and once ``window`` run, end the oldest.

    ``held``: that many lanes first start one job each that never ends, so they stay full with
    the nine jobs in ten that go to them queued behind it; the tenth goes to the other lanes,
    which the probes drain."""
    line: Line[int, str | None] = Line(concurrency=1 if lanes else None)
    for key in range(held):
        line.push(key, 0, None, f"agent-{key}")
        line.take(0.0)  # it runs, and never ends: its lane is full for good
    for key in range(held, size):
        if not held:
            lane = lane_of(key, lanes)
        elif key % 10:
            lane = f"agent-{key % held}"
        else:
            lane = f"free-{key // 10 % (lanes - held)}"
        line.push(key, key % 7, lane, lane)
    running: collections.deque[tuple[int, str | None]] = collections.deque()
    t0 = time.perf_counter()
    for _ in range(probes):
        key, lane, _ = line.take(0.0)
        running.append((key, lane))
        if len(running) == window:
            line.finished(*running.popleft(), 0.0, True)
    return (time.perf_counter() - t0) / probes * 1e6


async def pool_dispatch_cost(size: int, lanes: int, probes: int = 20_000) -> float:
    """µs per no-op job through a pool with ``size`` jobs queued over ``lanes`` lanes (0: none),
    64 at once and one per lane: from the first wake of the dispatcher to ``probes`` jobs done."""
    done = trio.Event()
    count = 0

    async def noop_counted(payload: Any) -> None:
        nonlocal count
        count += 1
        if count == probes:
            done.set()

    pool = otree.pool(
        "jobs",
        {"noop": noop_counted},
        max_concurrency=64,
        max_queue=size,
        durable=False,
        lane_concurrency=1 if lanes else None,
    )
    async with otree.open_supervisor(otree.supervisor("bench", children=[pool])) as sup:
        handle = sup.child("jobs")
        assert isinstance(handle, otree.PoolHandle)
        for n in range(size):  # the dispatcher runs only once this loop yields
            handle.submit_nowait("noop", None, priority=n % 7, lane=lane_of(n, lanes))
        t0 = time.perf_counter()
        await done.wait()
        return (time.perf_counter() - t0) / probes * 1e6


def _lanes_row(what: str, lanes: str, cost: float, base: float | None) -> None:
    ratio = f" (ratio {cost / base:4.2f} to no lanes)" if base is not None else ""
    print(f"{what}, 1,000,000 queued, {lanes:<24} {cost:6.2f} us per job{ratio}")


async def lanes_main() -> None:
    size = 1_000_000
    base = line_dispatch_cost(size, 0)
    _lanes_row("Line", "no lanes:", base, None)
    for lanes in (100, 10_000):
        _lanes_row("Line", f"{lanes:,} lanes:", line_dispatch_cost(size, lanes), base)
    _lanes_row("Line", "9,990 of 10,000 held:", line_dispatch_cost(size, 10_000, held=9_990), base)
    base = await pool_dispatch_cost(size, 0)
    _lanes_row("pool", "no lanes:", base, None)
    for lanes in (100, 10_000):
        _lanes_row("pool", f"{lanes:,} lanes:", await pool_dispatch_cost(size, lanes), base)


async def main() -> None:
    logging.getLogger("otree").setLevel(logging.CRITICAL)
    if sys.argv[1:] == ["lanes"]:
        await lanes_main()
        return
    if sys.argv[1:2] == ["ab"]:  # A/B runs of checkouts: PYTHONPATH=CHECKOUT ... bench_pool ab [durable]
        durable = sys.argv[2:] == ["durable"]
        rates = [await jobs_per_second(5_000 if durable else 20_000, 64, durable) for _ in range(3)]
        print(otree.__file__, " ".join(f"{rate:,.0f}" for rate in rates), "jobs/s")
        return
    for durable, n in ((False, 20_000), (True, 5_000)):
        for concurrency in (1, 64, 1024):
            rate = await jobs_per_second(n, concurrency, durable)
            mode = "durable" if durable else "in memory"
            print(f"{mode:<10} concurrency {concurrency:>5}: {rate:>9,.0f} jobs/s")
        # as under `otree run`: three events per job (queued, started, finished) in events.jsonl
        rate = await jobs_per_second(n, 64, durable, event_log=True)
        print(f"{mode:<10} concurrency    64: {rate:>9,.0f} jobs/s with the event log")
    for size in (1_000, 10_000, 100_000, 1_000_000):
        push, pop = queue_costs(size)
        submit = await submit_cost(size)
        print(
            f"queued {size:>9,}: JobQueue push {push:5.2f} us, pop {pop:5.2f} us; "
            f"pool submit_nowait {submit:6.2f} us"
        )
    await lanes_main()


if __name__ == "__main__":
    trio.run(main)
