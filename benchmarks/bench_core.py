"""Core benchmarks: otree against bare trio, each scenario in a fresh interpreter.

Run all with ``python -m benchmarks``; one scenario with
``python -m benchmarks.bench_core SCENARIO N [nogc] [log-on]`` (prints one JSON
object; ``nogc`` disables the cyclic garbage collector for the run, ``log-on``
writes the event log during the restart scenarios).

Scenarios:
  restart-otree / restart-otree-quiet / restart-trio: a child that crashes
    right after starting, restarted N times (otree: a permanent task child, with
    the default logging, which builds one WARNING record per crash, or with the
    otree logger silenced; trio: a fresh task per run, the crash swallowed).
  tree-otree / tree-trio: start N idle children under one supervisor (trio:
    one nursery), wait until all are blocked, then stop them all.
  scale: one point of the scale curves (``heap=MB`` adds a supervisor heap of
    small tracked objects): start, stop and memory per child, a status snapshot
    (built and encoded as the control socket sends it) and a one_for_one restart
    among N idle children.
  parts: the CPU cost of each piece a restart is made of, alone (a task per
    run, a cancel scope, a scheduler round, a run record, an event, a log
    record...), ``sync_step_overhead`` being the harness's own share of the
    synchronous rows.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import msgspec
import trio
import trio.testing

import otree
from otree._status import status_of


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


async def _idle() -> None:
    await trio.sleep_forever()


class _Crasher:
    """A task child that raises at once, ``n`` restarts timed (wall and CPU) from its first run
    to its ``n + 1``-th, which stays up."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.runs = 0
        self.wall = [0.0, 0.0]
        self.cpu = [0.0, 0.0]
        self.finished = trio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs in (1, self.n + 1):
            end = self.runs > 1
            self.wall[end], self.cpu[end] = time.perf_counter(), time.process_time()
            if end:
                self.finished.set()
                await trio.sleep_forever()
        raise RuntimeError("crash")

    def figures(self) -> dict[str, float]:
        return {
            "us_per_restart": (self.wall[1] - self.wall[0]) / self.n * 1e6,
            "cpu_us_per_restart": (self.cpu[1] - self.cpu[0]) / self.n * 1e6,
        }


async def restart_otree(n: int) -> dict[str, float]:
    crasher = _Crasher(n)
    tree = otree.supervisor(
        "bench", max_restarts=10 * n, max_seconds=3600, children=[otree.task("c", crasher)]
    )
    gc.collect()  # no full collection of import-time garbage inside the measured window
    with tempfile.TemporaryDirectory() as directory:
        # ``log-on``: the event log (events.jsonl) is written, as under ``otree run``
        async with otree.open_supervisor(tree, state_dir=directory, event_log="log-on" in sys.argv[3:]):
            await crasher.finished.wait()
    return crasher.figures()


async def restart_otree_quiet(n: int) -> dict[str, float]:
    """As restart_otree with the ``otree`` logger silenced (no WARNING record per crash)."""
    logging.getLogger("otree").setLevel(logging.CRITICAL)
    return await restart_otree(n)


async def restart_otree_run(n: int) -> dict[str, float]:
    """As restart_otree logging as ``otree run`` does: every event at INFO, one text line each."""
    from otree._echo import EventEcho

    with open(os.devnull, "w") as sink:
        handler = EventEcho(sink, "text")
        logger = logging.getLogger("otree")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            return await restart_otree(n)
        finally:
            logger.removeHandler(handler)


async def restart_trio(n: int) -> dict[str, float]:
    async def crasher() -> None:
        raise RuntimeError("crash")

    async def guarded(done: trio.Event) -> None:
        with contextlib.suppress(Exception):  # the reference swallows the crash and restarts
            await crasher()
        done.set()

    gc.collect()
    async with trio.open_nursery() as nursery:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            done = trio.Event()
            nursery.start_soon(guarded, done)
            await done.wait()
        t1, c1 = time.perf_counter(), time.process_time()
    return {"us_per_restart": (t1 - t0) / n * 1e6, "cpu_us_per_restart": (c1 - c0) / n * 1e6}


async def tree_otree(n: int) -> dict[str, float]:
    gc.collect()
    base = _rss_kib()
    t_spec = time.perf_counter()
    tree = otree.supervisor("bench", children=[otree.task(f"c{i}", _idle) for i in range(n)])
    t0, c0 = time.perf_counter(), time.process_time()
    sup_cm = otree.open_supervisor(tree)
    await sup_cm.__aenter__()
    await trio.testing.wait_all_tasks_blocked()
    t1, c1 = time.perf_counter(), time.process_time()
    rss = _rss_kib()
    t2, c2 = time.perf_counter(), time.process_time()
    await sup_cm.__aexit__(None, None, None)
    t3, c3 = time.perf_counter(), time.process_time()
    return {
        "spec_s": t0 - t_spec,
        "start_s": t1 - t0,
        "stop_s": t3 - t2,
        "start_cpu_s": c1 - c0,
        "stop_cpu_s": c3 - c2,
        "kib_per_child": (rss - base) / n,
    }


async def tree_trio(n: int) -> dict[str, float]:
    gc.collect()
    base = _rss_kib()
    gc.collect()
    async with trio.open_nursery() as nursery:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            nursery.start_soon(_idle)
        await trio.testing.wait_all_tasks_blocked()
        t1, c1 = time.perf_counter(), time.process_time()
        rss = _rss_kib()
        t2, c2 = time.perf_counter(), time.process_time()
        nursery.cancel_scope.cancel()
    t3, c3 = time.perf_counter(), time.process_time()
    return {
        "spec_s": 0.0,
        "start_s": t1 - t0,
        "stop_s": t3 - t2,
        "start_cpu_s": c1 - c0,
        "stop_cpu_s": c3 - c2,
        "kib_per_child": (rss - base) / n,
    }


