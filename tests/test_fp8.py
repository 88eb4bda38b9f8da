"""Serve-time fp8 weight storage (serve/models/fp8.py) against its oracles: the fp32 eager step, e4m3's rounding
bound, the Linears ModelOpt quantizes, and on a GPU the dequantized GEMM.

Error bounds (relative Frobenius, step output against the fp32 eager step; tiny DiT, 2 chunks through the cache):
- e4m3 keeps 3 mantissa bits: rounding to nearest moves a value by at most 2⁻⁴ of itself, about 2.6% RMS over a
  binade. A GEMM with rounded weights (or rounded inputs) therefore moves its output by ≈2.6%: rounding errors are
  independent of the other operand and add like the values themselves.
- Block outputs enter the fp32 residual stream through the gates, so the step output moves less than one GEMM:
  weight-only fp8 (the dequantize path) measures 0.50–0.56% with fp32 compute and 0.61–0.67% with bf16 compute
  (bf16 weights alone: 0.39%); with the activations rounded too (the fp8 GEMM path) 0.78–0.85%.
- Bounds: 1.5% weight-only, 2% fp8 GEMM: about 2.5× what we measure, and below what a wrong selection gives:
  rounding the head's weights too (one GEMM straight to the output) measures 2.5%.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from build_engines.quantize import fp8_linear_names
from serve.models.dit import DIT_CONFIGS, WanDiT, load_dit
from serve.models.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    Fp8Linear,
    fp8_gemm,
    fp8_gemm_unsupported,
    load_dit_fp8,
    quantize_rows,
    store_dit_in_fp8,
)
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy

CONFIG = DIT_CONFIGS["tiny"]
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip
WEIGHT_ONLY_ERROR_BOUND = 0.015
FP8_GEMM_ERROR_BOUND = 0.02
CHUNK, CHUNKS, TOKENS_PER_FRAME = 3, 2, 16  # 8×8 latents → 4×4 tokens per frame

# e4m3 rounding (round to nearest): normal values (≥ 2⁻⁶) lie in a binade [2ᵉ, 2ᵉ⁺¹) with spacing 2ᵉ⁻³, so the
# error is ≤ 2ᵉ⁻⁴ ≤ 2⁻⁴·|v|; subnormals (< 2⁻⁶) have spacing 2⁻⁹, so the error is ≤ 2⁻¹⁰. In weight units
# (v = w / scale): |dequantized − w| ≤ 2⁻⁴·|w| + 2⁻¹⁰·scale. The fp32 divide and multiply add ≤ 2⁻²³·|w|.
E4M3_RELATIVE_ROUNDING = 2**-4
E4M3_SUBNORMAL_ROUNDING = 2**-10
FP32_SLACK = 2**-22

NO_FP8_GPU = (
    fp8_gemm_unsupported(torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else "no CUDA device"
)
requires_fp8_gpu = pytest.mark.skipif(
    NO_FP8_GPU is not None, reason=f"fp8 GEMM needs a CUDA GPU with compute capability ≥ 8.9: {NO_FP8_GPU}"
)


def sample(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 16, CHUNK * CHUNKS, 8, 8, generator=generator),
        torch.rand(1, CHUNK * CHUNKS, generator=generator) * 1000,
        torch.randn(1, CONFIG.text_len, CONFIG.text_dim, generator=generator),
    )


@torch.no_grad()
def run_step(model: WanDiT, seed: int, device: str = "cpu") -> torch.Tensor:
    """Chunk by chunk through a fresh KV cache; returns every chunk's flow prediction, fp32 on the CPU."""
    latents, timesteps, context = (t.to(device) for t in sample(seed))
    spec = KVCacheSpec(CONFIG.num_layers, 1, CONFIG.num_heads, CONFIG.head_dim, TOKENS_PER_FRAME, CHUNK * CHUNKS)
    cache = KVCache(spec, torch.float32).to(device)
    policy = RollingSinkPolicy(spec, sink_frames=CHUNK)
    text_kv = model.text_kv(context)
    outputs = []
    for c in range(CHUNKS):
        frames = slice(c * CHUNK, (c + 1) * CHUNK)
        plan = policy.plan(c * CHUNK, CHUNK).as_args()
        plan = tuple(t.to(device) for t in plan)
        outputs.append(model.step(latents[:, :, frames], timesteps[:, frames], text_kv, cache.k, cache.v, *plan))
    return torch.cat(outputs, dim=2).float().cpu()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def reference() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(CONFIG).eval()


