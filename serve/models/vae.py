"""Wan2.1 video VAE (`Wan2.1_VAE.pth`) and its pruned LightVAE variant, with static-shape streaming caches.

Parameter names follow `wan/modules/vae.py` exactly (`encoder.downsamples.5.time_conv.weight`, `conv1`, `conv2`, ...),
so the real checkpoints load without renaming: 194 tensors for the `wan` preset.

Streaming. Every temporal convolution is causal, so a clip can be processed in chunks if each conv sees the frames
that came before the chunk. The reference keeps them in a Python list that it fills lazily (`feat_cache`); here the
state of one stream is a flat tuple of tensors whose shapes never change after the first call:

* a kernel-3 `CausalConv3d` keeps the last 2 frames of its input (zeros at stream start = zero front padding);
* a `down3d` keeps the last frame of its input (its stride-2 time conv overlaps chunks by one frame);
* an `up3d` keeps the last 2 frames of its input, except latent 0, which the reference never feeds to `time_conv`
  (its `'Rep'` marker): that latent maps to one pixel frame, every later latent to 4.

Each model direction therefore has two steps:

* `*_first(x) -> (y, caches)`: the stream starts here. Any clip length is accepted (1 + 4k pixel frames or F latents),
  which is also the non-streaming whole-clip computation (`encode_video` / `decode_video`).
* `*_step(x, caches) -> (y, caches)`: steady state, 4k pixel frames or F latents, static shapes, no Python branches on
  tensor values. This is the step that is exported with its caches as explicit inputs/outputs.

Pixels are [B, 3, T, H, W] in [-1, 1]; latents are [B, 16, F, H/8, W/8] in the normalised Wan latent space
`(mu - mean) / std`, the space the DiT works in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Per-channel statistics of the Wan2.1 latent space (wan/modules/vae.py `WanVAE.__init__`).
WAN_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

CACHE_T = 2  # frames a kernel-3 causal conv needs from the previous chunk


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class WanVAEConfig:
    """Widths of the Wan VAE. `dim * dim_mult[i]` are the encoder stage widths (decoder mirrored)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per stage transition; decoder uses the reverse


WAN_VAE_CONFIGS: dict[str, WanVAEConfig] = {
    "wan": WanVAEConfig(),
    # LightX2V `lightvaew2_1`: 75% channel pruning of every width (96·0.25 = 24 → 24/48/96/96), same keys and caches.
    "lightvae": WanVAEConfig(dim=24),
    # Tests: the real key layout at tiny widths (8/16/32/32).
    "tiny": WanVAEConfig(dim=8),
}


# ---------------------------------------------------------------------------------------------------------------------
# Cache plumbing


class CacheIO:
    """Hands a step its input caches in call order and collects the updated ones in the same order.

    `past=None` means the stream starts here: every `take()` returns None and the modules use zero history
    (or, for the resamplers, their first-chunk rule). The list of new caches always has the same length and order,
    so the tuple returned by a first step is a valid input of the next steady step.

    A `list` of past caches is consumed: each entry is dropped as it is taken, so an old cache is freed as soon as
    its replacement exists instead of every old cache living until the step returns (2.4 GB of fp32 caches for the
    decoder at 512²). A tuple is left as it is.
    """

    def __init__(self, past: Sequence[Tensor] | None) -> None:
        self._past = past
        self._next = 0
        self.new: list[Tensor] = []

    def take(self) -> Tensor | None:
        if self._past is None:
            return None
        cache = self._past[self._next]
        if isinstance(self._past, list):
            self._past[self._next] = None  # type: ignore[call-overload]  # the caller handed this list over
        self._next += 1
        return cache

    def put(self, cache: Tensor) -> None:
        # A copy, not a view: a slice would keep the whole (often 100s of MB) conv input alive until the next chunk.
        self.new.append(cache.clone())

    def finish(self) -> tuple[Tensor, ...]:
        if self._past is not None and self._next != len(self._past):
            raise ValueError(f"step consumed {self._next} caches but was given {len(self._past)}")
        return tuple(self.new)


