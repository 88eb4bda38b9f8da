"""Codec choice follows the client: headless Chromium running the seed's JavaScript, with the page asking for H.264
through `setCodecPreferences` (tests/e2e/prefer_h264.js), gets the H.264 packet path (our encoder, packets straight to
aiortc's packetizer); the seed's page as it is keeps VP8 (tests/test_browser_seed.py)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.browser import E2E, launch_chromium, seed_pointed_at, static_server
from tests.support.server import RunningServer

SIZE = 256

pytestmark = pytest.mark.browser


def test_page_preferring_h264_gets_the_packet_path(server: RunningServer) -> None:
    point_at_server = seed_pointed_at(server.url)

    def rewrite(name: str, body: bytes) -> bytes:
        body = point_at_server(name, body)
        if name == "seed_page.html":  # the one line a page adds, before the seed's script
            return body.replace(b'<script src="seed_client.js">', b'<script src="prefer_h264.js"></script>\n'
                                b'  <script src="seed_client.js">')  # fmt: skip
        return body

    with static_server(E2E, rewrite) as page_origin, launch_chromium() as browser:
        page = browser.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(f"{page_origin}/seed_page.html")
        assert page.evaluate("seedFlow.load('passthrough', {height: 256, width: 256})")["status"] == "loaded"
        session_id = page.evaluate("seedFlow.start('passthrough', {input_mode: 'video'})")

        deadline = time.monotonic() + 30
        while (output := page.evaluate("seedFlow.outputFrames()"))["frames"] < 30:
            assert time.monotonic() < deadline, f"output {output}; console: {console}; server:\n{server.log()[-3000:]}"
            time.sleep(0.2)
        assert (output["width"], output["height"]) == (SIZE, SIZE)
        video = httpx.get(f"{server.url}/api/v1/sessions/{session_id}/metrics").json()["video"]
        assert video["codec"] == "video/H264" and video["encoder"] == "libx264", video
        # The browser decoded H.264, and what it shows is the camera's picture (the fake camera's moving pattern).
        inbound = page.evaluate(
            """(async () => {
                const stats = await window.stream.pc.getStats();
                const report = [...stats.values()].find((r) => r.type === "inbound-rtp" && r.kind === "video");
                return { codec: stats.get(report.codecId).mimeType, decoded: report.framesDecoded };
            })()"""
        )
        assert inbound["codec"] == "video/H264" and inbound["decoded"] >= 30, inbound
        spread = page.evaluate(
            """(() => {
                const video = document.getElementById("outputVideo");
                const canvas = Object.assign(document.createElement("canvas"), { width: 64, height: 64 });
                const context = canvas.getContext("2d");
                context.drawImage(video, 0, 0, 64, 64);
                const data = context.getImageData(0, 0, 64, 64).data;
                let min = 255, max = 0;
                for (let i = 1; i < data.length; i += 4) { min = Math.min(min, data[i]); max = Math.max(max, data[i]); }
                return max - min;
            })()"""
        )
        assert spread > 40, f"the output looks flat (green spread {spread}): not the camera's picture"
        page.evaluate("seedFlow.stop()")
