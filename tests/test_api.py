"""Every HTTP endpoint against a running server, with a battery of bad input after which it must still be healthy."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import MAX_UPLOAD_MB
from tests.support.images import black_png_bytes
from tests.support.rtc_client import offer_sdp
from tests.support.server import RunningServer, load_pipeline

SEED_DEFAULTS = {  # the seed's comparison table: resolution (h, w), steps
    "longlive": (512, 512, [1000, 750]),
    "streamdiffusionv2": (320, 576, [750, 250]),
    "reward-forcing": (512, 512, [1000, 750]),
    "memflow": (512, 512, [1000, 750]),
    "krea-realtime-video": (256, 256, [1000, 750]),
}


def png_bytes(width: int = 2, height: int = 2) -> bytes:
    """A valid RGB PNG, built from its definition."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80\x40\x20" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def upload(api: httpx.Client, data: bytes, filename: str | None = None) -> httpx.Response:
    params = {"filename": filename} if filename is not None else {}
    return api.post("/api/v1/assets", params=params, content=data, headers={"content-type": "application/octet-stream"})


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client
        # Whatever the test sent, the server keeps serving.
        assert client.get("/health").json()["status"] == "healthy"
        assert server.process.poll() is None


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["detail"] and body["error"]
    return body["detail"]


def test_health_reports_version_and_start_time(api: httpx.Client) -> None:
    body = api.get("/health").json()
    assert body["status"] == "healthy"
    assert body["server_start_time"] <= body["timestamp"]
    assert body["version"]


def test_hardware_info_reports_machine_and_stacks(api: httpx.Client) -> None:
    body = api.get("/api/v1/hardware/info").json()
    assert body["vram_gb"] >= 0
    assert body["cpu_count"] >= 1 and body["ram_gb"] > 0
    assert body["torch_version"]
    assert isinstance(body["tensorrt_available"], bool)
    assert isinstance(body["gpus"], list)


def test_openapi_schema_is_served(api: httpx.Client) -> None:
    paths = api.get("/schema/openapi.json").json()["paths"]
    assert "/api/v1/pipeline/load" in paths and "/api/v1/webrtc/offer" in paths


def test_schemas_list_every_pipeline_with_seed_defaults(api: httpx.Client) -> None:
    pipelines = api.get("/api/v1/pipelines/schemas").json()["pipelines"]
    assert set(pipelines) == {"passthrough", *SEED_DEFAULTS}
    for pipeline_id, (height, width, steps) in SEED_DEFAULTS.items():
        schema = pipelines[pipeline_id]
        load, runtime = schema["load_params"]["properties"], schema["runtime_params"]["properties"]
        assert (load["height"]["default"], load["width"]["default"]) == (height, width), pipeline_id
        assert runtime["denoising_step_list"]["default"] == steps
        warped = pipeline_id != "streamdiffusionv2"  # as their original repos feed the list (models.md §2)
        assert runtime["warp_denoising_steps"]["default"] is warped
        assert load["warp_denoising_steps"]["default"] is warped
        assert runtime["noise_scale"]["default"] == 0.7
        assert runtime["noise_controller"]["default"] is True
        assert runtime["noise_scale"]["maximum"] == 1.0
        assert schema["weights_present"] is False and schema["missing_files"]  # no weights on a test machine
    assert pipelines["streamdiffusionv2"]["default_mode"] == "video"
    assert pipelines["longlive"]["default_mode"] == "text"
    krea = pipelines["krea-realtime-video"]
    assert krea["runtime_params"]["properties"]["kv_cache_attention_bias"]["default"] == 0.3
    assert krea["load_params"]["properties"]["quantization"]["default"] == "fp8_e4m3fn"
    assert "kv_cache_attention_bias" not in pipelines["longlive"]["runtime_params"]["properties"]
    assert pipelines["passthrough"]["weights_present"] is True


def test_load_accepts_seed_and_scope_forms(api: httpx.Client, server: RunningServer) -> None:
    status = load_pipeline(server.url, "passthrough", height=256, width=320)
    assert status["status"] == "loaded"
    assert status["load_params"] == {"height": 256, "width": 320, "seed": 42, "chunk_size": 1}
    response = api.post(
        "/api/v1/pipeline/load", json={"pipeline_ids": ["passthrough"], "load_params": {"base_seed": 7}}
    )
    assert response.status_code == 200, response.text
    status = load_pipeline(server.url, "passthrough")
    assert status["status"] == "loaded" and status["load_params"]["seed"] == 42


