"""Events: every supervisor decision as a msgspec Struct, published to subscribers and the log.

A subscriber never slows the tree: each has a bounded buffer, and when it
overflows the oldest events are dropped and the next event it receives says
how many in ``details["dropped"]``. Events go to the ``otree`` logger too; an
event is only built when a subscriber or an enabled log level wants it.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import msgspec
import trio

from ._info import Event

__all__ = ["EventBus", "EventStream", "level_of"]

_log = logging.getLogger("otree")
_log.addHandler(logging.NullHandler())

DEFAULT_BUFFER = 10_000

# Kinds logged above INFO; every other kind is INFO.
_LEVELS = {
    "supervisor.intensity_exceeded": logging.ERROR,
    "child.shutdown_error": logging.WARNING,
    "child.start_failed": logging.WARNING,
    "job.dropped": logging.WARNING,  # work that will not be done
    "supervisor.intensity_not_persisted": logging.WARNING,  # a crash loop may be forgotten
    "notify.ignored": logging.DEBUG,
}


def level_of(kind: str, reason: str) -> int:
    """The log level of an event: errors are WARNING, giving up is ERROR."""
    if reason == "error" and kind == "child.exited":
        return logging.WARNING
    return _LEVELS.get(kind, logging.INFO)


def _recorded(level: int) -> bool:
    """Whether a record at ``level`` would reach more than the ``otree`` logger's NullHandler (a
    filter, a handler, or logging's last resort), as ``Logger.callHandlers`` would find: with
    logging left as Python starts it, a crash loop builds no ``LogRecord`` (~3 us each)."""
    if _log.filters:
        return True
    found = False
    logger: logging.Logger | None = _log
    while logger is not None:
        for handler in logger.handlers:
            found = True
            if type(handler) is not logging.NullHandler and level >= handler.level:
                return True
        logger = logger.parent if logger.propagate else None
    return not found and logging.lastResort is not None and level >= logging.lastResort.level


class EventBus:
    """Fan-out of one tree's events to its subscribers and the ``otree`` logger."""

    __slots__ = ("_causes", "_streams", "_subscribed", "closed", "sink")

    def __init__(self) -> None:
        # Weak, so a stream its owner dropped without closing stops costing anything.
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._subscribed = False  # cheap "any streams?", refreshed as events are published
        self._causes: list[_Cause] = []
        self.closed = False
        self.sink: Callable[[Event], None] | None = None  # the event log, which gets everything

    def attribute(self, prefix: str, details: dict[str, Any]) -> Callable[[], None]:
        """From now on, events of ``prefix`` and below carry ``details`` too (who caused them).

        Returns the function that ends the attribution. Used for what an operator
        asks through the control socket (``by: operator``).
        """
        cause = _Cause(prefix, details)
        self._causes.append(cause)
        return lambda: self._causes.remove(cause)

    def wants(self, level: int) -> bool:
        """Whether an event at ``level`` would reach anyone (so it is worth building)."""
        return self._subscribed or self.sink is not None or _log.isEnabledFor(level)

    def emit(self, path: str, kind: str, reason: str, details: dict[str, Any]) -> None:
        """Build and publish an event if anyone wants it: the hot path of every decision."""
        level = _LEVELS.get(kind, logging.INFO)
        if self.wants(level):
            self.publish(Event(time.time(), path, kind, reason, details), level)

    def publish(self, event: Event, level: int, error: BaseException | None = None) -> None:
        """Deliver ``event``; ``error`` (a child's exception) goes to the log record only."""
        if self._causes:
            event = self._attributed(event)
        if self.sink is not None:
            self.sink(event)
        if self._subscribed:
            for stream in self._streams:
                stream._offer(event)
            self._subscribed = bool(self._streams)
        if _log.isEnabledFor(level) and _recorded(level):
            # Built by hand: Logger.log would walk the stack for a caller that is always here.
            record = _log.makeRecord(
                _log.name,
                level,
                __file__,
                0,
                "%s %s %s %s",
                (event.path, event.kind, event.reason, event.details),
                (type(error), error, error.__traceback__) if error is not None else None,
                extra={"otree_event": event},
            )
            _log.handle(record)

    def _attributed(self, event: Event) -> Event:
        extra = self.causes(event.path)
        return msgspec.structs.replace(event, details={**event.details, **extra}) if extra else event

    def causes(self, path: str) -> dict[str, Any]:
        """What an event of ``path`` would carry now from ``attribute`` (a request carried into a
        Ray child takes it along, for the remote events it causes)."""
        return {k: v for cause in self._causes if cause.covers(path) for k, v in cause.details.items()}

    def subscribe(self, prefix: str, buffer: int = DEFAULT_BUFFER) -> EventStream:
        stream = EventStream(prefix, buffer)
        if self.closed:
            stream._closed = True
        else:
            self._streams.add(stream)
            self._subscribed = True
        return stream

    def close(self) -> None:
        """End every stream once it has delivered what it holds (the tree has stopped)."""
        self.closed = True
        for stream in list(self._streams):
            stream._end()
        self._streams.clear()
        self._subscribed = False


class _Cause:
    """Details every event of a subtree carries while the cause lasts (compared by identity)."""

    __slots__ = ("details", "prefix", "slash")

    def __init__(self, prefix: str, details: dict[str, Any]) -> None:
        self.prefix = prefix
        self.slash = prefix + "/"
        self.details = details

    def covers(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.slash)


class EventStream:
    """Live events of one supervisor and its descendants, from the moment of subscription.

    Use as ``async for event in stream`` (or inside ``async with`` to unsubscribe
    on exit). The stream ends when the tree has stopped.
    """

    __slots__ = ("__weakref__", "_buffer", "_closed", "_dropped", "_lot", "_maxlen", "_prefix", "_slash")

    def __init__(self, prefix: str, buffer: int) -> None:
        self._prefix = prefix
        self._slash = prefix + "/"
        self._maxlen = buffer
        self._buffer: deque[Event] = deque()
        self._dropped = 0
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()

    def _offer(self, event: Event) -> None:
        if self._closed:
            return
        path = event.path
        if path != self._prefix and not path.startswith(self._slash):
            return
        buffer = self._buffer
        if len(buffer) >= self._maxlen:
            buffer.popleft()
            self._dropped += 1
        buffer.append(event)
        self._lot.unpark_all()

    def _end(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            await self._lot.park()
        event = self._buffer.popleft()
        if self._dropped:
            event = msgspec.structs.replace(event, details={**event.details, "dropped": self._dropped})
            self._dropped = 0
        return event

    async def aclose(self) -> None:
        """Unsubscribe; buffered events are discarded."""
        self._buffer.clear()
        self._end()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
