"""Pipeline parallelism: the DiT's blocks split over ranks in contiguous stages, each chunk's activations passed rank
to rank with torch.distributed point-to-point. gloo on CPU ranks, nccl on GPUs: the same code, only the backend name
differs (scale.md §1).

Rank 0 is the pipeline's worker thread in the server process. It embeds (patches, time, prompt), runs its own blocks and
drives the other ranks (`StageDriver`, serve/runtime/stage_driver.py). Ranks 1..N−1 are processes spawned at load
(`stage_main`), one per device. Each rank reads from the DiT's file and holds only its part's weights (rank 0: the
embeddings and its blocks, `first_stage_part`; the others: their blocks, the last the head, `StageModel`) and, per
stream, only those layers' KV caches: no replica of the whole model, and no cache moved off to the CPU. The last rank
runs the head and sends the flow prediction back to rank 0, where the one chunk loop goes on (scheduler, noise, the VAE
encode). The last rank also holds the VAE's decoder (rank 0 holds its encoder; neither holds the other half) and, per
stream, its causal decoder state: each finished chunk's clean latents go to it and its decoded uint8 frames come back to
rank 0, where the server's output path is. Policies never see ranks: the stream's `run_step` calls `StageDriver.step`
with the DiT step's own arguments, its decode `submit_decode`.

Protocol. Every message is sent by its sender in one fixed order, so NCCL's tag-less matching (scale.md §1) pairs
them as gloo's tags do:
  header int64[8] = (op, stream, a, b, c, 0, 0, 0)                           rank 0 → every stage
  OPEN   a, b = token grid (rows, columns), c = cache frame slots: the stream's caches on each stage (and its
         decoder state on the last)
  TEXT   then the embedded prompt [1, text_len, d]                          rank 0 → every stage
  STEP   a = latent frames F, b = stream-batch rows B (0: one chunk, B = 1 and the plan's tensors have no row
         dimension); then write_index [(B,) F·Lf], key_bias [(B,) S], frame_positions [(B,) F], e0 [B, F, 6, d]
         rank 0 → every stage (and e [B, F, d] → the last); x [B, N, d] rank r → r+1 with the stage times
         float64[ranks]; the last rank → rank 0: head output [B, N, 64] and the times. Rank 0 need not wait for
         the reply before its next STEP (`submit` / `collect`): a stream batch keeps one micro-step per stage in
         flight, and every stage takes its messages in the order they were sent.
  DECODE a = latent frames F, b = pixel frames T it decodes to (rank 0 knows whether the stream's decoder has
         started); then the clean latents float32 [1, 16, F, h, w] rank 0 → the last; the last decodes them after
         every message sent before (the chunk's clean pass included) and sends rank 0 the frames uint8
         [T, H, W, 3] and its decode ms float64[1]. Like a STEP's reply, rank 0 collects them later
         (`submit_decode` / `collect_decode`): with a stream batch, lanes − 1 micro-steps later.
  MOVE   a = block, b = from rank, c = to rank (no stream open): the sender sends the block's state-dict dtypes
         int64[n] then its tensors in key order; the receiver builds the block from them (`rebalance`).
  RESET / CLOSE: the stream's caches (and decoder state);  FETCH: every stage → rank 0 its K and V (tests);
  STOP: exit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from serve.models.autoencoder import StreamingAutoencoder, drop_half, make_vae, to_uint8_frames
from serve.models.dit import DiTBlock, DiTConfig, Head, RotaryEmbedding, keep_in_fp32, run_blocks
from serve.models.kv_cache import ChunkPlan, KVCache, KVCacheSpec, TextKVCache
from serve.pipelines.vram import module_bytes

HEADER = 8
OPEN, TEXT, STEP, RESET, CLOSE, FETCH, STOP, DECODE, MOVE = range(1, 10)
OP_TIMEOUT_S = 120.0  # torch.distributed's own timeout: a hung (not dead) stage raises after this


@dataclass(frozen=True)
class RandomWeights:
    seed: int


@dataclass(frozen=True)
class CheckpointWeights:
    path: Path
    prefer: str | None
    lora: Path | None
    lora_scale: float


@dataclass(frozen=True)
class VaeSpec:
    """The VAE the last stage decodes with: rank 0's, from the same file or the same seeded random weights (fp32,
    as every stream runs it)."""

    vae_type: str
    path: Path | None
    size: str | None
    seed: int


@dataclass(frozen=True)
class StageSpec:
    """What a spawned stage process needs to build its part (picklable: it crosses the spawn)."""

    rank: int
    ranks: int
    device: str
    backend: str
    store_port: int
    config: DiTConfig
    layers: tuple[int, int]  # [start, end) of the model's blocks
    dtype: torch.dtype
    weights: RandomWeights | CheckpointWeights
    threads: int  # torch CPU threads: the same as rank 0's, so CPU arithmetic matches the one-process stream
    vae: VaeSpec | None = None  # the last stage's decoder


@dataclass(frozen=True)
class Built:
    """A spawned stage's word to rank 0 that its part is built: what its weights take on its device."""

    weight_bytes: int


