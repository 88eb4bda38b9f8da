"""DiT step time per chunk (and the VAE chunk steps) at each seed resolution, against the FLOP bound.

    python -m benchmarks.model_step                     # tiny config on CPU (real configs on CUDA)
    python -m benchmarks.model_step --config wan2.1-1.3b --device cuda --dtype bf16

One row per (pipeline shape, resolution): a chunk of latent frames against a full static KV cache, the step every
denoising pass runs. FLOPs follow models.md §7: linear L·N·2·(6d² + 2df), self-attention L·4·N·(K·Lf)·d with K the
cache frames the static step attends, cross-attention L·4·N·text_len·d.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.timing import add_model_arguments, model_device, time_ms
from benchmarks.vae_step import bench_vae_steps, print_table
from serve.models.dit import DIT_CONFIGS, DiTConfig, WanDiT
from serve.models.kv_cache import ChunkPlan, KVCache, KVCacheSpec, RollingSinkPolicy

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0}  # dense bf16, for the % of bound column


@dataclass(frozen=True)
class Shape:
    pipeline: str
    height: int
    width: int
    chunk_frames: int  # latent frames per chunk
    cache_frames: int  # K: frames the static step attends
    sink_frames: int


SHAPES = (
    Shape("streamdiffusionv2", 320, 576, 1, 6, 3),
    Shape("longlive / reward-forcing / memflow", 512, 512, 3, 12, 3),
    Shape("krea-realtime-video", 256, 256, 3, 6, 3),
)


@dataclass(frozen=True)
class StepInputs:
    """What one DiT step of `shape` takes besides the model: a full static KV cache with its steady-state plan (the
    chunk attends every cache frame), the chunk's latents at t = 750, and a text context."""

    cache: KVCache
    plan: ChunkPlan
    latents: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor

    def args(self, text_kv: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        return (self.latents, self.timestep, text_kv, self.cache.k, self.cache.v, *self.plan.as_args())


def step_inputs(config: DiTConfig, shape: Shape, device: torch.device, dtype: torch.dtype) -> StepInputs:
    frame_tokens = (shape.height // 16) * (shape.width // 16)
    spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, frame_tokens, shape.cache_frames)
    plan = RollingSinkPolicy(spec, shape.sink_frames, device).plan(
        shape.cache_frames - shape.chunk_frames, shape.chunk_frames
    )
    return StepInputs(
        KVCache(spec, dtype, device), plan,
        torch.randn(1, 16, shape.chunk_frames, shape.height // 8, shape.width // 8, device=device),
        torch.full((1, shape.chunk_frames), 750.0, device=device),
        torch.randn(1, config.text_len, config.text_dim, device=device),
    )  # fmt: skip


def step_tflop(config: DiTConfig, shape: Shape) -> float:
    frame_tokens = (shape.height // 16) * (shape.width // 16)
    n = shape.chunk_frames * frame_tokens
    d, f, layers = config.dim, config.ffn_dim, config.num_layers
    linear = layers * n * 2 * (6 * d * d + 2 * d * f)
    self_attention = layers * 4 * n * shape.cache_frames * frame_tokens * d
    cross_attention = layers * 4 * n * config.text_len * d
    return (linear + self_attention + cross_attention) / 1e12


@torch.no_grad()
def bench_dit(config_name: str, device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> list[tuple]:
    config = DIT_CONFIGS[config_name]
    torch.manual_seed(0)
    model = WanDiT(config).to(device).eval()
    for name, param in model.named_parameters():  # linear layers in `dtype`, fp32 parts stay fp32 (as loaded)
        if param.dim() == 2 and "time_" not in name:
            param.data = param.data.to(dtype)
    rows = []
    for shape in SHAPES:
        inputs = step_inputs(config, shape, device, dtype)
        args = inputs.args(model.text_kv(inputs.context))
        ms = time_ms(lambda args=args: model.step(*args), device, warmup, iters)
        tflop = step_tflop(config, shape)
        rows.append((shape, ms, tflop))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-vae", action="store_true", help="DiT rows only")
    args = parser.parse_args()
    device, dtype, gpu = model_device(args)

    peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    table = Table(title=f"DiT step, {args.config}, {args.dtype}, {gpu or 'CPU'}")
    for column in (
        "pipeline shape",
        "H×W",
        "chunk frames",
        "K frames",
        "ms/step",
        "TFLOP/step",
        "TFLOP/s",
        "% of peak",
    ):
        table.add_column(column, justify="left" if column == "pipeline shape" else "right")
    for shape, ms, tflop in bench_dit(args.config, device, dtype, args.warmup, args.iters):
        achieved = tflop / (ms / 1e3)
        table.add_row(
            shape.pipeline, f"{shape.height}×{shape.width}", str(shape.chunk_frames), str(shape.cache_frames),
            f"{ms:.1f}", f"{tflop:.4f}", f"{achieved:.3f}", f"{100 * achieved / peak:.1f}" if peak else "-",
        )  # fmt: skip
    Console(width=140).print(table)
    if not args.no_vae:
        size = "real" if args.config != "tiny" else "tiny"
        rows = bench_vae_steps(size=size, device=args.device, dtype=dtype, warmup=1, iters=3)
        print_table(rows, f"VAE chunk steps, {size}, {args.dtype}, {gpu or 'CPU'}")


if __name__ == "__main__":
    main()
