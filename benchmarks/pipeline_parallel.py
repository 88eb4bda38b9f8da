"""Pipeline-parallel stages (serve/runtime/stages.py): chunk latency and throughput over 1, 2 and 3 ranks, the cost of
one activation hop, and by formula the real-size speed-up.

    python -m benchmarks.pipeline_parallel                  # CPU ranks (gloo), tiny DiT with 6 blocks
    python -m benchmarks.pipeline_parallel --gpus 0,1,2,3   # CUDA ranks (nccl), same tiny model

1. Chunks: StreamDiffusionV2's loop (video mode by default: the VAE encode on rank 0, the decode on the last stage;
   2 denoising steps + the clean pass = 3 DiT steps per chunk) with random weights, on one rank and split over 2
   and 3, each without and with the stream batch (3 rows, one lane per rank: serve/pipelines/stream_batch.py), the
   stream batch also after the load's rebalance (`rebalance_stages`; the others keep the even split); median ms per
   chunk out after a warm-up (for the stream batch, after the pipe has filled), chunks/s, and the latency in calls
   from a chunk going in to its frames coming out.
2. Hop: one activation sent rank 0 → rank 1 and back (ping-pong, half the round trip), at the tiny size and at the
   real 1.3B SDv2 size [1, 720, 1536] (one 320×576 latent frame, fp32 residual stream as the stages send it).
3. Formula (printed with its assumptions): the real-size throughput speed-up on P GPUs, with and without the stream
   batch, from a one-GPU chunk time split into fixed work (the encode side on the first stage, the decode on the
   last, as built) and per-block work split by `balanced_split`, and a hop cost per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from serve.models.dit import DIT_CONFIGS
from serve.pipelines.autoregressive import StreamDiffusionV2Pipeline
from serve.pipelines.placement import balanced_split, split_blocks
from serve.pipelines.registry import get_spec
from serve.schemas import LoadParams

SIZE = 64  # pixels: 4×4 latent tokens per frame
BENCH_DIT = dataclasses.replace(DIT_CONFIGS["tiny"], num_layers=6)
REAL_ACTIVATION = (1, 720, 1536)  # SDv2 1.3B at 320×576: one latent frame's tokens × d
# The formula's split of a one-GPU chunk (assumptions, not measurements here): the VAE, embeddings and the loop are
# 30 % of it (scale.md §1: the SDv2 paper's "the VAE takes about 30 % of the time"); a third of that is the encode
# side (with the loop) on the first stage, two thirds the decode on the last (our guess: the causal decoder
# upsamples to pixels, the heavier half; models.md gives 8.9 TFLOP per latent frame for the decode at 512²).
FIXED_FRACTION = 0.3
ENCODE_SHARE = 1 / 3


class BenchStreamDiffusionV2(StreamDiffusionV2Pipeline):
    random_dit_config = BENCH_DIT


def chunk_times(gpus: str | None, chunks: int, warmup: int, stream_batch: bool, rebalance: bool = False,
                mode: str = "video") -> tuple[float, int, dict | None]:  # fmt: skip
    """Median ms per chunk out of an SDv2 stream on `gpus` (None: one device) in `mode` (video: a mid-grey input
    chunk per call, encoded on rank 0), the calls a chunk takes from going in to coming out, and the placement."""
    spec = get_spec("streamdiffusionv2")
    extra: dict = {"gpus": gpus} if gpus else {}
    if stream_batch:
        extra["stream_batch"] = True
    if gpus:
        extra["rebalance_stages"] = rebalance  # ignored by a one-stage load
    params = spec.effective_load_params(
        LoadParams(height=SIZE, width=SIZE, random_weights=True, **extra), allow_random_weights=True
    )
    pipeline = BenchStreamDiffusionV2.load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"))
    try:
        stream = pipeline.open_stream(seed=0)
        run = {**spec.runtime_defaults, "input_mode": mode, "prompts": [{"text": "a cat", "weight": 1.0}]}
        source = np.full((pipeline.chunk_frames, SIZE, SIZE, 3), 128, np.uint8) if mode == "video" else None
        latency = 0  # calls until the first chunk is out: the pipe's fill (rows, lanes) and the last stage's decode
        while not len(stream.process(source, run)):
            latency += 1
            assert latency < 64, "no chunk came out"
        samples = []
        for i in range(warmup + chunks):
            started = time.perf_counter()
            frames = stream.process(source, run)  # ends in the chunk's one device→host copy: synchronised
            assert len(frames) == 4  # one chunk per call once the pipe is full
            if i >= warmup:
                samples.append((time.perf_counter() - started) * 1e3)
        return statistics.median(samples), latency + 1, pipeline.placement()
    finally:
        pipeline.close()


def _echo(port: int, device: str, shapes: list[tuple[int, ...]], iters: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", store=store, rank=1, world_size=2,
                            timeout=timedelta(seconds=60))  # fmt: skip
    for shape in shapes:
        buffer = torch.empty(shape, device=device)
        for _ in range(iters + 2):
            dist.recv(buffer, 0)
            dist.send(buffer, 0)
    dist.destroy_process_group()


def hop_ms(devices: tuple[str, str], shapes: list[tuple[int, ...]], iters: int = 20) -> list[float]:
    """Half the median round trip of each shape (fp32), rank 0 ⇄ rank 1."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)  # port 0: the store picks one
    child = multiprocessing.get_context("spawn").Process(target=_echo, args=(store.port, devices[1], shapes, iters))
    child.start()
    dist.init_process_group("gloo" if devices[0] == "cpu" else "nccl", store=store, rank=0, world_size=2,
                            timeout=timedelta(seconds=60))  # fmt: skip
    results = []
    try:
        for shape in shapes:
            buffer = torch.randn(shape, device=devices[0])
            samples = []
            for i in range(iters + 2):
                started = time.perf_counter()
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
                if buffer.is_cuda:
                    torch.cuda.synchronize(buffer.device)
                if i >= 2:
                    samples.append((time.perf_counter() - started) * 1e3 / 2)
            results.append(statistics.median(samples))
    finally:
        dist.destroy_process_group()
        child.join(30)
    return results


