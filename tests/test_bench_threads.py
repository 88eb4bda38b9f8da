"""The per-thread CPU split of benchmarks/serve_passthrough.py (`--threads`), read from /proc on this process."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from benchmarks.serve_passthrough import MAIN, THREAD_GROUPS, thread_groups, thread_times
from serve.threads import ENCODER, name_os_thread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/task")


def test_a_busy_named_thread_gets_its_cpu_and_an_idle_one_none() -> None:
    started, stop = threading.Event(), threading.Event()

    def busy() -> None:
        name_os_thread(ENCODER)
        started.set()
        end = time.process_time() + 10
        while not stop.is_set() and time.process_time() < end:
            sum(range(1000))

    def idle() -> None:
        name_os_thread("bench-idle")
        started.set()
        stop.wait()

    # The output tracks' encode pool (serve/webrtc/tracks.py) lives as long as the process: an earlier test in it
    # (another module on the same pytest-xdist worker) may have left its idle threads under the same name.
    pooled = sum(name == ENCODER for name, _ in thread_times(os.getpid()).values())
    threads = [threading.Thread(target=busy), threading.Thread(target=idle)]
    for thread in threads:
        started.clear()
        thread.start()
        started.wait()
    pid = os.getpid()
    before, wall = thread_times(pid), time.monotonic()
    time.sleep(0.5)
    after, wall = thread_times(pid), time.monotonic() - wall
    stop.set()
    for thread in threads:
        thread.join()
    groups = thread_groups(pid, before, after, wall, total_pct=200.0)
    busy_pct, busy_count = groups[THREAD_GROUPS[ENCODER]]
    assert busy_count == pooled + 1 and busy_pct > 30  # it spun for the whole window (a 10 ms tick: coarse, not 0)
    assert groups["bench-idle"] == (0.0, 1)  # an unknown name is its own group
    assert groups[MAIN][1] == 1  # the process's main thread is the event loop's row
