"""Child specs: frozen msgspec Structs, every default, and eager validation.

A spec validates itself in ``__post_init__``, so a spec built by hand is held
to the same rules as one from a builder. Errors are ``SpecError`` in the form
``<path>: <field> <expected>; got <value>``; a spec names its own id, and a
supervisor checking its children as a set names ``parent/child``.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import pwd
import re
import resource
import signal
import zoneinfo
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any, ClassVar, Literal, Protocol

import msgspec
import trio

from ._budget import MAX_USD, BudgetRule
from ._errors import SpecError
from ._info import ExitInfo
from ._intensity import JitterMode, backoff_delay
from ._paths import ID_PATTERN
from ._strategy import Restart, Strategy, should_restart

__all__ = [
    "AutoShutdown",
    "Backoff",
    "ChildSpec",
    "CircuitBreaker",
    "PoolSpec",
    "ProcessSpec",
    "RaySpec",
    "ShutdownValue",
    "SupervisorSpec",
    "TaskSpec",
    "ray",
    "supervisor",
    "takes_task_status",
    "task",
]

# Called after each exit of a child with its path and how it ended.
OnExit = Callable[[str, ExitInfo], Awaitable[Any]]
AutoShutdown = Literal["never", "any_significant", "all_significant"]
# Seconds of grace before a stop turns into a kill, or one of OTP's two words.
ShutdownValue = float | Literal["brutal_kill", "infinity"]


class Executor(Protocol):
    """Where a pool's jobs run, if not in the pool's own trio loop (``otree.RayExecutor``).

    The pool keeps its queue, cap, budget gate and retries; the executor only runs each job's body.
    """

    def check(self, path: str, handlers: dict[str, Callable[..., Awaitable[Any]]]) -> None:
        """Refuse, as ``SpecError``, what cannot run there (when the pool spec is built)."""

    def check_payload(self, path: str, kind: str, payload: Any) -> None:
        """Refuse, as ``ValueError`` naming the pool, a payload that cannot travel (at submit)."""

    def body(self, handler: Callable[..., Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """The job's body: ``await body(payload)`` runs ``handler(payload)`` there."""


_ID_RE = re.compile(ID_PATTERN)
_RESTARTS = ("permanent", "transient", "temporary", "on_demand")
_STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
_AUTO_SHUTDOWNS = ("never", "any_significant", "all_significant")


def _one_of(values: Sequence[str]) -> str:
    return "must be one of " + ", ".join(repr(v) for v in values)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_id(child_id: object) -> str:
    if not isinstance(child_id, str) or _ID_RE.fullmatch(child_id) is None:
        shown = child_id if isinstance(child_id, str) and child_id else "<child>"
        raise SpecError(shown, "id", f"must match {ID_PATTERN}", child_id)
    return child_id


def _check_choice(path: str, field: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SpecError(path, field, _one_of(choices), value)


def _check_shutdown(path: str, value: object) -> None:
    if value in ("brutal_kill", "infinity"):
        return
    if not _is_number(value) or not value >= 0:  # type: ignore[operator]
        raise SpecError(path, "shutdown", 'must be >= 0, "brutal_kill" or "infinity"', value)


def valid_max_runtime(value: object) -> bool:
    """Whether ``value`` is a ``max_runtime``: seconds > 0, or None (no limit)."""
    return value is None or (_is_number(value) and value > 0)  # type: ignore[operator]


def _check_max_runtime(path: str, value: object, field: str = "max_runtime") -> None:
    if not valid_max_runtime(value):
        raise SpecError(path, field, "must be a number > 0 or None", value)


def _check_restart_and_significant(path: str, restart: object, significant: object) -> None:
    _check_choice(path, "restart", restart, _RESTARTS)
    if not isinstance(significant, bool):
        raise SpecError(path, "significant", "must be True or False", significant)
    if significant and restart == "permanent":
        raise SpecError(
            path, "significant=True", "requires restart 'transient', 'temporary' or 'on_demand'", restart
        )


def _check_idle_timeout(path: str, idle_timeout: object, restart: object) -> None:
    """Seconds > 0 or None; a temporary child's spec goes when it stops, so it cannot be parked."""
    _check_max_runtime(path, idle_timeout, "idle_timeout")
    if idle_timeout is not None and restart == "temporary":
        raise SpecError(
            path, "idle_timeout", "requires restart 'permanent', 'transient' or 'on_demand'", restart
        )


def _check_on_exit(path: str, on_exit: object) -> None:
    if on_exit is not None and (not callable(on_exit) or _is_sync(on_exit)):
        raise SpecError(path, "on_exit", "must be None or an async function (path, ExitInfo)", on_exit)


def _check_autostart(path: str, autostart: object) -> None:
    if not isinstance(autostart, bool):
        raise SpecError(path, "autostart", "must be True or False", autostart)


def _exit_codes(path: str, field: str, codes: object) -> tuple[int, ...]:
    """``codes`` as a sorted tuple of exit codes 0-255 (each once)."""
    if not isinstance(codes, (list, tuple, set, frozenset)) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in codes
    ):
        raise SpecError(path, field, "must be a list of exit codes (integers 0-255)", codes)
    return tuple(sorted(set(codes)))


