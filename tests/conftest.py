"""Every test's control sockets go to one private, short temporary runtime dir (never the user's)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


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
