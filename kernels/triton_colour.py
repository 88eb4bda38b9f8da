"""Triton kernels of kernels/colour.py's two steps; kernels/colour.py holds their torch references and the dispatch.

The kernels are compiled on first use, not at import, because Triton decides at `triton.jit` time whether it
interprets (TRITON_INTERPRET=1, how the tests run them on CPU tensors) or compiles for the GPU: `build()` makes a
fresh set under the current environment, `kernels()` caches one for the process.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import Tensor

from kernels.colour import Colour, check_even

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # CPU installs without the dev extra; CUDA torch brings Triton along
    triton = tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"triton is not importable: {exc}"

BLOCK = 256  # output pixels (or chroma sites) per program


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR


def _yuv420_to_rgb(
    y_ptr, u_ptr, v_ptr, out_ptr,
    y_row, u_row, u_col, v_row, v_col, out_chan, out_row,
    src_h, src_w, dst_h, dst_w, scale_h, scale_w,
    luma_offset, luma_gain, chroma_gain, rv, gu, gv, bu,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # One output pixel per lane: bilinear over its four source pixels, each converted to RGB (with its chroma sample
    # replicated from the 2×2 block) and clamped before weighting, exactly as the reference converts then resizes.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dst_h * dst_w
    oy = offs // dst_w
    ox = offs % dst_w
    sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)  # half-pixel centres, as F.interpolate
    sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
    y0 = sy.to(tl.int32)  # floor: sy >= 0
    x0 = sx.to(tl.int32)
    y1 = tl.minimum(y0 + 1, src_h - 1)
    x1 = tl.minimum(x0 + 1, src_w - 1)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    r = tl.zeros((BLOCK,), tl.float32)
    g = tl.zeros((BLOCK,), tl.float32)
    b = tl.zeros((BLOCK,), tl.float32)
    for dy in tl.static_range(2):
        yy = y0 + dy * (y1 - y0)
        wy = (1.0 - ly) + dy * (2.0 * ly - 1.0)  # dy = 0: 1 − ly; dy = 1: ly
        for dx in tl.static_range(2):
            xx = x0 + dx * (x1 - x0)
            wx = (1.0 - lx) + dx * (2.0 * lx - 1.0)
            luma = tl.load(y_ptr + yy * y_row + xx, mask=mask, other=16).to(tl.float32)
            cb = tl.load(u_ptr + (yy // 2) * u_row + (xx // 2) * u_col, mask=mask, other=128).to(tl.float32)
            cr = tl.load(v_ptr + (yy // 2) * v_row + (xx // 2) * v_col, mask=mask, other=128).to(tl.float32)
            luma = (luma - luma_offset) * luma_gain
            cb = (cb - 128.0) * chroma_gain
            cr = (cr - 128.0) * chroma_gain
            weight = wy * wx
            r += weight * tl.minimum(tl.maximum(luma + rv * cr, 0.0), 255.0)
            g += weight * tl.minimum(tl.maximum(luma - gu * cb - gv * cr, 0.0), 255.0)
            b += weight * tl.minimum(tl.maximum(luma + bu * cb, 0.0), 255.0)
    base = out_ptr + oy * out_row + ox
    tl.store(base, r / 127.5 - 1.0, mask=mask)
    tl.store(base + out_chan, g / 127.5 - 1.0, mask=mask)
    tl.store(base + 2 * out_chan, b / 127.5 - 1.0, mask=mask)


def _rgb_to_nv12(
    rgb_ptr, out_ptr, rgb_row, rgb_col, rgb_chan, out_row, height, width,
    y_r, y_g, y_b, u_r, u_g, u_b, v_r, v_g, v_b, luma_offset,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # One chroma site per lane: its 2×2 luma pixels, and the U, V of their mean.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    half_w = width // 2
    mask = offs < (height // 2) * half_w
    cy = offs // half_w
    cx = offs % half_w
    sum_r = tl.zeros((BLOCK,), tl.float32)
    sum_g = tl.zeros((BLOCK,), tl.float32)
    sum_b = tl.zeros((BLOCK,), tl.float32)
    for dy in tl.static_range(2):
        for dx in tl.static_range(2):
            py = 2 * cy + dy
            px = 2 * cx + dx
            pixel = rgb_ptr + py * rgb_row + px * rgb_col
            red = tl.load(pixel, mask=mask, other=0).to(tl.float32)
            green = tl.load(pixel + rgb_chan, mask=mask, other=0).to(tl.float32)
            blue = tl.load(pixel + 2 * rgb_chan, mask=mask, other=0).to(tl.float32)
            luma = tl.floor(y_r * red + y_g * green + y_b * blue + luma_offset + 0.5)
            tl.store(out_ptr + py * out_row + px, tl.minimum(tl.maximum(luma, 0.0), 255.0).to(tl.uint8), mask=mask)
            sum_r += red
            sum_g += green
            sum_b += blue
    sum_r *= 0.25
    sum_g *= 0.25
    sum_b *= 0.25
    u = tl.floor(u_r * sum_r + u_g * sum_g + u_b * sum_b + 128.5)
    v = tl.floor(v_r * sum_r + v_g * sum_g + v_b * sum_b + 128.5)
    chroma = out_ptr + (height + cy) * out_row + 2 * cx
    tl.store(chroma, tl.minimum(tl.maximum(u, 0.0), 255.0).to(tl.uint8), mask=mask)
    tl.store(chroma + 1, tl.minimum(tl.maximum(v, 0.0), 255.0).to(tl.uint8), mask=mask)


def build() -> SimpleNamespace:
    """The kernels, jitted now (so under the TRITON_INTERPRET the environment has now)."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    return SimpleNamespace(yuv420_to_rgb=triton.jit(_yuv420_to_rgb), rgb_to_nv12=triton.jit(_rgb_to_nv12))


