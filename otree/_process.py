"""Running an OS process as a child: its own process group, signals, logs, readiness, watchdog.

The process runs in a new session, so its process group is its own, and every
stop and kill goes to the whole group: a CLI agent's shells and tools go with
it. The runner is a trapping task child: a stop request sends ``stop_signal``
to the group, and when the ``shutdown`` grace runs out (the run's cancel scope
fires) the group gets SIGKILL. Whatever is left in the group when the leader
exits, by itself or not, is killed too.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pwd
import resource
import select
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio
from trio_util import wait_any

from ._appevents import parse_notify_event
from ._info import ExitInfo
from ._notify import NotifySockets
from ._paths import child_log_dir, ensure_private_dir
from ._reaper import Reaper, kill_group
from ._spawner import Child, ChildSetup, Spawner
from ._spec import RLIMITS, ProcessSpec
from ._task import wait_quiet

__all__ = ["ProcessContext", "ProcessFailed", "ProcessRun", "run_job_process", "run_process"]

TAIL_BYTES = 4096
RESULT_LIMIT = 1024 * 1024  # a process job's stdout kept as its result
NOTIFY_LIMIT = 4096  # bytes of one notify datagram, as systemd's
NOTIFY_BATCH = 64  # notify datagrams read in one go before other tasks get a turn
DRAIN_SECONDS = 0.5  # how long output may keep flowing after the group is gone (escaped holders)


class ProcessFailed(Exception):
    """A process child ended as an ``error``: its ``exit_detail`` is the exit's detail."""

    def __init__(self, exit_detail: str, message: str = "") -> None:
        self.exit_detail = exit_detail
        super().__init__(message or exit_detail)


# --- what the runner shares with the tree ---------------------------------------------------


