"""An AOTInductor package of the tiny DiT step builds and loads on CPU and equals eager (issue 4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from build_engines.aoti import build_aoti_package, load_aoti_package
from build_engines.export import DiTStepGraph
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy

pytestmark = pytest.mark.slow


@torch.no_grad()
def test_aoti_package_of_the_dit_step_equals_eager_over_chunks(tmp_path: Path) -> None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("AOTInductor on CPU needs a C++ compiler (apt-get install g++)")
    torch.manual_seed(0)
    config = DIT_CONFIGS["tiny"]
    model = WanDiT(config).eval()
    spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, 16, 9)
    policy = RollingSinkPolicy(spec, sink_frames=3)
    text_k, text_v = model.text_kv(torch.randn(1, config.text_len, config.text_dim))
    cache = KVCache(spec, torch.float32)
    graph = DiTStepGraph(model)

    def args(chunk: int, cache_k, cache_v):
        latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(chunk))
        timestep = torch.full((1, 3), 750.0)
        return (latents, timestep, text_k, text_v, cache_k, cache_v, *policy.plan(3 * chunk, 3).as_args())

    runner = load_aoti_package(build_aoti_package(graph, args(0, cache.k, cache.v), tmp_path / "dit_step.pt2"))
    eager_k, eager_v = cache.k.clone(), cache.v.clone()
    aoti_k, aoti_v = cache.k.clone(), cache.v.clone()
    for chunk in range(4):  # the caches fed back chunk after chunk, through eviction
        flow, eager_k, eager_v = graph(*args(chunk, eager_k, eager_v))
        aoti_flow, aoti_k, aoti_v = runner(*args(chunk, aoti_k, aoti_v))
        for ours, reference in ((aoti_flow, flow), (aoti_k, eager_k), (aoti_v, eager_v)):
            assert ((ours - reference).abs().max() / reference.abs().max()).item() <= 1e-4
