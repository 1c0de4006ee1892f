"""``python -m benchmarks.bench_ray``: Ray children restarted by otree against Ray's own actor
restart, the cost of a remote event, and pool jobs on Ray (``otree.RayExecutor``) against bare Ray
tasks, in one run on one local Ray instance (loopback only).

Needs the ``ray`` extra (``pip install -e '.[ray]'``). Restart time is from the moment the
remote process dies (it writes the time, then ``os._exit(1)``) to the replacement being
ready: for otree the child's next ``child.ready``, for Ray the first call that succeeds on
the restarted actor (``max_restarts=-1``, ``max_task_retries=0``). otree is timed with the
child dying 0.2 s after it is ready (a crash loop) and 2 s after, each without and with
``spare=True`` (a warm replacement actor).

Pool throughput: ``JOBS`` no-op jobs through a pool with ``max_concurrency=64`` and a
``RayExecutor`` (each job a Ray task, one CPU each as Ray's default), from the first submission to
the last result, against bare Ray: the same number of no-op tasks, at most 64 in flight
(``ray.wait`` windowing), each result fetched with ``ray.get``. Alternated ``ROUNDS`` times
after a warm-up; the medians are compared.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

import otree

RESTARTS = 20
# how long the remote child lives once ready: a crash loop, and crashes spaced further apart than
# a new Ray worker takes to come up (each restart of an actor needs a new worker process)
LIVES = (0.2, 2.0)
EVENTS = 2000
JOBS = 2000
IN_FLIGHT = 64
ROUNDS = 5


async def crasher(
    notes: str, life: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ready, then ``life`` s later dies as a process does: the time of death first, then
    ``os._exit(1)``."""
    task_status.started()
    await trio.sleep(life)
    with open(notes, "a") as file:
        file.write(f"{time.time()}\n")
    os._exit(1)


async def emitter(n: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await trio.sleep(0.5)
    me = otree.current_child()
    me.emit("app.tick", i=0, sent=time.time())  # when the burst began, on the actor (one machine: one clock)
    for i in range(1, n):
        me.emit("app.tick", i=i)
    await trio.sleep_forever()


async def otree_restarts(notes: Path, life: float, spare: bool) -> list[float]:
    spec = otree.ray(otree.task("agent", crasher, os.fspath(notes), life), num_cpus=0, spare=spare)
    tree = otree.supervisor("bench", max_restarts=RESTARTS * 2, max_seconds=600, children=[spec])
    ready: list[float] = []
    async with otree.open_supervisor(tree) as sup, sup.events() as stream:
        async for event in stream:
            if event.path == "bench/agent" and event.kind == "child.ready":
                ready.append(time.time())
                if len(ready) == RESTARTS:
                    break
    deaths = [float(line) for line in notes.read_text().split()]
    return [up - died for died, up in zip(deaths, ready, strict=False)]


def ray_restarts(ray: Any, notes: Path) -> list[float]:
    @ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)
    class Agent:
        def ping(self) -> int:
            return os.getpid()

        def die(self) -> None:
            with open(notes, "a") as file:
                file.write(f"{time.time()}\n")
            os._exit(1)

    agent = Agent.remote()  # type: ignore[attr-defined]
    ray.get(agent.ping.remote())
    times = []
    for _ in range(RESTARTS):
        agent.die.remote()
        while not notes.exists() or len(notes.read_text().split()) <= len(times):
            time.sleep(0.001)
        died = float(notes.read_text().split()[-1])
        while True:
            try:
                ray.get(agent.ping.remote(), timeout=10)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                time.sleep(0.005)
        times.append(time.time() - died)
    ray.kill(agent)
    return times


def _restart_line(what: str, ours: list[float], theirs: float) -> str:
    median, p90 = statistics.median(ours), statistics.quantiles(ours, n=10)[-1]
    return (
        f"  {what}: {median:.3f} s median (p90 {p90:.3f}, max {max(ours):.3f});"
        f" Ray's own / otree {theirs / median:.1f}x"
    )


async def event_cost() -> float:
    """Seconds per remote ``app.*`` event of a burst: from the first emitted on the actor to the
    last one on the local stream, over the number of events."""
    spec = otree.ray(otree.task("emitter", emitter, EVENTS), num_cpus=0)
    tree = otree.supervisor("bench", children=[spec])
    async with otree.open_supervisor(tree) as sup, sup.events() as stream:
        sent = 0.0
        seen = 0
        async for event in stream:
            if event.kind == "app.tick":
                seen += 1
                sent = sent or event.details["sent"]
                if seen == EVENTS:
                    return (time.time() - sent) / EVENTS
    raise AssertionError("the event stream ended")


async def noop(payload: Any) -> Any:
    """A pool job that does nothing."""
    return payload


