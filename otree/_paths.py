"""Where otree keeps its files: the only importer of platformdirs.

The state dir holds per-child logs (and later the event log and the pool's
database); ``--state-dir`` or ``OTREE_STATE_DIR`` overrides it. Directories are
created 0700: a tree's logs are its owner's business.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["child_log_dir", "ensure_private_dir", "pool_database", "state_dir"]


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The state dir: ``override``, else ``$OTREE_STATE_DIR``, else the platform's user state dir."""
    chosen = override or os.environ.get("OTREE_STATE_DIR")
    return Path(chosen).absolute() if chosen else platformdirs.user_state_path("otree")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents with mode 0700; return it."""
    if not path.is_dir():
        ensure_private_dir(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def child_log_dir(state: Path, child_path: str) -> Path:
    """``<state dir>/logs/<child path as nested folders>``."""
    return state.joinpath("logs", *child_path.split("/"))


def pool_database(state: Path, pool_path: str) -> Path:
    """``<state dir>/pools/<pool path>.sqlite3``."""
    *parents, name = pool_path.split("/")
    return state.joinpath("pools", *parents, f"{name}.sqlite3")