def test_unload_then_offer_says_pipeline_not_loaded(api: httpx.Client, server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough")
    assert api.post("/api/v1/pipeline/unload", json={}).status_code == 200
    assert api.get("/api/v1/pipeline/status").json()["status"] == "not_loaded"
    detail = error_of(api.post("/api/v1/webrtc/offer", json={"sdp": "v=0\r\n", "type": "offer"}), 400)
    assert "Pipeline not loaded" in detail
    load_pipeline(server.url, "passthrough")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"pipeline_id": "no-such-pipeline"}, 404, "unknown pipeline"),
        ({}, 400, "exactly one pipeline"),
        ({"pipeline_id": "passthrough", "pipeline_ids": ["passthrough"]}, 400, "exactly one pipeline"),
        ({"pipeline_id": "passthrough", "load_params": {"height": "tall"}}, 400, "Validation failed"),
        ({"pipeline_id": "passthrough", "load_params": {"height": 100000}}, 400, "Validation failed"),
        ({"pipeline_id": "passthrough", "load_params": {"width": 500}}, 400, "Validation failed"),  # not /16
        ({"pipeline_id": "passthrough", "load_params": {"seed": -1}}, 400, "Validation failed"),
        ({"pipeline_id": "passthrough", "load_params": {"bogus": 1}}, 400, "Validation failed"),
        ({"pipeline_id": "passthrough", "load_params": {"vae_type": "wan"}}, 422, "'vae_type' is not a load parameter"),
        ({"pipeline_id": "passthrough", "load_params": {"seed": 1, "base_seed": 2}}, 422, "same value"),
        ({"pipeline_id": 5}, 400, "Validation failed"),
    ],
)
def test_load_rejects_bad_requests(api: httpx.Client, body: dict, status: int, needle: str) -> None:
    assert needle in error_of(api.post("/api/v1/pipeline/load", json=body), status)


