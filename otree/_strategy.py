"""Pure restart decisions (OTP's ``do_restart`` and ``restart/3`` split): plain data in and out."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

__all__ = ["ExitReason", "Restart", "Strategy", "affected_children", "should_restart"]

Restart = Literal["permanent", "transient", "temporary", "on_demand"]
Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
ExitReason = Literal["normal", "shutdown", "error"]


def should_restart(
    restart: Restart,
    reason: ExitReason,
    exit_code: int | None = None,
    *,
    restart_codes: Collection[int] = (),
    no_restart_codes: Collection[int] = (),
) -> bool:
    """Whether a child of this restart type is restarted after exiting for ``reason``.

    permanent: always; transient: only after an ``error``; temporary and on_demand: never
    (an on_demand child keeps its spec and waits for a wake).
    ``exit_code`` is the code a process exited with by itself (None for a task, a
    signal, or a process otree stopped): a code in ``no_restart_codes`` is never
    restarted (systemd's RestartPreventExitStatus), then a code in ``restart_codes``
    always is (RestartForceExitStatus), whatever the restart type and reason.
    """
    if exit_code is not None:
        if exit_code in no_restart_codes:
            return False
        if exit_code in restart_codes:
            return True
    if restart == "permanent":
        return True
    if restart == "transient":
        return reason == "error"
    return False


def affected_children(strategy: Strategy, ids: Sequence[str], failed: str) -> list[str]:
    """The children a restart of ``failed`` touches, in start order (``failed`` included).

    one_for_one: the failed child; one_for_all: every child; rest_for_one: the
    failed child and every child started after it. The caller stops the others
    in reverse order and starts them all again in this order, dropping
    temporary bystanders, which are never restarted.
    """
    if strategy == "one_for_one":
        return [failed]
    if strategy == "one_for_all":
        return list(ids)
    return list(ids[ids.index(failed) :])
