"""The autoregressive Wan pipelines (tiny config, seeded random weights), directly and through a running server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.errors import PipelineLoadError
from serve.pipelines.autoregressive import LongLivePipeline, StreamDiffusionV2Pipeline
from serve.pipelines.registry import get_spec
from serve.schemas import LoadParams
from tests.support.rtc_client import ScopeClient
from tests.support.server import RunningServer, load_pipeline, run_server

SIZE = 64


def load(pipeline_cls, pipeline_id: str, **load_params):
    spec = get_spec(pipeline_id)
    params = spec.effective_load_params(LoadParams(**load_params), allow_random_weights=True)
    return spec, pipeline_cls.load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"))


def test_streamdiffusionv2_chunks_are_deterministic_for_a_seed_and_follow_the_vae_contract() -> None:
    spec, pipeline = load(StreamDiffusionV2Pipeline, "streamdiffusionv2", height=SIZE, width=SIZE, random_weights=True)
    params = {**spec.runtime_defaults, "prompts": [{"text": "a cat", "weight": 1.0}]}
    frames = np.random.default_rng(0).integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
    a, b = pipeline.open_stream(7), pipeline.open_stream(7)
    first_a, first_b = a.process(frames, params), b.process(frames, params)
    assert first_a.shape == (1, SIZE, SIZE, 3)  # first chunk: frame 0 alone → one latent → one frame
    assert np.array_equal(first_a, first_b)
    later = a.process(frames, params)
    assert later.shape == (4, SIZE, SIZE, 3) and later.dtype == np.uint8
    other_prompt = b.process(frames, {**params, "prompts": [{"text": "a dog in the snow", "weight": 1.0}]})
    assert not np.array_equal(later, other_prompt)  # the prompt reaches the model
    assert a.process(None, params).shape == (4, SIZE, SIZE, 3)  # text mode


def test_missing_weights_fail_naming_the_files(tmp_path: Path) -> None:
    spec = get_spec("longlive")
    params = spec.effective_load_params(LoadParams(), allow_random_weights=False)
    with pytest.raises(PipelineLoadError) as error:
        LongLivePipeline.load(spec, params, report=lambda *_: None, models_dir=tmp_path)
    message = str(error.value)
    assert "longlive_base.pt" in message and "Wan2.1_VAE.pth" in message and str(tmp_path) in message
    assert "wanrt models download longlive" in message


def test_random_weights_need_the_server_flag(tmp_path: Path) -> None:
    with run_server(tmp_path) as server:
        response = httpx.post(
            f"{server.url}/api/v1/pipeline/load",
            json={"pipeline_id": "longlive", "load_params": {"random_weights": True}},
        )
        assert response.status_code == 400 and "--allow-random-weights" in response.json()["detail"]
        status = load_pipeline(server.url, "longlive")  # real weights: none on this machine
        assert status["status"] == "error" and "weights missing" in status["error"]


async def test_streamdiffusionv2_video_to_video_through_the_server(server: RunningServer) -> None:
    status = load_pipeline(server.url, "streamdiffusionv2", height=SIZE, width=SIZE, random_weights=True)
    assert status["status"] == "loaded" and status["random_weights"] is True and status["backend"] == "eager"
    client = ScopeClient(server.url, initial_parameters={"input_mode": "video", "prompts": [{"text": "anime"}]})
    await client.connect()
    try:
        frames = await client.wait_frames(12, timeout_s=60)
        await client.send({"prompts": [{"text": "a new prompt", "weight": 1.0}], "noise_scale": 0.5})
        stats = await client.wait_message("stats")
        assert stats["backend"] == "eager" and stats["chunks"] >= 1
    finally:
        await client.close()
    assert {(f.width, f.height) for f in frames} == {(SIZE, SIZE)}


async def test_longlive_text_to_video_through_the_server(server: RunningServer) -> None:
    """Also: the load's `warp_denoising_steps` starts the session (raw lists here); the data channel flips it."""
    load_pipeline(server.url, "longlive", height=SIZE, width=SIZE, random_weights=True, warp_denoising_steps=False)
    client = ScopeClient(server.url, send_video=False, initial_parameters={"input_mode": "text"})
    session_id = await client.connect()

    async def warp_setting() -> bool:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            sessions = (await http.get("/api/v1/webrtc/sessions")).json()["sessions"]
        return next(s for s in sessions if s["sessionId"] == session_id)["parameters"]["warp_denoising_steps"]

    try:
        frames = await client.wait_frames(12, timeout_s=90)
        assert await warp_setting() is False
        await client.send({"warp_denoising_steps": True})
        for _ in range(100):
            if await warp_setting():
                break
            await asyncio.sleep(0.05)
        assert await warp_setting() is True
        start = len(client.messages)
        await client.send({"warp_denoising_steps": "yes"})
        assert "warp_denoising_steps" in (await client.wait_message("error", start=start))["message"]
    finally:
        await client.close()
    assert {(f.width, f.height) for f in frames} == {(SIZE, SIZE)}


def test_noise_controller_follows_its_formula() -> None:
    import torch

    from serve.pipelines.policies import NoiseController

    controller = NoiseController(0.7)
    still = torch.zeros(1, 3, 4, 8, 8)
    s, first_t = controller.update(still)  # no motion: d = 0
    assert s == pytest.approx(0.8 * 0.9 + 0.1 * 0.7) and first_t == int(1000 * s) - 100
    moving = still.clone()
    moving[:, :, 2] = 0.1  # one frame pair differs by RMS 0.1 → d = 0.5 (the pair back to 0 too)
    s2, _ = controller.update(moving)
    assert s2 == pytest.approx((0.8 - 0.2 * 0.5) * 0.9 + 0.1 * s)
    fast = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    s3, _ = controller.update(fast)
    assert s3 == pytest.approx((0.8 - 0.2) * 0.9 + 0.1 * s2)  # d clamps at 1


@pytest.mark.parametrize(
    ("load_params", "needle"),
    [
        ({"backend": "tensorrt"}, "backend 'tensorrt' cannot be used"),
    ],
)
def test_options_this_build_cannot_honour_are_refused_not_ignored(load_params: dict, needle: str) -> None:
    with pytest.raises(PipelineLoadError, match=needle):
        load(StreamDiffusionV2Pipeline, "streamdiffusionv2", random_weights=True, **load_params)


def test_krea_loads_with_fp8_weight_storage_by_default_and_generates() -> None:
    from serve.models.fp8 import Fp8Linear
    from serve.pipelines.autoregressive import KreaRealtimePipeline

    spec, pipeline = load(KreaRealtimePipeline, "krea-realtime-video", height=SIZE, width=SIZE, random_weights=True)
    assert spec.load_defaults["quantization"] == "fp8_e4m3fn"
    block = pipeline.models.dit.blocks[0]
    assert isinstance(block.self_attn.q, Fp8Linear) and isinstance(block.ffn[2], Fp8Linear)
    assert not isinstance(pipeline.models.dit.head.head, Fp8Linear)  # the head stays in full precision
    stream = pipeline.open_stream(0)
    params = {**spec.runtime_defaults, "prompts": [{"text": "a cat", "weight": 1.0}]}
    assert stream.process(None, params).shape == (9, SIZE, SIZE, 3)  # the first chunk decodes to 1 + 4·2 frames
    assert stream.process(None, params).shape == (12, SIZE, SIZE, 3)
