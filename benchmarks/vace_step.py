"""The cost of VACE: the DiT step with and without the VACE branch, the FLOP overhead by formula, and one chunk of
a pipeline with VACE input-video conditioning against the same pipeline's plain V2V chunk.

    python -m benchmarks.vace_step                      # tiny config on CPU (real configs on CUDA)
    python -m benchmarks.vace_step --config wan2.1-1.3b --device cuda --dtype bf16

FLOPs: the base step as benchmarks/model_step.py counts it (models.md §7); the VACE branch adds, per VACE block,
the block's linear and cross-attention FLOPs, self-attention within the chunk only (N·N, not N·K·Lf), after_proj
(2·N·d²), plus block 0's before_proj (2·N·d²) and the patch embedding (2·N·96·4·d). The block-count ratio (15/30 =
+50 % for the 1.3B, 8/40 = +20 % for the 14B) is the upper bound the attention-over-cache term pulls below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.model_step import SHAPES, Shape, step_inputs, step_tflop
from benchmarks.timing import add_model_arguments, model_device, time_ms
from serve.models.dit import DIT_CONFIGS, DiTConfig
from serve.models.vace import VACE_IN_DIM, VaceWanDiT, vace_layers


def vace_tflop(config: DiTConfig, shape: Shape) -> float:
    frame_tokens = (shape.height // 16) * (shape.width // 16)
    n = shape.chunk_frames * frame_tokens
    d, f, blocks = config.dim, config.ffn_dim, len(vace_layers(config))
    per_block = n * 2 * (6 * d * d + 2 * d * f) + 4 * n * n * d + 4 * n * config.text_len * d + 2 * n * d * d
    return (blocks * per_block + 2 * n * d * d + 2 * n * VACE_IN_DIM * 4 * d) / 1e12


@torch.no_grad()
def bench_steps(config_name: str, device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> list[tuple]:
    config = DIT_CONFIGS[config_name]
    torch.manual_seed(0)
    model = VaceWanDiT(config).to(device).eval()
    for name, param in model.named_parameters():
        if param.dim() == 2 and "time_" not in name:
            param.data = param.data.to(dtype)
    rows = []
    scale = torch.tensor(1.0, device=device)
    for shape in SHAPES:
        inputs = step_inputs(config, shape, device, dtype)
        vace_context = torch.randn(1, VACE_IN_DIM, *inputs.latents.shape[2:], device=device)
        vace_kv = model.vace_text_kv(inputs.context)
        args = inputs.args(model.text_kv(inputs.context))
        base_ms = time_ms(lambda args=args: model.step(*args), device, warmup, iters)
        vace_ms = time_ms(
            lambda args=args, c=vace_context, kv=vace_kv: model.step_vace(*args, c, kv, scale), device, warmup, iters
        )
        rows.append((shape, base_ms, vace_ms, step_tflop(config, shape), vace_tflop(config, shape)))
    return rows


@torch.no_grad()
def bench_chunk(pipeline_id: str, size: int, chunks: int) -> tuple[float, float]:
    """ms per steady-state chunk (median over `chunks` after one warm-up chunk) of a tiny random-weight pipeline:
    plain V2V, and VACE with the camera as the control (two extra VAE encodes plus the VACE branch per pass)."""
    import time

    from serve.pipelines.registry import get_spec
    from serve.schemas import LoadParams

    spec = get_spec(pipeline_id)
    results = []
    for vace in (False, True):
        params = spec.effective_load_params(
            LoadParams(height=size, width=size, random_weights=True, vace_enabled=vace), allow_random_weights=True
        )
        pipeline = spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=Path("/none"))
        stream = pipeline.open_stream(0)
        runtime = {**spec.runtime_defaults, "input_mode": "video", "vace_enabled": vace, "noise_controller": False}
        frames = np.random.default_rng(0).integers(0, 255, (pipeline.chunk_frames, size, size, 3), dtype=np.uint8)
        stream.process(frames, runtime)
        samples = []
        for _ in range(chunks):
            start = time.perf_counter()
            stream.process(frames, runtime)
            samples.append((time.perf_counter() - start) * 1e3)
        results.append(float(np.median(samples)))
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=64, help="pixels, for the tiny pipeline chunk rows")
    args = parser.parse_args()
    device, dtype, gpu = model_device(args)

    formula = Table(title="VACE FLOPs per DiT step by formula (the published sizes)")
    for column in ("config", "pipeline shape", "H×W", "base TFLOP", "VACE TFLOP", "+%", "blocks +%"):
        formula.add_column(column, justify="left" if column in ("config", "pipeline shape") else "right")
    for name in ("wan2.1-1.3b", "wan2.1-14b"):
        real = DIT_CONFIGS[name]
        for shape in SHAPES:
            base, extra = step_tflop(real, shape), vace_tflop(real, shape)
            formula.add_row(
                name, shape.pipeline, f"{shape.height}×{shape.width}", f"{base:.2f}", f"{extra:.2f}",
                f"{100 * extra / base:.1f}", f"{100 * len(vace_layers(real)) / real.num_layers:.0f}",
            )  # fmt: skip
    Console(width=140).print(formula)

    table = Table(title=f"DiT step with and without VACE, {args.config}, {args.dtype}, {gpu or 'CPU'}")
    for column in ("pipeline shape", "H×W", "base ms", "VACE ms", "measured +%", "FLOP +% (formula)", "blocks +%"):
        table.add_column(column, justify="left" if column == "pipeline shape" else "right")
    config = DIT_CONFIGS[args.config]
    blocks = 100 * len(vace_layers(config)) / config.num_layers
    for shape, base_ms, vace_ms, base_tflop, extra_tflop in bench_steps(
        args.config, device, dtype, args.warmup, args.iters
    ):
        table.add_row(
            shape.pipeline, f"{shape.height}×{shape.width}", f"{base_ms:.1f}", f"{vace_ms:.1f}",
            f"{100 * (vace_ms / base_ms - 1):.0f}", f"{100 * extra_tflop / base_tflop:.0f}", f"{blocks:.0f}",
        )  # fmt: skip
    Console(width=140).print(table)
    if args.config == "tiny":
        chunks = Table(title=f"one chunk, tiny random weights, {args.chunk_size}×{args.chunk_size}, CPU")
        for column in ("pipeline", "V2V ms", "VACE input-video ms", "+%"):
            chunks.add_column(column, justify="left" if column == "pipeline" else "right")
        for pipeline_id in ("streamdiffusionv2", "longlive"):
            plain, vace = bench_chunk(pipeline_id, args.chunk_size, chunks=3)
            chunks.add_row(pipeline_id, f"{plain:.0f}", f"{vace:.0f}", f"{100 * (vace / plain - 1):.0f}")
        Console(width=140).print(chunks)


if __name__ == "__main__":
    main()