# ---------------------------------------------------------------------------------------------------------------------
# Blocks


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: the `2·padding_t` frames before the input come from the caller.

    Spatial padding stays inside the conv (zeros, as the reference's F.pad). Temporal padding is never done here: the
    caller prepends history (`forward_cached`), so the same module serves whole clips and chunks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pad = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad[1], pad[2]))
        self.cache_frames = 2 * pad[0]

    def forward_cached(self, x: Tensor, io: CacheIO) -> Tensor:
        """x [B, C, T, H, W] → [B, C', T, H, W], reading and updating this conv's cache of the last input frames."""
        if self.cache_frames == 0:
            return self(x)
        past = io.take()
        if past is None:  # stream start: zero history, exactly the reference's causal zero padding
            past = x.new_zeros(x.shape[0], x.shape[1], self.cache_frames, x.shape[3], x.shape[4])
        x = torch.cat([past, x], dim=2)  # (B, C, cache_frames + T, H, W)
        io.put(x[:, :, -self.cache_frames :])
        return self(x)


class RMSNorm(nn.Module):
    """`F.normalize` over channels · √C · gamma (reference `RMS_norm`, bias disabled so only `gamma` is stored)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        # gamma broadcasts over (T, H, W) for video tensors, over (H, W) for the attention's per-frame images.
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest-exact ×2 in (H, W); computed in fp32 because bf16 nearest interpolation is not supported everywhere."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class ResidualBlock(nn.Module):
    """`residual` = [RMS, SiLU, CConv3, RMS, SiLU, Dropout, CConv3] plus a 1×1×1 `shortcut` when widths differ."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(0.0),  # keeps the reference's module indices (`residual.6`); inference only
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        r = self.residual
        h = r[2].forward_cached(F.silu(r[0](x)), io)
        h = r[6].forward_cached(F.silu(r[3](h)), io)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame (no temporal mixing, so no cache)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, C, H, W)
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # (B·T, 1, H·W, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B·T, 1, H·W, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B·T, 1, H·W, C)
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, C, H, W)
        y = self.proj(y)
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)


class Resample(nn.Module):
    """Spatial ×2 down/up sampling, with a causal ×2 in time for the `3d` modes.

    down2d/down3d: ZeroPad(0,1,0,1) + Conv2d(C, C, 3, stride 2) as `resample.1`; down3d adds `time_conv`
    CConv(C, C, (3,1,1), stride (2,1,1)) applied after the spatial conv. up2d/up3d: nearest ×2 + Conv2d(C, C/2, 3);
    up3d first applies `time_conv` CConv(C, 2C, (3,1,1)) whose two halves become two consecutive frames.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in ("down2d", "down3d", "up2d", "up3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("down"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "down3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "up3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: Tensor, io: CacheIO, first: bool) -> Tensor:
        if self.mode == "up3d":
            x = self._time_upsample(x, io, first)
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B·T, C', H', W')
        x = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')
        if self.mode == "down3d":
            x = self._time_downsample(x, io, first)
        return x

    def _time_downsample(self, x: Tensor, io: CacheIO, first: bool) -> Tensor:
        # Whole sequence: frame 0 alone, then stride-2 windows (x0,x1,x2), (x2,x3,x4), ... so that 1 + 2k frames give
        # 1 + k. Consecutive chunks of 2k frames overlap by one frame, hence a 1-frame cache.
        if first:
            y = x[:, :, :1]
            if x.shape[2] >= 3:
                y = torch.cat([y, self.time_conv(x)], dim=2)
        else:
            y = self.time_conv(torch.cat([io.take(), x], dim=2))  # (B, C, 1 + T, H, W) → (B, C, T/2, H, W)
        io.put(x[:, :, -1:])
        return y

    def _time_upsample(self, x: Tensor, io: CacheIO, first: bool) -> Tensor:
        # Whole sequence: latent 0 passes through as one frame; the rest go through `time_conv` with zero history
        # (the reference marks the first call 'Rep' and never feeds frame 0 to time_conv), each giving 2 frames.
        b, c, _, h, w = x.shape
        if first:
            head, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2] == 0:
                io.put(head.new_zeros(b, c, CACHE_T, h, w))
                return head
        y = self.time_conv.forward_cached(x, io)  # (B, 2C, T, H, W)
        t = y.shape[2]
        y = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frames (t, half)
        return torch.cat([head, y], dim=2) if first else y


# ---------------------------------------------------------------------------------------------------------------------
# Encoder / decoder


class Encoder3d(nn.Module):
    """Pixels [B, 3, T, H, W] → [B, 2·z_dim, F, H/8, W/8] (mu and logvar)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "down3d" if cfg.temporal_downsample[i] else "down2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))  # fmt: skip
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: Tensor, io: CacheIO, first: bool) -> Tensor:
        x = self.conv1.forward_cached(x, io)
        for block in self.downsamples:
            x = block(x, io, first) if isinstance(block, Resample) else block(x, io)
        x = self.middle[0](x, io)
        x = self.middle[1](x)
        x = self.middle[2](x, io)
        return self.head[2].forward_cached(F.silu(self.head[0](x)), io)


