"""Ray children (``otree.ray``) on one real local Ray instance, loopback only.

One instance serves the test session (``ray_instance`` in conftest.py, started once, ~4 s); at
the end it is shut down and every process it started is checked gone by pid. The children talk
to the test through files, since they run in Ray's worker processes. Skipped only outside CI
when Ray is not installed: in CI (``CI`` set) a missing Ray is a failure, not a skip.
"""

from __future__ import annotations

import os

# Ray reads these when it is imported: loopback only, no usage stats
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import importlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

import otree
from otree._info import Status, StatusNode
from otree._status import status_of
from tests.helpers import alive as _alive
from tests.helpers import descendants as _descendants
from tests.helpers import wait_gone as _wait_gone
from tests.helpers import with_cmdline as _with_cmdline
from tests.helpers import with_environ as _with_environ
from tests.otree_subprocess import REPO

ray: Any = importlib.import_module("ray") if os.environ.get("CI") else pytest.importorskip("ray")

# A Ray instance takes seconds to start: these run in the slow step, all on one pytest-xdist
# worker under `--dist loadgroup` (one instance for the module, not one per worker).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

DEADLINE = 60.0
OTREE = [sys.executable, "-m", "otree"]


# --- processes --------------------------------------------------------------------------------


def _wait_file(path: Path, lines: int = 1, seconds: float = 30.0) -> str:
    """The first of ``lines`` lines written to ``path``, once they all are."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text()).count("\n") >= lines:
            return text.splitlines()[0]
        time.sleep(0.02)
    raise AssertionError(f"{path} not written in {seconds}s")


@pytest.fixture(autouse=True)
def _ray(ray_instance: str) -> None:
    """Every test here runs with the module's Ray instance up."""


# --- remote children (they run in Ray workers: they report through files) ----------------------


def _note(path: str, text: str) -> None:
    with open(path, "a") as file:
        file.write(text + "\n")


async def ends(how: str, notes: str = "", *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
    """Ready, then ends as ``how`` says: return, raise, Shutdown, os._exit, hang, or wait."""
    if notes:
        _note(notes, str(os.getpid()))
    if how == "fail_start":
        raise ConnectionError("no model endpoint")
    task_status.started()
    await trio.sleep(0.2)
    if how == "return":
        return
    if how == "spend":
        otree.current_child().report_cost(0.25)
        otree.current_child().report_cost(0.5)
        return
    if how == "raise":
        raise ValueError("bad answer")
    if how == "emit_then_raise":  # late enough for a test that subscribes once the tree is up
        await trio.sleep(1.0)
        otree.current_child().emit("app.gave_up", reason="provider", tries=3)
        raise ValueError("bad answer")
    if how == "shutdown":
        raise otree.Shutdown("done for today")
    if how == "exit":
        os._exit(1)
    if how == "hang":
        if notes:
            _note(notes, "hanging")
        time.sleep(120)  # blocks the remote trio loop: only the heartbeat can tell
    if how == "trap":
        await otree.current_child().stopping.wait()
        return
    await trio.sleep_forever()


def _tree(*children: otree.RaySpec, **settings: Any) -> otree.SupervisorSpec:
    return otree.supervisor("fleet", children=list(children), **settings)


def _remote(how: str, notes: str = "", **settings: Any) -> otree.RaySpec:
    restart = settings.pop("restart", "permanent")
    shutdown = settings.pop("shutdown", 5.0)
    task = otree.task("agent", ends, how, notes, restart=restart, shutdown=shutdown)
    return otree.ray(task, num_cpus=0, **settings)


async def _next(stream: otree.EventStream, wanted: Callable[[otree.Event], bool]) -> otree.Event:
    async for event in stream:
        if wanted(event):
            return event
    raise AssertionError("the event stream ended")


def _exit_of(kind: str = "child.exited") -> Callable[[otree.Event], bool]:
    return lambda e: e.path == "fleet/agent" and e.kind == kind


# --- starting and exiting --------------------------------------------------------------------


async def test_a_ray_task_is_ready_then_exits_normal() -> None:
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(_remote("return", restart="transient"))) as sup:
            (info,) = sup.which_children()
            assert (info.kind, info.state) == ("ray", "running")
            async with sup.events() as stream:
                event = await _next(stream, _exit_of())
            assert (event.reason, event.details["detail"]) == ("normal", "")
            assert sup.which_children()[0].state == "stopped"  # transient: a normal exit stays down


@pytest.mark.parametrize(
    ("how", "reason", "detail"),
    [("raise", "error", "ValueError: bad answer"), ("shutdown", "shutdown", "done for today")],
)
async def test_a_ray_task_exits_with_the_remote_reason_and_detail(how: str, reason: str, detail: str) -> None:
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(_remote(how, restart="temporary"))) as sup:
            async with sup.events() as stream:
                event = await _next(stream, _exit_of())
            assert (event.reason, event.details["detail"]) == (reason, detail)
            assert sup.which_children() == []  # temporary: gone


async def test_the_spend_of_a_remote_run_is_in_its_exit_event_once() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            otree.open_supervisor(_tree(_remote("spend", restart="temporary"))) as sup,
            sup.events() as stream,
        ):
            event = await _next(stream, _exit_of())
    assert (event.reason, event.details["cost"]) == ("normal", 0.75)


async def test_a_remote_start_failure_is_a_start_error() -> None:
    with trio.fail_after(DEADLINE), pytest.raises(otree.StartError) as caught:
        async with otree.open_supervisor(_tree(_remote("fail_start"))):
            pass
    assert str(caught.value) == "fleet/agent: failed to start: ConnectionError: no model endpoint"


async def test_an_unknown_option_and_a_ray_restart_are_refused_at_declaration() -> None:
    task = otree.task("agent", ends, "wait")
    with pytest.raises(otree.SpecError, match="agent: num_cpu is not a Ray actor option"):
        otree.ray(task, num_cpu=1)
    with pytest.raises(otree.SpecError, match="agent: max_restarts must be 0: otree restarts"):
        otree.ray(task, max_restarts=3)
    with pytest.raises(otree.SpecError, match="agent: ray options are refused by Ray"):
        otree.ray(task, num_cpus=-1)
    assert otree.ray(task, max_restarts=0).options == {"max_restarts": 0}
    with pytest.raises(otree.SpecError) as caught:
        otree.ray(otree.task("agent", ends, "wait", threading.Lock()))
    assert str(caught.value) == (
        "agent: spec must be picklable to run on a Ray node;"
        " got \"TypeError: cannot pickle '_thread.lock' object\""
    )


async def test_an_unsatisfiable_resource_request_fails_the_start_at_start_timeout() -> None:
    spec = otree.ray(otree.task("agent", ends, "wait"), resources={"no_such_slot": 1}, start_timeout=1.5)
    with trio.fail_after(DEADLINE), pytest.raises(otree.StartError) as caught:
        async with otree.open_supervisor(_tree(spec)):
            pass
    assert str(caught.value) == (
        "fleet/agent: failed to start: start_timeout: not ready within 1.5s"
        " (Ray could not place the actor, or the remote child did not start)"
    )


# --- restarts decided locally --------------------------------------------------------------------


