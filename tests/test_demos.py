"""The trees in ``supervisors/`` run until stopped: a minute of accelerated failures, every operator
command on every path, and a clean Ctrl-C. Real ``otree run`` subprocesses, so these are slow."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from .otree_subprocess import REPO, OtreeProcess, event_of, is_text_event, otree_process, run_otree

SUPERVISORS = REPO / "supervisors"
DEMOS = {  # file -> root id
    "fleet": "fleet",
    "cli_agents": "agents",
    "agent_fleet": "fleet",
    "job_daemon": "daemon",
    "turn_runner": "runner",
    "outbox": "outbox",
    "cadence": "cadence",
    "peers": "lifecycle",
    "ray_fleet": "ray_fleet",  # on the embedded Ray: one node (tests/test_ray.py runs it on three)
}
RUN_FOR = 60.0  # seconds each demo runs in the long test
STOP_DEADLINE = 20.0  # seconds a demo may take to stop after SIGINT
# One line of `otree run`'s text events: time, path, dotted kind.
EVENT_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \S+ [a-z_]+(\.[a-z_]+)+( |$)")
# otree run summarises repeated refusals (docs/cli.md): "... 8 more job.rejected budget in the last 10s"
SUMMARY_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \S+ \d+ more [a-z_]+(\.[a-z_]+)+ .*in the last \d+s$")


def test_every_tree_in_supervisors_is_a_demo_here() -> None:
    """A new tree file gets these tests too (``cli_agent.py`` is the process the cli_agents demo runs)."""
    trees = {path.stem for path in SUPERVISORS.glob("*.py") if re.search(r"^tree = ", path.read_text(), re.M)}
    assert trees == set(DEMOS)


def start_demo(name: str, cwd: Path) -> OtreeProcess:
    """``otree run supervisors/NAME.py`` in ``cwd`` (its state dir), once its root has started."""
    cwd.mkdir(exist_ok=True)
    demo = OtreeProcess(["run", str(SUPERVISORS / f"{name}.py")], cwd)
    demo.wait_for(is_text_event(DEMOS[name], "supervisor.started"))
    return demo


def status(cwd: Path) -> dict[str, Any]:
    """``otree status --json`` of the tree running in ``cwd`` (it must answer)."""
    done = run_otree(["status", "--json"], cwd)
    assert done.returncode == 0, done.stderr
    root: dict[str, Any] = json.loads(done.stdout)["root"]
    return root


def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node["children"]:
        yield from nodes(child)


def spec_paths(name: str, cwd: Path) -> list[str]:
    """Every child path of the demo's tree below the root, in start order (from ``otree check``)."""
    done = run_otree(["check", str(SUPERVISORS / f"{name}.py")], cwd)
    assert done.returncode == 0, done.stderr
    stack: list[str] = []
    paths = []
    for line in done.stdout.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        del stack[depth:]
        stack.append(line.split()[0])
        paths.append("/".join(stack))
    assert paths[0] == DEMOS[name]
    return paths[1:]


def stop_cleanly(demo: OtreeProcess) -> list[str]:
    """Ctrl-C: the exit code must be 0; returns every stderr line."""
    demo.proc.send_signal(signal.SIGINT)
    code = demo.finish(timeout=STOP_DEADLINE)
    assert code == 0, demo.lines[-20:]
    return demo.lines


def looks_wrong(line: str, root: str) -> bool:
    """Whether a stderr line says something went wrong: anything but an event line (a traceback, an
    ``otree:`` error), a stop that errored or ran out of grace, an internal error, the root giving up."""
    if SUMMARY_LINE.match(line):
        return False
    event = event_of(line) if EVENT_LINE.match(line) else None
    if event is None:
        return True
    path, kind, _ = event
    return (
        kind in ("child.shutdown_error", "control.error")
        or (path == root and kind == "supervisor.intensity_exceeded")
        or (kind == "child.stopped" and (" killed" in line or "error while stopping" in line))
    )


def events(lines: list[str]) -> Counter[tuple[str, str]]:
    """``(path, kind)`` of every event line, counted."""
    found = (event_of(line) for line in lines if EVENT_LINE.match(line))
    return Counter(event[:2] for event in found if event is not None)


def kinds_below(counts: Counter[tuple[str, str]], prefix: str, kind: str) -> int:
    return sum(n for (path, k), n in counts.items() if k == kind and path.startswith(prefix))


