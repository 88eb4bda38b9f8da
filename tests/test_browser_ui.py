"""The browser UI served at `/`, driven in headless Chromium with a fake camera against a real server."""

from __future__ import annotations

import itertools
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve.pipelines.registry import get_spec
from tests.support.browser import launch_chromium
from tests.support.frames import draw_counter, read_counter
from tests.support.server import RunningServer, load_pipeline, run_server

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
    page.get_by_label("Height", exact=True).fill(str(height))  # not a backend chip whose reason says `--height`
    page.get_by_label("Width", exact=True).fill(str(width))
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
    page.wait_for_function("document.getElementById('load-state-text').textContent.includes(': loaded')")
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
    page.wait_for_function("document.getElementById('load-state-text').textContent.includes(': loaded')")
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
    page.wait_for_function("document.getElementById('load-state-text').textContent.includes(': loaded')")
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


def counter_webm(path: Path, frames: int = 90, fps: int = 30) -> Path:
    """A VP8 clip whose frame i shows the number i in bars (tests/support/frames.py), at 320×240."""
    import av

    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(draw_counter(i, 240, 320), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_ui_records_the_stream_and_downloads_an_mp4_of_it(page, server: RunningServer, tmp_path: Path) -> None:
    import av
    import numpy as np

    clip_frames = 90
    clip = counter_webm(tmp_path / "counter.webm", clip_frames)
    load_in_page(page, "passthrough", 192, 256)
    page.wait_for_function("document.getElementById('load-state-text').textContent.includes(': loaded')")
    assert page.is_disabled("#record-button")  # no stream yet
    page.select_option("#input-source", "file")
    page.get_by_label("Video file").set_input_files(str(clip))
    page.get_by_role("button", name="Start stream").click()
    page.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=10_000)
    session_id = page.inner_text("#session-id").strip()
    wait_output_frames(page, server, 10)

    page.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_function("document.getElementById('record-frames').textContent.includes('frames')", timeout=10_000)
    shown_before = page.evaluate(OUTPUT_FRAMES)
    wait_output_frames(page, server, shown_before + 90)  # about three seconds
    shown = page.evaluate(OUTPUT_FRAMES) - shown_before
    page.get_by_role("button", name="Stop recording").click()
    page.wait_for_selector("#record-download:not([hidden])", timeout=10_000)
    assert "Recorded" in page.inner_text("#record-state")
    page.wait_for_selector(f"#recordings a[href='/api/v1/recordings/{session_id}-1']", timeout=10_000)
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download").click()
    saved = tmp_path / "recording.mp4"
    download_info.value.save_as(saved)
    assert download_info.value.suggested_filename == f"wanrt-{session_id}-1.mp4"
    listed = {r["id"]: r for r in httpx.get(f"{server.url}/api/v1/recordings").json()["recordings"]}
    recorded = listed[f"{session_id}-1"]

    with av.open(str(saved)) as container:
        frames = [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    assert len(frames) == recorded["frames"]
    assert {pixels.shape for _, pixels in frames} == {(192, 256, 3)}
    # The frames that were streamed: about as many as the page showed meanwhile, each a frame of the clip.
    assert 0.6 * shown <= len(frames) + recorded["frames_dropped"] <= 1.4 * shown + 10, (len(frames), shown)
    counters = [read_counter(pixels) for _, pixels in frames]
    assert all(0 <= c < clip_frames for c in counters), counters
    steps = [(b - a) % clip_frames for a, b in itertools.pairwise(counters)]
    # The clip playing on, loops included; captureStream() repeats a frame now and then (a step of 0).
    assert sum(s <= 3 for s in steps) >= 0.9 * len(steps) and sum(s > 0 for s in steps) >= 0.5 * len(steps), counters
    # A known frame: the clip's frame k, resized as the server resizes input, through VP8 twice and H.264.
    middle = len(frames) // 2
    expected = av.VideoFrame.from_ndarray(draw_counter(counters[middle], 240, 320), format="rgb24")
    expected = expected.reformat(width=256, height=192).to_ndarray(format="rgb24")
    assert np.abs(frames[middle][1].astype(int) - expected.astype(int)).mean() < 20
    assert frames[-1][0] > frames[0][0]

    page.get_by_role("button", name="Stop stream").click()
    wait_sessions_freed(server)
    assert not any("pageerror" in line for line in page.console), page.console


PLOTTED = """key => {
  const plot = window.wanrtUI.plots[key];
  const canvas = plot.canvas;
  const ctx = canvas.getContext('2d');
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const hex = plot.color.slice(1).match(/../g).map(h => parseInt(h, 16));
  const near = (i) => Math.abs(data[i] - hex[0]) + Math.abs(data[i + 1] - hex[1]) + Math.abs(data[i + 2] - hex[2]) < 60;
  let linePixels = 0;
  for (let i = 0; i < data.length; i += 4) if (near(i)) linePixels++;
  let atNewest = false;
  if (plot.last) {
    const ratio = canvas.width / canvas.clientWidth;
    for (let dx = -3; dx <= 0; dx++) for (let dy = -2; dy <= 2; dy++) {
      const x = Math.round(plot.last.x * ratio) + dx, y = Math.round(plot.last.y * ratio) + dy;
      const inside = x >= 0 && y >= 0 && x < canvas.width && y < canvas.height;
      if (inside && near((y * canvas.width + x) * 4)) atNewest = true;
    }
  }
  return {samples: plot.samples.map(s => s.v), linePixels, atNewest, max: plot.max, last: plot.last};
}"""


@pytest.mark.slow  # loads the tiny streamdiffusionv2 (several seconds on a CPU)
def test_ui_starts_one_stream_at_a_time_with_the_loaded_pipelines_parameters(page, server: RunningServer) -> None:
    """Two clicks on Start opened two cameras and two sessions (the second got past the guard while the first
    waited for the status), the first never closed; and a stream started while another pipeline was selected sent
    that pipeline's parameters, which the server refused or took as the wrong defaults."""
    load_in_page(page, "passthrough", 128, 128)
    page.wait_for_function("document.getElementById('load-state-text').textContent.includes(': loaded')")
    page.check("#pipeline-streamdiffusionv2")  # its controls show; passthrough is what is loaded
    page.select_option("#input-source", "none")
    page.evaluate("for (const click of [1, 2]) document.getElementById('start-button').click()")
    page.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=10_000)
    session_id = page.inner_text("#session-id").strip()
    wait_output_frames(page, server, 10)
    assert server.metrics()["wanrt_sessions_active"] == 1
    assert page.is_checked("#pipeline-passthrough") and page.is_disabled("#pipeline-streamdiffusionv2")
    assert session_parameters(server, session_id)["input_mode"] == "text"  # the source chosen still holds
    assert not page.is_visible("#alert"), page.inner_text("#alert")
    page.get_by_role("button", name="Stop stream").click()
    wait_sessions_freed(server)
    assert page.is_enabled("#pipeline-streamdiffusionv2")  # a choice again once the stream is stopped


