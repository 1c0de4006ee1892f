"""The control plane against a real ``otree run``: every CLI command, exit codes, reload, signals, systemd."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from otree._cli import main
from otree._control import MAX_CONNECTIONS, MAX_FOLLOWERS
from otree._paths import control_socket
from otree._protocol import VERSION, FrameReader, Reply, Request, decode_reply, encode

from .otree_subprocess import (
    DEADLINE,
    OtreeProcess,
    follow_events,
    is_text_event,
    otree_process,
    run_otree,
    subprocess_env,
    write_tree,
)

TREE = """\
import trio

import otree


async def steady(*, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep_forever()


async def echo(payload):
    return payload


async def fail(payload):
    raise RuntimeError("nope")


async def hold(payload):
    await trio.sleep_forever()


async def nap(seconds):
    await trio.sleep(seconds)
    return {"slept": seconds}


tree = otree.supervisor(
    "fleet",
    children=[
        otree.task("alice", steady),
        otree.supervisor("db", children=[otree.task("cache", steady)]),
        otree.pool(
            "jobs",
            handlers={"echo": echo, "fail": fail, "hold": hold, "nap": nap},
            max_concurrency=2,
            max_queue=10,
            daily_budget=1.0,
        ),
        otree.task("temp", steady, restart="temporary"),
    ],
)
"""


class Tree:
    """A running ``otree run`` of a tree file, and the ``otree`` command pointed at it."""

    def __init__(self, directory: Path, process: OtreeProcess, file: Path) -> None:
        self.directory = directory
        self.process = process
        self.file = file
        self.state = directory / "state"

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        """``otree ARGS`` in-process: (exit code, stdout, stderr)."""
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    def status(self, capsys: pytest.CaptureFixture[str], path: str = "") -> dict[str, Any]:
        code, out, err = self.cli(capsys, "status", "--json", *([path] if path else []))
        assert code == 0, err
        root: dict[str, Any] = json.loads(out)["root"]
        return root

    def wait_event(self, path: str, kind: str) -> str:
        return self.process.wait_for(is_text_event(path, kind))


def states(node: dict[str, Any]) -> dict[str, str]:
    """``{child id: state}`` of a status node's children."""
    return {child["info"]["id"]: child["info"]["state"] for child in node["children"]}


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tree]:
    monkeypatch.setenv("OTREE_STATE_DIR", str(tmp_path / "state"))
    file = write_tree(tmp_path, TREE)
    with otree_process(["run", str(file)], tmp_path) as process:
        running = Tree(tmp_path, process, file)
        running.wait_event("fleet", "control.listening")
        yield running
        if process.proc.poll() is None:
            process.proc.send_signal(signal.SIGTERM)
            assert process.finish() == 0


# --- status ---------------------------------------------------------------------------------


