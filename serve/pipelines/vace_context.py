"""Each chunk's VACE context: the fixed-shape [1, 96, F, h, w] input of `VaceWanDiT.step_vace` (serve/models/vace.py),
one context frame per latent frame of the chunk, built from what the session sent (vace.md §3).

Channels per frame: 16 inactive latent | 16 reactive latent | 64 mask (the 8×8 pixel-unshuffled mask; 1 = generate,
0 = keep). What fills frame i:

- input video (`vace_use_input_video`, the default with VACE on, video mode): the camera frames are the control,
  mask 1 everywhere, so inactive = VAE(frames·0) and reactive = VAE(frames), each through its own streaming VAE
  caches (separate from the noisy-latent path's, and from each other: TAE's memory would leak between them). The
  latents then start from noise; the camera does not enter them. VAE(frames·0) does not depend on the camera, so
  the load encodes its stream once (`ZeroVideoLatents`) and chunks read it: one VAE encode per chunk, not two.
- reference images (`vace_ref_images`, R2V): each is cropped to fill the loaded resolution (no letterbox), encoded
  alone as one latent, and takes a frame of its own as `[16 ref | 80 zeros]` (Scope's R2V layout): ref k on frame
  k, at most F of them (StreamDiffusionV2's 1-frame chunks take the first only). Frames without a ref keep their
  input-video context, or zeros.
- first / last frame (`first_frame_image` / `last_frame_image`, FFLF): the image is encoded alone and kept
  (mask 0) on the chunk's first / last latent frame: `[16 image | 16 VAE(gray) | 64 zeros]`; the chunk's other
  frames are generated (mask 1) from their input video, or from VAE(gray) when there is none. An FFLF image wins
  its frame over a ref.

Where this deviates from Scope, and why:
- Alignment. Scope prepends refs to the conditioning frames and lets block 0 cut the context to the chunk's length,
  so with refs and video each latent frame gets the previous frame's control and the last is dropped, and its first
  chunk cuts 4 latents to 3. Here every frame's context is built at its own index, and the first chunk's control is
  encoded from the same trailing 1 + 4(F−1) camera frames as the V2V path, giving exactly F latents.
- Multiple refs: Scope stacks them in time and encodes them as one video (2-4 refs make one latent); here each ref
  is its own latent on its own frame.
- How long a reference holds. Scope's are one-shot (one chunk, then only what the KV cache keeps of it), so a
  reference fades within a few chunks; a user who sends one expects it to hold. Here `vace_ref_images` conditions
  every chunk until a new list (or `[]`) replaces it; each file is encoded once (cached by path and modification
  time). FFLF images stay one-shot (the worker hands them to exactly one chunk, serve/pipelines/worker.py): a first
  or last frame is a boundary of one chunk. `vace_context_scale` and the input video apply to every chunk.
- A reference that cannot be decoded (or holds over 25 megapixels, serve/assets.py) is logged once and skipped; the
  stream goes on. Uploads are checked the same way, so only a file put in the folder by hand gets this far.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from serve.assets import opened_image
from serve.errors import UnsupportedMedia
from serve.models.autoencoder import ChunkStepFn, StreamingAutoencoder
from serve.models.vace import VACE_IN_DIM
from serve.schemas import MAX_REF_IMAGES

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16
# How far `ZeroVideoLatents` follows a stream of zeros for its encoder's caches to settle. How soon they do depends on
# the encoder's depth, not its widths or weights: the Wan VAE's repeat from the 29th one-latent chunk (the 11th of
# three latents), TAE's from the 5th three-latent chunk.
ZERO_VIDEO_MAX_FRAMES = 256
# Encoded images kept per stream (and the files that failed to decode, as None): every reference a session may
# send, a first and a last frame, so a chunk never decodes an image the stream has seen.
CACHED_IMAGES = MAX_REF_IMAGES + 2


@dataclass(frozen=True)
class ChunkVace:
    """One chunk's VACE inputs, as `step_vace` takes them."""

    context: Tensor  # [1, 96, F, h, w]
    scale: Tensor  # 0-d, on the device
    uses_input_video: bool  # the camera went into the context, so the latents start from noise


