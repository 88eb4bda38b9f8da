"""One streaming interface over the four VAE choices (`vae_type: wan | lightvae | tae | lighttae`), and their loader.

Streaming contract (the same for every type; see vae.py and tae.py for how each model meets it):

    encode_chunk  first call after reset(): 1 + 4k pixel frames → 1 + k latents   (k = 0: frame 0 alone → 1 latent;
                                            StreamDiffusionV2's first call is 1 + 4 frames → 2 latents)
                  later calls:              4k pixel frames     → k latents       (4 → 1)
    decode_chunk  first call after reset(): F latents → 1 + 4(F-1) pixel frames   (latent 0 → 1 frame)
                  later calls:              F latents → 4F pixel frames           (one latent or a 3-latent chunk)

Pixels are [B, 3, T, H, W] in [-1, 1]; latents are [B, 16, F, H/8, W/8] in the normalised Wan latent space.
Encoder and decoder streams are independent (a T2V pipeline only decodes). `reset()` starts both anew.

`encode_video` / `decode_video` are the non-streaming whole-clip computations (the tests' oracles); they leave the
stream state alone, so `encode_video(one_frame)` also serves Krea's re-encode of a decoded frame as a standalone
first frame.

How each model meets the contract: the Wan VAE natively (frame 0 alone; the reference's 'Rep' first decode call).
TAE groups 4 frames per latent and its decoder emits 4 frames per latent: the first encode call repeats frame 0 to
fill latent 0's group, and the first decode call drops 3 frames (the reference's trim), so the counts and the
frame ↔ latent alignment are the same as Wan's.

Export: `ChunkStep` wraps a model's steady-state step as `forward(x, *caches) -> (y, *new_caches)` with static
shapes, for torch.export / ONNX / TensorRT (issue 4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from serve.models.checkpoint import check_keys, read_state_dict
from serve.models.tae import TAE_CONFIGS, TAEHV
from serve.models.vae import WAN_VAE_CONFIGS, WanVAE

logger = logging.getLogger(__name__)

VaeType = Literal["wan", "lightvae", "tae", "lighttae"]
VAE_TYPES: tuple[str, ...] = ("wan", "lightvae", "tae", "lighttae")


class StreamingModel(Protocol):
    """What WanVAE and TAEHV both provide: functional first/steady steps with explicit cache tuples."""

    temporal_stride: int
    spatial_stride: int

    @property
    def latent_channels(self) -> int: ...
    def encode_first(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]: ...
    def encode_step(self, x: Tensor, caches: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]: ...
    def encode_video(self, x: Tensor) -> Tensor: ...
    def decode_first(self, z: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]: ...
    def decode_step(self, z: Tensor, caches: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]: ...
    def decode_video(self, z: Tensor) -> Tensor: ...


Caches = tuple[Tensor, ...]
ChunkStepFn = Callable[[Tensor, Caches], tuple[Tensor, Caches]]
"""A steady-state step, `(x, caches) -> (y, new_caches)`: the model's own, or an engine (serve/runtime/vae_steps.py)."""


