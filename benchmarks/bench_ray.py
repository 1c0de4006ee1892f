"""``python -m benchmarks.bench_ray``: Ray children restarted by otree against Ray's own actor
restart, and the cost of a remote event, in one run on one local Ray instance (loopback only).

Needs the ``ray`` extra (``pip install -e '.[ray]'``). Restart time is from the moment the
remote process dies (it writes the time, then ``os._exit(1)``) to the replacement being
ready: for otree the child's next ``child.ready``, for Ray the first call that succeeds on
the restarted actor (``max_restarts=-1``, ``max_task_retries=0``).
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
EVENTS = 2000


async def crasher(notes: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ready, then dies as a process does: the time of death first, then ``os._exit(1)``."""
    task_status.started()
    await trio.sleep(0.2)
    with open(notes, "a") as file:
        file.write(f"{time.time()}\n")
    os._exit(1)


async def emitter(n: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await trio.sleep(0.5)
    me = otree.current_child()
    for i in range(n):
        me.emit("app.tick", i=i)
    await trio.sleep_forever()


async def otree_restarts(notes: Path) -> list[float]:
    spec = otree.ray(otree.task("agent", crasher, os.fspath(notes)), num_cpus=0)
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


async def event_cost() -> float:
    """Seconds per remote ``app.*`` event, emitted in a burst, until the local stream has it."""
    spec = otree.ray(otree.task("emitter", emitter, EVENTS), num_cpus=0)
    tree = otree.supervisor("bench", children=[spec])
    async with otree.open_supervisor(tree) as sup, sup.events() as stream:
        first = last = 0.0
        seen = 0
        async for event in stream:
            if event.kind == "app.tick":
                seen += 1
                first = first or time.perf_counter()
                last = time.perf_counter()
                if seen == EVENTS:
                    break
    return (last - first) / (EVENTS - 1)


def main() -> None:
    ray: Any = importlib.import_module("ray")
    temp = tempfile.mkdtemp(prefix="otree-bench-ray-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            ours = trio.run(otree_restarts, Path(scratch) / "otree")
            theirs = ray_restarts(ray, Path(scratch) / "ray")
        per_event = trio.run(event_cost)
    finally:
        ray.shutdown()
    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    print(f"ray {ray.__version__}, {RESTARTS} restarts each, one local instance (num_cpus=2)")
    print(
        f"restart (death -> replacement ready): otree {ours_median:.3f} s median"
        f" (max {max(ours):.3f}), Ray's own {theirs_median:.3f} s median (max {max(theirs):.3f});"
        f" Ray / otree {theirs_median / ours_median:.1f}x"
    )
    print(f"remote event forwarding: {per_event * 1e6:.0f} us per event ({EVENTS} app events in a burst)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
