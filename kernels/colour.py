"""Colour conversion between the codecs' YUV 4:2:0 and the model's RGB, on whatever device the frames are on.

Two steps of the frame path (DESIGN.md, "The frame path on a GPU"):
- in: Y, U, V planes of one decoded frame (I420 planes, or NV12's interleaved UV read as two strided views) →
  RGB, resized to the loaded resolution and normalised to the model's [-1, 1], in one pass;
- out: uint8 RGB `[H, W, 3]` → NV12 `[H + H/2, W]` (the Y plane, then the interleaved UV plane), what NVENC and
  libx264 take.

Each step has a pure-torch reference (any device, the oracle of the tests and the fallback) and a Triton kernel
(kernels/triton_colour.py) used on CUDA when Triton imports; where it cannot run, one log line says why.

Conventions, matching swscale (what `VideoFrame.to_ndarray("rgb24")` does) so the two frame paths agree:
- an untagged frame is BT.601 limited range (16-235 luma, 16-240 chroma); a frame's own colorspace / range tags win;
- chroma is upsampled by replication (each chroma sample covers its 2×2 luma block), as swscale's unscaled
  yuv420p→rgb24 converter does; the resize is bilinear (half-pixel centres, no antialias), after the conversion;
- on the way out, each chroma sample is the mean of its 2×2 block, converted with the same matrix and range the
  encoder writes into the stream's VUI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

# AVColorSpace / AVColorRange values (libavutil/pixfmt.h), read from av frames by the caller: kernels never import av.
AVCOL_SPC_BT709 = 1
AVCOL_SPC_BT470BG = 5
AVCOL_SPC_SMPTE170M = 6
AVCOL_SPC_BT2020_NCL = 9
AVCOL_RANGE_JPEG = 2  # full range; 0 (unspecified) and 1 (MPEG) are limited

LUMA_WEIGHTS = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}  # (Kr, Kb)


@dataclass(frozen=True)
class Colour:
    """A YUV encoding: which matrix, which range."""

    matrix: str = "bt601"
    full_range: bool = False

    @classmethod
    def of_frame(cls, colorspace: int, color_range: int) -> Colour:
        """From an av frame's tags; anything not BT.709 or BT.2020 is BT.601 (untagged included), as in swscale."""
        matrix = {AVCOL_SPC_BT709: "bt709", AVCOL_SPC_BT2020_NCL: "bt2020"}.get(colorspace, "bt601")
        return cls(matrix, color_range == AVCOL_RANGE_JPEG)

    @property
    def luma_offset(self) -> float:
        return 0.0 if self.full_range else 16.0

    @property
    def luma_gain(self) -> float:
        """255 / the luma excursion: 1 for full range, 255/219 for limited."""
        return 1.0 if self.full_range else 255.0 / 219.0

    @property
    def chroma_gain(self) -> float:
        return 1.0 if self.full_range else 255.0 / 224.0

    def to_rgb(self) -> tuple[float, float, float, float]:
        """(R←V, G←U, G←V, B←U) for offset-free, range-expanded Y′ and C: R = Y′ + a·V′, G = Y′ − b·U′ − c·V′, ..."""
        kr, kb = LUMA_WEIGHTS[self.matrix]
        kg = 1.0 - kr - kb
        return 2 * (1 - kr), 2 * kb * (1 - kb) / kg, 2 * kr * (1 - kr) / kg, 2 * (1 - kb)

    def from_rgb(self) -> tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]:
        """Rows of the RGB (0-255) → (Y, U, V) matrix, offsets not included; gains for the range folded in."""
        kr, kb = LUMA_WEIGHTS[self.matrix]
        kg = 1.0 - kr - kb
        ys, cs = 1 / self.luma_gain, 1 / self.chroma_gain
        luma = (kr * ys, kg * ys, kb * ys)
        u = (-kr / (2 * (1 - kb)) * cs, -kg / (2 * (1 - kb)) * cs, 0.5 * cs)
        v = (0.5 * cs, -kg / (2 * (1 - kr)) * cs, -kb / (2 * (1 - kr)) * cs)
        return luma, u, v


BT601_LIMITED = Colour()


# -- references (pure torch) ---------------------------------------------------------------------------------------