async def test_remote_crashes_are_restarted_locally_then_escalate(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    tree = _tree(_remote("raise", os.fspath(notes)), max_restarts=2, max_seconds=60)
    with trio.fail_after(DEADLINE), pytest.raises(otree.RestartIntensityExceeded) as caught:
        async with otree.open_supervisor(tree) as sup:
            await trio.sleep_forever()
            del sup
    assert "last failing child: fleet/agent" in str(caught.value)
    pids = notes.read_text().split()
    assert len(pids) == 3 and len(set(pids)) == 3  # three runs, each in a new actor process


@pytest.mark.parametrize("death", ["exit", "sigkill"])
async def test_an_actor_process_that_dies_is_restarted_by_its_supervisor(tmp_path: Path, death: str) -> None:
    notes = tmp_path / "pids"
    how = "exit" if death == "exit" else "wait"
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(_remote(how, os.fspath(notes)))) as sup:
            first = int(_wait_file(notes))
            async with sup.events() as stream:
                if death == "sigkill":
                    os.kill(first, signal.SIGKILL)
                event = await _next(stream, _exit_of())
                assert event.reason == "error"
                assert event.details["detail"].startswith("ActorDiedError:")
                placed = await _next(stream, _exit_of("ray.placed"))
                await _next(stream, _exit_of("child.ready"))
            (info,) = sup.which_children()
            assert (info.state, info.restarts) == ("running", 1)
            second = int(notes.read_text().split()[1])
            assert placed.details["pid"] == second and placed.details["node"] == "127.0.0.1"
            assert placed.details["node_id"] == ray.get_runtime_context().get_node_id()
            assert second != first and _alive(second) and not _alive(first)


async def test_an_actor_killed_during_a_ping_is_an_actor_death(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    # a ping every 5 ms: one is in flight at about one death in three, and fails with it too;
    # eight deaths make that race happen in nearly every run of this test
    spec = _remote("wait", os.fspath(notes), heartbeat=(0.005, 1000))
    tree = _tree(spec, max_restarts=10, max_seconds=60)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree) as sup, sup.events() as stream:
            for run in range(1, 9):
                pid = int(notes.read_text().split()[run - 1])  # written before it was ready
                await trio.sleep(0.3)
                os.kill(pid, signal.SIGKILL)
                event = await _next(stream, _exit_of())
                assert event.reason == "error"
                assert event.details["detail"].startswith("ActorDiedError:")
                await _next(stream, _exit_of("child.ready"))


async def test_a_hung_actor_is_found_by_the_heartbeat_and_killed(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    spec = _remote("hang", os.fspath(notes), restart="temporary", heartbeat=(0.3, 2))
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(spec)) as sup, sup.events() as stream:
            event = await _next(stream, _exit_of())
    assert event.reason == "error"
    assert event.details["detail"] == "heartbeat: no answer to 2 pings 0.3s apart (presumed dead)"
    assert not _wait_gone({int(notes.read_text().split()[0])})


# --- stops -------------------------------------------------------------------------------------


async def test_a_graceful_stop_reaches_the_remote_child(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(_remote("trap", os.fspath(notes)))) as sup:
            pid = int(_wait_file(notes))
            async with sup.events() as stream:
                await sup.terminate_child("agent")
                event = await _next(stream, _exit_of("child.stopped"))
    assert (event.reason, event.details["detail"]) == ("shutdown", "")
    assert not _wait_gone({pid})


async def test_a_graceful_stop_reaches_a_remote_process_as_its_stop_signal(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    argv = _script(
        tmp_path,
        f"""
        import os, signal, sys, time
        def stop(signum, frame):
            with open({os.fspath(notes)!r}, "a") as notes:
                notes.write("SIGTERM\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        with open({os.fspath(notes)!r}, "a") as notes:
            notes.write(f"{{os.getppid()}} {{os.getpid()}}\\n")
        time.sleep(300)
        """,
    )
    spec = otree.ray(otree.process("agent", argv), num_cpus=0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(spec), state_dir=tmp_path / "state") as sup:
            actor, child = map(int, _wait_file(notes).split())
            async with sup.events() as stream:
                await sup.terminate_child("agent")
                event = await _next(stream, _exit_of("child.stopped"))
    assert (event.reason, event.details["detail"]) == ("shutdown", "")
    assert notes.read_text().splitlines()[1] == "SIGTERM"  # it stopped by its stop signal
    assert not _wait_gone({actor, child})


@pytest.mark.parametrize(("shutdown", "how"), [("brutal_kill", "trap"), (0.5, "hang")])
async def test_a_stop_past_its_grace_kills_the_actor(tmp_path: Path, shutdown: Any, how: str) -> None:
    notes = tmp_path / "pids"
    spec = _remote(how, os.fspath(notes), shutdown=shutdown, heartbeat=(60.0, 1))
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(spec)) as sup:
            pid = int(_wait_file(notes, lines=2 if how == "hang" else 1))
            async with sup.events() as stream:
                started = trio.current_time()
                await sup.terminate_child("agent")
                event = await _next(stream, _exit_of("child.stopped"))
            assert trio.current_time() - started < 5
    assert (event.reason, event.details["detail"]) == ("shutdown", "killed")
    assert not _wait_gone({pid})


# --- other kinds -----------------------------------------------------------------------------


def _script(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, os.fspath(script)]


@pytest.mark.parametrize(("code", "reason", "detail"), [(0, "normal", ""), (3, "error", "exit code 3")])
async def test_a_ray_process_exits_with_its_exit_code(
    tmp_path: Path, code: int, reason: str, detail: str
) -> None:
    argv = _script(tmp_path, f"import time, sys; time.sleep(0.3); sys.exit({code})")
    spec = otree.ray(otree.process("agent", argv, restart="temporary"), num_cpus=0)
    with trio.fail_after(DEADLINE):
        async with (
            otree.open_supervisor(_tree(spec), state_dir=tmp_path / "state") as sup,
            sup.events() as stream,
        ):
            event = await _next(stream, _exit_of())
    assert (event.reason, event.details["detail"]) == (reason, detail)


@pytest.mark.parametrize("death", ["SIGKILL", "ray.kill"])
async def test_a_ray_process_and_its_grandchildren_die_with_the_actor(tmp_path: Path, death: str) -> None:
    """The actor's process SIGKILLed, or killed by Ray (a brutal stop: ``ray.kill``, whose worker
    SIGKILLs its own children, the spawn helper among them, as it exits)."""
    notes = tmp_path / "pids"
    argv = _script(
        tmp_path,
        f"""
        import os, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        with open({os.fspath(notes)!r}, "w") as notes:
            notes.write(f"{{os.getppid()}} {{os.getpid()}} {{grandchild.pid}}\\n")
        time.sleep(300)
        """,
    )
    spec = otree.ray(otree.process("agent", argv, restart="temporary", shutdown="brutal_kill"), num_cpus=0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(spec), state_dir=tmp_path / "state") as sup:
            actor, child, grandchild = map(int, _wait_file(notes).split())
            async with sup.events() as stream:
                if death == "SIGKILL":
                    os.kill(actor, signal.SIGKILL)
                    event = await _next(stream, _exit_of())
                else:
                    await sup.terminate_child("agent")
                    event = await _next(stream, _exit_of("child.stopped"))
    if death == "SIGKILL":
        assert event.reason == "error" and event.details["detail"].startswith("ActorDiedError:")
    else:
        assert (event.reason, event.details["detail"]) == ("shutdown", "killed")
    left = _wait_gone({actor, child, grandchild})
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


