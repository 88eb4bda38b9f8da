"""Codec choice follows the client: headless Chromium running the seed's JavaScript as it is gets VP8, and with the page
asking for H.264 through `setCodecPreferences` (tests/e2e/prefer_h264.js) gets H.264; a server started with
`--codec-preference h264` gives the seed's page as it is H.264; all on the packet path (our encoder, packets straight
to aiortc's packetizer), and the browser sends the codec it receives.

The page's fake camera plays a clip whose frames show their index (tests/support/frames.py), so what the page's
<video> presents is checked against the frame drawn for the index it reads; tests/e2e/receiver_probe.js samples every
presented frame and, through an Encoded Transform on the receiver, sees each encoded frame arrive and sends a PLI."""

from __future__ import annotations

import base64
import contextlib
import itertools
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.browser import E2E, launch_chromium, seed_pointed_at, static_server, write_counter_clip
from tests.support.frames import COUNTER_BITS, draw_counter, read_counter
from tests.support.server import RunningServer, run_server

SIZE = 256  # the clip's, the camera's and the load's: the server's resize to the loaded resolution is the identity
CLIP_FRAMES = 300  # 10 s at 30 fps, longer than the test streams; the fake camera loops it
LOOP_SLACK = 30  # frames either side of the clip's end within which a reading may go back to the start (the loop)
FRAME_INTERVAL_S = 1 / 30
RTP_WRAP = 1 << 32
# The picture is compared with the frame drawn for its index away from the bars' edges, which the camera's own
# encoder may soften (it scales its input down when the machine is busy): there every pixel is black or white.
BAR_EDGES = np.arange(0, SIZE + 1, SIZE // COUNTER_BITS)
BAR_INTERIOR = np.abs(np.arange(SIZE)[:, None] - BAR_EDGES).min(axis=1) > 3
MAX_ERROR = 48  # levels of 255: H.264's error on flat black and white is a few levels; a wrong bar is 255

pytestmark = pytest.mark.browser

INBOUND_STATS = """(async () => {
    const stats = await window.stream.pc.getStats();
    const report = [...stats.values()].find((r) => r.type === "inbound-rtp" && r.kind === "video");
    const outbound = [...stats.values()].find((r) => r.type === "outbound-rtp" && r.kind === "video");
    return { codec: stats.get(report.codecId).mimeType, decoded: report.framesDecoded,
             keyFramesDecoded: report.keyFramesDecoded, requests: report.pliCount + report.firCount,
             sending: outbound && outbound.codecId ? stats.get(outbound.codecId).mimeType : null };
})()"""


def clip_indices(frames: list[dict[str, Any]]) -> list[int]:
    """The clip index each presented frame shows, checked to be the frame drawn for it, counted across the loop."""
    indices, loops = [], 0
    for frame in frames:
        green = np.frombuffer(base64.b64decode(frame["green"]), np.uint8).reshape(frame["height"] // 4, -1)
        index = read_counter(green[..., None])
        error = np.abs(green.astype(np.int16) - draw_counter(index, *green.shape)[..., 1])[:, BAR_INTERIOR].max()
        assert error < MAX_ERROR, f"presented frame reads {index} but is not that frame's picture (error {error})"
        if indices and index < indices[-1] - loops * CLIP_FRAMES:
            previous = indices[-1] - loops * CLIP_FRAMES
            assert previous >= CLIP_FRAMES - LOOP_SLACK and index < LOOP_SLACK, f"{index} after {previous}"
            loops += 1  # the camera looped back to the clip's first frame
        indices.append(index + loops * CLIP_FRAMES)
    return indices


def increasing_rtp(timestamps: list[int]) -> bool:
    return all(0 < (later - earlier) % RTP_WRAP < RTP_WRAP // 2 for earlier, later in itertools.pairwise(timestamps))


@pytest.mark.parametrize(
    ("preference", "server_preference", "codec", "encoder"),
    [
        ("", None, "video/VP8", "libvpx"),
        ("prefer_h264.js", None, "video/H264", "libx264"),
        ("", "h264", "video/H264", "libx264"),
    ],
    ids=["seed-as-is-vp8", "prefer-h264", "server-prefers-h264"],
)
def test_page_gets_its_codec_on_the_packet_path(
    server: RunningServer, tmp_path: Path, preference: str, server_preference: str | None, codec: str, encoder: str
) -> None:
    """Issue 13: the clip's frames arrive in order with their content, and a PLI from Chromium gets a keyframe at
    once."""
    with contextlib.ExitStack() as stack:
        if server_preference is not None:  # a server of its own, started with the preference
            server = stack.enter_context(run_server(tmp_path, "--codec-preference", server_preference))
        check_the_packet_path(server, tmp_path, preference, codec, encoder)


def check_the_packet_path(server: RunningServer, tmp_path: Path, preference: str, codec: str, encoder: str) -> None:
    point_at_server = seed_pointed_at(server.url)
    # Before the seed's script: the one line a page adds to ask for H.264 (if it does), and the test's probe.
    seed = '<script src="seed_client.js">'
    added = [f'<script src="{script}"></script>' for script in (preference, "receiver_probe.js") if script]

    def rewrite(name: str, body: bytes) -> bytes:
        body = point_at_server(name, body)
        if name == "seed_page.html":
            return body.replace(seed.encode(), "\n  ".join([*added, seed]).encode())
        return body

    clip = write_counter_clip(tmp_path / "counter.y4m", CLIP_FRAMES, SIZE, SIZE)
    camera = [f"--use-file-for-fake-video-capture={clip}"]
    with static_server(E2E, rewrite) as page_origin, launch_chromium(camera) as browser:
        page = browser.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(f"{page_origin}/seed_page.html")
        assert page.evaluate("seedFlow.load('passthrough', {height: 256, width: 256})")["status"] == "loaded"
        session_id = page.evaluate(
            "seedFlow.start('passthrough', {input_mode: 'video'}, {width: 256, height: 256})"
        )  # the clip's size, so the camera neither crops nor scales it
        metrics_url = f"{server.url}/api/v1/sessions/{session_id}/metrics"

        deadline = time.monotonic() + 30
        while (presented := page.evaluate("receiverProbe.presented().length")) < 45:
            assert time.monotonic() < deadline, (
                f"{presented} frames; console: {console}; server:\n{server.log()[-3000:]}"
            )
            time.sleep(0.2)
        video = httpx.get(metrics_url).json()["video"]
        assert video["codec"] == codec and video["encoder"] == encoder, video
        inbound = page.evaluate(INBOUND_STATS)
        assert inbound["codec"] == codec and inbound["decoded"] >= 30 and inbound["keyFramesDecoded"] >= 1
        assert inbound["sending"] == codec, inbound  # the camera goes out in the answer's first codec too (JSEP)

        # A PLI from the browser (the Encoded Transform's sendKeyFrameRequest): the next frame encoded is a keyframe.
        # (Unasked keyframes are no fault here: the encoder reopens with one when Chromium's REMB moves the bitrate,
        # seconds in.)
        request = page.evaluate("receiverProbe.requestKeyFrame()")
        assert "requestedAt" in request, request

        def since_request() -> list[dict[str, Any]]:
            return [f for f in page.evaluate("receiverProbe.encodedFrames()") if f["at"] > request["requestedAt"]]

        deadline = time.monotonic() + 5
        while len(after := since_request()) < 6:
            assert time.monotonic() < deadline, f"{len(after)} frames since the PLI; server:\n{server.log()[-3000:]}"
            time.sleep(0.1)
        keyframe = next((i for i, frame in enumerate(after) if frame["type"] == "key"), None)
        # The frame after the request may have been encoded before the PLI landed; the one after it is the keyframe.
        assert keyframe is not None and keyframe <= 1, [frame["type"] for frame in after]
        assert after[keyframe]["at"] - request["requestedAt"] < (3 * FRAME_INTERVAL_S + 0.1) * 1000

        # Every keyframe request the browser sent (this one, and any of its own) reached the server and was answered.
        deadline = time.monotonic() + 5
        while True:
            sent = page.evaluate(INBOUND_STATS)
            counted = httpx.get(metrics_url).json()["video"]
            if counted["keyframes_requested"] == sent["requests"]:
                break
            assert time.monotonic() < deadline, f"browser sent {sent}, server counted {counted}"
            time.sleep(0.1)
        assert sent["requests"] >= 1 and counted["keyframes"] >= 1 + 1, (sent, counted)  # the first, the asked one
        assert counted["keyframes"] >= sent["keyFramesDecoded"] >= 2, (sent, counted)

        received = page.evaluate("receiverProbe.encodedFrames()")
        frames = page.evaluate("receiverProbe.presented()")
        page.evaluate("seedFlow.stop()")

    # In order: each encoded frame arrives, and each decoded one is presented, after the one before it.
    assert increasing_rtp([frame["rtpTimestamp"] for frame in received])
    assert increasing_rtp([frame["rtpTimestamp"] for frame in frames])
    assert all((frame["width"], frame["height"]) == (SIZE, SIZE) for frame in frames)
    # What the page shows is the camera's clip, frame by frame, in order: each presented frame is the picture drawn
    # for the index it reads, and the indices only go forward.
    indices = clip_indices(frames)
    assert indices == sorted(indices), indices
    assert len(set(indices)) >= 30, indices
    assert max(np.ptp(np.frombuffer(base64.b64decode(frame["green"]), np.uint8)) for frame in frames) > 40, "flat"