def _ballast(megabytes: int) -> list[dict[str, object]]:
    """About ``megabytes`` of small dicts, every one tracked by the cyclic GC: the caches and
    SDK objects an agent fleet keeps in its supervisor, at their worst for a collection."""
    ballast: list[dict[str, object]] = []
    target = _rss_kib() + megabytes * 1024
    while _rss_kib() < target:
        ballast.extend(
            {"id": i, "text": f"cached item {i}"} for i in range(len(ballast), len(ballast) + 50_000)
        )
    return ballast


async def scale(n: int) -> dict[str, float]:
    """One point of the scale curves: ``n`` idle children (and a heap of ``heap=MB``, default none):
    start and stop per child, memory per child, a status snapshot, and a restart among them."""
    heap = next((int(arg[5:]) for arg in sys.argv[3:] if arg.startswith("heap=")), 0)
    logging.getLogger("otree").setLevel(logging.CRITICAL)
    heap_base = _rss_kib()
    ballast = _ballast(heap) if heap else []
    gc.collect()
    base = _rss_kib()
    tree = otree.supervisor(
        "bench", max_restarts=10**6, children=[otree.task(f"c{i}", _idle) for i in range(n)]
    )
    t0, c0 = time.perf_counter(), time.process_time()
    sup_cm = otree.open_supervisor(tree)
    sup = await sup_cm.__aenter__()
    await trio.testing.wait_all_tasks_blocked()
    started, started_cpu = time.perf_counter() - t0, time.process_time() - c0
    kib = (_rss_kib() - base) / n
    status = []
    for _ in range(5):
        c = time.process_time()
        msgspec.msgpack.encode(status_of(sup, sup._tree.root_info()))
        status.append(time.process_time() - c)
    crasher = _Crasher(2000)
    await sup.start_child(otree.task("crasher", crasher))
    await crasher.finished.wait()
    t2, c2 = time.perf_counter(), time.process_time()
    await sup_cm.__aexit__(None, None, None)
    stopped, stopped_cpu = time.perf_counter() - t2, time.process_time() - c2
    return {
        "heap_mb": (base - heap_base) / 1024,
        "start_us_per_child": started / n * 1e6,
        "start_cpu_us_per_child": started_cpu / n * 1e6,
        "stop_us_per_child": stopped / (n + 1) * 1e6,
        "stop_cpu_us_per_child": stopped_cpu / (n + 1) * 1e6,
        "kib_per_child": kib,
        "status_cpu_ms": statistics.median(status) * 1e3,
        "restart_us": crasher.figures()["us_per_restart"],
        "restart_cpu_us": crasher.figures()["cpu_us_per_restart"],
        "ballast": len(ballast),
    }


class _Dropped(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        pass


async def parts(n: int) -> dict[str, float]:
    """CPU us of the pieces a restart is made of, each alone, ``n`` times (where a restart's time goes)."""
    from otree._events import EventBus
    from otree._info import Event
    from otree._intensity import RestartWindow
    from otree._task import RunningChild

    async def crash() -> None:
        raise RuntimeError("crash")

    async def caught(done: trio.Event | None = None) -> None:
        with contextlib.suppress(Exception):
            await crash()
        if done is not None:
            done.set()

    async def timed(step: Callable[[], Awaitable[object]], count: int = n) -> float:
        c0 = time.process_time()
        for _ in range(count):
            await step()
        return (time.process_time() - c0) / count * 1e6

    async def scope_cycle() -> None:
        with trio.CancelScope(shield=True):
            pass

    async with trio.open_nursery() as nursery:

        async def task_per_run() -> None:
            done = trio.Event()
            nursery.start_soon(caught, done)
            await done.wait()

        spawn = await timed(task_per_run, n // 4)

    async def sync(fn: Callable[[], object]) -> None:
        fn()

    bus, window = EventBus(), RestartWindow(10**9, 3600.0)
    error = RuntimeError("crash")
    event = Event(0.0, "bench/c", "child.exited", "error", {"detail": "RuntimeError: crash"})
    logging.getLogger().addHandler(_Dropped())  # a handler: records are built (and dropped)
    figures = {
        "task_per_run_floor": spawn,
        "raise_and_catch": await timed(caught),
        "cancel_scope_create_enter_exit": await timed(scope_cycle),
        "scheduler_round": await timed(trio.lowlevel.cancel_shielded_checkpoint),
        "running_child": await timed(lambda: sync(lambda: RunningChild(None, None, "bench/c"))),  # type: ignore[arg-type]
        "window_add": await timed(lambda: sync(lambda: window.add_restart(trio.current_time()))),
        "event_nobody_wants": await timed(lambda: sync(lambda: bus.emit("bench/c", "child.ready", "", {}))),
        "event_with_log_record": await timed(
            lambda: sync(lambda: bus.publish(event, logging.WARNING, error))
        ),
    }
    figures["sync_step_overhead"] = await timed(lambda: sync(lambda: None))
    return figures


SCENARIOS = {
    "restart-otree": restart_otree,
    "restart-otree-quiet": restart_otree_quiet,
    "restart-otree-run": restart_otree_run,
    "restart-trio": restart_trio,
    "tree-otree": tree_otree,
    "tree-trio": tree_trio,
    "scale": scale,
    "parts": parts,
}

if __name__ == "__main__":
    name, count = sys.argv[1], int(sys.argv[2])
    if "nogc" in sys.argv[3:]:  # to show how much of a start is the cyclic GC's
        gc.disable()
    result = trio.run(SCENARIOS[name], count)
    result["peak_rss_kib"] = _rss_kib("VmHWM")
    print(json.dumps(result))
