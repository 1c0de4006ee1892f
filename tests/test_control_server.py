"""The control server in-process: bad frames, foreign peers and failing requests never hurt the tree."""

from __future__ import annotations

import os
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
async def serving(
    tmp_path: Path, children: list[otree.TaskSpec | otree.PoolSpec] | None = None
) -> AsyncIterator[Served]:
    tree = otree.supervisor("root", children=children or [otree.task("a", worker, Log(), "a")])
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
            level=lambda: "INFO",
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
            level=lambda: "INFO",
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
        (
            encode(Request(VERSION, "nope")),
            False,
            "unknown request 'nope' (known: cancel, dead_letters, delete,",
        ),
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


# --- slots, followers, abandoned requests, acknowledgements -------------------------------------


async def open_follower(served: Served) -> tuple[trio.SocketStream, Reply]:
    """An events subscription: the stream, and its first reply (the log mark, or a refusal)."""
    stream = await trio.open_unix_socket(str(served.path))
    await stream.send_all(encode(Request(VERSION, "events", {})))
    reader = FrameReader(1 << 20)
    bodies: list[bytes] = []
    while not bodies:
        chunk = await stream.receive_some(65536)
        assert chunk, "the server closed the follow without a reply"
        bodies = reader.feed(chunk)
    return stream, decode_reply(bodies[0])


async def next_event(events: otree.EventStream, kind: str) -> Event:
    async for event in events:
        if event.kind == kind:
            return event
    raise AssertionError(f"the stream ended before a {kind} event")


async def test_followers_never_take_the_slots_commands_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_control, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(_control, "MAX_FOLLOWERS", 3)
    async with serving(tmp_path) as served:
        events = served.sup.events()
        with trio.fail_after(5):  # three followers, two command slots: commands are still served
            followers = [await open_follower(served) for _ in range(3)]
            assert all(reply.ok for _, reply in followers)
            await still_serves(served)
            await still_serves(served)
            stream, refused = await open_follower(served)
        await stream.aclose()
        assert (refused.ok, refused.code) == (False, 4)
        assert refused.error == (
            "too many followers: 3 follow this tree's events or wait for jobs already; try later"
        )
        event = await next_event(events, "control.refused")
        assert (event.reason, event.details["pid"]) == ("followers", os.getpid())
        await followers[0][0].aclose()  # one leaves: its place is free again
        with trio.fail_after(5):
            while not (again := await open_follower(served))[1].ok:
                await again[0].aclose()  # the server has not seen the leaver's EOF yet
        for stream, _ in [*followers[1:], again]:
            await stream.aclose()


async def test_a_request_whose_client_hung_up_is_not_carried_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_control, "MAX_CONNECTIONS", 1)
    async with serving(tmp_path) as served:
        events = served.sup.events()
        # accepted first (the backlog is in order), it holds the only slot until it closes
        silent = await trio.open_unix_socket(str(served.path))
        quitter = await trio.open_unix_socket(str(served.path))  # so this one waits in the backlog
        await quitter.send_all(encode(Request(VERSION, "stop_tree", {}, ack=True)))
        await quitter.aclose()  # gives up, as a client whose timeout ran out
        await silent.aclose()  # the slot frees: the server takes the quitter's request up now
        with trio.fail_after(5):
            event = await next_event(events, "control.abandoned")
        assert (event.path, event.reason, event.details["pid"]) == ("root", "stop_tree", os.getpid())
        assert not served.stopped
        await still_serves(served)


async def receive_reply(stream: trio.SocketStream, reader: FrameReader, pending: list[bytes]) -> Reply:
    while not pending:
        chunk = await stream.receive_some(65536)
        assert chunk, "the server closed the connection"
        pending.extend(reader.feed(chunk))
    return decode_reply(pending.pop(0))


