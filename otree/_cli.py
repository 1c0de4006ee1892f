"""The ``otree`` command: parses argv and calls the public API or a running tree's control socket.

Exit codes: 0 clean stop or request done; 1 the root gave up (or failed to
start), or the connection to the tree broke; 2 usage error, bad tree file,
missing tree attribute or spec error; 3 no running tree for a command that
needs one; 4 the request was refused (one line says why); 5 the tree did not
take the request up within ``--timeout``; 6 the job ``submit --wait`` waited
for failed (dead-lettered, cancelled, dropped); 7 its pool or the tree stopped
before it ended (a durable pool keeps it); 130 a second Ctrl-C (or Ctrl-C during
``submit --wait``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from ._childlogs import NoLog, find_log, follow, last_lines
from ._client import DEFAULT_TIMEOUT, ControlError, NoTree, call, submit_and_wait, subscribe
from ._info import ChildInfo, DeadLetter, Event, JobInfo, Jobs, LaneStatus, Status
from ._logfiles import EventFilter, LogMark, read_events
from ._paths import control_socket, state_dir
from ._protocol import EXIT_INTERRUPTED, EXIT_NO_TREE, EXIT_REFUSED, EXIT_USAGE
from ._render import (
    format_event,
    render_dead_letters,
    render_job,
    render_jobs,
    render_lane,
    render_status,
)

__all__ = ["main"]


def _tree_command(args: argparse.Namespace) -> int:
    from ._treecmd import tree_command  # the runtime is imported only by the commands that load a tree

    if getattr(args, "ray", None):  # the tree's Ray children join this cluster (read by otree._ray)
        os.environ["OTREE_RAY_ADDRESS"] = args.ray
    return tree_command(args)


class _Usage(Exception):
    """A command line that parses but does not make sense (bad JSON, a bad time)."""


class _Target:
    """The running tree a control command talks to: its state dir and socket."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.state = state_dir(args.state_dir)
        self.socket = control_socket(self.state)
        self.json: bool = args.json
        self.timeout: float = args.timeout

    def call(self, op: str, **request: Any) -> Any:
        return call(self.socket, self.state, op, timeout=self.timeout, **request)

    def show(self, result: Any, text: Callable[[], str]) -> int:
        print(msgspec.json.encode(result).decode() if self.json else text())
        return 0


def _status(args: argparse.Namespace) -> int:
    tree = _Target(args)
    status = msgspec.convert(tree.call("status", path=args.path or ""), Status)
    return tree.show(status, lambda: render_status(status))


def _child_command(args: argparse.Namespace) -> int:
    tree = _Target(args)
    result = tree.call(args.command, path=args.path)
    if "id" not in result:  # stop, delete: the child's path
        return tree.show(result, lambda: f"{result['path']}: {args.done}")
    info = msgspec.convert(result, ChildInfo)
    if not result.get("started", True):  # start of a child that runs: nothing to do
        return tree.show(info, lambda: f"{info.path}: already {info.state}")
    return tree.show(info, lambda: f"{info.path}: {args.done} ({info.state})")


def _signal(args: argparse.Namespace) -> int:
    tree = _Target(args)
    sent = tree.call("signal", path=args.path, signal=parse_signal(args.signal), job=args.job)
    return tree.show(sent, lambda: f"{sent['path']}: {sent['signal']} sent to process group {sent['pid']}")


def parse_signal(text: str) -> int:
    """A signal by number (``10``) or name, with or without ``SIG``, in any case (``usr1``, ``SIGUSR1``)."""
    if text.isdigit():
        number = int(text)
        if number in signal.valid_signals():
            return number
    else:
        name = text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
        try:
            return signal.Signals[name].value
        except KeyError:
            pass
    raise _Usage(f"SIGNAL {text!r}: not a signal (use a name such as TERM, HUP, USR1, or a number)")


