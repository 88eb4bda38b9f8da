"""fp8 (E4M3) weight storage for the DiT's block Linears at serve time (load option `quantization: "fp8_e4m3fn"`).

Which Linears: exactly the ones the engine export quantizes (`build_engines.quantize.fp8_linear_names`): the q, k,
v, o of both attentions and the two FFN Linears of every block. Norms, modulation, the time/text/patch embeddings and
the head keep their load dtype, as the reference keeps them precise; LongLive 2.0 (models.md §3.2) and the ModelOpt
Wan recipes (trt.md §2) keep the same layers in bf16. Scope's torchao config rounds every Linear; we do not.

Granularity: one fp32 scale per **output channel** (weight row) and, on the fp8 GEMM path, one per **token** for
the activations, computed on the fly. Rounding to a float format is relative, so a per-tensor weight scale loses only
where a row sits far below the tensor's absmax and its small elements fall into e4m3's subnormals (below 2⁻⁶ × the
scale = absmax/28 672, where the error is absolute). On the tiny DiT's random weights, whose rows are alike, both
measure about the same (step error 0.49–0.54% per row vs 0.55–0.56% per tensor). What decides it is the
activations: a dynamic per-token scale keeps one large token from flattening the others' resolution, and a rowwise
`torch._scaled_mm` (a per-row scale on each operand, applied in the GEMM's epilogue at no cost) is the kernel that
allows it. On the dequantize path the per-row weight scale is one multiply per element, as a per-tensor one would
be. (The TensorRT engine keeps ModelOpt's calibrated per-tensor scales; the two fp8 paths agree with fp32 within
their bounds, not with each other bit for bit.)

Forward: on CUDA with compute capability ≥ 8.9 (Ada, Hopper: fp8 tensor cores) and a bf16 compute dtype (the
rowwise kernels write bf16 only) the GEMM itself runs in fp8. Everywhere else the weight is dequantized to the
compute dtype and a normal GEMM runs: slower than bf16 weights on such a GPU, but it halves weight memory and keeps
CPU runs and tests exact about what is stored. `store_dit_in_fp8` logs which path the weights' device gets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from build_engines.quantize import fp8_linear_names
from serve.models.dit import DiTConfig, WanDiT, load_dit

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8_DTYPE).max  # 448: absmax of each row maps here, using the whole range
AMAX_FLOOR = 1e-12  # an all-zero row or token would otherwise give a zero scale and 0/0
FP8_GEMM_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and later


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """[R, C] → (fp8 [R, C], fp32 scale [R, 1]) with t ≈ fp8.float() · scale, each row's absmax mapped to ±448.

    Computed in fp32 whatever t's dtype: the division must not round before the fp8 rounding does.
    """
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=AMAX_FLOOR) / E4M3_MAX  # [R, 1]
    # The clamp only catches fp32 rounding of absmax/scale just above 448 (e4m3fn has no inf: it would become NaN).
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), scale


def fp8_gemm(x: Tensor, weight: Tensor, weight_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x [M, K] · (fp8 weight [N, K] · weight_scale [N, 1])ᵀ → [M, N] in out_dtype, on fp8 tensor cores.

    x is quantized per row (token) here, from its own absmax: a dynamic scale, no calibration.
    """
    x_fp8, x_scale = quantize_rows(x)  # [M, K] fp8, [M, 1] fp32
    # `_scaled_mm` wants mat2 column-major: the row-major [N, K] weight transposed is exactly that, with no copy.
    return torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=out_dtype)


def fp8_gemm_unsupported(device: torch.device, compute_dtype: torch.dtype) -> str | None:
    """Why a Linear on `device` computing in `compute_dtype` cannot run fp8 GEMMs, or None when it can."""
    if device.type != "cuda":
        return f"device {device.type} has no fp8 GEMM"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_GEMM_MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} < 8.9"
    if compute_dtype != torch.bfloat16:
        return f"compute dtype {compute_dtype} (rowwise fp8 GEMMs output bf16 only)"
    return None


