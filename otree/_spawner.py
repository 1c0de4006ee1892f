"""Spawning process children from a small helper process that also guards them.

Forking otree itself costs time in proportion to otree's memory (the page tables
are copied), and a parent-death signal needs code between fork and exec, which
makes CPython fork rather than vfork. So otree forks no child itself: a helper,
``python -I`` with a few modules loaded, receives each request over a socket
(the child's argv, env, cwd, limits and user, its stdio as file descriptors) and
clones the child with ``CLONE_PARENT``. The child's parent is therefore otree,
not the helper: otree waits for it with a pidfd and reads its exit status as
for any child it forked, and a death of the helper leaves the fleet untouched.

Between clone and exec the child writes its pid to a report pipe that only
otree reads, starts its own session, takes its stdio, enters its cwd, sets its
limits, groups and user, then ``PR_SET_PDEATHSIG(SIGKILL)`` (after the user: the
kernel clears it when credentials change); a failure is written as the stage and
errno and the child exits. The exec closes the pipe (close-on-exec), so otree
reads the pid, then end of file (a running child) or an error (a failed spawn).

The helper is also the guard: it records each child's process group as the clone
returns, before it reads its next message, so a SIGKILL of otree (its socket
closes) never finds a child it does not know. It then SIGKILLs every recorded
group that still has members. A keeper thread in otree waits on the helper's
pidfd and replaces a dead helper at once with one that has every group as its
arguments; the same thread starts every helper, so the children's parent-death
signal is tied to a thread that lives as long as the tree.
"""

from __future__ import annotations

import array
import contextlib
import marshal
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import trio

from ._reaper import REAP_LOCK, Reaper
from ._spec import RLIMITS

__all__ = ["Child", "ChildSetup", "Spawner"]


class ChildSetup(NamedTuple):
    """What a child sets up between clone and exec, besides dying with otree."""

    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard)
    user: tuple[int, int, tuple[int, ...]] | None = None  # (uid, gid, supplementary groups)


class Child:
    """A spawned process: otree is its parent, so it reaps it (``wait``) once it has exited."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        """Reap it (blocking): its exit code, or minus the signal that killed it, as ``Popen``."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


# --- the helper -------------------------------------------------------------------------------