@pytest.fixture(scope="module")
def checkpoint(reference: WanDiT, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp8") / "dit.safetensors"
    save_file({name: t.contiguous() for name, t in reference.state_dict().items()}, str(path))
    return path


def fp8_copy(reference: WanDiT, compute_dtype: torch.dtype = torch.float32) -> WanDiT:
    model = copy.deepcopy(reference)
    store_dit_in_fp8(model, compute_dtype)
    return model


# -- which modules ------------------------------------------------------------------------------------------------


def test_exactly_the_block_linears_become_fp8_and_nothing_else_changes(reference: WanDiT) -> None:
    model = copy.deepcopy(reference)
    assert store_dit_in_fp8(model, torch.float32) == CONFIG.num_layers * len(BLOCK_LINEARS)
    expected = {f"blocks.{i}.{name}" for i in range(CONFIG.num_layers) for name in BLOCK_LINEARS}
    assert {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)} == expected
    # Norms, modulation, embeddings and head: same modules, same tensors, same dtypes.
    untouched = {k: v for k, v in reference.state_dict().items() if k.rpartition(".")[0] not in expected}
    after = model.state_dict()
    for name, tensor in untouched.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {"text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                       "time_projection.1", "head.head"}  # fmt: skip


def test_selection_is_the_one_modelopt_quantizes_for_the_engine(reference: WanDiT) -> None:
    modelopt_missing = "nvidia-modelopt is not installed (pip install -e '.[dev]')"
    pytest.importorskip("modelopt.torch.quantization", reason=modelopt_missing)
    from build_engines.quantize import quantize_fp8, quantized_modules

    def calibrate(model: WanDiT) -> None:
        with torch.no_grad():
            latents, timesteps, context = sample(0)
            model.forward_full(latents, timesteps, context)

    quantized = quantize_fp8(copy.deepcopy(reference), calibrate)
    assert set(fp8_linear_names(reference)) == quantized_modules(quantized)


# -- what is stored -----------------------------------------------------------------------------------------------


def test_fp8_weights_take_half_the_bytes_of_bf16(reference: WanDiT) -> None:
    model = fp8_copy(reference, torch.bfloat16)
    originals = dict(reference.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            bf16_bytes = originals[name].weight.numel() * torch.bfloat16.itemsize
            assert module.weight.nbytes * 2 == bf16_bytes
            assert module.weight_scale.nbytes == 4 * module.out_features  # one fp32 scale per output channel


def test_fp8_14b_block_weights_drop_from_28_to_14_gigabytes() -> None:
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = WanDiT(DIT_CONFIGS["wan2.1-14b"])
    names = fp8_linear_names(model)
    bf16_bytes = sum(model.get_submodule(n).weight.numel() * torch.bfloat16.itemsize for n in names)
    store_dit_in_fp8(model, torch.bfloat16)
    fp8_modules = [model.get_submodule(n) for n in names]
    fp8_bytes = sum(m.weight.nbytes + m.weight_scale.nbytes for m in fp8_modules)
    assert all(m.weight.dtype == FP8_DTYPE for m in fp8_modules)
    assert round(bf16_bytes / 1e9, 1) == 28.1 and round(fp8_bytes / 1e9, 1) == 14.1
    assert fp8_bytes <= bf16_bytes / 2 * 1.001  # the scales: 4 bytes per 5120- or 13824-wide row


def test_weights_round_trip_within_e4m3_rounding(reference: WanDiT) -> None:
    model = fp8_copy(reference)
    originals = dict(reference.named_modules())
    worst_relative = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, Fp8Linear):
            continue
        weight = originals[name].weight.detach()
        error = (module.dequantized_weight() - weight).abs()
        bound = (E4M3_RELATIVE_ROUNDING + FP32_SLACK) * weight.abs() + E4M3_SUBNORMAL_ROUNDING * module.weight_scale
        assert (error <= bound).all(), name
        # Each row's absmax lands on ±448, so the whole e4m3 range is used.
        assert torch.equal(module.weight.float().abs().amax(dim=1), torch.full((module.out_features,), E4M3_MAX))
        worst_relative = max(worst_relative, (error / weight.abs()).max().item())
    assert worst_relative > E4M3_RELATIVE_ROUNDING / 2  # rounded on e4m3's grid, not a finer one


def test_casting_an_fp8_model_to_another_dtype_fails_loudly(reference: WanDiT) -> None:
    model = fp8_copy(reference)
    with pytest.raises(TypeError, match=r"move fp8 models with \.to\(device\)"):
        model.to(torch.bfloat16)


# -- the step -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_fp8_step_stays_within_the_stated_bound_of_fp32(
    reference: WanDiT, checkpoint: Path, compute_dtype: torch.dtype
) -> None:
    model = load_dit_fp8(CONFIG, checkpoint, compute_dtype=compute_dtype)
    bf16 = load_dit(CONFIG, checkpoint, dtype=torch.bfloat16)
    assert not any(m.fp8_gemm for m in model.modules() if isinstance(m, Fp8Linear))  # the dequantize path
    for seed in range(100, 103):
        expected = run_step(reference, seed)
        fp8_error = relative_error(run_step(model, seed), expected)
        assert fp8_error <= WEIGHT_ONLY_ERROR_BOUND, fp8_error
        if compute_dtype == torch.float32:
            assert fp8_error > relative_error(run_step(bf16, seed), expected)  # the rounding really acts


