from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# Triton's interpreter runs the kernels/ kernels on CPU tensors (tests/test_colour.py). Triton reads this when it is
# first imported, so it is set here, before any test module imports it, and only where no GPU could compile them.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from filelock import FileLock

from tests.support.engines import build_tiny_engines
from tests.support.server import RunningServer, run_server

PEER_TIMEOUT_S = 3.0
MAX_SESSIONS = 4
MAX_UPLOAD_MB = 2  # above the 1 MiB JSON limit, so the two limits can be told apart


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real server per test module, on 127.0.0.1, loopback ICE, fast peer-loss detection."""
    with run_server(
        tmp_path_factory.mktemp("server"),
        "--peer-timeout-s", str(PEER_TIMEOUT_S),
        "--max-sessions", str(MAX_SESSIONS),
        "--max-upload-mb", str(MAX_UPLOAD_MB),
        "--allow-random-weights",
    ) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDv2 engines, built once per run (≈1 min) for every module that needs them; copy to change. Under
    pytest-xdist the workers share one build: the first to ask builds it under a file lock, the others wait."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    folder = shared / "tiny-engines"
    with FileLock(shared / "tiny-engines.lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half way
            folder.mkdir()
            build_tiny_engines(folder)
            (folder / ".built").touch()
    return folder