class StageModel(nn.Module):
    """One stage's blocks under Wan's names (`blocks.{i}`, a ModuleDict keyed by the model's block index, so a
    checkpoint's keys load into it unchanged) and, on the last stage, the head."""

    def __init__(self, config: DiTConfig, layers: tuple[int, int], last: bool) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleDict({str(i): DiTBlock(config) for i in range(*layers)})
        self.head = Head(config) if last else None
        self.rope = RotaryEmbedding(config.head_dim)


def build_stage_model(spec: StageSpec) -> StageModel:
    """The stage's weights only: from the seeded random DiT (tiny; built whole on the CPU, then cut), or read from
    the checkpoint with only this stage's keys selected (the built-in LoRA merged as they load)."""
    last = spec.rank == spec.ranks - 1
    if isinstance(spec.weights, RandomWeights):
        from serve.pipelines.weights import random_dit

        whole = random_dit(spec.weights.seed, spec.config)
        stage = StageModel(spec.config, spec.layers, last)
        for i in range(*spec.layers):
            stage.blocks[str(i)] = whole.blocks[i]
        stage.head = whole.head if last else None
        return stage.to(device=spec.device, dtype=spec.dtype).eval()
    from serve.models.checkpoint import load_checkpoint
    from serve.models.lora import match_model, merged_weights, read_lora_file

    with torch.device("meta"):
        stage = StageModel(spec.config, spec.layers, last)
    names = set(stage.state_dict())
    weights = spec.weights
    deltas = None
    if weights.lora is not None:
        deltas = merged_weights([(match_model(read_lora_file(weights.lora), stage), weights.lora_scale)])
    load_checkpoint(stage, weights.path, dtype=spec.dtype, device=spec.device, prefer=weights.prefer,
                    keep_fp32=keep_in_fp32, deltas=deltas, select=names.__contains__)  # fmt: skip
    stage.rope = RotaryEmbedding(spec.config.head_dim).to(spec.device)
    return stage.eval()