def check_what_it_showed(name: str, counts: Counter[tuple[str, str]], root: dict[str, Any]) -> None:
    """What each demo is there to show happened within the minute, and the root never restarted
    anything it was not meant to."""
    if name == "fleet":
        assert kinds_below(counts, "fleet/agents/", "child.restarting") > 0  # agents restarted
        assert counts["fleet/agents", "supervisor.intensity_exceeded"] > 0  # the group gave up...
        assert counts["fleet/agents", "child.restarting"] > 0  # ...and the root restarted it
    elif name == "cli_agents":
        assert kinds_below(counts, "agents/", "child.restarting") > 0
        assert kinds_below(counts, "agents/", "child.exited") > 0
    elif name == "agent_fleet":
        assert kinds_below(counts, "fleet/turns/", "job.finished") > 10
        assert kinds_below(counts, "fleet/turns/", "job.retried") > 0
        # the feeder backs off while refused: the old one asked every 0.3 s, 200 times a minute
        assert counts["fleet/turns", "job.rejected"] <= 60, counts["fleet/turns", "job.rejected"]
        # the gate at work: a demo day lasts a minute here and the spend of a fresh one reaches 90%
        # in about 40 s, so a minute holds a budget.warning or (when it started late in a demo day)
        # the day's end, a budget.reset
        assert counts["fleet/turns", "budget.warning"] + counts["fleet/turns", "budget.reset"] > 0
        assert [child["info"]["restarts"] for child in root["children"]] == [0, 0]
    elif name == "ray_fleet":
        assert kinds_below(counts, "ray_fleet/crew-", "child.restarting") > 0  # agents, on their node
        assert kinds_below(counts, "ray_fleet/turns/", "job.finished") > 10  # turns, as Ray tasks
        assert counts["ray_fleet/crew-1", "ray.placed"] + counts["ray_fleet/crew-2", "ray.placed"] >= 2
        assert [child["info"]["restarts"] for child in root["children"]] == [0, 0, 0, 0]
    else:  # a ready tree (tests/test_recipes.py drives each behaviour): left alone, it restarts nothing
        assert kinds_below(counts, "", "child.restarting") == 0


@pytest.mark.slow
def test_demos_run_a_minute_of_accelerated_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All demos at once (two cores keep up), ten times their normal failure rate, for a minute:
    each still runs, answers status, showed what it is for, and stops cleanly on Ctrl-C."""
    monkeypatch.setenv("OTREE_DEMO_SPEED", "10")
    with ExitStack() as cleanup:
        demos = {}
        for name in DEMOS:
            demos[name] = start_demo(name, tmp_path / name)
            cleanup.callback(demos[name].stop)
        deadline = time.monotonic() + RUN_FOR
        while (left := deadline - time.monotonic()) > 0:
            for name, demo in demos.items():  # fail as soon as one ends by itself
                try:
                    demo.proc.wait(timeout=min(1.0, left) / len(demos))
                except subprocess.TimeoutExpired:
                    continue
                demo.finish()
                pytest.fail(f"{name} exited {demo.proc.returncode} by itself: {demo.lines[-10:]}")
        roots = {name: status(tmp_path / name) for name in demos}
        for name, demo in demos.items():
            assert roots[name]["info"]["state"] == "running", roots[name]["info"]
            lines = stop_cleanly(demo)
            assert [line for line in lines if looks_wrong(line, DEMOS[name])] == [], name
            check_what_it_showed(name, events(lines), roots[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEMOS))
def test_demo_survives_every_operator_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """``otree stop``, ``start`` and ``restart`` on every path (at the demo's normal pace): each is
    done or refused in one line, the root stays up through a stop held for two seconds (longer than
    any demo child waits between two uses of a sibling), and the tree is whole and stops cleanly."""
    monkeypatch.delenv("OTREE_DEMO_SPEED", raising=False)
    root = DEMOS[name]
    with otree_process(["run", str(SUPERVISORS / f"{name}.py")], tmp_path) as demo:
        demo.wait_for(is_text_event(root, "supervisor.started"))
        at_start = {node["info"]["path"]: node["info"]["state"] for node in nodes(status(tmp_path))}
        for path in spec_paths(name, tmp_path):
            for command in ("stop", "start", "restart"):
                done = run_otree([command, path], tmp_path)
                # refused (4) only when the path's parent is itself restarting, or for a start of a
                # child its restarted parent started already
                assert done.returncode in (0, 4), (command, path, done.stdout, done.stderr)
                if done.returncode == 4:
                    assert re.fullmatch(r"otree: [^\n]+\n", done.stderr), done.stderr
                hold_until = time.monotonic() + (2.0 if command == "stop" else 0.0)
                while True:  # the root answers throughout
                    assert demo.proc.poll() is None, demo.lines[-10:]
                    assert status(tmp_path)["info"]["state"] == "running"
                    if time.monotonic() >= hold_until:
                        break
        states = {node["info"]["path"]: node["info"]["state"] for node in nodes(status(tmp_path))}
        running = {path for path, state in at_start.items() if state == "running"}  # a restarting one
        assert {path for path in running if states.get(path) not in ("running", "restarting")} == set(), (
            states
        )
        lines = stop_cleanly(demo)
    assert [line for line in lines if looks_wrong(line, root)] == []
