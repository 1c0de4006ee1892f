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
from ._echo import EventEcho
from ._loader import LoadError, load_tree
from ._output import OutputLosses, guard_output
from ._paths import control_socket, state_dir
from ._protocol import EXIT_REFUSED, EXIT_USAGE
from ._reaper import Reaper, adopt_orphans
from ._spec import Backoff, ChildSpec, ProcessSpec, RaySpec, SupervisorSpec

__all__ = ["tree_command"]

_log = logging.getLogger("otree")


def tree_command(args: argparse.Namespace) -> int:
    """``otree run FILE`` or ``otree check FILE``: load the tree file (exit 2 if it does not load)."""
    # `otree run` guards its streams before the tree file runs: its prints and handlers get them too
    losses = guard_output() if args.command == "run" else None
    try:
        tree = load_tree(args.file, args.attr)
    except LoadError as error:
        print(f"otree: {error}", file=sys.stderr)
        return EXIT_USAGE
    if losses is None:  # check
        _print_tree(tree, 0, sys.stdout)
        return 0
    return _run(args, tree, losses)


def _run(args: argparse.Namespace, tree: SupervisorSpec, losses: OutputLosses) -> int:
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
    echo = EventEcho(sys.stderr, args.log_format)
    _log.addHandler(echo)
    _log.setLevel(logging.INFO)

    # `otree run` owns its process: orphans of its children come to it and are reaped.
    adopt_orphans()
    Reaper.reap_all = True
    daemon = Daemon(args.file, args.attr, tree, state, echo=echo, losses=losses)
    try:
        # the state dir is always set under `otree run`, so pools are durable by default
        failure = trio.run(daemon.serve)
    finally:
        _log.removeHandler(echo)
        echo.close()
        os.close(lock)
    if daemon.exit_code:
        return daemon.exit_code
    if failure is not None:
        print(f"otree: {type(failure).__name__}: {failure}", file=sys.stderr)
        return 1
    return 0


# Shown on every line, or in a form of their own (a child's code and children are not settings).
_NOT_SETTINGS = frozenset(
    {
        "id",
        "restart",
        "shutdown",
        "strategy",
        "max_restarts",
        "max_seconds",
        "fn",
        "args",
        "children",
        "handlers",
        "argv",
        "spec",
    }
)


# Control characters in an argv (a script passed with -c) shown escaped, so a child stays one line.
_ESCAPED = {code: repr(chr(code))[1:-1] for code in (*range(32), 127)}


def _describe(spec: ChildSpec) -> str:
    """One line: id, kind, restart, shutdown, a supervisor's intensity, a process's argv, then
    every other setting that is not its default (``otree check`` shows what the file says)."""
    fields = [spec.id, spec.kind, f"restart={spec.restart}", f"shutdown={spec.shutdown}"]
    if isinstance(spec, SupervisorSpec):
        fields += [
            f"strategy={spec.strategy}",
            f"max_restarts={spec.max_restarts}",
            f"max_seconds={spec.max_seconds:g}",
        ]
    elif isinstance(spec, ProcessSpec):
        fields.append(f"argv={shlex.join(spec.argv).translate(_ESCAPED)}")
    names = type(spec).__struct_fields__
    defaults = type(spec).__struct_defaults__  # those of the last fields (specs have no factories)
    for name, default in zip(
        names, (msgspec.NODEFAULT,) * (len(names) - len(defaults)) + defaults, strict=True
    ):
        value = getattr(spec, name)
        if name not in _NOT_SETTINGS and value != default:
            fields.append(name if value is True else f"{name}={_shown(name, value)}")
    return "  ".join(fields)


def _shown(name: str, value: object) -> str:
    """A setting's value in one word: seconds as ``%g``, lists joined, code by name, the
    environment by its names only (its values may be secrets)."""
    if isinstance(value, Backoff):
        if value.delays:
            return "[" + ",".join(f"{delay:g}" for delay in value.delays) + "]s"
        return f"{value.initial:g}..{value.maximum:g}s"
    if isinstance(value, msgspec.Struct):
        return ",".join(f"{key}={_shown(key, item)}" for key, item in msgspec.structs.asdict(value).items())
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        if name == "env":
            return ",".join(value)
        return ",".join(f"{key}:{_shown(key, item)}" for key, item in value.items())
    if isinstance(value, (tuple, list)):
        return ",".join(_shown(name, item) for item in value)
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return str(value)


def _print_tree(spec: ChildSpec, depth: int, out: TextIO) -> None:
    line = _describe(spec)
    if isinstance(spec, RaySpec):  # then what runs in the actor (same id and path), its children below
        line += "  |  " + _describe(spec.spec).split("  ", 1)[1]
        spec = spec.spec
    out.write("  " * depth + line + "\n")
    if isinstance(spec, SupervisorSpec):
        for child in spec.children:
            _print_tree(child, depth + 1, out)