def _logs(args: argparse.Namespace) -> int:
    stream = "stderr" if args.stderr else "stdout"
    try:
        log = find_log(state_dir(args.state_dir), args.path, stream)
    except NoLog as missing:
        print(f"otree: {missing}", file=sys.stderr)
        return EXIT_REFUSED
    out = sys.stdout.buffer
    with log.open("rb") as file:
        out.write(last_lines(log, file, args.lines))
        out.flush()
        if args.follow:
            follow(log, file, out)  # until Ctrl-C (exit 0)
    return 0


def _submit(args: argparse.Namespace) -> int:
    try:
        payload = msgspec.json.decode(args.payload) if args.payload is not None else None
    except msgspec.DecodeError as error:
        raise _Usage(f"PAYLOAD_JSON is not JSON: {error}") from None
    tree = _Target(args)
    job = dict(
        pool=args.pool, kind=args.kind, payload=payload, priority=args.priority, cost=args.cost, key=args.key
    )
    if args.max_runtime is not None:  # sent only when given: a tree from before the option still answers
        job["max_runtime"] = _max_runtime(args.max_runtime)
    if args.lane is not None:  # the same
        job["lane"] = args.lane
    if not args.wait:
        queued = tree.call("submit", **job)
        return tree.show(queued, lambda: f"{args.pool}: job {queued['id']} {queued['state']}")
    queued, outcome = submit_and_wait(tree.socket, tree.state, timeout=tree.timeout, **job)
    try:
        result = outcome()
    except KeyboardInterrupt:
        print(
            f"otree: stopped waiting for job {queued['id']} of {args.pool}; the job goes on "
            f"(otree jobs {args.pool})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return tree.show(
        result, lambda: result if isinstance(result, str) else msgspec.json.encode(result).decode()
    )


def _jobs(args: argparse.Namespace) -> int:
    tree = _Target(args)
    jobs = msgspec.convert(tree.call("jobs", pool=args.pool), Jobs)
    return tree.show(jobs, lambda: render_jobs(jobs))


def _job(args: argparse.Namespace) -> int:
    tree = _Target(args)
    job = msgspec.convert(tree.call("job", pool=args.pool, id=args.id), JobInfo)
    return tree.show(job, lambda: render_job(job))


def _lane(args: argparse.Namespace) -> int:
    tree = _Target(args)
    lane = msgspec.convert(tree.call("lane", pool=args.pool, lane=args.lane), LaneStatus)
    return tree.show(lane, lambda: render_lane(args.pool, lane))


def _cancel(args: argparse.Namespace) -> int:
    tree = _Target(args)
    job = tree.call("cancel", pool=args.pool, id=args.id)
    return tree.show(job, lambda: f"{args.pool}: job {job['id']} {job['state']}")


def _dead_letters(args: argparse.Namespace) -> int:
    tree = _Target(args)
    if args.requeue is not None:
        job = tree.call("requeue", pool=args.pool, id=args.requeue)
        return tree.show(
            job, lambda: f"{args.pool}: dead letter {args.requeue} queued again as job {job['id']}"
        )
    letters = msgspec.convert(tree.call("dead_letters", pool=args.pool), list[DeadLetter])
    return tree.show(letters, lambda: render_dead_letters(letters))


def _reload(args: argparse.Namespace) -> int:
    tree = _Target(args)
    summary: dict[str, list[str]] = tree.call("reload")

    def text() -> str:
        lines = [f"{what} {path}" for what, paths in summary.items() for path in paths]
        return "\n".join(lines) if lines else "reloaded: nothing changed"

    tree.show(summary, text)
    return EXIT_REFUSED if summary.get("failed") else 0


def _log_level(args: argparse.Namespace) -> int:
    tree = _Target(args)
    result = tree.call("log_level", level=args.level)
    return tree.show(result, lambda: f"log level {result['level']}")