def yuv420_to_rgb_reference(y: Tensor, u: Tensor, v: Tensor, colour: Colour, height: int, width: int) -> Tensor:
    """uint8 planes y [h, w], u and v [ceil(h/2), ceil(w/2)] (any strides) → float32 [3, height, width] in [-1, 1]."""
    h, w = y.shape
    luma = (y.float() - colour.luma_offset) * colour.luma_gain
    # Replicate each chroma sample over its 2×2 block, cropped to the luma size (odd sizes have a half block).
    cb = (u.float() - 128.0) * colour.chroma_gain
    cr = (v.float() - 128.0) * colour.chroma_gain
    cb = cb.repeat_interleave(2, 0).repeat_interleave(2, 1)[:h, :w]
    cr = cr.repeat_interleave(2, 0).repeat_interleave(2, 1)[:h, :w]
    rv, gu, gv, bu = colour.to_rgb()
    rgb = torch.stack([luma + rv * cr, luma - gu * cb - gv * cr, luma + bu * cb]).clamp_(0.0, 255.0)  # [3, h, w]
    if (h, w) != (height, width):
        rgb = F.interpolate(rgb[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return rgb / 127.5 - 1.0


def rgb_to_nv12_reference(rgb: Tensor, colour: Colour = BT601_LIMITED) -> Tensor:
    """uint8 RGB [H, W, 3] (H, W even) → uint8 NV12 [H + H/2, W]: rows 0..H-1 are Y, the rest interleaved U, V."""
    height, width, _ = rgb.shape
    check_even(height, width)
    x = rgb.float()
    luma_row, u_row, v_row = (torch.tensor(row, dtype=torch.float32, device=rgb.device) for row in colour.from_rgb())
    luma = x @ luma_row + colour.luma_offset  # [H, W]
    block = x.reshape(height // 2, 2, width // 2, 2, 3).mean(dim=(1, 3))  # [H/2, W/2, 3]: the 2×2 means
    chroma = torch.stack([block @ u_row, block @ v_row], dim=-1) + 128.0  # [H/2, W/2, 2]
    out = torch.empty((height + height // 2, width), dtype=torch.uint8, device=rgb.device)
    # Rounding half up (floor(x + 0.5)), as the kernel does: the two then agree bit for bit.
    out[:height] = (luma + 0.5).floor_().clamp_(0, 255).to(torch.uint8)
    out[height:] = (chroma + 0.5).floor_().clamp_(0, 255).to(torch.uint8).reshape(height // 2, width)
    return out


def check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"NV12 needs an even frame size, got {width}×{height} (the loaded resolution should be)")


# -- dispatch ------------------------------------------------------------------------------------------------------

_said_why: set[str] = set()


def _triton_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on `device`; otherwise why not."""
    if device.type != "cuda":
        return f"frames are on {device.type}"  # tests run the kernels on a CPU through TRITON_INTERPRET=1 directly
    from kernels import triton_colour

    return triton_colour.unavailable_reason()


def use_triton(device: torch.device) -> bool:
    reason = _triton_reason(device)
    if reason is None:
        return True
    if device.type == "cuda" and reason not in _said_why:  # on a CPU the reference is simply the kernel
        _said_why.add(reason)
        log.warning("colour conversion: the torch reference runs instead of Triton (%s)", reason)
    return False


def yuv420_to_rgb(y: Tensor, u: Tensor, v: Tensor, colour: Colour, out: Tensor) -> Tensor:
    """Writes float32 [3, H, W] in [-1, 1] into `out` (a view is fine: one frame of a chunk's [1, 3, T, H, W])."""
    if use_triton(out.device):
        from kernels import triton_colour

        triton_colour.yuv420_to_rgb(y, u, v, colour, out)
    else:
        out.copy_(yuv420_to_rgb_reference(y, u, v, colour, out.shape[-2], out.shape[-1]))
    return out


def rgb_to_nv12(rgb: Tensor, colour: Colour = BT601_LIMITED) -> Tensor:
    """uint8 RGB [H, W, 3] → a new uint8 NV12 [H + H/2, W] on the same device."""
    if use_triton(rgb.device):
        from kernels import triton_colour

        return triton_colour.rgb_to_nv12(rgb, colour)
    return rgb_to_nv12_reference(rgb, colour)
