"""The public surface: ``otree.__all__`` and the exception tree."""

from __future__ import annotations
import __future__

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import otree

INIT = Path(otree.__file__)
# ``from __future__ import annotations`` binds ``annotations``: not part of the API.
FUTURE_FEATURES = [getattr(__future__, name) for name in __future__.all_feature_names]

ERRORS = [
    otree.SpecError,
    otree.StartError,
    otree.NotFound,
    otree.AlreadyPresent,
    otree.Running,
    otree.Restarting,
    otree.MaxChildren,
    otree.NotRunning,
    otree.SupervisorFailed,
    otree.RestartIntensityExceeded,
    otree.QueueFull,
    otree.BudgetExceeded,
    otree.CircuitOpen,
    otree.DeadLettered,
    otree.JobFailed,
]


def names_bound_in_init() -> set[str]:
    """Public names that otree/__init__.py binds at module level (imports, defs, assignments)."""
    tree = ast.parse(INIT.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def test_all_sorted() -> None:
    assert list(otree.__all__) == sorted(otree.__all__)


def test_all_unique() -> None:
    assert len(set(otree.__all__)) == len(otree.__all__)


def test_all_names_resolve() -> None:
    for name in otree.__all__:
        assert getattr(otree, name) is not None, name


def test_all_star_import() -> None:
    namespace: dict[str, object] = {}
    exec("from otree import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(otree.__all__)


def test_all_covers_names_defined_in_init() -> None:
    assert names_bound_in_init() - set(otree.__all__) == set()


def test_all_covers_public_module_attributes() -> None:
    public = {
        name
        for name, value in vars(otree).items()
        if not name.startswith("_") and not any(value is feature for feature in FUTURE_FEATURES)
    }
    assert public - set(otree.__all__) == set()


def test_all_has_core_api() -> None:
    for name in ("supervisor", "task", "open_supervisor", "run", "Backoff", "SpecError", "Shutdown", "Event"):
        assert name in otree.__all__


@pytest.mark.parametrize("name", [n for n in otree.__all__ if inspect.isclass(getattr(otree, n))])
def test_exported_class_module_is_otree(name: str) -> None:
    assert getattr(otree, name).__module__ == "otree"


@pytest.mark.parametrize("name", [n for n in otree.__all__ if inspect.isfunction(getattr(otree, n))])
def test_exported_function_module_is_otree(name: str) -> None:
    assert getattr(otree, name).__module__ == "otree"


def test_exported_class_repr_names_otree() -> None:
    assert repr(otree.SpecError) == "<class 'otree.SpecError'>"


@pytest.mark.parametrize("error", ERRORS, ids=lambda cls: cls.__name__)
def test_error_subclasses_otree_error(error: type[Exception]) -> None:
    assert issubclass(error, otree.OtreeError)
    assert issubclass(error, Exception)


def test_every_exported_exception_is_an_otree_error_except_shutdown() -> None:
    exported = {
        getattr(otree, name)
        for name in otree.__all__
        if inspect.isclass(getattr(otree, name)) and issubclass(getattr(otree, name), BaseException)
    }
    assert exported == {*ERRORS, otree.OtreeError, otree.Shutdown}
    assert {cls for cls in exported if not issubclass(cls, otree.OtreeError)} == {otree.Shutdown}


def test_otree_error_is_an_exception() -> None:
    assert issubclass(otree.OtreeError, Exception)
    assert not issubclass(otree.OtreeError, ExceptionGroup)


def test_restart_intensity_exceeded_is_supervisor_failed() -> None:
    assert issubclass(otree.RestartIntensityExceeded, otree.SupervisorFailed)
    error = otree.RestartIntensityExceeded("root", 3, 5.0, "root/bad")
    assert isinstance(error, otree.SupervisorFailed)
    assert error.path == "root"
    assert str(error) == (
        "root: reached max restart intensity (3 restarts in 5s); last failing child: root/bad"
    )


def test_only_restart_intensity_exceeded_subclasses_supervisor_failed() -> None:
    others = [cls for cls in ERRORS if cls not in (otree.SupervisorFailed, otree.RestartIntensityExceeded)]
    for cls in others:
        assert not issubclass(cls, otree.SupervisorFailed), cls


def test_the_pool_policy_refusals_name_the_pool_and_why() -> None:
    assert str(otree.CircuitOpen("app/jobs", 3.21)) == "app/jobs: circuit open, half-open in 3.2 s"
    error = otree.DeadLettered("app/jobs", "order-7", "12")
    assert (error.path, error.key, error.dead_letter_id) == ("app/jobs", "order-7", "12")
    assert str(error) == (
        "app/jobs: key 'order-7' is dead-lettered (dead letter 12); requeue or clear it first"
    )


def test_shutdown_is_not_an_otree_error() -> None:
    assert issubclass(otree.Shutdown, Exception)
    assert not issubclass(otree.Shutdown, otree.OtreeError)
    assert otree.Shutdown().reason == ""
    assert otree.Shutdown("done").reason == "done"


def test_the_client_commands_do_not_import_the_runtime() -> None:
    # `otree status` is a round trip: it must not pay for importing trio, the supervisor or sqlite3
    heavy = ("trio", "sqlite3", "otree._supervisor", "otree._handles", "otree._run")
    code = f"import sys, otree._cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_runtime_does_not_import_the_api_built_on_it() -> None:
    # one-way graph: the handles and entry points import the runtime, never the reverse
    api = ("otree._handles", "otree._run")
    code = f"import sys, otree._supervisor; print(sorted(m for m in {api!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_import_otree_is_light_until_a_name_is_used() -> None:
    code = (
        "import sys, otree; before = 'trio' in sys.modules; otree.task; "
        "print(before, 'trio' in sys.modules, otree.SpecError.__module__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "otree"]
