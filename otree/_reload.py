"""Deciding a reload: which children of a supervisor changed, went away or are new. Pure.

A tree file imported afresh holds new function objects even where nothing
changed, so functions are compared by module, qualified name, defaults and a
digest of their code (an edited body is a change; a moved one is not); every
other value by ``==``, field by field through specs and containers.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from types import CodeType, FunctionType, MethodType
from typing import Any

import msgspec

from ._spec import ChildSpec, SupervisorSpec

__all__ = ["ReloadPlan", "plan_reload", "same_settings", "same_value"]


def _code_digest(code: CodeType) -> bytes:
    """What a code object does, without where it sits in the file (line numbers)."""
    digest = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        digest.update(_code_digest(const) if isinstance(const, CodeType) else repr(const).encode())
    digest.update(
        repr(
            (
                code.co_names,
                code.co_varnames,
                code.co_freevars,
                code.co_cellvars,
                code.co_argcount,
                code.co_posonlyargcount,
                code.co_kwonlyargcount,
                code.co_flags,
            )
        ).encode()
    )
    return digest.digest()


def _same_function(a: FunctionType, b: FunctionType) -> bool:
    return (
        a.__module__ == b.__module__
        and a.__qualname__ == b.__qualname__
        and _code_digest(a.__code__) == _code_digest(b.__code__)
        and same_value(a.__defaults__, b.__defaults__)
        and same_value(a.__kwdefaults__, b.__kwdefaults__)
    )


def same_value(a: Any, b: Any) -> bool:
    """Whether two spec values mean the same (see the module docstring)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, msgspec.Struct):
        return all(same_value(getattr(a, name), getattr(b, name)) for name in a.__struct_fields__)
    if isinstance(a, FunctionType):
        return _same_function(a, b)
    if isinstance(a, MethodType):
        return same_value(a.__func__, b.__func__) and same_value(a.__self__, b.__self__)
    if isinstance(a, functools.partial):
        return (
            same_value(a.func, b.func) and same_value(a.args, b.args) and same_value(a.keywords, b.keywords)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(value, b[key]) for key, value in a.items())
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value that cannot compare is taken as changed
        return False


def same_settings(a: SupervisorSpec, b: SupervisorSpec) -> bool:
    """Whether two supervisor specs agree on everything but their children."""
    return all(
        same_value(getattr(a, name), getattr(b, name)) for name in a.__struct_fields__ if name != "children"
    )


class ReloadPlan(msgspec.Struct, frozen=True):
    """What a reload does to one supervisor's children (ids, in the order to act on them).

    ``removed`` stop in reverse start order; ``changed`` are stopped (reverse) and
    started again in place; ``added`` start in the new order; ``nested`` are
    supervisors and pools kept running, their settings and children compared in turn.
    """

    removed: list[str]
    changed: list[str]
    added: list[str]
    nested: list[str]
    order: list[str]  # every id of the new spec, in its start order


def plan_reload(current: Sequence[ChildSpec], new: Sequence[ChildSpec]) -> ReloadPlan:
    """Compare a supervisor's current child specs (in start order) with the reloaded ones."""
    new_by_id = {spec.id: spec for spec in new}
    old_by_id = {spec.id: spec for spec in current}
    removed = [spec.id for spec in reversed(current) if spec.id not in new_by_id]
    changed: list[str] = []
    nested: list[str] = []
    added: list[str] = []
    for spec in new:
        old = old_by_id.get(spec.id)
        if old is None:
            added.append(spec.id)
        elif spec.kind in ("supervisor", "pool") and spec.kind == old.kind:
            if not same_value(old, spec):
                nested.append(spec.id)
        elif not same_value(old, spec):
            changed.append(spec.id)
    return ReloadPlan(removed, changed, added, nested, [spec.id for spec in new])
