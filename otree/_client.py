"""The control socket's client, used by the ``otree`` commands: plain blocking sockets, no trio.

The CLI is a short-lived synchronous program; keeping this side free of the
runtime makes ``otree status`` cost a round trip, not an import of the tree's
machinery.

Every request is bounded in time until the tree takes it up: the connect, the
send and the tree's acknowledgement share one ``timeout``. What follows the
acknowledgement (the answer of a stop under a long grace, a follow's events,
the outcome of a job a submit waits for) is not bounded, as waiting for it is the
command's purpose. A client that gives
up closes its end, and the tree does not carry out a request whose client has
gone. Socket failures are one ``ControlError`` line each, never a traceback.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from ._info import Event
from ._logfiles import LogMark
from ._protocol import (
    EXIT_NO_TREE,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    MAX_REPLY,
    VERSION,
    FrameError,
    FrameReader,
    Reply,
    Request,
    decode_reply,
    encode,
)

__all__ = ["DEFAULT_TIMEOUT", "ControlError", "NoTree", "call", "submit_and_wait", "subscribe"]

DEFAULT_TIMEOUT = 5.0  # seconds for the connect, the send and the tree's acknowledgement together


class ControlError(Exception):
    """The tree refused a request (or answered nonsense); ``code`` is the CLI's exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class NoTree(ControlError):
    """No tree serves the socket of that state dir."""

    def __init__(self, state: Path) -> None:
        super().__init__(
            f"no otree running for state dir {state} (start one with: otree run FILE)", EXIT_NO_TREE
        )


