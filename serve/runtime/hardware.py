"""What the machine offers: CPU, RAM, GPUs, and which compute stacks are installed. Probed once, off the loop."""

from __future__ import annotations

import importlib.util
import os
import platform
from typing import Any

import psutil


def probe_hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "gpus": [],
        "vram_gb": 0.0,
        "torch_version": None,
        "cuda_version": None,
        "tensorrt_available": importlib.util.find_spec("tensorrt") is not None,
        "tensorrt_version": None,
    }
    try:
        import torch
    except ImportError:
        return info
    info["torch_version"] = torch.__version__
    info["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append(
                {
                    "index": index,
                    "name": props.name,
                    "sm": f"{props.major}{props.minor}",
                    "memory_gb": round(props.total_memory / 2**30, 1),
                }
            )
        info["vram_gb"] = info["gpus"][0]["memory_gb"]
    if info["tensorrt_available"]:
        try:
            import tensorrt

            info["tensorrt_version"] = tensorrt.__version__
        except Exception as exc:  # an installed but broken TensorRT is worth reporting, not crashing over
            info["tensorrt_available"] = False
            info["tensorrt_error"] = f"{type(exc).__name__}: {exc}"
    return info
