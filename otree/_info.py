"""What a supervisor handle reports about its children: plain, frozen Structs."""

from __future__ import annotations

from typing import Literal

import msgspec

from ._strategy import ExitReason

__all__ = ["ChildInfo", "ChildState", "Counts", "ExitInfo"]

ChildState = Literal["starting", "running", "restarting", "stopping", "stopped"]


class ExitInfo(msgspec.Struct, frozen=True):
    """How a child's last run ended.

    Attributes:
      reason: ``normal`` (returned / exit 0), ``shutdown`` (stopped by its
        supervisor, or raised ``otree.Shutdown``) or ``error``.
      detail: the exception as ``Type: message``, ``killed`` when a stop ran
        out of grace, the ``Shutdown`` reason, or empty.
      exit_code, signal: for process children; None for tasks.
    """

    reason: ExitReason
    detail: str = ""
    exit_code: int | None = None
    signal: int | None = None


class ChildInfo(msgspec.Struct, frozen=True):
    """One child as ``which_children`` reports it.

    ``restarts`` counts automatic restarts only; ``started_at`` is the
    wall-clock time of the last start (None if never started).
    """

    id: str
    path: str
    kind: str
    state: ChildState
    pid: int | None
    restarts: int
    started_at: float | None
    exit: ExitInfo | None
    status: str | None


class Counts(msgspec.Struct, frozen=True):
    """OTP's ``count_children``: specs held, children running, and specs by type."""

    specs: int
    active: int
    supervisors: int
    workers: int
