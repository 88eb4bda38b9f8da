"""What a runtime LoRA costs: the DiT step with no adapter (= any merged LoRA), one, and four runtime adapters.

    python -m benchmarks.lora                       # tiny config on CPU
    python -m benchmarks.lora --config wan2.1-1.3b  # on CUDA: the real 1.3B at LongLive's chunk, bf16

    python -m benchmarks.lora --config wan2.1-1.3b --layers 4 --height 128 --width 128 --dtype fp32   # CPU, real width

A chunk is (steps + 1) of these steps, so the step's overhead is the chunk's. The rows run in one process on the
same inputs, timed in turn round after round, each row's best round kept (these machines are noisy). Every block
Linear carries each adapter, as LongLive-style LoRAs do; rank is `--rank` per adapter. On a CPU the tiny config's
steps are too short to time against a busy machine: `--layers` keeps the real width with fewer blocks.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.model_step import SHAPES, Shape, step_inputs, step_tflop
from benchmarks.timing import add_model_arguments, model_device, time_ms
from serve.models.checkpoint import LazyTensor
from serve.models.dit import BLOCK_LINEARS, DIT_CONFIGS, DiTConfig, WanDiT
from serve.models.lora import LoraAdapter, LoraLayer, attach_runtime_loras


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


def lora_targets(config: DiTConfig) -> list[torch.nn.Linear]:
    """The Linears of one model of `config` that the adapters sit on (built on meta: shapes only)."""
    with torch.device("meta"):
        model = WanDiT(config)
    return [model.get_submodule(f"blocks.{i}.{n}") for i in range(config.num_layers) for n in BLOCK_LINEARS]


def build_model(config: DiTConfig, device: torch.device, dtype: torch.dtype) -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(config).to(device).eval()
    for name, param in model.named_parameters():  # Linears in `dtype`, the fp32 parts stay fp32 (as loaded)
        if param.dim() == 2 and "time_" not in name:
            param.data = param.data.to(dtype)
    return model


@torch.no_grad()
def bench(config: DiTConfig, shape: Shape, rank: int, device: torch.device, dtype: torch.dtype, iters: int):
    """[(adapters, ms/step)]: one model of the same weights per row (adapters attached as one load would), timed in
    turn, round after round, each row's best round kept: a noisy neighbour slows all rows alike or none."""
    inputs = step_inputs(config, shape, device, dtype)
    rows = {}
    for count in (0, 1, 4):
        model = build_model(config, device, dtype)
        if count:
            attach_runtime_loras(model, [(f"lora{i}", random_adapter(model, rank, seed=i), 1.0) for i in range(count)])
        args = inputs.args(model.text_kv(inputs.context))
        rows[f"{count} runtime" if count else "none (or merged)"] = (model, args, [])
    for _ in range(iters):
        for model, args, samples in rows.values():
            samples.append(time_ms(lambda model=model, args=args: model.step(*args), device, 1, 1))
    return [(label, min(samples)) for label, (_, _, samples) in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rank", type=int, help="per adapter; default 32 (2 on the 64-wide tiny config: same ratio)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--layers", type=int, help="blocks of the model (default: all)")
    parser.add_argument("--height", type=int, help="default: 512 (128 for the tiny config)")
    parser.add_argument("--width", type=int)
    args = parser.parse_args()
    device, dtype, gpu = model_device(args)
    rank = args.rank or (2 if args.config == "tiny" else 32)
    shape = SHAPES[1]  # LongLive's chunk: 3 latent frames at 512², 12 attended
    side = 128 if args.config == "tiny" else shape.height
    shape = replace(shape, height=args.height or side, width=args.width or args.height or side)
    config = DIT_CONFIGS[args.config]
    config = replace(config, num_layers=args.layers or config.num_layers)
    rows = bench(config, shape, rank, device, dtype, args.iters)
    gpu = gpu or "CPU"
    table = Table(title=f"DiT step with runtime LoRAs: {args.config} ({config.num_layers} blocks) {shape.height}×"
                        f"{shape.width}, rank {rank}, {args.dtype}, {gpu}")  # fmt: skip
    for column in ("adapters", "ms/step", "time added"):
        table.add_column(column, justify="left" if column == "adapters" else "right")
    table.add_column("FLOP added")
    base = rows[0][1]
    step_flop = step_tflop(config, shape) * 1e12
    tokens = shape.chunk_frames * (shape.height // 16) * (shape.width // 16)
    per_rank = sum(2 * tokens * (m.in_features + m.out_features) for m in lora_targets(config))  # FLOP per rank
    for (name, ms), count in zip(rows, (0, 1, 4), strict=True):
        added = count * rank * per_rank / step_flop
        table.add_row(name, f"{ms:.2f}", f"{100 * (ms / base - 1):+.1f} %", f"{100 * added:+.1f} %")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