def test_status_shows_the_tree(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tree.cli(capsys, "status")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["fleet", "alice", "db", "cache", "jobs", "temp"]
    assert lines[0].split()[1:3] == ["supervisor", "running"]
    jobs_line = next(line for line in lines if line.split()[0] == "jobs")
    for words in ("queued 0", "running 0/2", "budget left $1.00 of $1.00"):
        assert words in jobs_line
    root = tree.status(capsys)
    assert root["info"]["pid"] == tree.process.proc.pid
    assert root["restarts_in_window"] == 0
    assert states(root) == {"alice": "running", "db": "running", "jobs": "running", "temp": "running"}
    db = next(child for child in root["children"] if child["info"]["id"] == "db")
    assert states(db) == {"cache": "running"}


def test_status_of_a_path(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    db = tree.status(capsys, "fleet/db")
    assert db["info"]["path"] == "fleet/db" and states(db) == {"cache": "running"}
    assert tree.status(capsys, "db/cache")["info"]["path"] == "fleet/db/cache"  # the root id may be left out
    jobs = tree.status(capsys, "jobs")
    assert jobs["pool"]["max_concurrency"] == 2


def test_unknown_path_is_refused_with_the_children_listed(
    tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = tree.cli(capsys, "stop", "fleet/bob")
    assert code == 4 and out == ""
    assert err == "otree: no child at fleet/bob (children of fleet: alice, db, jobs, temp)\n"
    code, _, err = tree.cli(capsys, "status", "db/nope")
    assert code == 4 and "no child at fleet/db/nope (children of fleet/db: cache)" in err
    code, _, err = tree.cli(capsys, "stop", "alice/deeper")
    assert code == 4
    assert err == "otree: no child at fleet/alice/deeper (fleet/alice is a task, not a supervisor or pool)\n"


def test_a_missing_path_is_named_whole(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("stop", "status", "restart"):
        code, _, err = tree.cli(capsys, command, "db/no/such")
        assert code == 4
        assert err == (
            "otree: no child at fleet/db/no/such (fleet/db has no child no; children of fleet/db: cache)\n"
        )


# --- start, stop, restart, delete -----------------------------------------------------------


def test_stop_start_restart_delete(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    assert tree.cli(capsys, "stop", "alice") == (0, "fleet/alice: stopped\n", "")
    assert states(tree.status(capsys))["alice"] == "stopped"
    assert tree.cli(capsys, "stop", "alice")[0] == 0  # stopping a stopped child is a no-op
    assert tree.cli(capsys, "start", "fleet/alice") == (0, "fleet/alice: started (running)\n", "")
    # wake or spawn: starting a running child leaves it alone, and is no error
    assert tree.cli(capsys, "start", "alice") == (0, "fleet/alice: already running\n", "")
    before = tree.status(capsys, "alice")["info"]["started_at"]
    assert tree.cli(capsys, "restart", "alice") == (0, "fleet/alice: restarted (running)\n", "")
    after = tree.status(capsys, "alice")["info"]
    assert after["started_at"] > before and after["restarts"] == 0  # a manual restart is not counted
    code, _, err = tree.cli(capsys, "delete", "alice")
    assert (code, err) == (4, "otree: fleet/alice: cannot delete a running child\n")
    tree.cli(capsys, "stop", "alice")
    assert tree.cli(capsys, "delete", "alice") == (0, "fleet/alice: deleted\n", "")
    assert "alice" not in states(tree.status(capsys))


def test_restart_of_a_temporary_child_keeps_it(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    assert tree.cli(capsys, "restart", "temp")[0] == 0
    assert states(tree.status(capsys))["temp"] == "running"


def test_root_cannot_be_stopped_by_path(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = tree.cli(capsys, "stop", "fleet")
    assert code == 4 and "fleet is the root: use otree stop-tree" in err


def test_json_output_of_a_command(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tree.cli(capsys, "restart", "--json", "db/cache")
    assert code == 0
    info = json.loads(out)
    assert info["path"] == "fleet/db/cache" and info["state"] == "running"


# --- the pool ---------------------------------------------------------------------------------


def test_submit_and_jobs(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(3):
        code, out, _ = tree.cli(
            capsys, "submit", "jobs", "hold", '{"n": 1}', "--priority", "2", "--cost", "0.1"
        )
        assert code == 0 and out.startswith("jobs: job ")
    code, out, _ = tree.cli(capsys, "jobs", "--json", "fleet/jobs")
    jobs = json.loads(out)
    assert len(jobs["running"]) == 2 and len(jobs["queued"]) == 1
    assert jobs["queued"][0]["priority"] == 2 and jobs["queued"][0]["estimated_cost"] == 0.1
    code, out, _ = tree.cli(capsys, "jobs", "jobs")
    assert out.splitlines()[0] == "running: 2" and "queued: 1" in out.splitlines()
    jobs_status = tree.status(capsys, "jobs")["pool"]
    assert (jobs_status["running"], jobs_status["queued"]) == (2, 1)
    assert jobs_status["reserved"] == pytest.approx(0.2)


def test_submit_bad_input(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = tree.cli(capsys, "submit", "jobs", "echo", "{not json")
    assert code == 2 and err.startswith("otree: PAYLOAD_JSON is not JSON")
    code, _, err = tree.cli(capsys, "submit", "jobs", "nope")
    assert code == 4 and err == "otree: fleet/jobs: unknown job kind 'nope' (kinds: echo, fail, hold, nap)\n"
    code, _, err = tree.cli(capsys, "submit", "db", "echo")
    assert code == 4 and err == "otree: fleet/db is a supervisor: submit needs a pool\n"
    code, _, err = tree.cli(capsys, "submit", "alice", "echo")
    assert code == 4 and err == "otree: fleet/alice is a task: submit needs a pool\n"
    code, _, err = tree.cli(capsys, "jobs", "fleet")
    assert code == 4 and err == "otree: fleet is a supervisor: jobs needs a pool\n"
    code, _, err = tree.cli(capsys, "submit", "jobs", "echo", "--cost", "-1")
    assert code == 4 and "estimated_cost must be a number of USD >= 0" in err


def test_dead_letters_and_requeue(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    assert tree.cli(capsys, "dead-letters", "jobs") == (0, "no dead letters\n", "")
    code, out, _ = tree.cli(capsys, "submit", "--json", "jobs", "fail", "[1, 2]")
    job_id = json.loads(out)["id"]
    tree.wait_event(f"fleet/jobs/{job_id}", "job.dead_lettered")
    code, out, _ = tree.cli(capsys, "dead-letters", "--json", "jobs")
    letters = json.loads(out)
    assert [(letter["id"], letter["payload"]) for letter in letters] == [(job_id, [1, 2])]
    assert "RuntimeError: nope" in letters[0]["error"]
    code, out, _ = tree.cli(capsys, "dead-letters", "jobs", "--requeue", job_id)
    assert code == 0 and out.startswith(f"jobs: dead letter {job_id} queued again as job ")
    new_id = out.split()[-1]
    tree.wait_event(f"fleet/jobs/{new_id}", "job.dead_lettered")
    code, _, err = tree.cli(capsys, "dead-letters", "jobs", "--requeue", "999")
    assert (code, err) == (4, f"otree: fleet/jobs: no dead letter 999 (dead letters: {new_id})\n")


# --- events -------------------------------------------------------------------------------------


def test_events_from_the_log(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    tree.cli(capsys, "stop", "db/cache")
    tree.cli(capsys, "stop-tree")
    assert tree.process.finish() == 0
    # no tree runs now: the log is still there to read
    code, out, _ = tree.cli(capsys, "events")
    assert code == 0
    kinds = [(line.split()[2], line.split()[3]) for line in out.splitlines()]
    assert ("fleet", "supervisor.started") in kinds and ("fleet", "supervisor.stopped") in kinds
    code, out, _ = tree.cli(capsys, "events", "--json", "--path", "db", "--kind", "child.*")
    events = [json.loads(line) for line in out.splitlines()]
    assert all(
        e["path"].startswith(("fleet/db/", "fleet/db")) and e["kind"].startswith("child.") for e in events
    )
    assert not any(e["path"].startswith(("fleet/alice", "fleet/jobs")) for e in events)
    assert ("fleet/db/cache", "child.stopped") in [(e["path"], e["kind"]) for e in events]
    # the operator's stop, and everything stop-tree stopped, say who did it
    code, out, _ = tree.cli(capsys, "events", "--json", "--kind", "*.stopped")
    stopped = [json.loads(line) for line in out.splitlines()]
    assert {(e["path"], e["kind"], e["details"].get("by")) for e in stopped} == {
        ("fleet/db/cache", "child.stopped", "operator"),
        ("fleet/temp", "child.stopped", "operator"),
        ("fleet/jobs", "child.stopped", "operator"),
        ("fleet/db", "supervisor.stopped", "operator"),
        ("fleet/db", "child.stopped", "operator"),
        ("fleet/alice", "child.stopped", "operator"),
        ("fleet", "supervisor.stopped", "operator"),
    }
    code, out, _ = tree.cli(capsys, "events", "--since", "1d")
    assert "supervisor.started" in out
    code, out, _ = tree.cli(capsys, "events", "--since", str(time.time() + 3600))
    assert (code, out) == (0, "")
    code, _, err = tree.cli(capsys, "events", "--since", "yesterday")
    assert code == 2 and "--since 'yesterday': not a time" in err


def test_events_follow_has_no_gap_and_no_duplicate(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    with follow_events(tree.directory) as follower:
        assert follower.stdout is not None
        history = []
        for line in follower.stdout:  # the history ends with control.listening; then it is live
            history.append(json.loads(line))
            if history[-1]["kind"] == "control.listening":
                break
        tree.cli(capsys, "stop", "alice")
        live = []
        for line in follower.stdout:
            live.append(json.loads(line))
            if live[-1]["kind"] == "child.stopped":
                break
        assert live[-1]["path"] == "fleet/alice"
        seen = [(e["time"], e["path"], e["kind"]) for e in history + live]
        assert len(seen) == len(set(seen))
        assert [e["kind"] for e in history][:1] == ["child.started"]


# --- log level, stop-tree, lock, no tree --------------------------------------------------------


def test_log_level(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    assert tree.cli(capsys, "log-level") == (0, "log level INFO\n", "")
    assert tree.cli(capsys, "log-level", "warning") == (0, "log level WARNING\n", "")
    assert tree.cli(capsys, "log-level") == (0, "log level WARNING\n", "")
    tree.cli(capsys, "stop", "alice")  # an INFO event: not printed any more
    tree.cli(capsys, "stop", "db/cache")
    code, _, err = tree.cli(capsys, "log-level", "loud")
    assert code == 4 and "unknown log level 'loud'" in err
    tree.cli(capsys, "log-level", "info")
    tree.cli(capsys, "stop", "temp")
    tree.wait_event("fleet/temp", "child.stopped")
    assert not any(is_text_event("fleet/alice", "child.stopped")(line) for line in tree.process.lines)


def test_stop_tree_exits_0_and_removes_the_socket(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    sock = control_socket(tree.state)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tree.state / "events.jsonl").stat().st_mode) == 0o600
    assert stat.S_IMODE((tree.state / "otree.lock").stat().st_mode) == 0o600
    assert tree.cli(capsys, "stop-tree")[0] == 0
    assert tree.process.finish() == 0
    assert not sock.exists()
    code, _, err = tree.cli(capsys, "status")
    assert code == 3
    assert err == f"otree: no otree running for state dir {tree.state} (start one with: otree run FILE)\n"


def test_second_run_on_the_same_state_dir_is_refused(tree: Tree) -> None:
    result = run_otree(["run", str(tree.file)], tree.directory)
    assert result.returncode == 4
    assert result.stderr == (
        f"otree: a tree already runs on state dir {tree.state} (pid {tree.process.proc.pid})\n"
    )


def test_no_tree_exit_3_as_a_subprocess(tmp_path: Path) -> None:
    result = run_otree(["status"], tmp_path)
    assert result.returncode == 3
    assert result.stderr == (
        f"otree: no otree running for state dir {tmp_path / 'state'} (start one with: otree run FILE)\n"
    )


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_connect(tree: Tree) -> None:
    sock_path = control_socket(tree.state)
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and tries the socket
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(str(sock_path))
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- reload -------------------------------------------------------------------------------------

RELOADED = (
    TREE.replace('otree.task("temp", steady, restart="temporary"),', 'otree.task("bob", steady),')
    .replace("max_concurrency=2", "max_concurrency=3")
    .replace(
        'otree.supervisor("db", children=[otree.task("cache", steady)]),',
        'otree.supervisor("db", children=[otree.task("cache", steady, shutdown=2.0)]),',
    )
)


def test_reload_applies_changes_in_place(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    alice_started = tree.status(capsys, "alice")["info"]["started_at"]
    tree.file.write_text(RELOADED)
    code, out, err = tree.cli(capsys, "reload", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary == {
        "changed": ["fleet/db/cache", "fleet/jobs"],
        "removed": ["fleet/temp"],
        "added": ["fleet/bob"],
        "failed": [],
    }
    root = tree.status(capsys)
    assert list(states(root)) == ["alice", "db", "jobs", "bob"]
    assert set(states(root).values()) == {"running"}
    assert tree.status(capsys, "alice")["info"]["started_at"] == alice_started  # unchanged: untouched
    assert tree.status(capsys, "jobs")["pool"]["max_concurrency"] == 3
    assert tree.cli(capsys, "reload") == (0, "reloaded: nothing changed\n", "")


def test_reload_of_an_edited_function_body_restarts_its_children(
    tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    tree.file.write_text(
        TREE.replace("task_status.started()\n", "task_status.started()\n    await trio.sleep(0)\n")
    )
    code, out, _ = tree.cli(capsys, "reload", "--json")
    assert code == 0
    assert sorted(json.loads(out)["changed"]) == ["fleet/alice", "fleet/db/cache", "fleet/temp"]


def test_broken_tree_file_leaves_the_tree_untouched(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree.status(capsys)
    tree.file.write_text(TREE + "\ndef broken(:\n")
    code, _, err = tree.cli(capsys, "reload")
    assert code == 4
    assert err.startswith(f"otree: reload refused, the running tree is untouched: {tree.file}:")
    assert "SyntaxError" in err
    after = tree.status(capsys)
    assert states(after) == states(before)
    tree.file.write_text(TREE.replace('"fleet"', '"other"'))
    code, _, err = tree.cli(capsys, "reload")
    assert code == 4 and "the root's id changed (fleet -> other)" in err


def test_sighup_reloads(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    tree.file.write_text(RELOADED)
    tree.process.proc.send_signal(signal.SIGHUP)
    tree.wait_event("fleet", "supervisor.reloaded")
    assert "bob" in states(tree.status(capsys))
    tree.file.write_text("this is not python(")
    tree.process.proc.send_signal(signal.SIGHUP)
    line = tree.wait_event("fleet", "supervisor.reload_failed")
    assert "SyntaxError" in line


# --- signals and systemd --------------------------------------------------------------------------

STUBBORN = """\
import sys
import otree

DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

tree = otree.supervisor(
    "stubborn",
    children=[
        otree.process(
            "deaf",
            [sys.executable, "-c", DEAF],
            shutdown=300.0,
        ),
    ],
)
"""


def test_second_sigint_kills_at_once_and_exits_130(tmp_path: Path) -> None:
    file = write_tree(tmp_path, STUBBORN)
    with otree_process(["run", str(file)], tmp_path) as process:
        line = process.wait_for(is_text_event("stubborn", "control.listening"))
        pid = json.loads(run_otree(["status", "--json", "deaf"], tmp_path).stdout)["root"]["info"]["pid"]
        assert line
        process.proc.send_signal(signal.SIGINT)
        process.wait_for(lambda text: "tree.signal SIGINT" in text and "action=stop" in text)
        process.proc.send_signal(signal.SIGINT)
        assert process.finish() == 130
        assert any("action=kill" in text for text in process.lines)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_systemd_ready_watchdog_stopping(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(DEADLINE)
    env = {"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "100000"}
    file = write_tree(tmp_path, TREE)
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        process = OtreeProcess(["run", str(file)], tmp_path)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        messages: list[str] = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(listener.recv(4096).decode())
        ready = next(m for m in messages if m.startswith("READY=1"))
        assert "STATUS=fleet: 4 of 4 children running" in ready.split("\n")
        pings = 0
        while pings < 2:
            pings += listener.recv(4096).decode() == "WATCHDOG=1"
        process.proc.send_signal(signal.SIGTERM)
        while not messages[-1].startswith("STOPPING=1"):
            messages.append(listener.recv(4096).decode())
        assert process.finish() == 0
    finally:
        process.stop()
        listener.close()


def test_events_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    from otree._eventlog import EventLog
    from otree._info import Event

    state = tmp_path / "state"
    state.mkdir()
    log = EventLog(state / "events.jsonl")
    for index in range(50_000):  # far more than a pipe holds
        log.append(Event(float(index), "fleet/a", "child.started"))
    log.close()
    reader = subprocess.Popen(
        [sys.executable, "-m", "otree", "events"],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert reader.stdout is not None and reader.stderr is not None
    assert b"fleet/a child.started" in reader.stdout.readline()
    reader.stdout.close()  # as `| head -1` does
    assert reader.wait(timeout=DEADLINE) == 0
    assert reader.stderr.read() == b""
    reader.stderr.close()


def test_a_runtime_dir_others_can_enter_is_refused_before_the_tree_starts(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)  # systemd's default RuntimeDirectoryMode
    file = write_tree(tmp_path, TREE)
    result = run_otree(["run", str(file)], tmp_path, OTREE_RUNTIME_DIR=str(shared))
    assert result.returncode == 2
    assert result.stderr == (
        f"otree: cannot serve the control socket: runtime dir {shared} is not private (owner uid "
        f"{os.getuid()}, mode 755)\n"
    )
    assert not (tmp_path / "state" / "events.jsonl").exists()  # no child was started


def test_a_state_dir_reached_through_a_symlink_names_the_same_tree(
    tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tree.directory / "link-to-state"
    link.symlink_to(tree.state)
    code, out, _ = tree.cli(capsys, "status", "--state-dir", str(link), "--json")
    assert code == 0 and json.loads(out)["root"]["info"]["id"] == "fleet"


def test_a_tree_file_that_exits_is_a_refused_reload(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    tree.file.write_text(TREE + '\nimport sys\nsys.exit("bad config")\n')
    code, _, err = tree.cli(capsys, "reload")
    assert (
        code == 4
        and "reload refused, the running tree is untouched" in err
        and "SystemExit: bad config" in err
    )
    assert tree.status(capsys)["info"]["state"] == "running"


def test_log_level_notset_is_refused(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = tree.cli(capsys, "log-level", "notset")
    assert code == 4 and "unknown log level 'notset'" in err


def test_a_state_dir_others_can_write_in_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared-state"
    shared.mkdir()
    shared.chmod(0o777)
    file = write_tree(tmp_path, TREE)
    result = run_otree(["run", str(file)], tmp_path, OTREE_STATE_DIR=str(shared))
    assert result.returncode == 2
    assert result.stderr == (
        f"otree: state dir {shared} is open to others (owner uid {os.getuid()}, mode 777)\n"
    )
    assert list(shared.iterdir()) == []  # no lock, no log was made in it


SLOW_START = """\
import sys
import trio
import otree

DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


async def slow(*, task_status=trio.TASK_STATUS_IGNORED):
    await trio.sleep(600)  # never ready: the tree is still starting
    task_status.started()


tree = otree.supervisor(
    "starting",
    children=[
        otree.process("deaf", [sys.executable, "-c", DEAF], shutdown=300.0),
        otree.task("slow", slow),
    ],
)
"""


def test_a_second_sigint_while_the_tree_starts_kills_at_once(tmp_path: Path) -> None:
    file = write_tree(tmp_path, SLOW_START)
    with otree_process(["run", str(file)], tmp_path) as process:
        process.wait_for(is_text_event("starting/slow", "child.started"))
        process.proc.send_signal(signal.SIGINT)
        process.wait_for(lambda text: "tree.signal SIGINT" in text and "action=stop" in text)
        process.proc.send_signal(signal.SIGINT)
        assert process.finish() == 130  # not after deaf's 300 s grace
    events = (tmp_path / "state" / "events.jsonl").read_text()
    assert '"kind":"tree.signal"' in events  # signals during the start reach the event log too


def test_a_stopped_pool_refuses_work_until_started_again(
    tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tree.cli(capsys, "stop", "jobs") == (0, "fleet/jobs: stopped\n", "")
    assert tree.status(capsys, "jobs")["pool"] is None  # not running: no queue to show
    code, _, err = tree.cli(capsys, "submit", "jobs", "echo", "1")
    assert (code, err) == (4, "otree: fleet/jobs: not running (state: stopped)\n")
    code, _, err = tree.cli(capsys, "jobs", "jobs")
    assert (code, err) == (4, "otree: fleet/jobs: not running (state: stopped)\n")
    assert tree.cli(capsys, "start", "jobs")[0] == 0
    code, out, _ = tree.cli(capsys, "submit", "--json", "jobs", "echo", "1")
    assert code == 0 and json.loads(out)["state"] in ("queued", "running")


# --- submit --wait ---------------------------------------------------------------------------------


def test_submit_wait_prints_the_result_of_a_job_longer_than_the_timeout(
    tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    done = run_otree(["submit", "jobs", "nap", "2", "--wait", "--timeout", "0.5", "--json"], tree.directory)
    assert time.monotonic() - began >= 2.0  # the job's two seconds: the wait is not cut at 0.5 s
    assert (done.returncode, done.stdout, done.stderr) == (0, '{"slept":2}\n', "")
    assert tree.cli(capsys, "submit", "jobs", "echo", '"hello"', "--wait") == (0, "hello\n", "")
    assert tree.cli(capsys, "submit", "jobs", "echo", "[1]", "--wait") == (0, "[1]\n", "")


def test_submit_wait_of_a_dead_lettered_job_is_one_line_and_exit_6(tree: Tree) -> None:
    failed = run_otree(["submit", "jobs", "fail", "[1, 2]", "--wait"], tree.directory)
    assert (failed.returncode, failed.stdout) == (6, "")
    assert failed.stderr == "otree: fleet/jobs: job 1: dead-lettered after 1 attempt: RuntimeError: nope\n"


def test_submit_wait_when_the_tree_stops_says_the_job_is_kept(tree: Tree) -> None:
    waiter = subprocess.Popen(
        [sys.executable, "-m", "otree", "submit", "jobs", "hold", "--wait"],
        cwd=tree.directory,
        env=subprocess_env(tree.directory),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        tree.wait_event("fleet/jobs/1", "job.started")
        tree.process.proc.send_signal(signal.SIGTERM)
        out, err = waiter.communicate(timeout=DEADLINE)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate(timeout=DEADLINE)
    assert (waiter.returncode, out) == (7, "")
    assert err == (
        "otree: fleet/jobs: job 1: interrupted: the pool stopped; it runs again when the pool starts "
        "(the tree is stopping)\n"
    )
    assert tree.process.finish() == 0


# --- the socket cannot be starved; timeouts; abandoned requests -----------------------------------


def raw_connection(tree: Tree) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.connect(str(control_socket(tree.state)))
    return sock


def raw_follower(tree: Tree) -> socket.socket:
    """An events subscription that has had its first reply (the log mark)."""
    sock = raw_connection(tree)
    sock.sendall(encode(Request(VERSION, "events", {})))
    reader = FrameReader(1 << 20)
    bodies: list[bytes] = []
    while not bodies:
        chunk = sock.recv(65536)
        assert chunk, "the tree closed the follow"
        bodies = reader.feed(chunk)
    assert decode_reply(bodies[0]).ok
    return sock


def test_followers_cannot_starve_commands(tree: Tree) -> None:
    followers: list[socket.socket] = []
    try:
        followers.extend(raw_follower(tree) for _ in range(MAX_FOLLOWERS))
        status = run_otree(["status"], tree.directory)
        assert status.returncode == 0 and status.stdout.startswith("fleet ")
        refused = run_otree(["events", "--follow"], tree.directory)
        assert (refused.returncode, refused.stdout) == (4, "")
        assert refused.stderr == (
            f"otree: too many followers: {MAX_FOLLOWERS} follow this tree's events or wait for jobs "
            "already; try later\n"
        )
        assert run_otree(["stop-tree"], tree.directory).returncode == 0
        assert tree.process.finish() == 0
    finally:
        for follower in followers:
            follower.close()


def test_a_stop_tree_that_timed_out_is_never_carried_out(
    tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    silent: list[socket.socket] = []
    try:
        # clients that connect and say nothing hold every command slot (until REQUEST_TIMEOUT)
        silent.extend(raw_connection(tree) for _ in range(MAX_CONNECTIONS))
        began = time.monotonic()
        stop = run_otree(["stop-tree", "--timeout", "1"], tree.directory)
        assert 1 <= time.monotonic() - began < DEADLINE
        assert (stop.returncode, stop.stdout) == (5, "")
        assert stop.stderr == (
            f"otree: the tree of {tree.state} did not take the request up within 1s "
            "(--timeout SECONDS waits longer); it was withdrawn, not carried out\n"
        )
    finally:
        for sock in silent:
            sock.close()
    # the slots free up: the tree reaches the stop-tree request, finds its client gone, and drops it
    line = tree.process.wait_for(lambda text: "control.abandoned" in text)
    assert line.split()[1:4] == ["fleet", "control.abandoned", "stop_tree"]
    assert tree.status(capsys)["info"]["state"] == "running"
    assert tree.process.proc.poll() is None


SLOW_STOP = """\
import sys
import otree

DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

tree = otree.supervisor(
    "slow",
    children=[otree.process("deaf", [sys.executable, "-c", DEAF], shutdown=2.0)],
)
"""


def test_waits_that_are_the_command_s_purpose_are_not_cut_by_the_timeout(tmp_path: Path) -> None:
    file = write_tree(tmp_path, SLOW_STOP)
    with otree_process(["run", str(file)], tmp_path) as process:
        process.wait_for(is_text_event("slow", "control.listening"))
        with follow_events(tmp_path, "--timeout", "0.5") as follower:
            assert follower.stdout is not None
            for line in follower.stdout:  # the history ends with control.listening; then it is live
                if json.loads(line)["kind"] == "control.listening":
                    break
            began = time.monotonic()
            stop = run_otree(["stop", "deaf", "--timeout", "0.5"], tmp_path)
            assert (stop.returncode, stop.stdout, stop.stderr) == (0, "slow/deaf: stopped\n", "")
            assert time.monotonic() - began >= 2.0  # the grace ran out: SIGKILL
            for line in follower.stdout:  # 2 s after it began, the follow is still on
                event = json.loads(line)
                if event["kind"] == "child.stopped":
                    assert (event["path"], event["details"]["by"]) == ("slow/deaf", "operator")
                    break
            assert follower.poll() is None


# --- the client against a tree that is stuck or breaks the connection ---------------------------


@pytest.fixture
def stuck_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[socket.socket, Path]]:
    """A socket where a tree's would be, listening and never accepting."""
    state = tmp_path / "state"
    monkeypatch.setenv("OTREE_STATE_DIR", str(state))
    path = control_socket(state)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)  # a connection stays in the backlog even after its client has closed
    try:
        yield listener, state
    finally:
        listener.close()
        path.unlink()


def test_a_tree_that_never_takes_the_request_up_is_one_line_after_the_timeout(
    stuck_tree: tuple[socket.socket, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, state = stuck_tree
    for args in (["status", "--timeout", "0.3"], ["--timeout", "0.3", "stop", "a"]):  # after or before
        began = time.monotonic()
        assert main(args) == 5
        assert 0.3 <= time.monotonic() - began < DEADLINE
        assert capsys.readouterr().err == (
            f"otree: the tree of {state} did not take the request up within 0.3s "
            "(--timeout SECONDS waits longer); it was withdrawn, not carried out\n"
        )


def test_a_full_backlog_is_one_line_after_the_timeout(
    stuck_tree: tuple[socket.socket, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, state = stuck_tree
    waiting: list[socket.socket] = []
    try:
        while True:  # fill the backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            waiting.append(sock)
            try:
                sock.connect(str(control_socket(state)))
            except BlockingIOError:
                break
        began = time.monotonic()
        assert main(["events", "--follow", "--timeout", "0.3"]) == 5
        assert 0.3 <= time.monotonic() - began < DEADLINE
        assert capsys.readouterr() == (
            "",
            f"otree: the tree of {state} accepted no connection within 0.3s: its backlog is full "
            "(--timeout SECONDS waits longer)\n",
        )
    finally:
        for sock in waiting:
            sock.close()


def test_a_connection_reset_mid_command_is_one_line(
    stuck_tree: tuple[socket.socket, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    listener, state = stuck_tree

    def reset_after_the_request() -> None:  # a tree killed with the request unread
        conn, _ = listener.accept()
        select.select([conn], [], [], DEADLINE)
        conn.close()

    server = threading.Thread(target=reset_after_the_request)
    server.start()
    try:
        assert main(["submit", "jobs", "echo", "{}"]) == 1
    finally:
        server.join(timeout=DEADLINE)
    assert capsys.readouterr() == (
        "",
        f"otree: the connection to the tree of {state} broke (Connection reset by peer); "
        "the request may or may not have been carried out\n",
    )


@pytest.mark.parametrize(
    ("unread", "message"),
    [
        (False, "the tree of {state} closed the connection before job 7 of jobs ended"),
        (
            True,
            "the connection to the tree of {state} broke (Connection reset by peer); "
            "job 7 of jobs was queued, and may still run",
        ),
    ],
)
def test_a_tree_gone_during_submit_wait_is_one_line(
    stuck_tree: tuple[socket.socket, Path], capsys: pytest.CaptureFixture[str], unread: bool, message: str
) -> None:
    listener, state = stuck_tree

    def queue_then_die() -> None:  # a tree killed while the job runs
        conn, _ = listener.accept()
        with conn:
            select.select([conn], [], [], DEADLINE)
            if not unread:
                conn.recv(65536)  # a closed connection, not a reset
            # the client reads both replies before the end (a Unix socket delivers what was sent)
            conn.sendall(encode(Reply(VERSION, True, ack=True)) + encode(Reply(VERSION, True, {"id": "7"})))

    server = threading.Thread(target=queue_then_die)
    server.start()
    try:
        assert main(["submit", "jobs", "nap", "5", "--wait"]) == 1
    finally:
        server.join(timeout=DEADLINE)
    assert capsys.readouterr() == ("", f"otree: {message.format(state=state)}\n")


# --- otree signal, otree logs of a running tree ------------------------------------------------

HANDLES_USR1 = """\
import os, signal, subprocess, sys, time

NAME = sys.argv[1]
signal.signal(signal.SIGUSR1, lambda *_: os.write(1, f"{NAME} got SIGUSR1\\n".encode()))
if NAME == "leader":  # a helper in the leader's process group
    subprocess.Popen([sys.executable, __file__, "helper"])
os.write(1, f"{NAME} ready\\n".encode())
time.sleep(600)
"""

SIGNALLED_TREE = """\
import sys
from pathlib import Path

import trio

import otree


async def steady(*, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep_forever()


SCRIPT = str(Path(__file__).with_name("handles_usr1.py"))

tree = otree.supervisor(
    "fleet",
    children=[
        otree.task("alice", steady),
        otree.process("worker", [sys.executable, SCRIPT, "leader"]),
    ],
)
"""


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE}s: {what}"
        time.sleep(0.02)


def test_signal_reaches_a_process_child_s_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(tmp_path, HANDLES_USR1, "handles_usr1.py")
    file = write_tree(tmp_path, SIGNALLED_TREE)
    monkeypatch.setenv("OTREE_STATE_DIR", str(tmp_path / "state"))
    log = tmp_path / "state" / "logs" / "fleet" / "worker" / "stdout.log"
    with otree_process(["run", str(file)], tmp_path) as process:
        process.wait_for(is_text_event("fleet", "control.listening"))
        wait_until(lambda: "helper ready" in log.read_text(), "the helper is up")
        pid = json.loads(run_otree(["status", "--json", "worker"], tmp_path).stdout)["root"]["info"]["pid"]
        assert main(["signal", "worker", "usr1"]) == 0
        assert capsys.readouterr() == (f"fleet/worker: SIGUSR1 sent to process group {pid}\n", "")
        wait_until(
            lambda: {"leader got SIGUSR1", "helper got SIGUSR1"} <= set(log.read_text().splitlines()),
            "both got SIGUSR1",
        )
        assert main(["signal", "--json", "fleet/worker", str(int(signal.SIGUSR1))]) == 0
        assert json.loads(capsys.readouterr().out) == {
            "path": "fleet/worker",
            "pid": pid,
            "signal": "SIGUSR1",
        }
        line = process.wait_for(is_text_event("fleet/worker", "child.signalled"))
        assert line.split()[3:] == ["SIGUSR1", "by=operator", f"pid={pid}"]
        wait_until(lambda: log.read_text().count("got SIGUSR1") == 4, "both got the second SIGUSR1")
        assert main(["logs", "worker", "-n", "2"]) == 0  # what it printed, from its log file
        assert sorted(capsys.readouterr().out.splitlines()) == [
            "helper got SIGUSR1",
            "leader got SIGUSR1",
        ]
        for args, code, message in (
            (["alice", "TERM"], 4, "fleet/alice is a task: only a process child takes a signal"),
            (
                ["worker", "SIGNOPE"],
                2,
                "SIGNAL 'SIGNOPE': not a signal (use a name such as TERM, HUP, USR1, or a number)",
            ),
            (
                ["worker", "999"],
                2,
                "SIGNAL '999': not a signal (use a name such as TERM, HUP, USR1, or a number)",
            ),
            (["nobody", "TERM"], 4, "no child at fleet/nobody (children of fleet: alice, worker)"),
        ):
            assert main(["signal", *args]) == code
            assert capsys.readouterr() == ("", f"otree: {message}\n")
        assert main(["stop", "worker"]) == 0
        assert main(["signal", "worker", "TERM"]) == 4
        assert capsys.readouterr().err == "otree: fleet/worker: not running (state: stopped)\n"
        assert main(["stop-tree"]) == 0
        assert process.finish() == 0
        capsys.readouterr()
    assert main(["logs", "fleet/worker", "-n", "1"]) == 0  # no tree needed
    assert capsys.readouterr().out in ("helper got SIGUSR1\n", "leader got SIGUSR1\n")


# --- steering one job: otree job, cancel, signal --job -------------------------------------

TOOL_TREE = """\
import sys

import otree

TOOL = '''
import os, pathlib, signal, sys, time
sys.stdin.read()
signal.signal(signal.SIGUSR1, lambda *_: (print('"got usr1"', flush=True), sys.exit(0)))
pathlib.Path(os.environ["OTREE_TEST_READY"], str(os.getpid())).touch()  # it takes USR1 from now on
time.sleep(60)
'''

tool = otree.process_job([sys.executable, "-c", TOOL])
tree = otree.supervisor("fleet", children=[otree.pool("tools", {"tool": tool}, max_concurrency=2)])
"""


def _job_json(tree: Tree, capsys: pytest.CaptureFixture[str], job_id: str) -> dict[str, Any]:
    code, out, err = tree.cli(capsys, "job", "--json", "tools", job_id)
    assert code == 0, err
    job: dict[str, Any] = json.loads(out)
    return job


def _running_pid(tree: Tree, capsys: pytest.CaptureFixture[str], job_id: str) -> int:
    """The pid of a process job once it runs and has set up its USR1 handler (polled, with a deadline)."""
    deadline = time.monotonic() + DEADLINE
    while (pid := _job_json(tree, capsys, job_id)["pid"]) is None or not (
        tree.directory / "ready" / str(pid)
    ).exists():
        assert time.monotonic() < deadline, f"job {job_id} never showed a pid"
        time.sleep(0.05)
    assert isinstance(pid, int)
    return pid


def test_job_cancel_and_signal_job_steer_a_running_process_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTREE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OTREE_TEST_READY", str(tmp_path / "ready"))
    (tmp_path / "ready").mkdir()
    file = write_tree(tmp_path, TOOL_TREE)
    pids: list[int] = []
    try:
        with otree_process(["run", str(file)], tmp_path) as process:
            tree = Tree(tmp_path, process, file)
            tree.wait_event("fleet", "control.listening")
            for _ in range(2):
                assert tree.cli(capsys, "submit", "tools", "tool")[0] == 0
            pids = [_running_pid(tree, capsys, job_id) for job_id in ("1", "2")]
            code, out, _ = tree.cli(capsys, "jobs", "tools")
            assert f" pid {pids[0]} " in out and f" pid {pids[1]} " in out
            # signal --job: the job's process group gets it (the tool answers USR1 by finishing)
            code, out, err = tree.cli(capsys, "signal", "tools", "USR1", "--job", "1")
            assert (code, out) == (0, f"fleet/tools/1: SIGUSR1 sent to process group {pids[0]}\n"), err
            tree.wait_event("fleet/tools/1", "job.finished")
            done = _job_json(tree, capsys, "1")
            assert (done["state"], done["result"], done["pid"], done["attempts"]) == (
                "done",
                "got usr1",
                None,
                1,
            )
            # cancel: stopped like a child, one job.cancelled, and the whole group is gone
            assert tree.cli(capsys, "cancel", "tools", "2") == (0, "tools: job 2 cancelled\n", "")
            tree.wait_event("fleet/tools/2", "job.cancelled")
            with pytest.raises(ProcessLookupError):
                os.killpg(pids[1], 0)
            code, out, _ = tree.cli(capsys, "job", "tools", "2")
            assert code == 0 and out.split()[:3] == ["2", "tool", "cancelled"] and "error: cancelled" in out
            for args, error in (
                (("cancel", "tools", "2"), "job 2 of fleet/tools already finished (cancelled)"),
                (("cancel", "tools", "9"), "fleet/tools: no job 9 (jobs: 0 running, 0 queued, 0 retrying, "),
                (("job", "tools", "9"), "fleet/tools: no job 9 (jobs: "),
                (("signal", "tools", "USR1", "--job", "1"), "job 1 of fleet/tools is not running (done)"),
            ):
                code, out, err = tree.cli(capsys, *args)
                assert (code, out) == (4, ""), err
                assert err.startswith(f"otree: {error}") and err.count("\n") == 1
            assert not any(e in line for line in process.lines for e in ("job.retried", "job.dead_lettered"))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
