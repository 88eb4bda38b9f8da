"""The Triton kernel of kernels/rope.py; kernels/rope.py holds its torch reference and the dispatch.

Compiled on first use, not at import, for the reason kernels/triton_colour.py gives (TRITON_INTERPRET is read at
`triton.jit` time): `build()` makes it under the current environment, `kernels()` caches one for the process.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # CPU installs without the dev extra; CUDA torch brings Triton along
    triton = tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"triton is not importable: {exc}"

MAX_HEADS_PER_PROGRAM = 8  # × hd 128: 1024 values a program, a few per thread


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR


def _rope(
    x_ptr, cos_ptr, sin_ptr, out_ptr, tokens, heads, table_batch_stride,
    PAIRS: tl.constexpr, BLOCK_PAIRS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    # One token (of one batch row) and a group of its heads per program: the token's cos/sin are loaded once and
    # serve every head of the group. The arithmetic is the reference's, term for term, in fp32.
    row = tl.program_id(0).to(tl.int64)  # b · tokens + l: the cache rows reach 10⁴–10⁵, × heads × hd past 2³¹ soon
    head = tl.program_id(1) * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
    pair = tl.arange(0, BLOCK_PAIRS)
    pair_ok = pair < PAIRS
    table = (row // tokens) * table_batch_stride + (row % tokens) * PAIRS + pair
    cos = tl.load(cos_ptr + table, mask=pair_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + table, mask=pair_ok, other=0.0)[None, :]
    offsets = (row * heads + head[:, None]) * (2 * PAIRS) + 2 * pair[None, :]  # the real channel of each pair
    mask = (head[:, None] < heads) & pair_ok[None, :]
    real = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    imag = tl.load(x_ptr + offsets + 1, mask=mask, other=0.0).to(tl.float32)
    out_type = out_ptr.dtype.element_ty
    tl.store(out_ptr + offsets, (real * cos - imag * sin).to(out_type), mask=mask)
    tl.store(out_ptr + offsets + 1, (real * sin + imag * cos).to(out_type), mask=mask)


def _norm_rope(
    x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, tokens, table_batch_stride, eps,
    DIM: tl.constexpr, PAIRS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One token's row per program: its mean square over the full width (Wan's q/k RMSNorm spans every head), the
    # norm rounded to the input's dtype as the reference's `type_as` does, the fp32 weight, then each head's pairs
    # rotated. Lane j holds channel pair j of the row: head j // PAIRS, pair j % PAIRS of that head's table.
    row = tl.program_id(0).to(tl.int64)
    pair = tl.arange(0, BLOCK)
    ok = pair < DIM // 2
    base = row * DIM + 2 * pair
    real = tl.load(x_ptr + base, mask=ok, other=0.0).to(tl.float32)
    imag = tl.load(x_ptr + base + 1, mask=ok, other=0.0).to(tl.float32)
    scale = tl.rsqrt((tl.sum(real * real, axis=0) + tl.sum(imag * imag, axis=0)) / DIM + eps)
    in_type = x_ptr.dtype.element_ty
    real = (real * scale).to(in_type).to(tl.float32) * tl.load(weight_ptr + 2 * pair, mask=ok, other=0.0)
    imag = (imag * scale).to(in_type).to(tl.float32) * tl.load(weight_ptr + 2 * pair + 1, mask=ok, other=0.0)
    table = (row // tokens) * table_batch_stride + (row % tokens) * PAIRS + pair % PAIRS
    cos = tl.load(cos_ptr + table, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + table, mask=ok, other=0.0)
    out_type = out_ptr.dtype.element_ty
    tl.store(out_ptr + base, (real * cos - imag * sin).to(out_type), mask=ok)
    tl.store(out_ptr + base + 1, (real * sin + imag * cos).to(out_type), mask=ok)


def build() -> SimpleNamespace:
    """The kernels, jitted now (so under the TRITON_INTERPRET the environment has now)."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    return SimpleNamespace(rope=triton.jit(_rope), norm_rope=triton.jit(_norm_rope))


@functools.cache
def kernels() -> SimpleNamespace:
    return build()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, built: SimpleNamespace | None = None) -> Tensor:
    """As kernels/rope.py's reference: x [B, L, heads, hd] contiguous, any float dtype; cos/sin float32 [L, hd/2] or
    [B, L, hd/2], contiguous. A new tensor of x's shape and dtype."""
    batch, tokens, heads, head_dim = x.shape
    pairs = head_dim // 2
    assert x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and cos.shape[-2:] == (tokens, pairs)
    out = torch.empty_like(x)
    per_program = math.gcd(heads, MAX_HEADS_PER_PROGRAM)  # a power of two that divides the heads: no idle lanes
    table_batch_stride = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    grid = (batch * tokens, heads // per_program)
    (built or kernels()).rope[grid](
        x, cos, sin, out, tokens, heads, table_batch_stride,
        PAIRS=pairs, BLOCK_PAIRS=triton.next_power_of_2(pairs), HEADS_PER_PROGRAM=per_program,
    )  # fmt: skip
    return out


def norm_rope(x: Tensor, weight: Tensor, eps: float, heads: int, cos: Tensor, sin: Tensor,
              built: SimpleNamespace | None = None) -> Tensor:  # fmt: skip
    """As kernels/rope.py's `norm_rope_reference`: x [B, L, D] contiguous (a projection's output, any float dtype),
    weight [D] float32; cos/sin as `apply_rope`'s. A new float32 tensor [B, L, heads, D / heads]."""
    batch, tokens, dim = x.shape
    pairs = dim // heads // 2
    assert x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and cos.shape[-2:] == (tokens, pairs)
    out = torch.empty((batch, tokens, heads, dim // heads), dtype=torch.float32, device=x.device)
    table_batch_stride = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    (built or kernels()).norm_rope[(batch * tokens,)](
        x, weight, cos, sin, out, tokens, table_batch_stride, eps,
        DIM=dim, PAIRS=pairs, BLOCK=triton.next_power_of_2(dim // 2),
    )  # fmt: skip
    return out