async def slow_to_stop(
    release: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await release.wait()


async def test_the_acknowledgement_comes_before_a_long_answer(tmp_path: Path) -> None:
    release = trio.Event()
    slow = otree.task("slow", slow_to_stop, release, shutdown=60.0)
    async with serving(tmp_path, [slow]) as served, await trio.open_unix_socket(str(served.path)) as stream:
        try:
            await stream.send_all(encode(Request(VERSION, "stop", {"path": "slow"}, ack=True)))
            reader, pending = FrameReader(1 << 20), []
            with trio.fail_after(5):
                first = await receive_reply(stream, reader, pending)
                assert (first.ok, first.ack, first.result) == (True, True, None)
                while served.sup.which_children()[0].state != "stopping":
                    await trio.sleep(0.01)
        finally:
            release.set()  # the stop (the command's purpose) can end now, and only now
        answer = await receive_reply(stream, reader, pending)
        assert (answer.ok, answer.ack, answer.result) == (True, False, {"path": "root/slow"})


async def test_a_request_without_ack_gets_the_answer_alone(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        replies = await served.exchange(encode(Request(VERSION, "status")), eof=True)  # a half-close
        assert [(reply.ok, reply.ack) for reply in replies] == [(True, False)]


async def test_what_an_operator_does_says_by_operator(tmp_path: Path) -> None:
    log = Log()
    async with serving(
        tmp_path, [otree.task("a", worker, log, "a"), otree.task("b", worker, log, "b")]
    ) as served:
        events = served.sup.events()
        for op in ("stop", "start", "restart"):
            reply = await served.request(op, path="a")
            assert reply.ok, reply.error
        await served.sup.terminate_child("b")  # the library's own call: nobody to name
        seen = []
        async for event in events:
            seen.append((event.path, event.kind, event.details.get("by")))
            if event.path == "root/b":
                break
        assert seen == [
            ("root/a", "child.stopped", "operator"),
            ("root/a", "child.woken", "operator"),  # otree start wakes it
            ("root/a", "child.started", "operator"),
            ("root/a", "child.ready", "operator"),
            ("root/a", "child.stopped", "operator"),
            ("root/a", "child.started", "operator"),
            ("root/a", "child.ready", "operator"),
            ("root/b", "child.stopped", None),
        ]
        assert (await served.request("stop_tree")).ok
        await served.sup.terminate_child("a")  # the tree's stop, once stop-tree asked for it
        event = await next_event(events, "child.stopped")
        assert (event.path, event.details["by"]) == ("root/a", "operator")


# --- submit with wait: acknowledged, then answered when the job ends, in a follower's place ------


class Gate:
    """A pool whose ``gated`` jobs end (returning their payload) only once the test opens the gate."""

    def __init__(self) -> None:
        self.open = trio.Event()

    async def gated(self, payload: Any) -> Any:
        await self.open.wait()
        return {"got": payload}

    async def quick(self, payload: Any) -> Any:
        return payload

    def pool(self) -> otree.PoolSpec:
        return otree.pool("jobs", {"gated": self.gated, "quick": self.quick}, max_concurrency=10)


class Waiter:
    """A ``submit`` with ``wait``: its stream, and its replies as they come."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader(1 << 20)
        self.pending: list[bytes] = []

    async def next(self) -> Reply:
        return await receive_reply(self.stream, self.reader, self.pending)


async def open_waiter(served: Served, kind: str = "gated", payload: Any = None) -> Waiter:
    """A waiting submit that has had its acknowledgement (and nothing else yet, or a refusal)."""
    stream = await trio.open_unix_socket(str(served.path))
    args = {"pool": "jobs", "kind": kind, "payload": payload, "wait": True}
    await stream.send_all(encode(Request(VERSION, "submit", args, ack=True)))
    waiter = Waiter(stream)
    ack = await waiter.next()
    assert (ack.ok, ack.ack) == (True, True), ack
    return waiter


async def test_a_waiting_submit_is_acknowledged_then_answered_when_its_job_ends(tmp_path: Path) -> None:
    gate = Gate()
    async with serving(tmp_path, [gate.pool()]) as served:
        waiter = await open_waiter(served, payload=[1, 2])
        async with waiter.stream:
            with trio.fail_after(5):
                queued = await waiter.next()  # the job's id at once, before it ends
                assert (queued.ok, queued.ack, queued.result["id"]) == (True, False, "1")
                assert [info.id for info in served.sup.find("jobs").which_children()] == ["1"]
                gate.open.set()
                answer = await waiter.next()
            assert (answer.ok, answer.result) == (
                True,
                {"id": "1", "state": "done", "result": {"got": [1, 2]}},
            )
            assert await waiter.stream.receive_some(65536) == b""  # and nothing more: the server closed


async def test_waiting_submits_never_take_the_slots_commands_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_control, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(_control, "MAX_FOLLOWERS", 3)
    gate = Gate()
    async with serving(tmp_path, [gate.pool()]) as served:
        events = served.sup.events()
        with trio.fail_after(5):  # three waiters, two command slots: commands are still served
            waiters = [await open_waiter(served, payload=n) for n in range(3)]
            assert [(await waiter.next()).result["id"] for waiter in waiters] == ["1", "2", "3"]
            await still_serves(served)
            await still_serves(served)
            refused = await open_waiter(served)
            answer = await refused.next()
        await refused.stream.aclose()
        assert (answer.ok, answer.code) == (False, 4)
        assert answer.error == (
            "too many followers: 3 follow this tree's events or wait for jobs already; try later"
        )
        assert (await next_event(events, "control.refused")).reason == "followers"
        assert len(served.sup.find("jobs").which_children()) == 3  # the refused one queued nothing
        gate.open.set()
        with trio.fail_after(5):
            results = [(await waiter.next()).result["result"] for waiter in waiters]
        assert results == [{"got": 0}, {"got": 1}, {"got": 2}]
        for waiter in waiters:
            await waiter.stream.aclose()


async def test_a_waiter_that_hangs_up_ends_the_wait_not_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_control, "MAX_FOLLOWERS", 1)
    gate = Gate()
    async with serving(tmp_path, [gate.pool()]) as served:
        with trio.fail_after(5):
            quitter = await open_waiter(served, payload="left")
            assert (await quitter.next()).result["id"] == "1"
            await quitter.stream.aclose()  # Ctrl-C: the client is gone
            # the server's wait ends and gives its place back: another waiter gets it
            while not (await (other := await open_waiter(served, "quick", "other")).next()).ok:
                await other.stream.aclose()  # refused: the server has not seen the quitter's EOF yet
            answer = await other.next()
            await other.stream.aclose()
        assert (answer.ok, answer.result["result"]) == (True, "other")
        assert [info.id for info in served.sup.find("jobs").which_children()] == ["1"]  # still running
        events = served.sup.events()
        gate.open.set()
        with trio.fail_after(5):
            async for event in events:
                if event.path == "root/jobs/1":
                    break
        assert (event.kind, event.reason) == ("job.finished", "normal")


async def test_a_pool_that_stops_under_a_waiter_says_where_the_job_stands(tmp_path: Path) -> None:
    gate = Gate()
    async with serving(tmp_path, [gate.pool()]) as served:
        waiter = await open_waiter(served)
        async with waiter.stream:
            with trio.fail_after(5):
                await waiter.next()
                await served.sup.terminate_child("jobs")  # durable (a state dir): the job is kept
                answer = await waiter.next()
        assert (answer.ok, answer.code, answer.error) == (
            False,
            7,
            "root/jobs: job 1: interrupted: the pool stopped; it runs again when the pool starts",
        )


async def test_a_tree_that_stops_under_a_waiter_says_so(tmp_path: Path) -> None:
    gate = Gate()
    async with serving(tmp_path, [gate.pool()]) as served:
        waiter = await open_waiter(served)
        await waiter.next()
    # the server is cancelled first here (before the tree stops its pool)
    async with waiter.stream:
        answer = await waiter.next()
    assert (answer.ok, answer.code, answer.error) == (
        False,
        7,
        "the tree is stopping before root/jobs: job 1 ended "
        "(a durable pool keeps it: it runs when the pool starts again)",
    )


async def test_cancel_stops_a_running_job_by_an_operator_and_refuses_what_it_cannot_cancel(
    tmp_path: Path,
) -> None:
    gate = Gate()
    async with serving(tmp_path, [gate.pool()]) as served:
        pool = served.sup.find("jobs")
        assert isinstance(pool, otree.PoolHandle)
        job = pool.submit_nowait("gated", 1)
        done = pool.submit_nowait("quick", 2)
        await done.result()
        events = served.sup.events()
        with trio.fail_after(5):
            reply = await served.request("cancel", pool="jobs", id=job.id)
        assert (reply.ok, reply.result) == (True, {"id": "1", "state": "cancelled"})
        event = await next_event(events, "job.cancelled")
        assert (event.path, event.details["state"], event.details["by"]) == (
            "root/jobs/1",
            "running",
            "operator",
        )
        for job_id, error in (
            ("1", "job 1 of root/jobs already finished (cancelled)"),
            ("2", "job 2 of root/jobs already finished (done)"),
            ("99", "root/jobs: no job 99 (jobs: 0 running, 0 queued, 0 retrying, 2 recent finished)"),
        ):
            reply = await served.request("cancel", pool="jobs", id=job_id)
            assert (reply.ok, reply.error, reply.code) == (False, error, 4)


async def test_job_shows_a_live_or_finished_job(tmp_path: Path) -> None:
    gate = Gate()
    async with serving(tmp_path, [gate.pool()]) as served:
        pool = served.sup.find("jobs")
        assert isinstance(pool, otree.PoolHandle)
        await pool.submit_nowait("quick", {"x": [1]}).result()
        pool.submit_nowait("gated", 2, priority=3)
        await trio.testing.wait_all_tasks_blocked()
        reply = await served.request("job", pool="jobs", id="1")
        assert reply.ok, reply.error
        assert {k: reply.result[k] for k in ("id", "kind", "state", "attempts", "result", "error")} == {
            "id": "1",
            "kind": "quick",
            "state": "done",
            "attempts": 1,
            "result": {"x": [1]},
            "error": None,
        }
        live = (await served.request("job", pool="jobs", id="2")).result
        assert (live["state"], live["priority"], live["pid"], live["ended_at"]) == ("running", 3, None, None)
        reply = await served.request("job", pool="", id="1")
        assert (reply.ok, reply.error) == (False, "root is a supervisor: job needs a pool")
        gate.open.set()


async def test_signal_job_refuses_a_task_job_and_a_job_not_running(tmp_path: Path) -> None:
    import sys

    gate = Gate()
    pool = otree.pool(
        "jobs",
        {"gated": gate.gated, "tool": otree.process_job([sys.executable, "-c", "pass"])},
        max_concurrency=1,
    )
    async with serving(tmp_path, [pool]) as served:
        handle = served.sup.find("jobs")
        assert isinstance(handle, otree.PoolHandle)
        handle.submit_nowait("gated")
        handle.submit_nowait("tool")
        await trio.testing.wait_all_tasks_blocked()
        for job_id, error in (
            ("1", "job 1 of root/jobs is a task job: only a process job takes a signal"),
            ("2", "job 2 of root/jobs is not running (queued)"),
        ):
            reply = await served.request("signal", path="jobs", signal=10, job=job_id)
            assert (reply.ok, reply.error, reply.code) == (False, error, 4)
        gate.open.set()


async def test_submit_passes_max_runtime_to_the_pool_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    gate = Gate()  # never opened: only the limit ends the job
    async with serving(tmp_path, [gate.pool()]) as served:
        pool = served.sup.find("jobs")
        assert isinstance(pool, otree.PoolHandle)
        with trio.fail_after(5):
            reply = await served.request("submit", pool="jobs", kind="gated", max_runtime=0.05)
            assert reply.ok, reply
            with pytest.raises(otree.JobFailed) as failed:
                await pool.job(reply.result["id"]).result()
        assert isinstance(failed.value.__cause__, TimeoutError)
        for value, code, error in (
            (-1, 4, "root/jobs: max_runtime must be a number > 0 or None; got -1.0"),
            ("soon", 2, "bad arguments for submit: Expected `float | null`, got `str` - at `$.max_runtime`"),
        ):
            reply = await served.request("submit", pool="jobs", kind="quick", max_runtime=value)
            assert (reply.ok, reply.code, reply.error) == (False, code, error)
