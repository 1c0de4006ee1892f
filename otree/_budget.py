"""The pool's daily budget gate: exact arithmetic, pure, the wall clock passed in.

Money is kept in integer micro-dollars, so sums never drift and the gate's
comparisons are exact. The rule (DESIGN §10): a job may start when
``spent < budget`` and ``spent + reserved + estimate <= budget`` (``budget_rule="le"``,
the default) or ``< budget`` (``"lt"``: reaching the budget is refused too); a
running job's estimate is reserved until it ends, then replaced by what it spent.

Bounds: an estimate or a daily budget is at most ``MAX_USD`` (a float that large
still converts to micro-dollars exactly), and a day's spend saturates at
``LEDGER_MAX``, the largest integer the SQLite ledger holds, so no reported cost,
however absurd, can overflow it (the gate is shut long before).
"""

from __future__ import annotations

import datetime as dt
import os
import zoneinfo
from collections.abc import Hashable
from typing import Literal

__all__ = [
    "LEDGER_MAX",
    "MAX_USD",
    "Budget",
    "BudgetRule",
    "Transition",
    "budget_day",
    "from_micros",
    "local_zone",
    "next_midnight",
    "seconds_until_midnight",
    "to_micros",
    "usd_text",
]

MICROS = 1_000_000
MAX_USD = 1_000_000_000  # the largest estimate or daily budget
LEDGER_MAX = 2**63 - 1  # micro-dollars: SQLite's largest INTEGER, where a day's spend saturates

Transition = Literal["warning", "exhausted"]
BudgetRule = Literal["le", "lt"]  # spent + reserved + estimate <= budget, or < budget


def to_micros(usd: float) -> int:
    """USD as integer micro-dollars (rounded to the nearest)."""
    return round(usd * MICROS)


def from_micros(micros: int) -> float:
    """Integer micro-dollars as USD."""
    return micros / MICROS


def usd_text(micros: int) -> str:
    """``$0.10``, ``$0.0035``, ``$1,250.00``: cents, or as many decimals as the amount has."""
    whole, fraction = divmod(micros, MICROS)
    return f"${whole:,}.{f'{fraction:06d}'.rstrip('0'):0<2}"


def local_zone() -> dt.tzinfo:
    """The machine's time zone with its DST rules (``$TZ``, else ``/etc/localtime``).

    ``datetime.now().astimezone()`` would give today's fixed offset, an hour off
    across a DST change; only if no zone file can be read is that the fallback.
    """
    name = os.environ.get("TZ", "").lstrip(":")
    try:
        if name:
            return zoneinfo.ZoneInfo(name)
        with open("/etc/localtime", "rb") as zone_file:
            return zoneinfo.ZoneInfo.from_file(zone_file, key="localtime")
    except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        return dt.datetime.now().astimezone().tzinfo or dt.UTC


def budget_day(now: dt.datetime, tz: dt.tzinfo) -> dt.date:
    """The budget day ``now`` falls in: its date in ``tz``."""
    return now.astimezone(tz).date()