def _stop_tree(args: argparse.Namespace) -> int:
    tree = _Target(args)
    tree.call("stop_tree")
    return tree.show(None, lambda: f"stopping the tree of {tree.state}")


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """Epoch seconds, ISO 8601 (local when naive), or an age: ``90s``, ``5m``, ``2h``, ``1d``."""
    match = _RELATIVE.fullmatch(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise _Usage(
            f"--since {text!r}: not a time (use e.g. 10m, 2h, 1d, 2026-11-22T09:00 or epoch seconds)"
        ) from None


def _events(args: argparse.Namespace) -> int:
    tree = _Target(args)
    since = parse_since(args.since, time.time()) if args.since else None
    wanted = EventFilter(path=(args.path or "").strip("/"), kind=args.kind or "", since=since)
    mark: LogMark | None = None
    live = None
    code = 0
    if args.follow:
        try:
            mark, live = subscribe(
                tree.socket,
                tree.state,
                timeout=tree.timeout,
                path=args.path or "",
                kind=args.kind or "",
                since=since,
            )
        except NoTree as error:
            print(f"otree: {error}", file=sys.stderr)
            code = EXIT_NO_TREE
    for item in read_events(tree.state, until=mark):
        if isinstance(item, str):
            print(f"otree: {item}", file=sys.stderr)
        elif wanted(item):
            _print_event(item, tree.json)
    if live is not None:
        for event in live:  # until the tree stops, or Ctrl-C (exit 0: the usual way to end a follow)
            _print_event(event, tree.json)
    return code


def _print_event(event: Event, as_json: bool) -> None:
    line = msgspec.json.encode(event).decode() if as_json else format_event(event, date=True)
    print(line, flush=True)


_MAX_TIMEOUT = 86400  # a day: far beyond any tree that answers at all


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= _MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a number of seconds above 0, at most {_MAX_TIMEOUT}"
        )
    return value


def _max_runtime(text: str) -> float:
    """``--max-runtime``'s seconds: a finite number above 0 (JSON has no infinity to lift a limit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise _Usage(f"--max-runtime {text!r}: give a number of seconds above 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of lines") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of lines, 0 or more")
    return value


class _Version(argparse.Action):
    """``--version``: looked up only when asked (reading the installed distributions takes time)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print otree's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from importlib import metadata

        names = sorted(set(metadata.packages_distributions().get(__package__ or "otree", [])))
        found = ", ".join(f"{metadata.version(name)} ({name})" for name in names)
        print(f"otree {found or 'version unknown: not installed as a distribution'}")
        parser.exit()


_TIMEOUT_HELP = (
    f"seconds to wait for the tree to take a request up (default {DEFAULT_TIMEOUT:g}); "
    "not for the wait that is the command's purpose"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otree", description="Erlang/OTP-style supervision trees on trio.")
    parser.add_argument("--version", action=_Version)
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS", help=_TIMEOUT_HELP
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run a tree file until SIGINT/SIGTERM")
    run.add_argument("file", metavar="FILE", help="a Python file holding a supervisor spec")
    run.add_argument("--attr", default="tree", help="the spec's name in the file (default: tree)")
    run.add_argument("--log-format", choices=("text", "json"), default="text", help="event lines on stderr")
    run.add_argument("--state-dir", default=None, help="logs and state (default: $OTREE_STATE_DIR)")
    run.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="the Ray cluster for otree.ray children and RayExecutor jobs: HOST:PORT of its head,"
        " 'auto', or 'local[:N]' for a local Ray of N nodes started for the tree (default:"
        " $OTREE_RAY_ADDRESS, else 'local')",
    )
    run.set_defaults(handler=_tree_command)
    check = commands.add_parser("check", help="validate a tree file and print the tree")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--attr", default="tree")
    check.set_defaults(handler=_tree_command)
    _add_control_commands(commands)
    logs = commands.add_parser("logs", help="print the end of a process child's log (and follow it with -f)")
    logs.add_argument("path", metavar="PATH")
    logs.add_argument("--follow", "-f", action="store_true", help="then print what is appended until Ctrl-C")
    logs.add_argument(
        "-n", "--lines", type=_count, default=10, metavar="N", help="the last N lines (default 10)"
    )
    logs.add_argument("--stderr", action="store_true", help="the stderr log instead of the stdout log")
    logs.add_argument("--state-dir", default=None, help="the tree's state dir (default: $OTREE_STATE_DIR)")
    logs.set_defaults(handler=_logs)
    return parser


