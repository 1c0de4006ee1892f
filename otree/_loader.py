"""Loading a tree file by path; every failure is one line naming the file (and line)."""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from pathlib import Path

from ._spec import SupervisorSpec

__all__ = ["MODULE_PREFIX", "LoadError", "load_tree"]

# A tree file is imported as a module of this name prefix (and the file's stem).
MODULE_PREFIX = "otree_tree_"


class LoadError(Exception):
    """A tree file could not be loaded; the message is the one line to show."""


def _location(shown: str, resolved: Path, exc: BaseException) -> str:
    """``file:line`` of the deepest frame of the tree file in ``exc``'s traceback."""
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        return f"{shown}:{exc.lineno}"
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename and Path(frame.filename).resolve() == resolved:
            line = frame.lineno
    return f"{shown}:{line}" if line is not None else shown


def load_tree(path: str, attr: str = "tree") -> SupervisorSpec:
    """Import the file at ``path`` as a module and return its supervisor spec ``attr``.

    The file's directory goes first on ``sys.path``, as for ``python FILE``, so a
    tree can import the modules beside it.

    Raises:
      LoadError: the file is missing (or a directory), fails to import, or holds no tree.
    """
    resolved = Path(path).resolve()
    if resolved.is_dir():
        raise LoadError(f"{path}: is a directory; give the tree file in it (e.g. {Path(path) / 'tree.py'})")
    if not resolved.is_file():
        raise LoadError(f"{path}: no such file")
    name = MODULE_PREFIX + "".join(c if c.isalnum() else "_" for c in resolved.stem)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise LoadError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    directory = os.fspath(resolved.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, KeyboardInterrupt):
            raise  # SystemExit is the file's error (it must not end a running tree on reload)
        message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise LoadError(f"{_location(path, resolved, exc)}: {type(exc).__name__}: {message}") from exc
    try:
        tree = getattr(module, attr)
    except AttributeError:
        raise LoadError(
            f"{path}: no tree: the module has no attribute {attr!r} (pick one with --attr)"
        ) from None
    if not isinstance(tree, SupervisorSpec):
        raise LoadError(
            f"{path}: {attr} is a {type(tree).__name__}, not a supervisor spec (use otree.supervisor)"
        )
    return tree
