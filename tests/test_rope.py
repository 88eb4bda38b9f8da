"""kernels/rope.py: the Triton kernel against the torch reference under TRITON_INTERPRET=1 on CPU tensors, on the
shapes the DiT passes it (queries and keys per chunk, a stream batch's per-row tables, Reward Forcing's whole cached
window), and the dispatch's choice of which one runs."""

from __future__ import annotations

import logging

import pytest
import torch

from kernels import rope, triton_rope
from kernels.rope import apply_rope_reference, kernel_refusal, norm_rope_reference
from serve.models.dit import DIT_CONFIGS, WanDiT
from tests.support.kernels import interpreted_kernels


@pytest.fixture(scope="module")
def rope_kernel():
    return interpreted_kernels(triton_rope)


def tables(positions: int, pairs: int, *batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.randn(*batch, positions, pairs, generator=torch.Generator().manual_seed(seed)) * 50
    return torch.cos(angles), torch.sin(angles)


@pytest.mark.parametrize(
    ("shape", "dtype", "table_batch"),
    [
        pytest.param((1, 48, 2, 32), torch.float32, (), id="tiny-config-queries-fp32"),  # hd 32: the tiny DiT's
        pytest.param((1, 40, 12, 128), torch.float32, (), id="1.3b-heads-fp32"),  # 12 heads: 3 programs of 4
        pytest.param((1, 30, 40, 128), torch.bfloat16, (), id="14b-heads-bf16-cache"),  # Krea's 40 heads, cache dtype
        pytest.param((3, 16, 2, 32), torch.float32, (3,), id="stream-batch-rows"),  # [B, L, hd/2] tables
        pytest.param((2, 16, 3, 20), torch.float32, (), id="odd-heads-and-pairs"),  # 10 pairs: a masked block of 16
        pytest.param((1, 24, 2, 32), torch.float16, (1,), id="fp16-one-row-table"),
    ],
)
def test_kernel_equals_reference_bit_for_bit(rope_kernel, shape, dtype, table_batch) -> None:
    """Interpreted, the kernel does the reference's fp32 arithmetic term for term, so the two agree exactly."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    cos, sin = tables(shape[1], shape[3] // 2, *table_batch)
    out = triton_rope.apply_rope(x, cos, sin, rope_kernel)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, interpreted_reference(x, cos, sin))


def interpreted_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference as the interpreter stores it. Triton's interpreter casts fp32 to bf16 by truncation (its numpy
    emulation; compiled, Triton rounds to nearest even as torch does, tests/test_gpu.py), so a bf16 result is the
    reference's fp32 one truncated: equal to that bit for bit, the arithmetic before the cast is the same."""
    if x.dtype != torch.bfloat16:
        return apply_rope_reference(x, cos, sin)
    exact = apply_rope_reference(x.float(), cos, sin)
    return (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # the low 16 bits dropped


def test_kernel_rotates_the_cached_window_as_the_step_does(rope_kernel) -> None:
    """Reward Forcing's read-time rotation: a layer's cache slice (a view at an offset into the [layers, …] cache)
    with the rope tables of its slots, as serve/models/dit.py `run_blocks` passes them."""
    config = DIT_CONFIGS["tiny"]
    model = WanDiT(config)
    cache = torch.randn(config.num_layers, 1, 3 * 16, config.num_heads, config.head_dim).to(torch.bfloat16)
    cos, sin = model.rope.tables(torch.tensor([0, 1, 2]), 4, 4)  # 3 frame slots of 4×4 tokens
    for layer in range(config.num_layers):
        keys = cache[layer]
        assert keys.storage_offset() > 0 or layer == 0
        assert torch.equal(triton_rope.apply_rope(keys, cos, sin, rope_kernel), interpreted_reference(keys, cos, sin))


def test_the_first_call_check_takes_the_kernel_and_refuses_a_wrong_or_failing_one(rope_kernel, monkeypatch, caplog):
    """On CUDA the dispatch checks the kernel against the reference on its first call of each kind, so a kernel that
    does not compile or computes wrongly on some GPU or Triton version costs one log line, not the stream. Here the
    check runs on the interpreted kernel (agrees, also in bf16 up to its truncating cast), then on one that computes
    a wrong rotation and one that raises."""
    x = torch.randn(1, 24, 4, 32) * 3
    cos, sin = tables(24, 16)

    def agrees(kernel, x: torch.Tensor) -> bool:
        return rope.kernel_agrees("rope", lambda: kernel(x, cos, sin), lambda: apply_rope_reference(x, cos, sin),
                                  x.dtype)  # fmt: skip

    assert agrees(triton_rope.apply_rope, x) and agrees(triton_rope.apply_rope, x.to(torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="kernels.rope"):
        assert not agrees(lambda x, cos, sin: apply_rope_reference(x, sin, cos), x)  # a wrong rotation
    assert "differs from its reference" in caplog.text

    def fails(x, cos, sin):
        raise RuntimeError("PTX JIT compilation failed")

    with caplog.at_level(logging.WARNING, logger="kernels.rope"):
        assert not agrees(fails, x)
    assert "PTX JIT compilation failed" in caplog.text


@pytest.mark.parametrize(
    ("shape", "heads", "dtype", "table_batch"),
    [
        pytest.param((1, 48, 64), 2, torch.float32, (), id="tiny-config-fp32"),
        pytest.param((1, 40, 1536), 12, torch.bfloat16, (), id="1.3b-bf16"),  # 768 pairs: a block of 1024
        pytest.param((1, 8, 5120), 40, torch.bfloat16, (), id="14b-bf16"),
        pytest.param((3, 16, 64), 2, torch.float32, (3,), id="stream-batch-rows"),
        pytest.param((2, 16, 60), 3, torch.float16, (), id="odd-heads-and-pairs"),
    ],
)
def test_norm_rope_kernel_equals_the_reference(rope_kernel, shape, heads, dtype, table_batch) -> None:
    """q/k RMSNorm over the full width, then each head rotated, in one pass. The mean's summation order differs
    from torch's, and the interpreter truncates its cast to bf16 (the norm is rounded to the input's dtype before
    the weight), so values agree to a rounding step of the input's dtype; in fp32 to a few ulps."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 4 + 1).to(dtype)
    weight = torch.rand(shape[-1], generator=torch.Generator().manual_seed(3)) + 0.5
    cos, sin = tables(shape[1], shape[-1] // heads // 2, *table_batch)
    out = triton_rope.norm_rope(x, weight, 1e-6, heads, cos, sin, rope_kernel)
    expected = norm_rope_reference(x, weight, 1e-6, heads, cos, sin)
    assert out.dtype == expected.dtype == torch.float32
    assert out.shape == expected.shape == (*shape[:2], heads, shape[-1] // heads)
    step = torch.finfo(dtype).eps
    torch.testing.assert_close(out, expected, rtol=2 * step, atol=2 * step * float(expected.abs().max()))


def test_the_reference_runs_off_cuda(caplog) -> None:
    """The kernel is for CUDA tensors the step runs eagerly; everything else, the meta dry run included, takes the
    reference without a warning (a CPU has no kernel to miss)."""
    x = torch.randn(1, 8, 2, 32)
    cos, sin = tables(8, 16)
    assert kernel_refusal(x, cos, sin) == "not on CUDA"
    meta = x.to("meta")
    assert kernel_refusal(meta, cos.to("meta"), sin.to("meta")) == "not on CUDA"
    with caplog.at_level(logging.WARNING, logger="kernels.rope"):
        assert torch.equal(rope.apply_rope(x, cos, sin), apply_rope_reference(x, cos, sin))
        assert rope.apply_rope(meta, cos.to("meta"), sin.to("meta")).shape == x.shape
    assert not caplog.records


REFUSALS: list[str | None] = []  # what the dispatch said while each tracer ran the function


class Rotate(torch.nn.Module):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        REFUSALS.append(kernel_refusal(x, cos, sin))
        return rope.apply_rope(x, cos, sin)


@pytest.mark.parametrize("tracer", ["compile", "export", "jit-trace"])
def test_everything_that_traces_the_step_gets_the_reference(tracer: str) -> None:
    """torch.compile and AOTInductor's export (torch.export) fuse the reference themselves, the ONNX exports need its
    standard ops: each sees fake, functional or traced tensors, which the kernel must never be handed."""
    x = torch.randn(1, 8, 2, 32)
    cos, sin = tables(8, 16)
    module = Rotate()
    REFUSALS.clear()
    if tracer == "compile":
        out = torch.compile(module, backend="eager", fullgraph=True)(x, cos, sin)
    elif tracer == "export":
        out = torch.export.export(module, (x, cos, sin), strict=False).module()(x, cos, sin)
    else:
        out = torch.jit.trace(module, (x, cos, sin), check_trace=False)(x, cos, sin)
    assert REFUSALS[:1] == ["traced"], REFUSALS  # (a compiled graph replays no Python: one entry, from tracing)
    assert torch.equal(out, apply_rope_reference(x, cos, sin))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernel needs a CUDA GPU")
def test_compiled_kernels_equal_the_references_on_cuda_and_replay_in_a_graph() -> None:
    """Compiled, Triton may fuse a product and a difference into one FMA (the reference rounds each), so fp32 agrees to
    a few ulp of the inputs' scale and bf16 to one bf16 ulp. The shapes are the 1.3B step's at 480×832: a chunk's
    queries (fp32) and Reward Forcing's cached window of one layer (bf16). Then the call is captured in a CUDA graph
    after one warm-up, as serve/runtime/cuda_step.py captures the step, and replays to the same values. The fused
    q/k norm + rope agrees to a rounding step of bf16 (its mean sums in another order)."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    for tokens, dtype in ((3 * 1560, torch.float32), (9 * 1560, torch.bfloat16)):
        x = (torch.randn(1, tokens, 12, 128, generator=generator) * 3).to(device, dtype)
        cos, sin = (t.to(device) for t in tables(tokens, 64))
        assert kernel_refusal(x, cos, sin) is None
        out, reference = rope.apply_rope(x, cos, sin), apply_rope_reference(x, cos, sin)
        assert out.dtype == dtype
        rtol = 2**-7 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(out.float(), reference.float(), rtol=rtol, atol=3 * 6 * rtol)  # |x|·(|cos|+|sin|)
        assert rope._agrees[("rope", x.device, dtype, 12, 128, 2)], "the first-call check chose the reference"
    projected = (torch.randn(1, 3 * 1560, 1536, generator=generator) * 3).to(device, torch.bfloat16)  # q or k
    weight = (torch.rand(1536, generator=generator) + 0.5).to(device)
    q_cos, q_sin = (t.to(device) for t in tables(3 * 1560, 64))
    normed = rope.norm_rope(projected, weight, 1e-6, 12, q_cos, q_sin)
    expected_norm = rope.norm_rope_reference(projected, weight, 1e-6, 12, q_cos, q_sin)
    torch.testing.assert_close(normed, expected_norm, rtol=2**-6, atol=2**-6 * float(expected_norm.abs().max()))
    assert rope._agrees[("norm+rope", projected.device, torch.bfloat16, 1536, 12, 2)]
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        expected = rope.apply_rope(x, cos, sin)  # the warm-up: Triton compiles outside the capture
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            captured = rope.apply_rope(x, cos, sin)
    torch.cuda.current_stream().wait_stream(stream)
    captured.zero_()
    graph.replay()
    assert torch.equal(captured, expected)
