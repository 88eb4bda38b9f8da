"""Tiny autoencoders for the Wan2.1 latent space: TAEHV `taew2_1` and LightX2V `lighttaew2_1`.

Both share one architecture (madebyollin/taehv): per-frame 2D convs, `MemBlock`s that see the block's input at the
previous time step, `TPool` (merge 2 consecutive frames through a 1×1 conv) in the encoder and `TGrow` (split a frame
into 2 through a 1×1 conv) in the decoder. Keys are `encoder.N.*` / `decoder.N.*` with the reference's indices.

Latent spaces. `taew2_1` reads and writes the *normalised* Wan latents directly; `lighttaew2_1` works in the raw Wan
latent space, so `(z - mean) / std` is applied around it. Outside this module every VAE speaks normalised latents.

Streaming contract, made identical to the Wan VAE's:

* Encoder: each latent comes from a group of 4 frames. The first call gets frame 0 alone (optionally followed by
  4k frames): frame 0 is repeated 4× to form latent 0's group, so latent j ≥ 1 covers frames 4j-3..4j exactly as in
  the Wan VAE, and 1 + 4k frames give 1 + k latents. Later calls take 4k frames → k latents. For the usual stream
  (1 frame, then 4 at a time) this is what Scope's TAE wrapper computes (it end-pads every call to a multiple of 4 by
  repeating the last frame). For a 1 + 4 first call it differs on purpose: end padding would give groups
  (f0..f3), (f4, f4, f4, f4), shifted by 3 frames against Wan's latents and against the decoder's trim.
* Decoder: each latent gives 4 frames; the first call drops the first 3 (the reference's `frames_to_trim`), so F
  latents give 1 + 4(F-1) frames on the first call and 4F afterwards, matching the Wan VAE.

The only state across calls is each MemBlock's input from the previous frame: a fixed tuple of tensors
[B, C, H_l, W_l] (9 for the encoder, 9 for the decoder), zeros at stream start. Since chunks are 4-frame aligned, a
TPool never holds half a group across calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serve.models.vae import WAN_LATENT_MEAN, WAN_LATENT_STD


@dataclass(frozen=True)
class TAEConfig:
    """Widths of a TAEHV-style autoencoder (reference defaults for Wan 2.1: encoder 64, decoder 256/128/64/64)."""

    latent_channels: int = 16
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    raw_wan_latents: bool = False  # True for lighttaew2_1: apply the Wan mean/std around it


TAE_CONFIGS: dict[str, TAEConfig] = {
    "tae": TAEConfig(),  # taew2_1
    "lighttae": TAEConfig(raw_wan_latents=True),  # lighttaew2_1
    "tiny": TAEConfig(encoder_width=8, decoder_widths=(16, 16, 8, 8)),
    "tiny-light": TAEConfig(encoder_width=8, decoder_widths=(16, 16, 8, 8), raw_wan_latents=True),
}


def conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the decoder's input latents to (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv(cat[x_t, x_{t-1}]) + skip(x_t)): the only place information moves forward in time."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(n_in * 2, n_out), nn.ReLU(), conv3x3(n_out, n_out), nn.ReLU(), conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merge `stride` consecutive frames into one: channels of frames (t, t+1) are concatenated, then a 1×1 conv."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))  # (B·T, C, H, W) → (B·T/s, C, H, W)


class TGrow(nn.Module):
    """Split each frame into `stride` frames through a 1×1 conv (C → C·stride), in time order."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)  # (B·T, C·s, H, W) → (B·T·s, C, H, W)


