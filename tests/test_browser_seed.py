"""The seed's JavaScript, unchanged, in headless Chromium against a running server (the users' contract)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.support.browser import API_BASE_LINE, E2E, launch_chromium, seed_pointed_at, static_server
from tests.support.server import RunningServer

SEED = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "v2v-guide.md"

pytestmark = pytest.mark.browser


def test_vendored_seed_code_is_the_seed_verbatim() -> None:
    if not SEED.exists():
        pytest.skip(f"the seed is not beside this checkout ({SEED})")
    blocks = re.findall(r"```javascript\n(.*?)```", SEED.read_text(), re.S)
    assert (E2E / "seed_client.js").read_text() == blocks[0]
    assert (E2E / "seed_stop.js").read_text() in blocks
    assert (E2E / "seed_upload.js").read_text() in blocks
    assert API_BASE_LINE in blocks[0]


def test_seed_client_streams_passthrough_in_chromium(server: RunningServer, tmp_path: Path) -> None:
    with static_server(E2E, seed_pointed_at(server.url)) as page_origin, launch_chromium() as browser:
        page = browser.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(f"{page_origin}/seed_page.html")  # another origin than the API: CORS must admit it

        status = page.evaluate("seedFlow.load('passthrough', {height: 256, width: 256, seed: 42})")
        assert status["status"] == "loaded"
        session_id = page.evaluate(
            """seedFlow.start('passthrough', {
                prompts: [{ text: "A beautiful landscape", weight: 1.0 }],
                denoising_step_list: [750, 250],
                noise_scale: 0.7,
                noise_controller: true,
                vace_enabled: false,
            })"""
        )
        assert session_id

        deadline = time.monotonic() + 30
        while (output := page.evaluate("seedFlow.outputFrames()"))["frames"] < 30:
            assert time.monotonic() < deadline, f"output {output}; console: {console}; server:\n{server.log()[-3000:]}"
            time.sleep(0.2)
        assert (output["width"], output["height"]) == (256, 256)

        page.evaluate("seedFlow.send({ noise_scale: 0.5 })")  # the seed's runtime update
        page.evaluate("seedFlow.send({ denoising_step_list: [800, 400] })")
        deadline = time.monotonic() + 10
        while True:
            sessions = httpx.get(f"{server.url}/api/v1/webrtc/sessions").json()["sessions"]
            params = next(s for s in sessions if s["sessionId"] == session_id)["parameters"]
            if params["noise_scale"] == 0.5 and params["denoising_step_list"] == [800, 400]:
                break
            assert time.monotonic() < deadline, params
            time.sleep(0.1)
        page.wait_for_function("window.messages.some((m) => m.type === 'stats')", timeout=10_000)
        page.screenshot(path=str(tmp_path / "seed_client.png"))

        page.evaluate("seedFlow.stop()")
        deadline = time.monotonic() + 10
        while server.metrics()["wanrt_sessions_active"] > 0:
            assert time.monotonic() < deadline, "session not freed after the seed's stopStream"
            time.sleep(0.1)
