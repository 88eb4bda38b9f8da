"""VACE through a running server, as the seed's users drive it: load with `vace_enabled`, upload a reference image
with POST /api/v1/assets, stream V2V and T2V with `vace_ref_images` from an aiortc client, change the VACE
parameters on the data channel; bad values get `{"type": "error"}` and the stream goes on."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.support.images import gradient, png_bytes
from tests.support.rtc_client import ScopeClient, StillTrack
from tests.support.server import RunningServer, load_pipeline

SIZE = 64
MODEL_PIPELINES = ["streamdiffusionv2", "longlive", "reward-forcing", "memflow", "krea-realtime-video"]
PROMPT = [{"text": "a cat", "weight": 1.0}]


def upload(server: RunningServer, image: np.ndarray, name: str = "ref.png") -> str:
    response = httpx.post(
        f"{server.url}/api/v1/assets?filename={name}", content=png_bytes(image),
        headers={"Content-Type": "application/octet-stream"}, timeout=10,
    )  # fmt: skip
    response.raise_for_status()
    return response.json()["path"]


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


async def first_frames(url: str, count: int, initial: dict, image: np.ndarray | None) -> np.ndarray:
    client = ScopeClient(
        url, send_video=image is not None, input_track=None if image is None else StillTrack(image),
        initial_parameters={"prompts": PROMPT, **initial}, keep_pixels=True,
        estimate_bandwidth=False,  # the same lossy coding in every session compared
    )  # fmt: skip
    await client.connect()
    try:
        await client.wait_frames(count, timeout_s=120)
    finally:
        await client.close()
    assert {(f.width, f.height) for f in client.frames} == {(SIZE, SIZE)}
    return np.stack([f.pixels for f in client.frames[:count]])


@pytest.mark.slow
@pytest.mark.parametrize("pipeline_id", MODEL_PIPELINES)
async def test_vace_streams_with_an_uploaded_reference(server: RunningServer, pipeline_id: str) -> None:
    status = load_pipeline(server.url, pipeline_id, timeout_s=120, height=SIZE, width=SIZE, random_weights=True,
                           vace_enabled=True)  # fmt: skip
    assert status["status"] == "loaded", status
    assert status["backends"]["dit_step_vace"]["backend"] == "eager"
    ref = upload(server, gradient(96, 128, seed=len(pipeline_id)))
    first = 1 if pipeline_id == "streamdiffusionv2" else 9  # the first chunk's frames
    camera = gradient(SIZE, SIZE, seed=1)

    # V2V (input video as the VACE control): same seed and still input give the same frames; a ref changes them.
    video = {"input_mode": "video"}
    plain = await first_frames(server.url, first, video, camera)
    again = await first_frames(server.url, first, video, camera)
    referenced = await first_frames(server.url, first, {**video, "vace_ref_images": [ref]}, camera)
    # The frames cross VP8 both ways, whose rate control varies a few levels between sessions on noise-like frames
    # (random weights), so the comparison is of mean differences: the ref's effect stands far above that noise.
    noise, effect = mean_difference(plain, again), mean_difference(plain, referenced)
    assert effect > max(4 * noise, 2.0), (noise, effect)

    # T2V with references, and the seed's runtime VACE update; bad values are refused, frames keep flowing.
    text = {"input_mode": "text", "prompts": PROMPT, "vace_ref_images": [ref]}
    client = ScopeClient(server.url, send_video=False, initial_parameters=text)
    session_id = await client.connect()
    try:
        await client.wait_frames(first, timeout_s=120)
        start = len(client.messages)
        await client.send({"vace_context_scale": 1.5, "vace_ref_images": [ref]})
        await client.send({"vace_context_scale": 2.5})
        error = await client.wait_message("error", start=start)
        assert "vace_context_scale" in error["message"]
        start = len(client.messages)
        await client.send({"vace_ref_images": ["/etc/passwd"]})
        assert "not an uploaded asset" in (await client.wait_message("error", start=start))["message"]
        received = len(client.frames)
        await client.wait_frames(received + first, timeout_s=120)
        sessions = httpx.get(f"{server.url}/api/v1/webrtc/sessions", timeout=5).json()["sessions"]
        params = next(s for s in sessions if s["sessionId"] == session_id)["parameters"]
        assert params["vace_context_scale"] == 1.5 and params["vace_ref_images"] == [ref]
        assert params["vace_enabled"] is True  # the session started with the load's setting
    finally:
        await client.close()
