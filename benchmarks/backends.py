"""Per-step time of each backend: eager vs compiled (AOTInductor) vs TensorRT, for the DiT step and the VAE chunk steps.

    python -m benchmarks.backends                  # CPU: tiny configs at small sizes; compiled = AOTInductor on CPU
    python -m benchmarks.backends --iters 20       # CUDA: 1.3B bf16 at 512×512 and 480×832, real-size VAE

The compiled and TensorRT artifacts are built here from the same graphs `wanrt engines build` builds
(`DiTStepGraph`, `ChunkStep`), into a temporary folder: build time is reported, never timed as step time. Each
backend runs the step exactly as the server calls it (serve/runtime/backends.py), caches included; every timing is
a median after a warm-up with the device synchronised (benchmarks/timing.py). TensorRT columns appear only where
TensorRT and CUDA are present; its VAE column is not built here (`wanrt engines build` builds the server's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.timing import time_ms
from build_engines.aoti import build_aoti_package, load_aoti_package
from build_engines.build import dit_step_args
from build_engines.export import DiTStepGraph
from build_engines.manifest import dit_step_key, tensorrt_version
from serve.models.autoencoder import ChunkStep, build_model
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.runtime.backends import CompiledStep


@dataclass(frozen=True)
class Case:
    height: int
    width: int
    chunk_frames: int  # latent frames per chunk
    cache_frames: int


CPU_CASES = (Case(320, 576, 1, 6),)  # streamdiffusionv2's shape, tiny widths
CUDA_CASES = (Case(512, 512, 3, 12), Case(480, 832, 3, 12))  # LongLive's chunk and cache at both resolutions


@dataclass
class Row:
    component: str
    shape: str
    eager_ms: float
    compiled_ms: float | None = None
    tensorrt_ms: float | None = None
    build_s: float = 0.0


def timed_build(build) -> tuple[object, float]:
    start = time.perf_counter()
    result = build()
    return result, time.perf_counter() - start


@torch.no_grad()
def bench_dit(config: str, cases: tuple[Case, ...], device: torch.device, dtype: torch.dtype, work: Path,
              warmup: int, iters: int) -> list[Row]:  # fmt: skip
    torch.manual_seed(0)
    model = WanDiT(DIT_CONFIGS[config]).to(device).eval()
    for name, param in model.named_parameters():  # as loaded: linear weights in `dtype`, the fp32 parts stay fp32
        if param.dim() == 2 and "time_" not in name:
            param.data = param.data.to(dtype)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    rows = []
    for case in cases:
        key = dit_step_key("bench", case.height, case.width, case.chunk_frames, case.cache_frames,
                           model.config.text_len, precision, "aoti")  # type: ignore[arg-type]  # fmt: skip
        args = dit_step_args(model, key, device)
        call = (args[0], args[1], (args[2], args[3]), args[4], args[5], *args[6:])
        row = Row("DiT step", f"{config} {case.height}×{case.width} F={case.chunk_frames} K={case.cache_frames}",
                  time_ms(lambda call=call: model.step(*call), device, warmup, iters))  # fmt: skip
        path = work / f"dit-{case.height}x{case.width}.pt2"
        _, row.build_s = timed_build(lambda path=path, args=args: build_aoti_package(DiTStepGraph(model), args, path))
        compiled = CompiledStep(path, tuple(args[0].shape))
        row.compiled_ms = time_ms(lambda c=compiled, call=call: c(*call), device, warmup, iters)
        if device.type == "cuda" and tensorrt_version():
            row.tensorrt_ms = bench_dit_tensorrt(model, args, call, work, case, device, warmup, iters)
        rows.append(row)
    return rows


def bench_dit_tensorrt(model: WanDiT, args, call, work: Path, case: Case, device: torch.device, warmup: int,
                       iters: int) -> float:  # fmt: skip
    from build_engines.export import export_dit_step
    from build_engines.tensorrt import build_tensorrt_engine
    from serve.runtime.tensorrt_step import TensorRTStep

    onnx_path = export_dit_step(model, args, work / f"onnx-{case.height}x{case.width}" / "dit_step.onnx")
    plan = build_tensorrt_engine(onnx_path, work / f"dit-{case.height}x{case.width}.plan", work / "timing.cache")
    step = TensorRTStep(plan, device)
    return time_ms(lambda: step(*call), device, warmup, iters)


@torch.no_grad()
def bench_vae(size: str, resolutions: tuple[tuple[int, int], ...], device: torch.device, dtype: torch.dtype,
              work: Path, warmup: int, iters: int) -> list[Row]:  # fmt: skip
    """The steady-state chunk steps of the Wan VAE: encode 4 frames → 1 latent, decode 1 latent → 4 frames."""
    torch.manual_seed(0)
    model = build_model("wan", None if size == "real" else size).to(device, dtype).eval()
    rows = []
    for height, width in resolutions:
        gen = torch.Generator().manual_seed(0)
        first = (torch.rand(1, 3, 1, height, width, generator=gen) * 2 - 1).to(device, dtype)
        z0, enc_caches = model.encode_first(first)
        _, dec_caches = model.decode_first(z0)
        inputs = {
            "encode": ((torch.rand(1, 3, 4, height, width, generator=gen) * 2 - 1).to(device, dtype), enc_caches),
            "decode": (torch.randn(z0.shape, generator=gen).to(device, dtype), dec_caches),
        }
        for direction, (x, caches) in inputs.items():
            graph = ChunkStep(model, direction).eval()  # type: ignore[arg-type]
            example = (x, *caches)
            row = Row(f"VAE {direction}", f"wan {size} {height}×{width}",
                      time_ms(lambda g=graph, a=example: g(*a), device, warmup, iters))  # fmt: skip
            path = work / f"vae-{direction}-{height}x{width}.pt2"
            _, row.build_s = timed_build(lambda g=graph, a=example, p=path: build_aoti_package(g, a, p))
            runner = load_aoti_package(path)
            row.compiled_ms = time_ms(lambda r=runner, a=example: r(*a), device, warmup, iters)
            rows.append(row)
    return rows


def print_table(rows: list[Row], title: str) -> None:
    table = Table(title=title)
    for column in ("component", "shape", "eager ms", "compiled ms", "tensorrt ms", "compiled speed-up", "AOTI build s"):
        table.add_column(column, justify="left" if column in ("component", "shape") else "right")
    for r in rows:
        table.add_row(
            r.component, r.shape, f"{r.eager_ms:.2f}",
            f"{r.compiled_ms:.2f}" if r.compiled_ms is not None else "-",
            f"{r.tensorrt_ms:.2f}" if r.tensorrt_ms is not None else "-",
            f"{r.eager_ms / r.compiled_ms:.2f}×" if r.compiled_ms else "-", f"{r.build_s:.0f}",
        )  # fmt: skip
    Console(width=max(140, Console().width)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-vae", action="store_true", help="DiT rows only")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config, cases = ("wan2.1-1.3b", CUDA_CASES) if cuda else ("tiny", CPU_CASES)
    vae_size, vae_resolutions = ("real", ((512, 512), (480, 832))) if cuda else ("tiny", ((128, 128),))
    with tempfile.TemporaryDirectory(prefix="wanrt-bench-") as folder:
        work = Path(folder)
        rows = bench_dit(config, cases, device, dtype, work, args.warmup, args.iters)
        if not args.no_vae:
            rows += bench_vae(vae_size, vae_resolutions, device, dtype, work, args.warmup, args.iters)
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    trt = f", TensorRT {tensorrt_version()}" if tensorrt_version() else ", no TensorRT"
    print_table(
        rows, f"Backends per step: {machine}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}{trt}"
    )


if __name__ == "__main__":
    main()
