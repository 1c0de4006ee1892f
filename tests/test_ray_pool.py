"""Pool jobs on Ray (``otree.RayExecutor``), on the session's local Ray instance.

The pool stays local (queue, priorities, cap, budget, retries); each job is a Ray task. The
handlers run in Ray's worker processes, so they tell the test what happened through files (or a
Ray actor), and the test waits for those with a deadline, never by sleeping and hoping.
"""

from __future__ import annotations

import os

# Ray reads these when it is imported: loopback only, no usage stats
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import importlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import otree
from tests.helpers import alive, descendants, wait_gone

ray: Any = importlib.import_module("ray") if os.environ.get("CI") else pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

DEADLINE = 60.0
GAUGE = "otree-test-gauge"


@pytest.fixture(autouse=True)
def _ray(ray_instance: str) -> None:
    """Every test here runs with the session's Ray instance up."""


# --- handlers (they run in Ray workers) --------------------------------------------------------


def _note(path: str, text: str) -> None:
    with open(path, "a") as file:
        file.write(text + "\n")


async def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.02)


async def noted(payload: dict[str, Any]) -> Any:
    """Notes ``label pid`` in ``notes``; waits for ``wait_for`` to exist if given; spends ``cost``."""
    _note(payload["notes"], f"{payload.get('label', '')} {os.getpid()}")
    if "wait_for" in payload:
        await _until(lambda: os.path.exists(payload["wait_for"]))
    if payload.get("cost"):
        otree.current_child().report_cost(payload["cost"])
    return payload.get("label")


async def gauged(payload: dict[str, Any]) -> None:
    """Counts itself in the gauge actor while it runs, until ``cap`` jobs are in (or 10 s)."""
    gauge = ray.get_actor(GAUGE)
    ray.get(gauge.enter.remote())
    with trio.move_on_after(10):
        while ray.get(gauge.now.remote()) < payload["cap"]:
            await trio.sleep(0.02)
    await trio.sleep(0.1)
    ray.get(gauge.leave.remote())


async def dies_once(payload: dict[str, Any]) -> str:
    """First attempt: notes its pid and waits to be killed; the next one spends and succeeds."""
    notes = Path(payload["notes"])
    first = not notes.exists()
    _note(os.fspath(notes), str(os.getpid()))
    if first:
        await trio.sleep(DEADLINE)
    otree.current_child().report_cost(0.1)
    return "done"


async def stoppable(payload: dict[str, Any]) -> None:
    """Runs until stopped: notes its pid, then ``stopped`` in its ``finally`` (a graceful stop)
    or, with ``block``, blocks its thread so that only killing its worker stops it."""
    _note(payload["notes"], str(os.getpid()))
    if payload.get("block"):
        time.sleep(DEADLINE)
    try:
        await trio.sleep_forever()
    finally:
        _note(payload["notes"], "stopped")


@ray.remote(num_cpus=0)
class Gauge:
    """How many jobs are inside Ray now, and the most at once."""

    def __init__(self) -> None:
        self.count = self.most = 0

    def enter(self) -> None:
        self.count += 1
        self.most = max(self.most, self.count)

    def leave(self) -> None:
        self.count -= 1

    def now(self) -> int:
        return self.count

    def peak(self) -> int:
        return self.most


def _pool(handlers: dict[str, Any], **settings: Any) -> otree.SupervisorSpec:
    options = settings.pop("ray_options", {"num_cpus": 0})
    pool = otree.pool("jobs", handlers, executor=otree.RayExecutor(**options), **settings)
    return otree.supervisor("fleet", children=[pool])


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# --- order, cap and budget hold across Ray ------------------------------------------------------