def test_ui_plots_follow_the_stats_and_backends_show_their_reasons(page, server: RunningServer) -> None:
    status = load_pipeline(server.url, "streamdiffusionv2", height=64, width=64, random_weights=True)
    assert status["status"] == "loaded", status
    page.reload()
    page.wait_for_selector("#load-backends li")
    chips = page.locator("#load-backends li")
    assert chips.count() == len(status["backends"]) == 3
    dit = page.locator("#load-backends li", has_text="dit_step")
    assert dit.get_attribute("title") == status["backends"]["dit_step"]["reason"]  # the reason, on hover
    assert "eager" in dit.inner_text()

    page.select_option("#input-source", "webcam")
    page.get_by_role("button", name="Start stream").click()
    page.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=10_000)
    session_id = page.inner_text("#session-id").strip()
    page.wait_for_function("window.wanrtUI.plots.chunk_ms.samples.length >= 4", timeout=60_000)
    page.wait_for_selector("#stream-backends li")
    reason = page.locator("#stream-backends li", has_text="vae_decode").get_attribute("title")
    assert reason == status["backends"]["vae_decode"]["reason"]
    # A keyboard user on a chip keeps it through the stats messages (each re-made the chips, and the focus went).
    page.locator("#stream-backends li", has_text="vae_decode").focus()
    stats_seen = page.evaluate("window.wanrtUI.plots.chunk_ms.samples.length")
    page.wait_for_function(f"window.wanrtUI.plots.chunk_ms.samples.length >= {stats_seen + 2}", timeout=30_000)
    assert page.evaluate("document.activeElement.textContent").startswith("vae_decode")

    # The newest plotted values are the session's latest stats message, which the metrics route also reports.
    deadline = time.monotonic() + 15
    while True:
        metrics = httpx.get(f"{server.url}/api/v1/sessions/{session_id}/metrics", timeout=5).json()
        plotted = {key: page.evaluate(PLOTTED, key) for key in ("fps_out", "latency_ms", "chunk_ms", "dropped")}
        newest = {key: plotted[key]["samples"][-1] for key in ("fps_out", "latency_ms", "chunk_ms")}
        if newest == {key: metrics[key] for key in newest}:
            break
        assert time.monotonic() < deadline, (newest, metrics)
        time.sleep(0.2)
    assert metrics["chunk_ms"] > 0 and metrics["fps_out"] > 0
    for key, result in plotted.items():
        assert result["linePixels"] > 5, (key, result)  # the canvas holds a drawn line (blank: none)
        assert result["atNewest"], (key, result)  # ending where the newest value maps to
        assert all(v >= 0 for v in result["samples"])
        assert result["max"] >= max(result["samples"])  # the axis holds every value
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#plots").screenshot(path=str(ARTIFACTS / "ui_plots.png"))

    # An update the server rejects comes back as {"type": "error"}, and the page shows it.
    assert page.evaluate("window.wanrtUI.session.send({noise_scale: 7})")
    page.wait_for_selector("#alert:not([hidden])", timeout=10_000)
    assert "Server rejected an update" in page.inner_text("#alert") and "noise_scale" in page.inner_text("#alert")
    page.get_by_role("button", name="Stop stream").click()
    wait_sessions_freed(server)


