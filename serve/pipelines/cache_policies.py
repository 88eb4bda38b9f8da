"""How each pipeline uses its KV cache: small policies the one chunk loop calls at fixed points (models.md §3).

The loop (serve/pipelines/chunk_loop.py) runs, per chunk:

    policy.before_chunk(run, f)          EMA sink update (Reward Forcing), memory-bank update (MemFlow),
                                         context recompute (Krea)
    plan = policy.plan(f, F)             cache slots, key mask/bias and RoPE positions for the denoising passes
    denoising passes, then the clean pass if `policy.clean_pass`
    policy.after_chunk(run, f, x0, video)  memory-bank recording (MemFlow), context history (Krea)

and `policy.recache(run, f)` at the boundary where the prompt switches (LongLive, MemFlow). `run` is the stream
(`ChunkRunner`): it owns the buffers and runs the DiT step. Everything here is index arithmetic on fixed-size
buffers; nothing allocates per chunk in proportion to how much has been generated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import torch
from torch import Tensor

from serve.models.autoencoder import StreamingAutoencoder
from serve.models.kv_cache import (
    ChunkPlan,
    KVCache,
    KVCacheSpec,
    RollingSinkPolicy,
    TextKVCache,
    frame_bias,
    token_index,
)
from serve.models.transfer import to_device


class ChunkRunner(Protocol):
    """What a policy may use of the stream."""

    cache: KVCache
    text_kv: TextKVCache
    vae: StreamingAutoencoder

    def run_step(self, latents: Tensor, t: float, plan: ChunkPlan) -> Tensor:
        """One DiT step at timestep `t` for every frame of `latents`, writing its K/V where `plan` says."""
        ...


class CachePolicy:
    """Rolling sink + ring (StreamDiffusionV2; LongLive with `recache_on_prompt_switch`). Subclasses add hooks."""

    clean_pass = True
    recache_on_prompt_switch = False
    absolute_positions = True
    """RoPE positions grow with the frame count, so the stream restarts before the 1024-position table ends."""
    keys_rotated_at_write = True
    """Keys are cached rotated; False when plans carry per-slot `key_positions` (rotated at read time)."""
    pipeline_parallel: str | None = None
    """Why the policy cannot run with its DiT split over stages, or None. A stage holds only its layers' caches, so
    a policy that reads or writes the cache itself between steps (not through `run_step`) cannot be split."""
    stream_batch: str | None = None
    """Why the policy cannot run the stream batch (serve/pipelines/stream_batch.py), or None: chunks are in flight
    together there, so a policy's per-chunk hooks and plans must not depend on the chunk before being finished."""

    def __init__(self, spec: KVCacheSpec, sink_frames: int, device: torch.device | str | None = None,
                 window_frames: int | None = None) -> None:  # fmt: skip
        """`window_frames`: the leading slots the sink + ring use (all of them unless a subclass keeps some)."""
        self.spec = spec
        self.device = device
        window_spec = dataclasses.replace(spec, max_frames=window_frames or spec.max_frames)
        self.window = RollingSinkPolicy(window_spec, sink_frames, device)
        self._clean: Tensor | None = None  # [B, 16, window slots, h, w], allocated once at the first chunk

    def reset(self) -> None:
        """Forget per-stream state (the KV buffers themselves are cleared by the stream)."""
        if self._clean is not None:
            self._clean.zero_()

    def update_params(self, params: dict[str, Any]) -> None:
        """Runtime parameters a policy reads (Krea's attention bias); applied at the chunk boundary."""

    def plan(self, first_frame: int, frames: int) -> ChunkPlan:
        return self.window.plan(first_frame, frames)

    def before_chunk(self, run: ChunkRunner, first_frame: int, frames: int) -> None:
        pass

    def after_chunk(self, run: ChunkRunner, first_frame: int, x0: Tensor, video: Tensor | None) -> None:
        """A chunk's clean latents x0 [1, 16, F, h, w] and its decoded video [1, 3, T, H, W] in [-1, 1], or None
        where the decode runs elsewhere (a pipeline-parallel stream decodes on the last stage): only policies that
        never read it are pipelined."""
        if self.recache_on_prompt_switch:  # keep the window's clean latents: a prompt switch recomputes their K/V
            if self._clean is None:
                self._clean = x0.new_zeros((*x0.shape[:2], self.window.spec.max_frames, *x0.shape[3:]))
            slots = [self.window.slot_of_frame(f) for f in range(first_frame, first_frame + x0.shape[2])]
            self._clean.index_copy_(2, to_device(torch.tensor(slots), x0.device), x0)

    # -- LongLive's KV re-cache --------------------------------------------------------------------------------------

    def clean_latents(self, next_frame: int) -> Tensor:
        """[B, 16, F, h, w] clean latents of `recache_frames(next_frame)`, in frame order."""
        assert self._clean is not None
        slots = [self.window.slot_of_frame(f) for f in self.recache_frames(next_frame)]
        return self._clean.index_select(2, to_device(torch.tensor(slots), self._clean.device))

    def recache_frames(self, next_frame: int) -> list[int]:
        """Frames whose K/V a prompt switch recomputes: the cached window, never the sink (LongLive keeps the sink
        from the old prompt, `global_sink`: its recompute skips writes below the sink)."""
        sink, ring = self.window.sink_frames, self.window.ring_frames
        return list(range(max(sink, next_frame - ring), next_frame))

    def recache_plan(self, next_frame: int) -> ChunkPlan | None:
        """One pass at t = 0 over the window's clean latents with the new prompt, at their own positions and slots,
        attending the sink and the whole window (the reference's re-cache is bidirectional in practice)."""
        plan = self.host_recache_plan(next_frame)
        return None if plan is None else plan.to(self.device)

    def host_recache_plan(self, next_frame: int) -> ChunkPlan | None:
        frames = self.recache_frames(next_frame)
        if not frames:
            return None
        slots = [self.window.slot_of_frame(f) for f in frames]
        sink_slots = list(range(min(self.window.sink_frames, next_frame)))
        lf = self.spec.frame_tokens
        bias = frame_bias(self.spec.max_frames, lf, dict.fromkeys(sink_slots + slots, 0.0))
        return ChunkPlan(token_index(slots, lf), bias, torch.tensor(frames))


