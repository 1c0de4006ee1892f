"""The ``otree`` command: ``check`` and ``run``, in-process through ``main`` and as a real subprocess."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from otree import _cli
from otree._cli import main
from otree._paths import child_log_dir
from otree._process import _RotatingLog

from .otree_subprocess import (
    DEADLINE,
    REPO,
    event_of,
    is_text_event,
    otree_process,
    run_otree,
    subprocess_env,
    write_tree,
)

# Tree files for subprocesses import only trio and otree.
STEADY_TREE = """\
import trio

import otree


async def steady(name, *, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep_forever()


tree = otree.supervisor(
    "root",
    children=[
        otree.task("a", steady, "a"),
        otree.supervisor(
            "sub",
            strategy="rest_for_one",
            children=[otree.task("b", steady, "b"), otree.task("c", steady, "c", shutdown=1.0)],
        ),
        otree.task("d", steady, "d", restart="transient"),
    ],
)
"""
STEADY_START_ORDER = ["root/a", "root/sub", "root/sub/b", "root/sub/c", "root/d"]

GIVES_UP_TREE = """\
import otree


async def crash():
    raise RuntimeError("boom")


tree = otree.supervisor("root", max_restarts=1, children=[otree.task("bad", crash)])
"""

RICH_TREE = """\
import trio

import otree


async def agent(name):
    await trio.sleep_forever()


tree = otree.supervisor(
    "fleet",
    strategy="rest_for_one",
    max_restarts=5,
    max_seconds=10.0,
    children=[
        otree.task("alice", agent, "alice"),
        otree.task("bob", agent, "bob", restart="transient", shutdown="brutal_kill"),
        otree.supervisor(
            "db",
            strategy="one_for_all",
            max_children=4,
            auto_shutdown="any_significant",
            backoff=otree.Backoff(initial=0.5, maximum=8.0),
            shutdown=30.0,
            children=[otree.task("conn", agent, "conn", restart="temporary", significant=True)],
        ),
    ],
)

other = otree.supervisor("other", children=[otree.task("solo", agent, "solo")])
not_a_tree = otree.task("lonely", agent, "lonely")
"""

SPEC_ERROR_TREE = """\
import otree


async def steady():
    pass


tree = otree.supervisor(
    "root",
    children=[
        otree.task("ok", steady),
        otree.task("a", steady, shutdown=-1),  # BAD
    ],
)
"""

DUPLICATE_TREE = """\
import otree


async def steady():
    pass


tree = otree.supervisor(  # BAD
    "root",
    children=[otree.task("a", steady), otree.task("a", steady)],
)
"""

SYNTAX_ERROR_TREE = """\
import otree

def broken(:  # BAD
    pass
"""

IMPORT_ERROR_TREE = """\
import trio
import otree_no_such_module_for_tests  # BAD
"""

RAISING_TREE = """\
import otree


def build():
    raise ValueError("no tree today")  # BAD


tree = build()
"""


# --- helpers --------------------------------------------------------------------------


def line_of(text: str, marker: str = "# BAD") -> int:
    """The 1-based number of the first line of ``text`` holding ``marker``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in text")


def is_json_event(path: str, kind: str) -> Callable[[str], bool]:
    def matches(line: str) -> bool:
        try:
            event = json.loads(line)
        except ValueError:
            return False
        return isinstance(event, dict) and (event.get("path"), event.get("kind")) == (path, kind)

    return matches


@pytest.fixture(autouse=True)
def restore_import_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """``main`` imports tree files in-process: put sys.path and sys.modules back afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if name.startswith("otree_tree_") or module_file.startswith(str(tmp_path)):
            del sys.modules[name]


def check_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run ``otree ARGS`` in-process, expect exit 2 and one stderr line; return that line."""
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# --- check -----------------------------------------------------------------------------


def tokens(line: str) -> tuple[int, list[str]]:
    """Indent depth (two spaces a level) and whitespace-split fields of a ``check`` line."""
    depth = (len(line) - len(line.lstrip(" "))) // 2
    return depth, line.split()


def field(fields: list[str], name: str) -> str:
    values = [f.split("=", 1)[1] for f in fields if f.startswith(name + "=")]
    assert len(values) == 1, (name, fields)
    return values[0]


def test_check_prints_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, RICH_TREE)
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 5
    rows = [tokens(line) for line in lines]
    assert [(depth, fields[0], fields[1]) for depth, fields in rows] == [
        (0, "fleet", "supervisor"),
        (1, "alice", "task"),
        (1, "bob", "task"),
        (1, "db", "supervisor"),
        (2, "conn", "task"),
    ]
    fleet, alice, bob, db, conn = (fields for _, fields in rows)
    assert field(fleet, "restart") == "permanent"
    assert field(fleet, "shutdown") == "infinity"
    assert field(fleet, "strategy") == "rest_for_one"
    assert field(fleet, "max_restarts") == "5"
    assert float(field(fleet, "max_seconds")) == 10.0
    assert field(alice, "restart") == "permanent"
    assert float(field(alice, "shutdown")) == 5.0
    assert field(bob, "restart") == "transient"
    assert field(bob, "shutdown") == "brutal_kill"
    assert field(db, "strategy") == "one_for_all"
    assert float(field(db, "shutdown")) == 30.0
    assert field(db, "max_restarts") == "3"
    assert float(field(db, "max_seconds")) == 5.0
    assert field(db, "max_children") == "4"
    assert field(db, "auto_shutdown") == "any_significant"
    assert "backoff=" in " ".join(db)
    assert field(conn, "restart") == "temporary"
    assert "significant" in conn
    assert "significant" not in alice


SETTINGS_TREE = """\
import otree

async def work(payload):
    return payload

async def told(path, exit):
    pass

tree = otree.supervisor("fleet", persist_intensity=True, children=[
    otree.task("alice", work, None, max_runtime=30.0, on_exit=told),
    otree.process("tool", ["./tool", "--fast"], env={"API_KEY": "secret", "MODEL": "small"},
                  ok_exit_codes=(3, 4), log_timestamps=True),
    otree.pool("jobs", {"work": work}, on_full="drop_oldest", max_starts_per_second=2.5,
               backoff=otree.Backoff.schedule([0, 30, 120])),
])
"""


def test_check_shows_every_setting_that_is_not_its_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(write_tree(tmp_path, SETTINGS_TREE))]) == 0
    fleet, alice, tool, jobs = (fields for _, fields in map(tokens, capsys.readouterr().out.splitlines()))
    assert "persist_intensity" in fleet
    assert (field(alice, "max_runtime"), field(alice, "on_exit")) == ("30", "told")
    assert field(tool, "env") == "API_KEY,MODEL"  # the names only: the values may be secrets
    assert "secret" not in " ".join(tool)
    assert (field(tool, "ok_exit_codes"), "log_timestamps" in tool) == ("3,4", True)
    assert not [word for word in tool if word.startswith(("stdout=", "ready=", "inherit_env="))]  # defaults
    assert field(jobs, "on_full") == "drop_oldest"
    assert field(jobs, "max_starts_per_second") == "2.5"
    assert field(jobs, "backoff") == "[0,30,120]s"


