"""Clients that leave mid-stream, politely or by vanishing, leave no session, task or thread behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.conftest import PEER_TIMEOUT_S
from tests.support.rtc_client import ScopeClient
from tests.support.server import RunningServer, load_pipeline, run_server

ROUNDS = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Room for every vanished peer to linger until its consent checks fail."""
    with run_server(
        tmp_path_factory.mktemp("server"), "--peer-timeout-s", str(PEER_TIMEOUT_S), "--max-sessions", str(ROUNDS)
    ) as running:
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