@pytest.mark.slow  # loads the tiny streamdiffusionv2 (several seconds on a CPU)
def test_ui_download_button_fetches_missing_weights_and_load_waits_for_it(browser, tmp_path: Path) -> None:
    from tests.support.checkpoints import write_pipeline_files
    from tests.support.local_hub import run_local_hub

    spec = get_spec("streamdiffusionv2")
    staged = write_pipeline_files(spec.id, tmp_path / "staged")
    with run_local_hub(tmp_path / "hub") as hub, run_server(tmp_path, "--hub-endpoint", hub.url) as own:
        published = {}
        for file in spec.files:
            published[file] = staged.paths[file.path].read_bytes()
            hub.add_file(file.repo, file.path, published[file])
        last = spec.files[-1]  # fetched last: the others are in when it stalls, so the progress is part way
        hub.stall(f"{last.repo}/{last.path}", after_bytes=len(published[last]) // 2)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            page.goto(f"{own.url}/")
            page.wait_for_selector("#download-streamdiffusionv2")
            assert "weights missing" in page.inner_text("#pipelines .pipeline:has(#pipeline-streamdiffusionv2)")
            page.check("#pipeline-streamdiffusionv2")
            page.get_by_role("button", name="Download weights for streamdiffusionv2").click()
            assert hub.stalled.wait(timeout=30)
            # The page polls: wait until it shows the file the hub is holding back (the others are in by then).
            page.wait_for_function(
                "name => document.getElementById('download-text-streamdiffusionv2').textContent.includes(name)",
                arg=last.path,
            )
            assert page.is_disabled("#download-streamdiffusionv2")
            fraction = page.evaluate("document.getElementById('download-progress-streamdiffusionv2').value")
            assert 0 < fraction < 1
            entry = page.locator("#pipelines .pipeline:has(#pipeline-streamdiffusionv2)")
            entry.scroll_into_view_if_needed()
            ARTIFACTS.mkdir(exist_ok=True)
            entry.screenshot(path=str(ARTIFACTS / "ui_downloading.png"))
            page.get_by_label("Height").fill("64")
            page.get_by_label("Width").fill("64")
            page.get_by_role("button", name="Load pipeline").click()
            page.wait_for_function("document.getElementById('load-state-text').textContent.includes('waiting')")
            page.wait_for_timeout(500)
            assert httpx.get(f"{own.url}/api/v1/pipeline/status").json()["status"] == "not_loaded"  # Load waits

            hub.release()
            page.wait_for_function(
                "document.getElementById('load-state-text').textContent.includes('streamdiffusionv2: loaded')",
                timeout=60_000,
            )
            assert httpx.get(f"{own.url}/api/v1/pipeline/status").json()["status"] == "loaded"
            for file, data in published.items():
                assert file.local_path(tmp_path / "models").read_bytes() == data
            assert "weights present" in page.inner_text("#pipelines .pipeline:has(#pipeline-streamdiffusionv2)")
            assert page.locator("#download-streamdiffusionv2").count() == 0
            entry.scroll_into_view_if_needed()
            page.locator("aside").screenshot(path=str(ARTIFACTS / "ui_downloaded.png"))
            assert not errors, errors
        finally:
            context.close()


def test_ui_vace_reference_and_context_scale_reach_a_vace_load_and_frames_keep_coming(
    page, server: RunningServer
) -> None:
    """A VACE load from the page (LongLive, tiny random weights): a reference uploaded from the page and the context
    scale slider reach the session, and the server keeps sending frames. The frames are counted at the server:
    Chromium stops counting a video scrolled out of view, which the controls below it do."""
    from tests.test_api import png_bytes

    page.check("#pipeline-longlive")
    page.get_by_label("Height").fill("64")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Random weights").check()
    page.locator("#load-fields").get_by_label("Vace enabled").check()
    page.get_by_role("button", name="Load pipeline").click()
    # "longlive: loaded": the text starts as "not loaded", which a plain 'loaded' would match at once
    page.wait_for_function(
        "document.getElementById('load-state-text').textContent.includes(': loaded')", timeout=90_000
    )
    assert httpx.get(f"{server.url}/api/v1/pipeline/status", timeout=5).json()["load_params"]["vace_enabled"] is True
    page.select_option("#input-source", "none")
    page.get_by_role("button", name="Start stream").click()
    page.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=30_000)
    session_id = page.inner_text("#session-id").strip()

    def frames_out() -> int:
        sessions = httpx.get(f"{server.url}/api/v1/webrtc/sessions", timeout=5).json()["sessions"]
        return next(s for s in sessions if s["sessionId"] == session_id)["stats"].get("frames_out") or 0

    page.set_input_files(
        "#vace-file", files=[{"name": "ref.png", "mimeType": "image/png", "buffer": png_bytes(64, 64)}]
    )
    page.locator("#runtime-fields").get_by_label("Vace context scale").fill("1.5")
    deadline = time.monotonic() + 30
    while True:
        params = session_parameters(server, session_id)
        if params.get("vace_ref_images") and params.get("vace_context_scale") == 1.5:
            break
        assert time.monotonic() < deadline, params
        time.sleep(0.1)
    assert params["vace_ref_images"][0].endswith(".png")
    before = frames_out()
    deadline = time.monotonic() + 60
    while frames_out() < before + 24:  # two more chunks after the reference conditioned one
        assert time.monotonic() < deadline, f"frames_out stuck at {frames_out()}; server:\n{server.log()[-2000:]}"
        time.sleep(0.2)
