"""The control protocol: length-prefixed msgpack frames, split and decoded without sockets."""

from __future__ import annotations

import struct
from itertools import pairwise
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otree._protocol import (
    MAX_REPLY,
    MAX_REQUEST,
    VERSION,
    FrameError,
    FrameReader,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode,
)

_HEADER = struct.Struct(">I")


def frame(body: bytes) -> bytes:
    """A frame holding ``body`` as it is, whatever it is."""
    return _HEADER.pack(len(body)) + body


def read_all(data: bytes, limit: int = MAX_REQUEST) -> list[bytes]:
    reader = FrameReader(limit)
    bodies = reader.feed(data)
    assert reader.pending == 0
    return bodies


# ---------------------------------------------------------------------------------------------
# round trips


def test_request_round_trip() -> None:
    request = Request(VERSION, "status", {"path": "fleet/a", "depth": 3, "all": True, "x": None})
    (body,) = read_all(encode(request))
    assert decode_request(body) == request


def test_request_default_args_round_trip() -> None:
    request = Request(VERSION, "ping")
    (body,) = read_all(encode(request))
    decoded = decode_request(body)
    assert decoded == request
    assert decoded.args == {}


def test_reply_round_trip_ok_and_error() -> None:
    ok = Reply(VERSION, True, result={"children": [{"id": "a", "state": "running"}], "n": 1.5})
    error = Reply(VERSION, False, error="no such child: fleet/zz", code=3)
    bodies = read_all(encode(ok) + encode(error), limit=MAX_REPLY)
    assert [decode_reply(body) for body in bodies] == [ok, error]


def test_acknowledgement_round_trip_and_default() -> None:
    request = Request(VERSION, "stop", {"path": "a"}, ack=True)
    ack = Reply(VERSION, True, ack=True)
    bodies = read_all(encode(request) + encode(ack), limit=MAX_REPLY)
    assert decode_request(bodies[0]) == request and decode_reply(bodies[1]) == ack
    # a peer that does not know acknowledgements neither asks for one nor sends one
    assert not decode_request(msgspec.msgpack.encode({"v": 1, "op": "stop", "args": {}})).ack
    assert not decode_reply(msgspec.msgpack.encode({"v": 1, "ok": True, "result": 3})).ack


def test_frame_header_is_big_endian_length() -> None:
    request = Request(VERSION, "ping")
    data = encode(request)
    (size,) = _HEADER.unpack_from(data)
    assert size == len(data) - 4
    assert data[:4] == size.to_bytes(4, "big")


# ---------------------------------------------------------------------------------------------
# splitting the stream


def test_feed_one_byte_at_a_time() -> None:
    messages = [
        Request(VERSION, "status", {"path": "fleet"}),
        Request(VERSION, "restart", {"path": "fleet/a", "why": "é ünïcode ✓"}),
        Request(VERSION, "ping"),
    ]
    data = b"".join(encode(message) for message in messages)
    reader = FrameReader(MAX_REQUEST)
    bodies: list[bytes] = []
    ends = set()
    end = 0
    for message in messages:
        end += len(encode(message))
        ends.add(end)
    last_end = 0
    for index in range(len(data)):
        got = reader.feed(data[index : index + 1])
        # a body comes out exactly when its last byte arrives, and never before
        assert len(got) == (1 if index + 1 in ends else 0)
        bodies += got
        if got:
            last_end = index + 1
        assert reader.pending == index + 1 - last_end
    assert reader.pending == 0
    assert [decode_request(body) for body in bodies] == messages


@pytest.mark.parametrize("cut", range(0, 40))
def test_split_at_every_byte_boundary(cut: int) -> None:
    first = Request(VERSION, "stop", {"path": "fleet/a"})
    second = Request(VERSION, "start", {"path": "fleet/b"})
    data = encode(first) + encode(second)
    assert len(data) > 40
    reader = FrameReader(MAX_REQUEST)
    bodies = reader.feed(data[:cut]) + reader.feed(data[cut:])
    assert reader.pending == 0
    assert [decode_request(body) for body in bodies] == [first, second]