def test_load_rejects_non_json_body(api: httpx.Client) -> None:
    response = api.post("/api/v1/pipeline/load", content=b"{not json", headers={"content-type": "application/json"})
    error_of(response, 400)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"sdp": "hello", "type": "offer"}, 400, "malformed SDP"),
        ({"sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "type": "offer"}, 400, "no video m-line"),
        ({"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "type": "offer"}, 400, "malformed SDP"),
        ({"sdp": "v=0\r\nm=video 9 udp 96\r\n", "type": "offer"}, 400, "missing or malformed"),  # aiortc asserts
        ({"sdp": "v=0\r\n", "type": "answer"}, 400, "type 'offer'"),
        ({"type": "offer"}, 400, "Validation failed"),
        ({"sdp": "v=0", "type": "offer", "initialParameters": {"noise_scale": 3}}, 400, "Validation failed"),
        ({"sdp": "v=0", "type": "offer", "initialParameters": {"kv_cache_attention_bias": 0.5}}, 422, "not a runtime"),
        ({"sdp": "v=0", "type": "offer", "initialParameters": {"denoising_step_list": [250, 750]}}, 422, "descending"),
        # weights that sum to 0 have no blend: accepted, they ended the stream at its first chunk
        ({"sdp": "v=0", "type": "offer", "initialParameters": {"prompts": [{"text": "a", "weight": 0}]}}, 422, "sum"),
        (
            {
                "sdp": "v=0",
                "type": "offer",
                "initialParameters": {"transition": {"target_prompts": [{"text": "b", "weight": 0}]}},
            },
            422,
            "sum to 0",
        ),
        ({"sdp": "v=0", "type": "offer", "initialParameters": {"vace_ref_images": ["/etc/passwd"]}}, 422, "asset"),
        ({"sdp": "v=0", "type": "offer", "initialParameters": {"vace_ref_images": ["a\0b"]}}, 422, "asset"),
        ({"sdp": "v=0", "type": "offer", "initialParameters": {"first_frame_image": "a" * 300}}, 422, "asset"),
        ({"sdp": "v=0", "type": "offer", "initialParameters": {"last_frame_image": "x/" + "b" * 256}}, 422, "asset"),
    ],
)
def test_offer_rejects_bad_requests(
    api: httpx.Client, server: RunningServer, body: dict, status: int, needle: str
) -> None:
    load_pipeline(server.url, "passthrough")
    response = api.post("/api/v1/webrtc/offer", json=body)
    assert needle in error_of(response, status)
    assert_no_server_path(response, server)
    assert server.metrics()["wanrt_sessions_active"] == 0  # a rejected offer leaves no half-made session


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        # aiortc raised AttributeError answering a mid outside the offer's BUNDLE group: a 500; then (a 400) its
        # connect task still failed in the background, a traceback in the log for each such offer
        (lambda sdp: sdp.replace("a=mid:0", "a=mid:zz", 1), "not in its BUNDLE group"),
        (lambda sdp: sdp.replace("a=mid:0", "a=mid:\u00e9", 1), "is not a token"),
        (lambda sdp: re.sub(r"^m=video", "m=zzz", sdp, flags=re.M), "of kind 'zzz'"),
        (lambda sdp: asyncio.run(offer_sdp(video_sections=0)), "no video m-line"),  # the data channel alone
        # aiortc raised on every send past the peer's limit: the stats task died, and a reply to a bad message
        # raised inside aiortc's receive loop, which closed the connection
        (lambda sdp: re.sub(r"a=max-message-size:\d+", "a=max-message-size:300", sdp), "max-message-size ('300')"),
        (lambda sdp: re.sub(r"a=max-message-size:\d+", "a=max-message-size:-1", sdp), "max-message-size ('-1')"),
        # aiortc answered, then its DTLS start failed an assert in the background: a seat held until the timeout
        (lambda sdp: "".join(line for line in sdp.splitlines(True) if not line.startswith("a=fingerprint:")),
         "no a=fingerprint"),
        # aiortc answered these too, and the client waited for a connection that could not come
        (lambda sdp: re.sub(r"a=fingerprint:\S+ \S+", "a=fingerprint:md5 AA:BB", sdp), "name no certificate hash"),
        (lambda sdp: re.sub(r"a=fingerprint:(\S+) \S+", r"a=fingerprint:\1 zz", sdp), "name no certificate hash"),
        (lambda sdp: sdp.replace("a=mid:1", "a=mid:0"), "share a mid (0, 0)"),
    ],
)  # fmt: skip
def test_a_real_offer_edited_into_one_that_cannot_connect_is_refused(
    api: httpx.Client, server: RunningServer, edit: Callable[[str], str], needle: str
) -> None:
    load_pipeline(server.url, "passthrough")
    unretrieved = server.log().count("Task exception was never retrieved")
    response = api.post("/api/v1/webrtc/offer", json={"sdp": edit(asyncio.run(offer_sdp())), "type": "offer"})
    assert needle in error_of(response, 400)
    assert server.metrics()["wanrt_sessions_active"] == 0
    time.sleep(0.3)  # a task aiortc started for the offer would have failed by now
    assert server.log().count("Task exception was never retrieved") == unretrieved


