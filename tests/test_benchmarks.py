"""The benchmark programs still import against the current code (they run outside the suite)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("name", ["bench_core", "bench_pool", "bench_control", "bench_process", "__main__"])
def test_benchmark_imports(name: str) -> None:
    try:
        importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as missing:
        if missing.name and missing.name.split(".")[0] in ("psutil",):  # the [bench] extra
            pytest.skip(f"needs {missing.name}")
        raise
