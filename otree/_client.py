"""The control socket's client, used by the ``otree`` commands: plain blocking sockets, no trio.

The CLI is a short-lived synchronous program; keeping this side free of the
runtime makes ``otree status`` cost a round trip, not an import of the tree's
machinery.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from ._info import Event
from ._logfiles import LogMark
from ._protocol import (
    EXIT_NO_TREE,
    EXIT_REFUSED,
    MAX_REPLY,
    VERSION,
    FrameError,
    FrameReader,
    Reply,
    Request,
    decode_reply,
    encode,
)

__all__ = ["ControlError", "NoTree", "call", "subscribe"]


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


def _connect(sock_path: Path, state: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(sock_path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NoTree(state) from None
    except PermissionError as error:
        sock.close()
        message = f"cannot reach the tree of {state}: {error.strerror}: {sock_path}"
        raise ControlError(message, EXIT_REFUSED) from None
    return sock


def _replies(sock: socket.socket) -> Iterator[Reply]:
    reader = FrameReader(MAX_REPLY)
    while True:
        data = sock.recv(1 << 20)
        if not data:
            if reader.pending:
                raise ControlError("the tree closed the connection mid-reply", 1)
            return
        try:
            for body in reader.feed(data):
                yield decode_reply(body)
        except FrameError as error:
            raise ControlError(str(error), 1) from None


def _request(sock: socket.socket, op: str, args: dict[str, Any]) -> Iterator[Reply]:
    sock.sendall(encode(Request(VERSION, op, args)))
    for reply in _replies(sock):
        if not reply.ok:
            raise ControlError(reply.error, reply.code or EXIT_REFUSED)
        yield reply


def call(sock_path: Path, state: Path, op: str, **args: Any) -> Any:
    """Send one request to the tree of ``state`` and return its result.

    Raises:
      NoTree: no tree serves that state dir.
      ControlError: the tree refused the request (the message says why).
    """
    with _connect(sock_path, state) as sock:
        for reply in _request(sock, op, args):
            return reply.result
    raise ControlError("the tree closed the connection without a reply", 1)


def subscribe(sock_path: Path, state: Path, **args: Any) -> tuple[LogMark | None, Iterator[Event]]:
    """Subscribe to the tree's live events: where the log's history ends, and the live events."""
    sock = _connect(sock_path, state)
    replies = _request(sock, "events", args)
    try:
        first = next(replies)
    except StopIteration:
        sock.close()
        raise ControlError("the tree closed the connection without a reply", 1) from None
    mark = None if first.result is None else msgspec.convert(first.result, LogMark)

    def live() -> Iterator[Event]:
        with sock:
            for reply in replies:
                yield msgspec.convert(reply.result, Event)

    return mark, live()
