"""Rotary position embedding of the DiT's queries and keys: the torch reference and the dispatch to the Triton kernel
(kernels/triton_rope.py).

Why a kernel: the reference is eight elementwise kernels (a float copy, four products, a difference, a sum, a
stack), each a full pass over the tensor: ~44 bytes moved per fp32 element where one fused pass moves 8. Eager on a
GPU (what `auto` serves where no engine is built, CUDA-graphed or not) that is memory traffic, not launches, and it
is large: the 1.3B step at 480×832 rotates 14 M query and key values per layer, and Reward Forcing rotates its whole
cached window on top (its keys are cached un-rotated, window-relative positions): 22 M bf16 values per layer. The
kernel reads each value once, computes in fp32 as the reference does, and writes the result in the input's dtype.

The reference runs everywhere else: on a CPU and the meta device, and inside anything that traces the step
(torch.compile and AOTInductor's export, where inductor fuses it itself; the ONNX exports, which need standard ops).
The tests run the kernel interpreted on a CPU against the reference (tests/test_rope.py); `make gpu-check` times both.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def apply_rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) in fp32. x [B, L, heads, hd]; cos/sin [L, hd/2] (or [B, L, hd/2])."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, heads, hd/2, 2]
    real, imag = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


_said_why: set[str] = set()


def kernel_refusal(x: Tensor, cos: Tensor, sin: Tensor) -> str | None:
    """None when the Triton kernel takes this call; otherwise why the reference runs."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not torch.Tensor:
        return "traced"  # fake and functional tensors of an export or a compile: the reference is what they trace
    if x.device.type != "cuda":
        return "not on CUDA"
    if x.requires_grad and torch.is_grad_enabled():
        return "needs autograd"
    if not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
        return "strided input"
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape[-2] != x.shape[1]:
        return "other tables"
    from kernels import triton_rope

    return triton_rope.unavailable_reason()


# Whether the kernel agreed with the reference on its first call of each kind (device, dtype, heads, head dim, table
# rank): a kernel that fails to compile or computes wrongly on some GPU or Triton version costs one check and a log
# line, never a stream.
_agrees: dict[tuple, bool] = {}


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rope_reference`'s result, from the Triton kernel where it runs (see the module's docstring)."""
    refusal = kernel_refusal(x, cos, sin)
    if refusal is None:
        from kernels import triton_rope

        kind = (x.device, x.dtype, x.shape[2], x.shape[3], cos.dim())
        if kind not in _agrees and not torch.cuda.is_current_stream_capturing():  # (a capture's warm-up checked it)
            _agrees[kind] = kernel_agrees(x, cos, sin)
        if _agrees.get(kind):
            return triton_rope.apply_rope(x, cos, sin)
        refusal = "it failed its first check" if kind in _agrees else "unchecked inside a CUDA graph capture"
    if x.device.type == "cuda" and refusal not in ("traced", *_said_why):  # on a CPU the reference is the kernel
        _said_why.add(refusal)
        log.warning("rope: the torch reference runs instead of the Triton kernel (%s)", refusal)
    return apply_rope_reference(x, cos, sin)


def kernel_agrees(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """The kernel against the reference on this call's inputs: within one ulp of the output dtype (Triton may fuse a
    product and a sum into one FMA), relative to the output's scale. Blocking (one host sync): a first call only."""
    from kernels import triton_rope

    try:
        out = triton_rope.apply_rope(x, cos, sin).float()
        expected = apply_rope_reference(x, cos, sin).float()
        ulp = torch.finfo(x.dtype).eps
        worst = float((out - expected).abs().max())
        bound = 2 * ulp * (float(expected.abs().max()) + 1.0)
    except Exception as exc:  # a compile error, a launch that fails on this GPU
        log.warning("rope: the Triton kernel failed its first call (%s: %s); the torch reference runs",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
        return False
    if not worst <= bound:  # (NaN fails too)
        log.warning("rope: the Triton kernel differs from its reference by %.3g (bound %.3g) on %s %s; the torch "
                    "reference runs", worst, bound, tuple(x.shape), x.dtype)  # fmt: skip
        return False
    log.info("rope: Triton kernel on %s, checked against its reference (max diff %.3g)", x.device, worst)
    return True
