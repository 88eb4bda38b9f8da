"""OS thread names (serve/threads.py): what /proc, top -H and the benchmark's per-thread table read."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from serve.threads import ENCODER, MAX_NAME_BYTES, name_os_thread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="thread names are set with Linux's prctl")


def comm_of(native_id: int) -> str:
    return open(f"/proc/self/task/{native_id}/comm").read().strip()


def test_a_thread_names_itself_and_only_itself() -> None:
    seen: dict[str, str] = {}
    main = comm_of(threading.main_thread().native_id)

    def body() -> None:
        assert name_os_thread("a-rather-long-thread-name")
        seen["self"] = comm_of(threading.get_native_id())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen["self"] == "a-rather-long-thread-name"[:MAX_NAME_BYTES]
    assert comm_of(threading.main_thread().native_id) == main


def test_the_encoder_pool_threads_carry_its_name() -> None:
    from serve.webrtc.tracks import ENCODE_POOL

    assert ENCODE_POOL.submit(lambda: comm_of(threading.get_native_id())).result(timeout=5) == ENCODER


def test_the_pipeline_worker_thread_carries_its_name() -> None:
    from serve.pipelines.worker import PipelineWorker
    from serve.threads import PIPELINE_WORKER

    worker = PipelineWorker("test")
    try:
        tid = worker._thread.native_id
        assert tid is not None
        deadline = time.monotonic() + 5
        while comm_of(tid) != PIPELINE_WORKER and time.monotonic() < deadline:
            time.sleep(0.01)  # it names itself as it starts
        assert comm_of(tid) == PIPELINE_WORKER
    finally:
        worker.close()
