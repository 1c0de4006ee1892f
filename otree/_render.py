"""Text the ``otree`` command prints: events, status trees, jobs and dead letters, one item per line."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from ._info import ChildInfo, DeadLetter, Event, JobInfo, Jobs, LaneStatus, PoolStatus, Status, StatusNode

__all__ = [
    "format_event",
    "render_dead_letters",
    "render_job",
    "render_jobs",
    "render_lane",
    "render_status",
    "time_of_day",
]

# Details that the one-line text form leaves out (``detail`` already says Type: message).
_VERBOSE = frozenset({"detail", "exception", "message", "traceback"})


_second: list[tuple[int, str]] = [(-1, "")]  # the last whole second formatted: events come in bursts


def time_of_day(stamp: float) -> str:
    """``14:05:33.753``: how an event line (and a summary of repeats) is stamped."""
    whole = int(stamp)
    second, text = _second[0]
    if second != whole:
        text = time.strftime("%H:%M:%S", time.localtime(whole))
        _second[0] = (whole, text)
    return f"{text}.{int(stamp % 1 * 1000):03d}"


def format_event(event: Event, *, date: bool = False) -> str:
    """One line: time, path, kind, reason, then the detail and other plain details."""
    stamp = time_of_day(event.time)
    if date:
        stamp = time.strftime("%Y-%m-%d ", time.localtime(event.time)) + stamp
    parts = [stamp, event.path, event.kind]
    if event.reason:
        parts.append(event.reason)
    detail = event.details.get("detail")
    if detail:
        parts.append(str(detail))
    parts.extend(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in event.details.items()
        if key not in _VERBOSE
    )
    return " ".join(parts).replace("\n", " ")


def duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h07m``, ``2d04h``: two units at most."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _money(usd: float) -> str:
    return f"${usd:,.2f}"


def _pool_words(pool: PoolStatus) -> list[str]:
    words = [
        f"queued {pool.queued}",
        f"running {pool.running}/{pool.max_concurrency}",
    ]
    if pool.retrying:
        words.append(f"retrying {pool.retrying}")
    if pool.dead_letters:
        words.append(f"dead {pool.dead_letters}")
    if pool.daily_budget is not None:
        left = max(0.0, pool.daily_budget - pool.spent_today - pool.reserved)
        words.append(f"budget left {_money(left)} of {_money(pool.daily_budget)}")
    else:
        words.append(f"spent today {_money(pool.spent_today)}")
    if pool.circuit is not None and pool.circuit != "closed":
        words.append(f"circuit {pool.circuit}")
    if pool.lanes:
        words.append(f"lanes {pool.lanes}" + (f" ({pool.lanes_held} held)" if pool.lanes_held else ""))
    if pool.held is not None:
        words.append(f"held: {pool.held}")
    return words


def _exit_words(info: ChildInfo) -> list[str]:
    """How a child that does not run got there: never started (``autostart=False``), parked
    for idleness (until a wake), or its last exit."""
    exit_info = info.exit
    if exit_info is None:
        return ["not started"] if info.started_at is None and info.state == "stopped" else []
    last: str = exit_info.reason
    if exit_info.detail:
        last += f" ({exit_info.detail})"
    if info.state == "stopped" and (exit_info.reason, exit_info.detail) == ("shutdown", "idle"):
        return ["parked", f"last exit: {last}"]
    return [f"last exit: {last}"]


def _node_line(node: StatusNode, depth: int, now: float, width: int) -> str:
    info = node.info
    words = [f"{'  ' * depth}{info.id}".ljust(width), f"{info.kind:<10}", f"{info.state:<10}"]
    if info.pid is not None and info.kind in ("process", "ray"):
        words.append(f"pid {info.pid}")
    if info.node is not None:
        words.append(f"on {info.node}")
    if info.started_at is not None and info.state in ("running", "starting", "stopping"):
        words.append(f"up {duration(now - info.started_at)}")
    if info.restarts:
        words.append(f"restarts {info.restarts}")
    if node.restarts_in_window is not None:
        words.append(f"window {node.restarts_in_window}/{node.max_restarts} in {node.max_seconds:g}s")
    if node.pool is not None:
        words.extend(_pool_words(node.pool))
    if info.status:
        words.append(f"status: {info.status}")
    if info.state != "running":
        words.extend(_exit_words(info))
    return " ".join(words).rstrip()


def _walk(node: StatusNode, depth: int) -> Iterator[tuple[StatusNode, int]]:
    yield node, depth
    for child in node.children:
        yield from _walk(child, depth + 1)


def render_status(status: Status) -> str:
    """The tree as indented lines: id, kind, state, then what matters for that kind."""
    nodes = list(_walk(status.root, 0))
    width = max(len(node.info.id) + 2 * depth for node, depth in nodes) + 1
    lines = [_node_line(node, depth, status.now, width) for node, depth in nodes]
    lines.extend(
        f"otree run's {stream} is gone: {count:,} writes dropped (the event log has everything)"
        for stream, count in sorted(status.output_lost.items())
    )
    return "\n".join(lines)


def _job_line(job: JobInfo) -> str:
    words = [f"{job.id:>6}", f"{job.kind:<12}", f"{job.state:<9}", f"priority {job.priority}"]
    if job.lane is not None:
        words.append(f"lane {job.lane}")
    if job.pid is not None:
        words.append(f"pid {job.pid}")
    if job.attempts:
        words.append(f"attempts {job.attempts}")
    if job.estimated_cost:
        words.append(f"estimate {_money(job.estimated_cost)}")
    if job.cost:
        words.append(f"spent {_money(job.cost)}")
    if job.held is not None:
        words.append(f"held: {job.held}")
    return " ".join(words)


def render_jobs(jobs: Jobs) -> str:
    """Running, then waiting (in start order), then retrying jobs."""
    lines = []
    for title, group in (("running", jobs.running), ("queued", jobs.queued), ("retrying", jobs.retrying)):
        lines.append(f"{title}: {len(group)}")
        lines.extend(_job_line(job) for job in group)
    return "\n".join(lines)


def _stamp(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def render_job(job: JobInfo) -> str:
    """One job: its listing line, then when it was submitted, started and ended, and its
    result or why it has none."""
    lines = [_job_line(job).strip(), f"submitted {_stamp(job.submitted_at)}"]
    if job.started_at is not None:
        lines.append(f"started   {_stamp(job.started_at)}")
    if job.ended_at is not None:
        lines.append(f"ended     {_stamp(job.ended_at)}")
    if job.error is not None:
        lines.append(f"error: {job.error}")
    elif job.state == "done":
        lines.append(f"result: {json.dumps(job.result)}")
    return "\n".join(lines)


def render_lane(pool: str, lane: LaneStatus) -> str:
    """One line: the lane's jobs, its own circuit (with a lane breaker) and what holds it."""
    words = [f"{pool} lane {lane.lane}: queued {lane.queued} running {lane.running}"]
    if lane.circuit is not None:
        words.append(f"circuit {lane.circuit}")
    if lane.held is not None:
        words.append(f"held: {lane.held}")
    return " ".join(words)


def render_dead_letters(letters: list[DeadLetter]) -> str:
    """One line per dead letter, oldest first."""
    if not letters:
        return "no dead letters"
    return "\n".join(
        f"{letter.id:>6} {letter.kind:<12} attempts {letter.attempts} "
        f"failed {_stamp(letter.failed_at)}: {letter.error}"
        for letter in letters
    )
