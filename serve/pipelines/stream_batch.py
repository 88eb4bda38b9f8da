"""How the one chunk loop schedules a chunk's DiT passes: one chunk after another (`PlainSchedule`), or the stream
batch (`StreamBatch`): the passes of consecutive chunks run as one batch, one chunk per pass, so that with the DiT
split over pipeline stages every stage is busy on every micro-step (scale.md §1, SDv2's "stream batch").

The loop (serve/pipelines/chunk_loop.py) prepares each chunk as it enters (conditioning, encode, mixed noise:
a `ChunkInFlight`) and hands it to the schedule; the schedule gives back the chunks whose clean latents are final,
in entry order, and the loop decodes them. Both schedules give every chunk the same passes: its S denoising steps
(the timesteps the plain loop would use, each estimate re-noised to the next) and then the clean pass at t = 0 that
writes its clean K/V into the policy's window.

Stream batch, precisely. S = the loaded step count (`rows` = S + 1: one row per denoising step plus the clean pass;
fixed for a loaded pipeline, so the step has static shapes). `lanes` = D independent shift registers of rows,
micro-step m using lane m mod D: D is the number of pipeline stages (1 on one device), so that a micro-step's inputs
depend only on the micro-step D before it, which has left the last stage by then.
- In flight: at micro-step m, row j of lane m mod D holds the chunk that entered at micro-step m − j·D (or nothing,
  while the pipe fills or drains). One chunk enters per micro-step (row 0, its pass 0); each chunk moves down one
  row every D micro-steps; the chunk in row S runs its clean pass and its final clean latents come out at that
  micro-step. So each `process` call returns one chunk, S·D calls after it entered: the same chunks in the same
  order as the plain loop, after a fill of S·D calls that return no frames.
- Which K/V each pass attends. The cache holds the policy's window of clean K/V (sink + ring, as the plain loop)
  plus one scratch chunk per row. The clean frontier at a micro-step is the end frame of the newest chunk whose
  clean pass has run (this micro-step's row S included). Row S (the clean pass) writes its chunk's slots of the
  window and attends exactly what the plain loop's chunk attends: the sink and the ring up to and including itself.
  A denoising row writes its K/V only into its own scratch slots (never the ring: no collision with chunks ahead of
  it) and attends its scratch plus the clean window below the frontier, one chunk fewer than the ring (the key count
  of the plain loop). Its history therefore lags: pass j of chunk c sees clean chunks up to c − (S − j)·D, because
  the later ones are still in flight. The clean pass never lags. Writes at a micro-step go to distinct slots, and a
  clean write evicts only a frame below every row's attended range (checked on the host against `slot_frames`).
- Prompt K/V: one per stream, shared by the rows. A transition moves it for every row at the micro-step it is set
  (runtime LoRA scales likewise); a prompt jump drains first (below), so no chunk sees two prompts.
- Drains. A prompt jump, `reset_cache`, `manage_cache` and the RoPE-table restart first drain the pipe: micro-steps
  with no chunk entering run until every chunk in flight has had its clean pass (their frames come out with this
  call), and only then does the change apply: the new prompt (LongLive's re-cache over the window of now-clean
  chunks), or the cleared cache. The pipe then refills; the first chunk after a jump sees the history right up to
  its predecessor, as in the plain loop.

Unlike SDv2, which keeps one KV cache per batch row (scale.md §1), the rows here share one cache: the clean K/V the
clean row writes serve every row at once, and a denoising pass's own K/V never enter the history.

One device and N stages run this same schedule with the same D, so a one-process stream with `lanes` = N is the
oracle for the staged one (tests/test_pipeline_parallel.py). Only policies whose whole cache use is `plan` plus the
clean pass can run it (`CachePolicy.stream_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from serve.models.kv_cache import ChunkPlan, frame_bias, token_index
from serve.models.scheduler import FlowMatchScheduler
from serve.models.transfer import to_device
from serve.pipelines.cache_policies import CachePolicy

Timestep = float | Tensor  # a listed step (host float) or the noise controller's (a device 0-d tensor)


@dataclass
class ChunkInFlight:
    """One chunk between entering the loop and coming out of it."""

    frame: int  # its first latent frame
    x: Tensor  # [1, 16, F, h, w] the latents its next pass runs on
    steps: list[Timestep]  # its denoising timesteps, in order
    first_t: Timestep  # the level it was mixed to: passes at or above it are dropped (`maybe_dropped`)
    maybe_dropped: set[int] = field(default_factory=set)  # passes kept only where the device says t < first_t
    vace: Any = None  # the chunk's VACE inputs (the plain schedule only)
    x0: Tensor | None = None  # its clean estimate so far
    timesteps: list[Timestep] = field(default_factory=list)  # the timesteps its passes ran at (what tests compare)


class StepRunner(Protocol):
    """What a schedule uses of the stream."""

    policy: CachePolicy

    def run_step(self, latents: Tensor, t: Timestep, plan: ChunkPlan, vace: Any = None) -> Tensor: ...

    def timestep(self, t: Timestep, frames: int) -> Tensor: ...

    def noise(self) -> Tensor: ...

    def submit_step(self, latents: Tensor, timestep: Tensor, plan: ChunkPlan) -> Any: ...

    def collect_step(self, pending: Any) -> Tensor: ...


def denoise_pass(scheduler: FlowMatchScheduler, chunk: ChunkInFlight, i: int, flow: Tensor, timestep: Tensor) -> None:
    """Pass i's estimate (flow [1, 16, F, h, w] at `timestep` [1, F]) becomes the chunk's clean estimate, except
    where that pass is dropped (device-side, no host sync)."""
    estimate = scheduler.to_x0(chunk.x, flow.float(), timestep)
    if i in chunk.maybe_dropped:
        estimate = torch.where(chunk.steps[i] < chunk.first_t, estimate, chunk.x0)  # type: ignore[operator]
    chunk.x0 = estimate
    chunk.timesteps.append(chunk.steps[i])


def renoise(scheduler: FlowMatchScheduler, run: StepRunner, chunk: ChunkInFlight, i: int) -> None:
    """Before pass i > 0: the last estimate re-noised to that pass's level."""
    assert chunk.x0 is not None
    chunk.x = scheduler.add_noise(chunk.x0, run.noise(), run.timestep(chunk.steps[i], chunk.x.shape[2]))


