"""Pure restart decisions (OTP's ``do_restart`` and ``restart/3`` split): plain data in and out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

__all__ = ["ExitReason", "Restart", "Strategy", "affected_children", "should_restart"]

Restart = Literal["permanent", "transient", "temporary"]
Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
ExitReason = Literal["normal", "shutdown", "error"]


def should_restart(restart: Restart, reason: ExitReason) -> bool:
    """Whether a child of this restart type is restarted after exiting for ``reason``.

    permanent: always; transient: only after an ``error``; temporary: never.
    """
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