def test_rejected_offer_logs_why_its_session_closed(api: httpx.Client, server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough")
    error_of(api.post("/api/v1/webrtc/offer", json={"sdp": "v=0\r\nm=video 9 udp 96\r\n", "type": "offer"}), 400)
    closed = [line for line in server.log().splitlines() if " closed reason=" in line]
    assert closed and "reason=offer not answered: malformed SDP offer" in closed[-1]


def test_the_page_and_its_files_are_served_and_odd_file_paths_are_404(api: httpx.Client, server: RunningServer) -> None:
    """A NUL or an over-long name in a static path reached the filesystem and came back as a 500 (found by fuzzing)."""
    tracebacks = server.log().count("Traceback")
    assert api.get("/").status_code == 200 and api.get("/app.js").status_code == 200
    for path in ("/%00", "/app.js%00.png", "/" + "a" * 300, "/x/" + "b" * 256 + "/c.js", "/no-such-file.js"):
        assert error_of(api.get(path), 404), path
    assert server.log().count("Traceback") == tracebacks


def test_unknown_session_is_404(api: httpx.Client) -> None:
    candidates = {"candidates": [{"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0}]}
    assert "no session" in error_of(api.patch("/api/v1/webrtc/offer/nope", json=candidates), 404)
    assert "no session" in error_of(api.delete("/api/v1/webrtc/offer/nope"), 404)


def test_ice_servers_are_empty_by_default(api: httpx.Client) -> None:
    assert api.get("/api/v1/webrtc/ice-servers").json() == {"iceServers": []}


def test_assets_upload_list_and_serve(api: httpx.Client, server: RunningServer) -> None:
    data = png_bytes()
    response = api.post(
        "/api/v1/assets", params={"filename": "ref image.png"}, content=data,
        headers={"content-type": "application/octet-stream"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    asset = response.json()
    assert asset["type"] == "image" and asset["name"] == "ref_image.png"
    assert asset["path"].startswith(str(server.assets_dir.resolve()))
    assert asset["name"] in {a["name"] for a in api.get("/api/v1/assets").json()["assets"]}
    served = api.get(f"/api/v1/assets/{asset['name']}")
    assert served.content == data and served.headers["content-type"] == "image/png"
    assert served.headers["content-disposition"] == 'inline; filename="ref_image.png"'


def test_upload_with_traversal_name_stays_in_assets_folder(api: httpx.Client, server: RunningServer) -> None:
    for name in ("../../escape.png", "..\\..\\escape.png", "/etc/escape.png", ".hidden.png"):
        response = upload(api, png_bytes(), name)
        assert response.status_code == 200, response.text
        path = response.json()["path"]
        assert path.startswith(str(server.assets_dir.resolve()) + "/"), path
        assert not response.json()["name"].startswith(".")


def test_upload_checks_content_not_extension(api: httpx.Client) -> None:
    detail = error_of(upload(api, b"#!/bin/sh\nrm -rf /\n", "x.png"), 415)
    assert "images" in detail
    response = upload(api, png_bytes(), "really-a-png.jpg")
    assert response.json()["name"] == "really-a-png.png"


def test_upload_refuses_an_image_that_does_not_decode_or_holds_too_many_pixels(api: httpx.Client) -> None:
    """Both passed the 16-byte check: a PNG signature over junk made every chunk log an error, forever, and a 4 KB
    PNG of 36 megapixels decoded whole on the worker all streams share (found by fuzzing)."""
    assert "does not decode" in error_of(upload(api, png_bytes()[:40] + b"junk" * 8, "broken.png"), 415)
    assert "25 megapixels" in error_of(upload(api, black_png_bytes(6000, 6000), "bomb.png"), 415)
    assert upload(api, black_png_bytes(5000, 5000), "big-but-allowed.png").status_code == 200
    names = {asset["name"] for asset in api.get("/api/v1/assets").json()["assets"]}
    assert "big-but-allowed.png" in names and not names & {"broken.png", "bomb.png"}


def test_upload_rejects_oversized_empty_and_nameless(api: httpx.Client) -> None:
    too_big = png_bytes() + b"\0" * (MAX_UPLOAD_MB * 2**20 + 1)
    error_of(upload(api, too_big, "big.png"), 413)
    error_of(upload(api, b"", "empty.png"), 400)
    error_of(upload(api, png_bytes()), 400)


def assert_no_server_path(response: httpx.Response, server: RunningServer) -> None:
    for folder in {str(server.assets_dir.resolve()), str(server.assets_dir.resolve().parent)}:
        assert folder not in response.text, response.text


@pytest.mark.parametrize("path", ["a%00b.png", "a" * 300 + ".png", f"{'b' * 256}/x.png", "%ED%A0%80.png"])
def test_asset_paths_no_file_can_have_are_404_without_server_paths(
    api: httpx.Client, server: RunningServer, path: str
) -> None:
    response = api.get(f"/api/v1/assets/{path}")
    assert "no asset" in error_of(response, 404)
    assert_no_server_path(response, server)


def test_assets_outside_the_folder_are_not_served(api: httpx.Client) -> None:
    for path in ("/api/v1/assets/../../../etc/passwd", "/api/v1/assets/%2e%2e/%2e%2e/etc/passwd",
                 "/api/v1/assets//etc/passwd", "/api/v1/assets/missing.png"):  # fmt: skip
        assert api.get(path).status_code == 404, path


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://127.0.0.1:5173", True),
        ("http://localhost", True),
        ("https://evil.example", False),
        ("http://localhost.evil.example", False),
        ("http://127.0.0.1.evil.example:80", False),
        ("null", False),
    ],
)
def test_cors_admits_only_local_origins(api: httpx.Client, origin: str, allowed: bool) -> None:
    preflight = api.options(
        "/api/v1/pipeline/load",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    simple = api.get("/api/v1/pipeline/status", headers={"Origin": origin})
    for response in (preflight, simple):
        assert (response.headers.get("access-control-allow-origin") == origin) is allowed, response.headers


def test_json_bodies_are_capped_well_below_the_upload_limit(api: httpx.Client, server: RunningServer) -> None:
    padding = "x" * (3 * 2**19)  # 1.5 MiB: under the 2 MiB upload limit, over the 1 MiB JSON limit
    body = {"pipeline_id": "passthrough", "load_params": {}, "pad": padding}
    assert "JSON bodies are limited" in error_of(api.post("/api/v1/pipeline/load", json=body), 413)
    assert upload(api, png_bytes() + b"\0" * (3 * 2**19), "big-but-allowed.png").status_code == 200


def test_an_oversized_json_body_is_refused_before_it_is_sent(server: RunningServer) -> None:
    """Content-Length alone decides: the server answers 413 without waiting for (or reading) the body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /api/v1/pipeline/load HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1572864\r\n\r\n{"  # 1.5 MiB: over the JSON limit, under the upload limit
        )
        reply = sock.recv(4096).decode(errors="replace")  # times out (the test fails) if the server waits
    assert reply.startswith("HTTP/1.1 413"), reply


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_deeply_nested_json_is_400(api: httpx.Client, opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    body = '{"pipeline_id": "passthrough", "load_params": ' + opening * 5000 + "1" + closing * 5000 + "}"
    response = api.post("/api/v1/pipeline/load", content=body, headers={"content-type": "application/json"})
    assert "nested too deeply" in error_of(response, 400)


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/api/v1/pipeline/load", "text/plain", b'{"pipeline_id": "passthrough"}'),
        ("/api/v1/pipeline/load", "application/x-www-form-urlencoded", b'{"pipeline_id": "passthrough"}'),
        ("/api/v1/pipeline/load", "multipart/form-data; boundary=x", b'{"pipeline_id": "passthrough"}'),
        ("/api/v1/pipeline/load", None, b'{"pipeline_id": "passthrough"}'),
        ("/api/v1/pipeline/unload", None, b""),
        ("/api/v1/pipeline/unload", "text/plain", b""),
        ("/api/v1/models/download", "text/plain", b'{"pipeline_id": "passthrough"}'),
        ("/api/v1/webrtc/offer", "text/plain", b'{"sdp": "v=0", "type": "offer"}'),
        ("/api/v1/assets?filename=a.png", "text/plain", None),
        ("/api/v1/assets?filename=a.png", "application/json", None),
    ],
)
def test_state_changing_routes_take_only_their_content_type(
    api: httpx.Client, server: RunningServer, path: str, content_type: str | None, body: bytes | None
) -> None:
    """A body a web page may send cross-origin without a CORS preflight never reaches a handler."""
    load_pipeline(server.url, "passthrough", height=128, width=128)
    assets_before = api.get("/api/v1/assets").json()["assets"]
    headers = {"content-type": content_type} if content_type else {}
    response = api.post(path, content=png_bytes() if body is None else body, headers=headers)
    assert "Content-Type" in error_of(response, 415)
    status = api.get("/api/v1/pipeline/status").json()
    assert status["status"] == "loaded" and status["load_params"]["height"] == 128  # not reloaded, not unloaded
    assert api.get("/api/v1/assets").json()["assets"] == assets_before


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "10.1.2.3"])
def test_a_host_header_that_names_another_server_is_refused(api: httpx.Client, host: str) -> None:
    """DNS rebinding: a hostile name resolving to 127.0.0.1 gets the page same-origin access, with its own Host."""
    for response in (
        api.get("/api/v1/pipeline/status", headers={"host": host}),
        api.post("/api/v1/pipeline/unload", json={}, headers={"host": host}),
        api.get("/", headers={"host": host}),
    ):
        assert "host name" in error_of(response, 400)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LOCALHOST."])
def test_loopback_host_names_are_answered(api: httpx.Client, server: RunningServer, host: str) -> None:
    port = server.url.rsplit(":", 1)[1]
    for value in (host, f"{host}:{port}"):
        assert api.get("/api/v1/pipeline/status", headers={"host": value}).status_code == 200, value


def test_405_says_which_methods_the_route_takes(api: httpx.Client) -> None:
    response = api.put("/api/v1/pipeline/load", json={})
    error_of(response, 405)
    assert "POST" in response.headers["allow"]
