"""The event log: buffered JSON lines, size rotation, marks, torn lines and filters."""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from otree._eventlog import EventLog
from otree._info import Event
from otree._logfiles import LOG_NAME, EventFilter, LogMark, log_files, read_events


def event(
    index: int,
    path: str = "fleet/a",
    kind: str = "child.started",
    *,
    time: float | None = None,
    pad: int = 0,
) -> Event:
    details: dict[str, Any] = {"i": index}
    if pad:
        details["pad"] = "x" * pad
    return Event(float(index) if time is None else time, path, kind, "normal", details)


def line_of(item: Event) -> bytes:
    return msgspec.json.encode(item) + b"\n"


def events_only(items: list[Event | str]) -> list[Event]:
    assert all(isinstance(item, Event) for item in items), items
    return [item for item in items if isinstance(item, Event)]


def check_files(state: Path, max_bytes: int) -> list[list[Event]]:
    """Every file holds whole lines that all decode; none is over ``max_bytes`` but for one long line."""
    decoder = msgspec.json.Decoder(Event)
    contents = []
    for path in log_files(state):
        data = path.read_bytes()
        assert data, f"{path.name} is empty"
        assert data.endswith(b"\n"), f"{path.name} ends in a split line"
        lines = data.split(b"\n")[:-1]
        assert all(lines), f"{path.name} has an empty line"
        decoded = [decoder.decode(line) for line in lines]
        if len(data) > max_bytes:
            assert len(lines) == 1, f"{path.name} is {len(data)} bytes in {len(lines)} lines"
        contents.append(decoded)
    return contents