async def test_a_ray_supervisor_runs_its_subtree_remotely_and_its_events_come_home(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    team = otree.supervisor(
        "team",
        max_restarts=1,
        max_seconds=60,
        restart="transient",
        children=[otree.task("a", ends, "wait"), otree.task("b", ends, "emit_then_raise", os.fspath(notes))],
    )
    spec = otree.ray(team, num_cpus=0)
    seen: list[tuple[str, str, str]] = []
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(otree.supervisor("fleet", children=[spec])) as sup:
            async with sup.events() as stream:
                async for event in stream:
                    seen.append((event.path, event.kind, event.reason))
                    if event.path == "fleet/team" and event.kind == "child.exited":
                        break
                    if event.kind == "app.gave_up":
                        assert event.details == {"tries": 3}
            assert (event.reason, event.details["detail"]) == ("shutdown", "reached max restart intensity")
            assert sup.which_children()[0].state == "stopped"  # transient: a shutdown is not restarted
    pids = set(notes.read_text().split())
    assert len(pids) == 1  # b was restarted inside one actor, by the remote supervisor
    # the remote tree's events, under local paths, in order; the wrapped child's own start and
    # exit once each (the local supervisor's), the remote root's never
    expected = [
        ("fleet/team/b", "app.gave_up", "provider"),
        ("fleet/team/b", "child.exited", "error"),
        ("fleet/team/b", "child.restarting", "restart"),
        ("fleet/team/b", "child.ready", ""),
        ("fleet/team/b", "app.gave_up", "provider"),
        ("fleet/team/b", "child.exited", "error"),
        ("fleet/team", "supervisor.intensity_exceeded", "shutdown"),
        ("fleet/team/a", "child.stopped", "shutdown"),
        ("fleet/team", "supervisor.stopped", "shutdown"),
        ("fleet/team", "child.exited", "shutdown"),
    ]
    assert [e for e in seen if e in expected] == expected
    assert [e for e in seen if e[0] == "fleet/team" and e[1].startswith("child.")] == [expected[-1]]
    assert all(path == "fleet" or path.startswith("fleet/team") for path, _, _ in seen)


async def test_a_ray_pool_runs_remotely_and_stops_with_the_tree() -> None:
    async def handler(payload: Any) -> Any:
        return payload

    spec = otree.ray(otree.pool("jobs", {"echo": handler}), num_cpus=0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(otree.supervisor("fleet", children=[spec])) as sup:
            (info,) = sup.which_children()
            assert (info.kind, info.state) == ("ray", "running")
            async with sup.events() as stream:
                await sup.terminate_child("jobs")
                event = await _next(stream, lambda e: e.path == "fleet/jobs" and e.kind == "child.stopped")
    assert (event.reason, event.details["detail"]) == ("shutdown", "")


# --- several nodes (ray.cluster_utils.Cluster, in a process of its own: one Ray per process) ---

MULTINODE = """
import json, logging, os, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
import ray, trio, otree
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

EVENTS = []


class Collect(logging.Handler):
    def emit(self, record):
        event = getattr(record, "otree_event", None)
        if event is not None and event.path == "fleet/agent":
            EVENTS.append(event)


async def agent(*, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep_forever()


async def wait_for(kind, after):
    with trio.fail_after(60):
        while True:
            for index, event in enumerate(EVENTS[after:], after):
                if event.kind == kind:
                    return event, index + 1
            await trio.sleep(0.05)


async def run(cluster, nodes, out):
    # pinned softly to the first node: when it goes, Ray places the replacement elsewhere
    pinned = NodeAffinitySchedulingStrategy(node_id=nodes[0].node_id, soft=True)
    spare = sys.argv[1] == "spare"  # a spare is placed like the child: on its node, and goes with it
    spec = otree.ray(
        otree.task("agent", agent), num_cpus=1, heartbeat=(1.0, 3), scheduling_strategy=pinned, spare=spare
    )
    tree = otree.supervisor("fleet", max_restarts=5, max_seconds=60, children=[spec])
    async with otree.open_supervisor(tree) as sup:
        placed, seen = await wait_for("ray.placed", 0)
        out["placed"].append(placed.details["node_id"])
        for graceful in (True, False):  # removed in order, then its processes SIGKILLed
            node = {n.node_id: n for n in nodes}[out["placed"][-1]]
            await trio.to_thread.run_sync(lambda: cluster.remove_node(node, allow_graceful=graceful))
            exited, seen = await wait_for("child.exited", seen)
            out["exits"].append([exited.reason, exited.details["detail"].partition(":")[0]])
            placed, seen = await wait_for("ray.placed", seen)
            await wait_for("child.ready", seen)
            out["placed"].append(placed.details["node_id"])
        out["restarts"] = sup.which_children()[0].restarts


def main():
    log = logging.getLogger("otree")
    log.addHandler(Collect())
    log.setLevel(logging.INFO)
    log.propagate = False
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out = {"nodes": [n.node_id for n in nodes], "placed": [], "exits": []}
    try:
        trio.run(run, cluster, nodes, out)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


main()
"""


@pytest.mark.parametrize("spare", ["no_spare", "spare"])
def test_a_child_whose_node_is_lost_comes_back_on_another_node(tmp_path: Path, spare: str) -> None:
    (tmp_path / "multinode.py").write_text(MULTINODE)
    temp = tempfile.mkdtemp(prefix="otree-ray-nodes-")  # short: Ray's socket paths must fit 107 bytes
    process = subprocess.Popen(
        [sys.executable, os.fspath(tmp_path / "multinode.py"), spare],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "RAY_TMPDIR": temp},
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 2 * DEADLINE
        while process.poll() is None and time.monotonic() < deadline:
            seen |= _descendants(process.pid)
            time.sleep(0.2)
        out, err = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(temp, ignore_errors=True)
    assert process.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().splitlines()[-1])
    first, second, third = result["nodes"]
    # on its node; gone with it in order (ActorDiedError), then with its processes SIGKILLed
    # (ActorUnavailableError: presumed dead): each time placed again on a node still alive
    assert result["placed"][0] == first
    assert result["placed"][1] in (second, third) and result["placed"][2] not in (first, result["placed"][1])
    assert result["exits"] == [["error", "ActorDiedError"], ["error", "ActorUnavailableError"]]
    assert result["restarts"] == 2
    assert seen and not _wait_gone(seen)


# --- otree run --------------------------------------------------------------------------------


TREE = """
import trio
import otree

async def agent(*, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep_forever()

tree = otree.supervisor("fleet", children=[otree.ray(otree.task("agent", agent), num_cpus=0)])
"""


@contextmanager
def _otree_run(
    tree: Path,
    state: Path,
    *extra: str,
    until: Callable[[str], bool],
    env: dict[str, str] | None = None,
    seconds: float = DEADLINE,
) -> Iterator[subprocess.Popen[bytes]]:
    """``otree run TREE`` until ``until`` holds of its event log's text (within ``seconds``), then
    the block; stopped by SIGTERM afterwards unless the block ended it (it must then exit 0),
    killed if still running. Its stderr goes to a file beside the state dir (a pipe nobody reads
    would fill and block it)."""
    with open(state.parent / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(
            [*OTREE, "run", os.fspath(tree), "--state-dir", os.fspath(state), *extra],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        log, deadline = state / "events.jsonl", time.monotonic() + seconds
        while not (log.exists() and until(log.read_text())):
            assert process.poll() is None, (state.parent / "stderr.txt").read_text()[-2000:]
            assert time.monotonic() < deadline, f"{tree.name} never got there"
            time.sleep(0.1)
        yield process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=DEADLINE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _cmdline(pid: int) -> bytes:
    """Its command line (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ready(log: str) -> bool:
    return '"child.ready"' in log


def _run_until_ready(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> set[int]:
    """``otree run`` a one-Ray-child tree until the child is ready, then SIGTERM; its processes."""
    (tmp_path / "tree.py").write_text(TREE)
    with _otree_run(tmp_path / "tree.py", tmp_path / "state", *extra, until=_ready, env=env) as process:
        return _descendants(process.pid)


def test_otree_run_starts_an_embedded_ray_and_shuts_it_down_with_the_tree(tmp_path: Path) -> None:
    temp = tempfile.mkdtemp(prefix="otree-ray-run-")
    try:
        seen = _run_until_ready(tmp_path, env={"RAY_TMPDIR": temp})
        assert len(seen) >= 3  # Ray's own processes and the actor ran below `otree run`
        assert not _wait_gone(seen | _with_cmdline(temp))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_a_sigkill_of_otree_run_leaves_nothing_of_its_embedded_ray(tmp_path: Path) -> None:
    # Ray's agents outlived such a SIGKILL for good (they hang telling the dead GCS their raylet
    # died): otree's watcher of the instance kills them
    temp = tempfile.mkdtemp(prefix="otree-ray-kill-")
    (tmp_path / "tree.py").write_text(TREE)
    seen: set[int] = set()
    try:
        env = {"RAY_TMPDIR": temp}
        with _otree_run(tmp_path / "tree.py", tmp_path / "state", until=_ready, env=env) as process:
            seen = _descendants(process.pid)
            agents = {pid for pid in seen if _cmdline(pid).startswith(b"ray::")}
            assert len(agents) >= 3  # DashboardAgent, RuntimeEnvAgent, the actor
            process.kill()
            process.wait()
        assert not _wait_gone(seen | _with_cmdline(temp))
    finally:
        for pid in _wait_gone(seen | _with_cmdline(temp), 0):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_local_cluster_that_fails_to_come_up_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """The second node never comes up (its wait fails, as it would past Ray's timeout): one line,
    exit 1, and what had started of the cluster (the head, the nodes, their agents) is gone."""
    temp = tempfile.mkdtemp(prefix="otree-ray-fail-")
    (tmp_path / "tree.py").write_text(
        "from ray.cluster_utils import Cluster\n"
        "def never(self, timeout=30):\n"
        "    raise TimeoutError('timed out waiting for nodes to join')\n"
        "Cluster.wait_for_nodes = never\n" + TREE
    )
    try:
        result = subprocess.run(
            [*OTREE, "run", os.fspath(tmp_path / "tree.py"), "--state-dir", os.fspath(tmp_path / "state")],
            env={**os.environ, "OTREE_RAY_ADDRESS": "local:2", "RAY_TMPDIR": temp},
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert (result.returncode, result.stderr) == (
            1,
            "otree: StartError: fleet: failed to start: cannot connect to Ray at local:2:"
            " TimeoutError: timed out waiting for nodes to join\n",
        )
        assert not _wait_gone(_with_environ(f"RAY_TMPDIR={temp}"))
    finally:
        for pid in _wait_gone(_with_environ(f"RAY_TMPDIR={temp}"), 0):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_watcher_that_dies_is_replaced_and_a_sigkill_still_leaves_nothing(tmp_path: Path) -> None:
    """The watcher of the embedded instance killed (``kill -9``, the OOM killer): a new one holds
    every process of the instance, so a SIGKILL of otree run afterwards still leaves nothing."""
    temp = tempfile.mkdtemp(prefix="otree-ray-watcher-")
    (tmp_path / "tree.py").write_text(TREE)
    seen: set[int] = set()

    def watchers(below: int) -> set[int]:
        return {pid for pid in _descendants(below) if b"pidfd_send_signal" in _cmdline(pid)}

    try:
        env = {"RAY_TMPDIR": temp}
        with _otree_run(tmp_path / "tree.py", tmp_path / "state", until=_ready, env=env) as process:
            [first] = watchers(process.pid)
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + DEADLINE
            while not (replaced := watchers(process.pid) - {first}):
                assert time.monotonic() < deadline, "no new watcher"
                time.sleep(0.05)
            seen = _descendants(process.pid) - replaced
            process.kill()
            process.wait()
        assert not _wait_gone(seen | _with_environ(f"RAY_TMPDIR={temp}"))
    finally:
        for pid in _wait_gone(seen | _with_environ(f"RAY_TMPDIR={temp}"), 0):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_brutal_stop_on_the_embedded_ray_takes_a_remote_process_and_its_group(tmp_path: Path) -> None:
    """``otree stop`` of a Ray process child whose shutdown is ``brutal_kill``, on the instance
    otree started: ``ray.kill`` of its actor, whose worker would SIGKILL its own children as it
    exited, the spawn helper among them, before the helper killed the agent's group."""
    temp = tempfile.mkdtemp(prefix="otree-ray-brutal-")
    notes = tmp_path / "pids"
    script = tmp_path / "agent.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"with open({os.fspath(notes)!r}, 'w') as notes:\n"
        "    notes.write(f'{os.getppid()} {os.getpid()} {grandchild.pid}\\n')\n"
        "time.sleep(300)\n"
    )
    (tmp_path / "tree.py").write_text(
        "import sys\nimport otree\n"
        f"agent = otree.process('agent', [sys.executable, {os.fspath(script)!r}], shutdown='brutal_kill')\n"
        "tree = otree.supervisor('fleet', children=[otree.ray(agent, num_cpus=0)])\n"
    )
    left: set[int] = set()
    try:
        with _otree_run(tmp_path / "tree.py", tmp_path / "state", until=_ready, env={"RAY_TMPDIR": temp}):
            actor, child, grandchild = map(int, _wait_file(notes, seconds=DEADLINE).split())
            assert _cli(tmp_path, "stop", "fleet/agent").returncode == 0
            left = _wait_gone({actor, child, grandchild})
            assert not left
    finally:
        for pid in left | _wait_gone(_with_environ(f"RAY_TMPDIR={temp}"), 0):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_sigkill_of_otree_run_while_its_cluster_comes_up_leaves_nothing(tmp_path: Path) -> None:
    """Killed while the second node is coming up: the head's and the nodes' processes started so
    far (their agents hang for good without otree's watcher) are gone."""
    temp = tempfile.mkdtemp(prefix="otree-ray-up-")
    marker = tmp_path / "coming-up"
    (tmp_path / "tree.py").write_text(
        "import pathlib, time\n"
        "from ray.cluster_utils import Cluster\n"
        "def slow(self, timeout=30):\n"
        f"    pathlib.Path({os.fspath(marker)!r}).touch()\n"
        "    time.sleep(300)\n"
        "Cluster.wait_for_nodes = slow\n" + TREE
    )
    env = {**os.environ, "OTREE_RAY_ADDRESS": "local:2", "RAY_TMPDIR": temp}
    process = subprocess.Popen(
        [*OTREE, "run", os.fspath(tmp_path / "tree.py"), "--state-dir", os.fspath(tmp_path / "state")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        while (
            len({pid for pid in _with_environ(f"RAY_TMPDIR={temp}") if _cmdline(pid).startswith(b"ray::")})
            < 2
        ):
            assert process.poll() is None and time.monotonic() < deadline  # the head's two agents, started
            time.sleep(0.05)
        process.kill()
        process.wait()
        assert not _wait_gone(_with_environ(f"RAY_TMPDIR={temp}"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in _wait_gone(_with_environ(f"RAY_TMPDIR={temp}"), 0):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


PROCESS_JOB_TREE = """
import subprocess, sys
import trio
import otree

SCRIPT = (
    "import os, subprocess, sys, time\\n"
    "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\\n"
    "with open(sys.argv[1], 'w') as notes:\\n"
    "    notes.write(f'{os.getppid()} {os.getpid()} {grandchild.pid}\\\\n')\\n"
    "time.sleep(300)\\n"
)

async def feeder():
    await otree.current_child().supervisor.child("jobs").submit("work")
    await trio.sleep_forever()

work = otree.process_job([sys.executable, "-c", SCRIPT, NOTES])
jobs = otree.pool("jobs", {"work": work}, executor=otree.RayExecutor(num_cpus=0))
tree = otree.supervisor("fleet", children=[jobs, otree.task("feeder", feeder)])
"""


def test_a_sigkill_of_otree_run_takes_a_running_process_job_and_its_group_with_it(tmp_path: Path) -> None:
    """On its embedded Ray: the job's Ray worker sees its raylet die and exits; Ray's worker would
    SIGKILL its own children as it went, otree's spawn helper among them, before the helper could
    kill the job's group."""
    temp = tempfile.mkdtemp(prefix="otree-ray-job-")
    notes = tmp_path / "pids"
    (tmp_path / "tree.py").write_text(f"NOTES = {os.fspath(notes)!r}\n" + PROCESS_JOB_TREE)
    left: set[int] = set()
    try:
        env = {"RAY_TMPDIR": temp}
        with _otree_run(tmp_path / "tree.py", tmp_path / "state", until=_ready, env=env) as process:
            worker, child, grandchild = map(int, _wait_file(notes, seconds=DEADLINE).split())
            process.kill()
            process.wait()
        left = _wait_gone({worker, child, grandchild})
        assert not left
    finally:
        for pid in left | _wait_gone(_with_environ(f"RAY_TMPDIR={temp}"), 0):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_otree_run_outlives_the_death_of_its_embedded_gcs(tmp_path: Path) -> None:
    """Ray ends a driver that cannot reach its GCS for ``RAY_gcs_rpc_server_reconnect_timeout_s``
    (60 s by default; 2 s here, to be quick): otree is that driver, and it stays up, answers
    ``otree status`` and stops cleanly on SIGTERM, leaving nothing."""
    temp = tempfile.mkdtemp(prefix="otree-ray-gcs-")
    (tmp_path / "tree.py").write_text(TREE)
    env = {"RAY_TMPDIR": temp, "RAY_gcs_rpc_server_reconnect_timeout_s": "2"}
    seen: set[int] = set()
    try:
        with _otree_run(tmp_path / "tree.py", tmp_path / "state", until=_ready, env=env) as process:
            seen = _descendants(process.pid)
            [gcs] = {pid for pid in seen if b"gcs_server" in _cmdline(pid)}
            os.kill(gcs, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=6.0)  # three times Ray's patience
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
            status = _cli(tmp_path, "status", "--json")
            assert status.returncode == 0 and json.loads(status.stdout)["root"]["info"]["state"] == "running"
        assert not _wait_gone(seen | _with_environ(f"RAY_TMPDIR={temp}"))
    finally:
        for pid in _wait_gone(seen | _with_environ(f"RAY_TMPDIR={temp}"), 0):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_otree_run_with_ray_address_joins_a_running_instance(tmp_path: Path, ray_instance: str) -> None:
    seen = _run_until_ready(tmp_path, "--ray", ray_instance)
    assert not _wait_gone(seen)
    assert ray.is_initialized() and ray.get(ray.put(1)) == 1  # the instance it joined still serves


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1:1", "no Ray head answers at 127.0.0.1:1 (Connection refused)"),
        (
            "ray://127.0.0.1:10001",
            "'ray://127.0.0.1:10001': give the head's GCS address HOST:PORT or 'auto' (not a URL)",
        ),
        ("local:0", "'local:0': 'local:N' needs N, a number of nodes from 1 to 16"),
        ("local:many", "'local:many': 'local:N' needs N, a number of nodes from 1 to 16"),
    ],
)
def test_otree_run_with_an_address_it_cannot_use_fails_at_once(
    tmp_path: Path, address: str, why: str
) -> None:
    (tmp_path / "tree.py").write_text(TREE)
    result = subprocess.run(
        [*OTREE, "run", os.fspath(tmp_path / "tree.py"), "--state-dir", os.fspath(tmp_path / "state")],
        env={**os.environ, "OTREE_RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"otree: StartError: fleet: failed to start: cannot connect to Ray at {address}:"
        f" ConnectionError: {why}\n"
    )


def test_ray_fleet_spreads_over_a_local_cluster_of_three_nodes(tmp_path: Path) -> None:
    """``otree run supervisors/ray_fleet.py --ray local:3``: both crews placed, turns run on more
    than one node, a clean stop on Ctrl-C, and nothing of the cluster left running."""
    temp = tempfile.mkdtemp(prefix="otree-ray-fleet-")
    fleet = REPO / "supervisors" / "ray_fleet.py"
    env = {"RAY_TMPDIR": temp, "OTREE_DEMO_SPEED": "10"}

    def spread(log: str) -> bool:
        """Both crews placed (SPREAD is Ray's best effort: they may share a node), turns on two nodes."""
        events = [json.loads(line) for line in log.splitlines()]
        crews = {e["path"] for e in events if e["kind"] == "ray.placed"}
        turns_on = {e["details"]["node"] for e in events if e["kind"] == "app.turn"}
        return len(crews) == 2 and len(turns_on) >= 2

    try:
        state = tmp_path / "state"  # three nodes to start: three times the deadline
        with _otree_run(
            fleet, state, "--ray", "local:3", until=spread, env=env, seconds=3 * DEADLINE
        ) as process:
            seen = _descendants(process.pid)
            assert len(seen) >= 12  # three nodes' raylets and agents, the GCS, the crews' actors
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=DEADLINE) == 0
        assert not _wait_gone(seen | _with_cmdline(temp))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_the_root_killed_takes_its_actors_and_their_processes_with_it(
    tmp_path: Path, ray_instance: str
) -> None:
    notes = tmp_path / "pids"
    argv = _script(
        tmp_path,
        f"""
        import os, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        with open({os.fspath(notes)!r}, "w") as notes:
            notes.write(f"{{os.getppid()}} {{os.getpid()}} {{grandchild.pid}}\\n")
        time.sleep(300)
        """,
    )
    child = f"otree.ray(otree.process('agent', {argv!r}), num_cpus=0)"
    (tmp_path / "tree.py").write_text(f"import otree\ntree = otree.supervisor('fleet', children=[{child}])\n")
    process = subprocess.Popen(
        [
            *OTREE,
            "run",
            os.fspath(tmp_path / "tree.py"),
            "--state-dir",
            os.fspath(tmp_path / "state"),
            "--ray",
            ray_instance,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        actor, child, grandchild = map(int, _wait_file(notes, seconds=DEADLINE).split())
        assert _alive(actor) and _alive(child)
        process.kill()
        process.wait()
        left = _wait_gone({actor, child, grandchild})
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_otree_check_names_the_extra_to_install_when_ray_is_missing(tmp_path: Path) -> None:
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    (tmp_path / "tree.py").write_text(TREE)
    result = subprocess.run(
        [*OTREE, "check", os.fspath(tmp_path / "tree.py")],
        env={**os.environ, "PYTHONPATH": os.fspath(fake.parent)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"otree: {tmp_path / 'tree.py'}:9: SpecError: agent: otree.ray needs Ray"
        " (pip install 'trio-otree[ray]'); got 'ray not installed'\n"
    )


# --- the remote side, visible and reachable (status, handles, the CLI) --------------------------


async def _until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``check`` (the remote status reaches the local side with the events) until it holds."""
    with trio.fail_after(seconds):
        while not check():
            await trio.sleep(0.02)


def _whole(sup: otree.SupervisorHandle) -> Any:
    return status_of(sup, sup._tree.root_info())


def _rows(node: Any) -> dict[str, Any]:
    """Every line of a status snapshot by path (a ``ChildInfo``'s fields, and a pool's spend)."""
    rows = {node.info.path: _Line(node)}
    for child in node.children:
        rows |= _rows(child)
    return rows


async def test_status_shows_the_remote_children_with_their_node_pid_and_full_paths(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    argv = _script(
        tmp_path,
        f"import os, time\nopen({os.fspath(notes)!r}, 'a').write(f'{{os.getpid()}}\\n')\ntime.sleep(300)\n",
    )
    gpu = otree.supervisor(
        "gpu", children=[otree.task("agent-3", ends, "wait"), otree.process("worker", argv)]
    )
    tree = otree.supervisor(
        "fleet",
        children=[
            otree.ray(gpu, num_cpus=0),
            otree.ray(otree.task("solo", ends, "wait"), num_cpus=0),
            otree.ray(otree.process("proc", argv), num_cpus=0),
        ],
    )
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(tree, state_dir=tmp_path / "state") as sup:
            remote_pids = {int(pid) for pid in _wait_file(notes, lines=2).split()} | {
                int(pid) for pid in notes.read_text().split()
            }
            rows = _rows(_whole(sup).root)
            assert rows["fleet/gpu/agent-3"].kind == "task" and rows["fleet/gpu/agent-3"].state == "running"
            worker = rows["fleet/gpu/worker"]
            assert (worker.kind, worker.state, worker.node) == ("process", "running", "127.0.0.1")
            assert worker.pid in remote_pids and _alive(worker.pid)
            by_id = {info.id: info for info in sup.which_children()}
            # a wrapped supervisor or task: the actor's pid and node on its own line
            for wrapper in ("gpu", "solo"):
                assert (by_id[wrapper].kind, by_id[wrapper].node) == ("ray", "127.0.0.1")
                assert _alive(by_id[wrapper].pid) and by_id[wrapper].pid not in remote_pids
            assert worker.pid in _descendants(by_id["gpu"].pid)  # the process runs below the actor
            # a wrapped process: the remote process's own pid
            assert by_id["proc"].pid in remote_pids and by_id["proc"].pid != worker.pid
            # what a handle into the remote sub-tree reads, without a call to Ray
            team = sup.find("gpu")
            assert [info.path for info in team.which_children()] == ["fleet/gpu/worker", "fleet/gpu/agent-3"]
            assert team.count_children() == otree.Counts(specs=2, active=2, supervisors=0, workers=2)
            # and the remote restart shows there once the remote tree has done it
            async with sup.events() as stream:
                os.kill(worker.pid, signal.SIGKILL)
                await _next(stream, lambda e: e.path == "fleet/gpu/worker" and e.kind == "child.ready")
            await _until(lambda: _rows(_whole(sup).root)["fleet/gpu/worker"].restarts == 1)
            restarted = _rows(_whole(sup).root)["fleet/gpu/worker"]
            assert restarted.pid != worker.pid and restarted.exit is not None
            assert restarted.exit.reason == "error"


async def test_a_handle_reaches_into_a_remote_subtree(tmp_path: Path) -> None:
    gpu = otree.supervisor(
        "gpu", children=[otree.task("agent-3", ends, "trap"), otree.task("agent-4", ends, "wait")]
    )
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(
            otree.supervisor("fleet", children=[otree.ray(gpu, num_cpus=0)])
        ) as sup:
            team = sup.find("gpu")
            assert team.path == "fleet/gpu" and team.parent is not None and team.parent.path == "fleet"
            async with sup.events() as stream:
                await team.terminate_child("agent-3")
                stopped = await _next(
                    stream, lambda e: e.path == "fleet/gpu/agent-3" and e.kind == "child.stopped"
                )
            assert stopped.reason == "shutdown"
            await _until(lambda: team.which_children()[1].state == "stopped")
            with pytest.raises(otree.Running, match=r"^fleet/gpu/agent-4: cannot restart a running child$"):
                await team.restart_child("agent-4")
            info = await team.restart_child("agent-3")
            assert (info.path, info.state, info.node) == ("fleet/gpu/agent-3", "running", "127.0.0.1")
            added = await team.start_child(otree.task("agent-5", ends, "wait", restart="temporary"))
            assert added.path == "fleet/gpu/agent-5"
            with pytest.raises(otree.AlreadyPresent) as present:
                await team.start_child(otree.task("agent-5", ends, "wait"))
            assert (str(present.value), present.value.running) == ("fleet/gpu/agent-5: already running", True)
            with pytest.raises(otree.NotFound) as missing:
                await team.terminate_child("agent-9")
            assert (
                str(missing.value)
                == "no child at fleet/gpu/agent-9 (children of fleet/gpu: agent-3, agent-4, agent-5)"
            )
            assert missing.value.existing == ["agent-3", "agent-4", "agent-5"]
            with pytest.raises(TypeError, match=r"^fleet/gpu/agent-3 is a task, not a supervisor or pool$"):
                sup.find("gpu/agent-3")


async def test_a_request_into_a_hung_actor_ends_with_the_heartbeat_and_status_never_waits(
    tmp_path: Path,
) -> None:
    notes = tmp_path / "pids"
    gpu = otree.supervisor(
        "gpu", restart="temporary", children=[otree.task("agent-3", ends, "hang", os.fspath(notes))]
    )
    spec = otree.ray(gpu, num_cpus=0, heartbeat=(0.5, 3))
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(otree.supervisor("fleet", children=[spec])) as sup:
            _wait_file(notes, lines=2)  # its trio loop is blocked from now on
            team = sup.find("gpu")
            started = trio.current_time()
            for _ in range(20):  # status and reads answer from what the actor said last: at once
                assert _rows(_whole(sup).root)["fleet/gpu/agent-3"].state == "running"
                assert [info.id for info in team.which_children()] == ["agent-3"]
            assert trio.current_time() - started < 0.5
            async with sup.events() as stream:
                with pytest.raises(otree.NotRunning, match=r"^fleet/gpu: not running"):
                    await team.terminate_child("agent-3")  # answered by the heartbeat's verdict
                assert trio.current_time() - started < 5
                exited = await _next(stream, lambda e: e.path == "fleet/gpu" and e.kind == "child.exited")
            assert exited.details["detail"].startswith("heartbeat: no answer to 3 pings")
            with pytest.raises(otree.NotFound, match=r"^no child at fleet/gpu "):
                team.which_children()  # the run is gone (temporary: its spec too): nothing stale is shown


async def test_a_remote_pool_takes_submissions_and_counts_a_jobs_spend_once() -> None:
    async def spend(payload: Any) -> Any:
        otree.current_child().report_cost(0.25)
        return payload

    spec = otree.ray(otree.pool("jobs", {"spend": spend}, daily_budget=1.0), num_cpus=0)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(otree.supervisor("fleet", children=[spec])) as sup:
            jobs = sup.find("jobs")
            assert jobs.status().spent_today == 0.0
            finished: list[otree.Event] = []
            async with sup.events() as stream:
                job = await jobs.submit("spend", {"n": 1}, estimated_cost=0.25)
                assert job.kind == "spend" and job.state in ("queued", "running")
                event = await _next(stream, lambda e: e.kind == "job.finished")
                finished.append(event)
                await _until(lambda: jobs.status().spent_today > 0)
                assert jobs.status().spent_today == 0.25  # the remote pool's own budget, once
                with pytest.raises(otree.BudgetExceeded, match=r"^fleet/jobs: "):
                    await jobs.submit("spend", None, estimated_cost=2.0)
                await sup.terminate_child("jobs")
                async for event in stream:
                    finished += [event] if event.kind == "job.finished" else []
                    if event.path == "fleet/jobs" and event.kind == "child.stopped":
                        break
    assert [(e.path, e.details["cost"]) for e in finished] == [("fleet/jobs/1", 0.25)]  # forwarded once
    assert "cost" not in event.details  # the wrapper's own exit: the spend is the remote pool's alone


CONTROLLED = """
import trio
import otree

async def agent(*, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep_forever()

async def spend(payload):
    otree.current_child().report_cost(0.25)
    return payload

async def wait(payload):
    await trio.sleep_forever()

async def fail(payload):
    raise ValueError("no model answers")

worker = otree.process("worker", ["sleep", "300"])
gpu = otree.supervisor("gpu", children=[otree.task("agent-3", agent), otree.task("agent-4", agent), worker])
jobs = otree.pool("jobs", {"spend": spend, "wait": wait, "fail": fail}, daily_budget=1.0)
tree = otree.supervisor("fleet", children=[otree.ray(gpu, num_cpus=0), otree.ray(jobs, num_cpus=0)])
"""


@contextmanager
def _daemon(tmp_path: Path, text: str, ray_address: str) -> Iterator[Path]:
    """``otree run`` of the tree ``text`` on the test's Ray instance until it is up; its event log.
    Stopped by SIGTERM afterwards (and killed if it does not exit 0 then)."""
    (tmp_path / "tree.py").write_text(text)
    state = tmp_path / "state"

    def up(log: str) -> bool:
        return '"fleet","kind":"supervisor.started"' in log

    with _otree_run(tmp_path / "tree.py", state, "--ray", ray_address, until=up):
        yield state / "events.jsonl"


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*OTREE, *args, "--state-dir", os.fspath(tmp_path / "state")]
    return subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE, check=False)


def _cli_status(tmp_path: Path, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """``otree status --json``, each line by path (a pool's with its ``pool`` status), once
    ``check`` holds for them."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = _cli(tmp_path, "status", "--json")
        assert result.returncode == 0, result.stderr
        status = msgspec.json.decode(result.stdout, type=Status)
        if check(rows := _rows(status.root)):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


def test_the_cli_reaches_into_remote_children_of_a_running_tree(tmp_path: Path, ray_instance: str) -> None:
    with _daemon(tmp_path, CONTROLLED, ray_instance) as log:
        rows = _cli_status(tmp_path, lambda rows: "fleet/gpu/agent-3" in rows)
        assert rows["fleet/gpu"].kind == "ray" and rows["fleet/gpu"].node == "127.0.0.1"
        remote = _cli(tmp_path, "signal", "fleet/gpu/worker", "TERM")  # its pid is not one of ours
        assert (remote.returncode, remote.stderr) == (
            4,
            "otree: fleet/gpu/worker runs on the Ray node 127.0.0.1: signal does not reach it\n",
        )
        assert (rows["fleet/gpu/agent-3"].state, rows["fleet/gpu/agent-3"].node) == ("running", "127.0.0.1")
        text = _cli(tmp_path, "status").stdout
        assert f"  gpu        ray        running    pid {rows['fleet/gpu'].pid} on 127.0.0.1 up" in text
        assert "    agent-3  task       running    on 127.0.0.1 up" in text

        assert _cli(tmp_path, "stop", "fleet/gpu/agent-3").returncode == 0
        rows = _cli_status(tmp_path, lambda rows: rows["fleet/gpu/agent-3"].state == "stopped")
        assert rows["fleet/gpu/agent-3"].exit == otree.ExitInfo("shutdown")
        assert _cli(tmp_path, "start", "gpu/agent-3").returncode == 0
        rows = _cli_status(tmp_path, lambda rows: rows["fleet/gpu/agent-3"].state == "running")
        before = rows["fleet/gpu/agent-3"].started_at
        assert _cli(tmp_path, "restart", "fleet/gpu/agent-3").returncode == 0
        _cli_status(tmp_path, lambda rows: rows["fleet/gpu/agent-3"].started_at != before)

        missing = _cli(tmp_path, "stop", "fleet/gpu/agent-9")
        assert (missing.returncode, missing.stderr) == (
            4,
            "otree: no child at fleet/gpu/agent-9 (children of fleet/gpu: agent-3, agent-4, worker)\n",
        )
        deeper = _cli(tmp_path, "stop", "fleet/gpu/agent-3/x")
        assert (deeper.returncode, deeper.stderr) == (
            4,
            "otree: no child at fleet/gpu/agent-3/x"
            " (fleet/gpu/agent-3 is a task, not a supervisor or pool)\n",
        )
    # the log is whole once the tree has stopped: the operator's requests, as the remote tree did them
    by_operator = [
        e["kind"] for e in _events(log) if e["path"] == "fleet/gpu/agent-3" and e["details"].get("by")
    ]
    assert by_operator == [
        *["child.stopped"],  # otree stop
        *["child.woken", "child.started", "child.ready"],  # otree start
        *["child.stopped", "child.started", "child.ready"],  # otree restart
    ]


def test_the_cli_submits_to_a_remote_pool_and_its_spend_counts_once(
    tmp_path: Path, ray_instance: str
) -> None:
    with _daemon(tmp_path, CONTROLLED, ray_instance) as log:
        submitted = _cli(tmp_path, "submit", "fleet/jobs", "spend", '{"n": 1}', "--cost", "0.25")
        assert submitted.returncode == 0, submitted.stderr
        rows = _cli_status(tmp_path, lambda rows: rows["fleet/jobs"].spent_today > 0)
        assert rows["fleet/jobs"].spent_today == 0.25  # the remote pool's budget, once
        not_a_pool = _cli(tmp_path, "submit", "fleet/gpu", "spend")
        assert (not_a_pool.returncode, not_a_pool.stderr) == (
            4,
            "otree: fleet/gpu is a ray: submit needs a pool\n",
        )
    finished = [e for e in _events(log) if e["kind"] == "job.finished"]  # the whole log: the tree stopped
    assert [(e["path"], e["details"]["cost"]) for e in finished] == [("fleet/jobs/1", 0.25)]


def test_the_cli_reads_and_changes_the_records_of_a_remote_pool(tmp_path: Path, ray_instance: str) -> None:
    """``otree jobs``, ``job``, ``cancel``, ``dead-letters`` (``--requeue``) and ``lane`` answer for a
    pool on a Ray node as for a local one; ``signal --job`` says in one line that it does not
    reach it."""

    def ok(*args: str) -> Any:
        done = _cli(tmp_path, *args, "--json")
        assert done.returncode == 0, (args, done.stderr)
        return json.loads(done.stdout)

    with _daemon(tmp_path, CONTROLLED, ray_instance) as log:
        assert ok("submit", "fleet/jobs", "wait", "--lane", "ada")["id"] == "1"
        assert ok("submit", "fleet/jobs", "fail")["id"] == "2"  # queued: the pool runs one job at a time
        jobs = ok("jobs", "fleet/jobs")
        assert [(j["id"], j["state"], j["lane"]) for j in jobs["running"]] == [("1", "running", "ada")]
        assert [j["id"] for j in jobs["queued"]] == ["2"]
        assert ok("job", "fleet/jobs", "1")["state"] == "running"
        assert ok("lane", "fleet/jobs", "ada") == {
            "lane": "ada",
            "queued": 0,
            "running": 1,
            "circuit": None,
            "held": None,
        }
        assert ok("cancel", "fleet/jobs", "1") == {"id": "1", "state": "cancelled"}
        again = _cli(tmp_path, "cancel", "fleet/jobs", "1")
        assert (again.returncode, again.stderr) == (
            4,
            "otree: job 1 of fleet/jobs already finished (cancelled)\n",
        )
        deadline = time.monotonic() + DEADLINE
        while not (letters := ok("dead-letters", "fleet/jobs")):  # job 2 runs, and fails for good
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert [(letter["id"], letter["error"]) for letter in letters] == [
            ("2", "ValueError: no model answers")
        ]
        missing = _cli(tmp_path, "job", "fleet/jobs", "9")
        assert (missing.returncode, missing.stderr) == (
            4,
            "otree: fleet/jobs: no job 9 (jobs: 0 running, 0 queued, 0 retrying, 2 recent finished)\n",
        )
        assert ok("dead-letters", "fleet/jobs", "--requeue", "2")["id"] == "3"
        signal_job = _cli(tmp_path, "signal", "fleet/jobs", "TERM", "--job", "3")
        assert (signal_job.returncode, signal_job.stderr) == (
            4,
            "otree: fleet/jobs runs on a Ray node: signal --job does not reach it\n",
        )
    cancelled = [e for e in _events(log) if e["path"] == "fleet/jobs/1" and e["kind"] == "job.cancelled"]
    assert [e["details"].get("by") for e in cancelled] == ["operator"]


def test_a_waiting_submit_to_a_remote_pool_ends_with_the_jobs_outcome(
    tmp_path: Path, ray_instance: str
) -> None:
    """``otree submit --wait`` to a pool on a Ray node: the result, a dead letter's one line
    (exit 6), a job cancelled while it waits (exit 6), its pool stopped first (exit 7), as for a
    local pool."""
    with _daemon(tmp_path, CONTROLLED, ray_instance):
        done = _cli(tmp_path, "submit", "fleet/jobs", "spend", '{"n": 5}', "--wait", "--json")
        assert (done.returncode, done.stdout, done.stderr) == (0, '{"n":5}\n', "")
        failed = _cli(tmp_path, "submit", "fleet/jobs", "fail", "--wait")
        assert (failed.returncode, failed.stdout, failed.stderr) == (
            6,
            "",
            "otree: fleet/jobs: job 2: dead-lettered after 1 attempt: ValueError: no model answers\n",
        )
        waiter = subprocess.Popen(
            [*OTREE, "submit", "fleet/jobs", "wait", "--wait", "--state-dir", os.fspath(tmp_path / "state")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + DEADLINE
            while _cli(tmp_path, "job", "fleet/jobs", "3", "--json").returncode != 0:  # not queued yet
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert _cli(tmp_path, "cancel", "fleet/jobs", "3").returncode == 0
            out, err = waiter.communicate(timeout=DEADLINE)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.communicate()
        assert (waiter.returncode, out, err) == (6, "", "otree: fleet/jobs: job 3: cancelled\n")
        waiter = subprocess.Popen(
            [*OTREE, "submit", "fleet/jobs", "wait", "--wait", "--state-dir", os.fspath(tmp_path / "state")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while _cli(tmp_path, "job", "fleet/jobs", "4", "--json").returncode != 0:  # not queued yet
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert _cli(tmp_path, "stop", "fleet/jobs").returncode == 0  # the pool stops first
            out, err = waiter.communicate(timeout=DEADLINE)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.communicate()
        assert (waiter.returncode, out) == (7, ""), err
        assert err.startswith("otree: fleet/jobs") and err.count("\n") == 1, err


class _Line:
    """A status line by attribute: the child's ``ChildInfo`` fields, and a pool's spend."""

    def __init__(self, node: StatusNode) -> None:
        self.__dict__.update(msgspec.structs.asdict(node.info))
        self.spent_today = node.pool.spent_today if node.pool is not None else None


def _events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# --- spare=True: a warm replacement actor ---------------------------------------------------------


def _hosts() -> set[int]:
    """This session's Ray worker processes that hold an otree actor (Ray titles them after the
    class); not another Ray's on the machine (the demos' embedded ones run beside these tests)."""
    return {pid for pid in _with_cmdline("ray::Host") & _descendants(os.getpid()) if _alive(pid)}


async def test_a_spare_takes_the_next_run_and_goes_with_the_tree(tmp_path: Path) -> None:
    notes = tmp_path / "pids"
    spec = _remote("wait", os.fspath(notes), spare=True)
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(spec), state_dir=tmp_path / "state") as sup:
            first = int(_wait_file(notes))
            await _until(lambda: len(_hosts()) >= 2)  # the run's actor and its spare, up
            (spare,) = _hosts() - {first}
            async with sup.events() as stream:
                os.kill(first, signal.SIGKILL)
                placed = await _next(stream, _exit_of("ray.placed"))
                await _next(stream, _exit_of("child.ready"))
            assert placed.details["pid"] == spare  # the run went to the actor made beforehand
            await _until(lambda: len(_hosts() - {spare}) >= 1)  # and a new spare is made for the next
            (second_spare,) = _hosts() - {spare}
            await sup.terminate_child("agent")  # a stop: no next run, so no spare either
            assert not _wait_gone({spare, second_spare})
            await sup.restart_child("agent")
            await _until(lambda: len(_hosts()) >= 2)
            left = _hosts()
    assert not _wait_gone(left)  # the tree's end takes the run's actor and the spare


async def test_a_spare_is_killed_when_no_restart_claims_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from otree import _ray as ray_children

    monkeypatch.setattr(ray_children, "SPARE_LINGER", 0.5)
    notes = tmp_path / "pids"
    spec = _remote("wait", os.fspath(notes), spare=True, restart="temporary")
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(_tree(spec), state_dir=tmp_path / "state") as sup:
            first = int(_wait_file(notes))
            await _until(lambda: len(_hosts()) >= 2)
            (spare,) = _hosts() - {first}
            async with sup.events() as stream:
                os.kill(first, signal.SIGKILL)  # temporary: not restarted
                await _next(stream, _exit_of())
            assert sup.which_children() == []
            await _until(lambda: not _alive(spare))  # gone once it waited out SPARE_LINGER


async def test_a_quiet_actor_answers_pings_and_requests_while_its_events_are_polled(tmp_path: Path) -> None:
    # pings 0.2 s apart, two misses: a ping queued behind the 1 s wait for remote events would miss
    gpu = otree.supervisor("gpu", children=[otree.task("agent-3", ends, "wait")])
    spec = otree.ray(gpu, num_cpus=0, heartbeat=(0.2, 2))
    with trio.fail_after(DEADLINE):
        async with otree.open_supervisor(otree.supervisor("fleet", children=[spec])) as sup:
            async with sup.events() as stream:
                with trio.move_on_after(3.0):
                    event = await _next(stream, lambda e: e.path == "fleet/gpu" and e.kind == "child.exited")
                    raise AssertionError(f"a quiet actor was given up: {event}")
                await sup.find("gpu").terminate_child("agent-3")  # through the same group as the pings
            (info,) = sup.which_children()
            assert (info.state, info.restarts) == ("running", 0)


def test_spare_must_be_a_bool() -> None:
    with pytest.raises(otree.SpecError) as caught:
        otree.ray(otree.task("agent", ends, "wait"), spare=1)  # type: ignore[arg-type]
    assert str(caught.value) == "agent: spare must be True or False; got 1"
    assert otree.ray(otree.task("agent", ends, "wait"), spare=True).spare is True


async def test_a_remote_pool_is_in_memory_when_the_local_tree_keeps_no_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def echo(payload: Any) -> Any:
        return payload

    monkeypatch.delenv("OTREE_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", os.fspath(tmp_path))  # the default state dir, for this test
    spec = otree.ray(otree.pool("jobs", {"echo": echo}), num_cpus=0)
    with trio.fail_after(DEADLINE):
        async with (
            otree.open_supervisor(otree.supervisor("fleet", children=[spec])) as sup,
            sup.events() as stream,
        ):
            await sup.find("jobs").submit("echo", 1)
            await _next(stream, lambda e: e.kind == "job.finished")
    assert sup._tree.state_dir == tmp_path / "otree" and not sup._tree.durable
    assert not (tmp_path / "otree" / "pools").exists()  # as a local pool would be: nothing on disk
