"""Restart intensity, backoff and circuit-breaker arithmetic: pure, the clock is passed in, no trio.

OTP's ``add_restart`` keeps every restart of the last period and walks the list
on each restart. Here a deque holds them oldest first, so expired entries fall
off the front and each restart costs amortised O(1); the deque never holds more
than ``max_restarts + 1`` entries because the supervisor gives up at that point.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Literal

__all__ = ["CircuitState", "JitterMode", "RestartWindow", "backoff_delay"]


class RestartWindow:
    """The restarts of one supervisor within the last ``max_seconds``.

    A restart at time ``t`` counts while ``now - t <= max_seconds`` (otree's
    window is in float seconds; OTP's is in whole seconds).
    """

    __slots__ = ("_times", "max_restarts", "max_seconds")

    def __init__(self, max_restarts: int, max_seconds: float) -> None:
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self._times: deque[float] = deque()

    def add_restart(self, now: float) -> bool:
        """Record a restart at ``now``; False when that makes more than ``max_restarts``."""
        times = self._times
        times.append(now)
        limit = self.max_seconds
        while now - times[0] > limit:
            times.popleft()
        return len(times) <= self.max_restarts

    def in_window(self, now: float) -> int:
        """How many recorded restarts still count at ``now`` (``now`` never goes back)."""
        times = self._times
        while times and now - times[0] > self.max_seconds:
            times.popleft()
        return len(times)

    def wall_times(self, now: float, wall_now: float) -> list[float]:
        """The restarts still counting at ``now``, as wall-clock times (to outlive this process)."""
        self.in_window(now)
        return [wall_now - (now - t) for t in self._times]

    def restore(self, wall_times: Sequence[float], now: float, wall_now: float) -> None:
        """Count restarts an earlier otree recorded as wall-clock times, on this clock.

        Those out of the window are dropped; one that the wall clock puts in the future
        (it was set back) counts as now; at most ``max_restarts + 1`` are kept.
        """
        times = sorted(min(now, now - (wall_now - wall)) for wall in wall_times)
        kept = [t for t in times if now - t <= self.max_seconds][-(self.max_restarts + 1) :]
        self._times = deque(sorted([*self._times, *kept]))


JitterMode = Literal["symmetric", "down"]


def backoff_delay(
    attempt: int,
    *,
    initial: float,
    maximum: float,
    factor: float,
    jitter: float,
    unit: float,
    step: float = 0.0,
    delays: Sequence[float] = (),
    mode: JitterMode = "symmetric",
) -> float:
    """Delay before the ``attempt``-th consecutive restart or retry (1-based).

    The base delay is the ``attempt``-th entry of ``delays`` (an explicit schedule, its
    last entry repeated) or, without one, ``min(maximum, initial * factor**(attempt-1)
    + step * (attempt-1))`` (exponential, or linear with ``factor=1`` and a ``step``).
    ``unit`` is a uniform draw in [0, 1) supplied by the caller (so tests can pin it)
    that places the delay within the jitter: ``mode="symmetric"`` scales the base by
    ``1 + jitter * (2*unit - 1)`` (± jitter); ``"down"`` by ``1 - jitter * unit``, so the
    delay never exceeds the base (``jitter=0.5``: between half and the full delay).
    """
    if delays:
        base = delays[min(attempt, len(delays)) - 1]
    else:
        try:
            growth = initial * factor ** (attempt - 1)
        except OverflowError:
            growth = math.inf if initial > 0 else 0.0
        base = min(maximum, growth + step * (attempt - 1))
    if mode == "down":
        return max(0.0, base * (1.0 - jitter * unit))
    return max(0.0, base * (1.0 + jitter * (2.0 * unit - 1.0)))


class CircuitState:
    """A circuit breaker's arithmetic: closed, open for ``cooldown`` s after ``failures`` in a row,
    then half-open, letting one trial through. Pure: the clock is passed in.

    Only the trial decides a half-open circuit: its success closes it, its failure opens it
    again. A job that started before the circuit opened may end while it is open or
    half-open; its failure is counted, but its success closes nothing (it says nothing about
    the service since the opening). Jobs are named by a token the caller chooses (an id).
    """

    __slots__ = ("_failures_in_row", "_opened_at", "_trial", "cooldown", "failures", "state")

    def __init__(self, failures: int, cooldown: float) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.state: str = "closed"
        self._failures_in_row = 0
        self._opened_at = 0.0
        self._trial: Hashable | None = None  # the job running as the half-open trial

    def allow(self, now: float, job: Hashable) -> tuple[bool, str | None]:
        """Whether ``job`` may start at ``now``, and the state entered on the way (or None).
        A job let through an open or half-open circuit is its trial (one at a time)."""
        if self.holds(now):
            return False, None
        if self.state == "closed":
            return True, None
        entered = None
        if self.state == "open":
            self.state = "half_open"
            entered = "half_open"
        self._trial = job
        return True, entered

    def _is_trial(self, job: Hashable) -> bool:
        return self._trial is not None and self._trial == job

    def abandon(self, job: Hashable) -> None:
        """A started job was stopped before it could succeed or fail: if it was the trial, a
        half-open circuit may let another one through."""
        if self._is_trial(job):
            self._trial = None

    def holds(self, now: float) -> bool:
        """Whether the circuit keeps the next job from starting at ``now``."""
        if self.state == "open":
            return now - self._opened_at < self.cooldown
        return self.state == "half_open" and self._trial is not None

    @property
    def pristine(self) -> bool:
        """Closed with no failure counted: a new breaker would be the same (it can be forgotten)."""
        return self.state == "closed" and self._failures_in_row == 0 and self._trial is None

    def reopen_in(self, now: float) -> float:
        """Seconds until an open circuit lets a trial through (0 unless open)."""
        return max(0.0, self._opened_at + self.cooldown - now) if self.state == "open" else 0.0

    def record(self, job: Hashable, ok: bool, now: float) -> str | None:
        """A started job ended; the state entered because of it (or None)."""
        trial = self._is_trial(job)
        if trial:
            self._trial = None
        if ok:
            if self.state == "closed":
                self._failures_in_row = 0
                return None
            if not trial:  # started before the opening: it cannot vouch for the service now
                return None
            self.state = "closed"
            self._failures_in_row = 0
            return "closed"
        self._failures_in_row += 1
        if trial or (self.state == "closed" and self._failures_in_row >= self.failures):
            self.state = "open"
            self._opened_at = now
            return "opened"
        return None