class Backoff(msgspec.Struct, frozen=True):
    """Delay before each automatic restart of the same child (OTP restarts at once), or
    before each retry of a pool's job.

    The n-th consecutive restart waits ``min(maximum, initial * factor**(n-1))``
    (exponential), ``min(maximum, initial + step * (n-1))`` with ``factor=1`` (linear), or
    the n-th of ``delays`` (an explicit schedule, see ``Backoff.schedule``), randomised by
    ``jitter`` (a fraction): ``jitter_mode="symmetric"`` ± jitter, ``"down"`` only below
    the base (``jitter=0.5``: between half and the full delay). The count resets once the
    child has run ``reset_after`` seconds.
    """

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1
    reset_after: float = 60.0
    step: float = 0.0
    jitter_mode: JitterMode = "symmetric"
    delays: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for field in ("initial", "maximum", "reset_after"):
            value = getattr(self, field)
            if not _is_number(value) or not value >= 0:
                raise SpecError("backoff", field, "must be a number >= 0", value)
        if not _is_number(self.factor) or not self.factor >= 1:
            raise SpecError("backoff", "factor", "must be a number >= 1", self.factor)
        if not _is_number(self.jitter) or not 0 <= self.jitter <= 1:
            raise SpecError("backoff", "jitter", "must be a number in [0, 1]", self.jitter)
        _check_choice("backoff", "jitter_mode", self.jitter_mode, ("symmetric", "down"))
        if not _is_number(self.step) or not 0 <= self.step < math.inf:
            raise SpecError("backoff", "step", "must be a number >= 0", self.step)
        if self.step and self.factor != 1:
            raise SpecError("backoff", "step", "must be 0 unless factor is 1 (a linear backoff)", self.step)
        delays = self.delays
        if not isinstance(delays, (list, tuple)) or not all(
            _is_number(d) and 0 <= d < math.inf for d in delays
        ):
            raise SpecError("backoff", "delays", "must be a list of seconds >= 0", delays)
        if delays:  # a schedule decides alone: initial and maximum describe it, nothing grows
            msgspec.structs.force_setattr(self, "delays", tuple(delays))
            for field, value in (("initial", delays[0]), ("maximum", max(delays)), ("factor", 1.0)):
                msgspec.structs.force_setattr(self, field, value)
            msgspec.structs.force_setattr(self, "step", 0.0)

    @classmethod
    def schedule(
        cls,
        delays: Sequence[float],
        *,
        jitter: float = 0.0,
        jitter_mode: JitterMode = "symmetric",
        reset_after: float = 60.0,
    ) -> Backoff:
        """An explicit schedule: the n-th restart or retry waits ``delays[n-1]``, the last one
        repeated (``Backoff.schedule([0, 30, 120])``: at once, then 30 s, then 120 s each time).
        No jitter unless asked for.

        Raises:
          SpecError: ``delays`` is empty or holds a negative or non-finite number.
        """
        if isinstance(delays, (list, tuple)) and not delays:
            raise SpecError("backoff", "delays", "must be a non-empty list of seconds >= 0", delays)
        return cls(
            jitter=jitter,
            jitter_mode=jitter_mode,
            reset_after=reset_after,
            delays=delays,  # type: ignore[arg-type]  # a list is checked and made a tuple
        )

    def delay(self, attempt: int, unit: float) -> float:
        """Seconds before the ``attempt``-th consecutive restart or retry; ``unit`` is a
        uniform draw in [0, 1) that places it within the jitter."""
        return backoff_delay(
            attempt,
            initial=self.initial,
            maximum=self.maximum,
            factor=self.factor,
            jitter=self.jitter,
            unit=unit,
            step=self.step,
            delays=self.delays,
            mode=self.jitter_mode,
        )


class _Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every child spec.

    * frozen: a spec is a value; a running tree never sees it change.
    * kw_only: fields are named at construction (the builders take positionals).
    * forbid_unknown_fields: a typo in a decoded spec is an error, not a no-op.
    """

    kind: ClassVar[str]
    id: str
    restart: Restart = "permanent"
    significant: bool = False
    on_exit: OnExit | None = None
    autostart: bool = True

    def _check_common(self) -> str:
        """Check the settings every child has; its path (for its own checks' errors)."""
        path = _check_id(self.id)
        _check_restart_and_significant(path, self.restart, self.significant)
        _check_on_exit(path, self.on_exit)
        _check_autostart(path, self.autostart)
        return path

    def restarts_after(self, exit_info: ExitInfo, *, own_exit: bool) -> bool:
        """Whether this exit restarts the child, by its restart type (``own_exit``: a process
        exited by itself, so its exit codes may decide first)."""
        return should_restart(self.restart, exit_info.reason)


class TaskSpec(_Spec, frozen=True, kw_only=True):
    """A trio task child: ``await fn(*args)``, with ``task_status`` if ``fn`` takes it."""

    kind: ClassVar[str] = "task"
    fn: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...] = ()
    shutdown: ShutdownValue = 5.0
    max_runtime: float | None = None
    idle_timeout: float | None = None

    def __post_init__(self) -> None:
        path = self._check_common()
        _check_shutdown(path, self.shutdown)
        _check_max_runtime(path, self.max_runtime)
        _check_idle_timeout(path, self.idle_timeout, self.restart)
        _check_task_fn(path, self.fn, self.args)


