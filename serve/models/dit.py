"""The causal Wan2.1 DiT: config, blocks, model. Parameter names are Wan's (`wan/modules/model.py`), so published
checkpoints load strictly; structure follows diffusers' (numbered sections, named modulation chunks).

Two ways to run it, same weights, same arithmetic:
- `step(...)`: one chunk of latent frames against a preallocated KV cache (serve/models/kv_cache.py). Static shapes;
  the chunk's position, cache slots and key mask are device tensors, so nothing recompiles between chunks.
- `forward_full(...)`: every frame at once under an explicit attention mask; the oracle the cached path is tested
  against.

Exactness (models.md §1.2, §8): interleaved 3D RoPE split (frame, height, width) = (d/2 − 2⌊d/6⌋, ⌊d/6⌋, ⌊d/6⌋)
complex pairs with table dims (d − 4⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋); q/k RMSNorm over the full width before the head split;
cross-attention without gate; the head modulated by `e`, not `e0`; cos-first sinusoid from float64; padded text rows
attended; per-frame timesteps. The time embedding, norms and modulation arithmetic run in fp32 as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.rope import apply_rope, norm_rope, rms_norm_reference

ROPE_MAX_POSITIONS = 1024  # the reference's table length: absolute frame positions stay below this
# Every nn.Linear of a DiTBlock, by its name in the block: what LongLive-style LoRAs target (models.md §3.2).
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip
ROPE_THETA = 10000.0

HintsFn = Callable[[Tensor, Tensor, tuple[int, int, int]], dict[int, Tensor]]
"""(patch-embedded tokens x, e0, token grid) → {main layer: residual added after that block}: the VACE hints."""


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


DIT_CONFIGS: dict[str, DiTConfig] = {
    "wan2.1-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Tests: every key of the real model, tiny widths. head_dim 32 keeps the 3-axis RoPE split non-degenerate.
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=32, text_dim=32),
}


# -- embeddings ---------------------------------------------------------------------------------------------------


def sinusoidal_embedding(timesteps: Tensor, dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """[N] raw timesteps in [0, 1000] → [N, dim] float32, **cos first**, computed in float64 like the reference.

    `dtype=torch.float32` is for exported graphs (TensorRT has no float64 arithmetic): angles up to 1000 rad then
    carry ~6e-5 rad of rounding, far below what bf16 weights resolve; tests/test_export_onnx.py bounds the effect.
    """
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=dtype, device=timesteps.device) / half)
    angles = timesteps.to(dtype)[:, None] * omega[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (frame, height, width): 22/21/21 for head_dim 128."""
    pairs, third = head_dim // 2, head_dim // 6
    return pairs - 2 * third, third, third


def rope_table(positions: int, pairs: int) -> tuple[Tensor, Tensor]:
    """cos/sin [positions, pairs] with ω_j = θ^(−2j / (2·pairs)) (the reference's `rope_params(1024, 2·pairs)`)."""
    omega = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), omega)
    return torch.cos(angles).float(), torch.sin(angles).float()


class RotaryEmbedding(nn.Module):
    """cos/sin of every (frame, row, column) position, as non-persistent buffers (never in checkpoints)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        frame_pairs, height_pairs, width_pairs = rope_axis_dims(head_dim)
        for name, pairs in (("frame", frame_pairs), ("height", height_pairs), ("width", width_pairs)):
            cos, sin = rope_table(ROPE_MAX_POSITIONS, pairs)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    def tables(self, frame_positions: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """cos/sin [F·h·w, hd/2] for tokens in (frame, row, column) order. frame_positions [F] is a device tensor;
        [B, F] (a stream batch: each row a different chunk) gives [B, F·h·w, hd/2]."""
        if frame_positions.dim() == 2:
            rows = frame_positions.shape[0]
            cos, sin = self.tables(frame_positions.flatten(), height, width)  # [B·F·h·w, hd/2]
            return cos.view(rows, -1, cos.shape[-1]), sin.view(rows, -1, sin.shape[-1])
        frames = frame_positions.shape[0]
        parts_cos, parts_sin = [], []
        for table, index, shape in (
            ("frame", frame_positions, (frames, 1, 1)),
            ("height", torch.arange(height, device=frame_positions.device), (1, height, 1)),
            ("width", torch.arange(width, device=frame_positions.device), (1, 1, width)),
        ):
            cos = getattr(self, f"{table}_cos").index_select(0, index)  # [n, pairs]
            sin = getattr(self, f"{table}_sin").index_select(0, index)
            parts_cos.append(cos.view(*shape, -1).expand(frames, height, width, -1))
            parts_sin.append(sin.view(*shape, -1).expand(frames, height, width, -1))
        cos = torch.cat(parts_cos, dim=-1).reshape(frames * height * width, -1)  # [L, hd/2]
        sin = torch.cat(parts_sin, dim=-1).reshape(frames * height * width, -1)
        return cos, sin


# -- blocks -------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a Linear computes in: its weight's, unless it stores narrower weights and says so (`Fp8Linear`)."""
    dtype = getattr(layer, "compute_dtype", None)  # not getattr's default: a wrapped Linear has no `.weight`
    return dtype if dtype is not None else layer.weight.dtype


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """Run a Linear in its compute dtype (bf16 or fp32 weights, or fp8-stored ones; fp32 residual stream)."""
    return layer(x.to(compute_dtype(layer)))


