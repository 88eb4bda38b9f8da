"""Host → device copies that do not make the host wait for the device.

A blocking host→device copy synchronizes the stream, so the host waits for every kernel queued before it (on the
chunk path: the chunk before), and cannot run ahead to queue the next chunk while the GPU works. The chunk path's
small host-built tensors (cache plans, index lists, token ids, lookup tables) all go through `to_device`; the frames
have their own pinned staging (serve/pipelines/frames.py). The dry run counts any other (serve/pipelines/dry_run.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(host: Tensor, device: torch.device | str | None) -> Tensor:
    """`host` on `device`, queued without waiting. On CUDA the copy goes from pinned memory, which the caching host
    allocator keeps until the copy is done (from pageable memory CUDA may run it synchronously)."""
    if device is None or torch.device(device).type == "cpu":
        return host
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
