"""Clients that leave mid-stream, politely or by vanishing, leave no session, task or thread behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import PEER_TIMEOUT_S
from tests.support.rtc_client import ScopeClient, offer_sdp
from tests.support.server import RunningServer, load_pipeline, run_server

ROUNDS = 20
CONNECT_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Room for every vanished peer to linger until its consent checks fail."""
    with run_server(
        tmp_path_factory.mktemp("server"),
        "--peer-timeout-s", str(PEER_TIMEOUT_S),
        "--max-sessions", str(ROUNDS),
        "--connect-timeout-s", str(CONNECT_TIMEOUT_S),
    ) as running:  # fmt: skip
        yield running


async def test_twenty_mid_stream_disconnects_leave_nothing_behind(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128, chunk_size=2)
    baseline = server.metrics()
    vanished = []
    for round_index in range(ROUNDS):
        client = ScopeClient(server.url, initial_parameters={"input_mode": "video"})
        await client.connect()
        await client.wait_frames(3)
        if round_index % 2:
            await client.vanish()  # network gone: no BYE, no DTLS close; only ICE consent can tell
            vanished.append(client)
        else:
            await client.close()
    # Vanished peers are noticed within the consent timeout; the polite ones at once.
    deadline = time.monotonic() + PEER_TIMEOUT_S * 4 + 10
    while server.metrics()["wanrt_sessions_active"] > 0:
        assert time.monotonic() < deadline, f"sessions left: {server.metrics()}"
        await asyncio.sleep(0.25)
    for client in vanished:
        await client.pc.close()
    await asyncio.sleep(1.0)  # let executor threads that encoded the last frames go idle
    after = server.metrics()
    assert after["wanrt_asyncio_tasks"] <= baseline["wanrt_asyncio_tasks"], (baseline, after)
    # aiortc encodes on the loop's default executor, whose idle threads may stay: allow the pool, nothing per session.
    assert after["wanrt_threads"] <= baseline["wanrt_threads"] + 4, (baseline, after)
    assert after["wanrt_frames_out_total"] >= ROUNDS * 3


async def test_offers_whose_peer_never_connects_give_their_slots_back(server: RunningServer) -> None:
    """A page can send offers and never a usable candidate; each is closed after the connect timeout."""
    load_pipeline(server.url, "passthrough", height=128, width=128)
    sdp = await offer_sdp(candidates=False)  # the server learns no address to check: ICE waits for candidates
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for _ in range(ROUNDS):
            response = await http.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
            assert response.status_code == 200, response.text
        full = await http.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
        assert full.status_code == 503, full.text
        sessions = (await http.get("/api/v1/webrtc/sessions")).json()["sessions"]
        assert {s["connection_state"] for s in sessions} <= {"new", "connecting"}
    started = time.monotonic()
    while server.metrics()["wanrt_sessions_active"] > 0:
        assert time.monotonic() - started < CONNECT_TIMEOUT_S + 8, f"sessions left: {server.metrics()}"
        await asyncio.sleep(0.1)
    assert "did not connect within" in server.log()
    client = ScopeClient(server.url)  # every slot is free again
    await client.connect()
    try:
        await client.wait_frames(3)
    finally:
        await client.close()
