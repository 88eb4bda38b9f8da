"""What the benchmarks share: timing (warm up, synchronise, take the median) and the DiT benchmarks' model options."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from serve.models.dit import DIT_CONFIGS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --device and --dtype: the real 1.3B in bf16 where there is a GPU, the tiny config in fp32 elsewhere."""
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", default="wan2.1-1.3b" if cuda else "tiny", choices=sorted(DIT_CONFIGS))
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")


def model_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str | None]:
    """The device and dtype `add_model_arguments` chose, and the GPU's name (None on a CPU)."""
    device = torch.device(args.device)
    return device, DTYPES[args.dtype], torch.cuda.get_device_name(device) if device.type == "cuda" else None
