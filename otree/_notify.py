"""Where the sd_notify sockets of process children live, and who may reach them.

Each tree keeps its children's sockets in a directory of its own, created on
first use and held with an ``flock`` while the tree lives; a tree that makes one
removes every directory of the same kind whose lock it can take, whatever pid
its name holds: its owner is gone (a ``kill -9``). The lock, unlike a pid, means
the same thing in every pid namespace. Sockets of children that run as otree's
user go in a 0700 directory of the runtime dir. A child running as another user
cannot enter that, so its socket goes in a 0711 directory of the temp dir, owned
by otree (the child can reach a socket it knows the name of, and can neither
list nor replace anything there), and the socket itself is given to the child's
user.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from ._paths import check_private_dir, runtime_dir

__all__ = ["NotifySockets"]

_LOCK = ".lock"


class _SocketDir:
    """One locked directory of sockets, made (again, if something removed it) on demand.

    ``kind`` starts the name of every directory of its kind (``notify-``); this
    process's own are named ``<kind><pid>-<random>``.
    """

    def __init__(self, parent: Path, kind: str, mode: int) -> None:
        self.parent = parent
        self.kind = kind
        self.mode = mode
        self.path: Path | None = None
        self.text = ""  # the path as a string, once made
        self._lock = -1

    def ensure(self) -> Path:
        if self.path is not None and self.path.is_dir():
            return self.path
        self.close()
        _remove_abandoned(self.parent, self.kind)
        while True:
            path = Path(tempfile.mkdtemp(prefix=f"{self.kind}{os.getpid()}-", dir=self.parent))
            os.chmod(path, self.mode)
            lock = os.open(path / _LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _still_at(lock, path / _LOCK):
                break
            # another tree took it for abandoned between its making and our lock, and removed it
            os.close(lock)
        self._lock, self.path, self.text = lock, path, os.fspath(path)
        return path

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path, self.text = None, ""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _still_at(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = path.lstat()
    except OSError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _remove_abandoned(parent: Path, kind: str) -> None:
    """Remove the socket directories, of any otree process, whose owner died without cleaning up.

    The lock is held while the directory is removed, so a tree making that very
    directory at this moment sees, once it has the lock, that it is gone.
    """
    for directory in parent.glob(kind + "*"):
        try:
            info = directory.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue  # not ours to judge
            lock = os.open(directory / _LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or being made right now (no lock file yet)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(directory, ignore_errors=True)
        except BlockingIOError:
            continue  # its tree is alive
        finally:
            os.close(lock)


class NotifySockets:
    """The notify sockets of one tree's process children."""

    def __init__(self) -> None:
        self._own: _SocketDir | None = None  # children running as otree's user
        self._shared: _SocketDir | None = None  # children running as another user
        self._count = 0

    def bind(self, sock: socket.socket, owner: tuple[int, int] | None) -> str:
        """Bind ``sock`` to a fresh path that only otree and the child's user (``owner``) can reach.

        Raises:
          OSError: the runtime dir is not private, or the socket cannot be made.
        """
        if owner is None:
            if self._own is None:
                self._own = _SocketDir(check_private_dir(runtime_dir()), "notify-", 0o700)
            directory = self._own
        else:
            if self._shared is None:
                self._shared = _SocketDir(Path(tempfile.gettempdir()), "otree-notify-", 0o711)
            directory = self._shared
        self._count += 1
        name = f"{self._count}.sock"  # short: sun_path is 108 bytes
        where = directory.text or os.fspath(directory.ensure())
        try:
            sock.bind(f"{where}/{name}")
        except FileNotFoundError:  # its directory was removed meanwhile (a temp cleaner): made again
            where = os.fspath(directory.ensure())
            sock.bind(f"{where}/{name}")
        path = f"{where}/{name}"
        # nobody else can write in these directories: the path cannot be swapped under us
        os.chmod(path, 0o600)
        if owner is not None:
            os.chown(path, *owner, follow_symlinks=False)
        return path

    def release(self, path: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    def close(self) -> None:
        for directory in (self._own, self._shared):
            if directory is not None:
                directory.close()