class SupervisorSpec(_Spec, frozen=True, kw_only=True):
    """A supervisor child: its own children, strategy and restart intensity."""

    kind: ClassVar[str] = "supervisor"
    children: tuple[ChildSpec, ...] = ()
    strategy: Strategy = "one_for_one"
    max_restarts: int = 3
    max_seconds: float = 5.0
    max_children: int | None = None
    auto_shutdown: AutoShutdown = "never"
    backoff: Backoff | None = None
    shutdown: ShutdownValue = "infinity"
    persist_intensity: bool = False

    def __post_init__(self) -> None:
        path = self._check_common()
        _check_shutdown(path, self.shutdown)
        _check_choice(path, "strategy", self.strategy, _STRATEGIES)
        _check_choice(path, "auto_shutdown", self.auto_shutdown, _AUTO_SHUTDOWNS)
        if (
            not isinstance(self.max_restarts, int)
            or isinstance(self.max_restarts, bool)
            or self.max_restarts < 0
        ):
            raise SpecError(path, "max_restarts", "must be an integer >= 0", self.max_restarts)
        if not _is_number(self.max_seconds) or not 0 < self.max_seconds < math.inf:
            raise SpecError(path, "max_seconds", "must be a number > 0", self.max_seconds)
        limit = self.max_children
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise SpecError(path, "max_children", "must be None or an integer >= 0", limit)
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise SpecError(path, "backoff", "must be None or an otree.Backoff", self.backoff)
        if not isinstance(self.persist_intensity, bool):
            raise SpecError(path, "persist_intensity", "must be True or False", self.persist_intensity)
        if not isinstance(self.children, (list, tuple)):
            raise SpecError(path, "children", "must be a list of child specs", self.children)
        msgspec.structs.force_setattr(self, "children", tuple(self.children))
        seen: set[str] = set()
        for child in self.children:
            self.check_child(child, seen)
            seen.add(child.id)
        if limit is not None and len(seen) > limit:
            raise SpecError(path, "children", f"must number at most max_children={limit}", len(seen))

    def check_child(self, child: object, sibling_ids: Container[str], where: str = "") -> None:
        """Validate ``child`` as a new child next to siblings with ``sibling_ids`` (start_child too).

        ``where`` is this supervisor's path in a running tree (default: its id).
        """
        where = where or self.id
        if not isinstance(child, _Spec):
            raise SpecError(where, "children", "must hold child specs (otree.task, otree.process...)", child)
        path = f"{where}/{child.id}"
        if child.id in sibling_ids:
            raise SpecError(path, "id", "must be unique among siblings", child.id)
        if child.significant and self.auto_shutdown == "never":
            raise SpecError(
                path,
                "significant=True",
                "requires the supervisor's auto_shutdown 'any_significant' or 'all_significant'",
                self.auto_shutdown,
            )


Stream = Literal["log", "inherit", "null"]


class ProcessSpec(_Spec, frozen=True, kw_only=True):
    """An OS process child (see ``otree.process``)."""

    kind: ClassVar[str] = "process"
    argv: tuple[str, ...]
    env: dict[str, str] | None = None
    inherit_env: bool = True
    cwd: str | None = None
    shutdown: ShutdownValue = 5.0
    stop_signal: int = signal.SIGTERM
    ready: float | Literal["spawn", "notify"] = "spawn"
    start_timeout: float | None = None
    stall_timeout: float | None = None
    max_runtime: float | None = None
    idle_timeout: float | None = None
    stdout: Stream = "log"
    stderr: Stream = "log"
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    log_timestamps: bool = False
    user: str | None = None
    rlimits: dict[str, tuple[int, int]] | None = None
    ok_exit_codes: tuple[int, ...] = ()
    restart_exit_codes: tuple[int, ...] = ()
    no_restart_exit_codes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        path = self._check_common()
        self._check_exit_codes(path)
        _check_shutdown(path, self.shutdown)
        _check_max_runtime(path, self.max_runtime)
        _check_idle_timeout(path, self.idle_timeout, self.restart)
        _check_user_and_rlimits(path, self.user, self.rlimits)
        if (
            not isinstance(self.argv, tuple)
            or not self.argv
            or not all(isinstance(a, str) and "\0" not in a for a in self.argv)
        ):
            raise SpecError(path, "argv", "must be a non-empty list of strings (no shell)", self.argv)
        env = self.env
        if env is not None and not (
            isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise SpecError(path, "env", "must be None or a dict of str to str", self.env)
        if self.cwd is not None and not isinstance(self.cwd, str):
            raise SpecError(path, "cwd", "must be None or a path string", self.cwd)
        valid_signals = {s.value for s in signal.Signals}
        if not isinstance(self.stop_signal, int) or self.stop_signal not in valid_signals:
            raise SpecError(path, "stop_signal", "must be a signal number", self.stop_signal)
        ready = self.ready
        if ready not in ("spawn", "notify") and not (_is_number(ready) and 0 <= ready < math.inf):  # type: ignore[operator]
            raise SpecError(path, "ready", 'must be "spawn", "notify" or seconds >= 0', self.ready)
        for field in ("start_timeout", "stall_timeout"):
            value = getattr(self, field)
            if value is not None and (not _is_number(value) or not value > 0):
                raise SpecError(path, field, "must be None or seconds > 0", value)
        for field in ("stdout", "stderr"):
            if getattr(self, field) not in ("log", "inherit", "null"):
                raise SpecError(path, field, "must be one of 'log', 'inherit', 'null'", getattr(self, field))
        if not isinstance(self.log_max_bytes, int) or self.log_max_bytes < 1024:
            raise SpecError(path, "log_max_bytes", "must be an integer >= 1024", self.log_max_bytes)
        if not isinstance(self.log_backups, int) or self.log_backups < 0:
            raise SpecError(path, "log_backups", "must be an integer >= 0", self.log_backups)
        if not isinstance(self.log_timestamps, bool):
            raise SpecError(path, "log_timestamps", "must be True or False", self.log_timestamps)

    def restarts_after(self, exit_info: ExitInfo, *, own_exit: bool) -> bool:
        """As for any child, but an exit the process made by itself is decided by its code first."""
        if not own_exit:
            return should_restart(self.restart, exit_info.reason)
        return should_restart(
            self.restart,
            exit_info.reason,
            exit_info.exit_code,
            restart_codes=self.restart_exit_codes,
            no_restart_codes=self.no_restart_exit_codes,
        )

    def _check_exit_codes(self, path: str) -> None:
        """Exit codes 0-255; a code cannot both force and prevent a restart; a temporary or
        on_demand child is never restarted automatically, so it cannot be forced to."""
        for field in ("ok_exit_codes", "restart_exit_codes", "no_restart_exit_codes"):
            msgspec.structs.force_setattr(self, field, _exit_codes(path, field, getattr(self, field)))
        both = set(self.restart_exit_codes) & set(self.no_restart_exit_codes)
        if both:
            raise SpecError(
                path, "restart_exit_codes", "must not share codes with no_restart_exit_codes", sorted(both)
            )
        if self.restart_exit_codes and self.restart in ("temporary", "on_demand"):
            raise SpecError(
                path, "restart_exit_codes", "requires restart 'permanent' or 'transient'", self.restart
            )

    def effective_start_timeout(self) -> float:
        """``start_timeout``, or its default: none for "spawn", 30 s for "notify", N + 30 s for N."""
        if self.start_timeout is not None:
            return self.start_timeout
        if self.ready == "spawn":
            return math.inf
        if self.ready == "notify":
            return 30.0
        return float(self.ready) + 30.0


RLIMITS: dict[str, int] = {
    name[len("RLIMIT_") :].lower(): getattr(resource, name)
    for name in dir(resource)
    if name.startswith("RLIMIT_")
}


def _check_user_and_rlimits(path: str, user: object, rlimits: object) -> None:
    if user is not None:
        if not isinstance(user, str) or not user:
            raise SpecError(path, "user", "must be None or a user name", user)
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise SpecError(path, "user", "must name a user of this machine", user) from None
    if rlimits is None:
        return
    if not isinstance(rlimits, dict):
        raise SpecError(path, "rlimits", "must be None or a dict of resource name to limits", rlimits)
    for name, limits in rlimits.items():
        if name not in RLIMITS:
            raise SpecError(path, f"rlimits[{name!r}]", f"must be one of {', '.join(sorted(RLIMITS))}", name)
        valid = (
            isinstance(limits, tuple)
            and len(limits) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= -1 for v in limits)
        )
        soft, hard = limits if valid else (0, 0)
        if not valid or (hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard)):
            raise SpecError(
                path,
                f"rlimits[{name!r}]",
                "must be N or (soft, hard) with soft <= hard (None: unlimited)",
                limits,
            )


