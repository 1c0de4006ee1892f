"""The control protocol: length-prefixed msgpack frames between ``otree`` commands and a tree.

A frame is a 4-byte big-endian length and that many bytes of msgpack. A client
sends one ``Request``; the server answers with one ``Reply``, or, for a
subscription, with a first ``Reply`` and then one ``Reply`` per event until
either side closes, or, for a waiting submit, with the job's id and then its
outcome. A request with ``ack`` first gets an acknowledgement (a
``Reply`` with ``ack``) once the tree takes it up: the client bounds its wait for
that, never the wait for the result, which may be the command's purpose (a stop
under a long grace). Pure: no sockets here, so the decoder can be fuzzed.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_JOB_PENDING",
    "EXIT_NO_TREE",
    "EXIT_REFUSED",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "MAX_REPLY",
    "MAX_REQUEST",
    "VERSION",
    "FrameError",
    "FrameReader",
    "Reply",
    "Request",
    "carriable",
    "decode_reply",
    "decode_request",
    "encode",
]

VERSION = 1
# a reply's ``code``: the exit code the ``otree`` command ends with
EXIT_USAGE = 2  # a malformed request or bad arguments
EXIT_NO_TREE = 3  # (client side) nothing serves the socket
EXIT_REFUSED = 4  # the tree refused the request
EXIT_TIMEOUT = 5  # (client side) the tree did not take the connection or the request up in time
EXIT_JOB_FAILED = 6  # (``submit --wait``) the job was dead-lettered, cancelled or dropped
EXIT_JOB_PENDING = 7  # (``submit --wait``) its pool or the tree stopped first: a durable pool keeps the job
EXIT_INTERRUPTED = 130  # (``otree run``) a second Ctrl-C killed what was left
MAX_REQUEST = 1 << 20  # a request is a few fields and a job payload
MAX_REPLY = 1 << 30  # a status of a very large tree
_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """A frame that is too big, not msgpack, not a request, or of another protocol version."""


class Request(msgspec.Struct, frozen=True):
    """What a client asks: ``op`` with ``args``, in protocol version ``v``.

    ``ack``: acknowledge the request once the tree takes it up, before carrying it out.
    """

    v: int
    op: str
    args: dict[str, Any] = {}
    ack: bool = False


class Reply(msgspec.Struct, frozen=True):
    """The answer: ``result`` when ``ok``, else ``error`` (one line) and the CLI's exit ``code``.

    ``ack``: this frame only acknowledges the request; the answer follows.
    """

    v: int
    ok: bool
    result: Any = None
    error: str = ""
    code: int = 0
    ack: bool = False


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(message: Request | Reply) -> bytes:
    """One frame holding ``message``.

    msgpack has no integers beyond 64 bits; a JSON payload may (a dead letter's,
    say): those are sent as their decimal text rather than not at all.
    """
    try:
        body = _encoder.encode(message)
    except OverflowError:
        body = _encoder.encode(_big_ints_as_text(msgspec.to_builtins(message)))
    return _HEADER.pack(len(body)) + body


def carriable(value: Any) -> Any:
    """``value`` as a reply can carry it: itself, or its repr when msgpack cannot hold it
    (a job's result may be any object)."""
    try:
        _encoder.encode(value)
    except TypeError:
        return repr(value)
    except OverflowError:  # a big integer: ``encode`` sends it as text
        pass
    return value


def _big_ints_as_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, dict):
        return {_big_ints_as_text(k): _big_ints_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_big_ints_as_text(item) for item in value]
    return value


def decode_request(body: bytes) -> Request:
    """The request in a frame's body.

    Raises:
      FrameError: not msgpack, not a request, or another protocol version.
    """
    try:
        request = _request_decoder.decode(body)
    except msgspec.DecodeError as error:
        raise FrameError(f"malformed request: {error}") from None
    except RecursionError:  # nested deeper than the decoder follows
        raise FrameError("malformed request: nested too deeply") from None
    if request.v != VERSION:
        raise FrameError(f"unsupported protocol version {request.v} (this otree speaks {VERSION})")
    return request


def decode_reply(body: bytes) -> Reply:
    """The reply in a frame's body (see ``decode_request``)."""
    try:
        reply = _reply_decoder.decode(body)
    except msgspec.DecodeError as error:
        raise FrameError(f"malformed reply: {error}") from None
    except RecursionError:
        raise FrameError("malformed reply: nested too deeply") from None
    if reply.v != VERSION:
        raise FrameError(f"unsupported protocol version {reply.v} (this otree speaks {VERSION})")
    return reply


class FrameReader:
    """Splits a byte stream into frame bodies; a frame over ``limit`` bytes is an error."""

    __slots__ = ("_buffer", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Take ``data``; return the bodies of the frames it completed.

        Raises:
          FrameError: a frame announces more than ``limit`` bytes.
        """
        buffer = self._buffer
        buffer += data
        bodies: list[bytes] = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            if size > self.limit:
                raise FrameError(f"frame of {size} bytes is over the limit of {self.limit}")
            end = start + _HEADER.size + size
            if len(buffer) < end:
                break
            bodies.append(bytes(buffer[start + _HEADER.size : end]))
            start = end
        del buffer[:start]
        return bodies

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame (a truncated frame at EOF)."""
        return len(self._buffer)
