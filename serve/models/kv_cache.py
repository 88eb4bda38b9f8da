"""KV caches as preallocated buffers written at an index, and the policies that choose the index.

The DiT step never knows which pipeline it serves: a policy turns "chunk c covers latent frames [f0, f0+F)" into
device tensors (`write_index` over cache slots, additive `key_bias` over cache slots, RoPE `frame_positions`), and
the same step runs eager, compiled, or exported. No Python lists of tensors, no shift-left copies, no shapes that
depend on how much has been generated: the buffers have their maximum length from the start, and unwritten or
evicted slots are masked through `key_bias`.

Slots are frame-granular: frame slot s holds tokens [s·Lf, (s+1)·Lf). Attention is a sum over keys, so the order
of slots does not matter; with keys rotated at write time (absolute positions), a ring buffer that overwrites the
oldest frame is the same attention set as the reference's shift-left eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from serve.models.transfer import to_device


@dataclass(frozen=True)
class KVCacheSpec:
    layers: int
    batch: int
    heads: int
    head_dim: int
    frame_tokens: int
    """Lf: tokens per latent frame, (H/16)·(W/16)."""
    max_frames: int
    """Frame slots in the buffer."""

    @property
    def max_tokens(self) -> int:
        return self.max_frames * self.frame_tokens


class KVCache(nn.Module):
    """Self-attention K/V of every layer: [layers, B, S_max, heads, hd], allocated once."""

    def __init__(self, spec: KVCacheSpec, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        shape = (spec.layers, spec.batch, spec.max_tokens, spec.heads, spec.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class TextKVCache(nn.Module):
    """Cross-attention K/V of every layer for the current prompt: [layers, B, text_len, heads, hd].

    Written in place (`set`) when the prompt embedding changes, so its addresses stay fixed for CUDA graphs.
    """

    def __init__(self, layers: int, batch: int, text_len: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        shape = (layers, batch, text_len, heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def set(self, kv: tuple[Tensor, Tensor]) -> None:
        self.k.copy_(kv[0])
        self.v.copy_(kv[1])

    def pair(self) -> tuple[Tensor, Tensor]:
        return self.k, self.v


@dataclass(frozen=True)
class ChunkPlan:
    """What the step needs for one chunk, all on the cache's device."""

    write_index: Tensor  # [F·Lf] token slots the chunk's K/V go to
    key_bias: Tensor  # [S_max] additive: 0 attend, −inf masked, log(b) damped
    frame_positions: Tensor  # [F] RoPE frame positions of the chunk's queries (and keys, when cached rotated)
    key_positions: Tensor | None = None
    """[max_frames] RoPE frame position of each frame slot when keys are cached un-rotated and rotated at read time
    (Reward Forcing's window-relative positions); None when keys are cached rotated at their absolute positions."""

    def to(self, device: torch.device | str | None) -> ChunkPlan:
        """The plan on `device`: policies build plans on the host and move each once (host→device, never back)."""
        positions = None if self.key_positions is None else to_device(self.key_positions, device)
        return ChunkPlan(
            to_device(self.write_index, device), to_device(self.key_bias, device),
            to_device(self.frame_positions, device), positions,
        )  # fmt: skip

    def as_args(self) -> tuple[Tensor, Tensor, Tensor]:
        """In the order `WanDiT.step` takes them."""
        return self.write_index, self.key_bias, self.frame_positions


def token_index(slots: list[int], frame_tokens: int) -> Tensor:
    """Token positions of the given frame slots, in order."""
    return torch.cat([torch.arange(s * frame_tokens, (s + 1) * frame_tokens) for s in slots])


def frame_bias(max_frames: int, frame_tokens: int, bias: dict[int, float]) -> Tensor:
    """[max_frames·Lf] additive key bias: `bias[slot]` on the listed frame slots, −inf on every other slot."""
    per_frame = torch.full((max_frames,), float("-inf"))
    for slot, value in bias.items():
        per_frame[slot] = value
    return per_frame.repeat_interleave(frame_tokens)


class RollingSinkPolicy:
    """The first `sink_frames` frames stay forever; the rest of the buffer is a ring of the most recent frames.

    LongLive: sink 3 + ring 9 (12 frames attended, the current chunk included); StreamDiffusionV2 (Scope): sink 3 +
    ring 3 with 1-frame chunks. Re-running a chunk (every denoising pass, then the clean pass) writes the same slots.
    """

    def __init__(self, spec: KVCacheSpec, sink_frames: int, device: torch.device | str | None = None) -> None:
        if not 0 <= sink_frames < spec.max_frames:
            raise ValueError(f"sink_frames must be in [0, {spec.max_frames}), got {sink_frames}")
        self.spec = spec
        self.sink_frames = sink_frames
        self.ring_frames = spec.max_frames - sink_frames
        self.device = device

    def slot_of_frame(self, frame: int) -> int:
        if frame < self.sink_frames:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % self.ring_frames

    def attended_frames(self, first_frame: int, frames: int) -> list[int]:
        """Absolute frames a chunk at [first_frame, first_frame+frames) attends to: the explicit reference selection."""
        end = first_frame + frames
        sink = list(range(min(self.sink_frames, end)))
        recent = range(max(self.sink_frames, end - self.ring_frames), end)
        return sink + list(recent)

    def plan(self, first_frame: int, frames: int) -> ChunkPlan:
        return self.host_plan(first_frame, frames).to(self.device)

    def host_plan(self, first_frame: int, frames: int) -> ChunkPlan:
        """`plan` on the host, for policies that extend it before it moves."""
        lf = self.spec.frame_tokens
        if frames > self.ring_frames and first_frame + frames > self.sink_frames:
            raise ValueError(f"a chunk of {frames} frames does not fit a ring of {self.ring_frames} frames")
        slots = [self.slot_of_frame(f) for f in range(first_frame, first_frame + frames)]
        attended = {self.slot_of_frame(f): 0.0 for f in self.attended_frames(first_frame, frames)}
        key_bias = frame_bias(self.spec.max_frames, lf, attended)
        positions = torch.arange(first_frame, first_frame + frames)
        return ChunkPlan(token_index(slots, lf), key_bias, positions)
