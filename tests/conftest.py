"""Every test's control sockets go to one private, short temporary runtime dir (never the user's);
the Ray tests share one local Ray instance for the session."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import descendants, wait_gone, with_cmdline


@pytest.fixture(autouse=True, scope="session")
def private_runtime_dir() -> Iterator[str]:
    # short: a Unix socket path must fit in 108 bytes, and pytest's tmp_path can be long
    directory = tempfile.mkdtemp(prefix="otree-test-")
    previous = os.environ.get("OTREE_RUNTIME_DIR")
    os.environ["OTREE_RUNTIME_DIR"] = directory
    yield directory
    if previous is None:
        del os.environ["OTREE_RUNTIME_DIR"]
    else:
        os.environ["OTREE_RUNTIME_DIR"] = previous
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[str]:
    """One local Ray for the session (its GCS address), loopback only; afterwards nothing it
    started is left running (checked by pid). Skipped outside CI when Ray is not installed: in CI
    (``CI`` set) a missing Ray is a failure, not a skip."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray: Any = importlib.import_module("ray") if os.environ.get("CI") else pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="otree-ray-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        started = descendants(os.getpid()) | with_cmdline(temp)
        assert len(started) >= 3  # gcs_server, raylet, workers: what the check below watches
        ray.shutdown()
        left = wait_gone(started)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray left processes running: {sorted(left)}"
