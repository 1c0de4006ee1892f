"""Where otree keeps its files: the only importer of platformdirs.

The state dir holds per-child logs, the event log, the pools' databases and the
lock of the tree running on it; ``--state-dir`` or ``OTREE_STATE_DIR`` overrides
it. The runtime dir holds the control sockets; ``OTREE_RUNTIME_DIR`` overrides it.
Directories are created 0700: a tree's files are its owner's business.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import warnings
from pathlib import Path

import platformdirs

__all__ = [
    "ID_PATTERN",
    "check_private_dir",
    "check_state_dir",
    "child_log_dir",
    "control_socket",
    "ensure_private_dir",
    "lock_file",
    "pool_database",
    "runtime_dir",
    "state_dir",
]


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


# A child's id; also a folder name under ``logs/`` (so never ``.`` nor ``..``, nor with a slash).
ID_PATTERN = "[A-Za-z0-9][A-Za-z0-9_.-]*"


def child_log_dir(state: Path, child_path: str) -> Path:
    """``<state dir>/logs/<child path as nested folders>``."""
    return state.joinpath("logs", *child_path.split("/"))


def pool_database(state: Path, pool_path: str) -> Path:
    """``<state dir>/pools/<pool path>.sqlite3``."""
    *parents, name = pool_path.split("/")
    return state.joinpath("pools", *parents, f"{name}.sqlite3")


def runtime_dir() -> Path:
    """``$OTREE_RUNTIME_DIR``, else the user runtime dir if it can exist, else a private temp dir."""
    chosen = os.environ.get("OTREE_RUNTIME_DIR")
    if chosen:
        return Path(chosen).absolute()
    fallback = Path(tempfile.gettempdir()) / f"otree-{os.getuid()}"
    with warnings.catch_warnings():  # no XDG_RUNTIME_DIR (no login session): its /tmp fallback is fine
        warnings.simplefilter("ignore")
        try:
            path = platformdirs.user_runtime_path("otree")
        except OSError:  # platformdirs could not make its own /tmp fallback
            return fallback
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing == path or os.access(existing, os.W_OK | os.X_OK):
        return path
    return fallback  # one we could not create (e.g. no /run/user/<uid> for this user)


def control_socket(state: Path) -> Path:
    """``<runtime dir>/otree-<first 12 hex of sha256(state dir)>.sock``: one socket per state dir.

    The state dir is resolved first, so a path through a symlink names the same tree.
    """
    digest = hashlib.sha256(os.fsencode(state.resolve())).hexdigest()[:12]
    return runtime_dir() / f"otree-{digest}.sock"


def lock_file(state: Path) -> Path:
    """The lock held by the tree running on ``state`` (it holds that tree's pid)."""
    return state / "otree.lock"


def _check_owned_dir(directory: Path, forbidden: int, what: str, problem: str) -> Path:
    """Create ``directory`` 0700 if missing; refuse it unless it is otree's and has no ``forbidden`` bits."""
    ensure_private_dir(directory)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & forbidden:
        raise OSError(
            errno.EPERM,
            f"{what} {directory} is {problem} (owner uid {info.st_uid}, mode {info.st_mode & 0o777:o})",
        )
    return directory


def check_private_dir(directory: Path) -> Path:
    """Create ``directory`` 0700 if missing; refuse it if another user could reach it.

    Raises:
      OSError: it is not a directory of otree's user with no group or other bits
        (e.g. a pre-made ``/tmp/otree-<uid>``, or systemd's ``RuntimeDirectoryMode=0755``).
    """
    return _check_owned_dir(directory, 0o077, "runtime dir", "not private")


def check_state_dir(directory: Path) -> Path:
    """Create ``directory`` 0700 if missing; refuse it if another user could plant files in it.

    otree writes its lock, event log, logs and databases there, as whatever user it
    runs as: a directory others can write in would let them swap those for symlinks.

    Raises:
      OSError: it is not a directory of otree's user, or group or others may write in it.
    """
    return _check_owned_dir(directory, 0o022, "state dir", "open to others")
