"""The control server in-process: bad frames, foreign peers and failing requests never hurt the tree."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

import otree
from otree import _control
from otree._control import ControlServer, peer_allowed
from otree._info import Event
from otree._protocol import VERSION, FrameReader, Reply, Request, decode_reply, encode

from .helpers import Log, worker


class Served:
    def __init__(self, sup: otree.SupervisorHandle, path: Path) -> None:
        self.sup = sup
        self.path = path
        self.stopped = False

    async def exchange(self, data: bytes, *, eof: bool = False) -> list[Reply]:
        """Send raw bytes; every reply frame until the server closes the connection."""
        stream = await trio.open_unix_socket(str(self.path))
        async with stream:
            await stream.send_all(data)
            if eof:
                await stream.send_eof()
            reader = FrameReader(1 << 30)
            replies: list[Reply] = []
            while chunk := await stream.receive_some(65536):
                replies.extend(decode_reply(body) for body in reader.feed(chunk))
            assert reader.pending == 0
            return replies

    async def request(self, op: str, **args: Any) -> Reply:
        replies = await self.exchange(encode(Request(VERSION, op, args)))
        assert len(replies) == 1
        return replies[0]


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[Served]:
    tree = otree.supervisor("root", children=[otree.task("a", worker, Log(), "a")])
    path = tmp_path / "run" / "control.sock"

    async def reload() -> dict[str, list[str]]:
        return {}

    async with (
        otree.open_supervisor(tree, state_dir=tmp_path / "state") as sup,
        trio.open_nursery() as nursery,
    ):
        served = Served(sup, path)

        def stop_tree() -> None:
            served.stopped = True

        server = ControlServer(
            root=sup,
            root_info=sup._tree.root_info,
            log=sup._tree.log,
            reload=reload,
            set_level=lambda level: None,
            stop_tree=stop_tree,
            emit=sup._tree.bus.emit,
        )
        await nursery.start(server.serve, path)
        yield served
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def still_serves(served: Served) -> None:
    reply = await served.request("status")
    assert reply.ok and reply.result["root"]["info"]["id"] == "root"


def error_of(replies: list[Reply]) -> tuple[str, int]:
    assert len(replies) == 1 and not replies[0].ok
    return replies[0].error, replies[0].code


def test_peer_allowed_is_own_uid_or_root() -> None:
    assert peer_allowed(1000, 1000)
    assert peer_allowed(0, 1000)
    assert not peer_allowed(4242, 1000)
    assert peer_allowed(0, 0)
    assert not peer_allowed(1000, 0)


async def test_socket_and_directory_modes(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        assert served.path.stat().st_mode & 0o777 == 0o600
        assert served.path.parent.stat().st_mode & 0o777 == 0o700


async def test_runtime_dir_others_can_enter_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    sup_tree = otree.supervisor("root", children=[])
    async with otree.open_supervisor(sup_tree, state_dir=tmp_path / "state") as sup:
        server = ControlServer(
            root=sup,
            root_info=sup._tree.root_info,
            log=None,
            reload=None,  # type: ignore[arg-type]
            set_level=lambda level: None,
            stop_tree=lambda: None,
            emit=lambda *event: None,
        )
        with pytest.raises(OSError, match=r"runtime dir .*shared is not private \(owner uid \d+, mode 755\)"):
            await server.serve(shared / "control.sock")


async def test_foreign_uid_is_refused_and_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_control, "_peer_credentials", lambda sock: (123, 4242))
    async with serving(tmp_path) as served:
        events = served.sup.events()
        replies = await served.exchange(encode(Request(VERSION, "stop_tree", {})))
        assert error_of(replies) == ("permission denied: uid 4242 may not control this tree", 4)
        assert not served.stopped
        event = await events.__anext__()
        assert (event.path, event.kind, event.reason) == ("root", "control.refused", "permission")
        assert event.details == {"uid": 4242, "pid": 123}


@pytest.mark.parametrize(
    ("data", "eof", "message"),
    [
        (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", False, "malformed request: "),
        (encode(Reply(VERSION, True)), False, "malformed request: Object missing required field `op`"),
        (struct.pack(">I", 2 << 20), False, "frame of 2097152 bytes is over the limit of 1048576"),
        (struct.pack(">I", 100) + b"0123456789", True, "truncated frame"),
        (encode(Request(2, "status")), False, "unsupported protocol version 2 (this otree speaks 1)"),
        (encode(Request(VERSION, "nope")), False, "unknown request 'nope' (known: dead_letters, delete,"),
        (
            encode(Request(VERSION, "status", {"path": 5})),
            False,
            "bad arguments for status: Expected `str`, got `int` - at `$.path`",
        ),
        (
            encode(Request(VERSION, "status", {"paht": "a"})),
            False,
            "bad arguments for status: Object contains unknown field `paht`",
        ),
        (encode(Request(VERSION, "events", {"kind": 1})), False, "bad arguments for events: Expected `str`"),
    ],
)
async def test_bad_frames_get_an_error_and_the_tree_is_untouched(
    tmp_path: Path, data: bytes, eof: bool, message: str
) -> None:
    async with serving(tmp_path) as served:
        error, code = error_of(await served.exchange(data, eof=eof))
        assert error.startswith(message)
        assert code == 2
        await still_serves(served)


async def test_silent_client_is_dropped(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with serving(tmp_path) as served:
        stream = await trio.open_unix_socket(str(served.path))
        async with stream:
            reader = FrameReader(1 << 20)
            bodies: list[bytes] = []
            while chunk := await stream.receive_some(65536):
                bodies.extend(reader.feed(chunk))
        assert [decode_reply(body).error for body in bodies] == ["no request within 10s"]
        await still_serves(served)


async def test_a_failing_request_is_an_internal_error_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr(_control, "jobs_of", broken)
    monkeypatch.setattr(_control, "status_of", broken)
    async with serving(tmp_path) as served:
        events = served.sup.events()
        reply = await served.request("status")
        assert (reply.ok, reply.error, reply.code) == (
            False,
            "internal error in status: RuntimeError: bug",
            1,
        )
        event = await events.__anext__()
        assert (event.kind, event.reason, event.details) == (
            "control.error",
            "status",
            {"detail": "RuntimeError: bug"},
        )
        assert served.sup.which_children()[0].state == "running"


async def test_stop_tree_request(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        reply = await served.request("stop_tree")
        assert reply.ok and served.stopped


async def test_follow_streams_live_events_after_the_log_mark(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        stream = await trio.open_unix_socket(str(served.path))
        async with stream:
            await stream.send_all(encode(Request(VERSION, "events", {"kind": "child.*"})))
            reader = FrameReader(1 << 20)
            replies: list[Reply] = []
            while not replies:
                replies.extend(decode_reply(body) for body in reader.feed(await stream.receive_some(65536)))
            mark = replies.pop(0).result
            assert mark["offset"] == (tmp_path / "state" / "events.jsonl").stat().st_size
            await served.sup.terminate_child("a")
            while not replies:
                replies.extend(decode_reply(body) for body in reader.feed(await stream.receive_some(65536)))
            event = msgspec.convert(replies[0].result, Event)
            assert (event.path, event.kind) == ("root/a", "child.stopped")
