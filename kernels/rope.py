"""The DiT's queries and keys: Wan's q/k RMSNorm and the rotary position embedding, as torch references and as
Triton kernels (kernels/triton_rope.py), with the dispatch between them.

Why kernels: the references are elementwise chains, each op a full pass over the tensor: RMSNorm then RoPE move ~90
bytes per value (a float copy, a square, a mean, a product, a cast, the weight; then four products, a difference, a
sum, a stack) where one fused pass moves 6 (bf16 in, fp32 out). Eager on a GPU (what `auto` serves where no engine is
built, CUDA-graphed or not; Reward Forcing and runtime LoRAs always) that is memory traffic, not launches, and it is
large: the 1.3B step at 480×832 normalises and rotates 14 M query and key values per layer, and Reward Forcing
rotates its whole cached window on top at read time (its keys are cached un-rotated, window-relative positions):
22 M bf16 values per layer. The kernels compute what the references compute, in fp32, in the same order; only the
mean's summation order differs.

The references run everywhere else: on a CPU and the meta device, and inside anything that traces the step
(torch.compile and AOTInductor's export, where inductor fuses them itself; the ONNX exports, which need standard
ops). Each kernel is checked against its reference on its first call of each kind, so one that does not compile or
computes wrongly on some GPU or Triton version costs a log line, never a stream. tests/test_rope.py runs the kernels
interpreted on a CPU against the references; `make gpu-check` times both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


# -- the references ---------------------------------------------------------------------------------------------------


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Wan's `WanRMSNorm`: normalised in fp32, rounded to x's dtype, then scaled by the (fp32) weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def apply_rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) in fp32. x [B, L, heads, hd]; cos/sin [L, hd/2] (or [B, L, hd/2])."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, heads, hd/2, 2]
    real, imag = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def norm_rope_reference(x: Tensor, weight: Tensor, eps: float, heads: int, cos: Tensor, sin: Tensor) -> Tensor:
    """A projection's output x [B, L, D] normalised over its full width, split into heads, and rotated."""
    return apply_rope_reference(rms_norm_reference(x, weight, eps).unflatten(-1, (heads, -1)), cos, sin)


# -- the dispatch -----------------------------------------------------------------------------------------------------


def kernel_refusal(x: Tensor, cos: Tensor, sin: Tensor) -> str | None:
    """None when a Triton kernel takes this call; otherwise why the reference runs."""
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


_said_why: set[str] = set()
# Whether a kernel agreed with its reference on its first call of each kind (kernel, device, dtype, widths, table
# rank).
_agrees: dict[tuple, bool] = {}


def _dispatch(kind: tuple, refusal: str | None, kernel: Callable[[], Tensor], reference: Callable[[], Tensor],
              input_dtype: torch.dtype) -> Tensor:  # fmt: skip
    if refusal is None:
        if kind not in _agrees and not torch.cuda.is_current_stream_capturing():  # (a capture's warm-up checked it)
            _agrees[kind] = kernel_agrees(kind[0], kernel, reference, input_dtype)
        if _agrees.get(kind):
            return kernel()
        refusal = "it failed its first check" if kind in _agrees else "unchecked inside a CUDA graph capture"
    if kind[1].type == "cuda" and refusal not in ("traced", *_said_why):  # on a CPU the reference is the kernel
        _said_why.add(refusal)
        log.warning("%s: the torch reference runs instead of the Triton kernel (%s)", kind[0], refusal)
    return reference()


def kernel_agrees(name: str, kernel: Callable[[], Tensor], reference: Callable[[], Tensor],
                  input_dtype: torch.dtype) -> bool:  # fmt: skip
    """A kernel against its reference on one call's inputs: within two ulps of the input's dtype (a norm rounded to
    it may land on the other side of a rounding step; Triton may fuse a product and a sum into one FMA), relative to
    the output's scale. Blocking (one host sync): a first call only."""
    try:
        out, expected = kernel().float(), reference().float()
        worst = float((out - expected).abs().max())
        bound = 2 * torch.finfo(input_dtype).eps * (float(expected.abs().max()) + 1.0)
    except Exception as exc:  # a compile error, a launch that fails on this GPU
        log.warning("%s: the Triton kernel failed its first call (%s: %s); the torch reference runs", name,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
        return False
    if not worst <= bound:  # (NaN fails too)
        log.warning("%s: the Triton kernel differs from its reference by %.3g (bound %.3g) on %s; the torch reference "
                    "runs", name, worst, bound, tuple(out.shape))  # fmt: skip
        return False
    log.info("%s: Triton kernel, checked against its reference (max diff %.3g)", name, worst)
    return True


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rope_reference`'s result, from the Triton kernel where it runs (see the module's docstring)."""
    from kernels import triton_rope

    return _dispatch(
        ("rope", x.device, x.dtype, x.shape[2], x.shape[3], cos.dim()),
        kernel_refusal(x, cos, sin),
        lambda: triton_rope.apply_rope(x, cos, sin),
        lambda: apply_rope_reference(x, cos, sin),
        x.dtype,
    )


def norm_rope(x: Tensor, weight: Tensor, eps: float, heads: int, cos: Tensor, sin: Tensor) -> Tensor:
    """`norm_rope_reference`'s result, from one Triton kernel where it runs (see the module's docstring)."""
    from kernels import triton_rope

    refusal = kernel_refusal(x, cos, sin)
    if refusal is None and (weight.dtype != torch.float32 or not weight.is_contiguous() or x.shape[-1] % heads):
        refusal = "other weights"  # the norm's weight is kept in fp32 (serve/models/dit.py FP32_PARAMETERS)
    return _dispatch(
        ("norm+rope", x.device, x.dtype, x.shape[-1], heads, cos.dim()),
        refusal,
        lambda: triton_rope.norm_rope(x, weight, eps, heads, cos, sin),
        lambda: norm_rope_reference(x, weight, eps, heads, cos, sin),
        x.dtype,
    )