class Decoder3d(nn.Module):
    """Latents [B, z_dim, F, h, w] → pixels [B, 3, 1 + 4(F-1) (first) or 4F (steady), 8h, 8w]."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))  # fmt: skip
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if i > 0:
                in_dim //= 2  # every upsampler halves the width (Conv2d(C, C/2))
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "up3d" if temporal_upsample[i] else "up2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, io: CacheIO, first: bool) -> Tensor:
        x = self.conv1.forward_cached(x, io)
        x = self.middle[0](x, io)
        x = self.middle[1](x)
        x = self.middle[2](x, io)
        for block in self.upsamples:
            x = block(x, io, first) if isinstance(block, Resample) else block(x, io)
        return self.head[2].forward_cached(F.silu(self.head[0](x)), io)


# ---------------------------------------------------------------------------------------------------------------------
# Model


class WanVAE(nn.Module):
    """The Wan2.1 VAE with functional streaming steps (module docstring); parameters named as in the checkpoint."""

    temporal_stride = 4  # pixel frames per latent after the first
    spatial_stride = 8

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.init_constants()

    @property
    def latent_channels(self) -> int:
        return self.cfg.z_dim

    def init_constants(self) -> None:
        """(Re)create the non-persistent latent statistics next to the weights (needed after a meta-device build)."""
        device = self.conv1.weight.device
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(WAN_LATENT_MEAN[: self.cfg.z_dim], device=device).view(shape)
        std = torch.tensor(WAN_LATENT_STD[: self.cfg.z_dim], device=device).view(shape)
        self.register_buffer("latent_mean", mean, persistent=False)
        self.register_buffer("latent_std", std, persistent=False)

    # -- encode ---------------------------------------------------------------------------------------------------

    def _encode(self, x: Tensor, io: CacheIO, first: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        mu = self.conv1(self.encoder(x, io, first))[:, : self.cfg.z_dim]  # (B, z, F, h, w); logvar unused
        z = (mu - self.latent_mean.to(mu.dtype)) / self.latent_std.to(mu.dtype)
        return z, io.finish()

    def encode_first(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Start a stream: pixels [B, 3, 1 + 4k, H, W] → latents [B, z, 1 + k, H/8, W/8] and the stream's caches."""
        if (x.shape[2] - 1) % self.temporal_stride:
            raise ValueError(f"first encode call needs 1 + 4k frames, got {x.shape[2]}")
        return self._encode(x, CacheIO(None), first=True)

    def encode_step(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Continue a stream: pixels [B, 3, 4k, H, W] → latents [B, z, k, H/8, W/8]; caches in, updated caches out."""
        if x.shape[2] % self.temporal_stride or x.shape[2] == 0:
            raise ValueError(f"encode step needs a positive multiple of 4 frames, got {x.shape[2]}")
        return self._encode(x, CacheIO(caches), first=False)

    def encode_video(self, x: Tensor) -> Tensor:
        """Whole clip in one pass (zero front padding, no chunking): [B, 3, 1 + 4k, H, W] → [B, z, 1 + k, h, w]."""
        return self.encode_first(x)[0]

    # -- decode ---------------------------------------------------------------------------------------------------

    def _decode(self, z: Tensor, io: CacheIO, first: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        z = z * self.latent_std.to(z.dtype) + self.latent_mean.to(z.dtype)
        x = self.decoder(self.conv2(z), io, first)
        return x.clamp(-1.0, 1.0), io.finish()

    def decode_first(self, z: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Start a stream: latents [B, z, F, h, w] → pixels [B, 3, 1 + 4(F-1), 8h, 8w] and the stream's caches."""
        return self._decode(z, CacheIO(None), first=True)

    def decode_step(self, z: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Continue a stream: latents [B, z, F, h, w] → pixels [B, 3, 4F, 8h, 8w]; caches in, updated caches out."""
        return self._decode(z, CacheIO(caches), first=False)

    def decode_video(self, z: Tensor) -> Tensor:
        """Whole clip in one pass: latents [B, z, F, h, w] → pixels [B, 3, 1 + 4(F-1), 8h, 8w]."""
        return self.decode_first(z)[0]


def build_wan_vae(name_or_cfg: str | WanVAEConfig = "wan") -> WanVAE:
    """A randomly initialised WanVAE for a preset name (`wan`, `lightvae`, `tiny`) or an explicit config."""
    cfg = WAN_VAE_CONFIGS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    return WanVAE(cfg)
