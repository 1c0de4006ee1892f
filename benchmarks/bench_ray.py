"""``python -m benchmarks.bench_ray``: Ray children restarted by otree against Ray's own actor
restart, and the cost of a remote event, in one run on one local Ray instance (loopback only).

Needs the ``ray`` extra (``pip install -e '.[ray]'``). Restart time is from the moment the
remote process dies (it writes the time, then ``os._exit(1)``) to the replacement being
ready: for otree the child's next ``child.ready``, for Ray the first call that succeeds on
the restarted actor (``max_restarts=-1``, ``max_task_retries=0``). otree is timed with the
child dying 0.2 s after it is ready (a crash loop) and 2 s after, each without and with
``spare=True`` (a warm replacement actor).
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
from pathlib import Path
from typing import Any

import trio

import otree

RESTARTS = 20
# how long the remote child lives once ready: a crash loop, and crashes spaced further apart than
# a new Ray worker takes to come up (each restart of an actor needs a new worker process)
LIVES = (0.2, 2.0)
EVENTS = 2000


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


def main() -> None:
    ray: Any = importlib.import_module("ray")
    temp = tempfile.mkdtemp(prefix="otree-bench-ray-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            theirs = ray_restarts(ray, Path(scratch) / "ray")
            ours = {
                (life, spare): trio.run(otree_restarts, Path(scratch) / f"otree-{life}-{spare}", life, spare)
                for life in LIVES
                for spare in (False, True)
            }
        per_event = trio.run(event_cost)
    finally:
        ray.shutdown()
    theirs_median = statistics.median(theirs)
    print(f"ray {ray.__version__}, {RESTARTS} restarts each, one local instance (num_cpus=2)")
    print(f"restart (death -> replacement ready), load average {os.getloadavg()[0]:.2f}:")
    print(f"  Ray's own (max_restarts=-1): {theirs_median:.3f} s median (max {max(theirs):.3f})")
    for (life, spare), times in ours.items():
        what = f"otree, dies {life:g} s after ready, {'spare=True' if spare else 'default'}"
        print(_restart_line(what, times, theirs_median))
    print(
        f"remote event forwarding: {per_event * 1e6:.0f} us per event ({EVENTS} app events in a burst,"
        " from the first emitted on the actor to the last on the local stream)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