def _add_control_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands that talk to a running tree (and ``events``, which reads its log too)."""

    def control(
        name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--state-dir", default=None, help="the tree's state dir (default: $OTREE_STATE_DIR)"
        )
        command.add_argument("--json", action="store_true", help="machine-readable output")
        # after the command too; SUPPRESS keeps a value given before it
        command.add_argument(
            "--timeout", type=_seconds, default=argparse.SUPPRESS, metavar="SECONDS", help=_TIMEOUT_HELP
        )
        command.set_defaults(handler=handler)
        return command

    control("status", "show the running tree", _status).add_argument("path", metavar="PATH", nargs="?")
    for name, done, help_text in (
        ("start", "started", "start a child unless it runs (wake or spawn)"),
        ("stop", "stopped", "stop a child and keep its spec"),
        ("restart", "restarted", "stop a child if it runs, then start it"),
        ("delete", "deleted", "forget a stopped child's spec"),
    ):
        command = control(name, help_text, _child_command)
        command.add_argument("path", metavar="PATH")
        command.set_defaults(done=done)
    submit = control("submit", "queue a job in a pool", _submit)
    submit.add_argument("pool", metavar="POOL")
    submit.add_argument("kind", metavar="KIND")
    submit.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--cost", type=float, default=0.0, help="estimated cost in USD")
    submit.add_argument("--key", default=None, help="idempotency key: the same key is not queued twice")
    submit.add_argument(
        "--max-runtime",
        metavar="SECONDS",
        default=None,
        help="seconds each attempt may run (overrides the kind's max_runtime)",
    )
    submit.add_argument(
        "--lane", default=None, help="the lane it runs in (lane_concurrency, lane_circuit_breaker)"
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="then wait for the job to end and print its result (no time limit)",
    )
    control("jobs", "list a pool's running and waiting jobs", _jobs).add_argument("pool", metavar="POOL")
    for name, help_text, handler in (
        ("job", "show a running, waiting or recently finished job", _job),
        ("cancel", "cancel a job: out of the queue, or stopped if it runs", _cancel),
    ):
        command = control(name, help_text, handler)
        command.add_argument("pool", metavar="POOL")
        command.add_argument("id", metavar="JOB_ID")
    lane = control("lane", "show one lane of a pool: its jobs, its circuit, what holds it", _lane)
    lane.add_argument("pool", metavar="POOL")
    lane.add_argument("lane", metavar="LANE")
    dead = control("dead-letters", "list a pool's dead letters", _dead_letters)
    dead.add_argument("pool", metavar="POOL")
    dead.add_argument("--requeue", metavar="ID", default=None, help="queue this dead letter again")
    events = control("events", "print the event log (and live events with --follow)", _events)
    events.add_argument("--follow", "-f", action="store_true", help="then print live events until Ctrl-C")
    events.add_argument("--path", default=None, help="only this child and what is below it")
    events.add_argument("--kind", default=None, help="only kinds matching this glob (e.g. 'child.*')")
    events.add_argument("--since", default=None, help="only events since T (10m, 2h, 1d, ISO time, epoch)")
    control("reload", "re-read the tree file and apply the changes", _reload)
    control("log-level", "show the running tree's log level, or set it", _log_level).add_argument(
        "level", metavar="LEVEL", nargs="?", default=None
    )
    control("stop-tree", "stop the whole tree in order (as SIGTERM)", _stop_tree)
    sender = control("signal", "send a signal to a process child's (or process job's) process group", _signal)
    sender.add_argument("path", metavar="PATH", help="a process child, or with --job the pool")
    sender.add_argument("signal", metavar="SIGNAL", help="a name (TERM, SIGUSR1, hup) or a number")
    sender.add_argument(
        "--job", metavar="JOB_ID", default=None, help="this running process job of the pool PATH"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``otree`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        code: int = args.handler(args)
    except _Usage as error:
        print(f"otree: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as error:
        print(f"otree: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:  # Ctrl-C ending a client command (`otree run` handles its own signals)
        return 0 if args.handler in (_events, _logs) else EXIT_INTERRUPTED
    except BrokenPipeError:  # `otree events | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    return code