Figures = tuple[float, float, float]  # jobs per second, CPU us per job in the driver, in the rest of Ray


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process (the driver) and by its descendants (the local Ray
    instance: GCS, raylet, workers), from /proc."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            stats[int(entry)] = text[text.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: int) -> float:
        return (int(stats[pid][11]) + int(stats[pid][12])) / tick

    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, fields in stats.items() if int(fields[1]) in frontier} - found
        found |= frontier
    return used(os.getpid()), sum(used(pid) for pid in found)


def _measured(jobs: int, run: Callable[[], None]) -> Figures:
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    run()
    wall, cpu_after = time.perf_counter() - wall_before, _cpu_seconds()
    driver, rest = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
    return jobs / wall, driver / jobs * 1e6, rest / jobs * 1e6


async def pool_jobs(jobs: int) -> None:
    """``jobs`` no-op jobs through a pool whose jobs run as Ray tasks, from the first submission
    to the last result."""
    pool = otree.pool(
        "jobs", {"noop": noop}, max_concurrency=IN_FLIGHT, max_queue=jobs, executor=otree.RayExecutor()
    )
    async with otree.open_supervisor(otree.supervisor("bench", children=[pool])) as sup:
        handle = sup.child("jobs")
        submitted = [handle.submit_nowait("noop", i) for i in range(jobs)]
        for job in submitted:
            await job.result()


def bare_tasks(ray: Any, task: Any, jobs: int) -> None:
    """``jobs`` tasks through bare Ray: at most ``IN_FLIGHT`` submitted and not yet fetched."""
    pending: list[Any] = []
    submitted = 0
    while submitted < jobs or pending:
        while submitted < jobs and len(pending) < IN_FLIGHT:
            pending.append(task.remote(submitted))
            submitted += 1
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)


def pool_against_bare(ray: Any) -> tuple[list[Figures], list[Figures]]:
    """The pool on Ray and bare Ray, ``ROUNDS`` of each, alternated."""

    @ray.remote(max_retries=0)
    def bare_noop(payload: Any) -> Any:
        return payload

    bare_tasks(ray, bare_noop, IN_FLIGHT * 4)  # workers started, functions exported
    trio.run(pool_jobs, IN_FLIGHT * 4)
    ours, theirs = [], []
    for _ in range(ROUNDS):
        theirs.append(_measured(JOBS, lambda: bare_tasks(ray, bare_noop, JOBS)))
        ours.append(_measured(JOBS, lambda: trio.run(pool_jobs, JOBS)))
    return ours, theirs


def report_restarts(ray: Any) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        theirs = ray_restarts(ray, Path(scratch) / "ray")
        ours = {
            (life, spare): trio.run(otree_restarts, Path(scratch) / f"otree-{life}-{spare}", life, spare)
            for life in LIVES
            for spare in (False, True)
        }
    theirs_median = statistics.median(theirs)
    print(f"restart (death -> replacement ready, {RESTARTS} each), load average {os.getloadavg()[0]:.2f}:")
    print(f"  Ray's own (max_restarts=-1): {theirs_median:.3f} s median (max {max(theirs):.3f})")
    for (life, spare), times in ours.items():
        what = f"otree, dies {life:g} s after ready, {'spare=True' if spare else 'default'}"
        print(_restart_line(what, times, theirs_median))


def report_events(ray: Any) -> None:
    per_event = trio.run(event_cost)
    print(
        f"remote event forwarding: {per_event * 1e6:.0f} us per event ({EVENTS} app events in a burst,"
        " from the first emitted on the actor to the last on the local stream)"
    )


def report_pool(ray: Any) -> None:
    ours, theirs = pool_against_bare(ray)
    medians = [
        [statistics.median(figures[i] for figures in side) for i in range(3)] for side in (ours, theirs)
    ]
    (rate, driver, rest), (bare_rate, bare_driver, bare_rest) = medians
    print(
        f"pool jobs on Ray ({JOBS} no-op jobs, {IN_FLIGHT} in flight, median of {ROUNDS}):"
        f" otree.RayExecutor {rate:.0f} jobs/s ({', '.join(f'{f[0]:.0f}' for f in ours)}),"
        f" bare Ray {bare_rate:.0f} tasks/s ({', '.join(f'{f[0]:.0f}' for f in theirs)});"
        f" otree / bare {rate / bare_rate:.2f}x"
    )
    print(
        f"  CPU per job: driver {driver:.0f} us (bare {bare_driver:.0f}),"
        f" Ray's processes {rest:.0f} us (bare {bare_rest:.0f})"
    )


PARTS = {"restart": report_restarts, "events": report_events, "pool": report_pool}


def main() -> None:
    """``python -m benchmarks.bench_ray [restart|events|pool ...]`` (default: all three)."""
    parts = sys.argv[1:] or list(PARTS)
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        sys.exit(f"bench_ray: unknown part {unknown[0]!r} (parts: {', '.join(PARTS)})")
    ray: Any = importlib.import_module("ray")
    temp = tempfile.mkdtemp(prefix="otree-bench-ray-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    print(f"ray {ray.__version__}, one local instance (num_cpus=2)")
    try:
        for part in parts:
            PARTS[part](ray)
            sys.stdout.flush()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
