"""The one exception tree of otree.

Every error otree raises on purpose is an ``OtreeError``; callers never see a
bare ``ExceptionGroup`` from the public API. The child's own exception, where
there is one, is chained as ``__cause__``.

* OtreeError
  + SpecError                  a child spec or tree is invalid (raised at declaration)
  + StartError                 a child failed to start
  + NotFound                   no child with that id / path
  + AlreadyPresent             start_child with an id the supervisor already holds
  + Running                    the child runs (restart_child, delete_child)
  + Restarting                 the child is in a restart loop (restart_child, delete_child)
  + MaxChildren                the supervisor holds max_children specs already
  + NotRunning                 the supervisor the handle names is not running
  + SupervisorFailed           a supervisor stopped because of a failure
    + RestartIntensityExceeded more than max_restarts restarts within max_seconds
  + QueueFull                  a pool's queue holds max_queue jobs
  + BudgetExceeded             a pool's daily budget does not admit the job
  + CircuitOpen                a pool's circuit is open and it rejects submissions
  + DeadLettered               a submission's key belongs to a dead letter (refuse_dead_keys)
  + JobFailed                  a pool job was dead-lettered (or cancelled, or dropped)

``Shutdown`` is not an error: a child raises it to exit with reason ``shutdown``.
"""

from __future__ import annotations

__all__ = [
    "AlreadyPresent",
    "BudgetExceeded",
    "CircuitOpen",
    "DeadLettered",
    "JobFailed",
    "MaxChildren",
    "NotFound",
    "NotRunning",
    "OtreeError",
    "QueueFull",
    "RestartIntensityExceeded",
    "Restarting",
    "Running",
    "Shutdown",
    "SpecError",
    "StartError",
    "SupervisorFailed",
]


class OtreeError(Exception):
    """Root of every error otree raises on purpose."""


class SpecError(OtreeError):
    """A child spec or supervision tree is invalid.

    The message reads ``<path>: <field> <expected>; got <value>``; the parts
    are kept as attributes so tools can point at the offending field.
    """

    def __init__(self, path: str, field: str, expected: str, got: object) -> None:
        self.path = path
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{path}: {field} {expected}; got {got!r}")


class StartError(OtreeError):
    """A child failed to start; the cause is chained."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: failed to start: {reason}")


class NotFound(OtreeError):
    """No child with that id under the named supervisor (or no such dead letter in a pool)."""

    def __init__(self, supervisor: str, child_id: str, existing: list[str], *, what: str = "child") -> None:
        self.supervisor = supervisor
        self.child_id = child_id
        self.existing = existing
        ids = ", ".join(existing) if existing else "none"
        if what == "child":
            super().__init__(f"no child at {supervisor}/{child_id} (children of {supervisor}: {ids})")
        else:  # e.g. a pool's dead letters
            super().__init__(f"{supervisor}: no {what} {child_id} ({what}s: {ids})")


class AlreadyPresent(OtreeError):
    """``start_child`` named an id the supervisor holds already.

    ``running`` tells OTP's ``already_started`` (True) from ``already_present``.
    """

    def __init__(self, path: str, *, running: bool) -> None:
        self.path = path
        self.running = running
        what = "already running" if running else "already present (not running)"
        super().__init__(f"{path}: {what}")


class Running(OtreeError):
    """The operation needs a stopped child and this one runs."""

    def __init__(self, path: str, operation: str) -> None:
        self.path = path
        super().__init__(f"{path}: cannot {operation} a running child")


class Restarting(OtreeError):
    """The operation needs a stopped child and this one is in a restart loop."""

    def __init__(self, path: str, operation: str) -> None:
        self.path = path
        super().__init__(f"{path}: cannot {operation} a restarting child")


class MaxChildren(OtreeError):
    """The supervisor already holds ``max_children`` specs."""

    def __init__(self, path: str, max_children: int) -> None:
        self.path = path
        self.max_children = max_children
        super().__init__(f"{path}: holds max_children={max_children} specs already")


class NotRunning(OtreeError):
    """The supervisor or pool a handle names is not running (stopped, or between restarts)."""

    def __init__(self, path: str, state: str) -> None:
        self.path = path
        self.state = state
        super().__init__(f"{path}: not running (state: {state})")


class SupervisorFailed(OtreeError):
    """A supervisor stopped because of a failure, not because it was asked to."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class RestartIntensityExceeded(SupervisorFailed):
    """More than ``max_restarts`` restarts fell within ``max_seconds``; the supervisor gave up."""

    def __init__(self, path: str, max_restarts: int, max_seconds: float, child: str) -> None:
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self.child = child
        super().__init__(
            path,
            f"reached max restart intensity ({max_restarts} restarts in {max_seconds:g}s); "
            f"last failing child: {child}",
        )


class QueueFull(OtreeError):
    """The pool's queue holds ``max_queue`` waiting jobs; the submission was refused."""

    def __init__(self, path: str, max_queue: int) -> None:
        self.path = path
        self.max_queue = max_queue
        super().__init__(f"{path}: queue full (max_queue={max_queue})")


class BudgetExceeded(OtreeError):
    """The pool's daily budget does not admit the job (``on_budget_exhausted="reject"``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class CircuitOpen(OtreeError):
    """The pool's circuit breaker, or the breaker of the submission's ``lane``, is open and the
    pool rejects submissions (``on_circuit_open="reject"``); ``half_open_in`` is the rest of its
    cooldown, in seconds."""

    def __init__(self, path: str, half_open_in: float, lane: str | None = None) -> None:
        self.path = path
        self.half_open_in = half_open_in
        self.lane = lane
        which = "circuit" if lane is None else f"lane {lane!r}: circuit"
        super().__init__(f"{path}: {which} open, half-open in {half_open_in:.1f} s")


class DeadLettered(OtreeError):
    """The submission's key belongs to a dead letter (``refuse_dead_keys=True``): the key is
    refused until that dead letter is requeued or cleared."""

    def __init__(self, path: str, key: object, dead_letter_id: str) -> None:
        self.path = path
        self.key = key
        self.dead_letter_id = dead_letter_id
        super().__init__(
            f"{path}: key {key!r} is dead-lettered (dead letter {dead_letter_id}); requeue or clear it first"
        )


class JobFailed(OtreeError):
    """A pool job was dead-lettered (its last error chained), cancelled or dropped."""

    def __init__(self, job_id: str, message: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: {message}")


class Shutdown(Exception):
    """Raised by a child to exit with reason ``shutdown`` (OTP's ``{shutdown, Reason}``).

    A transient child that raises it is not restarted.
    """

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(reason)