def test_several_frames_in_one_feed() -> None:
    messages = [Request(VERSION, f"op{index}", {"index": index}) for index in range(10)]
    reader = FrameReader(MAX_REQUEST)
    bodies = reader.feed(b"".join(encode(message) for message in messages))
    assert reader.pending == 0
    assert [decode_request(body) for body in bodies] == messages


def test_several_frames_and_a_partial_one_in_one_feed() -> None:
    messages = [Request(VERSION, f"op{index}") for index in range(3)]
    last = encode(Request(VERSION, "last", {"k": "v"}))
    reader = FrameReader(MAX_REQUEST)
    bodies = reader.feed(b"".join(encode(message) for message in messages) + last[:7])
    assert [decode_request(body) for body in bodies] == messages
    assert reader.pending == 7
    (body,) = reader.feed(last[7:])
    assert decode_request(body) == Request(VERSION, "last", {"k": "v"})
    assert reader.pending == 0


def test_empty_feed_and_empty_frame() -> None:
    reader = FrameReader(10)
    assert reader.feed(b"") == []
    assert reader.pending == 0
    assert reader.feed(frame(b"")) == [b""]
    assert reader.pending == 0


def test_pending_reports_a_truncated_frame() -> None:
    data = encode(Request(VERSION, "status", {"path": "fleet"}))
    reader = FrameReader(MAX_REQUEST)
    assert reader.feed(data[:3]) == []
    assert reader.pending == 3  # not even a whole header
    assert reader.feed(data[3:-1]) == []
    assert reader.pending == len(data) - 1  # header and all but the last byte
    assert len(reader.feed(data[-1:])) == 1
    assert reader.pending == 0


def test_frame_at_the_limit_is_accepted() -> None:
    reader = FrameReader(8)
    assert reader.feed(frame(b"12345678")) == [b"12345678"]


def test_frame_over_the_limit_raises() -> None:
    reader = FrameReader(8)
    with pytest.raises(FrameError, match=r"frame of 9 bytes is over the limit of 8"):
        reader.feed(frame(b"123456789"))


def test_frame_over_the_limit_raises_on_the_header_alone() -> None:
    # an oversized frame is refused as soon as its length is known, before its body is buffered
    reader = FrameReader(MAX_REQUEST)
    with pytest.raises(FrameError, match=f"frame of {MAX_REQUEST + 1} bytes is over the limit"):
        reader.feed(_HEADER.pack(MAX_REQUEST + 1))


def test_frame_over_the_limit_after_good_frames_in_one_feed() -> None:
    reader = FrameReader(16)
    with pytest.raises(FrameError, match="over the limit of 16"):
        reader.feed(frame(b"ok") + _HEADER.pack(0xFFFFFFFF))


def test_frame_over_the_limit_split_across_feeds() -> None:
    reader = FrameReader(100)
    header = _HEADER.pack(101)
    assert reader.feed(header[:2]) == []
    with pytest.raises(FrameError, match="frame of 101 bytes"):
        reader.feed(header[2:])


# ---------------------------------------------------------------------------------------------
# bodies that are not requests


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "malformed request: Input data was truncated"),
        (b"\xc1", "malformed request: MessagePack data is malformed"),
        (b"\x92\x01", "malformed request"),  # an array announcing 2 items, holding 1
        (b"\xff\xff\xff", "malformed request"),
        (msgspec.msgpack.encode([1, "status", {}]), "Expected `object`, got `array`"),
        (msgspec.msgpack.encode("status"), "Expected `object`, got `str`"),
        (msgspec.msgpack.encode(None), "Expected `object`"),
        (msgspec.msgpack.encode({"v": 1}), "Object missing required field `op`"),
        (msgspec.msgpack.encode({"op": "status"}), "Object missing required field `v`"),
        (
            msgspec.msgpack.encode({"v": 1, "op": "x", "args": [1]}),
            "Expected `object`, got `array` - at `$.args`",
        ),
        (msgspec.msgpack.encode({"v": 1, "op": "x", "args": "a"}), "at `$.args`"),
        (msgspec.msgpack.encode({"v": 1, "op": "x", "args": {1: 2}}), "Expected `str`, got `int`"),
        (msgspec.msgpack.encode({"v": 1, "op": 5}), "Expected `str`, got `int` - at `$.op`"),
        (msgspec.msgpack.encode({"v": "1", "op": "x"}), "Expected `int`, got `str` - at `$.v`"),
        (msgspec.msgpack.encode({"v": 1.0, "op": "x"}), "at `$.v`"),
        (msgspec.msgpack.encode({"v": True, "op": "x"}), "at `$.v`"),
    ],
)
def test_malformed_request_bodies(body: bytes, message: str) -> None:
    with pytest.raises(FrameError) as caught:
        decode_request(body)
    assert message in str(caught.value)
    assert str(caught.value).startswith("malformed request: ")


