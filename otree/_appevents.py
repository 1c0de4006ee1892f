"""Events from the application: what a child may publish on the tree's event bus, checked.

A task child calls ``current_child().emit("app.decision", reason="...", **details)``;
a process child sends ``OTREE_EVENT=app.decision {"reason": "...", ...}`` to its
notify socket. Both reach the bus, the event log, ``otree events`` and subscribers
with the child's path, and both pass through ``app_event``, so an event is held to
the same rules whatever kind of child sent it:

- the kind is ``app.`` followed by one or more dot-separated words of ``[a-z0-9_]``
  (at most ``MAX_KIND`` characters): an application's kinds never collide with
  otree's own, and ``otree events --kind 'app.*'`` selects them all. A bare
  ``decision`` is refused rather than prefixed, so the kind in the code is the kind
  in the log.
- ``reason`` is the event's short word (a str of at most ``MAX_REASON`` characters,
  empty by default), as otree's own events have one.
- the details are plain JSON values (str, int, float, bool, None, lists, dicts with
  str keys; a tuple arrives as a list), finite, nested at most ``MAX_DEPTH`` deep,
  at most ``MAX_DETAILS`` bytes once encoded: an event is one bounded log line that
  every reader decodes to what was sent. Subscribers get a copy taken at the call,
  so a child that later changes a list it passed does not change its event.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

__all__ = ["MAX_DETAILS", "app_event", "parse_notify_event"]

MAX_KIND = 100
MAX_REASON = 100
MAX_DEPTH = 32
MAX_DETAILS = 4096  # bytes of JSON: the size of one notify datagram
_KIND = re.compile(r"app(?:\.[a-z0-9_]+)+")


def app_event(kind: object, reason: object, details: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """The checked ``(kind, reason, details)`` of an application event; details are a fresh copy.

    Raises:
      ValueError: what is wrong with the kind, the reason or which detail.
    """
    if not isinstance(kind, str) or len(kind) > MAX_KIND or not _KIND.fullmatch(kind):
        raise ValueError(
            f"kind {_short(kind)} is not an application kind: 'app.' then dot-separated words of "
            f"a-z, 0-9 and _ (at most {MAX_KIND} characters), e.g. 'app.decision'"
        )
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise ValueError(f"reason must be a str of at most {MAX_REASON} characters; got {_short(reason)}")
    for key, value in details.items():
        _check_plain(value, key, 1)
    if not details:
        return kind, reason, {}
    try:
        encoded = msgspec.json.encode(details)
    except (TypeError, ValueError, OverflowError) as error:  # a subclass msgspec does not take
        raise ValueError(f"details are not plain JSON: {error}") from None
    if len(encoded) > MAX_DETAILS:
        raise ValueError(f"details are {len(encoded)} bytes of JSON; at most {MAX_DETAILS}")
    copy: dict[str, Any] = msgspec.json.decode(encoded)
    return kind, reason, copy


def parse_notify_event(value: str) -> tuple[str, str, dict[str, Any]]:
    """The event of an ``OTREE_EVENT=<kind> [<json object>]`` notify line (given what follows ``=``).

    A ``"reason"`` key of the object, if any, is the event's reason.

    Raises:
      ValueError: what is wrong with the line.
    """
    kind, _, text = value.strip().partition(" ")
    text = text.strip()
    details: Any = {}
    if text:
        try:
            details = msgspec.json.decode(text)
        except msgspec.DecodeError as error:
            raise ValueError(f"details are not JSON: {error}") from None
        if not isinstance(details, dict):
            raise ValueError(f"details must be a JSON object; got a {type(details).__name__}")
    reason = details.pop("reason", "")
    return app_event(kind, reason, details)


def _check_plain(value: object, where: str, depth: int) -> None:
    """Raise ValueError naming ``where`` unless ``value`` is a plain JSON value."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"detail {where} is {value!r}, which JSON cannot hold")
        return
    if isinstance(value, (list, tuple, dict)) and depth >= MAX_DEPTH:
        raise ValueError(f"detail {where} is nested more than {MAX_DEPTH} deep")
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"detail {where} has the key {_short(key)}: keys must be str")
            _check_plain(item, f"{where}[{key!r}]", depth + 1)
        return
    raise ValueError(
        f"detail {where} is a {type(value).__name__}, not a plain value "
        "(str, int, float, bool, None, list or dict with str keys)"
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
