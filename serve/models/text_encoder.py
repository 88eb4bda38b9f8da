"""umT5-XXL encoder (the text tower Wan2.1 conditions on), written from the published architecture.

Layout follows Wan2.1 ``wan/modules/t5.py`` key names exactly so its ``models_t5_umt5-xxl-enc-bf16.pth`` and Kijai's
``umt5-xxl-enc-fp8_e4m3fn.safetensors`` load without renames:

    token_embedding.weight                       [vocab, dim]
    blocks.{i}.norm1.weight                      [dim]
    blocks.{i}.attn.{q,k,v}.weight               [dim_attn, dim]
    blocks.{i}.attn.o.weight                     [dim, dim_attn]
    blocks.{i}.norm2.weight                      [dim]
    blocks.{i}.ffn.gate.0.weight                 [dim_ffn, dim]
    blocks.{i}.ffn.fc1.weight                    [dim_ffn, dim]
    blocks.{i}.ffn.fc2.weight                    [dim, dim_ffn]
    blocks.{i}.pos_embedding.embedding.weight    [num_buckets, num_heads]
    norm.weight                                  [dim]

T5 quirks kept on purpose (they are what the weights were trained with):
  * RMS norm without mean subtraction, variance in fp32;
  * attention logits are NOT scaled by 1/sqrt(head_dim) (T5 folds the scale into the q init);
  * a learned, bucketed, bidirectional relative-position bias per layer (umT5 does not share it);
  * gated-GELU(tanh) feed-forward;
  * residual stream clamped in fp16 when it overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serve.models.checkpoint import load_checkpoint

__all__ = [
    "UMT5_PRESETS",
    "UMT5Config",
    "UMT5Encoder",
    "load_text_encoder",
    "relative_position_buckets",
]


# --------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class UMT5Config:
    """Shape of a umT5 encoder. ``dim_attn`` = num_heads · head_dim (equal to ``dim`` for umT5-XXL)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512  # tokenizer pads/truncates to this; the DiT expects exactly 512 rows

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def num_tensors(self) -> int:
        # token_embedding + per block (norm1, q, k, v, o, norm2, gate, fc1, fc2, pos_embedding) + final norm
        return 1 + self.num_layers * 10 + 1


UMT5_PRESETS: dict[str, UMT5Config] = {
    "umt5-xxl": UMT5Config(),
    # Same key names and structure, sized for CPU tests.
    "tiny": UMT5Config(
        vocab_size=128, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=8, max_distance=16
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# Blocks


def fp16_clamp(x: Tensor) -> Tensor:
    """Pull fp16 activations back from ±inf; T5's residual stream is known to overflow fp16 (bf16/fp32 untouched).

    The check is a host sync, but the encoder runs once per prompt change, never in the per-chunk loop.
    """
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; variance in fp32 for stability, output in the weight's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int, device=None) -> Tensor:
    """Bidirectional T5 bucketing of ``key_pos - query_pos`` → [q_len, k_len] int64 bucket ids.

    Half the buckets are for positive offsets (key after query). Within each half, offsets below ``num_buckets/4``
    get their own bucket; larger offsets share log-spaced buckets up to ``max_distance``, beyond which all share the
    last bucket.
    """
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]  # [Lq, Lk]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # Clamp to 1 before the log so offset 0 doesn't produce -inf (those entries take the exact branch anyway).
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(dist < exact, dist, large)


class T5RelativeEmbedding(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, q_len: int, k_len: int) -> Tensor:
        """→ bias [1, H, Lq, Lk] in the embedding's dtype."""
        buckets = relative_position_buckets(
            q_len, k_len, self.num_buckets, self.max_distance, device=self.embedding.weight.device
        )
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [Lq, Lk, H] -> [1, H, Lq, Lk]


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, L, dim]; bias [B or 1, H, L, L] additive (relative position + key mask) → [B, L, dim]."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        # scale=1.0: T5 has no 1/sqrt(d). SDPA upcasts nothing, so softmax precision follows the compute dtype.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))  # (B, H, L, hd) -> (B, L, H·hd)


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        # `gate` is a Sequential so the checkpoint key is `ffn.gate.0.weight`.
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x: Tensor, key_mask_bias: Tensor) -> Tensor:
        """x [B, L, dim]; key_mask_bias [B, 1, 1, L] (0 or dtype-min) → [B, L, dim]."""
        n = x.shape[1]
        bias = self.pos_embedding(n, n).to(key_mask_bias.dtype) + key_mask_bias  # [B, H, L, L]
        x = fp16_clamp(x + self.attn(self.norm1(x), bias))
        x = fp16_clamp(x + self.ffn(self.norm2(x)))
        return x


# --------------------------------------------------------------------------------------------------------------------
# Model


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids [B, L] int64, mask [B, L] (1 = real token incl. </s>, 0 = pad) → [B, L, dim].

        Rows where mask == 0 are returned as exact zeros: Wan trims the context to the true length and the DiT
        zero-pads back to 512 before its text_embedding (models.md §1.2 item 3), so zeros are the parity value.
        """
        x = self.token_embedding(ids)
        dtype = x.dtype
        # Additive key mask: padded keys get the most negative finite value so softmax gives them ~0 weight
        # (finite, so an all-padded row can't turn into NaN; those rows are zeroed below anyway).
        key_mask_bias = torch.zeros(mask.shape, dtype=dtype, device=x.device)
        key_mask_bias.masked_fill_(mask == 0, torch.finfo(dtype).min)
        key_mask_bias = key_mask_bias[:, None, None, :]  # [B, L] -> [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, key_mask_bias)
        x = self.norm(x)
        return x * (mask != 0).unsqueeze(-1).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_text_encoder(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config: UMT5Config | str = "umt5-xxl",
) -> UMT5Encoder:
    """Build a umT5 encoder on the meta device and assign the checkpoint's tensors into it (no double copy in RAM).

    Accepts Wan's ``.pth`` and ``.safetensors`` (including fp8-e4m3fn, upcast to ``dtype``). Keys and shapes are
    checked strictly (serve/models/checkpoint.py: CheckpointError names the key and the file). Returns the model
    in eval mode.
    """
    cfg = UMT5_PRESETS[config] if isinstance(config, str) else config
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    load_checkpoint(model, path, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)