async def test_jobs_run_as_ray_tasks_in_priority_order(tmp_path: Path) -> None:
    notes, release = tmp_path / "order", tmp_path / "release"
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_pool({"noted": noted}, max_concurrency=1)) as sup:
            jobs = sup.child("jobs")
            first = await jobs.submit(
                "noted", {"notes": os.fspath(notes), "label": "first", "wait_for": os.fspath(release)}
            )
            await _until(lambda: len(_lines(notes)) == 1)  # it holds the only slot
            queued = [("low", -3), ("mid-a", 0), ("high", 10), ("mid-b", 0), ("top", 50)]
            later = [
                await jobs.submit("noted", {"notes": os.fspath(notes), "label": label}, priority=priority)
                for label, priority in queued
            ]
            release.touch()
            results = [await job.result() for job in [first, *later]]
    assert results == ["first", "low", "mid-a", "high", "mid-b", "top"]
    order = [line.split() for line in _lines(notes)]
    assert [label for label, _ in order] == ["first", "top", "high", "mid-a", "mid-b", "low"]
    assert all(int(pid) != os.getpid() for _, pid in order)  # each ran in a Ray worker


async def test_at_most_max_concurrency_jobs_are_inside_ray_at_once() -> None:
    gauge = Gauge.options(name=GAUGE).remote()  # type: ignore[attr-defined]
    try:
        with trio.fail_after(DEADLINE):
            async with otree.open_supervisor(_pool({"gauged": gauged}, max_concurrency=3)) as sup:
                jobs = sup.child("jobs")
                submitted = [await jobs.submit("gauged", {"cap": 3}) for _ in range(9)]
                for job in submitted:
                    await job.result()
        # the tasks ask for no CPU: Ray alone would run all nine at once
        assert ray.get(gauge.peak.remote()) == 3
    finally:
        ray.kill(gauge)


async def test_the_budget_gate_holds_a_job_until_remote_spend_is_known(tmp_path: Path) -> None:
    notes, release = tmp_path / "notes", tmp_path / "release"
    tree = _pool({"noted": noted}, max_concurrency=4, daily_budget=1.0, on_budget_exhausted="hold")
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup:
            jobs = sup.child("jobs")
            payload = {"notes": os.fspath(notes), "cost": 0.3}
            first = await jobs.submit(
                "noted", {**payload, "label": "a", "wait_for": os.fspath(release)}, estimated_cost=0.6
            )
            second = await jobs.submit("noted", {**payload, "label": "b"}, estimated_cost=0.6)
            await _until(lambda: len(_lines(notes)) == 1)
            status = jobs.status()
            assert (status.running, status.queued, status.reserved) == (1, 1, 0.6)
            assert status.held is not None and status.held.startswith("budget:")
            release.touch()
            assert [await first.result(), await second.result()] == ["a", "b"]
            spent = jobs.status().spent_today
    assert spent == pytest.approx(0.6)  # each job's remote spend, counted once