# Messages on its stdin (a SOCK_SEQPACKET socket): b"S" + a marshalled request, with the report
# pipe's write end and the child's stdin, stdout and stderr as SCM_RIGHTS (and a memfd holding
# the request when it is too big for one message); or b"+pgid" words (groups a replaced helper
# missed). It watches each group's leader with a pidfd: when the leader exits, whatever is left
# of its group is killed (as otree does) and the group is taken off the list, so otree sends
# nothing when a child exits. End of file: otree is gone, kill every group that still has members.
_HELPER = r"""
import ctypes, marshal, os, resource, select, signal, socket, sys
OTREE = os.getppid()
libc = ctypes.CDLL(None, use_errno=True)
CLONE_PARENT = 0x8000
LEGACY_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220}.get(os.uname().machine)
clone_args = (ctypes.c_uint64 * 8)(CLONE_PARENT)  # struct clone_args, version 0; exit_signal 0: otree's
use_clone3 = True
channel = socket.socket(fileno=0)
events = select.epoll()
events.register(channel.fileno(), select.EPOLLIN)
leaders = {}  # pidfd of a group's leader: the group

def watch(pgid):
    try:
        fd = os.pidfd_open(pgid)
    except OSError:  # reaped already: otree killed its group first
        return
    leaders[fd] = pgid
    events.register(fd, select.EPOLLIN)

def ended(fd):
    pgid = leaders.pop(fd)
    events.unregister(fd)
    os.close(fd)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass

def clone():
    global use_clone3
    if use_clone3:
        pid = libc.syscall(435, clone_args, ctypes.sizeof(clone_args))
        if pid >= 0 or ctypes.get_errno() != 38 or LEGACY_CLONE is None:  # 38: ENOSYS (a seccomp filter)
            return pid
        use_clone3 = False
    return libc.syscall(LEGACY_CLONE, CLONE_PARENT | signal.SIGCHLD, 0, 0, 0, 0)

def child(report, stdio, request):
    stage = "setsid"
    try:
        os.write(report, b"%d\n" % os.getpid())
        candidates, argv, env, cwd, rlimits, user = request
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.closerange(3, report)
        os.closerange(report + 1, 1 << 20)
        stage = "cwd"
        if cwd is not None:
            os.chdir(cwd)
        for index, (which, soft, hard) in enumerate(rlimits):
            stage = "rlimit %d" % index
            resource.setrlimit(which, (soft, hard))
        if user is not None:
            stage = "user"
            uid, gid, supplementary = user
            os.setgroups(supplementary)
            os.setgid(gid)
            os.setuid(uid)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # ignored by Python, not by the program
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != OTREE:  # otree died before the flag was set
            os._exit(127)
        stage = "exec"
        first = 0
        for path in candidates:
            try:
                os.execve(path, argv, env)
            except OSError as error:
                if error.errno not in (2, 20) and not first:  # the first error besides ENOENT, ENOTDIR
                    first = error.errno
                last = error.errno
        os.write(report, b"E%s %d\n" % (stage.encode(), first or last))
    except OSError as error:
        os.write(report, b"E%s %d\n" % (stage.encode(), error.errno or 22))
    except BaseException:
        os.write(report, b"E%s 22\n" % stage.encode())  # EINVAL: a request this helper cannot carry out
    finally:
        os._exit(255)

def spawn(body, fds):
    report = fds[0]
    try:
        if len(fds) == 5:  # the request did not fit in a message
            with os.fdopen(fds.pop(), "rb") as big:
                body = big.read()
        request = marshal.loads(body)
        stdio = fds[1:4]
    except Exception:
        os.write(report, b"Erequest 22\n")
        return
    # the child tries only the programs that exist (if any does): each failed exec costs it time
    request[0] = [path for path in request[0] if os.access(path, os.X_OK)] or request[0]
    pid = clone()
    if pid == 0:
        child(report, stdio, request)
    elif pid > 0:
        watch(pid)  # before this process can read that otree is gone, and before otree can reap it
        os.write(report, b"%d\n" % pid)
    else:
        os.write(report, b"Eclone %d\n" % ctypes.get_errno())

def serve():
    room = socket.CMSG_SPACE(5 * 4)
    while True:
        for fd, _ in events.poll():
            if fd in leaders:
                ended(fd)
                continue
            message, ancillary, _, _ = channel.recvmsg(65536, room, socket.MSG_CMSG_CLOEXEC)
            fds = []
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, len(data), 4))
            if not message and not fds:
                return
            try:
                if message[:1] == b"S" and len(fds) >= 4:
                    spawn(message[1:], fds)
                else:
                    for word in message.split():
                        if word[:1] == b"+" and int(word[1:]) not in leaders.values():
                            watch(int(word[1:]))
            finally:  # the report pipe last: otree sees its end only once this holds nothing of the child's
                for fd in reversed(fds):
                    os.close(fd)

for word in sys.argv[1:]:
    watch(int(word))
try:
    serve()
except OSError:
    pass
for fd, _ in events.poll(0):  # leaders that exited meanwhile: their groups are done
    if fd in leaders:
        ended(fd)
for pgid in leaders.values():
    try:
        os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""

MESSAGE_LIMIT = 32768  # a larger request goes in a memfd (the helper reads 64 KiB messages)
HELPER_EXIT_SECONDS = 5.0  # how long a clean stop waits for the helper to exit before killing it
HELPER_RETRY_SECONDS = 1.0  # how soon the keeper tries again when no helper could be started
HELPER_WAIT_SECONDS = 10.0  # how long a spawn waits for a helper to replace a dead one
SEARCH_CACHE = 256  # (program, $PATH) pairs whose search paths are kept
WEDGED_SECONDS = 10.0  # a helper that clones nothing this long after a request is replaced


class _Report:
    """The pipe a spawned child (and the helper) writes its pid and any failure to."""

    __slots__ = ("data", "fd", "pid")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = b""
        self.pid: int | None = None

    def read(self) -> bool:
        """Read what is there; True at end of file."""
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                return False
            if not chunk:
                return True
            self.data += chunk
            if self.pid is None:
                first = self.data.split(b"\n", 1)[0]
                if first.isdigit() and self.data.count(b"\n"):
                    self.pid = int(first)

    def failure(self) -> tuple[str, int] | None:
        """``(stage, errno)`` of a failed spawn, or None."""
        for line in self.data.split(b"\n"):
            if line.startswith(b"E"):
                stage, _, number = line[1:].decode().rpartition(" ")
                return stage, int(number)
        return None


class Spawner:
    """Spawns process children through the helper, keeps it alive, and keeps its list of groups.

    A child's pid goes into the reaper's ``waited`` and ``groups`` as soon as it is known,
    and before any orphan sweep can see the child exit (every sweep ``collect``s first);
    the helper is in ``waited`` too: the keeper reaps it.
    """

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        reaper.collect = self.collect
        self._groups: set[int] = set()
        self._lock = threading.Lock()  # what otree lists and what the helper was told stay the same
        self._closing = False
        self._reports: set[_Report] = set()  # spawns whose pid may not be read yet
        self._searched: dict[tuple[str, str | None], list[str]] = {}  # (program, $PATH): where to look
        self._token = trio.lowlevel.current_trio_token()
        self._replaced = trio.Event()  # set (and made anew) whenever a new helper starts
        self.generation = 0
        self.channel, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel.setblocking(False)
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._keeper = threading.Thread(target=self._keep, args=(far,), name="otree-spawner", daemon=True)
        self._keeper.start()

    # --- the helper's life (keeper thread) ---

    def _start(self, far: socket.socket) -> None:
        """Start a helper reading ``far`` (under REAP_LOCK: otree waits for it, the reaper must not)."""
        # Its own session: a Ctrl-C to otree's terminal must not reach it first.
        with far:
            proc = subprocess.Popen(
                # -S: no site, so it starts sooner and has less memory to copy at each clone
                [sys.executable, "-I", "-S", "-c", _HELPER, *map(str, sorted(self._groups))],
                stdin=far.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        self._reaper.waited.add(proc.pid)
        self._proc, self._pidfd = proc, os.pidfd_open(proc.pid)

    def _keep(self, far: socket.socket | None) -> None:
        """The keeper thread: start the helper, and replace it the moment it dies, until ``close``.

        Every helper is forked here, so every child's parent-death signal follows this thread,
        which lives as long as the tree (Linux sends it when the forking *thread* exits).
        """
        while True:
            with REAP_LOCK, self._lock:
                if self._closing:
                    return
                self._release()
                near: socket.socket | None = None
                if far is None:
                    near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    near.setblocking(False)
                try:
                    self._start(far)
                except OSError:  # no process can be started right now: try again shortly
                    if near is not None:
                        near.close()
                else:
                    old = None
                    if near is not None:  # a request sent to the old channel finds its helper gone
                        old, self.channel = self.channel, near
                    self.generation += 1
                    with contextlib.suppress(trio.RunFinishedError):
                        self._token.run_sync_soon(self._announce, old)
                far = None
            if self._proc is None:
                time.sleep(HELPER_RETRY_SECONDS)
                continue
            waiter = select.poll()
            waiter.register(self._pidfd, select.POLLIN)
            waiter.poll()  # the pidfd is readable once the helper has exited

    def _announce(self, old: socket.socket | None) -> None:
        """In trio: close the dead helper's channel, wake the spawns that wait for a new helper."""
        if old is not None:
            trio.lowlevel.notify_closing(old)
            old.close()
        self._replaced.set()
        self._replaced = trio.Event()

    def _release(self) -> None:
        """Reap the helper (it has exited) and stop waiting for it."""
        if self._proc is not None:
            self._proc.wait()
            os.close(self._pidfd)
            self._reaper.waited.discard(self._proc.pid)
            self._proc, self._pidfd = None, -1

    # --- groups ---

    def _tell(self, line: str) -> None:
        """Send a group message (under ``_lock``), never waiting: a helper whose queue is full is
        replaced, and its replacement gets every group as its arguments."""
        try:
            self.channel.send(f"{line}\n".encode(), socket.MSG_NOSIGNAL)
        except BlockingIOError:
            if self._proc is not None:
                self._proc.kill()
        except OSError:  # a dead helper: the keeper's replacement gets every group
            pass

    def _replace(self, generation: int) -> None:
        """The helper of ``generation`` is wedged (stopped, say): kill it; the keeper replaces it."""
        with self._lock:
            if self.generation == generation and self._proc is not None:
                self._proc.kill()

    def forget(self, pgid: int) -> None:
        """Its leader is reaped: a replacement helper need not know the group (this one saw it end)."""
        with self._lock:
            self._groups.discard(pgid)

    def _known(self, pid: int, generation: int) -> None:
        """A child's pid has been read: list its group (tell a helper that did not clone it)."""
        with self._lock:
            self._groups.add(pid)
            if self.generation != generation:
                self._tell(f"+{pid}")

    # --- spawning ---

    def collect(self) -> None:
        """Register the pids already written by children being spawned (before an orphan sweep)."""
        for report in self._reports:
            if report.pid is None:
                report.read()
                if report.pid is not None:
                    self._register(report.pid)

    def _register(self, pid: int) -> None:
        self._reaper.waited.add(pid)
        self._reaper.groups.add(pid)

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None = None,
        stdio: tuple[int | None, int | None, int | None] = (None, None, None),
        setup: ChildSetup = ChildSetup(),  # noqa: B008 - an immutable NamedTuple
    ) -> Child:
        """Start ``argv`` (never through a shell) in a new session; return once it runs.

        ``stdio``: a file descriptor for each of stdin, stdout, stderr, ``subprocess.DEVNULL``,
        or None for otree's own. Raises OSError (naming the path, cwd, limit or user that
        was refused) if it could not start; nothing of it is left then.
        """
        candidates = self._candidates(argv[0], env.get("PATH"))
        environment = env if type(env) is dict else dict(env)
        body = marshal.dumps(
            [candidates, list(argv), environment, cwd, [list(limit) for limit in setup.rlimits], setup.user]
        )
        fds = [self._stdio(fd, target) for target, fd in enumerate(stdio)]
        # every wait of a spawn is shielded: a spawn in flight finishes; the caller then owns the child
        deadline = trio.current_time() + HELPER_WAIT_SECONDS
        while True:
            generation = self.generation
            report = await self._request(body, fds)
            if report.pid is not None or report.failure() is not None:
                break
            # nothing written: the helper died before it cloned; its replacement takes the request
            with trio.CancelScope(deadline=deadline, shield=True):
                while self.generation == generation:
                    await self._replaced.wait()
            if self.generation == generation:
                raise OSError(11, "no spawn helper could be started", argv[0])
        return self._outcome(report, generation, argv, cwd, setup)

    def _candidates(self, program: str, path: str | None) -> list[str]:
        """The paths the child tries to execute ``program`` at, in order (``$PATH``'s folders)."""
        key = (program, path)
        found = self._searched.get(key)
        if found is None:
            if os.path.dirname(program):
                found = [program]
            else:
                folders = os.get_exec_path({} if path is None else {"PATH": path})
                found = list(dict.fromkeys(os.path.join(folder, program) for folder in folders))
            if len(self._searched) >= SEARCH_CACHE:
                self._searched.clear()
            self._searched[key] = found
        return found

    def _stdio(self, fd: int | None, target: int) -> int:
        if fd == subprocess.DEVNULL:
            return self._devnull
        if fd is None:
            try:
                os.fstat(target)
            except OSError:  # otree's own stream is closed: the child gets /dev/null
                return self._devnull
            return target
        return fd

    async def _request(self, body: bytes, fds: list[int]) -> _Report:
        """Send one spawn request; return its report, read to end of file."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        report = _Report(read_end)
        self._reports.add(report)
        extra: list[int] = []
        try:
            message = b"S" + body
            if len(message) > MESSAGE_LIMIT:
                big = os.memfd_create("otree-spawn", os.MFD_CLOEXEC)
                extra.append(big)
                os.write(big, body)
                os.lseek(big, 0, os.SEEK_SET)
                message = b"S"
            generation = self.generation
            with select.epoll() as ended:
                ended.register(read_end, 0)  # only its hangup: every writer gone (exec, exit, helper death)
                done = False
                # shielded (see spawn); the deadline: until the helper has cloned the child
                with trio.CancelScope(deadline=trio.current_time() + WEDGED_SECONDS, shield=True):
                    try:
                        await self._send(message, [write_end, *fds, *extra])
                    finally:
                        os.close(write_end)
                        for fd in extra:
                            os.close(fd)
                    done = await self._read(report, ended)
                if not done:  # wedged: with nothing cloned, the helper dies and the caller sends it again
                    if report.pid is None:
                        self._replace(generation)
                    with trio.CancelScope(shield=True):
                        await self._read(report, ended)
        finally:
            self._reports.discard(report)
            os.close(read_end)
        return report

    async def _read(self, report: _Report, ended: select.epoll) -> bool:
        """Wait for the report's end (the child's exec or exit closes it) and read it, registering the
        pid; True once it is read to its end (False: cancelled before).

        Woken once, at the end, not by each line: the child writes its pid at once, and a wake
        then would take the CPU from the child on its way to exec.
        """
        try:
            await trio.lowlevel.wait_readable(ended.fileno())
        finally:
            trio.lowlevel.notify_closing(ended.fileno())
            done = report.read()
            if report.pid is not None:
                self._register(report.pid)
        return done

    async def _send(self, message: bytes, fds: list[int]) -> None:
        """Send a request (waiting while the helper's queue is full); a dead helper drops it."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        while True:
            channel = self.channel
            try:
                channel.sendmsg([message], ancillary, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(channel)
            except OSError:
                return  # the helper is gone: nothing will be written, the caller waits for the next one
            else:
                return

    def _outcome(
        self, report: _Report, generation: int, argv: Sequence[str], cwd: str | None, setup: ChildSetup
    ) -> Child:
        """The child that runs, or the error it failed with (once it is reaped and forgotten)."""
        failure = report.failure()
        pid = report.pid
        if failure is None and pid is not None:
            self._known(pid, generation)
            return Child(pid)
        assert failure is not None
        stage, number = failure
        if pid is not None:  # it exited at once (the helper saw it end): reap it
            Child(pid).wait()
            self._reaper.waited.discard(pid)
            self._reaper.groups.discard(pid)
        raise OSError(number, os.strerror(number), _what(stage, argv, cwd, setup))

    def close(self) -> None:
        """The tree has stopped: let the helper go (it kills whatever is still listed) and reap it."""
        with self._lock:
            self._closing = True
            self.channel.close()
            proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=HELPER_EXIT_SECONDS)
            except subprocess.TimeoutExpired:  # stopped by someone: it has nothing left to kill
                proc.kill()
                proc.wait()
        self._keeper.join()
        self._release()
        os.close(self._devnull)


def _what(stage: str, argv: Sequence[str], cwd: str | None, setup: ChildSetup) -> str:
    """What a failed spawn stage names in its error: the program, the cwd, the limit or the user."""
    if stage == "exec":
        return argv[0]
    if stage == "cwd":
        return str(cwd)
    if stage.startswith("rlimit "):
        which, soft, hard = setup.rlimits[int(stage.split()[1])]
        name = next((key for key, value in RLIMITS.items() if value == which), str(which))
        return f"rlimits[{name!r}] = ({soft}, {hard})"
    if stage == "user" and setup.user is not None:
        uid, gid, _ = setup.user
        return f"user: uid {uid}, gid {gid}"
    return stage