class StreamCaches:
    """One stream's KV and prompt K/V on one stage: its layers only, allocated once at OPEN."""

    def __init__(self, config: DiTConfig, layers: int, grid: tuple[int, int], cache_frames: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        spec = KVCacheSpec(layers, 1, config.num_heads, config.head_dim, grid[0] * grid[1], cache_frames)
        self.grid = grid
        self.cache = KVCache(spec, dtype, device)
        self.text_kv = TextKVCache(layers, 1, config.text_len, config.num_heads, config.head_dim, dtype, device)


class StageBlocks:
    """A stage's compute, the same on rank 0 and on the spawned ranks: its blocks (numbered from 0 against caches
    holding only its layers) and the per-stream caches."""

    def __init__(self, config: DiTConfig, blocks: list[DiTBlock], rope: RotaryEmbedding, dtype: torch.dtype,
                 device: torch.device | str) -> None:  # fmt: skip
        self.config, self.blocks, self.rope = config, blocks, rope
        self.dtype, self.device = dtype, device
        self.streams: dict[int, StreamCaches] = {}

    def open(self, stream: int, grid: tuple[int, int], cache_frames: int) -> StreamCaches:
        caches = StreamCaches(self.config, len(self.blocks), grid, cache_frames, self.dtype, self.device)
        self.streams[stream] = caches
        return caches

    def set_text(self, stream: int, text: Tensor) -> None:
        """text [1, text_len, d]: the embedded prompt → this stage's cross-attention K/V."""
        if not self.blocks:
            return
        keys, values = zip(*(block.cross_attn.project_kv(text) for block in self.blocks), strict=True)
        self.streams[stream].text_kv.set((torch.stack(keys), torch.stack(values)))

    def run(self, stream: int, x: Tensor, e0: Tensor, plan: ChunkPlan) -> Tensor:
        caches = self.streams[stream]
        rope = self.rope.tables(plan.frame_positions, *caches.grid)
        return run_blocks(
            enumerate(self.blocks), x, e0, e0.shape[1], rope, plan.key_bias, caches.text_kv.pair(), caches.cache.k,
            caches.cache.v, plan.write_index, None,
        )  # fmt: skip


# -- the spawned ranks ----------------------------------------------------------------------------------------------


def bound_device(device: str) -> torch.device | None:
    """The device an NCCL group binds to (each rank's own GPU, whatever thread calls); gloo binds none."""
    return torch.device(device) if device.startswith("cuda") else None


def _init_group(spec: StageSpec) -> None:
    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.ranks, is_master=False)
    from datetime import timedelta

    dist.init_process_group(spec.backend, store=store, rank=spec.rank, world_size=spec.ranks,
                            timeout=timedelta(seconds=OP_TIMEOUT_S), device_id=bound_device(spec.device))  # fmt: skip


def stage_main(spec: StageSpec, ready: Any) -> None:
    """A spawned stage: build its part, say so on `ready`, join the group, then serve rank 0's commands until STOP
    (or until rank 0 is gone: a failed receive ends the process)."""
    logging.basicConfig(level=logging.INFO, format=f"stage{spec.rank} %(levelname)s %(message)s")
    torch.set_num_threads(spec.threads)
    try:
        if spec.device.startswith("cuda"):
            torch.cuda.set_device(spec.device)
        stage = build_stage_model(spec)
        decoder = None
        if spec.vae is not None:
            vae = spec.vae
            decoder = make_vae(vae.vae_type, vae.path, size=vae.size, dtype=torch.float32, device=spec.device,
                               seed=vae.seed).model  # fmt: skip
            drop_half(decoder, "encoder", "the first pipeline stage")
            if spec.device.startswith("cuda"):
                torch.cuda.empty_cache()
    except Exception as exc:  # reported to rank 0, which fails the load with it
        ready.send(f"stage {spec.rank} on {spec.device}: {type(exc).__name__}: {exc}")
        return
    ready.send(Built(module_bytes(stage) + (module_bytes(decoder) if decoder is not None else 0)))
    _init_group(spec)
    try:
        with torch.inference_mode():
            _serve(spec, stage, decoder)
    finally:
        dist.destroy_process_group()


