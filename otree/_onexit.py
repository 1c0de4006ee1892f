"""``on_exit`` hooks: an application's async callable told of each exit of a child.

A hook runs beside the children, so it never delays a restart; its exception is a
``child.on_exit_failed`` event (WARNING), never the supervisor's.
"""

from __future__ import annotations

import logging
import time

from ._events import EventBus
from ._info import Event, ExitInfo
from ._spec import OnExit

__all__ = ["run_on_exit"]


async def run_on_exit(bus: EventBus, hook: OnExit, path: str, exit_info: ExitInfo) -> None:
    """``await hook(path, exit_info)``; an exception from it becomes one event on ``bus``."""
    try:
        await hook(path, exit_info)
    except Exception as exc:  # noqa: BLE001 - a hook's failure is reported, not raised
        details = {"exception": type(exc).__name__, "message": str(exc), "exit": exit_info.reason}
        bus.publish(Event(time.time(), path, "child.on_exit_failed", "error", details), logging.WARNING, exc)