def speedup(one_gpu_chunk_ms: float, fixed_fraction: float, encode_share: float, blocks: int, ranks: int,
            hop: float, steps: int, stream_batch: bool) -> tuple[float, list[int]]:  # fmt: skip
    """Throughput speed-up on `ranks` GPUs and the blocks per stage it assumes. One GPU: T = F + B (F fixed: the VAE,
    embeddings, the loop; B: the blocks, every pass of a chunk).

    Without stream batch every DiT step still crosses all stages one after the other: T_P = T + steps·P·hop, so
    the speed-up is T / T_P (< 1: the split buys memory, not speed). With stream batch each micro-step keeps every
    stage busy on a different chunk (steps + 1 rows: the clean pass is a row) and one chunk leaves per micro-step:
    T_P = max_r(stage r) + (steps + 1)·hop (a micro-step's activations are one row per pass). As built, the first
    stage carries the encode share of F (with the loop and embeddings) and the last the decode; the whole blocks
    are split by `balanced_split`, the rebalance the load runs after its warm-up, from the same per-stage times.
    """
    counts = [end - start for start, end in split_blocks(blocks, ranks)]
    if ranks == 1:
        return 1.0, counts
    if not stream_batch:
        return one_gpu_chunk_ms / (one_gpu_chunk_ms + steps * ranks * hop), counts
    fixed = fixed_fraction * one_gpu_chunk_ms
    per_block = (one_gpu_chunk_ms - fixed) / blocks
    fixed_ms = [0.0] * ranks
    fixed_ms[0] += encode_share * fixed
    fixed_ms[-1] += (1 - encode_share) * fixed
    split = balanced_split([n * per_block for n in counts], fixed_ms, split_blocks(blocks, ranks))
    counts = [end - start for start, end in split]
    stage = max(f + n * per_block for f, n in zip(fixed_ms, counts, strict=True))
    return one_gpu_chunk_ms / (stage + (steps + 1) * hop), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default=None, help="CUDA ids (e.g. 0,1,2); default CPU ranks")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mode", choices=("video", "text"), default="video", help="the stream's input mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=200)  # the tables are wide; a pipe or a narrow terminal would fold them
    ids = args.gpus.split(",") if args.gpus else None

    table = Table(
        title=f"SDv2 chunk over pipeline stages (tiny, {BENCH_DIT.num_layers} blocks, {SIZE}×{SIZE}, {args.mode})"
    )
    columns = ("ranks", "stream batch", "backend", "blocks per stage", "ms per chunk out", "chunks/s", "fps",
               "latency (calls in → out)", "stage ms (last step, with VAE)", "decode ms (last stage)",
               "balanced split of these times")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for ranks in (1, 2, 3):
        gpus = (",".join(ids[:ranks]) if ids else f"cpu:{ranks}") if ranks > 1 else (ids[0] if ids else None)
        if ids and ranks > len(ids):
            break
        # Plain PP runs the stages one after the other, so its split cannot change its speed: rebalanced only with the
        # stream batch, where the slowest stage sets the pace.
        for batched, rebalance in ((False, False), (True, False), *(((True, True),) if ranks > 1 else ())):
            ms, latency, placed = chunk_times(gpus, args.chunks, args.warmup, batched, rebalance, args.mode)
            blocks = placed["blocks_per_stage"] if placed and "blocks_per_stage" in placed else [BENCH_DIT.num_layers]
            stage_ms = ", ".join(f"{t:.1f}" for t in placed["stage_ms"]) if placed and placed.get("stage_ms") else "-"
            backend = placed["backend"] if placed and "backend" in placed else "-"
            decode = f"{placed['decode_ms']:.1f}" if placed and placed.get("decode_ms") is not None else "-"
            suggested = str(placed.get("suggested_blocks_per_stage", "-")) if placed else "-"
            mode = ("on, rebalanced" if rebalance else "on") if batched else "off"
            table.add_row(str(ranks), mode, backend, str(blocks), f"{ms:.1f}", f"{1e3 / ms:.2f}",
                          f"{4e3 / ms:.1f}", str(latency), stage_ms, decode, suggested)  # fmt: skip
    console.print(table)

    devices = ("cpu", "cpu") if not ids or len(ids) < 2 else (f"cuda:{ids[0]}", f"cuda:{ids[1]}")
    tiny = (1, 3 * 16, BENCH_DIT.dim)  # what the stages send at this size (x per DiT step)
    hops = hop_ms(devices, [tiny, REAL_ACTIVATION])
    table = Table(title=f"one activation hop rank 0 → rank 1 ({devices[0]} ⇄ {devices[1]}, fp32)")
    for column in ("shape", "MB", "ms", "GB/s"):
        table.add_column(column)
    for shape, ms in zip((tiny, REAL_ACTIVATION), hops, strict=True):
        mb = torch.Size(shape).numel() * 4 / 1e6
        table.add_row(str(list(shape)), f"{mb:.3f}", f"{ms:.3f}", f"{mb / ms:.2f}")
    console.print(table)

    # Real size by formula: SDv2 1.3B 512², 1-step, one H100: 26.2 FPS (scale.md §1) → 4 frames per chunk.
    one_gpu = 4 / 26.2 * 1e3
    table = Table(title=f"expected real-size throughput speed-up (formula; SDv2 1.3B, 30 blocks, fixed work "
                        f"{FIXED_FRACTION:.0%} of a chunk, {ENCODE_SHARE:.0%} of it on the first stage)")  # fmt: skip
    for column in ("GPUs", "hop ms per row", "plain PP", "stream batch", "blocks per stage (balanced)"):
        table.add_column(column)
    for hop in (0.05, 2.0):  # NVLink bandwidth bound for 4.4 MB; the paper's implied PP cost per step
        for ranks in (1, 2, 3, 4):
            plain, _ = speedup(one_gpu, FIXED_FRACTION, ENCODE_SHARE, 30, ranks, hop, steps=2, stream_batch=False)
            batched, counts = speedup(one_gpu, FIXED_FRACTION, ENCODE_SHARE, 30, ranks, hop, 2, stream_batch=True)
            table.add_row(str(ranks), f"{hop:g}", f"{plain:.2f}×", f"{batched:.2f}×", str(counts))
    console.print(table)


if __name__ == "__main__":
    main()