def read_image(path: str | Path, height: int, width: int) -> np.ndarray:
    """An image file as [height, width, 3] uint8, centre-cropped to the target's shape and scaled to fill (Scope's R2V
    fit); ValueError when it does not decode or is too large (serve/assets.py `opened_image`). The crop comes first,
    so a 1×60000 strip costs its own pixels, not a 64×3840000 upscale. PyAV is imported here: the model side runs
    without the media stack (make gpu-check)."""
    import av

    try:
        with opened_image(Path(path)) as container:  # its probe's decode checked the size; this one reads it
            frame = next(container.decode(video=0))
    except UnsupportedMedia as exc:
        raise ValueError(str(exc)) from None
    except av.error.FFmpegError as exc:
        raise ValueError(f"not a decodable image ({exc})") from None
    src_h, src_w = frame.height, frame.width
    crop_h, crop_w = (
        min(src_h, max(1, round(src_w * height / width))),
        min(src_w, max(1, round(src_h * width / height))),
    )
    top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
    rgb = frame.to_ndarray(format="rgb24")[top : top + crop_h, left : left + crop_w]
    cropped = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return cropped.reformat(width=width, height=height).to_ndarray()


def first_call_frames(vae: StreamingAutoencoder, pixels: Tensor, chunk_latents: int) -> Tensor:
    """The frames an encode call of `vae` takes: a stream's first call takes frame 0 alone for latent 0, so of a
    chunk's 4F frames it encodes the trailing 1 + 4(F−1); later calls take all 4F."""
    return pixels if vae.encoder_started else pixels[:, :, -(1 + 4 * (chunk_latents - 1)) :]