class EmaSinkPolicy(CachePolicy):
    """Reward Forcing (models.md §3.3): sink 3 + window 6 frames; keys cached un-rotated and rotated at read time
    with positions relative to the attended set, and an evicted chunk folded into the sink: sink ← α·sink +
    (1−α)·evicted, for K and V, α = 0.999.

    Layout: slots [0, sink) hold the first chunk (the sink), slots [sink, sink + ring) a ring of the window. The
    chunk about to be written overwrites exactly the slots of the chunk that leaves the window, so the EMA reads
    them just before the first denoising pass of that chunk.
    """

    absolute_positions = False
    keys_rotated_at_write = False
    pipeline_parallel = (
        "its EMA sink folds every layer's evicted K/V into the sink between chunks, and its keys are re-rotated "
        "per chunk; a stage holds only its own layers"
    )
    stream_batch = "its EMA sink folds the evicted chunk's K/V into the sink before each chunk's first pass"

    def __init__(self, spec: KVCacheSpec, sink_frames: int, device=None, alpha: float = 0.999) -> None:
        super().__init__(spec, sink_frames, device)
        self.alpha = alpha

    def plan(self, first_frame: int, frames: int) -> ChunkPlan:
        plan = self.window.plan(first_frame, frames)
        attended = self.window.attended_frames(first_frame, frames)  # sink first, then the window in frame order
        key_positions = torch.zeros(self.spec.max_frames, dtype=torch.long)
        for position, frame in enumerate(attended):
            key_positions[self.window.slot_of_frame(frame)] = position
        # The queries are the chunk itself: the last `frames` positions of the attended order.
        query_positions = torch.arange(len(attended) - frames, len(attended))
        return ChunkPlan(
            plan.write_index,
            plan.key_bias,
            to_device(query_positions, self.device),
            to_device(key_positions, self.device),
        )

    def evicted_frames(self, first_frame: int, frames: int) -> list[int]:
        """Window frames the chunk at `first_frame` pushes out (they occupy the slots it is about to write)."""
        sink, ring = self.window.sink_frames, self.window.ring_frames
        return [f - ring for f in range(first_frame, first_frame + frames) if f - ring >= sink]

    def before_chunk(self, run: ChunkRunner, first_frame: int, frames: int) -> None:
        evicted = self.evicted_frames(first_frame, frames)
        if not evicted:
            return
        if len(evicted) != self.window.sink_frames:
            raise ValueError(f"the EMA sink needs chunks of {self.window.sink_frames} frames, got {len(evicted)}")
        lf = self.spec.frame_tokens
        sink = to_device(token_index(list(range(self.window.sink_frames)), lf), run.cache.k.device)
        leaving = to_device(token_index([self.window.slot_of_frame(f) for f in evicted], lf), run.cache.k.device)
        for buffer in (run.cache.k, run.cache.v):
            mixed = (
                self.alpha * buffer.index_select(2, sink).float()
                + (1 - self.alpha) * buffer.index_select(2, leaving).float()
            )
            buffer.index_copy_(2, sink, mixed.to(buffer.dtype))


