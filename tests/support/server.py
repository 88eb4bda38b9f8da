"""A real wanrt server in a subprocess on 127.0.0.1, started through the same CLI a user runs."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    assets_dir: Path
    recordings_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {name: float(value) for name, value in (line.split() for line in text.splitlines() if line)}


@contextmanager
def run_server(
    tmp_dir: Path,
    *extra_args: str,
    startup_timeout_s: float = 30.0,
    module: str = "serve.cli",
    file_size_limit_bytes: int | None = None,
    command: tuple[str, ...] = ("serve",),
) -> Iterator[RunningServer]:
    """`module` runs the CLI (tests/support/fault_server.py adds failing pipelines first); `file_size_limit_bytes`
    sets RLIMIT_FSIZE, so the server's writes past it fail with EFBIG as on a full disk (Python ignores SIGXFSZ);
    `command` is the CLI command that serves HTTP (`cluster serve --address ...` for a cluster front)."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    assets_dir = tmp_dir / "assets"
    args = [
        sys.executable, "-m", module, *command,
        "--host", "127.0.0.1", "--port", str(port),
        "--ice-interfaces", "loopback",
        "--assets-dir", str(assets_dir),
        "--models-dir", str(tmp_dir / "models"),
        "--engines-dir", str(tmp_dir / "engines"),
        "--recordings-dir", str(tmp_dir / "recordings"),
        *extra_args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=_limit_files(file_size_limit_bytes)
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, assets_dir, tmp_dir / "recordings")
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {startup_timeout_s} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _limit_files(limit_bytes: int | None) -> Callable[[], None] | None:
    if limit_bytes is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def load_pipeline(url: str, pipeline_id: str, timeout_s: float = 60.0, **load_params: object) -> dict:
    response = httpx.post(
        f"{url}/api/v1/pipeline/load", json={"pipeline_id": pipeline_id, "load_params": load_params}, timeout=10
    )
    response.raise_for_status()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/api/v1/pipeline/status", timeout=5).json()
        if status["status"] in ("loaded", "error"):
            return status
        time.sleep(0.05)
    raise TimeoutError(f"{pipeline_id} did not load in {timeout_s} s")
