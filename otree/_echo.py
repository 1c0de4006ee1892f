"""The event lines ``otree run`` prints on stderr, with a flood of the same refusal summarised.

A pool that refuses every submission, a hold per job, a client sending garbage:
the same (path, kind, reason) again and again would bury everything else on
the terminal. The text format prints the first of them, then at most one line
per ``REPEAT_WINDOW`` seconds saying how many more came (``... 32 more
job.rejected budget in the last 10s``), and a last such line when the run ends.
The event log and ``otree events`` keep every event; so does ``--log-format
json``, which is read by programs rather than people.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection
from typing import TextIO

import msgspec
import trio

from ._info import Event
from ._render import format_event, time_of_day

__all__ = ["REPEATED_KINDS", "REPEAT_WINDOW", "EventEcho", "Repeats", "Summary"]

# Kinds that come once per refused request or per held job, not once per decision of the tree.
REPEATED_KINDS = frozenset({"job.rejected", "job.held", "control.error", "control.refused"})
REPEAT_WINDOW = 10.0
_TICK = 1.0  # how often the summaries that are due are printed

_log = logging.getLogger("otree")


class Summary(msgspec.Struct, frozen=True):
    """``count`` more events of ``kind`` with ``reason`` at ``path`` in the last ``seconds``."""

    path: str
    kind: str
    reason: str
    count: int
    seconds: float


class _Run:
    """One (path, kind, reason) being summarised: when its last line was printed, how many since."""

    __slots__ = ("held", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.held = 0


class Repeats:
    """Which events to print when the same (path, kind, reason) comes again and again. Pure (given ``now``).

    An event of a summarised kind is printed if nothing of its (path, kind,
    reason) was printed in the last ``window`` seconds; otherwise it is counted,
    and ``due`` turns the count into one summary per window. A key with nothing
    counted for a whole window is forgotten, so its next event prints in full.
    """

    def __init__(self, kinds: Collection[str], window: float) -> None:
        self.kinds = frozenset(kinds)
        self.window = window
        self._runs: dict[tuple[str, str, str], _Run] = {}

    def admit(self, event: Event, now: float) -> bool:
        """Whether to print ``event`` (else it is counted for the next summary)."""
        if event.kind not in self.kinds:
            return True
        key = (event.path, event.kind, event.reason)
        run = self._runs.get(key)
        if run is None or (not run.held and now - run.since >= self.window):
            self._runs[key] = _Run(now)
            return True
        run.held += 1
        return False

    def tracking(self) -> bool:
        """Whether any (path, kind, reason) is being watched (so summaries may fall due)."""
        return bool(self._runs)

    def due(self, now: float, *, final: bool = False) -> list[Summary]:
        """The summaries whose window has ended (all that hold a count when ``final``), oldest key first."""
        summaries = []
        for key, run in list(self._runs.items()):
            if not final and now - run.since < self.window:
                continue
            if run.held:
                summaries.append(Summary(*key, count=run.held, seconds=now - run.since))
                run.since = now
                run.held = 0
            else:
                del self._runs[key]
        return summaries


class EventEcho(logging.StreamHandler[TextIO]):
    """Prints every otree event record as one line (text) or one JSON object, repeats summarised in text."""

    def __init__(self, stream: TextIO, fmt: str, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(stream)
        self.setLevel(logging.INFO)
        self.json = fmt == "json"
        self.clock = clock  # of the summaries' windows
        self._repeats = Repeats(() if self.json else REPEATED_KINDS, REPEAT_WINDOW)
        self._idle: trio.Event | None = None  # set when the sleeping ticker has something to watch

    def set_level(self, name: str) -> None:
        """Set what the ``otree`` logger builds and this prints (``otree log-level``)."""
        level = logging.getLevelName(name.upper())
        if not isinstance(level, int) or level == logging.NOTSET:  # NOTSET would defer to the root logger
            raise ValueError(f"unknown log level {name!r} (use DEBUG, INFO, WARNING, ERROR or CRITICAL)")
        _log.setLevel(level)
        self.setLevel(level)

    def level_name(self) -> str:
        """The level in force, by name."""
        return logging.getLevelName(self.level)

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "otree_event", None)
        if event is None or self._repeats.admit(event, self.clock()):
            super().emit(record)
        if self._idle is not None and self._repeats.tracking():
            self._idle.set()

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "otree_event", None)
        if event is None:
            return record.getMessage()
        if self.json:
            return msgspec.json.encode(event).decode()
        return format_event(event)

    def _summarise(self, *, final: bool = False) -> None:
        self.acquire()
        try:
            summaries = self._repeats.due(self.clock(), final=final)
        finally:
            self.release()
        stamp = time_of_day(time.time())
        for summary in summaries:
            line = f"{stamp} {summary.path} {summary.count} more {summary.kind} {summary.reason}".rstrip()
            self.handle(logging.makeLogRecord({"msg": f"{line} in the last {summary.seconds:.0f}s"}))

    async def serve(self) -> None:
        """Print the summaries as they fall due (for as long as the tree runs).

        Ticks every ``_TICK`` seconds (on whole ticks of trio's clock) only while some
        repeat is watched: a tree that prints no summarised kind is never woken by it.
        """
        while True:
            if not self._repeats.tracking():
                self._idle = trio.Event()
                await self._idle.wait()
                self._idle = None
            await trio.sleep_until((math.floor(trio.current_time() / _TICK) + 1) * _TICK)
            self._summarise()

    def close(self) -> None:
        """Print what is still counted: the run is over."""
        self._summarise(final=True)
        super().close()