class MemoryBankPolicy(CachePolicy):
    """MemFlow (models.md §3.4): LongLive's sink 3 + window 9, plus a bank of 3 frames after them in the buffer.

    Every third chunk (first frame divisible by 3·chunk) the clean K/V of the chunk's first frame are staged; at
    the next chunk, before its first denoising pass and with that chunk's prompt already set, they enter the bank:
    appended while there is room, else each layer keeps its 2 bank frames that score highest against the prompt's
    cross-attention keys (mean over text tokens, heads and frame tokens of q·k/√d) and appends the new one.
    """

    recache_on_prompt_switch = True
    pipeline_parallel = (
        "its memory bank copies every layer's K/V between chunks and ranks the frames against the prompt's keys of "
        "every layer; a stage holds only its own layers"
    )
    stream_batch = "its memory bank takes a chunk's clean K/V into the next chunk's attention before its first pass"

    def __init__(self, spec: KVCacheSpec, sink_frames: int, bank_frames: int, record_every: int, device=None) -> None:
        super().__init__(spec, sink_frames, device, window_frames=spec.max_frames - bank_frames)
        self.bank_frames = bank_frames
        self.bank_slots = list(range(spec.max_frames - bank_frames, spec.max_frames))
        self.record_every = record_every  # latent frames between recordings (3 chunks of 3)
        self.bank_filled = 0
        self._staged: tuple[Tensor, Tensor] | None = None

    def reset(self) -> None:
        super().reset()
        self.bank_filled = 0
        self._staged = None

    def plan(self, first_frame: int, frames: int) -> ChunkPlan:
        plan = self.window.host_plan(first_frame, frames)
        bank = torch.full((self.bank_frames,), float("-inf"))
        bank[: self.bank_filled] = 0.0
        lf = self.spec.frame_tokens
        key_bias = torch.cat([plan.key_bias, bank.repeat_interleave(lf)])
        return ChunkPlan(plan.write_index, key_bias, plan.frame_positions).to(self.device)

    def host_recache_plan(self, next_frame: int) -> ChunkPlan | None:
        plan = super().host_recache_plan(next_frame)
        if plan is None:
            return None
        bank = torch.full((self.bank_frames * self.spec.frame_tokens,), float("-inf"))
        window_bias = plan.key_bias[: self.window.spec.max_tokens]
        return ChunkPlan(plan.write_index, torch.cat([window_bias, bank]), plan.frame_positions)

    def after_chunk(self, run: ChunkRunner, first_frame: int, x0: Tensor, video: Tensor | None) -> None:
        super().after_chunk(run, first_frame, x0, video)
        if first_frame % self.record_every:
            return
        frame_tokens = token_index([self.window.slot_of_frame(first_frame)], self.spec.frame_tokens)
        index = to_device(frame_tokens, run.cache.k.device)
        self._staged = (run.cache.k.index_select(2, index).clone(), run.cache.v.index_select(2, index).clone())

    def before_chunk(self, run: ChunkRunner, first_frame: int, frames: int) -> None:
        if self._staged is None:
            return
        new_k, new_v = self._staged
        self._staged = None
        lf = self.spec.frame_tokens
        bank_index = to_device(token_index(self.bank_slots, lf), run.cache.k.device)
        if self.bank_filled < self.bank_frames:
            slot_tokens = to_device(token_index([self.bank_slots[self.bank_filled]], lf), run.cache.k.device)
            run.cache.k.index_copy_(2, slot_tokens, new_k)
            run.cache.v.index_copy_(2, slot_tokens, new_v)
            self.bank_filled += 1
            return
        keep = self.frames_to_keep(run.text_kv.k, run.cache.k.index_select(2, bank_index))  # [layers, bank−1]
        for buffer, new in ((run.cache.k, new_k), (run.cache.v, new_v)):
            bank = buffer.index_select(2, bank_index).unflatten(2, (self.bank_frames, lf))  # [L, B, n, Lf, h, d]
            kept = torch.stack([bank[layer].index_select(1, keep[layer]) for layer in range(bank.shape[0])])
            buffer.index_copy_(2, bank_index, torch.cat([kept.flatten(2, 3), new], dim=2))

    def frames_to_keep(self, text_k: Tensor, bank_k: Tensor) -> Tensor:
        """Per layer, the bank frames (in their stored order) with the top `bank − 1` relevance scores.

        text_k [L, B, text_len, heads, d]; bank_k [L, B, bank·Lf, heads, d]. The mean of q·k over text tokens and
        frame tokens is the dot product of the two means, so this costs two reductions, not a text×frame matrix.
        """
        layers, batch, _, heads, head_dim = bank_k.shape
        frames = bank_k.float().view(layers, batch, self.bank_frames, -1, heads, head_dim).mean(dim=3)
        query = text_k.float().mean(dim=2)  # [L, B, heads, d]
        scores = (frames * query[:, :, None]).sum(-1).mean(dim=(1, 3)) / math.sqrt(head_dim)  # [L, bank]
        top = scores.topk(self.bank_frames - 1, dim=1).indices
        return top.sort(dim=1).values