async def serve_until_finished(log: EventLog, body: Any) -> None:
    """Run ``log.serve`` around ``await body()``, then ``finish()`` and wait for ``serve`` to return."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.serve)
        await body()
        log.finish()


# ---------------------------------------------------------------------------------------------
# writing


def test_events_are_json_lines_in_order(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME)
    appended = [event(index, kind=f"child.k{index}") for index in range(20)]
    for item in appended:
        log.append(item)
    log.close()
    data = (tmp_path / LOG_NAME).read_bytes()
    assert data == b"".join(line_of(item) for item in appended)
    assert len(data.splitlines()) == 20
    assert list(read_events(tmp_path)) == appended


def test_append_only_buffers_until_close(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME)
    log.append(event(1))
    assert (tmp_path / LOG_NAME).read_bytes() == b""  # nothing written in the tree's thread
    log.close()
    assert list(read_events(tmp_path)) == [event(1)]


class _Bus:
    def __init__(self) -> None:
        self.sink: Any = None

    def publish(self, item: Event) -> None:
        self.sink(item)


async def test_an_idle_log_arms_no_timer_and_the_next_event_wakes_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # an idle tree must not wake every interval: the writer sleeps until an event comes
    log = EventLog(tmp_path / LOG_NAME)
    bus = _Bus()
    log.attach(bus)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.serve)
        bus.publish(event(1))
        await trio.sleep(10 * log.interval)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == float("inf")
        bus.publish(event(2))  # wakes the writer by itself: it is written without a mark
        for _ in range(500):  # the write runs in a worker thread: poll for it, for at most 5 s
            if list(read_events(tmp_path)) == [event(1), event(2)]:
                break
            await trio.to_thread.run_sync(time.sleep, 0.01)
        assert list(read_events(tmp_path)) == [event(1), event(2)]
        log.finish()
    log.close()
    assert list(read_events(tmp_path)) == [event(1), event(2)]


def backup_numbers(files: list[Path]) -> list[int]:
    """The numbers of the rotated files among ``files`` (``events.jsonl.<N>``), in the given order."""
    return [int(path.name.rsplit(".", 1)[1]) for path in files if path.name != LOG_NAME]


def test_reopened_log_appends(tmp_path: Path) -> None:
    first = EventLog(tmp_path / LOG_NAME)
    first.append(event(1))
    first.close()
    second = EventLog(tmp_path / LOG_NAME)
    second.append(event(2))
    second.close()
    assert list(read_events(tmp_path)) == [event(1), event(2)]


def test_close_twice_is_harmless(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME)
    log.append(event(1))
    log.close()
    log.close()
    assert list(read_events(tmp_path)) == [event(1)]


def test_empty_state_dir_reads_nothing(tmp_path: Path) -> None:
    assert list(read_events(tmp_path)) == []
    assert log_files(tmp_path) == []


def test_file_mode_is_0600(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=2)
        for index in range(10):
            log.append(event(index))
        log.close()
    finally:
        os.umask(previous)
    files = log_files(tmp_path)
    assert backup_numbers(files) == [2, 3] and files[-1].name == LOG_NAME  # .1 was dropped
    for path in files:  # the files opened at rotation too
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_non_json_details_are_written_as_repr(tmp_path: Path) -> None:
    class Thing:
        def __repr__(self) -> str:
            return "<Thing 7>"

    error = ValueError("boom")
    log = EventLog(tmp_path / LOG_NAME)
    log.append(Event(1.0, "fleet/a", "child.exited", "error", {"thing": Thing(), "error": error}))
    log.append(Event(2.0, "fleet/a", "child.exited", "error", {"nested": {"deep": [object, 1j]}}))
    log.append(Event(3.0, "fleet/a", "child.exited", "error", {"keys": {(1, 2): "pair"}}))
    log.append(Event(4.0, "fleet/a", "child.exited", "error", {"set": {3, 1, 2}}))
    log.append(event(5))
    log.close()
    first, second, third, fourth, fifth = events_only(list(read_events(tmp_path)))
    assert first.details == {"thing": "<Thing 7>", "error": "ValueError('boom')"}
    assert second.details == {"nested": {"deep": [repr(object), "1j"]}}
    assert third.details == {"keys": {"(1, 2)": "pair"}}
    # a set is not lost: msgspec writes it natively, as an array of its members
    assert sorted(fourth.details["set"]) == [1, 2, 3]
    assert fifth == event(5)


# ---------------------------------------------------------------------------------------------
# rotation


def test_rotation_keeps_lines_whole_and_drops_the_oldest(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=2)
    appended = [event(index, pad=(index * 7) % 40) for index in range(40)]
    for item in appended:
        log.append(item)
    log.close()
    files = log_files(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in files)
    numbers = backup_numbers(files)
    assert len(numbers) == 2 and numbers[1] == numbers[0] + 1 and files[-1].name == LOG_NAME
    oldest, newer, current = check_files(tmp_path, 300)
    assert all(path.stat().st_size <= 300 for path in log_files(tmp_path))
    # backups are numbered in order of rotation, never reused; together a tail of what was appended
    survivors = oldest + newer + current
    assert survivors == appended[-len(survivors) :]
    assert appended[0] not in survivors
    assert survivors[-1] == appended[-1]
    assert list(read_events(tmp_path)) == survivors


def test_rotation_across_many_batches(tmp_path: Path) -> None:
    # each mark seals a batch, and close() writes the batches one after another
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=2)
    appended = []
    for index in range(30):
        item = event(index, pad=index % 5)
        appended.append(item)
        log.append(item)
        if index % 2:
            log.mark()
    log.close()
    contents = check_files(tmp_path, 300)
    assert len(contents) == 3
    survivors = [item for content in contents for item in content]
    assert survivors == appended[-len(survivors) :]
    assert len(survivors) < len(appended)
    assert list(read_events(tmp_path)) == survivors


def test_at_least_one_backup_is_kept(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="event log backups must be >= 1; got 0"):
        EventLog(tmp_path / LOG_NAME, backups=0)
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=1)
    appended = [event(index) for index in range(10)]
    for item in appended:
        log.append(item)
    log.close()
    assert len(log_files(tmp_path)) == 2
    survivors = [item for content in check_files(tmp_path, 300) for item in content]
    assert survivors == appended[-len(survivors) :]


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=10)
    appended = [event(0), event(1), event(2, pad=500), event(3), event(4)]
    for item in appended:
        log.append(item)
    log.close()
    contents = check_files(tmp_path, 300)
    assert contents == [[event(0), event(1)], [event(2, pad=500)], [event(3), event(4)]]
    assert list(read_events(tmp_path)) == appended


def test_a_long_first_line_in_an_empty_file(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME, max_bytes=100, backups=10)
    log.append(event(0, pad=300))
    log.close()
    assert check_files(tmp_path, 100) == [[event(0, pad=300)]]


@pytest.mark.parametrize("how", ["long line ends a batch", "reopened on a big file"])
def test_an_oversized_file_gets_no_more_lines(tmp_path: Path, how: str) -> None:
    long = event(0, pad=400)
    if how == "long line ends a batch":
        log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=10)
        log.append(long)
        log.mark()  # the long line is the end of one batch ...
    else:
        big = EventLog(tmp_path / LOG_NAME, max_bytes=10_000, backups=10)
        big.append(long)
        big.close()
        log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=10)
    rest = [event(index) for index in range(1, 12)]  # ... and the next batch is longer than it
    for item in rest:
        log.append(item)
    log.close()
    contents = check_files(tmp_path, 300)  # the long line's file holds it alone
    assert contents[0] == [long]
    assert [item for content in contents for item in content] == [long, *rest]


@settings(max_examples=60, deadline=None)
@given(
    pads=st.lists(st.integers(0, 180), min_size=1, max_size=40),
    seals=st.lists(st.booleans(), max_size=40),
    backups=st.integers(1, 4),
)
def test_fuzz_rotation_invariants(pads: list[int], seals: list[bool], backups: int) -> None:
    # lines up to ~270 bytes: every line fits in a file of max_bytes=300
    with tempfile.TemporaryDirectory() as directory:
        state = Path(directory)
        log = EventLog(state / LOG_NAME, max_bytes=300, backups=backups)
        appended = []
        for index, pad in enumerate(pads):
            item = event(index, pad=pad)
            appended.append(item)
            log.append(item)
            if index < len(seals) and seals[index]:
                log.mark()
        log.close()
        contents = check_files(state, 300)
        assert all(path.stat().st_size <= 300 for path in log_files(state))
        assert len(contents) <= backups + 1
        assert {path.name for path in state.iterdir()} == {path.name for path in log_files(state)}
        survivors = [item for content in contents for item in content]
        assert survivors
        assert survivors == appended[-len(survivors) :]
        assert list(read_events(state)) == survivors


# ---------------------------------------------------------------------------------------------
# serve() and marks


async def test_serve_writes_every_interval(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    log = EventLog(tmp_path / LOG_NAME, interval=0.5)

    async def body() -> None:
        log.append(event(1))
        log.append(event(2))
        # the writer wakes every interval on its own; poll the file (mock time, bounded)
        for _ in range(1000):
            if len(list(read_events(tmp_path))) == 2:
                break
            await trio.sleep(0.5)
        assert list(read_events(tmp_path)) == [event(1), event(2)]
        log.append(event(3))

    await serve_until_finished(log, body)
    log.close()
    assert list(read_events(tmp_path)) == [event(1), event(2), event(3)]


async def test_finish_stops_serve_with_nothing_pending(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = EventLog(tmp_path / LOG_NAME, interval=3600)

    async def body() -> None:
        await trio.testing.wait_all_tasks_blocked()

    start = trio.current_time()
    await serve_until_finished(log, body)
    assert trio.current_time() - start < 3600  # serve returned at once, not after the interval
    log.close()
    assert list(read_events(tmp_path)) == []


async def test_mark_is_set_once_the_events_before_it_are_written(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = EventLog(tmp_path / LOG_NAME, interval=3600)
    before = [event(index) for index in range(5)]
    after = [event(index) for index in range(5, 9)]
    marks = []

    async def body() -> None:
        for item in before:
            log.append(item)
        start = trio.current_time()
        pending = log.mark()
        await pending.done.wait()
        assert trio.current_time() - start < 3600  # a mark wakes the writer at once, not after the interval
        marks.append(pending.mark)
        assert list(read_events(tmp_path)) == before
        assert (tmp_path / LOG_NAME).stat().st_size == pending.mark.offset
        for item in after:
            log.append(item)

    await serve_until_finished(log, body)
    log.close()
    (mark,) = marks
    assert mark == LogMark(1, sum(len(line_of(item)) for item in before))  # the live file, to be .1
    assert list(read_events(tmp_path, until=mark)) == before
    assert list(read_events(tmp_path)) == before + after


@pytest.mark.parametrize("count_before", [0, 1, 3, 4, 7])
async def test_mark_survives_rotation_after_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, count_before: int
) -> None:
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=10)
    before = [event(index) for index in range(count_before)]
    after = [event(index) for index in range(count_before, count_before + 12)]
    marks = []

    async def body() -> None:
        for item in before:
            log.append(item)
        pending = log.mark()
        await pending.done.wait()
        marks.append(pending.mark)
        for index, item in enumerate(after):
            log.append(item)
            if index % 3 == 2:  # several batches after the mark, some rotating the file
                later = log.mark()
                await later.done.wait()

    await serve_until_finished(log, body)
    log.close()
    (mark,) = marks
    check_files(tmp_path, 300)
    # the marked file was rotated away from the live name, and is still there as a backup
    assert (tmp_path / f"{LOG_NAME}.{mark.generation}") in log_files(tmp_path)
    assert list(read_events(tmp_path, until=mark)) == before
    assert list(read_events(tmp_path)) == before + after


async def test_successive_marks(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=20)
    appended: list[Event] = []
    cuts: list[tuple[LogMark, int]] = []

    async def body() -> None:
        for index in range(25):
            item = event(index)
            log.append(item)
            appended.append(item)
            if index % 4 == 0:
                pending = log.mark()
                await pending.done.wait()
                cuts.append((pending.mark, len(appended)))

    await serve_until_finished(log, body)
    log.close()
    for mark, count in cuts:
        assert list(read_events(tmp_path, until=mark)) == appended[:count]


def test_marks_are_set_by_close_without_serve(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=10)
    before = [event(index) for index in range(4)]
    after = [event(index) for index in range(4, 12)]
    for item in before:
        log.append(item)
    pending = log.mark()
    for item in after:
        log.append(item)
    assert not pending.done.is_set()
    log.close()
    assert pending.done.is_set()
    assert list(read_events(tmp_path, until=pending.mark)) == before
    assert list(read_events(tmp_path)) == before + after


async def test_mark_whose_file_was_dropped_returns_no_later_events(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=1)
    marks = []

    async def body() -> None:
        log.append(event(0))
        pending = log.mark()
        await pending.done.wait()
        marks.append(pending.mark)
        for index in range(1, 20):
            log.append(event(index))

    await serve_until_finished(log, body)
    log.close()
    (mark,) = marks
    # the marked file is gone: the two surviving files hold only events appended after the mark
    survivors = events_only(list(read_events(tmp_path)))
    assert len(log_files(tmp_path)) == 2
    assert event(0) not in survivors
    assert list(read_events(tmp_path, until=mark)) == []  # nothing from before the mark is left


async def test_mark_is_set_even_if_serve_is_cancelled_mid_write(tmp_path: Path) -> None:
    # the write in the worker thread is not abandoned, and the marks are set before serve
    # reaches a checkpoint where the cancellation lands
    log = EventLog(tmp_path / LOG_NAME, interval=3600)
    entered = threading.Event()
    release = threading.Event()
    write_batches = log._write_batches

    def slow_write_batches(work: Any) -> None:
        entered.set()
        release.wait()
        write_batches(work)

    log._write_batches = slow_write_batches  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.serve)
        log.append(event(1))
        pending = log.mark()
        await trio.to_thread.run_sync(entered.wait)  # the writer is in its thread now
        nursery.cancel_scope.cancel()
        release.set()
    log.close()
    assert list(read_events(tmp_path, until=pending.mark)) == [event(1)]
    assert pending.done.is_set()


# ---------------------------------------------------------------------------------------------
# reading a damaged log


def test_torn_last_line_is_reported_and_good_events_kept(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME)
    appended = [event(index) for index in range(3)]
    for item in appended:
        log.append(item)
    log.close()
    with (tmp_path / LOG_NAME).open("ab") as file:
        file.write(line_of(event(3))[:25])  # the writer was killed mid-line: no newline
    items = list(read_events(tmp_path))
    assert items[:3] == appended
    assert len(items) == 4
    torn = items[3]
    assert isinstance(torn, str)
    assert f"{tmp_path / LOG_NAME}:4:" in torn
    assert "unreadable line" in torn
    assert "\n" not in torn


def test_garbage_line_in_a_backup_is_reported_in_place(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME, max_bytes=300, backups=5)
    appended = [event(index) for index in range(8)]
    for item in appended:
        log.append(item)
    log.close()
    backup = log_files(tmp_path)[-2]  # the newest backup
    good = backup.read_bytes()
    count = len(good.splitlines())
    backup.write_bytes(good + b"\x00\xffnot json\n\n")
    items = list(read_events(tmp_path))
    (report,) = [item for item in items if isinstance(item, str)]
    assert f"{backup}:{count + 1}:" in report
    assert [item for item in items if isinstance(item, Event)] == appended
    # in the stream where it was found: after the backup's events, before the live file's
    assert items.index(report) == len(appended) - len(list(read_events_of(tmp_path / LOG_NAME)))


def read_events_of(path: Path) -> list[Event]:
    decoder = msgspec.json.Decoder(Event)
    return [decoder.decode(line) for line in path.read_bytes().splitlines()]


def test_a_valid_json_line_that_is_not_an_event_is_reported(tmp_path: Path) -> None:
    (tmp_path / LOG_NAME).write_bytes(line_of(event(1)) + b'{"time": "noon"}\n' + line_of(event(2)))
    items = list(read_events(tmp_path))
    assert items[0] == event(1)
    assert isinstance(items[1], str)
    assert f"{LOG_NAME}:2:" in items[1]
    assert items[2] == event(2)


def test_log_files_ignores_other_names(tmp_path: Path) -> None:
    for name in [LOG_NAME, f"{LOG_NAME}.1", f"{LOG_NAME}.10", f"{LOG_NAME}.2", f"{LOG_NAME}.bak", "x.jsonl"]:
        (tmp_path / name).write_bytes(b"")
    assert [path.name for path in log_files(tmp_path)] == [  # by number: the order they were rotated
        f"{LOG_NAME}.1",
        f"{LOG_NAME}.2",
        f"{LOG_NAME}.10",
        LOG_NAME,
    ]


# ---------------------------------------------------------------------------------------------
# filters


def at(path: str, kind: str = "child.started", time: float = 0.0) -> Event:
    return Event(time, path, kind)


@pytest.mark.parametrize(
    ("wanted", "path", "matches"),
    [
        ("fleet/a", "fleet/a", True),
        ("fleet/a", "fleet/a/b", True),
        ("fleet/a", "fleet/a/b/c", True),
        ("fleet/a", "fleet/ab", False),
        ("fleet/a", "fleet", False),
        ("fleet/a", "fleet/b", False),
        ("fleet", "fleet", True),
        ("fleet", "fleet/a", True),
        ("fleet", "fleetx/a", False),
        # without the root's id
        ("a", "fleet/a", True),
        ("a", "fleet/a/b", True),
        ("a", "fleet/ab", False),
        ("a", "fleet/b/a", False),
        ("a/b", "fleet/a/b", True),
        ("a/b", "fleet/a/bc", False),
        ("", "fleet/anything", True),
    ],
)
def test_filter_by_path(wanted: str, path: str, matches: bool) -> None:
    assert EventFilter(path=wanted)(at(path)) is matches


@pytest.mark.parametrize(
    ("kind", "matches"),
    [
        ("child.exited", True),
        ("child.started", True),
        ("child", False),
        ("supervisor.started", False),
        ("xchild.exited", False),
    ],
)
def test_filter_by_kind_glob(kind: str, matches: bool) -> None:
    assert EventFilter(kind="child.*")(at("fleet/a", kind)) is matches


def test_filter_by_kind_is_case_sensitive_and_exact_without_glob() -> None:
    assert not EventFilter(kind="Child.*")(at("fleet/a", "child.exited"))
    assert EventFilter(kind="child.exited")(at("fleet/a", "child.exited"))
    assert not EventFilter(kind="child.exited")(at("fleet/a", "child.exited_late"))


def test_filter_by_since_is_inclusive() -> None:
    wanted = EventFilter(since=10.0)
    assert not wanted(at("fleet/a", time=9.99))
    assert wanted(at("fleet/a", time=10.0))
    assert wanted(at("fleet/a", time=11.0))
    assert EventFilter(since=0.0)(at("fleet/a", time=0.0))


def test_filter_combines_all_conditions_and_empty_matches_all(tmp_path: Path) -> None:
    log = EventLog(tmp_path / LOG_NAME)
    appended = [
        at("fleet/a", "child.started", 1.0),
        at("fleet/a/b", "child.exited", 2.0),
        at("fleet/ab", "child.exited", 3.0),
        at("fleet/a", "supervisor.started", 4.0),
        at("fleet/a/c", "child.exited", 5.0),
        at("fleet", "child.exited", 6.0),
    ]
    for item in appended:
        log.append(item)
    log.close()
    logged = events_only(list(read_events(tmp_path)))
    assert [item for item in logged if EventFilter()(item)] == appended
    wanted = EventFilter(path="a", kind="child.*", since=2.0)
    assert [item.time for item in logged if wanted(item)] == [2.0, 5.0]


def test_an_unencodable_detail_loses_only_its_details(tmp_path: Path) -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    loop: dict[str, Any] = {}
    loop["self"] = loop
    log = EventLog(tmp_path / LOG_NAME)
    log.append(event(1))
    log.append(Event(2.0, "fleet/a", "child.exited", "error", {"thing": Hostile()}))
    log.append(Event(3.0, "fleet/a", "child.exited", "error", {"loop": loop}))
    log.append(event(4))
    log.close()
    first, hostile, looped, last = events_only(list(read_events(tmp_path)))
    assert (first, last) == (event(1), event(4))
    assert (hostile.time, hostile.kind) == (2.0, "child.exited")
    assert hostile.details == {"unencodable_details": "RuntimeError: no repr"}
    assert looped.time == 3.0 and list(looped.details) == ["unencodable_details"]


def test_a_write_error_is_counted_and_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = EventLog(tmp_path / LOG_NAME)

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    log.append(event(1))
    monkeypatch.setattr(os, "write", full)
    log.close()
    monkeypatch.undo()
    assert log.lost == 1
    assert "1 events not written: [Errno 28] No space left on device" in caplog.text


def test_a_torn_last_line_does_not_swallow_the_next_runs_first_event(tmp_path: Path) -> None:
    first = EventLog(tmp_path / LOG_NAME)
    first.append(event(1))
    first.close()
    with (tmp_path / LOG_NAME).open("ab") as file:
        file.write(b'{"time": 2.0, "path": "fle')  # the writer was killed mid-line
    second = EventLog(tmp_path / LOG_NAME)
    second.append(event(3))
    second.close()
    assert list(read_events(tmp_path)) == [
        event(1),
        f"{tmp_path / LOG_NAME}:2: unreadable line skipped (Input data was truncated)",
        event(3),
    ]