def run_with_memory(
    blocks: nn.Sequential, x: Tensor, batch: int, past: Sequence[Tensor] | None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Apply `blocks` to frames x [B·T, C, H, W] (frame-major within each batch row), all frames at once.

    A MemBlock's memory for frame t is its own input at frame t-1; for the chunk's first frame it is `past[i]`
    (zeros when `past` is None: stream start). Returns the output frames and each MemBlock's last input frame.
    """
    new: list[Tensor] = []
    i = 0
    for block in blocks:
        if isinstance(block, MemBlock):
            nt, c, h, w = x.shape
            frames = x.reshape(batch, nt // batch, c, h, w)  # (B, T, C, H, W)
            prev = frames.new_zeros(batch, 1, c, h, w) if past is None else past[i].unsqueeze(1)
            memory = torch.cat([prev, frames[:, :-1]], 1).reshape(nt, c, h, w)  # input shifted by one frame
            new.append(frames[:, -1].clone())  # a copy: a view would keep the whole chunk alive
            i += 1
            x = block(x, memory)
        else:
            x = block(x)
    if past is not None and i != len(past):
        raise ValueError(f"step used {i} MemBlock caches but was given {len(past)}")
    return x, tuple(new)


class TAEHV(nn.Module):
    """TAEHV for Wan 2.1 latents with functional streaming steps matching `WanVAE` (module docstring)."""

    temporal_stride = 4
    spatial_stride = 8

    def __init__(self, cfg: TAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.encoder_width
        ts = [2 if d else 1 for d in cfg.encoder_time_downscale]
        self.encoder = nn.Sequential(
            conv3x3(3, e), nn.ReLU(),
            TPool(e, ts[0]), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            TPool(e, ts[1]), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            TPool(e, ts[2]), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            conv3x3(e, cfg.latent_channels),
        )  # fmt: skip
        n = cfg.decoder_widths
        tg = [2 if u else 1 for u in cfg.decoder_time_upscale]
        stages: list[nn.Module] = []
        for i in range(3):  # 3×MemBlock, nearest ×2, TGrow, conv to the next width (reference indices 3-8, 9-14, 15-20)
            stages += [MemBlock(n[i], n[i]), MemBlock(n[i], n[i]), MemBlock(n[i], n[i])]
            stages += [nn.Upsample(scale_factor=2), TGrow(n[i], tg[i]), conv3x3(n[i], n[i + 1], bias=False)]
        self.decoder = nn.Sequential(
            Clamp(), conv3x3(cfg.latent_channels, n[0]), nn.ReLU(), *stages, nn.ReLU(), conv3x3(n[3], 3)
        )
        self.t_downscale = ts[0] * ts[1] * ts[2]
        self.t_upscale = tg[0] * tg[1] * tg[2]
        if self.t_downscale != self.temporal_stride or self.t_upscale != self.temporal_stride:
            raise ValueError("the streaming contract assumes 4× temporal down- and upscaling")
        self.frames_to_trim = self.t_upscale - 1
        self.init_constants()

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    def init_constants(self) -> None:
        """(Re)create the non-persistent Wan latent statistics next to the weights (after a meta-device build)."""
        device = self.decoder[1].weight.device
        shape = (1, self.cfg.latent_channels, 1, 1, 1)
        mean = torch.tensor(WAN_LATENT_MEAN[: self.cfg.latent_channels], device=device).view(shape)
        std = torch.tensor(WAN_LATENT_STD[: self.cfg.latent_channels], device=device).view(shape)
        self.register_buffer("latent_mean", mean, persistent=False)
        self.register_buffer("latent_std", std, persistent=False)

    @staticmethod
    def remap_state_dict(state: dict[str, Tensor], expected: dict[str, torch.Size]) -> dict[str, Tensor]:
        """Reference `patch_tgrow_layers`: a TGrow trained with a larger stride keeps its last-time-step channels."""
        out = dict(state)
        for key, shape in expected.items():
            if ".conv." in key and key in out and key.startswith("decoder."):
                w = out[key]
                if w.ndim == 4 and w.shape[1:] == shape[1:] and w.shape[0] > shape[0] and w.shape[2:] == (1, 1):
                    out[key] = w[-shape[0] :]
        return out

    # -- encode ---------------------------------------------------------------------------------------------------

    def _encode(self, x: Tensor, past: Sequence[Tensor] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        b, c, t, h, w = x.shape
        frames = ((x + 1) / 2).transpose(1, 2).reshape(b * t, c, h, w)  # [-1,1] NCTHW → [0,1] (B·T, C, H, W)
        y, caches = run_with_memory(self.encoder, frames, b, past)
        y = y.reshape(b, t // self.t_downscale, *y.shape[1:]).transpose(1, 2)  # (B, z, F, h, w)
        if self.cfg.raw_wan_latents:
            y = (y - self.latent_mean.to(y.dtype)) / self.latent_std.to(y.dtype)
        return y, caches

    def encode_first(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Start a stream: pixels [B, 3, 1 + 4k, H, W] in [-1,1] → normalised latents [B, z, 1 + k, H/8, W/8]."""
        if (x.shape[2] - 1) % self.temporal_stride:
            raise ValueError(f"first encode call needs 1 + 4k frames, got {x.shape[2]}")
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.t_downscale - 1, -1, -1), x], dim=2)  # frame 0 fills group 0
        return self._encode(x, None)

    def encode_step(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Continue a stream: pixels [B, 3, 4k, H, W] → latents [B, z, k, H/8, W/8]; caches in, updated caches out."""
        if x.shape[2] % self.temporal_stride or x.shape[2] == 0:
            raise ValueError(f"encode step needs a positive multiple of 4 frames, got {x.shape[2]}")
        return self._encode(x, caches)

    def encode_video(self, x: Tensor) -> Tensor:
        """Whole clip in one pass: [B, 3, 1 + 4k, H, W] → [B, z, 1 + k, h, w]."""
        return self.encode_first(x)[0]

    # -- decode ---------------------------------------------------------------------------------------------------

    def _decode(self, z: Tensor, past: Sequence[Tensor] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        if self.cfg.raw_wan_latents:
            z = z * self.latent_std.to(z.dtype) + self.latent_mean.to(z.dtype)
        b, c, f, h, w = z.shape
        y, caches = run_with_memory(self.decoder, z.transpose(1, 2).reshape(b * f, c, h, w), b, past)
        y = y.reshape(b, f * self.t_upscale, *y.shape[1:]).transpose(1, 2)  # (B, 3, 4F, H, W)
        return y.clamp(0, 1) * 2 - 1, caches

    def decode_first(self, z: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Start a stream: latents [B, z, F, h, w] → pixels [B, 3, 1 + 4(F-1), 8h, 8w] in [-1,1]."""
        y, caches = self._decode(z, None)
        return y[:, :, self.frames_to_trim :], caches

    def decode_step(self, z: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Continue a stream: latents [B, z, F, h, w] → pixels [B, 3, 4F, 8h, 8w]; caches in, updated caches out."""
        return self._decode(z, caches)

    def decode_video(self, z: Tensor) -> Tensor:
        """Whole clip in one pass: latents [B, z, F, h, w] → pixels [B, 3, 1 + 4(F-1), 8h, 8w]."""
        return self.decode_first(z)[0]


def build_tae(name_or_cfg: str | TAEConfig = "tae") -> TAEHV:
    """A randomly initialised TAE for a preset name (`tae`, `lighttae`, `tiny`, `tiny-light`) or a config."""
    cfg = TAE_CONFIGS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    return TAEHV(cfg)
