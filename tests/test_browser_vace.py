"""The seed's VACE JavaScript, unchanged, in headless Chromium: its `uploadReferenceImage`, `startV2VStream` with the
VACE parameters, and its runtime VACE update, against a VACE-loaded model pipeline (tiny random weights)."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from tests.support.browser import E2E, launch_chromium, seed_pointed_at, static_server
from tests.support.images import gradient, png_bytes
from tests.support.server import RunningServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def session_parameters(server: RunningServer, session_id: str) -> dict:
    sessions = httpx.get(f"{server.url}/api/v1/webrtc/sessions", timeout=5).json()["sessions"]
    return next(s for s in sessions if s["sessionId"] == session_id)["parameters"]


def test_seed_vace_flow_streams_longlive_in_chromium(server: RunningServer) -> None:
    with static_server(E2E, seed_pointed_at(server.url)) as page_origin, launch_chromium() as browser:
        page = browser.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(f"{page_origin}/seed_page.html")

        status = page.evaluate(
            "seedFlow.load('longlive', {height: 64, width: 64, seed: 42, vace_enabled: true, vae_type: 'wan', "
            "random_weights: true})"
        )
        assert status["status"] == "loaded" and status["load_params"]["vace_enabled"] is True
        png = base64.b64encode(png_bytes(gradient(80, 120, seed=2))).decode()
        path = page.evaluate(f"seedFlow.uploadReference('my ref.png', '{png}')")
        assert path.endswith(".png") and path.startswith(str(server.assets_dir.resolve()))

        session_id = page.evaluate(
            "seedFlow.start('longlive', {prompts: [{ text: 'A beautiful landscape', weight: 1.0 }], "
            "denoising_step_list: [1000, 750], vace_enabled: true, vace_use_input_video: true, "
            f"vace_ref_images: ['{path}'], vace_context_scale: 1.0}})"
        )
        deadline = time.monotonic() + 90
        while (output := page.evaluate("seedFlow.outputFrames()"))["frames"] < 12:
            assert time.monotonic() < deadline, f"output {output}; console: {console}; server:\n{server.log()[-3000:]}"
            time.sleep(0.2)
        assert (output["width"], output["height"]) == (64, 64)

        # The seed's "Update VACE parameters" message, verbatim but for the path.
        page.evaluate(f"seedFlow.send({{ vace_context_scale: 1.5, vace_ref_images: ['{path}'] }})")
        deadline = time.monotonic() + 30
        while session_parameters(server, session_id)["vace_context_scale"] != 1.5:
            assert time.monotonic() < deadline, session_parameters(server, session_id)
            time.sleep(0.1)
        shown = output["frames"]
        deadline = time.monotonic() + 90
        while page.evaluate("seedFlow.outputFrames()")["frames"] < shown + 12:  # frames keep flowing
            assert time.monotonic() < deadline, f"console: {console}; server:\n{server.log()[-3000:]}"
            time.sleep(0.2)
        errors = page.evaluate("window.messages.filter((m) => m.type === 'error' || m.type === 'stream_stopped')")
        assert errors == []
        page.evaluate("seedFlow.stop()")
