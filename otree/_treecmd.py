"""The ``otree`` commands that load a tree file: ``run`` (serve it) and ``check`` (print it).

Apart from ``_cli`` so that the commands talking to a running tree never import
the runtime (trio, the supervisor, the pool).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import TextIO

import msgspec
import trio

from ._control import prepare_socket_dir
from ._daemon import Daemon, StateLocked, lock_state
from ._loader import LoadError, load_tree
from ._paths import control_socket, state_dir
from ._protocol import EXIT_REFUSED, EXIT_USAGE
from ._reaper import Reaper, adopt_orphans
from ._render import format_event
from ._spec import ChildSpec, ProcessSpec, SupervisorSpec

__all__ = ["tree_command"]

_log = logging.getLogger("otree")


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


def tree_command(args: argparse.Namespace) -> int:
    """``otree run FILE`` or ``otree check FILE``: load the tree file (exit 2 if it does not load)."""
    try:
        tree = load_tree(args.file, args.attr)
    except LoadError as error:
        print(f"otree: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check":
        _print_tree(tree, 0, sys.stdout)
        return 0
    return _run(args, tree)


def _run(args: argparse.Namespace, tree: SupervisorSpec) -> int:
    """Serve ``tree`` until it ends or is stopped."""
    state = state_dir(args.state_dir)
    try:
        lock = lock_state(state)
    except StateLocked as locked:
        print(f"otree: {locked}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as error:
        print(f"otree: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    try:  # before the tree starts: a socket that cannot be served is a setup error, not a crash
        prepare_socket_dir(control_socket(state))
    except OSError as error:
        os.close(lock)
        print(f"otree: cannot serve the control socket: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    handler = _EventHandler(sys.stderr, args.log_format)
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)

    def set_level(name: str) -> None:
        level = logging.getLevelName(name.upper())
        if not isinstance(level, int) or level == logging.NOTSET:  # NOTSET would defer to the root logger
            raise ValueError(f"unknown log level {name!r} (use DEBUG, INFO, WARNING, ERROR or CRITICAL)")
        _log.setLevel(level)
        handler.setLevel(level)

    # `otree run` owns its process: orphans of its children come to it and are reaped.
    adopt_orphans()
    Reaper.reap_all = True
    daemon = Daemon(args.file, args.attr, tree, state, set_level)
    try:
        # the state dir is always set under `otree run`, so pools are durable by default
        failure = trio.run(daemon.serve)
    finally:
        _log.removeHandler(handler)
        os.close(lock)
    if daemon.exit_code:
        return daemon.exit_code
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
        if spec.user is not None:
            fields.append(f"user={spec.user}")
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