class Fp8Linear(nn.Module):
    """Drop-in for a block nn.Linear: weight stored fp8 [out, in] with a per-row fp32 scale, bias in compute dtype.

    `compute_dtype` is what dit.py's `linear()` casts inputs to and what attention runs in (the weight's own dtype
    would say fp8). Move it with `.to(device)` only: a dtype cast would turn the stored weight back into a wide one.
    """

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight_scale.shape != (weight.shape[0], 1):
            raise ValueError(f"Fp8Linear needs an {FP8_DTYPE} weight [out, in] and a scale [out, 1]")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.fp8_gemm = fp8_gemm_unsupported(weight.device, compute_dtype) is None

    @classmethod
    def from_linear(
        cls, layer: nn.Linear, compute_dtype: torch.dtype, device: torch.device | str | None = None
    ) -> Fp8Linear:
        """Quantize one Linear, on `device` (default: where its weight is). Holds one wide copy of this layer only."""
        device = layer.weight.device if device is None else device
        weight, scale = quantize_rows(layer.weight.detach().to(device))
        bias = None if layer.bias is None else layer.bias.detach().to(device)
        return cls(weight, scale, bias, compute_dtype)

    def dequantized_weight(self) -> Tensor:
        """[out, in] in the compute dtype: the weight the fallback GEMM (and the fp8 GEMM's oracle) uses."""
        return (self.weight.float() * self.weight_scale).to(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] in the compute dtype → [..., out] in the compute dtype."""
        if not self.fp8_gemm:
            return F.linear(x, self.dequantized_weight(), self.bias)
        out = fp8_gemm(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.compute_dtype)
        out = out.view(*x.shape[:-1], self.out_features)  # [M, out] → [..., out]
        return out if self.bias is None else out + self.bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Fp8Linear:
        # Every .to()/.cuda() passes here: the GEMM path follows the weight's device, decided once per move (a
        # Python bool, so the forward never queries the device and torch.compile guards on a constant).
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            raise TypeError(f"Fp8Linear weight was cast to {self.weight.dtype}: move fp8 models with .to(device)")
        self.fp8_gemm = fp8_gemm_unsupported(self.weight.device, self.compute_dtype) is None
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


def store_dit_in_fp8(dit: nn.Module, compute_dtype: torch.dtype, *, device: torch.device | str | None = None) -> int:
    """Replace the block Linears of `dit` by Fp8Linear, one at a time, on `device`; returns how many.

    Each replaced nn.Linear is dropped as soon as its fp8 copy exists, so the transient cost is one layer's wide
    weight (plus its fp32 copy while rounding), never a second model. Everything else stays where it is.
    """
    names = fp8_linear_names(dit)
    stored_bytes = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = dit.get_submodule(parent_name)
        fp8 = Fp8Linear.from_linear(getattr(parent, child), compute_dtype, device)
        setattr(parent, child, fp8)  # the nn.Linear's last reference goes here
        stored_bytes += fp8.weight.nbytes + fp8.weight_scale.nbytes
    if names:
        reason = fp8_gemm_unsupported(fp8.weight.device, compute_dtype)
        gemm = "fp8" if reason is None else f"dequantize ({reason})"
        log.info("fp8 weights linears=%d bytes=%d compute_dtype=%s gemm=%s", len(names), stored_bytes, compute_dtype,
                 gemm)  # fmt: skip
    return len(names)


def load_dit_fp8(
    config: DiTConfig,
    path: Path | str,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    prefer: str | None = None,
    lora: Path | str | None = None,
    lora_scale: float = 1.0,
) -> WanDiT:
    """`load_dit` with the block Linears stored in fp8 on `device` (a LoRA is merged before rounding).

    Peak memory: the checkpoint is read into host memory in the compute dtype, one tensor at a time (one wide copy,
    as any load needs: 28 GB for the 14B in bf16). Each block Linear is then moved to `device` alone, rounded to fp8
    there and its host copy released, so `device` peaks at the fp8 model (14 GB of block weights for the 14B, plus
    ≈1 GB of precise layers) plus one wide Linear (the 14B's largest, ffn.0: 142 MB bf16, 283 MB as fp32 while
    rounding), and the host's copy shrinks as the device's grows. Two full wide copies never exist anywhere.
    """
    dit = load_dit(config, path, dtype=compute_dtype, device="cpu", prefer=prefer, lora=lora, lora_scale=lora_scale)
    store_dit_in_fp8(dit, compute_dtype, device=device)
    return dit.to(device)  # the precise layers follow; fp8 weights are already there