class PlainSchedule:
    """Every pass of a chunk, one after another, at the chunk's turn: the chunk comes out of the call it entered."""

    name = "plain"
    decode_lag = 0  # a finished chunk's frames go out with the call that finished it

    def __init__(self, scheduler: FlowMatchScheduler) -> None:
        self.scheduler = scheduler

    @property
    def busy(self) -> bool:
        return False

    @property
    def in_flight(self) -> int:
        return 0

    def advance(self, run: StepRunner, chunk: ChunkInFlight | None) -> list[ChunkInFlight]:
        if chunk is None:
            return []
        frames = chunk.x.shape[2]
        plan = run.policy.plan(chunk.frame, frames)
        chunk.x0 = chunk.x
        for i, t in enumerate(chunk.steps):
            if i > 0:
                renoise(self.scheduler, run, chunk, i)
            flow = run.run_step(chunk.x, t, plan) if chunk.vace is None else run.run_step(chunk.x, t, plan, chunk.vace)
            denoise_pass(self.scheduler, chunk, i, flow, run.timestep(t, frames))
        if run.policy.clean_pass:
            run.run_step(chunk.x0, 0.0, plan)
        return [chunk]

    def drain(self, run: StepRunner) -> list[ChunkInFlight]:
        return []

    def widen(self, plan: ChunkPlan) -> ChunkPlan:
        return plan

    def discard(self, run: StepRunner) -> None:
        pass


@dataclass
class Lane:
    rows: list[ChunkInFlight | None]
    pending: Any = None  # the submitted micro-step whose flow has not been collected yet


