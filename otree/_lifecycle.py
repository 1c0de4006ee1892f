"""Pure decisions of a child's life beyond OTP's restart rules: parked, held, woken (plain data in and out).

OTP decides a restart by the restart type and the exit reason (``_strategy``).
otree adds children that wait to be asked: ``on_demand`` ones, never restarted
automatically; ones declared ``autostart=False``; ones parked after
``idle_timeout``; and ones stopped by hand. A *wake* (``sup.wake(id)``,
``otree start``) brings them back. The supervisor carries these decisions out.
"""

from __future__ import annotations

from typing import Literal

from ._info import ChildState
from ._strategy import Restart

__all__ = ["Rest", "WakeAction", "joins_group_restart", "wake_action"]

# Why a stopped child stays stopped whatever its restart type, until something starts it:
# "parked" (it was idle for its idle_timeout), "held" (stopped by hand: terminate_child,
# otree stop), or "" (neither: it exited, or never started).
Rest = Literal["", "parked", "held"]

# What a wake does: start the child; first let a run that is ending by itself end, then start
# it; nothing (it runs, or its supervisor is restarting it); or nothing because it was
# stopped by hand and only an operator's start (or restart_child) undoes that.
WakeAction = Literal["start", "finish_then_start", "none", "held"]


def joins_group_restart(restart: Restart, rest: Rest, *, ever_started: bool) -> bool:
    """Whether a group restart (one_for_all, rest_for_one) starts this child with the others.

    Never an ``on_demand`` child (not restarted automatically, not even as a bystander),
    a parked one (parking outlasts the restart type) or one that never started
    (``autostart=False``, not woken yet): each waits for a wake. A child stopped by hand
    does join, as OTP's one_for_all restarts it.
    """
    return restart != "on_demand" and rest != "parked" and ever_started


def wake_action(state: ChildState, *, running: bool, ending: bool, rest: Rest, manual: bool) -> WakeAction:
    """What a wake of a child in ``state`` does ("wake or spawn": never an error for a running child).

    ``running``: it has a run; ``ending``: that run is on its way out by itself (idle,
    past ``max_runtime``, or exited with its exit not yet handled), so the wake waits for
    it and starts the child again rather than find it gone a moment later. ``manual``: an
    operator's start, which also starts a child stopped by hand; an application's wake does
    not, so that a stop by hand stays a stop.
    """
    if state == "restarting":
        return "none"  # its supervisor brings it back (after a backoff, or a failed start's retry)
    if running:
        return "finish_then_start" if ending else "none"
    if rest == "held" and not manual:
        return "held"
    return "start"
