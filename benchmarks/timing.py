"""Timing shared by the benchmarks: warm up, synchronise, take the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 1, iters: int = 3) -> float:
    """Median wall time of `fn` in ms, after `warmup` calls, with the device synchronised around each call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
