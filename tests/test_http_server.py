"""The HTTP server's deadlines (serve/http_server.py), against a running server, over raw sockets: an idle or slow
client is let go (408 for a head); kept-alive connections and bodies that keep coming are not cut."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import MAX_UPLOAD_MB
from tests.support.images import black_png_bytes
from tests.support.server import RunningServer, run_server

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
SLACK_S = 3.0
"""How late past its deadline the server may answer on a loaded CI machine."""
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(
        tmp_path_factory.mktemp("server"), "--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s",
        str(BODY_TIMEOUT_S), "--max-upload-mb", str(MAX_UPLOAD_MB),
    ) as running:  # fmt: skip
        yield running
        assert httpx.get(f"{running.url}/health", timeout=5).status_code == 200


def connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + SLACK_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each trickled byte leaves at once
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> bytes:
    """One whole response to a GET /health (its body is JSON, so it ends with '}')."""
    data = b""
    while not data.endswith(b"}"):
        chunk = sock.recv(4096)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    return data


def test_a_connection_that_sends_nothing_gets_408_and_is_closed(server: RunningServer) -> None:
    with connect(server) as sock:
        opened = time.monotonic()
        reply = read_until_closed(sock)
        waited = time.monotonic() - opened
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b"request head not received within 1 s" in reply
    assert HEADER_TIMEOUT_S - 0.1 <= waited < HEADER_TIMEOUT_S + SLACK_S, waited


def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_its_deadline_not_its_last_byte(server: RunningServer) -> None:
    head = HEALTH[:-2]  # never finished
    with connect(server) as sock:
        started = time.monotonic()
        sent = 0
        with pytest.raises(OSError):  # the server closes under the trickle: a write or the read below fails
            for byte in head:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.1)  # each byte comes well inside the deadline; the whole head does not
            sock.sendall(b"\r\n")
        waited = time.monotonic() - started
        reply = sock.recv(4096) if sent < len(head) else b""
    assert sent < len(head), "the server waited for the whole trickled head"
    assert waited < HEADER_TIMEOUT_S + SLACK_S, waited
    assert reply.startswith(b"HTTP/1.1 408 ") or reply == b"", reply


def test_a_head_in_pieces_within_the_deadline_is_served(server: RunningServer) -> None:
    with connect(server) as sock:
        for piece in (HEALTH[:10], HEALTH[10:25], HEALTH[25:]):
            sock.sendall(piece)
            time.sleep(HEADER_TIMEOUT_S / 5)
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_a_kept_alive_connection_is_not_cut_by_the_head_deadline(server: RunningServer) -> None:
    """Idle between requests is uvicorn's keep-alive timeout (5 s), not the head deadline."""
    with connect(server) as sock:
        sock.sendall(HEALTH)
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(HEADER_TIMEOUT_S * 2)
        sock.sendall(HEALTH)
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(HEALTH[:20])  # a next head that stalls gets the same deadline
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_head_is_answered_like_get_without_a_body_and_keeps_the_connection(server: RunningServer) -> None:
    """Monitors and load balancers check a server with HEAD; Litestar alone answers a GET route's HEAD with 405."""
    with connect(server) as sock:
        sock.sendall(HEALTH.replace(b"GET", b"HEAD", 1) + HEALTH)  # pipelined: the GET must follow the bare head
        reply = b""
        while reply.count(b"HTTP/1.1 200 ") < 2 or not reply.endswith(b"}"):
            chunk = sock.recv(4096)
            assert chunk, f"closed: {reply!r}"
            reply += chunk
    head, rest = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 "), reply
    assert int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) > 2  # the GET's length, none of it
    assert rest.startswith(b"HTTP/1.1 200 "), reply
    for path in ("/api/v1/pipeline/status", "/api/v1/recordings", "/"):
        assert httpx.head(f"{server.url}{path}", timeout=5).status_code == 200, path
    post_only = httpx.head(f"{server.url}/api/v1/pipeline/load", timeout=5)
    assert post_only.status_code == 405 and "POST" in post_only.headers["allow"]
    assert httpx.head(f"{server.url}/api/v1/nothing-here", timeout=5).status_code == 404


def test_a_slow_body_that_keeps_coming_is_not_cut(server: RunningServer) -> None:
    """An upload over a slow link takes long: the deadline is on each pause, not on the whole body."""
    body = black_png_bytes(64, 64)
    head = (
        b"POST /api/v1/assets?filename=slow.png HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head)
        for start in range(0, len(body), len(body) // 4 + 1):
            time.sleep(BODY_TIMEOUT_S / 2)  # two seconds in all: past the deadline, but never idle that long
            sock.sendall(body[start : start + len(body) // 4 + 1])
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200 "), reply


def test_many_idle_connections_are_all_let_go_and_the_server_keeps_answering(server: RunningServer) -> None:
    idle = [connect(server) for _ in range(200)]
    try:
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # answered while they are open
        for sock in idle:
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S
    finally:
        for sock in idle:
            sock.close()


def test_a_body_that_stops_has_its_connection_closed(server: RunningServer) -> None:
    head = (
        b"POST /api/v1/assets?filename=stuck.png HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head + black_png_bytes(64, 64)[:100])  # then nothing more of the 100000 bytes it announced
        stopped = time.monotonic()
        reply = read_until_closed(sock)
        waited = time.monotonic() - stopped
    assert BODY_TIMEOUT_S - 0.1 <= waited < BODY_TIMEOUT_S + SLACK_S, (waited, reply)
    assert not (server.assets_dir / "stuck.png").exists()