def next_midnight(now: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """The next midnight in ``tz`` after ``now``: when the budget day ends."""
    return dt.datetime.combine(now.astimezone(tz).date() + dt.timedelta(days=1), dt.time(0), tzinfo=tz)


def seconds_until_midnight(now: dt.datetime, tz: dt.tzinfo) -> float:
    """Seconds from ``now`` until the next midnight in ``tz`` (DST-aware: midnight is local)."""
    midnight = next_midnight(now, tz)
    # in UTC: two datetimes of the same tzinfo subtract as wall clocks, an hour off across DST
    return (midnight.astimezone(dt.UTC) - now.astimezone(dt.UTC)).total_seconds()


class Budget:
    """Spend of one budget day and the estimates reserved by running jobs."""

    __slots__ = (
        "_reserved",
        "_reserved_total",
        "day",
        "exhausted",
        "limit",
        "rule",
        "spent",
        "warn_at",
        "warned",
    )

    def __init__(self, daily_budget: float | None, warn_at: float = 0.9, rule: BudgetRule = "le") -> None:
        self.limit = None if daily_budget is None else to_micros(daily_budget)
        self.warn_at = warn_at
        self.rule = rule
        self.day: dt.date | None = None
        self.spent = 0
        self.warned = False
        self.exhausted = False
        self._reserved: dict[Hashable, int] = {}
        self._reserved_total = 0

    @property
    def reserved(self) -> int:
        """Micro-dollars reserved by running jobs."""
        return self._reserved_total

    def roll(self, today: dt.date) -> bool:
        """Enter ``today``; True when that started a new day after an earlier one (a reset)."""
        if today == self.day:
            return False
        reset = self.day is not None
        self.day = today
        self.spent = 0
        self.warned = False
        self.exhausted = False
        return reset

    def restore(self, spent: int) -> None:
        """Today's spend as a store kept it; thresholds already passed do not warn again."""
        self.spent = spent
        if self.limit is not None:
            self.warned = spent >= self.warn_at * self.limit
            self.exhausted = spent >= self.limit

    def can_start(self, estimate: int) -> bool:
        """Whether a job with this estimate (micro-dollars) may start now, and, under
        ``on_budget_exhausted="reject"``, be submitted: ``spent < limit`` and
        ``spent + reserved + estimate <= limit`` (``< limit`` under the rule ``"lt"``)."""
        limit = self.limit
        if limit is None:
            return True
        total = self.spent + self._reserved_total + estimate
        return self.spent < limit and (total < limit if self.rule == "lt" else total <= limit)

    def capped(self, amount: int) -> int:
        """``amount`` cut to what today's ledger can still hold (all of it, short of ``LEDGER_MAX``)."""
        return min(amount, LEDGER_MAX - self.spent)

    def shortfall(self, estimate: int) -> str:
        """Why the gate holds a job with this estimate, in words (``needs $0.10, $0.08 left``)."""
        limit = self.limit
        assert limit is not None, "only a daily budget holds jobs"
        if self.spent >= limit:
            return f"{usd_text(self.spent)} of {usd_text(limit)} spent"
        needs = f"needs {usd_text(estimate)}"
        below = ", and budget_rule 'lt' keeps the total below it"  # what holds a job that just fits
        if estimate > limit:
            return f"{needs}, more than the whole daily budget of {usd_text(limit)}"
        if estimate == limit and self.rule == "lt":
            return f"{needs}, the whole daily budget{below}"
        left = max(0, limit - self.spent - self.reserved)
        text = f"{needs}, {usd_text(left)} left"
        if self.reserved:
            text += f" ({usd_text(self.reserved)} reserved by running jobs)"
        return text + (below if estimate == left and self.rule == "lt" else "")

    def reserve(self, job: Hashable, estimate: int) -> None:
        """A job starts: hold its estimate."""
        if job in self._reserved:
            raise KeyError(f"{job!r} holds a reservation already")
        self._reserved[job] = estimate
        self._reserved_total += estimate

    def charge(self, job: Hashable, amount: int) -> list[Transition]:
        """A running job spent ``amount`` more: count it today, and shrink its reservation by as
        much (never below zero), so spend plus reservation stays its estimate until it overspends.

        Returns the thresholds crossed by this spend, each at most once a day.
        """
        held = self._reserved.get(job)
        if held is not None:
            taken = min(held, amount)
            self._reserved[job] = held - taken
            self._reserved_total -= taken
        self.spent += amount
        crossed: list[Transition] = []
        if self.limit is None:
            return crossed
        if not self.warned and self.spent >= self.warn_at * self.limit:
            self.warned = True
            crossed.append("warning")
        if not self.exhausted and self.spent >= self.limit:
            self.exhausted = True
            crossed.append("exhausted")
        return crossed

    def release(self, job: Hashable) -> None:
        """A job ended: what is left of its reservation is free again."""
        self._reserved_total -= self._reserved.pop(job, 0)

    def settle(self, job: Hashable, actual: int) -> list[Transition]:
        """A job ended having spent ``actual`` (none of it charged before): count it, release it."""
        crossed = self.charge(job, actual)
        self.release(job)
        return crossed