class StreamingAutoencoder:
    """Owns one stream's encoder and decoder caches around a model's functional steps (contract: module docstring).

    `encode_step` / `decode_step` run the steady-state calls (default: the model's own, eager); the first call of
    each stream always runs the model's `encode_first` / `decode_first`, whose shapes differ (frame 0 alone).
    """

    def __init__(
        self,
        model: nn.Module,
        vae_type: str,
        encode_step: ChunkStepFn | None = None,
        decode_step: ChunkStepFn | None = None,
    ) -> None:
        self.model = model
        self.vae_type = vae_type
        self.encode_step: ChunkStepFn = encode_step or model.encode_step  # type: ignore[assignment]
        self.decode_step: ChunkStepFn = decode_step or model.decode_step  # type: ignore[assignment]
        # The model's own steady steps take one latent's worth per call: a chunk's output is the same (the
        # contract's streaming equality) at about half the activation peak of a 3-latent call (7.0 → 3.9 GB for
        # the Wan VAE's fp32 decode at 512², benchmarks/RESULTS.md "VRAM plan"). An engine runs the chunk it was
        # built for.
        self._encode_per_latent = encode_step is None
        self._decode_per_latent = decode_step is None
        self.latent_channels: int = model.latent_channels
        self.temporal_stride: int = model.temporal_stride  # pixel frames per latent after the first
        self.spatial_stride: int = model.spatial_stride
        self.first_frame_alone = True  # the first call maps pixel frame 0 alone to latent 0 (and back)
        self._enc_caches: tuple[Tensor, ...] | None = None
        self._dec_caches: tuple[Tensor, ...] | None = None
        self._geometry: dict[str, tuple[int, ...]] = {}  # (B, H, W) each stream started with: caches depend on it

    def reset(self) -> None:
        """Start new encoder and decoder streams (the next calls are `first` calls)."""
        self._enc_caches = None
        self._dec_caches = None

    def num_latents(self, num_frames: int, first: bool) -> int:
        """Latents produced by an encode call of `num_frames` pixel frames."""
        return 1 + (num_frames - 1) // self.temporal_stride if first else num_frames // self.temporal_stride

    def num_frames(self, num_latents: int, first: bool) -> int:
        """Pixel frames produced by a decode call of `num_latents` latents."""
        return 1 + self.temporal_stride * (num_latents - 1) if first else self.temporal_stride * num_latents

    @property
    def encoder_started(self) -> bool:
        return self._enc_caches is not None

    @property
    def decoder_started(self) -> bool:
        return self._dec_caches is not None

    @property
    def encoder_caches(self) -> Caches | None:
        """The encoder stream's state (None before its first call); an engine's may be buffers its next call
        overwrites, so a caller that keeps them copies them."""
        return self._enc_caches

    def _check(self, x: Tensor, channels: int, what: str, first: bool) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, T, H, W], got {tuple(x.shape)}")
        if what == "pixels" and (x.shape[3] % self.spatial_stride or x.shape[4] % self.spatial_stride):
            raise ValueError(f"pixel height and width must be multiples of {self.spatial_stride}, got {tuple(x.shape)}")
        geometry = (x.shape[0], x.shape[3], x.shape[4])
        if first:
            self._geometry[what] = geometry
        elif geometry != self._geometry[what]:
            started = self._geometry[what]
            raise ValueError(f"{what} (B, H, W) = {geometry} but the stream started with {started}: reset() first")

    @staticmethod
    def _hand_over(caches: Caches | None) -> tuple[list[Tensor], None]:
        """The stream's caches as a list the step consumes (vae.py `CacheIO`): each old cache is freed as soon as
        its replacement exists. The stream holds none while the step runs; a failed step ends the stream anyway."""
        assert caches is not None
        return list(caches), None

    @torch.no_grad()
    def encode_chunk(self, pixels: Tensor) -> Tensor:
        """[B, 3, T, H, W] in [-1,1] → [B, 16, F, H/8, W/8]; T = 1 + 4k on the first call, 4k afterwards."""
        self._check(pixels, 3, "pixels", first=self._enc_caches is None)
        if self._enc_caches is None:
            z, self._enc_caches = self.model.encode_first(pixels)
            return z
        stride = self.temporal_stride if self._encode_per_latent else pixels.shape[2]
        parts = []
        for start in range(0, pixels.shape[2], stride):
            caches, self._enc_caches = self._hand_over(self._enc_caches)
            z, self._enc_caches = self.encode_step(pixels[:, :, start : start + stride], caches)
            parts.append(z)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    @torch.no_grad()
    def decode_chunk(self, latents: Tensor) -> Tensor:
        """[B, 16, F, h, w] → [B, 3, T, 8h, 8w] in [-1,1]; T = 1 + 4(F-1) on the first call, 4F afterwards."""
        self._check(latents, self.latent_channels, "latents", first=self._dec_caches is None)
        if self._dec_caches is None:
            x, self._dec_caches = self.model.decode_first(latents)
            return x
        stride = 1 if self._decode_per_latent else latents.shape[2]
        parts = []
        for start in range(0, latents.shape[2], stride):
            caches, self._dec_caches = self._hand_over(self._dec_caches)
            x, self._dec_caches = self.decode_step(latents[:, :, start : start + stride], caches)
            parts.append(x)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    @torch.no_grad()
    def encode_video(self, pixels: Tensor) -> Tensor:
        """Whole clip [B, 3, 1 + 4k, H, W] → [B, 16, 1 + k, h, w] in one pass; stream state untouched."""
        return self.model.encode_video(pixels)

    @torch.no_grad()
    def decode_video(self, latents: Tensor) -> Tensor:
        """Whole clip [B, 16, F, h, w] → [B, 3, 1 + 4(F-1), 8h, 8w] in one pass; stream state untouched."""
        return self.model.decode_video(latents)