class RecomputePolicy(CachePolicy):
    """Krea Realtime (models.md §3.5): no clean pass; before every chunk after the first, the cache is rebuilt from
    a 3-frame context at t = 0 — [anchor, the last 2 generated latents] at RoPE positions 0..2 — and the chunk runs
    at positions 3..5 (positions never grow). The anchor is the real first latent while it is in the context; later
    it is the oldest frame of the last 1 + 4·2 decoded pixel frames, re-encoded on its own as a first frame.

    The denoising passes add log(kv_cache_attention_bias) to the logits of the context frames except the first
    (1.0 = no bias); the recompute pass has none. Layout: slots [0, 3) context, [3, 6) the chunk.
    """

    clean_pass = False
    absolute_positions = False
    pipeline_parallel = (
        "it recomputes the cache from a context pass before every chunk, which would reach only rank 0's layers; "
        "and that context comes from the previous chunk's decoded output, so a stream batch would have "
        "no chunks to overlap"
    )
    stream_batch = "each chunk's context is the previous chunk's decoded output, so no two chunks can be in flight"

    def __init__(self, spec: KVCacheSpec, context_frames: int, device=None) -> None:
        self.spec = spec
        self.device = device
        self.context_frames = context_frames
        self.attention_bias = 1.0
        self._latents: Tensor | None = None  # the last chunk's clean latents [B, 16, F, h, w]
        self._first_latent: Tensor | None = None
        self._pixels: Tensor | None = None  # the last 1 + 4·(context − 1) decoded frames [B, 3, T, H, W]

    def reset(self) -> None:
        self._latents = self._first_latent = self._pixels = None

    def update_params(self, params: dict[str, Any]) -> None:
        self.attention_bias = float(params.get("kv_cache_attention_bias", 1.0))

    def plan(self, first_frame: int, frames: int) -> ChunkPlan:
        c, lf = self.context_frames, self.spec.frame_tokens
        chunk_slots = list(range(c, c + frames))
        bias = dict.fromkeys(chunk_slots, 0.0)
        if first_frame > 0:  # the context: the anchor plain, the later context frames damped
            bias[0] = 0.0
            bias.update(dict.fromkeys(range(1, c), math.log(self.attention_bias)))
        position = min(first_frame, c)
        return ChunkPlan(
            to_device(token_index(chunk_slots, lf), self.device),
            to_device(frame_bias(self.spec.max_frames, lf, bias), self.device),
            torch.arange(position, position + frames, device=self.device),
        )

    def context_plan(self) -> ChunkPlan:
        c, lf = self.context_frames, self.spec.frame_tokens
        return ChunkPlan(
            to_device(token_index(list(range(c)), lf), self.device),
            to_device(frame_bias(self.spec.max_frames, lf, dict.fromkeys(range(c), 0.0)), self.device),
            torch.arange(c, device=self.device),
        )

    def context_latents(self, run: ChunkRunner, first_frame: int) -> Tensor:
        assert self._latents is not None and self._first_latent is not None
        recent = self._latents[:, :, -(self.context_frames - 1) :]
        if first_frame - self.context_frames <= 0:  # the real first latent still opens the context
            anchor = self._first_latent
        else:
            assert self._pixels is not None
            anchor, _ = run.vae.model.encode_first(self._pixels[:, :, :1].to(next(run.vae.model.parameters()).dtype))
        return torch.cat([anchor.to(recent.dtype), recent], dim=2)

    def before_chunk(self, run: ChunkRunner, first_frame: int, frames: int) -> None:
        if first_frame == 0:
            return
        # No clearing first: the context pass writes slots [0, c) and attends to those alone, the chunk then writes
        # [c, c + F), and every other slot is masked, so nothing of the previous chunk's cache is read (zeroing the
        # whole cache cost 1.3 GB of writes a chunk at 14B and its 256² default).
        run.run_step(self.context_latents(run, first_frame), 0.0, self.context_plan())

    def after_chunk(self, run: ChunkRunner, first_frame: int, x0: Tensor, video: Tensor | None) -> None:
        assert video is not None, "Krea recomputes from decoded frames, so it is never pipelined"
        if first_frame == 0:
            self._first_latent = x0[:, :, :1].clone()
        self._latents = x0.clone()
        keep = 1 + 4 * (self.context_frames - 1)
        pixels = video if self._pixels is None else torch.cat([self._pixels, video], dim=2)
        self._pixels = pixels[:, :, -keep:].clone()