class ProcessContext:
    """What every process child of one tree shares: paths, the reaper, the spawn helper."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.reaper = Reaper()
        self.spawner = Spawner(self.reaper)
        self.notify = NotifySockets()

    def close(self) -> None:
        """The tree has stopped: kill what is left of it (the helper still guarding), then let it go."""
        try:
            self.reaper.kill_all()
        finally:
            try:
                self.spawner.close()
            finally:
                self.notify.close()


def child_setup(spec: ProcessSpec) -> tuple[ChildSetup, pwd.struct_passwd | None]:
    """The limits and user a child takes on before exec (and that user's passwd entry).

    Checked here, in otree, so that a refusal reads as one clear line before any
    child is spawned.

    Raises:
      LookupError: the user no longer exists.
      PermissionError: another user, or a higher hard limit, without root.
      ValueError: a ``nofile`` limit above the kernel's ``fs.nr_open``.
    """
    privileged = os.geteuid() == 0
    limits = []
    for name, (soft, hard) in (spec.rlimits or {}).items():
        which = RLIMITS[name]
        current = resource.getrlimit(which)[1]
        if not privileged and _above(hard, current):
            message = (
                f"rlimits[{name!r}]: hard limit {hard} is above otree's ({current}); raising it needs root"
            )
            raise PermissionError(message)
        if name == "nofile" and _above(hard, _NR_OPEN):
            raise ValueError(
                f"rlimits['nofile']: hard limit {hard} is above the kernel's fs.nr_open ({_NR_OPEN})"
            )
        limits.append((which, soft, hard))
    if spec.user is None:
        return ChildSetup(tuple(limits)), None
    try:
        entry = pwd.getpwnam(spec.user)
    except KeyError:
        raise LookupError(f"user={spec.user!r}: no such user") from None
    if entry.pw_uid == os.geteuid() and not privileged:
        return ChildSetup(tuple(limits)), entry  # already that user: nothing to switch
    if not privileged:
        raise PermissionError(f"user={spec.user!r}: otree must run as root to start a child as another user")
    # the groups are looked up here: NSS (sssd, LDAP) must not run in a child forked from threads
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return ChildSetup(tuple(limits), (entry.pw_uid, entry.pw_gid, groups)), entry


def _read_nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return resource.RLIM_INFINITY


_NR_OPEN = _read_nr_open()


def _above(limit: int, current: int) -> bool:
    """Whether rlimit ``limit`` is higher than ``current`` (RLIM_INFINITY is the highest)."""
    if limit == resource.RLIM_INFINITY:
        return current != resource.RLIM_INFINITY
    return current != resource.RLIM_INFINITY and limit > current


class _Run(Protocol):
    path: str
    proc: Any  # where ``otree jobs`` and ``otree signal --job`` find a job process's pid
    previous_exit: ExitInfo | None

    @property
    def stopping(self) -> trio.Event: ...

    def report_cost(self, usd: float) -> None: ...


class ProcessRun:
    """What one run of a process child shows: pid, STATUS= text, the stderr tail, how it ended."""

    __slots__ = ("exit_code", "last_activity", "own_exit", "pid", "signal", "status", "tail")

    def __init__(self) -> None:
        self.pid: int | None = None
        self.status: str | None = None
        self.tail = bytearray()
        self.last_activity = trio.current_time()
        self.exit_code: int | None = None
        self.signal: int | None = None
        # it exited by itself (otree neither signalled it nor judged it stalled or not ready)
        self.own_exit = False


class _RotatingLog:
    """An append-only 0600 log file, rotated to ``.1`` ... ``.N`` at ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        ensure_private_dir(path.parent)
        self._file = self._open()

    def _open(self) -> Any:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating whenever the file would pass ``max_bytes``."""
        view = memoryview(data)
        while view:
            room = self.max_bytes - self._file.tell()
            if room <= 0:
                self._rotate()
                continue
            self._file.write(view[:room])
            view = view[room:]

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self._open()

    def close(self) -> None:
        self._file.close()


# --- the runner --------------------------------------------------------------------------------


# Exit details that name a kind of stop, passed on in OTREE_PREVIOUS_EXIT (others are free text).
_EXIT_KEYWORDS = frozenset({"max_runtime", "stalled", "idle", "start_timeout", "killed"})


def previous_exit_value(exit_info: ExitInfo) -> str:
    """``OTREE_PREVIOUS_EXIT``: ``reason[:keyword][:status]``, colon-separated.

    ``keyword`` is the detail when it is one of ``_EXIT_KEYWORDS``; ``status`` is the exit
    code (digits) or the signal's name (``SIGKILL``). ``normal:0``, ``error:3``,
    ``error:stalled:SIGKILL``, ``shutdown``.
    """
    parts: list[str] = [exit_info.reason]
    if exit_info.detail in _EXIT_KEYWORDS:
        parts.append(exit_info.detail)
    if exit_info.exit_code is not None:
        parts.append(str(exit_info.exit_code))
    elif exit_info.signal is not None:
        try:
            parts.append(signal.Signals(exit_info.signal).name)
        except ValueError:
            parts.append(f"SIG{exit_info.signal}")
    return ":".join(parts)


def _environment(
    spec: ProcessSpec, notify: str, user: pwd.struct_passwd | None, previous: ExitInfo | None
) -> dict[str, str]:
    env = dict(os.environ) if spec.inherit_env else {}
    if user is not None:  # its own home and name, not otree's (``env`` may still set them)
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    env.update(spec.env or {})
    env["NOTIFY_SOCKET"] = notify
    env.pop("OTREE_PREVIOUS_EXIT", None)  # never otree's own, nor a stale one
    if previous is not None:
        env["OTREE_PREVIOUS_EXIT"] = previous_exit_value(previous)
    return env


class _Stamper:
    """Starts each line of a stream with the UTC time its first byte arrived (``log_timestamps``).

    ISO 8601 with milliseconds and a space: ``2026-01-05T09:30:00.123Z ``. A line
    that arrives in pieces is stamped once, at its first piece, and each piece is
    passed on at once: a partial line is never held back waiting for its newline.
    """

    def __init__(self) -> None:
        self._line_start = True

    def stamp(self, chunk: bytes) -> bytes:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        mark = f"{now.removesuffix('+00:00')}Z ".encode()
        stamped = chunk.replace(b"\n", b"\n" + mark)
        ends_line = chunk.endswith(b"\n")
        if ends_line:
            stamped = stamped[: -len(mark)]  # the next line has not begun: its own first byte dates it
        if self._line_start:
            stamped = mark + stamped
        self._line_start = ends_line
        return stamped


async def _pump(
    stream: trio.lowlevel.FdStream, log: _Sink, proc: ProcessRun, keep_tail: bool, stamp: bool
) -> None:
    stamper = _Stamper() if stamp else None
    while chunk := await stream.receive_some(65536):
        if stamper is not None:
            chunk = stamper.stamp(chunk)
        log.write(chunk)
        proc.last_activity = trio.current_time()
        if keep_tail:
            proc.tail += chunk
            del proc.tail[:-TAIL_BYTES]


_Reader = tuple[trio.lowlevel.FdStream, "_Sink", bool, bool]  # stream, sink, keeps the tail, stamped


def _listen(
    sock: socket.socket,
    run: _Run,
    proc: ProcessRun,
    ready: trio.Event,
    emit: Callable[..., None],
) -> None:
    """The sd_notify protocol: READY=1, STATUS=..., WATCHDOG=1, and otree's OTREE_COST= and OTREE_EVENT=.

    Reads what is queued on the (non-blocking) socket, at most ``NOTIFY_BATCH`` datagrams.
    A datagram is one or more lines split at ``\\n`` only (systemd's framing; a JSON
    string may hold other line breaks, such as U+2028, raw). A datagram longer than
    ``NOTIFY_LIMIT`` is ignored whole, as systemd ignores it: its cut end would
    be read as a different message.
    """
    for _ in range(NOTIFY_BATCH):
        try:
            data, _, flags, _ = sock.recvmsg(NOTIFY_LIMIT)
        except BlockingIOError:
            return
        if flags & socket.MSG_TRUNC:
            head = data[:200].decode("utf-8", "replace")
            emit(run.path, "notify.ignored", "malformed", message=head, detail=f"over {NOTIFY_LIMIT} bytes")
            continue
        for line in data.decode("utf-8", "replace").split("\n"):
            if line:
                _notified(line.removesuffix("\r"), run, proc, ready, emit)


def _notified(line: str, run: _Run, proc: ProcessRun, ready: trio.Event, emit: Callable[..., None]) -> None:
    """Carry out one notify line."""
    key, sep, value = line.partition("=")
    if not sep:
        emit(run.path, "notify.ignored", "malformed", message=line[:200])
    elif key == "READY" and value == "1":
        ready.set()
    elif key == "STATUS":
        proc.status = value
        emit(run.path, "child.status", "", status=value)
    elif key == "WATCHDOG" and value == "1":
        proc.last_activity = trio.current_time()
    elif key == "OTREE_COST":
        try:
            run.report_cost(float(value))
        except ValueError:
            emit(run.path, "notify.ignored", "bad cost", message=line[:200])
    elif key == "OTREE_EVENT":
        try:
            kind, reason, details = parse_notify_event(value)
        except ValueError as error:
            emit(run.path, "notify.ignored", "malformed", message=line[:200], detail=str(error))
        else:
            emit(run.path, kind, reason, **details)
    else:
        emit(run.path, "notify.ignored", "unknown", message=line[:200])


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class _Capture:
    """Keeps the first ``limit`` bytes of a stream in memory (a job's stdout result)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += data[:room]

    def close(self) -> None:
        pass


class _Tee:
    """Writes each chunk to every sink: a logged job's stdout is both its result and its log."""

    def __init__(self, *sinks: _Sink) -> None:
        self.sinks = sinks

    def write(self, data: bytes) -> None:
        for sink in self.sinks:
            sink.write(data)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class _Started(_Run, Protocol):
    """A process child's run, which is also its task status (``RunningChild``)."""

    def started(self, value: None = None) -> None: ...


async def run_process(
    spec: ProcessSpec, ctx: ProcessContext, emit: Callable[..., None], *, task_status: _Started
) -> None:
    """Run ``spec`` as a child until it exits or is stopped; raise ProcessFailed on an error exit.

    ``task_status`` is the run itself (its ``proc`` made beforehand): a child restarted in its
    own task gets a new run, so nothing of one run is bound before it starts.
    """
    run = task_status
    sinks: dict[str, _Sink | int | None] = {}
    for name in ("stdout", "stderr"):
        mode = getattr(spec, name)
        if mode == "log":
            where = child_log_dir(ctx.state_dir, run.path) / f"{name}.log"
            sinks[name] = _RotatingLog(where, spec.log_max_bytes, spec.log_backups)
        else:
            sinks[name] = None if mode == "inherit" else subprocess.DEVNULL
    stamped = ("stdout", "stderr") if spec.log_timestamps else ()
    await _run(
        spec, run, run.proc, ctx, emit, sinks=sinks, stamped=stamped, stdin_data=None, task_status=task_status
    )


async def run_job_process(
    spec: ProcessSpec,
    payload: bytes,
    run: _Run,
    ctx: ProcessContext,
    emit: Callable[..., None],
    *,
    log_dir: Path | None = None,
) -> bytes:
    """Run a pool job as a process: ``payload`` on stdin, its stdout (at most 1 MiB) returned.

    With ``log_dir``, its whole stdout and stderr are also appended to ``stdout.log`` and
    ``stderr.log`` there (rotated as a process child's logs are).
    Raises ProcessFailed (with the stderr tail in its message) on an error exit;
    with ``log_timestamps`` the tail's lines are stamped (never the result).
    """
    proc = run.proc = ProcessRun()
    stdout = _Capture(RESULT_LIMIT)
    sinks: dict[str, _Sink | int | None] = {"stdout": stdout, "stderr": _Capture(0)}
    if log_dir is not None:
        stdout_log = _RotatingLog(log_dir / "stdout.log", spec.log_max_bytes, spec.log_backups)
        try:
            stderr_log = _RotatingLog(log_dir / "stderr.log", spec.log_max_bytes, spec.log_backups)
        except BaseException:
            stdout_log.close()
            raise
        sinks = {"stdout": _Tee(stdout, stdout_log), "stderr": stderr_log}
    stamped = ("stderr",) if spec.log_timestamps else ()
    try:
        await _run(
            spec,
            run,
            proc,
            ctx,
            emit,
            sinks=sinks,
            stamped=stamped,
            stdin_data=payload,
            task_status=trio.TASK_STATUS_IGNORED,
        )
    except ProcessFailed as failure:
        tail = proc.tail.decode("utf-8", "replace").strip()
        raise ProcessFailed(failure.exit_detail, f"{failure.exit_detail}: {tail}" if tail else "") from None
    return bytes(stdout.data)


async def _feed(stream: trio.lowlevel.FdStream, data: bytes) -> None:
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):  # it exited without reading it all
            await stream.send_all(data)


async def _run(
    spec: ProcessSpec,
    run: _Run,
    proc: ProcessRun,
    ctx: ProcessContext,
    emit: Callable[..., None],
    *,
    sinks: dict[str, _Sink | int | None],
    stamped: tuple[str, ...],
    stdin_data: bytes | None,
    task_status: trio.TaskStatus[None],
) -> None:
    """Spawn ``spec`` with each stream going to a sink (piped), a file descriptor or inherited.

    The lines of the piped streams named in ``stamped`` start with their time.
    """
    run.stopping  # noqa: B018 - trapping: a stop request is ours to carry out (signal the group)
    readers: list[_Reader] = []
    targets: dict[str, int | None] = {}
    child_ends: list[int] = []
    setup, user = child_setup(spec)
    owner = setup.user[:2] if setup.user is not None else None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    feeder: trio.lowlevel.FdStream | None = None
    notify_path: str | None = None
    try:
        for name in ("stdout", "stderr"):
            sink = sinks[name]
            if sink is None or isinstance(sink, int):
                targets[name] = sink
                continue
            read_end, write_end = os.pipe()
            child_ends.append(write_end)
            readers.append((trio.lowlevel.FdStream(read_end), sink, name == "stderr", name in stamped))
            targets[name] = write_end
        if stdin_data is None:
            targets["stdin"] = subprocess.DEVNULL
        else:
            read_end, write_end = os.pipe()
            child_ends.append(read_end)
            feeder = trio.lowlevel.FdStream(write_end)
            targets["stdin"] = read_end
        # bound directly: trio's bind would take a worker thread
        notify_path = ctx.notify.bind(sock, owner)
        try:
            child = await ctx.spawner.spawn(
                spec.argv,
                env=_environment(spec, notify_path, user, run.previous_exit),
                cwd=spec.cwd,
                stdio=(targets["stdin"], targets["stdout"], targets["stderr"]),
                setup=setup,
            )
        finally:
            for end in child_ends:
                os.close(end)
            child_ends.clear()
        feed = (feeder, stdin_data) if feeder is not None and stdin_data is not None else None
        watch = _Watch(spec, child, proc, ctx)
        await watch.watch(run, readers, sock, emit=emit, task_status=task_status, feed=feed)
    finally:
        for end in child_ends:  # setup failed before the spawn
            os.close(end)
        if feeder is not None:
            feeder.close()
        sock.close()
        if notify_path is not None:
            ctx.notify.release(notify_path)
        for stream, sink, _, _ in readers:
            stream.close()
            sink.close()


class _Watch:
    """One spawned process, watched until it is gone with its whole group."""

    def __init__(self, spec: ProcessSpec, child: Child, proc: ProcessRun, ctx: ProcessContext) -> None:
        self.spec = spec
        self.child = child
        self.proc = proc
        self.ctx = ctx
        self.pid = child.pid
        self.exited = trio.Event()
        self.stalled = trio.Event()
        self.waiting: trio.CancelScope | None = None  # the wait that an exit or a stall ends
        self.signalled = False  # otree sent the signal that ended it
        self.failure: ProcessFailed | None = None

    async def watch(
        self,
        run: _Run,
        readers: list[_Reader],
        sock: socket.socket,
        *,
        emit: Callable[..., None],
        task_status: trio.TaskStatus[None],
        feed: tuple[trio.lowlevel.FdStream, bytes] | None,
    ) -> None:
        """Readiness, then wait for exit, a stop request or a stall; raise on an error exit.

        ``feed``: a stream to the child's stdin and the bytes to write to it.
        """
        pid = self.pid
        self.proc.pid = pid
        pidfd = os.pidfd_open(pid)  # cannot fail: the child is registered, so nobody reaps it but us
        try:
            async with trio.open_nursery() as nursery:
                drained = trio.Event()
                ready = trio.Event()
                if readers:
                    nursery.start_soon(self._pump_all, readers, drained)
                else:
                    drained.set()
                # while output may still drain after the exit, notify datagrams are read too
                nursery.start_soon(self._wait_exit, pidfd, sock, run, ready, emit, bool(readers))
                if feed is not None:
                    nursery.start_soon(_feed, *feed)
                if await self._wait_ready(ready, run.stopping):
                    task_status.started()
                    if self.spec.stall_timeout is not None:
                        # the stall clock starts at readiness: a slow start is start_timeout's business
                        self.proc.last_activity = trio.current_time()
                        nursery.start_soon(self._watch_stall, self.spec.stall_timeout)
                    await self._until_ended(run.stopping)
                if not self.exited.is_set():
                    self.signalled = True
                    await _stop_group(self.spec, pid, self.exited)
                # the leader is gone: take its group with it, then let the output drain
                kill_group(pid, signal.SIGKILL)
                if not drained.is_set():
                    with trio.move_on_after(DRAIN_SECONDS):
                        await drained.wait()
                nursery.cancel_scope.cancel()
        finally:
            if not self.exited.is_set():  # cancelled: the grace ran out, or brutal_kill
                with trio.CancelScope(shield=True):
                    self.signalled = True
                    kill_group(pid, signal.SIGKILL)
                    await trio.lowlevel.wait_readable(pidfd)
            self._reap(pidfd)
        self._raise_error_exit(run.stopping.is_set())

    async def _until_ended(self, stopping: trio.Event) -> None:
        """Wait for a stop request, an exit or a stall; the exit and stall watchers end this wait."""
        with trio.CancelScope() as self.waiting:
            if not (self.exited.is_set() or self.stalled.is_set()):
                await stopping.wait()
        self.waiting = None

    def _wake(self) -> None:
        if self.waiting is not None:
            self.waiting.cancel()

    async def _watch_stall(self, timeout: float) -> None:
        await wait_quiet(self.proc, timeout)
        self.stalled.set()
        self._wake()

    async def _pump_all(self, readers: list[_Reader], drained: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            for stream, log, keep_tail, stamp in readers:
                nursery.start_soon(_pump, stream, log, self.proc, keep_tail, stamp)
        drained.set()

    async def _wait_exit(  # noqa: PLR0917 - the notify protocol's parts, passed on
        self,
        pidfd: int,
        sock: socket.socket,
        run: _Run,
        ready: trio.Event,
        emit: Callable[..., None],
        listen_after: bool,
    ) -> None:
        """The child's exit and its notify datagrams, in one task (one epoll holds both).

        Datagrams are read before the exit is seen (the ones sent before it are in its run's
        accounts). After the exit, the task keeps reading them until cancelled if ``listen_after``,
        else returns.
        """
        with select.epoll() as events:
            events.register(pidfd, select.EPOLLIN)
            events.register(sock.fileno(), select.EPOLLIN)
            try:
                while True:
                    await trio.lowlevel.wait_readable(events.fileno())
                    _listen(sock, run, self.proc, ready, emit)
                    if not self.exited.is_set() and any(fd == pidfd for fd, _ in events.poll(0)):
                        self.exited.set()
                        self._wake()
                        if not listen_after:
                            return
                        events.unregister(pidfd)
            finally:
                trio.lowlevel.notify_closing(events.fileno())

    async def _wait_ready(self, ready: trio.Event, stopping: trio.Event) -> bool:
        """Whether the child became ready (it did not exit, was not stopped, did not time out)."""
        spec = self.spec
        if spec.ready == "spawn":  # nothing to wait for, so start_timeout cannot run out
            return not self.exited.is_set() and not stopping.is_set()
        with trio.move_on_after(spec.effective_start_timeout()) as window:
            if spec.ready == "notify":
                await wait_any(ready.wait, self.exited.wait, stopping.wait)
            else:
                with trio.move_on_after(float(spec.ready)):
                    await wait_any(self.exited.wait, stopping.wait)
        if window.cancelled_caught:
            timeout = spec.effective_start_timeout()
            self.failure = ProcessFailed("start_timeout", f"not ready within {timeout:g}s")
            return False
        return not self.exited.is_set() and not stopping.is_set()

    def _reap(self, pidfd: int) -> None:
        """Kill what is left of the group (its leader has exited), reap the leader, forget the group."""
        pid, ctx = self.pid, self.ctx
        kill_group(pid, signal.SIGKILL)
        ctx.spawner.forget(pid)  # while the pid is still held: it cannot name a stranger's group yet
        returncode = self.child.wait()
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)
        ctx.reaper.waited.discard(pid)
        ctx.reaper.groups.discard(pid)
        self.proc.pid = None
        self.proc.exit_code = returncode if returncode >= 0 else None
        self.proc.signal = -returncode if returncode < 0 else None

    def _raise_error_exit(self, stop_requested: bool) -> None:
        if self.failure is not None:
            raise self.failure
        if self.stalled.is_set() and not stop_requested:
            raise ProcessFailed("stalled", f"no output or WATCHDOG=1 for {self.spec.stall_timeout:g}s")
        returncode = self.child.wait()
        if self.signalled or stop_requested:
            return
        self.proc.own_exit = True
        if returncode != 0 and returncode not in self.spec.ok_exit_codes:
            raise ProcessFailed(_describe_exit(returncode))


async def _stop_group(spec: ProcessSpec, pgid: int, exited: trio.Event) -> None:
    """The stop signal to the group, then SIGKILL once ``shutdown`` seconds have passed."""
    if spec.shutdown == "brutal_kill":
        kill_group(pgid, signal.SIGKILL)
    else:
        kill_group(pgid, spec.stop_signal)
        if spec.shutdown != "infinity":
            with trio.move_on_after(float(spec.shutdown)):
                await exited.wait()
            kill_group(pgid, signal.SIGKILL)
    await exited.wait()