def _rlimits(rlimits: object) -> Any:
    """The builder's ``{name: N | (soft, hard)}`` (None: unlimited) as the spec's (soft, hard) ints."""
    if not isinstance(rlimits, dict):
        return rlimits

    def limit(value: object) -> object:
        return resource.RLIM_INFINITY if value is None else value

    normal: dict[object, object] = {}
    for name, value in rlimits.items():
        if isinstance(value, (list, tuple)) and len(value) == 2:
            normal[name] = (limit(value[0]), limit(value[1]))
        elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
            normal[name] = (limit(value), limit(value))
        else:
            normal[name] = value  # rejected, as given, by the spec's check
    return normal


def process(
    id: str,  # noqa: A002 - OTP's name for it
    argv: list[str] | tuple[str, ...],
    *,
    env: dict[str, str] | None = None,
    inherit_env: bool = True,
    cwd: str | os.PathLike[str] | None = None,
    restart: Restart = "permanent",
    shutdown: ShutdownValue = 5.0,
    significant: bool = False,
    on_exit: OnExit | None = None,
    autostart: bool = True,
    stop_signal: int = signal.SIGTERM,
    ready: float | Literal["spawn", "notify"] = "spawn",
    start_timeout: float | None = None,
    stall_timeout: float | None = None,
    max_runtime: float | None = None,
    idle_timeout: float | None = None,
    stdout: Stream = "log",
    stderr: Stream = "log",
    log_max_bytes: int = 10 * 1024 * 1024,
    log_backups: int = 3,
    log_timestamps: bool = False,
    user: str | None = None,
    rlimits: dict[str, Any] | None = None,
    ok_exit_codes: Sequence[int] = (),
    restart_exit_codes: Sequence[int] = (),
    no_restart_exit_codes: Sequence[int] = (),
) -> ProcessSpec:
    """An OS process child: ``argv`` run directly (never through a shell) in its own process group.

    Args:
      env: variables merged over otree's environment (``inherit_env=False``: replace it).
      stop_signal: sent to the whole group to stop it (then SIGKILL after ``shutdown`` s).
      ready: ``"spawn"`` (ready once started), seconds it must stay up, or ``"notify"``
        (it sends ``READY=1`` to ``$NOTIFY_SOCKET``, the systemd protocol).
      start_timeout: how long readiness may take (default: none for "spawn", 30 s for
        "notify", N + 30 s for N); a child not ready in time has failed to start.
      stall_timeout: stop it (an ``error`` exit, detail ``stalled``) after this long
        without output on a captured stream or ``WATCHDOG=1``.
      max_runtime: None, or stop each run (an ``error`` exit, detail ``max_runtime``) this
        many seconds after it started: the stop signal, then SIGKILL after ``shutdown``.
      idle_timeout: None, or stop and park it (a ``shutdown`` exit, detail ``idle``: not
        restarted, not counted) after this long without output on a captured stream or
        ``WATCHDOG=1``, until a wake (``wake``, ``otree start``).
      stdout, stderr: ``"log"`` (a size-rotated file under the state dir), ``"inherit"``, ``"null"``.
      log_max_bytes, log_backups: rotation size and how many old files to keep.
      log_timestamps: start each line of the log files (and of the stderr tail) with the
        UTC time its first byte arrived, ISO 8601 with milliseconds (``2026-01-05T09:30:00.123Z``).
      user: run it as this user (its primary group and supplementary groups too);
        otree must run as root to use another user.
      rlimits: resource limits set before it runs, ``{"nofile": 1024, "as": (soft, hard)}``
        (names as ``RLIMIT_*`` in lower case; None for unlimited); raising a hard limit
        needs root.
      ok_exit_codes: exit codes that count as ``normal``, like 0 (systemd's SuccessExitStatus).
      restart_exit_codes, no_restart_exit_codes: decide the restart by the code the process
        exited with by itself, before the restart type: a code in ``no_restart_exit_codes``
        is never restarted (RestartPreventExitStatus), one in ``restart_exit_codes`` always
        is (RestartForceExitStatus; not for a temporary child). Disjoint; codes 0-255.
      restart, autostart, on_exit: as for ``task``.

    Raises:
      SpecError: a field is invalid.
    """
    return ProcessSpec(
        id=id,
        argv=tuple(argv) if isinstance(argv, (list, tuple)) else argv,
        env=env,
        inherit_env=inherit_env,
        cwd=os.fspath(cwd) if cwd is not None else None,
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        on_exit=on_exit,
        autostart=autostart,
        stop_signal=stop_signal,
        ready=ready,
        start_timeout=start_timeout,
        stall_timeout=stall_timeout,
        max_runtime=max_runtime,
        idle_timeout=idle_timeout,
        stdout=stdout,
        stderr=stderr,
        log_max_bytes=log_max_bytes,
        log_backups=log_backups,
        log_timestamps=log_timestamps,
        user=user,
        rlimits=_rlimits(rlimits),
        ok_exit_codes=ok_exit_codes,  # type: ignore[arg-type]  # checked and made a sorted tuple
        restart_exit_codes=restart_exit_codes,  # type: ignore[arg-type]
        no_restart_exit_codes=no_restart_exit_codes,  # type: ignore[arg-type]
    )


