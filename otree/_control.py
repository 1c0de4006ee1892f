"""The control socket's server, inside ``otree run`` (the CLI's side is ``_client``).

One request per connection (``_protocol``). The socket is created 0600 in a 0700
directory, so other users are refused by the kernel at ``connect()``; each
connection's ``SO_PEERCRED`` uid is checked as well (otree's own uid or root),
and a refusal is logged as a ``control.refused`` event. No request, however
malformed, can stop the tree: a bad one gets an error reply and the connection
is closed.

Commands and followers (event subscriptions, submits that wait for their job)
have separate allowances, so followers can never take the places commands need.
A request whose client has hung up before the tree takes it up (a client that
gave up waiting) is not carried out: an ``otree stop-tree`` that timed out must
not stop the tree later. What an operator does through the socket is in the
events it causes (``by: operator``).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from ._errors import JobFailed, NotFound, NotRunning, OtreeError
from ._eventlog import EventLog
from ._events import EventStream
from ._handles import PoolHandle, SupervisorHandle
from ._info import ChildInfo, JobInfo
from ._logfiles import EventFilter
from ._paths import check_private_dir
from ._pool import Job, ProcessJob
from ._poolops import POOL_OPS
from ._protocol import (
    EXIT_JOB_FAILED,
    EXIT_JOB_PENDING,
    EXIT_REFUSED,
    EXIT_USAGE,
    MAX_REQUEST,
    VERSION,
    FrameError,
    FrameReader,
    Reply,
    Request,
    carriable,
    decode_request,
    encode,
)
from ._ray_handles import RemotePoolHandle
from ._reaper import kill_group
from ._status import child_status, status_of
from ._supervisor import _flatten
from ._task import describe

__all__ = ["ControlServer", "peer_allowed", "prepare_socket_dir"]

REQUEST_TIMEOUT = 10.0  # a client that connects and says nothing is dropped after this
MAX_CONNECTIONS = 64  # requests read or served at once; more wait in the listen backlog
MAX_FOLLOWERS = 64  # subscriptions and waiting submits at once, apart from MAX_CONNECTIONS; more are refused
ACCEPT_RETRY = 0.1  # seconds to wait after accept() failed (e.g. out of file descriptors)
_PEERCRED = struct.Struct("3i")
_OPERATOR = {"by": "operator"}  # in the details of the events an operator's request causes
_Args = TypeVar("_Args")


class _Refused(Exception):
    """A request the tree refuses; the message is the one line for the user."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def peer_allowed(peer_uid: int, own_uid: int) -> bool:
    """Whether a peer may control the tree: the same user, or root."""
    return peer_uid in (own_uid, 0)


