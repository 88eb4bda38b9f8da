"""Exported ONNX steps under onnxruntime equal eager fp32, KV-cache and VAE-cache writes included (issue 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from build_engines.export import export_dit_step, export_vace_step, export_vae_step
from serve.models.autoencoder import build_model
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy
from serve.models.vace import VACE_IN_DIM, VaceWanDiT
from tests.support.onnx_graph import int64_constant_elements

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[dev]')")
pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's exporter) is not installed")

CHUNK, H, W = 3, 8, 8
LF = (H // 2) * (W // 2)


def float64_uses(path: Path) -> str:
    """The float64 tensor types, casts and constants an ONNX graph holds, as text ('' when none)."""
    import onnx

    model = onnx.load(str(path))
    double = onnx.TensorProto.DOUBLE
    found = [v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == double]
    found += [i.name for i in model.graph.initializer if i.data_type == double]
    for node in model.graph.node:
        found += [f"{node.op_type}:{node.name}" for a in node.attribute if a.name == "to" and a.i == double]
    return "DOUBLE " + ", ".join(found) if found else ""


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@torch.no_grad()
def test_dit_step_onnx_equals_eager_over_chunks_with_cache_writes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = DIT_CONFIGS["tiny"]
    model = WanDiT(config).eval()
    spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, LF, 9)
    policy = RollingSinkPolicy(spec, sink_frames=3)
    text_k, text_v = model.text_kv(torch.randn(1, config.text_len, config.text_dim))
    eager_cache = KVCache(spec, torch.float32)

    def inputs(chunk_index: int, t: float, latents: torch.Tensor, cache_k, cache_v):
        plan = policy.plan(chunk_index * CHUNK, CHUNK)
        return (latents, torch.full((1, CHUNK), t), text_k, text_v, cache_k, cache_v, *plan.as_args())

    example = inputs(0, 1000.0, torch.randn(1, 16, CHUNK, H, W), eager_cache.k.clone(), eager_cache.v.clone())
    path = export_dit_step(model, example, tmp_path / "dit_step.onnx")
    assert "DOUBLE" not in float64_uses(path)  # TensorRT has no float64 arithmetic
    # The cache writes are scatters of the chunk's rows: no index constant grows with the cache (one was a layer's
    # whole cache for each write, 9 GB at 1.3B and 512²).
    assert int64_constant_elements(path) < eager_cache.k[0].numel(), int64_constant_elements(path)
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]

    onnx_k, onnx_v = eager_cache.k.numpy().copy(), eager_cache.v.numpy().copy()
    for chunk_index in range(5):  # past the 9-frame buffer: ring slots are overwritten
        latents = torch.randn(1, 16, CHUNK, H, W)
        for t in (1000.0, 750.0, 0.0):  # two denoising passes and the clean pass share the chunk's slots
            args = inputs(chunk_index, t, latents, eager_cache.k, eager_cache.v)
            eager = model.step(*args[:2], (text_k, text_v), eager_cache.k, eager_cache.v, *args[6:])
            feed = {n: a.numpy() for n, a in zip(names, args, strict=True)}
            feed["cache_k"], feed["cache_v"] = onnx_k, onnx_v
            flow, onnx_k, onnx_v = session.run(None, feed)
            assert rel_error(flow, eager.numpy()) <= 1e-4
            assert rel_error(onnx_k, eager_cache.k.numpy()) <= 1e-4
            assert rel_error(onnx_v, eager_cache.v.numpy()) <= 1e-4


@pytest.mark.parametrize("vae_type", ["wan", "tae"])
@torch.no_grad()
def test_vae_chunk_steps_onnx_equal_eager_with_caches_fed_back(tmp_path: Path, vae_type: str) -> None:
    torch.manual_seed(0)
    model = build_model(vae_type, "tiny").eval()
    pixels = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    latents0, enc_caches = model.encode_first(pixels[:, :, :1])
    _, dec_caches = model.decode_first(latents0)
    steps = {
        "encode": (model.encode_step, pixels[:, :, 1:5], enc_caches, [pixels[:, :, i : i + 4] for i in (5, 9)]),
        "decode": (model.decode_step, torch.randn_like(latents0), dec_caches, [torch.randn_like(latents0)] * 2),
    }
    for direction, (step, example_x, caches, later_inputs) in steps.items():
        path = export_vae_step(model, direction, (example_x, *caches), tmp_path / f"{vae_type}_{direction}.onnx")
        session = ort.InferenceSession(str(path))
        names = [i.name for i in session.get_inputs()]
        eager_caches, onnx_caches = caches, [c.numpy() for c in caches]
        for x in [example_x, *later_inputs]:
            y, eager_caches = step(x, eager_caches)
            outputs = session.run(None, dict(zip(names, [x.numpy(), *onnx_caches], strict=True)))
            assert rel_error(outputs[0], y.numpy()) <= 1e-4, direction
            onnx_caches = outputs[1:]


@torch.no_grad()
def test_vace_step_onnx_equals_eager_with_the_scale_as_an_input(tmp_path: Path) -> None:
    """The VACE-enabled step exports with its fixed-shape context; one graph serves every scale (0 included)."""
    torch.manual_seed(1)
    config = DIT_CONFIGS["tiny"]
    model = VaceWanDiT(config).eval()
    spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, LF, 9)
    policy = RollingSinkPolicy(spec, sink_frames=3)
    context = torch.randn(1, config.text_len, config.text_dim)
    text_k, text_v = model.text_kv(context)
    vace_k, vace_v = model.vace_text_kv(context)
    eager_cache = KVCache(spec, torch.float32)

    def inputs(chunk_index: int, t: float, latents, vace_context, scale: float, cache_k, cache_v):
        plan = policy.plan(chunk_index * CHUNK, CHUNK)
        return (latents, torch.full((1, CHUNK), t), text_k, text_v, cache_k, cache_v, *plan.as_args(),
                vace_context, vace_k, vace_v, torch.tensor(scale))  # fmt: skip

    example = inputs(0, 1000.0, torch.randn(1, 16, CHUNK, H, W), torch.randn(1, VACE_IN_DIM, CHUNK, H, W), 1.0,
                     eager_cache.k.clone(), eager_cache.v.clone())  # fmt: skip
    path = export_vace_step(model, example, tmp_path / "dit_step_vace.onnx")
    assert "DOUBLE" not in float64_uses(path)
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    onnx_k, onnx_v = eager_cache.k.numpy().copy(), eager_cache.v.numpy().copy()
    for chunk_index, scale in enumerate((1.0, 0.0, 1.7)):
        latents, vace_context = torch.randn(1, 16, CHUNK, H, W), torch.randn(1, VACE_IN_DIM, CHUNK, H, W)
        for t in (1000.0, 750.0):
            args = inputs(chunk_index, t, latents, vace_context, scale, eager_cache.k, eager_cache.v)
            eager = model.step_vace(*args[:2], (text_k, text_v), eager_cache.k, eager_cache.v, *args[6:9],
                                    vace_context, (vace_k, vace_v), args[12])  # fmt: skip
            feed = {n: a.numpy() for n, a in zip(names, args, strict=True)}
            feed["cache_k"], feed["cache_v"] = onnx_k, onnx_v
            flow, onnx_k, onnx_v = session.run(None, feed)
            assert rel_error(flow, eager.numpy()) <= 1e-4, scale
            assert rel_error(onnx_k, eager_cache.k.numpy()) <= 1e-4
