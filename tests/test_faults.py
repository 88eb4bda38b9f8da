"""Fault injection against a running server: a pipeline failing mid-chunk, frame conversion failing, a load that
hangs, and the disk filling up during an upload. Each ends what it must with a clear message, and the server keeps
serving (a passthrough stream afterwards gets its frames)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.rtc_client import ScopeClient
from tests.support.server import RunningServer, load_pipeline, run_server
from tests.test_api import png_bytes

LOAD_TIMEOUT_S = 2.0
FILE_SIZE_LIMIT_BYTES = 2**20


@pytest.fixture(scope="module")
def release_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("release") / "release-the-hung-load"
    yield path
    path.touch()  # whatever happened, let a hung loading thread end so the server can shut down


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory, release_file: Path) -> Iterator[RunningServer]:
    os.environ["WANRT_FAULT_RELEASE"] = str(release_file)
    try:
        with run_server(
            tmp_path_factory.mktemp("faults"),
            "--load-timeout-s", str(LOAD_TIMEOUT_S),
            module="tests.support.fault_server",
        ) as running:  # fmt: skip
            try:
                yield running
            finally:
                release_file.touch()  # before the shutdown, which would otherwise wait out the hung loading thread
    finally:
        del os.environ["WANRT_FAULT_RELEASE"]


async def still_streams(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url)
    await client.connect()
    try:
        await client.wait_frames(5)
    finally:
        await client.close()


async def stopped_message(server: RunningServer, pipeline_id: str) -> str:
    status = load_pipeline(server.url, pipeline_id, height=128, width=128)
    assert status["status"] == "loaded", status
    client = ScopeClient(server.url, initial_parameters={"input_mode": "video"})
    await client.connect()
    try:
        return (await client.wait_message("stream_stopped", timeout_s=20))["error_message"]
    finally:
        await client.close()


async def test_a_pipeline_failing_mid_chunk_ends_its_stream_with_a_reason(fault_server: RunningServer) -> None:
    message = await stopped_message(fault_server, "fault-chunk")
    assert "pipeline error (RuntimeError)" in message and "logged" in message
    assert "/opt/models" not in message  # the exception's text (a server path) stays in the server's log
    assert "injected fault in /opt/models" in fault_server.log()
    deadline = time.monotonic() + 5  # the session closes right after its stream_stopped message has left
    while fault_server.metrics()["wanrt_sessions_active"] != 0:
        assert time.monotonic() < deadline, "the failed session still holds its slot"
        await asyncio.sleep(0.05)
    await still_streams(fault_server)


async def test_frame_conversion_failing_ends_the_stream_with_a_reason(fault_server: RunningServer) -> None:
    message = await stopped_message(fault_server, "fault-convert")
    assert "could not convert a 320×240" in message and "RGB" in message, message
    await still_streams(fault_server)


async def test_a_hung_load_is_reported_and_the_server_loads_another(fault_server: RunningServer) -> None:
    with httpx.Client(base_url=fault_server.url, timeout=10) as http:
        started = time.monotonic()
        assert http.post("/api/v1/pipeline/load", json={"pipeline_id": "fault-hang"}).status_code == 200
        while (status := http.get("/api/v1/pipeline/status").json())["status"] == "loading":
            assert time.monotonic() - started < LOAD_TIMEOUT_S + 10, status
            assert http.get("/health").status_code == 200  # the loop serves while the thread hangs
            time.sleep(0.1)
        assert status["status"] == "error", status
        assert f"did not finish within {LOAD_TIMEOUT_S:g} s" in status["error"]
        assert "reading weights" in status["error"]  # the stage it hung in
    await still_streams(fault_server)


async def test_a_full_disk_answers_507_and_leaves_no_partial_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the server's writes past 1 MiB fail as a full disk does (EFBIG, like ENOSPC)."""
    with run_server(tmp_path, file_size_limit_bytes=FILE_SIZE_LIMIT_BYTES) as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:

            def upload(data: bytes, name: str) -> httpx.Response:
                return http.post(
                    "/api/v1/assets", params={"filename": name}, content=data,
                    headers={"content-type": "application/octet-stream"},
                )  # fmt: skip

            response = upload(png_bytes() + b"\0" * (3 * 2**19), "big.png")
            assert response.status_code == 507, response.text
            assert "no room" in response.json()["detail"]
            assert str(server.assets_dir.resolve()) not in response.text
            assert list(server.assets_dir.iterdir()) == []  # no half-written file left behind
            assert upload(png_bytes(), "small.png").status_code == 200
        await still_streams(server)
