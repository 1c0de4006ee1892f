"""The pool: no-op jobs per second (in memory and durable) and queue cost as it grows.

``python -m benchmarks.bench_pool`` prints:

* jobs/s of no-op async jobs through a pool, in memory and durable (SQLite, WAL),
  at ``max_concurrency`` 1, 64 and 1024 (all submitted first, then drained),
  the pool alone, then at 64 with the event log written as under ``otree run``;
* µs per submit and per pop with 1k, 10k, 100k and 1M jobs already queued
  (``JobQueue``, the pool's queue, and ``submit_nowait`` on a pool whose one
  worker is busy), to show the cost stays flat (O(log n)).
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import trio

import otree
from otree._jobqueue import JobQueue


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


async def main() -> None:
    logging.getLogger("otree").setLevel(logging.CRITICAL)
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


if __name__ == "__main__":
    trio.run(main)
