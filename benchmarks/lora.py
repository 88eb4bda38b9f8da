"""What a runtime LoRA costs: the DiT step with no adapter (= any merged LoRA), one, and four runtime adapters.

    python -m benchmarks.lora                       # tiny config on CPU
    python -m benchmarks.lora --config wan2.1-1.3b  # on CUDA: the real 1.3B at LongLive's chunk, bf16

A chunk is (steps + 1) of these steps, so the step's overhead is the chunk's. All rows run in one process, one
after the other, on the same inputs (these machines are noisy: compare within one run). Every block Linear carries
each adapter, as LongLive-style LoRAs do; rank is `--rank` per adapter.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.model_step import SHAPES, Shape
from benchmarks.timing import time_ms
from serve.models.checkpoint import LazyTensor
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy
from serve.models.lora import LoraAdapter, LoraLayer, attach_runtime_loras

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip


def random_adapter(model: WanDiT, rank: int, seed: int) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(model.config.num_layers):
        for linear in BLOCK_LINEARS:
            name = f"blocks.{i}.{linear}"
            module = model.get_submodule(name)
            down = torch.randn(rank, module.in_features, generator=generator) * 0.01
            up = torch.randn(module.out_features, rank, generator=generator) * 0.01
            layers[name] = LoraLayer(
                LazyTensor(tuple(down.shape), down.dtype, lambda t=down: t, None),  # type: ignore[arg-type]
                LazyTensor(tuple(up.shape), up.dtype, lambda t=up: t, None),  # type: ignore[arg-type]
                None,
            )
    return LoraAdapter(None, layers)  # type: ignore[arg-type]


def build_model(config_name: str, device: torch.device, dtype: torch.dtype) -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(DIT_CONFIGS[config_name]).to(device).eval()
    for name, param in model.named_parameters():  # Linears in `dtype`, the fp32 parts stay fp32 (as loaded)
        if param.dim() == 2 and "time_" not in name:
            param.data = param.data.to(dtype)
    return model


@torch.no_grad()
def bench(config_name: str, shape: Shape, rank: int, device: torch.device, dtype: torch.dtype, iters: int):
    """[(adapters, ms/step)]: a fresh model of the same weights per row, the adapters attached as one load would."""
    config = DIT_CONFIGS[config_name]
    frame_tokens = (shape.height // 16) * (shape.width // 16)
    spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, frame_tokens, shape.cache_frames)
    cache = KVCache(spec, dtype, device)
    plan = RollingSinkPolicy(spec, shape.sink_frames, device).plan(
        shape.cache_frames - shape.chunk_frames, shape.chunk_frames
    )
    latents = torch.randn(1, 16, shape.chunk_frames, shape.height // 8, shape.width // 8, device=device)
    timestep = torch.full((1, shape.chunk_frames), 750.0, device=device)
    context = torch.randn(1, config.text_len, config.text_dim, device=device)
    rows = []
    for count in (0, 1, 4):
        model = build_model(config_name, device, dtype)
        if count:
            adapters = [(f"lora{i}", random_adapter(model, rank, seed=i), 1.0) for i in range(count)]
            attach_runtime_loras(model, adapters)
        args = (latents, timestep, model.text_kv(context), cache.k, cache.v, *plan.as_args())
        label = f"{count} runtime" if count else "none (or merged)"
        rows.append((label, time_ms(lambda model=model, args=args: model.step(*args), device, 2, iters)))
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", default="wan2.1-1.3b" if cuda else "tiny", choices=sorted(DIT_CONFIGS))
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32")
    parser.add_argument("--rank", type=int, help="per adapter; default 32 (2 on the 64-wide tiny config: same ratio)")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rank = args.rank or (2 if args.config == "tiny" else 32)
    shape = SHAPES[1]  # LongLive's chunk: 3 latent frames at 512², 12 attended
    if args.config == "tiny":
        shape = Shape(shape.pipeline, 128, 128, shape.chunk_frames, shape.cache_frames, shape.sink_frames)
    rows = bench(args.config, shape, rank, device, dtype, args.iters)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(title=f"DiT step with runtime LoRAs: {args.config} {shape.height}×{shape.width}, rank "
                        f"{rank}, {args.dtype}, {gpu}")  # fmt: skip
    for column in ("adapters", "ms/step", "overhead"):
        table.add_column(column, justify="left" if column == "adapters" else "right")
    base = rows[0][1]
    for name, ms in rows:
        table.add_row(name, f"{ms:.2f}", f"{100 * (ms / base - 1):+.1f} %")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