class ZeroVideoLatents:
    """The inactive latents of the input-video context, VAE(frames·0), chunk by chunk from a stream's start.

    With the camera as the control the mask is 1 everywhere, so the inactive frames are zeros whatever the camera
    sends, and every stream encodes the same sequence. Once a stream of zeros is longer than the encoder's causal
    reach, its caches stop changing, and so do its latents. `encode` follows one such stream at load until its
    caches repeat; a chunk then reads its latents here instead of running a second encode beside the camera's.
    The values are the live stream's own: the same step, shapes and order.
    """

    def __init__(self, latents: list[Tensor]) -> None:
        self.latents = latents  # chunk c's is latents[c]; from the last on, every chunk's is the last

    def chunk(self, index: int) -> Tensor:
        return self.latents[min(index, len(self.latents) - 1)]

    @classmethod
    @torch.no_grad()
    def encode(cls, vae_model: torch.nn.Module, vae_type: str, height: int, width: int, chunk_latents: int,
               device: torch.device, encode_step: ChunkStepFn | None = None,
               max_frames: int = ZERO_VIDEO_MAX_FRAMES) -> ZeroVideoLatents | None:  # fmt: skip
        """The sequence, or None when the caches did not settle within `max_frames` (streams then encode it)."""
        stream = StreamingAutoencoder(vae_model, vae_type, encode_step)
        zeros = torch.zeros(1, 3, 4 * chunk_latents, height, width, device=device)  # float32, as the camera's pixels
        latents: list[Tensor] = []
        before: list[Tensor] | None = None
        for _ in range(max_frames // (4 * chunk_latents)):
            # Copies: an engine's outputs may be buffers its next call writes.
            latents.append(stream.encode_chunk(first_call_frames(stream, zeros, chunk_latents)).clone())
            caches = stream.encoder_caches
            assert caches is not None
            if before is not None and all(torch.equal(a, b) for a, b in zip(caches, before, strict=True)):
                return cls(latents)
            before = [cache.clone() for cache in caches]
        log.warning("VACE: the VAE's encoder state on zero frames did not settle within %d frames; each chunk "
                    "encodes the inactive frames", max_frames)  # fmt: skip
        return None


class VaceConditioner:
    """Per stream: the input-video VAE streams, the encoded images, and the scale tensor."""

    def __init__(self, vae_model: torch.nn.Module, vae_type: str, height: int, width: int, chunk_latents: int,
                 device: torch.device, encode_step: ChunkStepFn | None = None,
                 zero_video: ZeroVideoLatents | None = None) -> None:  # fmt: skip
        self.vae_model = vae_model
        self.inactive = StreamingAutoencoder(vae_model, vae_type, encode_step)  # used when `zero_video` is None
        self.reactive = StreamingAutoencoder(vae_model, vae_type, encode_step)
        self.zero_video = zero_video
        self.video_chunks = 0  # chunks whose context took the input video since the reset
        self.height, self.width = height, width
        self.chunk_latents = chunk_latents
        self.device = device
        self.scale = torch.ones((), device=device)
        self._images: OrderedDict[tuple[str, int], Tensor | None] = OrderedDict()
        self._gray: Tensor | None = None
        self._said_too_many: tuple[int, int] | None = None  # (refs, free frames) last warned of

    def reset(self) -> None:
        self.inactive.reset()
        self.reactive.reset()
        self.video_chunks = 0

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def _encode_still(self, pixels: Tensor) -> Tensor:
        """[1, 3, H, W] in [-1, 1] → [1, 16, h, w]: one frame encoded alone (no stream state)."""
        dtype = next(self.vae_model.parameters()).dtype
        return self.vae_model.encode_video(pixels[:, :, None].to(dtype))[:, :, 0].float()

    def encode_image(self, field: str, path: str) -> Tensor | None:
        """[1, 16, h, w] latent of an image file, or None when it does not decode (logged once); cached by path and
        modification time."""
        try:
            modified = Path(path).stat().st_mtime_ns
        except OSError:
            modified = -1  # gone: `_read` says so, once, like any file that does not decode
        key = (path, modified)
        if key not in self._images:
            self._images[key] = self._read(field, path)
            while len(self._images) > CACHED_IMAGES:
                self._images.popitem(last=False)
        self._images.move_to_end(key)
        return self._images[key]

    def _read(self, field: str, path: str) -> Tensor | None:
        try:
            rgb = read_image(path, self.height, self.width)
        except (OSError, StopIteration, ValueError) as exc:
            log.error("%s: %s cannot be decoded (%s): skipped", field, Path(path).name, exc)
            return None
        pixels = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1
        return self._encode_still(pixels)

    def gray(self) -> Tensor:
        """VAE(0): the latent of an all-zero (mid-gray) frame, what `frames·m` encodes to where nothing is given."""
        if self._gray is None:
            self._gray = self._encode_still(torch.zeros(1, 3, self.height, self.width, device=self.device))
        return self._gray

    def chunk(self, pixels: Tensor | None, params: dict[str, Any]) -> ChunkVace | None:
        """This chunk's context, or None when the session gave VACE nothing for it (the base step runs).

        `pixels`: the chunk's camera frames [1, 3, 4F, H, W] in [-1, 1], or None in text mode.
        """
        if params.get("vace_enabled") is False:
            return None
        frames = self.chunk_latents
        use_video = pixels is not None and params.get("vace_use_input_video", True) is not False
        encoded = (self.encode_image("vace_ref_images", path) for path in params.get("vace_ref_images") or ())
        refs = [ref for ref in encoded if ref is not None]
        fflf = {}
        for index, field in ((0, "first_frame_image"), (frames - 1, "last_frame_image")):
            if params.get(field) and index not in fflf:
                image = self.encode_image(field, params[field])
                if image is not None:
                    fflf[index] = image
        if not (use_video or refs or fflf):
            return None

        context = torch.zeros(1, VACE_IN_DIM, frames, *self.latent_shape, device=self.device)
        if use_video:
            assert pixels is not None
            if self.zero_video is not None:
                context[:, :LATENT_CHANNELS] = self.zero_video.chunk(self.video_chunks)
            else:
                inactive = first_call_frames(self.inactive, torch.zeros_like(pixels), frames)
                context[:, :LATENT_CHANNELS] = self.inactive.encode_chunk(inactive)
            reactive = first_call_frames(self.reactive, pixels, frames)
            context[:, LATENT_CHANNELS : 2 * LATENT_CHANNELS] = self.reactive.encode_chunk(reactive)
            self.video_chunks += 1
            context[:, 2 * LATENT_CHANNELS :] = 1.0
        elif fflf:  # FFLF without video: the frames between the kept ones are generated from gray
            context[:, : 2 * LATENT_CHANNELS] = self.gray()[:, :, None].repeat(1, 2, frames, 1, 1)
            context[:, 2 * LATENT_CHANNELS :] = 1.0
        free = [f for f in range(frames) if f not in fflf]
        if len(refs) > len(free) and (len(refs), len(free)) != self._said_too_many:  # once, not every chunk
            self._said_too_many = (len(refs), len(free))
            log.warning("vace_ref_images: %d refs for %d free latent frames; using the first %d", len(refs),
                        len(free), len(free))  # fmt: skip
        for frame, ref in zip(free, refs, strict=False):
            context[:, :, frame] = 0.0
            context[:, :LATENT_CHANNELS, frame] = ref
        for frame, image in fflf.items():
            context[:, :LATENT_CHANNELS, frame] = image
            context[:, LATENT_CHANNELS : 2 * LATENT_CHANNELS, frame] = self.gray()
            context[:, 2 * LATENT_CHANNELS :, frame] = 0.0
        self.scale.fill_(float(params.get("vace_context_scale", 1.0)))
        return ChunkVace(context, self.scale, use_video)
