"""The ``otree`` command: parses argv and calls the public API.

Exit codes: 0 clean stop; 1 the root gave up (or failed to start);
2 usage error, bad tree file, missing tree attribute or spec error.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import msgspec
import trio

from ._errors import OtreeError
from ._events import Event
from ._loader import LoadError, load_tree
from ._paths import state_dir
from ._reaper import Reaper, adopt_orphans
from ._spec import ChildSpec, ProcessSpec, SupervisorSpec
from ._supervisor import run

__all__ = ["main"]

_log = logging.getLogger("otree")
# Details that the one-line text form leaves out (``detail`` already says Type: message).
_VERBOSE = frozenset({"detail", "exception", "message", "traceback"})


def format_event(event: Event) -> str:
    """One line: time, path, kind, reason, then the detail and other plain details."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{int(event.time % 1 * 1000):03d}"
    parts = [stamp, event.path, event.kind]
    if event.reason:
        parts.append(event.reason)
    detail = event.details.get("detail")
    if detail:
        parts.append(str(detail))
    parts.extend(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in event.details.items()
        if key not in _VERBOSE
    )
    return " ".join(parts).replace("\n", " ")


class _EventHandler(logging.Handler):
    """Prints every otree event record as one line (text) or one JSON object."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.json = fmt == "json"

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "otree_event", None)
        if event is None:
            line = record.getMessage()
        elif self.json:
            line = msgspec.json.encode(event).decode()
        else:
            line = format_event(event)
        self.stream.write(line + "\n")
        self.stream.flush()


async def _watch_signals(path: str, scope: trio.CancelScope) -> None:
    """On SIGINT/SIGTERM: say so (as an event, so --log-format json stays JSON) and stop the tree."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            event = Event(time.time(), path, "tree.signal", signal.Signals(signum).name, {"action": "stop"})
            _log.info("%s %s %s", path, event.kind, event.reason, extra={"otree_event": event})
            scope.cancel()
            return


async def _serve(tree: SupervisorSpec, state: str) -> OtreeError | None:
    """Run ``tree`` until it ends or SIGINT/SIGTERM arrives (even mid-start); its error, if any."""
    outcome: OtreeError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, tree.id, nursery.cancel_scope)
        try:
            await run(tree, state_dir=state)
        except OtreeError as error:
            outcome = error
        nursery.cancel_scope.cancel()
    return outcome


def _run(args: argparse.Namespace) -> int:
    tree = load_tree(args.file, args.attr)
    handler = _EventHandler(sys.stderr, args.log_format)
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    # `otree run` owns its process: orphans of its children come to it and are reaped.
    adopt_orphans()
    Reaper.reap_all = True
    try:
        # the state dir is always set under `otree run`, so pools are durable by default
        failure = trio.run(_serve, tree, str(state_dir(args.state_dir)))
    finally:
        _log.removeHandler(handler)
    if failure is not None:
        print(f"otree: {type(failure).__name__}: {failure}", file=sys.stderr)
        return 1
    return 0


def _describe(spec: ChildSpec) -> str:
    fields = [spec.id, spec.kind, f"restart={spec.restart}", f"shutdown={spec.shutdown}"]
    if isinstance(spec, SupervisorSpec):
        fields += [
            f"strategy={spec.strategy}",
            f"max_restarts={spec.max_restarts}",
            f"max_seconds={spec.max_seconds:g}",
        ]
        if spec.max_children is not None:
            fields.append(f"max_children={spec.max_children}")
        if spec.auto_shutdown != "never":
            fields.append(f"auto_shutdown={spec.auto_shutdown}")
        if spec.backoff is not None:
            fields.append(f"backoff={spec.backoff.initial:g}..{spec.backoff.maximum:g}s")
    elif isinstance(spec, ProcessSpec):
        fields += [f"ready={spec.ready}", f"argv={shlex.join(spec.argv)}"]
        if spec.stall_timeout is not None:
            fields.append(f"stall_timeout={spec.stall_timeout:g}")
    if spec.significant:
        fields.append("significant")
    return "  ".join(fields)


def _print_tree(spec: ChildSpec, depth: int, out: TextIO) -> None:
    out.write("  " * depth + _describe(spec) + "\n")
    if isinstance(spec, SupervisorSpec):
        for child in spec.children:
            _print_tree(child, depth + 1, out)


def _check(args: argparse.Namespace) -> int:
    _print_tree(load_tree(args.file, args.attr), 0, sys.stdout)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otree", description="Erlang/OTP-style supervision trees on trio.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run a tree file until SIGINT/SIGTERM")
    run.add_argument("file", metavar="FILE", help="a Python file holding a supervisor spec")
    run.add_argument("--attr", default="tree", help="the spec's name in the file (default: tree)")
    run.add_argument("--log-format", choices=("text", "json"), default="text", help="event lines on stderr")
    run.add_argument("--state-dir", default=None, help="logs and state (default: $OTREE_STATE_DIR)")
    run.set_defaults(handler=_run)
    check = commands.add_parser("check", help="validate a tree file and print the tree")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--attr", default="tree")
    check.set_defaults(handler=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``otree`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        code: int = args.handler(args)
    except LoadError as error:
        print(f"otree: {error}", file=sys.stderr)
        return 2
    return code