class Attention(nn.Module):
    """q, k, v, o with bias and q/k RMSNorm over the full width (Wan's `WanSelfAttention`; also used for cross)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # [B, L, d] → [B, L, heads, hd]

    def project_q(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """[B, L, heads, hd]: normalised over the full width, and rotated by `rope` (cos, sin) when given (one
        kernel on CUDA, kernels/rope.py)."""
        return self._normed(self.norm_q, linear(self.q, x), rope)

    def project_kv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """k as `project_q` makes q (rotated when `rope` is given), and v."""
        return self._normed(self.norm_k, linear(self.k, x), rope), self.heads(linear(self.v, x))

    def _normed(self, norm: RMSNorm, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        if rope is None:
            return self.heads(norm(x))
        return norm_rope(x, norm.weight, norm.eps, self.num_heads, *rope)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """q [B, Lq, heads, hd], k/v [B, Lk, heads, hd], bias additive, broadcastable to [B, heads, Lq, Lk]."""
        dtype = compute_dtype(self.o)  # attention runs in the weights' dtype (bf16 on GPU, fp32 for the oracle)
        q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [B, heads, L, hd]
        if bias is not None:
            bias = bias.to(dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/√hd, as the reference
        return linear(self.o, out.transpose(1, 2).flatten(2))  # [B, Lq, d]


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.self_attn = Attention(dim, config.num_heads, config.eps)
        self.norm3 = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=True)
        self.cross_attn = Attention(dim, config.num_heads, config.eps)
        self.norm2 = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, e0: Tensor, frames: int, self_attention, text_kv: tuple[Tensor, Tensor]) -> Tensor:
        """x [B, N, d] fp32; e0 [B, F, 6, d]; `self_attention(h) -> [B, N, d]` does the (cached or full) attention."""
        batch, tokens, dim = x.shape
        # 1. Per-frame modulation (fp32): (shift, scale, gate) for attention and for the FFN.
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (
            (self.modulation.float().unsqueeze(0) + e0.float()).unsqueeze(3).unbind(2)  # each [B, F, 1, d]
        )

        def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
            h = h.view(batch, frames, tokens // frames, dim)  # [B, F, Lf, d]
            return (h * (1 + scale) + shift).view(batch, tokens, dim)

        def gated(y: Tensor, gate: Tensor) -> Tensor:
            return (y.float().view(batch, frames, tokens // frames, dim) * gate).view(batch, tokens, dim)

        # 2. Self-attention.
        x = x + gated(self_attention(modulate(self.norm1(x.float()), shift_msa, scale_msa)), gate_msa)
        # 3. Cross-attention: no modulation, no gate.
        norm3 = self.norm3  # affine: kept in fp32 whatever the weights' dtype
        h = F.layer_norm(x.float(), (dim,), norm3.weight.float(), norm3.bias.float(), norm3.eps)
        q = self.cross_attn.project_q(h)
        x = x + self.cross_attn.attend(q, text_kv[0], text_kv[1], None).float()
        # 4. Feed-forward.
        h = modulate(self.norm2(x.float()), shift_ffn, scale_ffn)
        return x + gated(linear(self.ffn[2], self.ffn[1](linear(self.ffn[0], h))), gate_ffn)


class Head(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, math.prod(config.patch_size) * config.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: Tensor, e: Tensor, frames: int) -> Tensor:
        """x [B, N, d]; e [B, F, d] (the time embedding, not e0) → [B, N, 64]."""
        batch, tokens, dim = x.shape
        shift, scale = (self.modulation.float().unsqueeze(0) + e.float().unsqueeze(2)).unsqueeze(3).unbind(2)
        h = self.norm(x.float()).view(batch, frames, tokens // frames, dim) * (1 + scale) + shift
        return linear(self.head, h.view(batch, tokens, dim)).float()


def write_cache(cache_k: Tensor, cache_v: Tensor, layer: int, write_index: Tensor, k: Tensor, v: Tensor) -> None:
    """`k`, `v` [B, N, heads, hd] into layer `layer` of the caches [layers, B, S, heads, hd] at token slots
    `write_index` [N], in place.

    Caches of batch 1 (every stream's) are written through a flat [layers·S, heads, hd] view of the whole buffer:
    exported to ONNX that is one ScatterND of N rows. `cache[layer].index_copy_(1, ...)` exported as a ScatterElements
    whose int64 index is a constant the size of the layer's cache: about 150 MB a layer for the 1.3B DiT at 512², 9 GB
    for a step, in the plan and read every step (build_engines/export.py). The same writes either way.

    Not under the TorchScript tracer (the fp8 export, whose Q/DQ ModelOpt emits only there): it does not carry a
    write through a view of the whole buffer back to the traced cache, and exports the per-layer write as a ScatterND
    without the constant."""
    layers, batch, slots = cache_k.shape[:3]
    if batch == 1 and cache_k.is_contiguous() and cache_v.is_contiguous() and not torch.jit.is_tracing():
        flat_index = write_index + layer * slots
        for cache, new in ((cache_k, k), (cache_v, v)):
            cache.view(layers * slots, *cache.shape[3:]).index_copy_(0, flat_index, new[0].to(cache.dtype))
        return
    cache_k[layer].index_copy_(1, write_index, k.to(cache_k.dtype))
    cache_v[layer].index_copy_(1, write_index, v.to(cache_v.dtype))


def run_blocks(blocks: Iterable[tuple[int, DiTBlock]], x: Tensor, e0: Tensor, frames: int, rope: tuple[Tensor, Tensor],
               key_bias: Tensor, text_kv: tuple[Tensor, Tensor], cache_k: Tensor, cache_v: Tensor,
               write_index: Tensor, key_rope: tuple[Tensor, Tensor] | None,
               residuals: dict[int, Tensor] | None = None) -> Tensor:  # fmt: skip
    """The cached step's block loop over `(layer, block)` pairs; `layer` indexes `text_kv`, the caches and
    `residuals`. The whole model passes all its blocks; a pipeline stage (serve/runtime/stages.py) passes its own,
    numbered from 0 against caches that hold only its layers, so both run the same arithmetic.

    x [B, N, d] fp32; e0 [B, F, 6, d]; rope the queries' cos/sin [N, hd/2] (or [B, N, hd/2]); key_bias [S] or
    [B, S] additive; text_kv, cache_k, cache_v [layers, B, ·, heads, hd]; write_index [N] token slots.

    A stream batch (serve/pipelines/stream_batch.py) passes write_index [B, N]: each row writes its own token slots
    of one cache shared by the rows (cache batch 1, text K/V batch 1) and attends it through its row of key_bias.
    """
    cos, sin = rope
    bias = key_bias.view(-1, 1, 1, key_bias.shape[-1])  # [B or 1, 1, 1, S]: broadcast over heads and queries
    residuals = residuals or {}
    for layer, block in blocks:

        def self_attention(h: Tensor, layer: int = layer, block: DiTBlock = block) -> Tensor:
            attention = block.self_attn
            q = attention.project_q(h, (cos, sin))
            k, v = attention.project_kv(h, (cos, sin) if key_rope is None else None)  # else rotated at read time
            if write_index.dim() == 2:  # rows into one shared cache: [B·N] distinct slots, one copy
                write_cache(
                    cache_k, cache_v, layer, write_index.flatten(), k.flatten(0, 1)[None], v.flatten(0, 1)[None]
                )
                rows = (q.shape[0], *cache_k.shape[2:])
                return attention.attend(q, cache_k[layer].expand(rows), cache_v[layer].expand(rows), bias)
            write_cache(cache_k, cache_v, layer, write_index, k, v)
            keys = cache_k[layer] if key_rope is None else apply_rope(cache_k[layer], *key_rope)
            return attention.attend(q, keys, cache_v[layer], bias)

        text_k, text_v = text_kv[0][layer], text_kv[1][layer]
        if text_k.shape[0] != x.shape[0]:  # a stream batch's rows share the prompt K/V (batch 1)
            text_k, text_v = (t.expand(x.shape[0], *t.shape[1:]) for t in (text_k, text_v))
        x = block(x, e0, frames, self_attention, (text_k, text_v))
        if layer in residuals:
            x = x + residuals[layer]
    return x


# -- model --------------------------------------------------------------------------------------------------------


class WanDiT(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.rope = RotaryEmbedding(config.head_dim)

    # -- pieces shared by both paths -----------------------------------------------------------------------------

    def embed_text(self, context: Tensor) -> Tensor:
        """[B, text_len, text_dim] (padded rows zero; they are still attended) → [B, text_len, d]."""
        return linear(self.text_embedding[2], self.text_embedding[1](linear(self.text_embedding[0], context)))

    def text_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention K/V of every layer, computed once per prompt: each [layers, B, text_len, heads, hd]."""
        text = self.embed_text(context)
        keys, values = zip(*(block.cross_attn.project_kv(text) for block in self.blocks), strict=True)
        return torch.stack(keys), torch.stack(values)

    def embed_time(self, timestep: Tensor, sinusoid_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """timestep [B, F] raw values → e [B, F, d], e0 [B, F, 6, d], both fp32."""
        batch, frames = timestep.shape
        sinusoid = sinusoidal_embedding(timestep.flatten(), self.config.freq_dim, sinusoid_dtype)
        layer0, layer2 = self.time_embedding[0], self.time_embedding[2]
        e = F.linear(
            F.silu(F.linear(sinusoid, layer0.weight.float(), layer0.bias.float())),
            layer2.weight.float(),
            layer2.bias.float(),
        )
        projection = self.time_projection[1]
        e0 = F.linear(F.silu(e), projection.weight.float(), projection.bias.float())
        return e.view(batch, frames, -1), e0.view(batch, frames, 6, -1)

    def patchify(self, latents: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """[B, 16, F, H, W] → tokens [B, F·(H/2)·(W/2), d] in (f, h, w) order, and the token grid."""
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))  # [B, d, F, h, w]
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).float(), grid  # type: ignore[return-value]

    def unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, N, 64] → [B, 16, F, H, W]; the 64 outputs are ordered (pt, ph, pw, c) with c fastest."""
        frames, height, width = grid
        pt, ph, pw = self.config.patch_size
        x = out.view(out.shape[0], frames, height, width, pt, ph, pw, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(out.shape[0], self.config.out_dim, frames * pt, height * ph, width * pw)

    # -- the cached step -----------------------------------------------------------------------------------------

    def step(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_kv: tuple[Tensor, Tensor],
        cache_k: Tensor,
        cache_v: Tensor,
        write_index: Tensor,
        key_bias: Tensor,
        frame_positions: Tensor,
        key_rope: tuple[Tensor, Tensor] | None = None,
        sinusoid_dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """One chunk against the KV cache; returns the flow prediction [B, 16, F, H, W].

        latents [B, 16, F, H, W]; timestep [B, F]; text_kv from `text_kv()`;
        cache_k / cache_v [layers, B, S, heads, hd], written in place at `write_index` [F·Lf] (token slots);
        key_bias [S] or [B, S], additive over cache slots (0 attend, −inf masked, log(b) to damp: Krea's bias);
        frame_positions [F]: the chunk's RoPE frame positions (device tensor: no recompile per chunk).
        key_rope: None → keys are cached already rotated (absolute positions); or per-slot cos/sin [S, hd/2] → keys
        are cached un-rotated and rotated at read time (Reward Forcing's window-relative positions).
        sinusoid_dtype: float64 as the reference; exported graphs pass float32 (`sinusoidal_embedding`).
        """
        return self._cached_step(
            latents, timestep, text_kv, cache_k, cache_v, write_index, key_bias, frame_positions, key_rope,
            sinusoid_dtype, hints=None,
        )  # fmt: skip

    def _cached_step(self, latents: Tensor, timestep: Tensor, text_kv: tuple[Tensor, Tensor], cache_k: Tensor,
                     cache_v: Tensor, write_index: Tensor, key_bias: Tensor, frame_positions: Tensor,
                     key_rope: tuple[Tensor, Tensor] | None, sinusoid_dtype: torch.dtype,
                     hints: HintsFn | None) -> Tensor:  # fmt: skip
        """`step`'s body; `hints` (the VACE branch, serve/models/vace.py) adds residuals after some blocks."""
        x, grid = self.patchify(latents)
        cos, sin = self.rope.tables(frame_positions, grid[1], grid[2])
        e, e0 = self.embed_time(timestep, sinusoid_dtype)
        residuals = hints(x, e0, grid) if hints is not None else {}
        x = run_blocks(
            enumerate(self.blocks), x, e0, grid[0], (cos, sin), key_bias, text_kv, cache_k, cache_v, write_index,
            key_rope, residuals,
        )  # fmt: skip
        return self.unpatchify(self.head(x, e, grid[0]), grid)

    # -- the oracle ----------------------------------------------------------------------------------------------

    def forward_full(self, latents: Tensor, timestep: Tensor, context: Tensor, mask: Tensor | None = None,
                     hints: HintsFn | None = None) -> Tensor:  # fmt: skip
        """Every frame at once; mask [N, N] boolean (True = attend), or float (added to the logits: 0 attend, −inf
        masked, log(b) damped), or None for bidirectional attention. `hints` as in `_cached_step`."""
        x, grid = self.patchify(latents)
        frame_positions = torch.arange(grid[0], device=latents.device)
        cos, sin = self.rope.tables(frame_positions, grid[1], grid[2])
        e, e0 = self.embed_time(timestep)
        text_k, text_v = self.text_kv(context)
        residuals = hints(x, e0, grid) if hints is not None else {}
        bias = mask
        if mask is not None and mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, device=x.device).masked_fill(~mask, float("-inf"))
        for layer, block in enumerate(self.blocks):

            def self_attention(h: Tensor, block: DiTBlock = block) -> Tensor:
                attention = block.self_attn
                q = apply_rope(attention.project_q(h), cos, sin)
                k, v = attention.project_kv(h)
                return attention.attend(q, apply_rope(k, cos, sin), v, bias)

            x = block(x, e0, grid[0], self_attention, (text_k[layer], text_v[layer]))
            if layer in residuals:
                x = x + residuals[layer]
        return self.unpatchify(self.head(x, e, grid[0]), grid)


# Kept in fp32 whatever the load dtype: the reference computes these in fp32.
FP32_PARAMETERS = ("modulation", "norm", "time_embedding", "time_projection")


def keep_in_fp32(name: str) -> bool:
    return any(part in name for part in FP32_PARAMETERS)


def first_stage_part(model: WanDiT, blocks: tuple[int, int]) -> WanDiT:
    """`model` cut to what a pipeline's first stage holds (serve/runtime/stages.py): the embeddings and the blocks in
    [start, end). Every other block becomes an empty placeholder, so the blocks keep the model's indices (a block
    moved in later takes its slot), and the head goes (the last stage runs it)."""
    start, end = blocks
    for i in range(len(model.blocks)):
        if not start <= i < end:
            model.blocks[i] = nn.Module()
    model.head = nn.Module()
    return model


def load_dit(
    config: DiTConfig,
    path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    prefer: str | None = None,
    lora=None,
    lora_scale: float = 1.0,
    first_stage: tuple[int, int] | None = None,
) -> WanDiT:
    """Build on the meta device and load a checkpoint into it (serve/models/checkpoint.py), streaming; a LoRA file
    (`lora`, e.g. LongLive's built-in one) is merged into the weights as they load, at `lora_scale`.

    `first_stage`: the [start, end) blocks of a pipeline's first stage; the model is then `first_stage_part` of the
    whole, and only its tensors are read from the file (the other blocks' and the head's never are)."""
    from serve.models.checkpoint import load_checkpoint
    from serve.models.lora import match_model, merged_weights, read_lora_file

    with torch.device("meta"):
        model = WanDiT(config)
    select = None
    if first_stage is not None:
        names = set(first_stage_part(model, first_stage).state_dict())
        select = names.__contains__
    deltas = merged_weights([(match_model(read_lora_file(lora), model), lora_scale)]) if lora is not None else None
    load_checkpoint(model, path, dtype=dtype, device=device, prefer=prefer, keep_fp32=keep_in_fp32, deltas=deltas,
                    select=select)  # fmt: skip
    model.rope = RotaryEmbedding(config.head_dim).to(device)  # non-persistent: rebuilt, never in checkpoints
    return model.eval()


def block_causal_mask(frames: int, tokens_per_frame: int, chunk_frames: int, device=None) -> Tensor:
    """[N, N] True where a token may attend: keys up to the end of its own chunk (chunks are bidirectional inside)."""
    chunk_of_token = torch.arange(frames * tokens_per_frame, device=device) // (tokens_per_frame * chunk_frames)
    return chunk_of_token[None, :] <= chunk_of_token[:, None]