class HalfElsewhere(nn.Module):
    """Stands in for the half of a VAE that runs on another pipeline stage, whose weights are not held here: calling
    it says so instead of computing with a missing module."""

    def __init__(self, half: str, where: str) -> None:
        super().__init__()
        self.half, self.where = half, where

    def _refuse(self) -> RuntimeError:
        return RuntimeError(f"this VAE's {self.half} runs on {self.where}; its weights are not loaded here")

    def forward(self, *args: object) -> Tensor:
        raise self._refuse()

    def __iter__(self) -> Iterator[nn.Module]:  # TAEHV runs its halves block by block, and indexes them
        raise self._refuse()

    def __getitem__(self, index: int) -> nn.Module:
        raise self._refuse()


def drop_half(model: nn.Module, half: Literal["encoder", "decoder"], where: str) -> None:
    """Free a VAE's encoder or decoder (Wan's and TAEHV's halves are `model.encoder` / `model.decoder`): a pipeline
    stage that only encodes, or only decodes, holds only that half's weights."""
    setattr(model, half, HalfElsewhere(half, where))


def to_uint8_frames(video: Tensor) -> Tensor:
    """Decoded pixels [1, 3, T, H, W] (clamped to [-1, 1] here) → uint8 frames [T, H, W, 3], on their device."""
    return ((video.clamp(-1, 1)[0].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8)


class ChunkStep(nn.Module):
    """A steady-state chunk step with flat tensor inputs and outputs, for torch.export / ONNX / TensorRT.

    `forward(x, *caches) -> (y, *new_caches)`; every shape is fixed by (batch, height, width, chunk length), and the
    caches come from the stream's first call (`model.encode_first` / `model.decode_first`). The first call itself is
    a separate, small graph (1 frame / 1 latent) or can stay eager.
    """

    def __init__(self, model: nn.Module, direction: Literal["encode", "decode"]) -> None:
        super().__init__()
        if direction not in ("encode", "decode"):
            raise ValueError(f"direction must be 'encode' or 'decode', got {direction!r}")
        self.model = model
        self.direction = direction

    def forward(self, x: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        step = self.model.encode_step if self.direction == "encode" else self.model.decode_step
        y, new_caches = step(x, caches)
        return (y, *new_caches)


# ---------------------------------------------------------------------------------------------------------------------
# Construction and loading


def build_model(vae_type: str, size: str | None = None) -> nn.Module:
    """The module for a vae_type; `size="tiny"` gives the test config with the same key names."""
    if vae_type not in VAE_TYPES:
        raise ValueError(f"unknown vae_type {vae_type!r}; expected one of {VAE_TYPES}")
    if vae_type in ("wan", "lightvae"):
        return WanVAE(WAN_VAE_CONFIGS["tiny" if size == "tiny" else vae_type])
    name = vae_type if size != "tiny" else ("tiny-light" if vae_type == "lighttae" else "tiny")
    return TAEHV(TAE_CONFIGS[name])


def make_vae(
    vae_type: str,
    path: str | Path | None = None,
    *,
    size: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> StreamingAutoencoder:
    """A streaming autoencoder: weights from `path` (strictly checked), or seeded random weights when None."""
    if path is not None:
        model = load_vae(path, vae_type, dtype=dtype, device=device, size=size)
    elif torch.device(device).type == "meta":  # the real-size dry run: shapes only, nothing built on the host
        with torch.device("meta"):
            model = build_model(vae_type, size)
        model = model.to(dtype=dtype).eval().requires_grad_(False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(vae_type, size)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StreamingAutoencoder(model, vae_type)


def load_vae(
    path: str | Path,
    vae_type: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    size: str | None = None,
) -> nn.Module:
    """Build the vae_type's model on the meta device and fill it from `path` after a strict key/shape check.

    Tensors go straight to `device`/`dtype` (`assign=True`: no randomly initialised second copy).
    """
    with torch.device("meta"):
        model = build_model(vae_type, size)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_state_dict(path)
    if isinstance(model, TAEHV):
        state = TAEHV.remap_state_dict(state, expected)
    check_keys(model.state_dict(), state, path)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.init_constants()
    model = model.to(device=device, dtype=dtype)
    logger.info("vae loaded type=%s path=%s tensors=%d dtype=%s", vae_type, path, len(state), dtype)
    return model.eval().requires_grad_(False)