@pytest.mark.parametrize("version", [0, 2, -1, 1 << 40])
def test_request_of_another_version(version: int) -> None:
    (body,) = read_all(encode(Request(version, "status")))
    with pytest.raises(FrameError) as caught:
        decode_request(body)
    assert str(caught.value) == f"unsupported protocol version {version} (this otree speaks {VERSION})"


def test_request_of_version_2_names_the_version() -> None:
    with pytest.raises(FrameError, match=r"^unsupported protocol version 2 \(this otree speaks 1\)$"):
        decode_request(msgspec.msgpack.encode({"v": 2, "op": "status", "args": {}}))


@pytest.mark.parametrize("version", [0, 2])
def test_reply_of_another_version(version: int) -> None:
    (body,) = read_all(encode(Reply(version, True, result=1)), limit=MAX_REPLY)
    with pytest.raises(FrameError, match=f"^unsupported protocol version {version} "):
        decode_reply(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "malformed reply: Input data was truncated"),
        (b"\xc1", "malformed reply: MessagePack data is malformed"),
        (msgspec.msgpack.encode([1, True]), "malformed reply: Expected `object`, got `array`"),
        (msgspec.msgpack.encode({"v": 1}), "malformed reply: Object missing required field `ok`"),
        (msgspec.msgpack.encode({"v": 1, "ok": "yes"}), "Expected `bool`, got `str` - at `$.ok`"),
        (msgspec.msgpack.encode({"v": 1, "ok": False, "code": "3"}), "at `$.code`"),
        # a request is not a reply
        (msgspec.msgpack.encode(Request(VERSION, "status")), "missing required field `ok`"),
    ],
)
def test_malformed_reply_bodies(body: bytes, message: str) -> None:
    with pytest.raises(FrameError) as caught:
        decode_reply(body)
    assert message in str(caught.value)


def test_unknown_fields_are_ignored() -> None:
    # a newer client's extra field does not break an older server of the same version
    body = msgspec.msgpack.encode({"v": 1, "op": "status", "args": {}, "trace": "abc"})
    assert decode_request(body) == Request(VERSION, "status")


# ---------------------------------------------------------------------------------------------
# fuzzing


def _reference_split(data: bytes, limit: int) -> tuple[list[bytes], bool, int]:
    """Bodies, whether an oversized frame was announced, and the leftover byte count."""
    bodies: list[bytes] = []
    start = 0
    while len(data) - start >= 4:
        (size,) = _HEADER.unpack_from(data, start)
        if size > limit:
            return bodies, True, 0
        if len(data) < start + 4 + size:
            break
        bodies.append(data[start + 4 : start + 4 + size])
        start += 4 + size
    return bodies, False, len(data) - start


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-5, 5)), inner, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def _request_like_bodies(draw: st.DrawFn) -> bytes:
    """msgpack maps that look like requests: the right keys, any values, sometimes truncated."""
    fields: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(["v", "op", "args", "ok", "result", "x"]), max_size=5)):
        fields[key] = draw(
            st.one_of(_values, st.integers(-3, 3), st.dictionaries(st.text(max_size=3), _values, max_size=3))
        )
    body = msgspec.msgpack.encode(fields)
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return body