RAY_TREE = """
import otree

async def work():
    pass

tree = otree.supervisor("root", children=[
    otree.ray(otree.supervisor("crew", children=[otree.task("a", work)]), num_cpus=0, start_timeout=90),
])
"""


def test_check_shows_what_runs_on_ray_after_the_ray_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")  # the test command installs the extra: this runs in CI
    assert main(["check", str(write_tree(tmp_path, RAY_TREE))]) == 0
    lines = [tokens(line) for line in capsys.readouterr().out.splitlines()]
    # the depth gives each child's path, as for any tree: root/crew/a
    assert [(depth, fields[:2]) for depth, fields in lines] == [
        (0, ["root", "supervisor"]),
        (1, ["crew", "ray"]),
        (2, ["a", "task"]),
    ]
    ray_line = lines[1][1]
    assert (field(ray_line, "options"), field(ray_line, "start_timeout")) == ("num_cpus:0", "90")
    assert ray_line[ray_line.index("|") + 1 :][:3] == ["supervisor", "restart=permanent", "shutdown=infinity"]
    assert not [word for word in ray_line if word.startswith("spec=")]  # not one long field


def test_check_attr_picks_another_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, RICH_TREE)
    assert main(["check", str(path), "--attr", "other"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [tokens(line)[1][:2] for line in lines] == [["other", "supervisor"], ["solo", "task"]]


def test_check_spec_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, SPEC_ERROR_TREE)
    line = check_error(capsys, ["check", str(path)])
    assert line == (
        f"otree: {path}:{line_of(SPEC_ERROR_TREE)}: SpecError: "
        'a: shutdown must be >= 0, "brutal_kill" or "infinity"; got -1'
    )


def test_check_spec_error_of_children_as_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, DUPLICATE_TREE)
    line = check_error(capsys, ["check", str(path)])
    assert line == (
        f"otree: {path}:{line_of(DUPLICATE_TREE)}: SpecError: "
        "root/a: id must be unique among siblings; got 'a'"
    )


