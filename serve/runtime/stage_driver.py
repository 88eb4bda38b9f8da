"""Rank 0 of the pipeline stages (serve/runtime/stages.py, whose docstring is the protocol): `StageDriver` spawns
ranks 1..N−1, sends them the commands, and keeps one micro-step per stage in flight (`submit` / `collect`); it
measures each stage's ms and moves blocks between stages to even them out (`rebalance`), and turns a dead or silent
stage into StageFailed, which the pipeline reports as a reload."""

from __future__ import annotations

import logging
import math
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from serve.errors import PipelineLoadError, StageFailed
from serve.models.autoencoder import drop_half
from serve.models.dit import WanDiT
from serve.models.kv_cache import ChunkPlan
from serve.pipelines.placement import Gpus, balanced_split
from serve.pipelines.vram import module_bytes
from serve.runtime.stages import (
    CLOSE,
    DECODE,
    FETCH,
    MOVE,
    OP_TIMEOUT_S,
    OPEN,
    RESET,
    STEP,
    STOP,
    TEXT,
    CheckpointWeights,
    RandomWeights,
    StageBlocks,
    StageSpec,
    StreamCaches,
    VaeSpec,
    bound_device,
    recv_block,
    send_block,
    stage_main,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0  # a stage that has not loaded its blocks by then fails the load
REAP_S = 2.0  # after a failed message, how long rank 0 waits for the dead stage to be reaped (to name it)


def stage_totals(step_ms: list[float], fixed_ms: list[float]) -> list[float]:
    """Each stage's ms per micro-step, as the placement reports it: its DiT step plus its fixed VAE work."""
    return [round(ms + extra, 3) for ms, extra in zip(step_ms, fixed_ms, strict=True)]


def check_visible(gpus: Gpus) -> None:
    """Every CUDA device `gpus` names exists here; raises PipelineLoadError naming the one that does not."""
    if gpus.on_cpu:
        return
    visible = torch.cuda.device_count()
    if not visible:
        raise PipelineLoadError(f"gpus {gpus.spelled()}: no CUDA device is visible here; use cpu:N for CPU ranks")
    for device in gpus.devices:
        if int(device.removeprefix("cuda:")) >= visible:
            raise PipelineLoadError(
                f"gpus {gpus.spelled()}: {device} does not exist; {visible} CUDA device(s) are visible "
                f"(ids 0..{visible - 1})"
            )


class StageDriver:
    """Rank 0: its own blocks on the loaded `dit` (which holds no other block and no head), the spawned stages, and
    the commands. Every call that talks to the stages runs on the pipeline's worker thread; what other threads
    ask for (a stream opened on the event loop, a stream gone) is queued and sent before the next command."""

    def __init__(self, gpus: Gpus, layers: tuple[tuple[int, int], ...], dit: WanDiT, dtype: torch.dtype) -> None:
        self.gpus, self.layers, self.dit, self.dtype = gpus, layers, dit, dtype
        self.device = torch.device(gpus.devices[0])
        self.config = dit.config
        self.head_features = math.prod(dit.config.patch_size) * dit.config.out_dim  # the flow per token (64)
        start, end = layers[0]
        self.local = StageBlocks(self.config, [dit.blocks[i] for i in range(start, end)], dit.rope, dtype, self.device)
        self.processes: list[Any] = []
        self.failure: str | None = None
        self._pending: deque[tuple[int, int, tuple[int, int], int]] = deque()  # (op, stream, grid, frames)
        self._next_stream = 0
        self._lock = threading.Lock()  # the stream-id counter and the queue, from any thread
        # Host copies of the last step's stage ms and the last decode's ms (pinned on CUDA, so the copy to them never
        # waits for the device); rank 0's last encode ms, as its stream measured it.
        pinned = self.device.type == "cuda"
        self._times = torch.zeros(gpus.ranks, dtype=torch.float64, pin_memory=pinned)
        self._decode_ms = torch.zeros(1, dtype=torch.float64, pin_memory=pinned)
        self.encode_ms: float | None = None
        self.steps = 0
        self.decodes = 0
        # Each stage's weights: its DiT blocks (rank 0's embeddings, the last's head) and its VAE half.
        self.weight_bytes = [0] * gpus.ranks
        self.synchronise_timing = False  # the warm-up's measurement: rank 0 waits for its device before reading a time
        # While `_measure` runs: every step's stage ms, every encode's and decode's ms (host reads: load time only).
        self._samples: dict[str, list[Any]] | None = None
        self.rebalanced: dict[str, Any] | None = None  # the warm-up's split before and after (`rebalance`)
        self._closed = False
        # Submitted steps not yet collected, held here too: a stream that is gone with steps in flight (a stream
        # batch) has them waited for before its CLOSE goes out, so no posted receive is ever dropped.
        self._outstanding: list[PendingStep | PendingDecode] = []

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, gpus: Gpus, layers: tuple[tuple[int, int], ...], dit: WanDiT, dtype: torch.dtype,
              weights: RandomWeights | CheckpointWeights, vae: VaeSpec,
              vae_model: nn.Module) -> StageDriver:  # fmt: skip
        """Spawn ranks 1..N−1 (the last with the VAE decoder), wait until each has built its part, join the group;
        raises PipelineLoadError. `dit` is rank 0's part as the load read it (`first_stage_part`: the blocks of
        `layers[0]`, no head); rank 0 then keeps only `vae_model`'s encoder."""
        start, end = layers[0]
        held = [i for i, block in enumerate(dit.blocks) if list(block.parameters())]
        assert held == list(range(start, end)) and not list(dit.head.parameters()), "rank 0 loads only its part"
        driver = cls(gpus, layers, dit, dtype)
        try:
            driver._spawn(weights, vae)
        except BaseException:
            driver.close()
            raise
        drop_half(vae_model, "decoder", f"the last pipeline stage ({gpus.devices[-1]})")
        driver.weight_bytes[0] = module_bytes(dit) + module_bytes(vae_model)
        if driver.device.type == "cuda":
            torch.cuda.empty_cache()
        return driver

    def _spawn(self, weights: RandomWeights | CheckpointWeights, vae: VaeSpec) -> None:
        from datetime import timedelta

        store = dist.TCPStore("127.0.0.1", 0, self.gpus.ranks, is_master=True, wait_for_workers=False)
        context = multiprocessing.get_context("spawn")
        pipes = []
        for rank in range(1, self.gpus.ranks):
            spec = StageSpec(
                rank, self.gpus.ranks, self.gpus.devices[rank], self.gpus.backend, store.port, self.config,
                self.layers[rank], self.dtype, weights, torch.get_num_threads(),
                vae if rank == self.gpus.ranks - 1 else None,
            )  # fmt: skip
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=stage_main, args=(spec, send), name=f"wanrt-stage{rank}", daemon=True)
            process.start()
            send.close()
            self.processes.append(process)
            pipes.append(receive)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for rank, pipe in enumerate(pipes, start=1):
            while not pipe.poll(0.05):
                if not self.processes[rank - 1].is_alive():
                    raise PipelineLoadError(self._death(rank, "while building its blocks"))
                if time.monotonic() > deadline:
                    raise PipelineLoadError(f"stage {rank} did not build its blocks within {READY_TIMEOUT_S:g} s")
            built = pipe.recv()
            if isinstance(built, str):
                raise PipelineLoadError(f"pipeline-parallel load failed: {built}")
            self.weight_bytes[rank] = built.weight_bytes
        dist.init_process_group(self.gpus.backend, store=store, rank=0, world_size=self.gpus.ranks,
                                timeout=timedelta(seconds=OP_TIMEOUT_S),
                                device_id=bound_device(self.gpus.devices[0]))  # fmt: skip
        self._store = store  # the group's rendezvous lives as long as the group
        log.info("pipeline-parallel ranks=%d backend=%s blocks=%s", self.gpus.ranks, self.gpus.backend,
                 [end - start for start, end in self.layers])  # fmt: skip

    def close(self) -> None:
        """Stop the stages (politely, then by force) and leave the group; idempotent."""
        if self._closed:
            return
        self._closed = True
        if dist.is_initialized():
            if self.failure is None:
                try:
                    self._command(STOP, 0)
                except Exception:  # a stage already gone: the terminate below ends the rest
                    log.warning("pipeline-parallel: a stage did not take STOP; terminating the stages")
            for process in self.processes:
                process.join(5.0)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(5.0)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _death(self, rank: int, when: str) -> str:
        process = self.processes[rank - 1]
        return (
            f"pipeline stage {rank} on {self.gpus.devices[rank]} (pid {process.pid}) died {when} (exit code "
            f"{process.exitcode}); the pipeline must be reloaded"
        )

    def check_alive(self, when: str) -> None:
        if self.poll_failure(when) is not None:
            raise StageFailed(self.failure)  # type: ignore[arg-type]

    def poll_failure(self, when: str = "while idle") -> str | None:
        """Why the stages cannot run any more, or None; notices a stage that died between commands. Any thread."""
        if self.failure is None and not self._closed:
            for rank, process in enumerate(self.processes, start=1):
                if not process.is_alive():
                    self.failure = self._death(rank, when)
                    break
        return self.failure

    # -- streams ------------------------------------------------------------------------------------------------

    def open(self, grid: tuple[int, int], cache_frames: int) -> tuple[int, StreamCaches]:
        """A new stream's id and its rank-0 caches; the stages allocate theirs before the next command. Any thread."""
        with self._lock:
            stream = self._next_stream
            self._next_stream += 1
            self._pending.append((OPEN, stream, grid, cache_frames))
        return stream, self.local.open(stream, grid, cache_frames)

    def forget(self, stream: int) -> None:
        """The stream is gone (its object was collected): free its caches everywhere. Any thread."""
        self.local.streams.pop(stream, None)
        with self._lock:
            self._pending.append((CLOSE, stream, (0, 0), 0))

    def reset(self, stream: int) -> None:
        self.local.streams[stream].cache.reset()
        with self._talking("while resetting a cache"):
            self._command(RESET, stream)

    def set_text(self, stream: int, context: Tensor) -> None:
        """context [1, text_len, text_dim] → every stage's cross-attention K/V for its blocks."""
        text = self.dit.embed_text(context.to(self.dtype)).to(self.dtype).contiguous()  # [1, text_len, d]
        with self._talking("while taking a prompt"):
            self._command(TEXT, stream)
            works = [dist.isend(text, rank) for rank in range(1, self.gpus.ranks)]
            self.local.set_text(stream, text)
            self._wait(works, "while taking a prompt")

    def step(self, stream: int, latents: Tensor, timestep: Tensor, plan: ChunkPlan) -> Tensor:
        """The DiT step over the stages: latents [B, 16, F, H, W] → flow [B, 16, F, H, W]; each stage writes its
        layers' K/V where `plan` says."""
        return self.collect(self.submit(stream, latents, timestep, plan))

    def submit(self, stream: int, latents: Tensor, timestep: Tensor, plan: ChunkPlan) -> PendingStep:
        """Start a DiT step: rank 0 runs its blocks now and passes the activations on; `collect` waits for the
        flow. A plan whose write_index has a row dimension is a stream batch's micro-step (one chunk per row)."""
        dit, frames = self.dit, latents.shape[2]
        rows = latents.shape[0] if plan.write_index.dim() == 2 else 0
        x, grid = dit.patchify(latents)  # [B, N, d]
        e, e0 = dit.embed_time(timestep)
        last = self.gpus.ranks - 1
        # Per step (not shared): a stream batch has several steps' messages outstanding at once.
        times_out = torch.zeros(self.gpus.ranks, dtype=torch.float64, device=self.device)  # rank 0's, sent on
        times = torch.zeros(self.gpus.ranks, dtype=torch.float64, device=self.device)  # every stage's
        with self._talking("during a chunk"):
            *header_works, header = self._command(STEP, stream, frames, rows, wait=False)
            inputs = (plan.write_index, plan.key_bias.float().contiguous(), plan.frame_positions, e0.contiguous())
            works = [*header_works, *(dist.isend(t, rank) for rank in range(1, self.gpus.ranks) for t in inputs)]
            works.append(dist.isend(e.contiguous(), last))
            self._synchronise()  # the warm-up's: the embedding queued before is not the blocks' time
            started = time.perf_counter()
            x = self.local.run(stream, x, e0, plan).contiguous()
            self._synchronise()
            times_out[0] = (time.perf_counter() - started) * 1000  # launch time on CUDA (but in the warm-up)
            works += [dist.isend(x, 1), dist.isend(times_out, 1)]
            out = torch.empty(x.shape[0], x.shape[1], self.head_features, device=self.device)
            works += [dist.irecv(out, last), dist.irecv(times, last)]
        pending = PendingStep(stream, works, out, times, grid, (header, inputs, e, x, times_out))
        self._outstanding.append(pending)
        return pending

    def collect(self, pending: PendingStep) -> Tensor:
        """The flow [B, 16, F, H, W] of a submitted step, once the last stage has sent it."""
        self._complete(pending, "during a chunk")
        self._times.copy_(pending.times, non_blocking=True)  # read by `placement`, never waited for here
        self.steps += 1
        if self._samples is not None:
            self._samples["step"].append(pending.times.tolist())
        return self.dit.unpatchify(pending.out, pending.grid)

    def submit_decode(self, stream: int, latents: Tensor, frames: int) -> PendingDecode:
        """Start decoding a chunk's clean latents [1, 16, F, h, w] on the last stage, after every step sent before;
        `frames`: the pixel frames they decode to (1 + 4(F−1) on the stream's first decode, else 4F)."""
        latents = latents.float().contiguous()
        rows, columns = latents.shape[3] // 2, latents.shape[4] // 2
        last = self.gpus.ranks - 1
        out = torch.empty(frames, 16 * rows, 16 * columns, 3, dtype=torch.uint8, device=self.device)
        ms = torch.zeros(1, dtype=torch.float64, device=self.device)
        with self._talking("during a decode"):
            *works, header = self._command(DECODE, stream, latents.shape[2], frames, wait=False)
            works += [dist.isend(latents, last), dist.irecv(out, last), dist.irecv(ms, last)]
        pending = PendingDecode(stream, works, out, ms, (header, latents))
        self._outstanding.append(pending)
        return pending

    def collect_decode(self, pending: PendingDecode) -> Tensor:
        """The decoded frames uint8 [T, H, W, 3] on rank 0's device, once the last stage has sent them."""
        self._complete(pending, "during a decode")
        self._decode_ms.copy_(pending.ms, non_blocking=True)
        self.decodes += 1
        if self._samples is not None:
            self._samples["decode"].append(float(pending.ms[0]))
        return pending.out

    def _complete(self, pending: PendingStep | PendingDecode, when: str) -> None:
        """Waits for a submitted message's sends and receives; it is no longer outstanding."""
        with self._talking(when):
            self._wait(pending.works, when)
        self._outstanding.remove(pending)

    def timed_encode(self, encode: Callable[[], Tensor]) -> Tensor:
        """Rank 0's VAE encode, its ms kept for the placement (launch time on CUDA, but in the warm-up)."""
        self._synchronise()  # the warm-up's: the work queued before is not the encode's time
        started = time.perf_counter()
        latents = encode()
        self._synchronise()
        self.encode_ms = (time.perf_counter() - started) * 1000
        if self._samples is not None:
            self._samples["encode"].append(self.encode_ms)
        return latents

    def _synchronise(self) -> None:
        if self.synchronise_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fetch_cache(self, stream: int) -> tuple[Tensor, Tensor]:
        """Every layer's K and V of a stream, gathered on rank 0 in layer order (tests compare them)."""
        ks, vs = [self.local.streams[stream].cache.k], [self.local.streams[stream].cache.v]
        with self._talking("sending its cache"):
            self._command(FETCH, stream)
            for rank in range(1, self.gpus.ranks):
                layers = self.layers[rank][1] - self.layers[rank][0]
                shape = (layers, *ks[0].shape[1:])
                k, v = (torch.empty(shape, dtype=ks[0].dtype, device=self.device) for _ in range(2))
                self._wait([dist.irecv(k, rank)], "sending its cache")
                self._wait([dist.irecv(v, rank)], "sending its cache")
                ks.append(k)
                vs.append(v)
        return torch.cat(ks), torch.cat(vs)

    # -- placement ----------------------------------------------------------------------------------------------

    def stage_ms(self) -> tuple[list[float], list[float]] | None:
        """(each stage's ms of the last DiT step, each stage's fixed VAE ms per chunk: rank 0's last encode, the last
        stage's last decode), or None before the first step. With the stream batch, one micro-step of a stage is its
        step plus its VAE work: one chunk enters (encoded) and one leaves (decoded) per micro-step."""
        if not self.steps:
            return None
        fixed = [0.0] * self.gpus.ranks
        fixed[0] += self.encode_ms or 0.0
        fixed[-1] += float(self._decode_ms[0]) if self.decodes else 0.0
        return [float(ms) for ms in self._times.tolist()], fixed

    def placement(self) -> dict[str, Any]:
        """How the pipeline is placed, for the status and the `stats` messages: stage_ms[r] is stage r's DiT step
        plus its VAE work per chunk (`step_ms`, `encode_ms` on the first stage, `decode_ms` on the last)."""
        blocks = [end - start for start, end in self.layers]
        placed: dict[str, Any] = {
            "stages": self.gpus.ranks,
            "backend": self.gpus.backend,
            "devices": list(self.gpus.devices),
            "blocks_per_stage": blocks,
            "vae": {"encode_stage": 0, "decode_stage": self.gpus.ranks - 1},
            "weight_bytes_per_stage": list(self.weight_bytes),
            "stage_ms": None,
        }
        measured = self.stage_ms()
        if measured is not None:
            step_ms, fixed = measured
            placed["stage_ms"] = stage_totals(step_ms, fixed)
            placed["step_ms"] = [round(ms, 3) for ms in step_ms]
            placed["encode_ms"] = None if self.encode_ms is None else round(self.encode_ms, 3)
            placed["decode_ms"] = round(float(self._decode_ms[0]), 3) if self.decodes else None
            suggested = balanced_split(step_ms, fixed, self.layers)
            placed["suggested_blocks_per_stage"] = [end - start for start, end in suggested]
        if self.rebalanced is not None:
            placed["rebalance"] = self.rebalanced
        return placed

    def rebalance(self, warm_up: Callable[[], None]) -> None:
        """The load's rebalance: time `warm_up` (chunks through a stream it opens and closes), split the blocks so
        that the stages' times per micro-step even out (`balanced_split`), move them if that split differs, and
        time the warm-up again on the new split. What it found is kept in `rebalanced` (the placement's
        `rebalance`)."""
        before = self.layers
        step_ms, fixed = self._measure(warm_up)
        record: dict[str, Any] = {
            "blocks_before": [end - start for start, end in before],
            "stage_ms_before": stage_totals(step_ms, fixed),
        }
        after = balanced_split(step_ms, fixed, before)
        if after != before:
            self.move_blocks(after)
            step_ms, fixed = self._measure(warm_up)
        record["blocks_after"] = [end - start for start, end in after]
        record["stage_ms_after"] = stage_totals(step_ms, fixed)
        self.rebalanced = record
        log.info("pipeline-parallel rebalance: %s", record)

    def _measure(self, warm_up: Callable[[], None]) -> tuple[list[float], list[float]]:
        """(each stage's DiT step ms, each stage's fixed VAE ms) over `warm_up`, as medians of its steps, encodes
        and decodes (the first of each is a different shape, and the first calls pay one-off costs), with rank 0
        waiting for its device before reading a time."""
        self.synchronise_timing, self._samples = True, {"step": [], "encode": [], "decode": []}
        try:
            warm_up()
            samples = self._samples
        finally:
            self.synchronise_timing, self._samples = False, None
        assert samples["step"], "the warm-up ran no DiT step"
        step_ms = [float(ms) for ms in torch.tensor(samples["step"]).median(dim=0).values]
        fixed = [0.0] * self.gpus.ranks
        fixed[0] += float(torch.tensor(samples["encode"]).median()) if samples["encode"] else 0.0
        fixed[-1] += float(torch.tensor(samples["decode"]).median()) if samples["decode"] else 0.0
        return step_ms, fixed

    def move_blocks(self, layers: tuple[tuple[int, int], ...]) -> None:
        """Re-split the blocks to `layers` (contiguous, as `split_blocks` gives): each block whose owner changes is
        sent by its old owner to its new one (MOVE), weights only: no stream is open, so no cache moves."""
        with self._talking("while moving blocks"):
            self._flush()  # the CLOSEs of streams already gone, and their messages still in flight
        assert not self.local.streams and not self._outstanding, "blocks move only while no stream is open"

        def owner(split: tuple[tuple[int, int], ...], block: int) -> int:
            return next(rank for rank, (start, end) in enumerate(split) if start <= block < end)

        block_bytes = module_bytes(self.local.blocks[0])  # every block is the same size; rank 0 always keeps one
        with self._talking("while moving blocks"):
            for block in range(self.config.num_layers):
                old, new = owner(self.layers, block), owner(layers, block)
                if old == new:
                    continue
                self.weight_bytes[old] -= block_bytes
                self.weight_bytes[new] += block_bytes
                self._command(MOVE, 0, block, old, new)
                if old == 0:
                    send_block(self.dit.blocks[block], new)
                    self.dit.blocks[block] = nn.Module()
                elif new == 0:
                    self.dit.blocks[block] = recv_block(self.config, old, self.device)
        self.layers = layers
        start, end = layers[0]
        self.local = StageBlocks(self.config, [self.dit.blocks[i] for i in range(start, end)], self.dit.rope,
                                 self.dtype, self.device)  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("pipeline-parallel blocks moved: %s", [end - start for start, end in layers])

    # -- messages -----------------------------------------------------------------------------------------------

    def _command(self, op: int, stream: int, a: int = 0, b: int = 0, c: int = 0, wait: bool = True) -> list[Any]:
        """Send the queued commands, then this one; `wait=False` returns this header's sends unwaited (with the
        header tensor), for a STEP whose messages complete at `collect`."""
        self._flush()
        return self._send_header(op, stream, a, b, c, wait)

    def _flush(self) -> None:
        """Send the commands other threads queued (OPEN, CLOSE), in order."""
        while self._pending:
            with self._lock:
                queued, queued_stream, grid, frames = self._pending.popleft()
            if queued == CLOSE:  # the stream's steps still in flight complete first (their buffers stay alive)
                gone = [step for step in self._outstanding if step.stream == queued_stream]
                self._wait([work for step in gone for work in step.works], "closing a stream")
                self._outstanding = [step for step in self._outstanding if step.stream != queued_stream]
            self._send_header(queued, queued_stream, grid[0], grid[1], frames)

    def _send_header(self, op: int, stream: int, a: int, b: int, c: int, wait: bool = True) -> list[Any]:
        header = torch.tensor([op, stream, a, b, c, 0, 0, 0])
        if self.device.type == "cuda":  # pinned and non-blocking: a pageable copy would wait for the GPU's queue
            header = header.pin_memory()
        device_header = header.to(self.device, non_blocking=True)
        works = [dist.isend(device_header, rank) for rank in range(1, self.gpus.ranks)]
        if wait:
            self._wait(works, "taking a command")
            return []
        # Unwaited: under NCCL a wait orders rank 0's compute stream after this send, which on the last rank's pair
        # queues behind the receive of the previous micro-step's flow, so rank 0 could not run ahead.
        return [*works, device_header]

    def _wait(self, works: list[Any], when: str) -> None:
        for work in works:
            work.wait()

    @contextmanager
    def _talking(self, when: str) -> Iterator[None]:
        """Messages to and from the stages; a stage that died ends them with StageFailed. gloo raises at once on
        rank 0 when a peer's connection closes, and a dead middle stage makes the ranks after it fail their receive
        and exit, so rank 0 hears of any death without waiting for a timeout (a hung stage: OP_TIMEOUT_S). Under
        NCCL the watchdog's timeout ends the wait."""
        self.check_alive(when)
        try:
            yield
        except RuntimeError as exc:
            deadline = time.monotonic() + REAP_S  # let the dead one be reaped, so the message names it
            while all(p.is_alive() for p in self.processes) and time.monotonic() < deadline:
                time.sleep(0.01)
            try:
                self.check_alive(when)
            except StageFailed:
                raise StageFailed(self.failure) from None  # type: ignore[arg-type]
            log.error("pipeline-parallel: message failed %s: %s", when, exc)  # names addresses: for the log only
            self.failure = f"pipeline stage communication failed {when}; the pipeline must be reloaded"
            raise StageFailed(self.failure) from None


@dataclass
class PendingDecode:
    """A submitted decode: its outstanding messages, where the frames and the decode ms arrive, and the tensors its
    sends read from."""

    stream: int
    works: list[Any]
    out: Tensor  # uint8 [T, H, W, 3]
    ms: Tensor  # float64[1]
    sending: tuple[Any, ...]


@dataclass
class PendingStep:
    """A submitted DiT step: its outstanding messages, where the flow and the stage times arrive, and the tensors
    its sends read from (kept alive until they complete)."""

    stream: int
    works: list[Any]
    out: Tensor  # [B, N, 64]
    times: Tensor  # float64[ranks]
    grid: tuple[int, int, int]
    sending: tuple[Any, ...]