_streams = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(_request_like_bodies(), st.binary(max_size=20)), max_size=5).map(
        lambda bodies: b"".join(frame(body) for body in bodies)
    ),
    # framed garbage with a junk tail: a truncated or oversized frame at the end
    st.tuples(st.lists(_request_like_bodies(), max_size=3), st.binary(max_size=8)).map(
        lambda parts: b"".join(frame(body) for body in parts[0]) + parts[1]
    ),
)


@settings(max_examples=500, deadline=None)
@given(data=_streams, cuts=st.lists(st.integers(min_value=0), max_size=12), limit=st.integers(0, 300))
def test_fuzz_reader_and_decoder_raise_only_frame_error(data: bytes, cuts: list[int], limit: int) -> None:
    reader = FrameReader(limit)
    bodies: list[bytes] = []
    failed = False
    for chunk in _chunks(data, cuts):
        try:
            bodies += reader.feed(chunk)
        except FrameError:
            failed = True
            break
    expected, oversized, leftover = _reference_split(data, limit)
    assert failed == oversized
    if failed:
        # the bodies completed before the oversized header (some may be lost with the error)
        assert bodies == expected[: len(bodies)]
    else:
        assert bodies == expected
        assert reader.pending == leftover
    for body in bodies:
        assert len(body) <= limit
        for decode in (decode_request, decode_reply):
            try:
                message = decode(body)
            except FrameError:
                continue
            assert message.v == VERSION
            if isinstance(message, Request):
                assert isinstance(message.op, str)
                assert isinstance(message.args, dict)
                assert all(isinstance(key, str) for key in message.args)


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(st.binary(max_size=100), _request_like_bodies()))
def test_fuzz_decode_request_unframed(body: bytes) -> None:
    try:
        request = decode_request(body)
    except FrameError as error:
        assert str(error).startswith(("malformed request: ", "unsupported protocol version "))
    else:
        assert request.v == VERSION


_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
        st.floats(allow_nan=False),
        st.text(),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(), inner, max_size=5)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(op=st.text(), args=st.dictionaries(st.text(), _json, max_size=6), cuts=st.lists(st.integers(0)))
def test_fuzz_request_round_trip(op: str, args: dict[str, Any], cuts: list[int]) -> None:
    request = Request(VERSION, op, args)
    data = encode(request)
    reader = FrameReader(MAX_REQUEST)
    bodies: list[bytes] = []
    for chunk in _chunks(data, cuts):
        bodies += reader.feed(chunk)
    assert reader.pending == 0
    (body,) = bodies
    decoded = decode_request(body)
    assert decoded == request
    # exactly: no int turned bool or float, no list turned tuple
    assert msgspec.msgpack.encode(decoded) == msgspec.msgpack.encode(request)
    assert encode(decoded) == data


@settings(max_examples=200, deadline=None)
@given(ok=st.booleans(), result=_json, error=st.text(), code=st.integers(-(1 << 63), (1 << 63) - 1))
def test_fuzz_reply_round_trip(ok: bool, result: Any, error: str, code: int) -> None:
    reply = Reply(VERSION, ok, result=result, error=error, code=code)
    (body,) = read_all(encode(reply), limit=MAX_REPLY)
    decoded = decode_reply(body)
    assert decoded == reply
    assert msgspec.msgpack.encode(decoded) == msgspec.msgpack.encode(reply)


def test_a_request_nested_too_deeply_is_a_frame_error() -> None:
    depth = 100_000
    body = b"\x83\xa1v\x01\xa2op\xa6status\xa4args\x81\xa4path" + b"\x91" * depth + b"\xc0"
    with pytest.raises(FrameError, match="malformed request: nested too deeply"):
        decode_request(body)


def test_integers_beyond_64_bits_are_sent_as_text() -> None:
    frame = encode(Reply(VERSION, True, {"payload": {"n": 2**70, "m": -(2**70), "ok": 5}}))
    (body,) = FrameReader(1 << 20).feed(frame)
    assert decode_reply(body).result == {"payload": {"n": str(2**70), "m": str(-(2**70)), "ok": 5}}