def _peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """Whether the client has closed its end (POLLHUP: a half-close, ``shutdown(SHUT_WR)``, is not)."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # no events asked: only POLLHUP and POLLERR can be reported
    return bool(poller.poll(0))


class _Slot:
    """A connection's place among ``MAX_CONNECTIONS``, given back once (by a follower, early)."""

    __slots__ = ("_held", "_semaphore")

    def __init__(self, semaphore: trio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


def prepare_socket_dir(socket_path: Path) -> None:
    """Create the socket's directory 0700, or refuse one another user could reach.

    Raises:
      OSError: the directory cannot be made, or is not private (e.g. a pre-made
        ``/tmp/otree-<uid>``, or systemd's default ``RuntimeDirectoryMode=0755``).
    """
    check_private_dir(socket_path.parent)


# --- arguments of each request (validated by msgspec: a wrong type is one clear line) ------------


class _PathArgs(msgspec.Struct, forbid_unknown_fields=True):
    path: str = ""


class _SignalArgs(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    signal: int
    job: str | None = None  # then ``path`` is a pool, and the signal goes to this job's process group


class _SubmitArgs(msgspec.Struct, forbid_unknown_fields=True):
    pool: str
    kind: str
    payload: Any = None
    priority: int = 0
    cost: float = 0.0
    key: str | None = None
    max_runtime: float | None = None  # seconds per attempt; None: its kind's limit
    lane: str | None = None  # the lane it runs in (None: none)
    wait: bool = False  # then reply with the job's id, and again with its outcome once it has ended


class _PoolArgs(msgspec.Struct, forbid_unknown_fields=True):
    pool: str


class _JobArgs(msgspec.Struct, forbid_unknown_fields=True):
    pool: str
    id: str


class _LaneArgs(msgspec.Struct, forbid_unknown_fields=True):
    pool: str
    lane: str


class _EventsArgs(msgspec.Struct, forbid_unknown_fields=True):
    path: str = ""
    kind: str = ""
    since: float | None = None


class _LevelArgs(msgspec.Struct, forbid_unknown_fields=True):
    level: str | None = None  # None: only tell the level in force


class _NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


@dataclass(frozen=True)
class ControlServer:
    """Serves the control socket of one running tree.

    ``reload`` re-reads the tree file and returns a summary (raising ``ValueError``
    with the reason when the file does not load); ``set_level`` changes the log
    level and ``level`` tells it; ``stop_tree`` begins an orderly shutdown; ``root_info`` is the root's
    own status line.
    """

    root: SupervisorHandle
    root_info: Callable[[], ChildInfo]
    log: EventLog | None
    reload: Callable[[], Awaitable[dict[str, list[str]]]]
    set_level: Callable[[str], None]
    level: Callable[[], str]
    stop_tree: Callable[[], None]
    emit: Callable[[str, str, str, dict[str, Any]], None]  # the tree's EventBus.emit
    output_lost: Callable[[], dict[str, int]] = dict  # writes ``otree run``'s own output dropped
    _slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(MAX_CONNECTIONS), init=False)
    _followers: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(MAX_FOLLOWERS), init=False)

    async def serve(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``path`` (0600, in a private dir) until cancelled; remove it afterwards."""
        prepare_socket_dir(path)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            path.unlink(missing_ok=True)  # a socket left by a killed run (the lock says none serves)
            await listener.bind(os.fspath(path))
            # no umask dance (it is process-wide: a child forked meanwhile would inherit it);
            # the directory is private, so nobody else can reach the socket before this
            os.chmod(path, 0o600)
            listener.listen(128)
            try:
                task_status.started()
                async with trio.open_nursery() as nursery:
                    while True:
                        await self._slots.acquire()
                        try:
                            conn, _ = await listener.accept()
                        except OSError as error:  # out of descriptors, say: the tree goes on
                            self._slots.release()
                            self.emit(self.root.path, "control.error", "accept", {"detail": str(error)})
                            await trio.sleep(ACCEPT_RETRY)
                            continue
                        nursery.start_soon(self._connection, conn)
            finally:
                path.unlink(missing_ok=True)

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        slot = _Slot(self._slots)
        try:
            async with stream:
                await self._converse(stream, conn, slot)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a client that went away needs no answer
        except Exception as error:  # noqa: BLE001 - no connection may take the tree down
            detail = f"{type(error).__name__}: {error}"
            self.emit(self.root.path, "control.error", "connection", {"detail": detail})
        finally:
            slot.release()

    async def _converse(self, stream: trio.SocketStream, conn: trio.socket.SocketType, slot: _Slot) -> None:
        reader = FrameReader(MAX_REQUEST)
        bodies: list[bytes] = []
        try:
            # the request is read before any answer, so a refusal reaches the client (no reset)
            with trio.fail_after(REQUEST_TIMEOUT):
                while not bodies:
                    data = await stream.receive_some(65536)
                    if not data:
                        if reader.pending:
                            await _reply_error(stream, "truncated frame", EXIT_USAGE)
                        return
                    bodies = reader.feed(data)
            pid, uid = _peer_credentials(conn)
            if not peer_allowed(uid, os.getuid()):
                self.emit(self.root.path, "control.refused", "permission", {"uid": uid, "pid": pid})
                await _reply_error(stream, f"permission denied: uid {uid} may not control this tree")
                return
            request = decode_request(bodies[0])
        except trio.TooSlowError:
            await _reply_error(stream, f"no request within {REQUEST_TIMEOUT:g}s", EXIT_USAGE)
            return
        except FrameError as error:
            await _reply_error(stream, str(error), EXIT_USAGE)
            return
        if not await self._taken_up(stream, conn, request, pid):
            return
        if _lasts(request):
            await self._lasting(stream, request, slot, pid)
            return
        try:
            reply = encode(Reply(VERSION, True, await self._answer(request)))
        except _Refused as refused:
            reply = _error_frame(str(refused), refused.code)
        except trio.Cancelled:  # the tree stops under the request: say so rather than hang up
            await _last_words(stream, _error_frame("the tree is stopping"))
            raise
        except Exception as error:  # noqa: BLE001 - a bug in one request must not stop the tree
            detail = f"{type(error).__name__}: {error}"
            self.emit(self.root.path, "control.error", request.op, {"detail": detail})
            reply = _error_frame(f"internal error in {request.op}: {detail}", 1)
        await stream.send_all(reply)

    async def _taken_up(
        self, stream: trio.SocketStream, conn: trio.socket.SocketType, request: Request, pid: int
    ) -> bool:
        """Acknowledge the request if asked; False (and an event) if its client is gone meanwhile.

        Checked after the acknowledgement is sent, so a client that gave up waiting
        for it (and closed) never has its request carried out behind its back.
        """
        gone = _hung_up(conn)
        if not gone and request.ack:
            try:
                await stream.send_all(_ACK)
            except trio.BrokenResourceError:
                gone = True
            gone = gone or _hung_up(conn)
        if gone:
            self.emit(self.root.path, "control.abandoned", request.op, {"pid": pid})
        return not gone

    async def _answer(self, request: Request) -> Any:
        handler = _OPS.get(request.op)
        if handler is None:
            known = ", ".join(sorted([*_OPS, "events"]))
            raise _Refused(f"unknown request {request.op!r} (known: {known})", EXIT_USAGE)
        op, args_type = handler
        args = _arguments(request, args_type)
        with _refusals():
            return await op(self, args)

    # --- resolving paths --------------------------------------------------------------------

    def _ids(self, path: str) -> list[str]:
        """The ids below the root named by ``path`` (which may start with the root's id)."""
        parts = [part for part in path.split("/") if part]
        if parts and parts[0] == self.root.path:
            parts = parts[1:]
        return parts

    def _parent_of(self, path: str) -> tuple[SupervisorHandle, str]:
        ids = self._ids(path)
        if not ids:
            raise _Refused(f"{self.root.path} is the root: use otree stop-tree for the whole tree")
        parent = self.root
        for child_id in ids[:-1]:
            try:
                found = parent.find(child_id)
            except NotFound as missing:  # name the whole path asked for, and where it breaks off
                known = ", ".join(missing.existing) or "none"
                raise _Refused(
                    f"no child at {'/'.join([self.root.path, *ids])} ({parent.path} has no child "
                    f"{child_id}; children of {parent.path}: {known})"
                ) from None
            except TypeError as worker:  # a task or process has no children
                raise _Refused(f"no child at {'/'.join([self.root.path, *ids])} ({worker})") from None
            if isinstance(found, (PoolHandle, RemotePoolHandle)):
                raise _Refused(f"{found.path} is a pool: see its jobs with otree jobs {found.path}")
            parent = found
        return parent, ids[-1]

    def _child(self, path: str) -> tuple[SupervisorHandle, ChildInfo]:
        """The supervisor of the child at ``path``, and the child's own status line."""
        parent, child_id = self._parent_of(path)
        children = parent.which_children()
        info = next((i for i in children if i.id == child_id), None)
        if info is None:
            raise NotFound(parent.path, child_id, [i.id for i in reversed(children)])
        return parent, info

    def _pool(self, path: str, command: str) -> PoolHandle | RemotePoolHandle:
        """The pool at ``path`` (here, or on a Ray node); ``command`` names what needs it, for the
        refusal of anything else."""
        if not self._ids(path):
            raise _Refused(f"{self.root.path} is a supervisor: {command} needs a pool")
        parent, info = self._child(path)
        pool = None
        if info.kind in ("pool", "ray"):
            with suppress(TypeError):  # a Ray child that wraps a task or process
                pool = parent.find(info.id)
        if not isinstance(pool, (PoolHandle, RemotePoolHandle)):
            raise _Refused(f"{info.path} is a {info.kind}: {command} needs a pool")
        return pool

    def _local_pool(self, path: str, command: str) -> PoolHandle:
        """The pool at ``path`` for a command that needs its records here: refused for a pool on a
        Ray node, whose queue and jobs stay there."""
        pool = self._pool(path, command)
        if isinstance(pool, RemotePoolHandle):
            raise _Refused(f"{pool.path} runs on a Ray node: {command} does not reach it")
        return pool

    async def _on_pool(self, path: str, command: str, op: str, *args: Any, about: str = "") -> Any:
        """``POOL_OPS[op](pool, *args)`` on the pool at ``path``: here, or on its Ray node; the
        events it causes about ``about`` (a job) or the pool say an operator caused them."""
        pool = self._pool(path, command)
        with self._by_operator(f"{pool.path}/{about}" if about else pool.path):
            if isinstance(pool, RemotePoolHandle):
                return await pool.request(op, about, *args)
            return await POOL_OPS[op](pool, *args)

    @contextmanager
    def _by_operator(self, path: str) -> Iterator[None]:
        """The events of ``path`` and below, while the request runs, say an operator caused them."""
        end = self.root._tree.bus.attribute(path, _OPERATOR)
        try:
            yield
        finally:
            end()

    # --- operations ------------------------------------------------------------------------

    async def _status(self, args: _PathArgs) -> Any:
        if not self._ids(args.path):
            whole = status_of(self.root, self.root_info())
            return msgspec.structs.replace(whole, output_lost=self.output_lost())
        parent, child_id = self._parent_of(args.path)
        return child_status(parent, child_id)

    async def _start(self, args: _PathArgs) -> Any:
        """Wake or spawn: start the child unless it runs (a stop by hand too); ``started`` says which."""
        parent, child_id = self._parent_of(args.path)
        with self._by_operator(f"{parent.path}/{child_id}"):
            info, started = await parent._wake(child_id, manual=True)
        if info.state == "restarting":
            raise _Refused(f"{info.path}: restarting already (stop it first)")
        return {**msgspec.structs.asdict(info), "started": started}

    async def _stop(self, args: _PathArgs) -> Any:
        parent, child_id = self._parent_of(args.path)
        with self._by_operator(f"{parent.path}/{child_id}"):
            await parent.terminate_child(child_id)
        return {"path": f"{parent.path}/{child_id}"}

    async def _restart(self, args: _PathArgs) -> Any:
        """supervisorctl's restart: stop the child if it runs, then start it again."""
        parent, child_id = self._parent_of(args.path)
        with self._by_operator(f"{parent.path}/{child_id}"):
            return await parent._restart_by_operator(child_id)

    async def _delete(self, args: _PathArgs) -> Any:
        parent, child_id = self._parent_of(args.path)
        await parent.delete_child(child_id)
        return {"path": f"{parent.path}/{child_id}"}

    async def _signal(self, args: _SignalArgs) -> Any:
        """Send a signal to a process child's process group (the child and what it started in it)."""
        if args.signal not in signal.valid_signals():
            raise _Refused(f"{args.signal} is not a signal number", EXIT_USAGE)
        if args.job is not None:
            path, pid = self._job_process(args.path, args.job)
            kind = "job.signalled"
        else:
            _, info = self._child(args.path)
            if info.kind != "process":
                raise _Refused(f"{info.path} is a {info.kind}: only a process child takes a signal")
            if info.node is not None:  # its pid is a process on that node, not here
                raise _Refused(f"{info.path} runs on the Ray node {info.node}: signal does not reach it")
            if info.pid is None:
                raise NotRunning(info.path, info.state)
            path, pid, kind = info.path, info.pid, "child.signalled"
        # the leader is not reaped while its pid is shown, so its group (pgid = pid: it is a
        # session leader) cannot be anybody else's yet
        if not kill_group(pid, args.signal):
            raise _Refused(f"{path}: no member of its process group {pid} could be signalled")
        name = _signal_name(args.signal)
        self.emit(path, kind, name, {**_OPERATOR, "pid": pid})
        return {"path": path, "pid": pid, "signal": name}

    def _job_process(self, pool_path: str, job_id: str) -> tuple[str, int]:
        """The path and pid of a pool's running process job (what ``signal --job`` reaches)."""
        pool = self._local_pool(pool_path, "signal --job")
        job = pool.job(job_id)
        if not isinstance(pool._pool().spec.handlers.get(job.kind), ProcessJob):
            raise _Refused(f"job {job.id} of {pool.path} is a task job: only a process job takes a signal")
        pid = job.pid
        if pid is None:
            raise _Refused(f"job {job.id} of {pool.path} is not running ({job.state})")
        return f"{pool.path}/{job.id}", pid

    async def _submit(self, args: _SubmitArgs) -> Any:
        return _queued(await _queue(self._pool(args.pool, "submit"), args))

    async def _jobs(self, args: _PoolArgs) -> Any:
        return await self._on_pool(args.pool, "jobs", "jobs")

    async def _dead_letters(self, args: _PoolArgs) -> Any:
        return await self._on_pool(args.pool, "dead-letters", "dead_letters")

    async def _job(self, args: _JobArgs) -> Any:
        return await self._on_pool(args.pool, "job", "job", args.id)

    async def _lane(self, args: _LaneArgs) -> Any:
        return await self._on_pool(args.pool, "lane", "lane", args.lane)

    async def _cancel(self, args: _JobArgs) -> Any:
        return _queued(await self._on_pool(args.pool, "cancel", "cancel", args.id, about=args.id))

    async def _requeue(self, args: _JobArgs) -> Any:
        return _queued(await self._on_pool(args.pool, "requeue", "requeue", args.id))

    async def _reload(self, args: _NoArgs) -> Any:
        try:
            with self._by_operator(self.root.path):
                return await self.reload()
        except ValueError as error:
            raise _Refused(f"reload refused, the running tree is untouched: {error}") from None

    async def _log_level(self, args: _LevelArgs) -> Any:
        if args.level is not None:
            self.set_level(args.level)
        return {"level": self.level()}

    async def _stop_tree(self, args: _NoArgs) -> Any:
        self.root._tree.bus.attribute(self.root.path, _OPERATOR)  # for the whole stop: never ended
        self.stop_tree()
        return None

    # --- requests that last: the event subscription, a submit that waits -----------------------

    async def _lasting(self, stream: trio.SocketStream, request: Request, slot: _Slot, pid: int) -> None:
        """Serve a request that lasts in one of the followers' own places, or refuse it.

        It leaves its connection slot to commands: however many follow or wait,
        ``otree status`` and ``otree stop-tree`` are still served. A refused one is
        refused before anything is carried out (a waiting submit queues nothing).
        """
        serve, args_type = _LASTING[request.op]
        try:
            args = _arguments(request, args_type)
        except _Refused as refused:
            await _reply_error(stream, str(refused), refused.code)
            return
        try:
            self._followers.acquire_nowait()
        except trio.WouldBlock:
            self.emit(self.root.path, "control.refused", "followers", {"pid": pid})
            await _reply_error(
                stream,
                f"too many followers: {MAX_FOLLOWERS} follow this tree's events or wait for jobs already; "
                "try later",
            )
            return
        slot.release()
        try:
            await serve(self, stream, args)
        finally:
            self._followers.release()

    async def _subscription(self, stream: trio.SocketStream, args: _EventsArgs) -> None:
        """Reply with where the log's history ends, then send every later event that matches,
        until the client closes its end."""
        wanted = EventFilter(kind=args.kind, since=args.since)
        ids = self._ids(args.path)
        prefix = "/".join([self.root.path, *ids])
        # subscribe and cut the log in one step: history and live events meet without gap or overlap
        events = self.root._tree.bus.subscribe(prefix)
        mark = self.log.mark() if self.log is not None else None
        async with events:
            if mark is not None:
                await mark.done.wait()
            await stream.send_all(encode(Reply(VERSION, True, mark.mark if mark is not None else None)))

            async def forward() -> None:
                async for event in events:
                    if wanted(event):
                        await stream.send_all(encode(Reply(VERSION, True, event)))

            await _while_connected(stream, forward)

    async def _await_job(self, stream: trio.SocketStream, args: _SubmitArgs) -> None:
        """Queue a job and reply with its id, then with its outcome once it has ended.

        A client that hangs up meanwhile ends the wait, not the job: it was accepted,
        it runs. If the tree stops first, the client hears where its job stands. A pool on a
        Ray node is waited for by the events of its job that come home (subscribed to before the
        job exists, so its end cannot be missed), then asked for the job's record.
        """
        events: EventStream | None = None
        try:
            try:
                with _refusals():
                    pool = self._pool(args.pool, "submit --wait")
                    if isinstance(pool, RemotePoolHandle):
                        events = self.root._tree.bus.subscribe(pool.path, _REMOTE_WAIT_BUFFER)
                    job = await _queue(pool, args)
            except _Refused as refused:
                await _reply_error(stream, str(refused), refused.code)
                return
            await self._wait_for(stream, pool, job, events)
        finally:
            if events is not None:  # unsubscribed however the wait ended (a client gone at once too)
                await events.aclose()

    async def _wait_for(
        self,
        stream: trio.SocketStream,
        pool: PoolHandle | RemotePoolHandle,
        job: Job | JobInfo,
        events: EventStream | None,
    ) -> None:
        """Reply that ``job`` is queued, then with its outcome (or why there is none yet)."""
        await stream.send_all(encode(Reply(VERSION, True, _queued(job))))
        outcome = b""

        async def wait() -> None:
            nonlocal outcome
            if isinstance(job, Job):
                outcome = await self._outcome(pool.path, job)
            else:
                assert isinstance(pool, RemotePoolHandle) and events is not None
                outcome = await _remote_outcome(pool, job.id, events)

        try:
            if not await _while_connected(stream, wait):
                return
            await trio.lowlevel.checkpoint_if_cancelled()  # a stop that came meanwhile: the branch below
        except trio.Cancelled:
            await _last_words(
                stream,
                outcome
                or _error_frame(
                    f"the tree is stopping before {pool.path}: job {job.id} ended "
                    "(a durable pool keeps it: it runs when the pool starts again)",
                    EXIT_JOB_PENDING,
                ),
            )
            raise
        await stream.send_all(outcome)  # nothing yields before its first write: a stop cannot cut it

    async def _outcome(self, pool: str, job: Job) -> bytes:
        """The reply that ends a waiting submit: the job's result, or one line of why there is none."""
        try:
            value = await job.result()
        except JobFailed as failed:
            cause = failed.__cause__  # a dead letter's last error
            why = f"{pool}: {failed}: {describe(cause)}" if cause is not None else f"{pool}: {failed}"
            if self.root_info().state == "stopping":  # what stopped the pool
                why += " (the tree is stopping)"
            code = EXIT_JOB_PENDING if job.state == "interrupted" else EXIT_JOB_FAILED
            return _error_frame(why.replace("\n", " "), code)
        return encode(Reply(VERSION, True, {**_queued(job), "result": carriable(value)}))


_OPS: dict[str, tuple[Callable[[ControlServer, Any], Awaitable[Any]], type[msgspec.Struct]]] = {
    "status": (ControlServer._status, _PathArgs),
    "start": (ControlServer._start, _PathArgs),
    "stop": (ControlServer._stop, _PathArgs),
    "restart": (ControlServer._restart, _PathArgs),
    "delete": (ControlServer._delete, _PathArgs),
    "submit": (ControlServer._submit, _SubmitArgs),
    "jobs": (ControlServer._jobs, _PoolArgs),
    "dead_letters": (ControlServer._dead_letters, _PoolArgs),
    "requeue": (ControlServer._requeue, _JobArgs),
    "job": (ControlServer._job, _JobArgs),
    "lane": (ControlServer._lane, _LaneArgs),
    "cancel": (ControlServer._cancel, _JobArgs),
    "reload": (ControlServer._reload, _NoArgs),
    "log_level": (ControlServer._log_level, _LevelArgs),
    "stop_tree": (ControlServer._stop_tree, _NoArgs),
    "signal": (ControlServer._signal, _SignalArgs),
}
_LASTING: dict[str, tuple[Callable[[ControlServer, trio.SocketStream, Any], Awaitable[None]], type[Any]]] = {
    "events": (ControlServer._subscription, _EventsArgs),
    "submit": (ControlServer._await_job, _SubmitArgs),
}
_ACK = encode(Reply(VERSION, True, ack=True))


def _lasts(request: Request) -> bool:
    """Whether a request lasts, served in a follower's place: a follow, a submit that waits."""
    return request.op == "events" or (request.op == "submit" and request.args.get("wait") is True)


def _arguments(request: Request, args_type: type[_Args]) -> _Args:
    try:
        return msgspec.convert(request.args, args_type)
    except msgspec.ValidationError as error:
        raise _Refused(f"bad arguments for {request.op}: {error}", EXIT_USAGE) from None


@contextmanager
def _refusals() -> Iterator[None]:
    """What the tree refuses (its own errors, a bad value) as a ``_Refused`` line."""
    try:
        yield
    except (OtreeError, ValueError, TypeError) as error:
        raise _Refused(str(error)) from None


_REMOTE_WAIT_BUFFER = 10_000  # events of a remote pool held for a waiting submit (past it: it asks)
_JOB_ENDS = frozenset({"job.finished", "job.dead_lettered", "job.cancelled", "job.dropped"})
_STILL_UP = frozenset({"child.started", "child.ready"})


async def _remote_outcome(pool: RemotePoolHandle, job_id: str, events: EventStream) -> bytes:
    """The reply that ends a waiting submit to a pool on a Ray node: once the job's end has come
    home (or the pool's own end, or events were dropped), its record as its pool has it."""
    mine = f"{pool.path}/{job_id}"
    async for event in events:
        if not (
            (event.path == mine and event.kind in _JOB_ENDS)
            or (event.path == pool.path and event.kind.startswith("child.") and event.kind not in _STILL_UP)
            or "dropped" in event.details
        ):
            continue
        try:
            info: JobInfo = await pool.request("job", "", job_id)
        except NotRunning:
            break
        if info.state == "done":
            return encode(Reply(VERSION, True, {"id": info.id, "state": info.state, "result": info.result}))
        if info.error is not None:  # dead, cancelled, dropped, interrupted: why, in its pool's words
            code = EXIT_JOB_PENDING if info.state == "interrupted" else EXIT_JOB_FAILED
            return _error_frame(f"{pool.path}: job {info.id}: {info.error}".replace("\n", " "), code)
    return _error_frame(
        f"{pool.path} stopped before job {job_id} ended "
        "(a durable pool keeps it: it runs when the pool starts again)",
        EXIT_JOB_PENDING,
    )


async def _queue(pool: PoolHandle | RemotePoolHandle, args: _SubmitArgs) -> Job | JobInfo:
    return await pool.submit(
        args.kind,
        args.payload,
        priority=args.priority,
        estimated_cost=args.cost,
        key=args.key,
        max_runtime=args.max_runtime,
        lane=args.lane,
    )


def _queued(job: Job | JobInfo) -> dict[str, str]:
    return {"id": job.id, "state": job.state}


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal has no name of its own
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


async def _while_connected(stream: trio.SocketStream, work: Callable[[], Awaitable[None]]) -> bool:
    """Run ``work`` to its end (True), or until the client closes its end (False: it is cancelled).

    What ends it otherwise (the tree's stop, a broken connection) comes out as itself, not
    as an exception group.
    """
    with _flatten():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_eof, stream, nursery.cancel_scope)
            await work()
            nursery.cancel_scope.cancel()
            return True
    return False


async def _cancel_on_eof(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` (a follow, a wait) when the client closes its end."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _reply_error(stream: trio.SocketStream, message: str, code: int = EXIT_REFUSED) -> None:
    await stream.send_all(_error_frame(message, code))


async def _last_words(stream: trio.SocketStream, frame: bytes) -> None:
    """A reply sent as the tree stops: shielded from the stop, for at most a second."""
    # a client that is gone needs no answer: the stop goes on
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(1.0),
        suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(frame)


def _error_frame(message: str, code: int = EXIT_REFUSED) -> bytes:
    return encode(Reply(VERSION, False, error=message, code=code))