@functools.cache
def kernels() -> SimpleNamespace:
    return build()


def yuv420_to_rgb(y: Tensor, u: Tensor, v: Tensor, colour: Colour, out: Tensor, built: SimpleNamespace | None = None):
    """As kernels/colour.py's reference, into `out` [3, H, W] float32 (its rows contiguous); planes may be strided
    views (NV12's UV plane read as u = uv[:, 0::2], v = uv[:, 1::2]) but their columns step by whole elements."""
    assert y.stride(1) == 1 and out.stride(-1) == 1 and out.dtype == torch.float32, "rows must be contiguous"
    src_h, src_w = y.shape
    dst_h, dst_w = out.shape[-2:]
    rv, gu, gv, bu = colour.to_rgb()
    grid = (triton.cdiv(dst_h * dst_w, BLOCK),)
    (built or kernels()).yuv420_to_rgb[grid](
        y, u, v, out,
        y.stride(0), u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(-3), out.stride(-2),
        src_h, src_w, dst_h, dst_w, src_h / dst_h, src_w / dst_w,
        colour.luma_offset, colour.luma_gain, colour.chroma_gain, rv, gu, gv, bu,
        BLOCK=BLOCK,
    )  # fmt: skip
    return out


def rgb_to_nv12(rgb: Tensor, colour: Colour, built: SimpleNamespace | None = None) -> Tensor:
    """uint8 RGB [H, W, 3] (any strides) → a new uint8 NV12 [H + H/2, W]."""
    height, width, _ = rgb.shape
    check_even(height, width)
    out = torch.empty((height + height // 2, width), dtype=torch.uint8, device=rgb.device)
    (yr, yg, yb), (ur, ug, ub), (vr, vg, vb) = colour.from_rgb()
    grid = (triton.cdiv((height // 2) * (width // 2), BLOCK),)
    (built or kernels()).rgb_to_nv12[grid](
        rgb, out, rgb.stride(0), rgb.stride(1), rgb.stride(2), out.stride(0), height, width,
        yr, yg, yb, ur, ug, ub, vr, vg, vb, colour.luma_offset,
        BLOCK=BLOCK,
    )  # fmt: skip
    return out