def test_check_relative_path_shown_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(tmp_path, SPEC_ERROR_TREE)
    monkeypatch.chdir(tmp_path)
    line = check_error(capsys, ["check", "tree.py"])
    assert line.startswith(f"otree: tree.py:{line_of(SPEC_ERROR_TREE)}: SpecError: a: shutdown ")


def test_check_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, SYNTAX_ERROR_TREE)
    line = check_error(capsys, ["check", str(path)])
    assert line.startswith(f"otree: {path}:{line_of(SYNTAX_ERROR_TREE)}: SyntaxError: ")
    assert len(line) > len(f"otree: {path}:3: SyntaxError: ")


def test_check_import_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, IMPORT_ERROR_TREE)
    line = check_error(capsys, ["check", str(path)])
    assert line == (
        f"otree: {path}:{line_of(IMPORT_ERROR_TREE)}: ModuleNotFoundError: "
        "No module named 'otree_no_such_module_for_tests'"
    )


def test_check_error_raised_at_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, RAISING_TREE)
    line = check_error(capsys, ["check", str(path)])
    assert line == f"otree: {path}:{line_of(RAISING_TREE)}: ValueError: no tree today"


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere.py"
    line = check_error(capsys, ["check", str(path)])
    assert line == f"otree: {path}: no such file"


def test_check_directory_is_not_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = check_error(capsys, ["check", str(tmp_path)])
    assert line == f"otree: {tmp_path}: is a directory; give the tree file in it (e.g. {tmp_path}/tree.py)"


def test_run_of_a_directory_says_it_is_one(tmp_path: Path) -> None:
    (tmp_path / "supervisors").mkdir()
    result = run_otree(["run", "supervisors"], tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "otree: supervisors: is a directory; give the tree file in it (e.g. supervisors/tree.py)\n"
    )


def test_check_missing_attribute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, "import otree\n\nforest = None\n")
    line = check_error(capsys, ["check", str(path)])
    assert line == f"otree: {path}: no tree: the module has no attribute 'tree' (pick one with --attr)"


def test_check_missing_named_attribute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, RICH_TREE)
    line = check_error(capsys, ["check", str(path), "--attr", "nope"])
    assert "'nope'" in line
    assert "--attr" in line


def test_check_attribute_not_a_supervisor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, RICH_TREE)
    line = check_error(capsys, ["check", str(path), "--attr", "not_a_tree"])
    assert line == f"otree: {path}: not_a_tree is a TaskSpec, not a supervisor spec (use otree.supervisor)"


def test_check_attribute_plain_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, "tree = {'id': 'root'}\n")
    line = check_error(capsys, ["check", str(path)])
    assert line.startswith(f"otree: {path}: tree is a dict, not a supervisor spec")


