"""Headless Debian Chromium through Playwright, with a fake camera, and a static server for test pages.

Never `playwright install`: it downloads a browser, which this network does not allow. Debian's package is used.
"""

from __future__ import annotations

import functools
import io
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.support.frames import draw_counter

E2E = Path(__file__).parents[1] / "e2e"  # the seed's JavaScript (tests/test_browser_seed.py checks it is the guide's)
API_BASE_LINE = 'const API_BASE = "http://localhost:8000";'
"""The seed's one line a user edits: where the server is."""


def seed_pointed_at(api_url: str) -> Callable[[str, bytes], bytes]:
    """A `static_server` rewrite serving the seed's client with API_BASE set to `api_url`, all else unchanged."""

    def rewrite(name: str, body: bytes) -> bytes:
        if name != "seed_client.js":
            return body
        assert API_BASE_LINE.encode() in body
        return body.replace(API_BASE_LINE.encode(), f'const API_BASE = "{api_url}";'.encode())

    return rewrite


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream=fps=30",
    # WebRTC over loopback: Chromium skips the loopback interface and hides local addresses behind mDNS otherwise.
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")


def write_counter_clip(path: Path, frames: int, height: int, width: int, fps: int = 30) -> Path:
    """A Y4M clip for Chromium's fake camera (`--use-file-for-fake-video-capture=<path>`, which loops it): frame i
    shows draw_counter(i) in luma (BT.601 limited range: black 16, white 235), chroma neutral."""
    chroma = np.full((height // 2) * (width // 2) * 2, 128, np.uint8).tobytes()  # U then V, 4:2:0
    with path.open("wb") as clip:
        clip.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for index in range(frames):
            luma = 16 + (draw_counter(index, height, width)[..., 0].astype(np.uint16) * 219 // 255)
            clip.write(b"FRAME\n" + luma.astype(np.uint8).tobytes() + chroma)
    return path


@contextmanager
def launch_chromium(extra_args: list[str] | None = None) -> Iterator[object]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + (extra_args or [])
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def static_server(directory: Path, rewrite: Callable[[str, bytes], bytes] | None = None) -> Iterator[str]:
    """Serves `directory` on 127.0.0.1 (another origin than the API server); `rewrite(path, body)` may edit files."""

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def send_head(self):  # type: ignore[override]
            if rewrite is None:
                return super().send_head()
            path = Path(self.translate_path(self.path))
            if not path.is_file():
                return super().send_head()
            body = rewrite(path.name, path.read_bytes())
            self.send_response(200)
            self.send_header("Content-Type", self.guess_type(str(path)))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
