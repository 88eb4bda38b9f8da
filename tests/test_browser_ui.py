"""The browser UI served at `/`, driven in headless Chromium with a fake camera against a real server."""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.browser import launch_chromium
from tests.support.server import RunningServer

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
OUTPUT_FRAMES = "document.getElementById('output-video').getVideoPlaybackQuality().totalVideoFrames"


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\xff\x00\x00" * 2 + b"\x00" + b"\x00\xff\x00" * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def looping_webm(path: Path, frames: int = 48) -> Path:
    """A small VP8 clip of a moving bar, made with PyAV (aiortc's dependency)."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=24)
        stream.width, stream.height, stream.pix_fmt = 160, 128, "yuv420p"
        for i in range(frames):
            image = np.zeros((128, 160, 3), np.uint8)
            image[:, (i * 3) % 160 : (i * 3) % 160 + 16] = (255, 200, 0)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def page(browser, server: RunningServer) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    page.console = console  # type: ignore[attr-defined]
    page.goto(f"{server.url}/")
    page.wait_for_selector("#pipeline-passthrough")
    try:
        yield page
    finally:
        if server.metrics()["wanrt_sessions_active"] > 0 and not page.is_closed():
            page.click("#stop-button") if page.is_enabled("#stop-button") else None
        context.close()
        httpx.post(f"{server.url}/api/v1/pipeline/unload", json={}, timeout=10)


def load_in_page(page, pipeline_id: str, height: int = 256, width: int = 256) -> None:
    page.check(f"#pipeline-{pipeline_id}")
    page.get_by_label("Height").fill(str(height))
    page.get_by_label("Width").fill(str(width))
    page.get_by_role("button", name="Load pipeline").click()


def wait_output_frames(page, server: RunningServer, count: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while (frames := page.evaluate(OUTPUT_FRAMES)) < count:
        assert time.monotonic() < deadline, (
            f"{frames} output frames; status {page.inner_text('header')!r}; console {page.console}; "
            f"server:\n{server.log()[-3000:]}"
        )
        time.sleep(0.2)
    return frames


def session_parameters(server: RunningServer, session_id: str) -> dict:
    sessions = httpx.get(f"{server.url}/api/v1/webrtc/sessions", timeout=5).json()["sessions"]
    return next(s for s in sessions if s["sessionId"] == session_id)["parameters"]


def wait_sessions_freed(server: RunningServer, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while server.metrics()["wanrt_sessions_active"] > 0:
        assert time.monotonic() < deadline, "session not freed after Stop"
        time.sleep(0.1)


def test_ui_lists_pipelines_loads_passthrough_streams_webcam_and_steers(page, server: RunningServer) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    text = page.inner_text("#pipelines")
    assert "Passthrough" in text and "longlive" in text
    assert "weights present" in text and "mode: video" in text and "weights missing" in text

    load_in_page(page, "passthrough")
    page.wait_for_function("document.getElementById('load-state-text').textContent.includes('loaded')")
    status = httpx.get(f"{server.url}/api/v1/pipeline/status").json()
    assert status["status"] == "loaded" and status["load_params"]["height"] == 256

    page.select_option("#input-source", "webcam")
    page.get_by_role("button", name="Start stream").click()
    page.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=10_000)
    session_id = page.inner_text("#session-id").strip()
    wait_output_frames(page, server, 20)
    assert page.evaluate("document.getElementById('input-video').videoWidth") > 0
    assert page.evaluate("document.getElementById('output-video').videoWidth") == 256
    params = session_parameters(server, session_id)
    assert params["noise_controller"] is True and params["manage_cache"] is True  # checkbox defaults from the schema
    assert params["input_mode"] == "video" and params["prompts"][0]["text"] == "A beautiful landscape"

    # Move the noise_scale slider with the keyboard, as a user would: focus then ArrowLeft x3 (step 0.01).
    slider = page.get_by_label("Noise scale")
    assert slider.get_attribute("type") == "range"
    slider.focus()
    for _ in range(3):
        page.keyboard.press("ArrowLeft")
    deadline = time.monotonic() + 10
    while abs(session_parameters(server, session_id)["noise_scale"] - 0.67) > 1e-6:
        assert time.monotonic() < deadline, session_parameters(server, session_id)
        time.sleep(0.1)
    assert page.locator(f"output[for='{slider.get_attribute('id')}']").inner_text() == "0.67"

    # A step list typed as comma separated integers, and a prompt change with a transition.
    page.get_by_label("Denoising step list").fill("800, 400")
    page.get_by_label("Denoising step list").press("Enter")
    page.get_by_label("Denoising step list").blur()
    page.get_by_label("Prompt 1", exact=True).fill("A snowy mountain")
    page.get_by_role("button", name="Apply prompts").click()
    deadline = time.monotonic() + 10
    while True:
        params = session_parameters(server, session_id)
        if params["denoising_step_list"] == [800, 400] and "snowy" in str(
            params.get("transition") or params["prompts"]
        ):
            break
        assert time.monotonic() < deadline, params
        time.sleep(0.1)

    # A VACE reference image goes through the assets endpoint, then its path is sent as vace_ref_images.
    page.set_input_files("#vace-file", files=[{"name": "ref.png", "mimeType": "image/png", "buffer": tiny_png()}])
    deadline = time.monotonic() + 10
    while not (refs := session_parameters(server, session_id)["vace_ref_images"]):
        assert time.monotonic() < deadline, (page.inner_text("header"), page.console)
        time.sleep(0.1)
    assert refs[0].endswith(".png") and refs[0] in page.inner_text("#vace-list")

    # Two weighted prompts, switched at once (transition steps 0), arrive as `prompts`.
    page.get_by_role("button", name="Add prompt").click()
    page.get_by_label("Prompt 2", exact=True).fill("A red barn")
    page.get_by_label("Prompt 2 weight").fill("0.5")
    page.get_by_label("Transition steps").fill("0")
    page.get_by_role("button", name="Apply prompts").click()
    expected = [{"text": "A snowy mountain", "weight": 1.0}, {"text": "A red barn", "weight": 0.5}]
    deadline = time.monotonic() + 10
    while [
        {"text": p["text"], "weight": p["weight"]} for p in session_parameters(server, session_id)["prompts"]
    ] != expected:
        assert time.monotonic() < deadline, session_parameters(server, session_id)
        time.sleep(0.1)

    # An update the server rejects comes back as an `error` message, shown in the alert area.
    page.evaluate("window.wanrtUI.session.send({ noise_scale: 5 })")
    page.wait_for_selector("#alert:not([hidden])", timeout=10_000)
    assert "Server rejected an update" in page.inner_text("#alert") and "noise_scale" in page.inner_text("#alert")
    # Values out of the schema's bounds are not sent; the page says why.
    page.get_by_label("Denoising step list").fill("800, 5000")
    page.get_by_label("Denoising step list").blur()
    page.wait_for_function("document.getElementById('alert').textContent.includes('5000 > 1000')")
    assert page.get_by_label("Denoising step list").get_attribute("aria-invalid") == "true"
    page.get_by_role("button", name="Dismiss error").click()
    assert session_parameters(server, session_id)["denoising_step_list"] == [800, 400]

    page.wait_for_function("document.querySelector('[data-stat=fps_out]').textContent !== '–'", timeout=10_000)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "ui_1280x800.png"))
    page.set_viewport_size({"width": 420, "height": 900})
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "ui_420x900.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})

    page.get_by_role("button", name="Stop stream").click()
    wait_sessions_freed(server)
    assert page.is_enabled("#start-button")
    assert page.console == [] or not any("pageerror" in line for line in page.console), page.console


def test_ui_load_form_checks_the_schema_before_sending(page, server: RunningServer) -> None:
    load_in_page(page, "passthrough", height=100)
    page.wait_for_selector("#load-error:not([hidden])", timeout=5_000)
    assert "height: 100 is not a multiple of 16" in page.inner_text("#load-error")
    assert httpx.get(f"{server.url}/api/v1/pipeline/status").json()["status"] == "not_loaded"


@pytest.mark.parametrize(
    ("pipeline_id", "needle"),
    [
        ("longlive", "weights missing"),  # accepted, then the load ends in status `error`
    ],
)
def test_ui_failing_load_shows_the_error(page, server: RunningServer, pipeline_id: str, needle: str) -> None:
    load_in_page(page, pipeline_id)
    page.wait_for_selector("#load-error:not([hidden])", timeout=10_000)
    error = page.inner_text("#load-error")
    assert needle in error, error
    assert pipeline_id in page.inner_text("[role=alert] >> nth=0")
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / f"ui_load_error_{pipeline_id}.png"))


def test_ui_text_mode_streams_without_input(page, server: RunningServer) -> None:
    load_in_page(page, "passthrough", 128, 128)
    page.wait_for_function("document.getElementById('load-state-text').textContent.includes('loaded')")
    page.select_option("#input-source", "none")
    page.get_by_role("button", name="Start stream").click()
    page.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=10_000)
    session_id = page.inner_text("#session-id").strip()
    wait_output_frames(page, server, 20)
    assert session_parameters(server, session_id)["input_mode"] == "text"

    # Unloading the pipeline stops the session: the server's stream_stopped message is shown in the alert area.
    httpx.post(f"{server.url}/api/v1/pipeline/unload", json={}, timeout=10).raise_for_status()
    page.wait_for_selector("#alert:not([hidden])", timeout=10_000)
    assert "Stream stopped: pipeline unloaded" in page.inner_text("#alert"), page.inner_text("#alert")
    page.wait_for_function("!document.getElementById('start-button').disabled")
    wait_sessions_freed(server)
    # Starting again without a loaded pipeline says so.
    page.get_by_role("button", name="Dismiss error").click()
    page.get_by_role("button", name="Start stream").click()
    page.wait_for_function("document.getElementById('alert').textContent.includes('Load a pipeline')")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "ui_stream_stopped.png"))


def test_ui_streams_a_looped_video_file(page, server: RunningServer, tmp_path: Path) -> None:
    clip = looping_webm(tmp_path / "clip.webm")
    load_in_page(page, "passthrough", 128, 128)
    page.wait_for_function("document.getElementById('load-state-text').textContent.includes('loaded')")
    page.select_option("#input-source", "file")
    page.get_by_label("Video file").set_input_files(str(clip))
    page.get_by_role("button", name="Start stream").click()
    page.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=10_000)
    session_id = page.inner_text("#session-id").strip()
    # More output frames than the 48-frame clip holds: the file plays in a loop.
    wait_output_frames(page, server, 72)
    assert page.evaluate("document.getElementById('input-video').loop")
    assert session_parameters(server, session_id)["input_mode"] == "video"
    page.get_by_role("button", name="Stop stream").click()
    wait_sessions_freed(server)
