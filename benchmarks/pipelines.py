"""Chunk latency and fps of every model pipeline at its seed resolution, against the FLOP bound (models.md §7).

    python -m benchmarks.pipelines                 # tiny config, CPU (what every machine can run), TAE decoder
    python -m benchmarks.pipelines --size real     # CUDA: 1.3B random weights (Krea: 14B), bf16, Wan VAE

Each pipeline runs its real chunk loop (serve/pipelines/chunk_loop.py: VAE, denoising passes, clean pass or
Krea's recompute, cache policy) with seeded random weights, after warm-up chunks that fill the cache. Video mode
feeds random frames at the seed resolution with the seed's step list; text mode generates from noise.

The text encoder is off the per-chunk path (it runs once per prompt), so real-size runs use a one-layer umT5 of
the real width in place of the 5.7B encoder: the DiT sees a context of the real shape. On a CPU even the tiny Wan
VAE takes tens of seconds per chunk at 512×512, so the CPU default is the TAE (`--vae-type` picks).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.model_step import PEAK_TFLOPS, Shape, step_tflop
from benchmarks.timing import time_ms
from serve.models.dit import DIT_CONFIGS, WanDiT, keep_in_fp32
from serve.models.fp8 import store_dit_in_fp8
from serve.models.prompts import PromptEncoder
from serve.models.text_encoder import UMT5_PRESETS, UMT5Encoder
from serve.models.tokenizer import UMT5Tokenizer
from serve.pipelines.autoregressive import AutoregressivePipeline
from serve.pipelines.dry_run import cast_as_loaded
from serve.pipelines.registry import PIPELINES
from serve.pipelines.weights import Models, random_models, tiny_tokenizer_model
from serve.schemas import LoadParams

MODEL_PIPELINES = ("streamdiffusionv2", "longlive", "reward-forcing", "memflow", "krea-realtime-video")
ATTENDED_FRAMES = {  # K in models.md §7: key frames a denoising pass attends at steady state, its chunk included
    "streamdiffusionv2": 6,
    "longlive": 12,
    "reward-forcing": 9,
    "memflow": 15,
    "krea-realtime-video": 6,
}


def real_size_models(dit_config: str, vae_type: str, device: torch.device, dtype: torch.dtype) -> Models:
    """Random weights at the real DiT size; the text encoder is a one-layer umT5 of the real output width."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`: a 14B model in fp32 first would need 57 GB on the way
    try:
        with torch.device(device):
            dit = cast_as_loaded(WanDiT(DIT_CONFIGS[dit_config]), dtype, keep_in_fp32).eval()  # fp32 where loads are
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.device(device):
        text_config = replace(UMT5_PRESETS["umt5-xxl"], vocab_size=128, num_layers=1)
        encoder = UMT5Encoder(text_config).to(dtype).eval()
    tokenizer = UMT5Tokenizer(tiny_tokenizer_model(), max_length=dit.config.text_len)
    prompts = PromptEncoder(tokenizer, encoder, output_dtype=dtype, output_device=device)
    return Models(dit, prompts, vae_type, None, None)


def chunk_tflop(pipeline: AutoregressivePipeline, steps: int) -> float:
    """DiT TFLOP per chunk: each denoising pass, plus the clean pass (or Krea's 3-frame recompute)."""
    config = pipeline.models.dit.config
    chunk, k = pipeline.shape.chunk_latents, ATTENDED_FRAMES[pipeline.spec.id]
    denoise = step_tflop(config, Shape(pipeline.spec.id, pipeline.height, pipeline.width, chunk, k, 0))
    if pipeline.spec.id == "krea-realtime-video":
        extra = step_tflop(config, Shape(pipeline.spec.id, pipeline.height, pipeline.width, 3, 3, 0))
    else:
        extra = denoise
    return steps * denoise + extra


def bench(pipeline_id: str, size: str, vae_type: str, device: torch.device, warmup: int, iters: int) -> dict:
    spec = PIPELINES[pipeline_id]
    cls = spec.resolve_factory()
    given = LoadParams(random_weights=True, vae_type=vae_type)
    load_params = spec.effective_load_params(given, allow_random_weights=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if size == "tiny":
        models = random_models(load_params, device, seed=0)
    else:
        models = real_size_models(cls.shape.dit_config, vae_type, device, dtype)
    if load_params.get("quantization") == "fp8_e4m3fn":  # Krea's default, as a load would apply it
        store_dit_in_fp8(models.dit, dtype)
    pipeline = cls(spec, load_params, models, device, dtype)
    params = {**spec.runtime_defaults, "prompts": [{"text": "a cat in the snow", "weight": 1.0}]}
    frames = np.random.default_rng(0).integers(0, 255, (pipeline.chunk_frames, pipeline.height, pipeline.width, 3))
    frames = frames.astype(np.uint8)
    row = {"pipeline": pipeline_id, "size": f"{pipeline.height}×{pipeline.width}", "frames": pipeline.chunk_frames}
    for mode, given in (("video", frames), ("text", None)):
        stream = pipeline.open_stream(0)
        mode_params = {**params, "input_mode": mode, "noise_controller": False}
        for _ in range(warmup):  # the first chunks are shorter and the cache is not full yet
            stream.process(given, mode_params)
        row[f"{mode}_ms"] = time_ms(lambda s=stream, g=given, p=mode_params: s.process(g, p), device, 0, iters)
    steps = len(params["denoising_step_list"])
    row["tflop"] = chunk_tflop(pipeline, steps)
    pipeline.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", choices=("tiny", "real"), default="real" if cuda else "tiny")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--vae-type", default="wan" if cuda else "tae", choices=("wan", "lightvae", "tae", "lighttae"))
    parser.add_argument("--pipelines", nargs="*", default=list(MODEL_PIPELINES), choices=MODEL_PIPELINES)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument("--iters", type=int, default=5 if cuda else 2)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)

    precision = "bf16" if gpu else "fp32"
    title = f"Pipelines, {args.size} config, {precision}, {args.vae_type} VAE, {gpu or 'CPU'}, median of {args.iters}"
    table = Table(title=title)
    for column in ("pipeline", "H×W", "px frames", "V2V ms/chunk", "V2V fps", "T2V ms/chunk", "T2V fps",
                   "DiT TFLOP/chunk", "% of bound"):  # fmt: skip
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for pipeline_id in args.pipelines:
        row = bench(pipeline_id, args.size, args.vae_type, device, args.warmup, args.iters)
        bound_ms = 1e3 * row["tflop"] / peak if peak else None
        table.add_row(
            row["pipeline"], row["size"], str(row["frames"]),
            f"{row['video_ms']:.1f}", f"{1e3 * row['frames'] / row['video_ms']:.1f}",
            f"{row['text_ms']:.1f}", f"{1e3 * row['frames'] / row['text_ms']:.1f}",
            f"{row['tflop']:.4f}", f"{100 * bound_ms / row['video_ms']:.1f}" if bound_ms else "-",
        )  # fmt: skip
    Console(width=160).print(table)
    if not peak:
        print("% of bound: only on a GPU with a known bf16 peak (the bound is DiT FLOPs at 100% of that peak).")


if __name__ == "__main__":
    main()
