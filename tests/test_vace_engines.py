"""`wanrt engines build --vace`: the VACE-enabled DiT step as an AOTInductor package, chosen by a VACE load like any
other engine and producing the frames eager produces; the base step's engine serves VACE and plain loads alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.pipelines.autoregressive import StreamDiffusionV2Pipeline
from serve.pipelines.registry import get_spec
from serve.schemas import LoadParams
from tests.support.engines import PIPELINE, SIZE, build_args, wanrt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engines_dir(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny engines plus the VACE step: `--vace` builds only what is missing."""
    folder = Path(shutil.copytree(tiny_engines, tmp_path_factory.mktemp("vace-engines") / "engines"))
    result = wanrt(*build_args(folder, "--vace"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "built: streamdiffusionv2 dit_step_vace 64x64 fp32 (aoti)" in result.stdout, result.stdout
    assert result.stdout.count("up to date") == 3  # the base step and the VAE's two: reused, not rebuilt
    return folder


def load(engines_dir: Path, backend: str, vace: bool) -> StreamDiffusionV2Pipeline:
    spec = get_spec(PIPELINE)
    params = spec.effective_load_params(
        LoadParams(height=SIZE, width=SIZE, random_weights=True, backend=backend, vace_enabled=vace),
        allow_random_weights=True,
    )
    return StreamDiffusionV2Pipeline.load(  # type: ignore[return-value]
        spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"), engines_dir=engines_dir
    )


@torch.no_grad()
def test_vace_engine_is_chosen_and_equals_eager(engines_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    eager, compiled = load(engines_dir, "eager", True), load(engines_dir, "auto", True)
    assert compiled.backends["dit_step_vace"]["backend"] == "compiled", compiled.backends
    assert compiled.backends["dit_step"]["backend"] == "compiled"  # the base step's hash: base weights only
    assert load(engines_dir, "auto", False).backends["dit_step"]["backend"] == "compiled"  # and without VACE

    spec = get_spec(PIPELINE)
    params = {**spec.runtime_defaults, "vace_enabled": True, "prompts": [{"text": "a cat", "weight": 1.0}]}
    rng = np.random.default_rng(0)
    a, b = eager.open_stream(7), compiled.open_stream(7)
    with caplog.at_level("INFO", logger="serve.runtime.backends"):
        for chunk in range(4):  # input video as the VACE control; the scale changes on one engine
            frames = rng.integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
            step = {**params, "vace_context_scale": (1.0, 0.0, 1.7, 1.0)[chunk]}
            ours, reference = b.process(frames, step), a.process(frames, step)
            assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    assert not [r.message for r in caplog.records if "runs eager" in r.message]  # every VACE step on the engine
    assert torch.allclose(b.cache.k, a.cache.k, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@torch.no_grad()
def test_tensorrt_vace_engine_is_chosen_and_equals_eager(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it comes from NVIDIA's index, not PyPI)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    args = build_args(tmp_path, "--vace", "--precision", "fp32")
    args[args.index("aoti")] = "tensorrt"
    result = wanrt(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    eager, engine = load(tmp_path, "eager", True), load(tmp_path, "tensorrt", True)
    assert engine.backends["dit_step_vace"]["backend"] == "tensorrt", engine.backends

    spec = get_spec(PIPELINE)
    params = {**spec.runtime_defaults, "vace_enabled": True, "prompts": [{"text": "a cat", "weight": 1.0}]}
    rng = np.random.default_rng(0)
    a, b = eager.open_stream(7), engine.open_stream(7)
    for chunk in range(4):  # the first call captures the CUDA graph, the next ones replay it with new inputs
        frames = rng.integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
        step = {**params, "vace_context_scale": (1.0, 0.0, 1.7, 1.0)[chunk]}
        ours, reference = b.process(frames, step), a.process(frames, step)
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 2
    assert torch.allclose(b.cache.k, a.cache.k, atol=1e-3, rtol=1e-3)