def test_loading_in_fp8_equals_quantizing_after_a_full_load(checkpoint: Path) -> None:
    streamed = load_dit_fp8(CONFIG, checkpoint, compute_dtype=torch.bfloat16)
    after = load_dit(CONFIG, checkpoint, dtype=torch.bfloat16)
    store_dit_in_fp8(after, torch.bfloat16)
    expected = after.state_dict()
    for name, tensor in streamed.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor.float(), expected[name].float()), name


# -- the fp8 GEMM -------------------------------------------------------------------------------------------------


def test_fp8_gemm_computes_the_product_of_the_scaled_fp8_operands() -> None:
    """Run by the CPU's rowwise `_scaled_mm`: catches a swapped or transposed scale without a GPU."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(75, 256, generator=generator)  # 75 tokens: M needs no multiple of 16
    layer = Fp8Linear.from_linear(nn.Linear(256, 384), torch.float32)
    out = fp8_gemm(x, layer.weight, layer.weight_scale, torch.float32)
    x_fp8, x_scale = quantize_rows(x)
    exact = (x_fp8.float() * x_scale) @ (layer.weight.float() * layer.weight_scale).T
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    # Against the dequantized GEMM only the activations' rounding remains: ≈2.6% RMS (module docstring).
    assert relative_error(out, F.linear(x, layer.dequantized_weight())) <= 0.035


def test_fp8_gemm_path_of_the_step_stays_within_the_stated_bound(reference: WanDiT, checkpoint: Path) -> None:
    """The forward's fp8 branch (flatten, GEMM, bias, reshape) end to end, on the CPU's `_scaled_mm`."""
    model = load_dit_fp8(CONFIG, checkpoint, compute_dtype=torch.bfloat16)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.fp8_gemm = True  # what a CUDA SM ≥ 8.9 device selects; the CPU kernel does the same arithmetic
    for seed in range(100, 103):
        assert relative_error(run_step(model, seed), run_step(reference, seed)) <= FP8_GEMM_ERROR_BOUND


@pytest.mark.parametrize("fp8_gemm_path", [False, True])
def test_fp8_linear_compiles_as_one_graph_equal_to_eager(fp8_gemm_path: bool) -> None:
    """The step is compiled once at load (fullgraph): the path choice must be a constant, not a graph break."""
    layer = Fp8Linear.from_linear(nn.Linear(64, 128), torch.bfloat16)
    layer.fp8_gemm = fp8_gemm_path  # True: the CUDA SM ≥ 8.9 branch, run by the CPU's `_scaled_mm`
    x = torch.randn(2, 24, 64).bfloat16()  # [B, tokens, in]
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))  # bf16 tolerances


@pytest.mark.gpu
@requires_fp8_gpu
def test_fp8_gemm_on_gpu_matches_the_dequantized_gemm() -> None:
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(1536, 8960)  # the 1.3B's ffn.0
    x = torch.randn(4680, 1536, generator=generator).cuda().bfloat16()  # 4680 = 3 frames × 1560 tokens (480×832)
    layer = Fp8Linear.from_linear(linear, torch.bfloat16, "cuda")
    assert layer.fp8_gemm
    out = layer(x)
    x_fp8, x_scale = quantize_rows(x)
    exact = (x_fp8.float() * x_scale) @ (layer.weight.float() * layer.weight_scale).T + layer.bias.float()
    assert relative_error(out, exact) <= 2**-7  # bf16 output rounding (≤ 2⁻⁹ per element) and summation order
    dequantized = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert relative_error(out, dequantized) <= 0.035  # the activations' e4m3 rounding: ≈2.6% RMS


@pytest.mark.gpu
@requires_fp8_gpu
def test_fp8_step_on_gpu_stays_within_the_stated_bound_of_fp32(reference: WanDiT, checkpoint: Path) -> None:
    model = load_dit_fp8(CONFIG, checkpoint, compute_dtype=torch.bfloat16, device="cuda")
    assert all(m.fp8_gemm for m in model.modules() if isinstance(m, Fp8Linear))
    for seed in range(100, 103):
        assert relative_error(run_step(model, seed, "cuda"), run_step(reference, seed)) <= FP8_GEMM_ERROR_BOUND
