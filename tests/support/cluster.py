"""A real local Ray cluster for the cluster tests: the head in the test process, `wanrt cluster worker` processes
started through the CLI a user runs, and the front through `run_server(command=("cluster", "serve", ...))`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RAY_OBJECT_STORE_BYTES = 80 * 2**20  # the workers pass only small replies: Ray's minimum is 75 MiB


@contextmanager
def local_ray(num_cpus: int = 4) -> Iterator[str]:
    """Starts a Ray head in this process (no dashboard, a small object store); yields its address."""
    import ray

    from serve.cluster.names import NAMESPACE

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=RAY_OBJECT_STORE_BYTES,
        namespace=NAMESPACE,
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@dataclass
class RunningWorker:
    process: subprocess.Popen
    log_path: Path
    names: list[str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGINT, as Ctrl-C: every session hears `stream_stopped`, then the actors end."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_worker(
    tmp_dir: Path, address: str, cpu_workers: int, *extra_args: str, timeout_s: float = 90.0
) -> RunningWorker:
    """`wanrt cluster worker --cpu-workers N`, returned once every actor said it is ready."""
    log_path = tmp_dir / f"worker-{time.monotonic_ns()}.log"
    args = [
        sys.executable, "-m", "serve.cli", "cluster", "worker",
        "--address", address,
        "--cpu-workers", str(cpu_workers),
        "--ice-interfaces", "loopback",
        "--assets-dir", str(tmp_dir / "worker-assets"),  # not the front's: uploads must be copied to reach it
        "--models-dir", str(tmp_dir / "models"),
        "--engines-dir", str(tmp_dir / "engines"),
        "--recordings-dir", str(tmp_dir / "recordings"),
        *extra_args,
    ]  # fmt: skip
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    worker = RunningWorker(process, log_path, [])
    deadline = time.monotonic() + timeout_s
    while len(worker.names) < cpu_workers:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{worker.log()}")
        if time.monotonic() > deadline:
            worker.stop()
            raise RuntimeError(f"workers not ready in {timeout_s} s:\n{worker.log()}")
        worker.names = [line.split()[1] for line in worker.log().splitlines() if line.startswith("worker ")]
        time.sleep(0.1)
    return worker