def test_check_imports_module_beside_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tree(
        tmp_path, "import trio\n\n\nasync def agent():\n    await trio.sleep_forever()\n", "agents_beside.py"
    )
    path = write_tree(
        tmp_path,
        "import otree\nfrom agents_beside import agent\n\n"
        "tree = otree.supervisor('r', children=[otree.task('x', agent)])\n",
    )
    assert main(["check", str(path)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["r", "x"]


@pytest.mark.parametrize(
    ("text", "first_words"),
    [
        (SPEC_ERROR_TREE, "SpecError: a: shutdown must be"),
        (SYNTAX_ERROR_TREE, "SyntaxError: "),
        (IMPORT_ERROR_TREE, "ModuleNotFoundError: No module named"),
        (RAISING_TREE, "ValueError: no tree today"),
    ],
    ids=["spec", "syntax", "import", "raise"],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_tree_file_subprocess(tmp_path: Path, text: str, first_words: str, command: str) -> None:
    path = write_tree(tmp_path, text)
    result = run_otree([command, "tree.py"], tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.rstrip("\n")]
    assert result.stderr.startswith(f"otree: tree.py:{line_of(text)}: {first_words}")
    assert path.exists()


def test_check_subprocess_prints_tree(tmp_path: Path) -> None:
    write_tree(tmp_path, STEADY_TREE)
    result = run_otree(["check", "tree.py"], tmp_path)
    assert result.returncode == 0
    assert result.stderr == ""
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["root", "a", "sub", "b", "c", "d"]


def test_check_subprocess_missing_file_and_attribute(tmp_path: Path) -> None:
    missing = run_otree(["check", "absent.py"], tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == "otree: absent.py: no such file\n"
    write_tree(tmp_path, STEADY_TREE)
    no_attr = run_otree(["run", "tree.py", "--attr", "forest"], tmp_path)
    assert no_attr.returncode == 2
    assert "--attr" in no_attr.stderr
    assert "Traceback" not in no_attr.stderr
    assert len(no_attr.stderr.splitlines()) == 1


# --- usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["run"],
        ["check"],
        ["run", "tree.py", "--log-format", "xml"],
        ["run", "tree.py", "--no-such-flag"],
        ["run", "a.py", "b.py"],
    ],
    ids=[
        "no-command",
        "unknown-command",
        "run-no-file",
        "check-no-file",
        "bad-format",
        "bad-flag",
        "two-files",
    ],
)
def test_usage_error_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "usage: otree" in captured.err
    assert "Traceback" not in captured.err


def test_help_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "run" in out
    assert "check" in out


def test_run_help_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--attr" in out
    assert "--log-format" in out


def test_help_subprocess() -> None:
    result = run_otree(["--help"], REPO)
    assert result.returncode == 0
    assert "usage: otree" in result.stdout
    assert result.stderr == ""


def test_usage_error_subprocess(tmp_path: Path) -> None:
    result = run_otree(["run"], tmp_path)
    assert result.returncode == 2
    assert "usage: otree run" in result.stderr


def test_run_missing_file_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = check_error(capsys, ["run", str(tmp_path / "gone.py")])
    assert line == f"otree: {tmp_path / 'gone.py'}: no such file"


def test_run_spec_error_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tree(tmp_path, SPEC_ERROR_TREE)
    line = check_error(capsys, ["run", str(path)])
    assert line.startswith(f"otree: {path}:{line_of(SPEC_ERROR_TREE)}: SpecError: a: shutdown must be")


def test_run_attribute_not_a_supervisor_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_tree(tmp_path, RICH_TREE)
    line = check_error(capsys, ["run", str(path), "--attr", "not_a_tree"])
    assert "not a supervisor spec" in line


# --- run as a subprocess --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_signal_stops_tree_in_reverse_order(tmp_path: Path, signum: signal.Signals) -> None:
    write_tree(tmp_path, STEADY_TREE)
    with otree_process(["run", "tree.py"], tmp_path) as process:
        process.wait_for(is_text_event("root", "supervisor.started"))
        process.proc.send_signal(signum)
        assert process.finish() == 0
        lines = process.lines
    assert "Traceback" not in "\n".join(lines)
    events = [event for event in map(event_of, lines) if event is not None]
    started = [path for path, kind, _ in events if kind == "child.started"]
    stopped = [path for path, kind, _ in events if kind == "child.stopped"]
    assert started == STEADY_START_ORDER
    assert stopped == list(reversed(STEADY_START_ORDER))
    assert {reason for _, kind, reason in events if kind == "child.stopped"} == {"shutdown"}
    assert events[-1][:2] == ("root", "supervisor.stopped")
    assert not [event for event in events if event[1] in ("child.exited", "child.restarting")]


def test_run_root_gives_up_exit_1(tmp_path: Path) -> None:
    write_tree(tmp_path, GIVES_UP_TREE)
    result = run_otree(["run", "tree.py"], tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    failures = [line for line in lines if line.startswith("otree: RestartIntensityExceeded:")]
    assert failures == [
        "otree: RestartIntensityExceeded: root: reached max restart intensity (1 restarts in 5s); "
        "last failing child: root/bad"
    ]
    assert lines[-1] == failures[0]
    events = [event for event in map(event_of, lines) if event is not None]
    assert ("root", "supervisor.intensity_exceeded") in [event[:2] for event in events]
    assert [event for event in events if event[1] == "child.exited"] == [
        ("root/bad", "child.exited", "error"),
        ("root/bad", "child.exited", "error"),
    ]


def json_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if not line.startswith("otree:")]


def test_run_log_format_json(tmp_path: Path) -> None:
    write_tree(tmp_path, STEADY_TREE)
    with otree_process(["run", "tree.py", "--log-format", "json"], tmp_path) as process:
        process.wait_for(is_json_event("root", "supervisor.started"))
        process.proc.send_signal(signal.SIGTERM)
        assert process.finish() == 0
        lines = process.lines
    events = json_events(lines)
    assert len(events) >= 2 * len(STEADY_START_ORDER)
    for event in events:
        assert set(event) == {"time", "path", "kind", "reason", "details"}
        assert isinstance(event["time"], float)
        assert isinstance(event["details"], dict)
    assert [e["path"] for e in events if e["kind"] == "child.started"] == STEADY_START_ORDER
    assert [e["path"] for e in events if e["kind"] == "child.stopped"] == list(reversed(STEADY_START_ORDER))
    assert (events[-1]["path"], events[-1]["kind"], events[-1]["reason"]) == (
        "root",
        "supervisor.stopped",
        "shutdown",
    )


def test_run_log_format_json_gives_up(tmp_path: Path) -> None:
    write_tree(tmp_path, GIVES_UP_TREE)
    result = run_otree(["run", "tree.py", "--log-format", "json"], tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("otree: RestartIntensityExceeded: root: ")
    exits = [e for e in json_events(lines[:-1]) if e["kind"] == "child.exited"]
    assert len(exits) == 2
    assert {(e["path"], e["reason"]) for e in exits} == {("root/bad", "error")}
    assert all("RuntimeError" in json.dumps(e["details"]) for e in exits)


def test_run_log_format_json_every_line_is_json(tmp_path: Path) -> None:
    write_tree(tmp_path, STEADY_TREE)
    with otree_process(["run", "tree.py", "--log-format", "json"], tmp_path) as process:
        process.wait_for(is_json_event("root", "supervisor.started"))
        process.proc.send_signal(signal.SIGTERM)
        assert process.finish() == 0
        lines = process.lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


# --- --version ----------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import metadata

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    name = sorted(set(metadata.packages_distributions()["otree"]))[0]
    assert out == f"otree {metadata.version(name)} ({name})\n"


# --- otree logs ---------------------------------------------------------------------------


def log_writer(state: Path, child: str, max_bytes: int = 1 << 20, backups: int = 3) -> _RotatingLog:
    """The writer a process child's stdout goes through, at that child's log path."""
    return _RotatingLog(child_log_dir(state, child) / "stdout.log", max_bytes, backups)


def numbered(first: int, last: int) -> bytes:
    return b"".join(b"line %05d ..........\n" % n for n in range(first, last + 1))  # 21 bytes each


def logs(capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> tuple[int, str, str]:
    code = main(["logs", "--state-dir", str(state), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_logs_prints_the_last_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = log_writer(tmp_path, "fleet/team/worker")
    writer.write(numbered(1, 30))
    writer.close()
    assert logs(capsys, tmp_path, "team/worker", "-n", "2") == (0, numbered(29, 30).decode(), "")
    assert logs(capsys, tmp_path, "fleet/team/worker") == (0, numbered(21, 30).decode(), "")  # 10
    assert logs(capsys, tmp_path, "/team/worker/", "-n", "0") == (0, "", "")
    assert logs(capsys, tmp_path, "team/worker", "-n", "99")[1] == numbered(1, 30).decode()


def test_logs_reach_into_the_rotated_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = log_writer(tmp_path, "fleet/worker", max_bytes=1024, backups=2)
    writer.write(numbered(1, 100))  # 2100 bytes: rotated twice, each time in the middle of a line
    writer.write(b"no newline yet")
    writer.close()
    code, out, _ = logs(capsys, tmp_path, "worker", "-n", "60")
    assert code == 0
    assert out == numbered(42, 100).decode() + "no newline yet"


def test_logs_of_what_has_none_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs_dir = tmp_path / "logs"
    assert logs(capsys, tmp_path, "alice") == (
        4,
        "",
        f'otree: no stdout log of alice in {logs_dir} (only a process child with stdout="log", or a '
        "process job with logs=True, has one; "
        "stdout logs there: none)\n",
    )
    log_writer(tmp_path, "fleet/team/worker").close()
    log_writer(tmp_path, "fleet/indexer").close()
    assert logs(capsys, tmp_path, "team")[2] == (
        f'otree: no stdout log of team in {logs_dir} (only a process child with stdout="log", or a '
        "process job with logs=True, has one; "
        "stdout logs there: fleet/indexer, fleet/team/worker)\n"
    )
    assert logs(capsys, tmp_path, "indexer", "--stderr")[0] == 4  # it has a stdout log only
    log_writer(tmp_path, "armada/indexer").close()  # another tree's, in the same state dir
    assert logs(capsys, tmp_path, "indexer")[2] == (
        "otree: indexer names the logs of several trees: armada/indexer, fleet/indexer "
        "(give the whole path)\n"
    )
    assert logs(capsys, tmp_path, "fleet/indexer")[0] == 0
    (tmp_path / "stdout.log").write_text("not a child's log\n")  # <state dir>/logs/.. holds one
    assert logs(capsys, tmp_path, "..") == (
        4,
        "",
        "otree: '..' is not a child path: '..' does not match [A-Za-z0-9][A-Za-z0-9_.-]*\n",
    )


class LineReader:
    """Lines of a subprocess's stdout, each awaited with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.stdout = proc.stdout
        self.pending = b""

    def read(self, count: int) -> bytes:
        deadline = time.monotonic() + DEADLINE
        while self.pending.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {self.pending!r} within {DEADLINE}s"
            if select.select([self.stdout], [], [], remaining)[0]:
                chunk = os.read(self.stdout.fileno(), 65536)
                assert chunk, f"stdout ended after {self.pending!r}"
                self.pending += chunk
        cut = 0
        for _ in range(count):
            cut = self.pending.index(b"\n", cut) + 1
        lines, self.pending = self.pending[:cut], self.pending[cut:]
        return lines


def test_logs_follow_goes_on_across_rotations(tmp_path: Path) -> None:
    writer = log_writer(tmp_path, "fleet/worker", max_bytes=1024, backups=5)
    writer.write(numbered(1, 3))
    follower = subprocess.Popen(
        [sys.executable, "-m", "otree", "logs", "worker", "-f", "-n", "1", "--state-dir", str(tmp_path)],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines = LineReader(follower)
        assert lines.read(1) == numbered(3, 3)  # the last line, and now it follows
        writer.write(numbered(4, 10))
        assert lines.read(7) == numbered(4, 10)
        writer.write(numbered(11, 130))  # 2520 bytes at once: rotated twice before it looks again
        assert lines.read(120) == numbered(11, 130)
        writer.write(numbered(131, 131))
        assert lines.read(1) == numbered(131, 131)
        assert follower.poll() is None
        follower.send_signal(signal.SIGINT)  # Ctrl-C
        assert follower.wait(timeout=DEADLINE) == 0
        assert follower.stderr is not None and follower.stderr.read() == b""
    finally:
        writer.close()
        if follower.poll() is None:
            follower.kill()
            follower.wait(timeout=DEADLINE)
        for pipe in (follower.stdout, follower.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e12", "soon"])
def test_a_timeout_that_is_not_a_sane_number_of_seconds_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    for args in (["--timeout", value, "status"], ["status", "--timeout", value]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "argument --timeout:" in err and "Traceback" not in err


def test_ctrl_c_while_submit_waits_names_the_job_that_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def wait() -> Any:
        raise KeyboardInterrupt  # Ctrl-C once the job is queued

    def submitted(sock_path: Path, state: Path, **request: Any) -> tuple[dict[str, str], Callable[[], Any]]:
        assert request["pool"] == "jobs" and request["payload"] == {"n": 1}
        return {"id": "7", "state": "running"}, wait

    monkeypatch.setenv("OTREE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(_cli, "submit_and_wait", submitted)
    assert main(["submit", "jobs", "nap", '{"n": 1}', "--wait"]) == 130
    assert capsys.readouterr() == (
        "",
        "otree: stopped waiting for job 7 of jobs; the job goes on (otree jobs jobs)\n",
    )


def test_submit_max_runtime_and_lane_are_sent_only_when_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []

    def call(self: Any, op: str, **request: Any) -> Any:
        sent.append({"op": op, **request})
        return {"id": "1", "state": "queued"}

    monkeypatch.setattr(_cli._Target, "call", call)
    base = ["submit", "--state-dir", str(tmp_path), "jobs", "work"]
    assert main([*base, "--max-runtime", "1.5", "--lane", "agent-7"]) == 0
    assert main(base) == 0
    assert capsys.readouterr().out == "jobs: job 1 queued\njobs: job 1 queued\n"
    assert [
        (request["op"], request.get("max_runtime", "absent"), request.get("lane", "absent"))
        for request in sent
    ] == [
        ("submit", 1.5, "agent-7"),
        ("submit", "absent", "absent"),
    ]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_submit_max_runtime_is_one_usage_line(capsys: pytest.CaptureFixture[str], value: str) -> None:
    line = check_error(capsys, ["submit", "jobs", "work", "--max-runtime", value])
    assert line == f"otree: --max-runtime {value!r}: give a number of seconds above 0"