def _connect(sock_path: Path, state: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # a blocking connect waits while the tree's listen backlog is full; SO_SNDTIMEO bounds that wait
    seconds = int(timeout)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
    )
    try:
        sock.connect(os.fspath(sock_path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NoTree(state) from None
    except PermissionError as error:
        sock.close()
        message = f"cannot reach the tree of {state}: {error.strerror}: {sock_path}"
        raise ControlError(message, EXIT_REFUSED) from None
    except BlockingIOError:  # EAGAIN: the backlog stayed full for the whole timeout
        sock.close()
        message = (
            f"the tree of {state} accepted no connection within {timeout:g}s: its backlog is full "
            "(--timeout SECONDS waits longer)"
        )
        raise ControlError(message, EXIT_TIMEOUT) from None
    except OSError as error:
        sock.close()
        raise ControlError(f"cannot reach the tree of {state}: {error.strerror or error}", 1) from None
    return sock


class _Link:
    """One request's connection: its reply frames, read under a deadline until the acknowledgement."""

    def __init__(self, sock: socket.socket, state: Path, timeout: float, deadline: float) -> None:
        self.sock = sock
        self.state = state
        self.timeout = timeout
        self.deadline: float | None = deadline
        self.unsure = "the request may or may not have been carried out"  # when the connection breaks
        self._reader = FrameReader(MAX_REPLY)
        self._bodies: deque[bytes] = deque()

    @contextmanager
    def one_line_errors(self) -> Iterator[None]:
        """A timeout or a broken connection as one ``ControlError`` line."""
        try:
            yield
        except TimeoutError:  # only before the acknowledgement: the tree has not taken the request up
            message = (
                f"the tree of {self.state} did not take the request up within {self.timeout:g}s "
                "(--timeout SECONDS waits longer); it was withdrawn, not carried out"
            )
            raise ControlError(message, EXIT_TIMEOUT) from None
        except OSError as error:  # reset by a tree that died, say
            message = (
                f"the connection to the tree of {self.state} broke ({error.strerror or error}); {self.unsure}"
            )
            raise ControlError(message, 1) from None

    def _receive(self) -> bytes:
        if self.deadline is None:
            self.sock.settimeout(None)
        else:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
        return self.sock.recv(1 << 20)

    def _next(self) -> Reply | None:
        """The next frame; None when the tree closed the connection between frames."""
        while not self._bodies:
            data = self._receive()
            if not data:
                if self._reader.pending:
                    raise ControlError("the tree closed the connection mid-reply", 1)
                return None
            try:
                self._bodies.extend(self._reader.feed(data))
            except FrameError as error:
                raise ControlError(str(error), 1) from None
        try:
            return decode_reply(self._bodies.popleft())
        except FrameError as error:
            raise ControlError(str(error), 1) from None

    def replies(self) -> Iterator[Reply]:
        """The answers: an error reply raises; the acknowledgement ends the deadline."""
        with self.one_line_errors():
            while (reply := self._next()) is not None:
                if not reply.ok:
                    raise ControlError(reply.error, reply.code or EXIT_REFUSED)
                if reply.ack:
                    self.deadline = None
                    continue
                yield reply

    def answer(self) -> Iterator[Reply]:
        """``replies()``, of which there must be one at least."""
        replies = self.replies()
        first = next(replies, None)
        if first is None:
            raise ControlError("the tree closed the connection without a reply", 1)
        yield first
        yield from replies


def _open(sock_path: Path, state: Path, op: str, args: dict[str, Any], timeout: float) -> _Link:
    """Connect and send the request within ``timeout`` (which bounds the acknowledgement too)."""
    deadline = time.monotonic() + timeout
    link = _Link(_connect(sock_path, state, timeout), state, timeout, deadline)
    try:
        with link.one_line_errors():
            link.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            link.sock.sendall(encode(Request(VERSION, op, args, ack=True)))
    except BaseException:
        link.sock.close()
        raise
    return link


def call(sock_path: Path, state: Path, op: str, *, timeout: float = DEFAULT_TIMEOUT, **args: Any) -> Any:
    """Send one request to the tree of ``state`` and return its result.

    Raises:
      NoTree: no tree serves that state dir.
      ControlError: the tree refused the request (the message says why), did not
        take it up within ``timeout`` seconds, or the connection broke.
    """
    link = _open(sock_path, state, op, args, timeout)
    with link.sock:
        return next(link.answer()).result


def _lasting(
    sock_path: Path, state: Path, op: str, args: dict[str, Any], timeout: float
) -> tuple[_Link, Any, Iterator[Reply]]:
    """A request answered more than once: its connection, the first answer's result, the later answers."""
    link = _open(sock_path, state, op, args, timeout)
    replies = link.answer()
    try:
        first = next(replies)
    except BaseException:
        link.sock.close()
        raise
    return link, first.result, replies


def subscribe(
    sock_path: Path, state: Path, *, timeout: float = DEFAULT_TIMEOUT, **args: Any
) -> tuple[LogMark | None, Iterator[Event]]:
    """Subscribe to the tree's live events: where the log's history ends, and the live events.

    The live events end when the tree stops (it closes the connection).
    """
    link, mark, replies = _lasting(sock_path, state, "events", args, timeout)

    def live() -> Iterator[Event]:
        with link.sock:
            for reply in replies:
                yield msgspec.convert(reply.result, Event)

    return None if mark is None else msgspec.convert(mark, LogMark), live()


def submit_and_wait(
    sock_path: Path, state: Path, *, timeout: float = DEFAULT_TIMEOUT, **args: Any
) -> tuple[dict[str, str], Callable[[], Any]]:
    """Queue a job in ``args["pool"]``: the job's ``{"id", "state"}``, and a call that waits for
    its end (with no time limit: the tree stops waiting when this side closes, the job runs on)
    and returns the handler's return value.

    Raises (the call too): see ``call``; once queued, ``ControlError`` with ``EXIT_JOB_FAILED``
    (dead-lettered, with its last error; cancelled; dropped) or ``EXIT_JOB_PENDING`` (its pool
    or the tree stopped first; a durable pool keeps the job).
    """
    link, queued, replies = _lasting(sock_path, state, "submit", {**args, "wait": True}, timeout)
    job = f"job {queued['id']} of {args['pool']}"
    link.unsure = f"{job} was queued, and may still run"

    def outcome() -> Any:
        with link.sock:
            reply = next(replies, None)
        if reply is None:
            raise ControlError(f"the tree of {state} closed the connection before {job} ended", 1)
        return reply.result["result"]

    return queued, outcome
