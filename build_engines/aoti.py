"""AOTInductor: the same static-shape step graphs as the ONNX path, compiled ahead of time into a `.pt2` package
that loads without Python model code (CPU here; CUDA, with fp8 GEMMs on Hopper, on a GPU machine)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn


def build_aoti_package(graph: nn.Module, example_args: tuple[Tensor, ...], path: Path) -> Path:
    """torch.export, then AOTInductor compile and package. Minutes on a CPU; shapes are those of `example_args`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        exported = torch.export.export(graph.eval(), example_args)
        return Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(path)))


def load_aoti_package(path: Path) -> Callable[..., tuple[Tensor, ...]]:
    """The package's runner, without the default runner's thread handoff: that one queries the event of its last
    run first, which invalidates the CUDA graph the served step is captured in (serve/runtime/cuda_step.py), so the
    capture failed and the compiled step ran ungraphed. One thread calls a runner: the pipeline's worker."""
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