async def test_remote_spend_over_the_budget_rejects_new_jobs(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    tree = _pool({"noted": noted}, daily_budget=1.0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup:
            jobs = sup.child("jobs")
            job = await jobs.submit("noted", {"notes": os.fspath(notes), "cost": 1.0}, estimated_cost=0.2)
            await job.result()
            assert jobs.status().spent_today == pytest.approx(1.0)
            with pytest.raises(otree.BudgetExceeded):
                await jobs.submit("noted", {"notes": os.fspath(notes)}, estimated_cost=0.1)


# --- failures ------------------------------------------------------------------------------------


async def test_a_job_whose_worker_is_killed_settles_at_its_estimate_and_runs_again(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    tree = _pool({"dies_once": dies_once}, max_attempts=2, daily_budget=10.0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup, sup.events() as stream:
            jobs = sup.child("jobs")
            job = await jobs.submit("dies_once", {"notes": os.fspath(notes)}, estimated_cost=0.5)
            await _until(lambda: len(_lines(notes)) == 1)
            worker = int(_lines(notes)[0])
            os.kill(worker, signal.SIGKILL)
            assert await job.result() == "done"
            spent = jobs.status().spent_today
            async for event in stream:
                if event.kind == "job.retried":
                    break
    assert job.attempts == 2
    assert spent == pytest.approx(0.5 + 0.1)  # the lost attempt at its estimate, the next as spent
    assert event.details["detail"].startswith("WorkerCrashedError: "), event.details["detail"]
    assert "\n" not in event.details["detail"]
    second = int(_lines(notes)[1])
    assert second != worker and not alive(worker)


async def test_a_cancelled_job_is_stopped_on_its_node_in_order(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    tree = _pool({"stoppable": stoppable}, daily_budget=10.0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup:
            jobs = sup.child("jobs")
            job = await jobs.submit("stoppable", {"notes": os.fspath(notes)}, estimated_cost=0.5)
            await _until(lambda: len(_lines(notes)) == 1)
            job.cancel()
            with pytest.raises(otree.JobFailed, match="cancelled"):
                await job.result()
            spent = jobs.status().spent_today
    worker = int(_lines(notes)[0])
    assert _lines(notes)[1] == "stopped"  # its finally ran: a stop, not a kill
    assert alive(worker)  # its worker lives on for the next jobs
    assert spent == 0  # it came back with its spend (none)


async def test_a_job_that_ignores_its_stop_is_killed_at_the_grace(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    tree = _pool({"stoppable": stoppable}, job_shutdown=1.0, daily_budget=10.0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup:
            jobs = sup.child("jobs")
            job = await jobs.submit(
                "stoppable", {"notes": os.fspath(notes), "block": True}, estimated_cost=0.5
            )
            await _until(lambda: len(_lines(notes)) == 1)
            asked = trio.current_time()
            job.cancel()
            with pytest.raises(otree.JobFailed, match="cancelled"):
                await job.result()
            took = trio.current_time() - asked
            spent = jobs.status().spent_today
    worker = int(_lines(notes)[0])
    assert 1.0 <= took < 1.0 + 5.0
    assert not wait_gone({worker})  # killed with its worker (ray.cancel(force=True))
    assert spent == pytest.approx(0.5)  # its spend is unknown: its estimate


async def test_max_runtime_stops_a_ray_job_on_its_node_and_fails_the_attempt(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    tree = _pool({"stoppable": stoppable}, max_runtime=1.0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup:
            job = await sup.child("jobs").submit("stoppable", {"notes": os.fspath(notes)})
            with pytest.raises(otree.JobFailed, match="dead-lettered after 1 attempt"):
                await job.result()
            (letter,) = sup.child("jobs").dead_letters()
    assert letter.error.startswith("max_runtime")
    assert _lines(notes)[1] == "stopped"


async def test_jobs_running_on_ray_stop_with_their_pool(tmp_path: Path) -> None:
    notes = [tmp_path / "a", tmp_path / "b"]
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_pool({"stoppable": stoppable}, max_concurrency=2)) as sup:
            jobs = [await sup.child("jobs").submit("stoppable", {"notes": os.fspath(n)}) for n in notes]
            await _until(lambda: all(len(_lines(n)) == 1 for n in notes))
    for job in jobs:
        with pytest.raises(otree.JobFailed, match="dropped: pool_stopped"):
            await job.result()
    assert [_lines(n)[1] for n in notes] == ["stopped", "stopped"]


def test_ray_is_imported_only_when_a_ray_executor_is_built() -> None:
    script = (
        "import sys, otree\n"
        "async def noop(payload): return payload\n"
        "otree.pool('jobs', {'noop': noop})\n"
        "assert 'ray' not in sys.modules, 'ray imported by otree'\n"
        "otree.RayExecutor()\n"
        "assert 'ray' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=DEADLINE)


async def test_a_payload_or_handler_that_cannot_travel_is_refused_in_one_line() -> None:
    class Secret(dict[str, str]):
        def __reduce__(self) -> Any:
            raise TypeError("a Secret stays here")

    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_pool({"noted": noted})) as sup:
            with pytest.raises(ValueError) as caught:
                await sup.child("jobs").submit("noted", Secret(key="value"))
    assert str(caught.value) == (
        "fleet/jobs: payload of a 'noted' job cannot be pickled to run on Ray: TypeError: a Secret stays here"
    )
    lock = threading.Lock()

    async def holds_a_lock(payload: Any) -> None:
        with lock:
            pass

    with pytest.raises(otree.SpecError) as refused:
        _pool({"locked": holds_a_lock})
    assert "jobs: handlers['locked'] must be picklable to run on a Ray node" in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_cpu": 1}, "num_cpu is not a Ray task option"),
        ({"max_retries": 3}, "max_retries must be 0: otree retries jobs, Ray never does"),
        ({"retry_exceptions": True}, "retry_exceptions must be False: otree retries jobs, Ray never does"),
        ({"num_returns": 2}, "num_returns is set by otree; leave it out"),
        ({"num_cpus": -1}, "ray options are refused by Ray"),
    ],
)
def test_options_ray_would_refuse_or_use_to_retry_are_refused_when_the_spec_is_built(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(otree.SpecError, match=message):
        _pool({"noted": noted}, ray_options=options)


# --- process jobs ------------------------------------------------------------------------------------

JOB_SCRIPT = """
import json, os, signal, socket, subprocess, sys, time
payload = json.load(sys.stdin)
if payload.get("deaf"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before its grandchild: the grandchild is deaf too
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(payload["notes"], "a") as notes:
    notes.write(f"{os.getppid()} {os.getpid()} {grandchild.pid} {os.getpgid(0)}\\n")
address = os.environ["NOTIFY_SOCKET"]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
    notify.sendto(b"OTREE_COST=0.2", "\\0" + address[1:] if address.startswith("@") else address)
if payload.get("hang"):
    time.sleep(300)
print(json.dumps({"got": payload["n"]}))  # its grandchild is left in its group
"""


async def test_a_process_job_runs_as_a_process_on_a_ray_node(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB_SCRIPT))
    notes = tmp_path / "pids"
    handler = otree.process_job([sys.executable, os.fspath(script)], shutdown=2.0)
    tree = _pool({"proc": handler}, max_concurrency=2, daily_budget=10.0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup:
            jobs = sup.child("jobs")
            done = await jobs.submit("proc", {"notes": os.fspath(notes), "n": 7})
            assert await done.result() == {"got": 7}
            hung = await jobs.submit("proc", {"notes": os.fspath(notes), "n": 8, "hang": True})
            await _until(lambda: len(_lines(notes)) == 2)
            hung.cancel()
            with pytest.raises(otree.JobFailed, match="cancelled"):
                await hung.result()
            spent = jobs.status().spent_today
    runs = [list(map(int, line.split())) for line in _lines(notes)]
    (worker, child, _, group), _hung = runs
    assert worker != os.getpid() and worker in descendants(os.getpid())  # a Ray worker (under the raylet)
    assert group == child  # its own process group
    assert spent == pytest.approx(0.4)  # OTREE_COST=0.2 from each, reported on the node
    # each job's group went with it: the one that exited, and the one that was stopped
    left = wait_gone({pid for run in runs for pid in run[1:3]})
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
    assert alive(worker)  # stopped in order: its worker lives on


async def test_a_process_job_killed_with_its_worker_takes_its_group_with_it(tmp_path: Path) -> None:
    """A process job deaf to its stop signal, past the pool's grace: its task is force-cancelled,
    which kills its Ray worker; the job, and its grandchild in its group, go with the worker."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB_SCRIPT))
    notes = tmp_path / "pids"
    handler = otree.process_job([sys.executable, os.fspath(script)], shutdown=60.0)
    tree = _pool({"proc": handler}, job_shutdown=1.0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup:
            job = await sup.child("jobs").submit(
                "proc", {"notes": os.fspath(notes), "n": 1, "deaf": True, "hang": True}
            )
            await _until(lambda: len(_lines(notes)) == 1)
            job.cancel()
            with pytest.raises(otree.JobFailed, match="cancelled"):
                await job.result()
    worker, child, grandchild, _ = map(int, _lines(notes)[0].split())
    left = wait_gone({worker, child, grandchild})
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