def _serve(spec: StageSpec, model: StageModel, decoder: nn.Module | None) -> None:
    device, config, rank, last = spec.device, spec.config, spec.rank, spec.rank == spec.ranks - 1
    blocks = StageBlocks(config, list(model.blocks.values()), model.rope, spec.dtype, device)
    decoders: dict[int, StreamingAutoencoder] = {}  # the last stage's: each stream's causal decoder state
    header = torch.zeros(HEADER, dtype=torch.long, device=device)
    while True:
        dist.recv(header, 0)
        op, stream, a, b, c = header[:5].tolist()  # this process's own host: the wait is its job
        if op == STOP:
            return
        if op == OPEN:
            blocks.open(stream, (a, b), c)
            if decoder is not None:
                decoders[stream] = StreamingAutoencoder(decoder, spec.vae.vae_type)  # type: ignore[union-attr]
        elif op == CLOSE:
            blocks.streams.pop(stream, None)
            decoders.pop(stream, None)
        elif op == RESET:
            blocks.streams[stream].cache.reset()
            if decoder is not None:
                decoders[stream].reset()
        elif op == TEXT:
            text = torch.empty(1, config.text_len, config.dim, dtype=spec.dtype, device=device)
            dist.recv(text, 0)
            blocks.set_text(stream, text)
        elif op == FETCH:
            caches = blocks.streams[stream].cache
            dist.send(caches.k.contiguous(), 0)
            dist.send(caches.v.contiguous(), 0)
        elif op == DECODE and last:
            rows, columns = blocks.streams[stream].grid
            latents = torch.empty(1, 16, a, 2 * rows, 2 * columns, device=device)
            dist.recv(latents, 0)
            started = time.perf_counter()
            frames = to_uint8_frames(decoders[stream].decode_chunk(latents))
            assert frames.shape[0] == b, f"decoded {frames.shape[0]} frames, rank 0 expects {b}"
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            ms = torch.tensor([(time.perf_counter() - started) * 1000], dtype=torch.float64, device=device)
            dist.send(frames.contiguous(), 0)
            dist.send(ms, 0)
        elif op == MOVE:
            assert not blocks.streams, "blocks move only while no stream is open"
            if b == rank:
                send_block(model.blocks.pop(str(a)), c)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()  # the point of a move: the memory goes with the block
            elif c == rank:
                model.blocks[str(a)] = recv_block(config, b, device)
                model.blocks = nn.ModuleDict(sorted(model.blocks.items(), key=lambda item: int(item[0])))
            blocks = StageBlocks(config, list(model.blocks.values()), model.rope, spec.dtype, device)
        elif op == STEP:
            plan, e0, e = _recv_step_inputs(blocks.streams[stream], config, a, b, device, last)
            tokens = a * blocks.streams[stream].grid[0] * blocks.streams[stream].grid[1]
            x = torch.empty(max(b, 1), tokens, config.dim, device=device)
            times = torch.empty(spec.ranks, dtype=torch.float64, device=device)
            dist.recv(x, rank - 1)
            dist.recv(times, rank - 1)
            started = time.perf_counter()
            x = blocks.run(stream, x, e0, plan)
            if last:
                assert model.head is not None and e is not None
                x = model.head(x, e, a)  # [1, N, 64]
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)  # the stage's own time, for the placement's per-stage ms
            times[rank] = (time.perf_counter() - started) * 1000
            dist.send(x.contiguous(), 0 if last else rank + 1)
            dist.send(times, 0 if last else rank + 1)


# A moved block's state-dict dtypes travel as indices into this tuple.
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def send_block(block: nn.Module, to: int) -> None:
    """A block's weights to rank `to` (MOVE): its state-dict dtypes, then its tensors in key order."""
    state = block.state_dict()
    device = next(iter(state.values())).device
    dist.send(torch.tensor([DTYPES.index(t.dtype) for t in state.values()], device=device), to)
    for tensor in state.values():
        dist.send(tensor.contiguous(), to)


def recv_block(config: DiTConfig, sender: int, device: torch.device | str) -> DiTBlock:
    """The block `send_block` sends, built from the received tensors (no weights read from disk)."""
    with torch.device("meta"):
        block = DiTBlock(config)
    shapes = block.state_dict()
    codes = torch.empty(len(shapes), dtype=torch.long, device=device)
    dist.recv(codes, sender)
    state = {}
    for (name, meta), code in zip(shapes.items(), codes.tolist(), strict=True):
        state[name] = torch.empty(meta.shape, dtype=DTYPES[code], device=device)
        dist.recv(state[name], sender)
    block.load_state_dict(state, assign=True)
    return block.eval()


def _recv_step_inputs(caches: StreamCaches, config: DiTConfig, frames: int, rows: int, device: str,
                      last: bool) -> tuple[ChunkPlan, Tensor, Tensor | None]:  # fmt: skip
    tokens = frames * caches.grid[0] * caches.grid[1]
    lead = (rows,) if rows else ()  # a stream batch's per-row plan
    write_index = torch.empty(*lead, tokens, dtype=torch.long, device=device)
    key_bias = torch.empty(*lead, caches.cache.spec.max_tokens, dtype=torch.float32, device=device)
    positions = torch.empty(*lead, frames, dtype=torch.long, device=device)
    e0 = torch.empty(max(rows, 1), frames, 6, config.dim, device=device)
    for tensor in (write_index, key_bias, positions, e0):
        dist.recv(tensor, 0)
    e = None
    if last:
        e = torch.empty(max(rows, 1), frames, config.dim, device=device)
        dist.recv(e, 0)
    return ChunkPlan(write_index, key_bias, positions), e0, e