def _takes_task_status(fn: Callable[..., Any]) -> bool:
    try:
        return "task_status" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_takes_task_status_cached = functools.lru_cache(maxsize=4096)(_takes_task_status)


def takes_task_status(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts ``task_status`` (then it reports readiness itself)."""
    try:
        return _takes_task_status_cached(fn)
    except TypeError:  # an unhashable callable: not cached
        return _takes_task_status(fn)


def _is_sync(fn: object) -> bool:
    """Whether ``fn`` is plainly a synchronous callable (so awaiting its result would fail)."""
    target = inspect.unwrap(fn.func if isinstance(fn, functools.partial) else fn)  # type: ignore[arg-type]
    if inspect.ismethod(target):
        target = target.__func__
    if inspect.isfunction(target) or inspect.isbuiltin(target):
        return not inspect.iscoroutinefunction(target)
    if inspect.isclass(target):
        return False
    call = getattr(type(target), "__call__", None)  # noqa: B004 - the instance's own __call__
    return inspect.isfunction(call) and not inspect.iscoroutinefunction(call)


def _check_task_fn(path: str, fn: object, args: object) -> None:
    if not callable(fn) or _is_sync(fn):
        raise SpecError(path, "fn", "must be an async function", fn)
    if not isinstance(args, tuple):
        raise SpecError(path, "args", "must be a tuple", args)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    # The supervisor passes task_status itself when fn takes it: bind it too, so an
    # argument that would land on it, or a task_status without a default, is judged right.
    extra = {"task_status": trio.TASK_STATUS_IGNORED} if "task_status" in signature.parameters else {}
    try:
        signature.bind(*args, **extra)
    except TypeError as exc:
        name = getattr(fn, "__name__", repr(fn))
        raise SpecError(path, "args", f"must fit {name}{signature} ({exc})", args) from None


def task(
    id: str,  # noqa: A002 - OTP's name for it
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    restart: Restart = "permanent",
    shutdown: ShutdownValue = 5.0,
    significant: bool = False,
    on_exit: OnExit | None = None,
    max_runtime: float | None = None,
    idle_timeout: float | None = None,
    autostart: bool = True,
) -> TaskSpec:
    """A trio task child running ``await fn(*args)``.

    Args:
      id: unique among siblings, ``[A-Za-z0-9][A-Za-z0-9_.-]*``.
      fn: an async function. If it takes ``task_status`` it is ready when it
        calls ``task_status.started()``; otherwise it is ready at once.
      args: positional arguments for ``fn`` (use ``functools.partial`` for keywords).
      restart: ``"permanent"`` (default), ``"transient"``, ``"temporary"`` or ``"on_demand"``
        (never restarted automatically, spec kept: started again by a wake).
      shutdown: seconds of grace (default 5.0), ``"brutal_kill"`` or ``"infinity"``.
      significant: whether its own exit may shut the supervisor down (auto_shutdown).
      max_runtime: None, or stop each run (an ``error`` exit, detail ``max_runtime``) this
        many seconds after it started, like any stop (see ``shutdown``).
      idle_timeout: None, or stop and park it (a ``shutdown`` exit, detail ``idle``: not
        restarted, not counted) once it has been ready this long without calling
        ``current_child().alive()``, until a wake (``wake``, ``otree start``).
      autostart: False to declare it without starting it with the tree (a wake starts it).
      on_exit: None, or an async function ``(path, ExitInfo)`` called after each exit of the
        child (a start failure, a crash, a stop) in its supervisor's nursery; it does not
        delay the restart, and an exception in it is a ``child.on_exit_failed`` event.

    Raises:
      SpecError: a field is invalid.
    """
    return TaskSpec(
        id=id,
        fn=fn,
        args=args,
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        on_exit=on_exit,
        max_runtime=max_runtime,
        idle_timeout=idle_timeout,
        autostart=autostart,
    )


def supervisor(
    id: str,  # noqa: A002 - OTP's name for it
    *,
    children: Sequence[ChildSpec] = (),
    strategy: Strategy = "one_for_one",
    max_restarts: int = 3,
    max_seconds: float = 5.0,
    max_children: int | None = None,
    auto_shutdown: AutoShutdown = "never",
    backoff: Backoff | None = None,
    persist_intensity: bool = False,
    restart: Restart = "permanent",
    shutdown: ShutdownValue = "infinity",
    significant: bool = False,
    on_exit: OnExit | None = None,
    autostart: bool = True,
) -> SupervisorSpec:
    """A supervisor of ``children``, started in list order and stopped in reverse.

    Args:
      strategy: ``"one_for_one"`` (default), ``"one_for_all"`` or ``"rest_for_one"``.
      max_restarts, max_seconds: more than ``max_restarts`` restarts within
        ``max_seconds`` makes the supervisor give up (defaults 3 and 5.0, Elixir's).
      max_children: None, or the most specs it may hold (running or stopped).
      auto_shutdown: ``"never"`` (default), ``"any_significant"``, ``"all_significant"``.
      backoff: None (restart at once, as OTP) or an ``otree.Backoff``.
      persist_intensity: keep the restart window in the state dir, so restarts counted
        before otree itself was restarted (even by ``kill -9``) still count.
      restart, shutdown, significant, on_exit, autostart: as for ``task``; shutdown defaults
        to ``"infinity"``.

    Raises:
      SpecError: a field or a child is invalid.
    """
    if not isinstance(children, (list, tuple)):
        raise SpecError(str(id), "children", "must be a list of child specs", children)
    return SupervisorSpec(
        id=id,
        children=tuple(children),
        strategy=strategy,
        max_restarts=max_restarts,
        max_seconds=max_seconds,
        max_children=max_children,
        auto_shutdown=auto_shutdown,
        backoff=backoff,
        persist_intensity=persist_intensity,
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        on_exit=on_exit,
        autostart=autostart,
    )


class CircuitBreaker(msgspec.Struct, frozen=True):
    """A pool stops starting jobs for ``cooldown`` s after ``failures`` failures in a row,
    then lets one through (half-open); held jobs keep their place and attempts."""

    failures: int = 5
    cooldown: float = 120.0

    def __post_init__(self) -> None:
        if not isinstance(self.failures, int) or isinstance(self.failures, bool) or self.failures < 1:
            raise SpecError("circuit_breaker", "failures", "must be an integer >= 1", self.failures)
        if not _is_number(self.cooldown) or not self.cooldown >= 0:
            raise SpecError("circuit_breaker", "cooldown", "must be a number >= 0", self.cooldown)


LaneOrder = Literal[
    "retry_at_back", "fifo"
]  # a lane's retried job: to the back of its class, or kept at the head


class PoolSpec(_Spec, frozen=True, kw_only=True):
    """A pool child: a bounded priority job queue run by ``handlers`` (see ``otree.pool``)."""

    kind: ClassVar[str] = "pool"
    handlers: dict[str, Callable[..., Awaitable[Any]]]
    max_concurrency: int = 1
    max_queue: int = 1000
    daily_budget: float | None = None
    budget_tz: str = "local"
    on_budget_exhausted: Literal["reject", "hold"] = "reject"
    budget_warn_at: float = 0.9
    max_attempts: int = 1
    backoff: Backoff | None = None
    circuit_breaker: CircuitBreaker | None = None
    durable: bool | None = None
    now: Callable[[], Any] | None = None
    job_shutdown: ShutdownValue = 5.0
    shutdown: ShutdownValue = "infinity"
    on_full: Literal["reject", "drop_oldest"] = "reject"
    on_duplicate_key: Literal["keep", "replace"] = "keep"
    on_circuit_open: Literal["hold", "reject"] = "hold"
    refuse_dead_keys: bool = False
    max_starts_per_second: float | None = None
    budget_rule: BudgetRule = "le"
    max_runtime: float | dict[str, float | None] | None = None
    lane_concurrency: int | None = None
    lane_circuit_breaker: CircuitBreaker | None = None
    lane_order: LaneOrder = "retry_at_back"
    executor: Executor | None = None

    def __post_init__(self) -> None:
        path = self._check_common()
        _check_shutdown(path, self.shutdown)
        _check_shutdown(path, self.job_shutdown)
        self._check_policies(path)
        if not isinstance(self.handlers, dict) or not self.handlers:
            raise SpecError(
                path, "handlers", "must be a non-empty dict of kind to async function", self.handlers
            )
        for kind, handler in self.handlers.items():
            if not isinstance(kind, str) or not kind:
                raise SpecError(path, "handlers", "must have non-empty str kinds", kind)
            if not callable(handler) or _is_sync(handler):
                raise SpecError(path, f"handlers[{kind!r}]", "must be an async function", handler)
        self._check_max_runtime(path)
        for field in ("max_concurrency", "max_queue", "max_attempts"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(path, field, "must be an integer >= 1", value)
        budget = self.daily_budget
        if budget is not None and (not _is_number(budget) or not 0 <= budget <= MAX_USD):
            raise SpecError(
                path, "daily_budget", f"must be None or a number of USD >= 0 and <= {MAX_USD:,}", budget
            )
        if not _is_number(self.budget_warn_at) or not 0 < self.budget_warn_at <= 1:
            raise SpecError(path, "budget_warn_at", "must be a number in (0, 1]", self.budget_warn_at)
        _check_choice(path, "on_budget_exhausted", self.on_budget_exhausted, ("reject", "hold"))
        if self.budget_tz != "local":
            try:
                zoneinfo.ZoneInfo(self.budget_tz)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise SpecError(
                    path, "budget_tz", 'must be "local" or an IANA zone name', self.budget_tz
                ) from None
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise SpecError(path, "backoff", "must be None or an otree.Backoff", self.backoff)
        for field in ("circuit_breaker", "lane_circuit_breaker"):
            breaker = getattr(self, field)
            if breaker is not None and not isinstance(breaker, CircuitBreaker):
                raise SpecError(path, field, "must be None or an otree.CircuitBreaker", breaker)
        if self.durable not in (None, True, False):
            raise SpecError(path, "durable", "must be None, True or False", self.durable)
        if self.now is not None and not callable(self.now):
            raise SpecError(path, "now", "must be None or a callable returning an aware datetime", self.now)
        if self.executor is not None:
            from ._ray_executor import RayExecutor  # not Ray itself: a RayExecutor imported it when built

            if not isinstance(self.executor, RayExecutor):
                raise SpecError(path, "executor", "must be None or an otree.RayExecutor", self.executor)
            self.executor.check(path, self.handlers)

    def _check_max_runtime(self, path: str) -> None:
        """``max_runtime``: seconds for every kind, or a dict of handler kind to seconds (or None)."""
        limits = self.max_runtime
        if not isinstance(limits, dict):
            _check_max_runtime(path, limits)
            return
        for kind, seconds in limits.items():
            if kind not in self.handlers:
                raise SpecError(path, "max_runtime", "must name kinds of handlers", kind)
            _check_max_runtime(path, seconds, f"max_runtime[{kind!r}]")

    def runtime_of(self, kind: str) -> float | None:
        """The ``max_runtime`` of a ``kind`` job (None: no limit)."""
        limits = self.max_runtime
        return limits.get(kind) if isinstance(limits, dict) else limits

    def _check_policies(self, path: str) -> None:
        """The queue policies: what a full queue, a duplicate key, an open circuit, a dead key,
        the start rate and the budget comparison do."""
        _check_choice(path, "on_full", self.on_full, ("reject", "drop_oldest"))
        _check_choice(path, "on_duplicate_key", self.on_duplicate_key, ("keep", "replace"))
        _check_choice(path, "on_circuit_open", self.on_circuit_open, ("hold", "reject"))
        _check_choice(path, "budget_rule", self.budget_rule, ("le", "lt"))
        if not isinstance(self.refuse_dead_keys, bool):
            raise SpecError(path, "refuse_dead_keys", "must be True or False", self.refuse_dead_keys)
        rate = self.max_starts_per_second
        if rate is not None and (not _is_number(rate) or not 0 < rate < math.inf):
            raise SpecError(path, "max_starts_per_second", "must be None or a number > 0", rate)
        cap = self.lane_concurrency
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise SpecError(path, "lane_concurrency", "must be None or an integer >= 1", cap)
        _check_choice(path, "lane_order", self.lane_order, ("retry_at_back", "fifo"))


def pool(
    id: str,  # noqa: A002 - OTP's name for it
    handlers: dict[str, Callable[..., Awaitable[Any]]],
    *,
    max_concurrency: int = 1,
    max_queue: int = 1000,
    daily_budget: float | None = None,
    budget_tz: str = "local",
    on_budget_exhausted: Literal["reject", "hold"] = "reject",
    budget_warn_at: float = 0.9,
    max_attempts: int = 1,
    backoff: Backoff | None = None,
    circuit_breaker: CircuitBreaker | None = None,
    durable: bool | None = None,
    now: Callable[[], Any] | None = None,
    job_shutdown: ShutdownValue = 5.0,
    on_full: Literal["reject", "drop_oldest"] = "reject",
    on_duplicate_key: Literal["keep", "replace"] = "keep",
    on_circuit_open: Literal["hold", "reject"] = "hold",
    refuse_dead_keys: bool = False,
    max_starts_per_second: float | None = None,
    budget_rule: BudgetRule = "le",
    max_runtime: float | dict[str, float | None] | None = None,
    lane_concurrency: int | None = None,
    lane_circuit_breaker: CircuitBreaker | None = None,
    lane_order: LaneOrder = "retry_at_back",
    executor: Executor | None = None,
    restart: Restart = "permanent",
    shutdown: ShutdownValue = "infinity",
    significant: bool = False,
    on_exit: OnExit | None = None,
    autostart: bool = True,
) -> PoolSpec:
    """A pool child: jobs by priority (FIFO within one), at most ``max_concurrency`` at once.

    Each running job is a temporary child of the pool running ``await handlers[kind](payload)``.

    Args:
      max_queue: most waiting jobs; a submission beyond it raises ``QueueFull``.
      daily_budget, budget_tz, budget_warn_at, on_budget_exhausted: the daily USD gate
        (a job's estimate is reserved while it runs; "reject" refuses submissions once
        it is spent, "hold" keeps them until midnight in ``budget_tz``).
      max_attempts, backoff: tries per job (1 = no retry) and the delay between them.
      circuit_breaker: an ``otree.CircuitBreaker``; an open circuit holds jobs.
      durable: keep queued jobs, the spend ledger and dead letters in SQLite under the
        state dir (None: when a state dir is configured, as under ``otree run``).
      now: the wall clock for budget days (a callable returning an aware datetime).
      job_shutdown: grace for running jobs when the pool stops (all at once).
      on_full: ``"reject"`` (``QueueFull``) or ``"drop_oldest"``: the job that has waited
        longest is dropped to make room (``job.dropped``, reason ``queue_full``).
      on_duplicate_key: ``"keep"`` (a key in use returns its job) or ``"replace"``: a new
        job takes a queued job's place with the new payload (the old one is dropped,
        reason ``replaced``); behind a running one, it queues.
      on_circuit_open: ``"hold"`` (queue, and wait for the circuit) or ``"reject"``
        (``CircuitOpen`` while it is open).
      refuse_dead_keys: refuse (``DeadLettered``) a key whose job was dead-lettered, until
        that dead letter is requeued or cleared.
      max_starts_per_second: None, or the most job starts per second (one per ``1/rate`` s).
      budget_rule: ``"le"`` (``spent + reserved + estimate <= daily_budget`` admits a job)
        or ``"lt"`` (``<``: reaching the budget is refused too).
      max_runtime: None, seconds, or a dict of kind to seconds: an attempt still running
        that long after it started is stopped (as a cancel, within ``job_shutdown``) and fails
        with detail ``max_runtime`` (retried or dead-lettered as any failure);
        ``submit(..., max_runtime=)`` overrides it for one job.
      lane_concurrency, lane_circuit_breaker, lane_order: for jobs submitted with a ``lane``:
        the most running at once per lane (None: no bound; 1 = one turn per agent at a
        time), an ``otree.CircuitBreaker`` per lane (an open lane holds only its own jobs),
        and where a lane's retried job goes: ``"retry_at_back"`` (the back of its priority
        class, as without lanes) or ``"fifo"`` (it stays at the head of its lane and holds
        the lane until it runs again). A job held only by its lane lets other lanes' jobs start.
      executor: None (jobs run in the pool's trio loop) or ``otree.RayExecutor(**ray_options)``:
        each job runs as a Ray task; the queue, cap, budget and retries stay here.
      on_exit, autostart: as for ``task``.

    Raises:
      SpecError: a field is invalid.
    """
    return PoolSpec(
        id=id,
        handlers=dict(handlers) if isinstance(handlers, dict) else handlers,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        daily_budget=daily_budget,
        budget_tz=budget_tz,
        on_budget_exhausted=on_budget_exhausted,
        budget_warn_at=budget_warn_at,
        max_attempts=max_attempts,
        backoff=backoff,
        circuit_breaker=circuit_breaker,
        durable=durable,
        now=now,
        job_shutdown=job_shutdown,
        on_full=on_full,
        on_duplicate_key=on_duplicate_key,
        on_circuit_open=on_circuit_open,
        refuse_dead_keys=refuse_dead_keys,
        max_starts_per_second=max_starts_per_second,
        budget_rule=budget_rule,
        max_runtime=dict(max_runtime) if isinstance(max_runtime, dict) else max_runtime,
        lane_concurrency=lane_concurrency,
        lane_circuit_breaker=lane_circuit_breaker,
        lane_order=lane_order,
        executor=executor,
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        on_exit=on_exit,
        autostart=autostart,
    )


class RaySpec(_Spec, frozen=True, kw_only=True):
    """A child spec run inside a Ray actor on a node Ray chooses (see ``otree.ray``).

    Locally it is one child of kind ``"ray"``: its id, restart type, significance, exit
    hook and autostart are the wrapped spec's, and its ``shutdown`` is the grace of the
    remote stop before the actor is killed.
    """

    kind: ClassVar[str] = "ray"
    spec: TaskSpec | SupervisorSpec | ProcessSpec | PoolSpec
    options: dict[str, Any] = {}
    shutdown: ShutdownValue = 5.0
    start_timeout: float = 60.0
    heartbeat: tuple[float, int] = (10.0, 3)
    spare: bool = False

    def __post_init__(self) -> None:
        path = self._check_common()
        _check_shutdown(path, self.shutdown)
        if not isinstance(self.spare, bool):
            raise SpecError(path, "spare", "must be True or False", self.spare)
        if not isinstance(self.spec, (TaskSpec, SupervisorSpec, ProcessSpec, PoolSpec)):
            raise SpecError(path, "spec", "must be a task, process, supervisor or pool spec", self.spec)
        if not _is_number(self.start_timeout) or not 0 < self.start_timeout < math.inf:
            raise SpecError(path, "start_timeout", "must be a number > 0", self.start_timeout)
        beat = self.heartbeat
        if (
            not isinstance(beat, (tuple, list))
            or len(beat) != 2
            or not _is_number(beat[0])
            or not 0 < beat[0] < math.inf
            or not isinstance(beat[1], int)
            or isinstance(beat[1], bool)
            or beat[1] < 1
        ):
            raise SpecError(path, "heartbeat", "must be (seconds > 0, misses >= 1)", beat)
        msgspec.structs.force_setattr(self, "heartbeat", (float(beat[0]), beat[1]))
        from ._ray import check_options, check_picklable  # imports Ray: only for a tree that uses it

        check_options(path, self.options)
        check_picklable(path, self.spec)


def ray(
    spec: TaskSpec | SupervisorSpec | ProcessSpec | PoolSpec,
    *,
    start_timeout: float = 60.0,
    heartbeat: tuple[float, int] = (10.0, 3),
    spare: bool = False,
    **ray_options: Any,
) -> RaySpec:
    """Run ``spec`` (a task, process, supervisor or pool) inside a Ray actor, under otree's own
    runtime there; locally it is one child of kind ``"ray"`` that otree restarts by its rules.

    Args:
      spec: the child to run remotely; its id, restart type, ``significant``, ``on_exit``,
        ``autostart`` and ``shutdown`` are the local child's.
      start_timeout: seconds for Ray to place the actor and the remote child to be ready;
        past them the actor is killed and the start fails.
      heartbeat: ``(seconds, misses)``: the actor is pinged every ``seconds``; after
        ``misses`` pings in a row without an answer it is presumed dead, killed, and the
        child exits ``error``.
      spare: keep a warm replacement actor (same options, placed by Ray) while the child
        runs, so a restart takes it instead of waiting for a new Ray worker; it costs an idle
        actor process and holds the resources the options ask for.
      ray_options: Ray actor options, passed through (``num_cpus``, ``resources``,
        ``memory``, ``scheduling_strategy``, ``runtime_env``...). ``max_restarts`` and
        ``max_task_retries`` are forced to 0 (otree restarts, Ray never does).

    Raises:
      SpecError: a field is invalid, an option is not a Ray actor option or is one otree
        sets itself, or Ray is not installed.
    """
    if not isinstance(spec, _Spec) or isinstance(spec, RaySpec):
        raise SpecError("<ray>", "spec", "must be a task, process, supervisor or pool spec", spec)
    return RaySpec(
        id=spec.id,
        restart=spec.restart,
        significant=spec.significant,
        on_exit=spec.on_exit,
        autostart=spec.autostart,
        shutdown=spec.shutdown,
        spec=spec,
        options=ray_options,
        start_timeout=start_timeout,
        heartbeat=heartbeat,
        spare=spare,
    )


ChildSpec = TaskSpec | SupervisorSpec | ProcessSpec | PoolSpec | RaySpec