class StreamBatch:
    """The stream batch (module docstring): `rows` = S + 1, `lanes` = D, one chunk of `frames` latent frames each.

    The stream's cache has `scratch_frames(rows, frames)` frame slots after the policy's window."""

    name = "stream_batch"

    def __init__(self, scheduler: FlowMatchScheduler, policy: CachePolicy, rows: int, lanes: int, frames: int,
                 device: torch.device | str) -> None:  # fmt: skip
        if policy.stream_batch is not None:
            raise ValueError(f"this cache policy cannot stream-batch: {policy.stream_batch}")
        self.scheduler, self.window = scheduler, policy.window
        self.rows, self.lanes, self.frames, self.device = rows, lanes, frames, device
        self.steps = rows - 1
        # A finished chunk's frames go out lanes − 1 micro-steps after its decode starts: decoded on the last stage,
        # they are back by then without rank 0 waiting (its next micro-steps pass the stages meanwhile).
        self.decode_lag = lanes - 1
        self.lf = policy.spec.frame_tokens
        self.window_frames = policy.window.spec.max_frames
        self.total_frames = self.window_frames + rows * frames
        self._discard_all()

    @staticmethod
    def scratch_frames(rows: int, frames: int) -> int:
        return rows * frames

    def _discard_all(self) -> None:
        self._lanes = [Lane([None] * self.rows) for _ in range(self.lanes)]
        self.micro = 0  # micro-steps since the last restart
        self.clean_end = 0  # the clean frontier: end frame of the newest chunk whose clean pass has run
        self.slot_frames: dict[int, int] = {}  # window slot → the frame whose clean K/V it holds (host bookkeeping)

    @property
    def in_flight(self) -> int:
        """Chunks entered whose clean latents have not come out yet."""
        return sum(chunk is not None for lane in self._lanes for chunk in lane.rows[: self.steps])

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    def advance(self, run: StepRunner, chunk: ChunkInFlight | None) -> list[ChunkInFlight]:
        """One micro-step with `chunk` entering row 0 (None: nothing enters, while draining); returns the chunk whose
        clean latents this micro-step finalises (its clean pass is submitted now), if any."""
        if chunk is not None and len(chunk.steps) > self.steps:
            raise ValueError(
                f"the stream batch was loaded for {self.steps} denoising steps; this chunk has {len(chunk.steps)} "
                f"(load with the longer denoising_step_list)"
            )
        lane = self._lanes[self.micro % self.lanes]
        self._collect(run, lane)
        lane.rows = [chunk, *lane.rows[:-1]]  # every chunk moves down one row; the one in the clean row has left
        if all(row is None for row in lane.rows):  # an empty lane while draining: nothing to run
            self.micro += 1
            return []
        if chunk is not None:
            chunk.x0 = chunk.x
        for j in range(1, self.steps):
            row = lane.rows[j]
            if row is not None and j < len(row.steps):
                renoise(self.scheduler, run, row, j)
        done = lane.rows[self.steps]
        if done is not None:  # its clean pass writes its window slots this micro-step, before any row attends
            self.clean_end = done.frame + self.frames
            for frame in range(done.frame, self.clean_end):
                self.slot_frames[self.window.slot_of_frame(frame)] = frame
        latents, timestep, plan = self._batch(run, lane)
        lane.pending = run.submit_step(latents, timestep, plan)
        self.micro += 1
        return [done] if done is not None else []

    def drain(self, run: StepRunner) -> list[ChunkInFlight]:
        """Micro-steps with nothing entering until every chunk in flight has had its clean pass; their chunks, in
        order. Afterwards the pipe is empty and every submitted micro-step collected."""
        out: list[ChunkInFlight] = []
        while self.busy:
            out += self.advance(run, None)
        for lane in self._lanes:
            self._collect(run, lane)
            lane.rows = [None] * self.rows
        return out

    def discard(self, run: StepRunner) -> None:
        """Forget every chunk in flight (a restart): collect what was submitted, so no reply stays outstanding."""
        for lane in self._lanes:
            if lane.pending is not None:
                run.collect_step(lane.pending)
        self._discard_all()

    def widen(self, plan: ChunkPlan) -> ChunkPlan:
        """A one-chunk plan over the window (LongLive's re-cache) extended to the scratch slots, masked."""
        pad = torch.full((self.rows * self.frames * self.lf,), float("-inf"), device=plan.key_bias.device)
        return ChunkPlan(plan.write_index, torch.cat([plan.key_bias, pad]), plan.frame_positions, plan.key_positions)

    # -- one micro-step ----------------------------------------------------------------------------------------

    def _collect(self, run: StepRunner, lane: Lane) -> None:
        """The lane's last micro-step (D micro-steps ago): each denoising row's estimate."""
        if lane.pending is None:
            return
        flows = run.collect_step(lane.pending)  # [rows, 16, F, h, w]
        lane.pending = None
        for j, row in enumerate(lane.rows[: self.steps]):
            if row is not None and j < len(row.steps):
                denoise_pass(self.scheduler, row, j, flows[j : j + 1], run.timestep(row.steps[j], self.frames))

    def _batch(self, run: StepRunner, lane: Lane) -> tuple[Tensor, Tensor, ChunkPlan]:
        """latents [rows, 16, F, h, w], timesteps [rows, F] and the micro-step's plan."""
        empty: Tensor | None = None
        latents, timesteps = [], []
        write, bias, positions = [], [], []
        for j, row in enumerate(lane.rows):
            scratch = list(range(self.window_frames + j * self.frames, self.window_frames + (j + 1) * self.frames))
            if row is None:
                if empty is None:
                    empty = torch.zeros_like(next(r for r in lane.rows if r is not None).x)
                latents.append(empty)
                timesteps.append(run.timestep(0.0, self.frames))
                write.append(scratch)
                bias.append(dict.fromkeys(scratch, 0.0))  # attends only itself: its output is discarded
                positions.append(list(range(self.frames)))
                continue
            own = list(range(row.frame, row.frame + self.frames))
            positions.append(own)
            if j == self.steps:  # the clean pass: the plain loop's plan for this chunk
                latents.append(row.x0)
                timesteps.append(run.timestep(0.0, self.frames))
                slots = [self.window.slot_of_frame(f) for f in own]
                write.append(slots)
                attended = self.window.attended_frames(row.frame, self.frames)
                bias.append(dict.fromkeys((self.window.slot_of_frame(f) for f in attended), 0.0))
                self._check_held(attended)
                continue
            step = min(j, len(row.steps) - 1)  # a chunk with fewer steps rides its last rows with no effect
            latents.append(row.x)
            timesteps.append(run.timestep(row.steps[step], self.frames))
            write.append(scratch)
            history = self._history()
            bias.append({**dict.fromkeys((self.window.slot_of_frame(f) for f in history), 0.0),
                         **dict.fromkeys(scratch, 0.0)})  # fmt: skip
            self._check_held(history)
        plan = ChunkPlan(
            self._to_device(torch.stack([token_index(slots, self.lf) for slots in write])),  # [rows, F·Lf]
            self._to_device(torch.stack([frame_bias(self.total_frames, self.lf, b) for b in bias])),  # [rows, S]
            self._to_device(torch.tensor(positions)),  # [rows, F]
        )
        return torch.cat(latents), torch.cat(timesteps), plan

    def _to_device(self, host: Tensor) -> Tensor:
        return to_device(host, self.device)  # without waiting for the micro-step before

    def _history(self) -> list[int]:
        """The clean frames a denoising row attends: the sink and the ring below the frontier, one chunk fewer."""
        sink, ring = self.window.sink_frames, self.window.ring_frames
        end = self.clean_end
        return list(range(min(sink, end))) + list(range(max(sink, end - (ring - self.frames)), end))

    def _check_held(self, frames: list[int]) -> None:
        """Every attended slot holds the clean K/V of the frame the row means to attend (no ring collision)."""
        for frame in frames:
            held = self.slot_frames.get(self.window.slot_of_frame(frame))
            assert held == frame, f"stream batch: slot of frame {frame} holds frame {held}"
