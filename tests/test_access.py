"""Local-server protection against a running server: the API token, the warning for an open bind, and web pages from
other sites (in Chromium) that try to drive the server without a CORS preflight or through DNS rebinding."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.browser import launch_chromium, static_server
from tests.support.server import RunningServer, load_pipeline, run_server

TOKEN = "s3cret-token-for-tests"
E2E = Path(__file__).parent / "e2e"
README = Path(__file__).parents[1] / "README.md"
FOREIGN_HOST = "evil.example"  # Chromium resolves it to 127.0.0.1: a hostile site, and a rebinding one
PATH_PARAMETER = re.compile(r"\{[^}]+\}")


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(tmp_path_factory.mktemp("token"), "--api-token", TOKEN, "--allowed-host", "wanrt.lan") as running:
        yield running


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_with_a_token_every_api_route_needs_it(token_server: RunningServer) -> None:
    schema = httpx.get(f"{token_server.url}/schema/openapi.json").json()  # the API docs stay public
    routes = [(method, path) for path, item in schema["paths"].items() for method in item if path != "/health"]
    assert len(routes) >= 14, routes
    with httpx.Client(base_url=token_server.url, timeout=10) as http:
        for method, path in [*routes, ("get", "/metrics")]:
            url = PATH_PARAMETER.sub("x", path)
            for headers in ({}, bearer("wrong"), {"authorization": TOKEN}, {"authorization": "Basic czNjcmV0"}):
                response = http.request(method, url, headers={"content-type": "application/json", **headers})
                assert response.status_code == 401, (method, path, headers, response.text)
                assert "Bearer" in response.headers["www-authenticate"]
                assert "Authorization: Bearer" in response.json()["detail"]
        assert http.get("/health").status_code == 200
        assert http.get("/").status_code == 200 and "<html" in http.get("/").text.lower()
        assert http.get("/api/v1/pipeline/status", headers=bearer()).json()["status"] == "not_loaded"
        assert http.post("/api/v1/pipeline/load", json={"pipeline_id": "passthrough"}, headers=bearer()).is_success
        assert http.get("/metrics", headers=bearer()).status_code == 200


def test_a_configured_host_name_is_answered(token_server: RunningServer) -> None:
    port = token_server.url.rsplit(":", 1)[1]
    for host, status in ((f"wanrt.lan:{port}", 200), ("WANRT.LAN", 200), (f"other.lan:{port}", 400)):
        response = httpx.get(f"{token_server.url}/api/v1/pipeline/status", headers={"host": host, **bearer()})
        assert response.status_code == status, (host, response.text)


def test_a_browser_may_send_the_token_after_the_preflight(token_server: RunningServer) -> None:
    preflight = httpx.options(
        f"{token_server.url}/api/v1/pipeline/load",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )  # a preflight carries no token: CORS decides it
    assert preflight.status_code in (200, 204), preflight.text
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()


def test_readme_shows_the_token_shim_the_browser_test_uses() -> None:
    assert (E2E / "api_token.js").read_text() in README.read_text()


@pytest.mark.browser
def test_the_seed_flow_streams_with_a_token(token_server: RunningServer) -> None:
    """The seed's JavaScript, unchanged, with the README's shim loaded before it."""

    def serve_page(name: str, body: bytes) -> bytes:
        if name == "seed_client.js":
            return body.replace(b"http://localhost:8000", token_server.url.encode())
        if name == "api_token.js":
            return body.replace(b"paste-the-token-here", TOKEN.encode())
        if name == "seed_page.html":
            return body.replace(
                b'<script src="seed_client.js">',
                b'<script src="api_token.js"></script>\n  <script src="seed_client.js">',
            )
        return body

    with static_server(E2E, serve_page) as origin, launch_chromium() as browser:
        page = browser.new_page()
        page.goto(f"{origin}/seed_page.html")
        assert page.evaluate("seedFlow.load('passthrough', {height: 128, width: 128})")["status"] == "loaded"
        session_id = page.evaluate("seedFlow.start('passthrough', {noise_scale: 0.7})")
        deadline = time.monotonic() + 30
        while page.evaluate("seedFlow.outputFrames()")["frames"] < 10:
            assert time.monotonic() < deadline, token_server.log()[-3000:]
            time.sleep(0.2)
        sessions = httpx.get(f"{token_server.url}/api/v1/webrtc/sessions", headers=bearer()).json()["sessions"]
        assert [s["sessionId"] for s in sessions] == [session_id]
        page.evaluate("seedFlow.stop()")


@pytest.mark.browser
def test_a_page_from_another_site_cannot_drive_the_server(server: RunningServer) -> None:
    """Text, form and body-less POSTs need no CORS preflight; none of them may reach a handler."""
    load_pipeline(server.url, "passthrough", height=128, width=128)
    assets_before = httpx.get(f"{server.url}/api/v1/assets").json()["assets"]
    with (
        static_server(E2E) as origin,
        launch_chromium([f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1"]) as browser,
    ):
        page = browser.new_page()
        page.goto(origin.replace("127.0.0.1", FOREIGN_HOST) + "/foreign_page.html")
        page.evaluate(f"attack({server.url!r})")
    status = httpx.get(f"{server.url}/api/v1/pipeline/status").json()
    assert status["status"] == "loaded" and status["load_params"]["height"] == 128, status  # not reloaded, not unloaded
    assert httpx.get(f"{server.url}/api/v1/assets").json()["assets"] == assets_before
    assert server.log().count("415 Unsupported Media Type") >= 4  # each request arrived and was refused


@pytest.mark.browser
def test_a_rebinding_page_cannot_read_the_server(server: RunningServer) -> None:
    """The page's own name resolves to the server, so its reads are same-origin: the Host header gives it away."""
    port = server.url.rsplit(":", 1)[1]
    with launch_chromium([f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1"]) as browser:
        page = browser.new_page()
        assert page.goto(f"http://{FOREIGN_HOST}:{port}/").status == 400
        for path in ("/api/v1/pipeline/status", "/api/v1/webrtc/sessions", "/api/v1/assets", "/metrics"):
            assert page.evaluate(f"fetch({path!r}).then((response) => response.status)") == 400, path


def test_an_open_bind_without_a_token_warns_and_answers_the_machine_names(tmp_path: Path) -> None:
    with run_server(tmp_path, "--host", "0.0.0.0") as running:
        assert "without an API token" in running.log()
        port = running.url.rsplit(":", 1)[1]
        names = [socket.gethostname()] + [
            a.address for addresses in psutil.net_if_addrs().values() for a in addresses if a.family == socket.AF_INET
        ]
        for name in names:
            response = httpx.get(f"{running.url}/api/v1/pipeline/status", headers={"host": f"{name}:{port}"})
            assert response.status_code == 200, (name, response.text)
        assert httpx.get(f"{running.url}/health", headers={"host": "evil.example"}).status_code == 400


def test_a_token_silences_the_warning(tmp_path: Path) -> None:
    with run_server(tmp_path, "--host", "0.0.0.0", "--api-token", TOKEN) as running:
        assert "without an API token" not in running.log()


@pytest.mark.browser
def test_the_browser_page_takes_the_token_from_its_address_once(token_server: RunningServer) -> None:
    with launch_chromium() as browser:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{token_server.url}/#token={TOKEN}")
        page.wait_for_selector("#pipeline-passthrough", timeout=15_000)  # listed from an API call with the token
        assert "token" not in page.url  # taken out of the address bar (and so out of its history)
        page.goto(f"{token_server.url}/")
        page.wait_for_selector("#pipeline-passthrough", timeout=15_000)  # kept in this browser's localStorage
        # The page's download links (recordings) carry the token too: a plain link sent none and saved a 401.
        link = "{href: '/api/v1/pipeline/status', download: 'status.json', id: 'api-file', textContent: 'x'}"
        page.evaluate(f"document.getElementById('recordings').append(Object.assign(document.createElement('a'), "
                      f"{link}))")  # fmt: skip
        with page.expect_download() as download:
            page.click("#api-file")
        assert "status" in json.loads(Path(download.value.path()).read_text())  # the route's JSON, not a 401
        assert download.value.suggested_filename == "status.json"
        context.close()
        stranger = browser.new_context().new_page()
        with stranger.expect_response(lambda r: "/api/v1/" in r.url) as first_call:
            stranger.goto(f"{token_server.url}/")
        assert first_call.value.status == 401
