"""Streaming through a running server with an aiortc client: frames, order, resolution, data channel, lifecycle."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from serve.webrtc.session import MAX_CHANNEL_BACKLOG_BYTES, MESSAGES_PER_S
from tests.conftest import MAX_SESSIONS
from tests.support.rtc_client import ScopeClient, offer_sdp
from tests.support.server import RunningServer, load_pipeline, run_server


async def session_params(server: RunningServer, session_id: str) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        sessions = (await http.get("/api/v1/webrtc/sessions")).json()["sessions"]
    return next(s for s in sessions if s["sessionId"] == session_id)


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("chunk_size", [1, 4])
async def test_passthrough_returns_frames_in_order_at_loaded_resolution(server: RunningServer, chunk_size: int) -> None:
    load_pipeline(server.url, "passthrough", height=192, width=256, chunk_size=chunk_size)
    client = ScopeClient(
        server.url, initial_parameters={"input_mode": "video", "prompts": [{"text": "a", "weight": 1}]}
    )
    await client.connect()
    try:
        frames = await client.wait_frames(45)
    finally:
        await client.close()
    assert {(f.width, f.height) for f in frames} == {(256, 192)}  # input is 320×240: resized to the load params
    counters = [f.counter for f in frames]
    assert all(b > a for a, b in itertools.pairwise(counters)), counters  # in order, no repeats
    assert counters[-1] < client.track.sent  # content: indices that were really sent
    assert counters[-1] - counters[0] >= len(counters) - 1


async def test_a_receive_only_peer_in_video_mode_is_told_why_nothing_comes(server: RunningServer) -> None:
    """A page that only receives (no camera track) and did not ask for text mode got a session that sent nothing,
    and said nothing (found against a live server): it is told what to send, and then streams."""
    load_pipeline(server.url, "passthrough", height=64, width=64)
    client = ScopeClient(server.url, send_video=False)
    await client.connect()
    try:
        notice = await client.wait_message("error")
        assert notice["error"] == "NoInputVideo" and '"input_mode": "text"' in notice["message"], notice
        await client.send({"input_mode": "text"})
        frames = await client.wait_frames(10)
        assert frames and not [m for m in client.messages if m.get("error") == "NoInputVideo"][1:]  # said once
    finally:
        await client.close()


async def test_a_microphone_in_the_offer_is_answered_inactive_and_the_video_streams(server: RunningServer) -> None:
    """getUserMedia({audio: true, video: true}) offers an audio section too. aiortc would answer it recvonly and
    decode every Opus frame into a queue that nothing reads (50 a second, unbounded, a core's share spent on it):
    the answer declines it, so no receiver starts, and the video streams as without it."""
    load_pipeline(server.url, "passthrough", height=192, width=256)
    client = ScopeClient(server.url, initial_parameters={"input_mode": "video"}, send_audio=True)
    await client.connect()
    try:
        frames = await client.wait_frames(30)
    finally:
        await client.close()
    sections = client.answer_sdp.split("\r\nm=")[1:]
    audio = [section for section in sections if section.startswith("audio")]
    assert len(audio) == 1 and "a=inactive" in audio[0].split("\r\n"), audio
    assert any(section.startswith("video") and "a=sendrecv" in section for section in sections)
    counters = [f.counter for f in frames]
    assert all(b > a for a, b in itertools.pairwise(counters)), counters


async def test_text_mode_generates_without_an_input_track(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url, send_video=False, initial_parameters={"input_mode": "text"}, keep_pixels=True)
    await client.connect()
    try:
        frames = await client.wait_frames(20)
    finally:
        await client.close()
    assert {(f.width, f.height) for f in frames} == {(128, 128)}
    assert frames[0].pixels.std() > 10  # the test pattern, not a blank frame
    assert abs(frames[0].pixels.astype(int) - frames[10].pixels.astype(int)).mean() > 1  # and it moves


async def test_data_channel_update_reaches_the_pipeline_and_bad_messages_get_errors(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url, initial_parameters={"input_mode": "video", "noise_scale": 0.7})
    session_id = await client.connect()
    try:
        await client.wait_frames(5)
        await client.send({"noise_scale": 0.25, "prompts": [{"text": "New prompt", "weight": 1.0}]})

        async def applied() -> bool:
            params = (await session_params(server, session_id))["parameters"]
            return params["noise_scale"] == 0.25 and params["prompts"][0]["text"] == "New prompt"

        await wait_until(applied)

        bad_messages = [
            "not json",
            "",
            "[1, 2]",
            '{"prompts": [{"text": "a", "weight": 0}]}',  # no blend: it ended the stream at its next chunk
            '{"noise_scale": 7}',
            '{"unknown_field": 1}',
            '{"denoising_step_list": [100, 900]}',
            '{"kv_cache_attention_bias": 0.5}',
            '{"vace_ref_images": ["../../etc/passwd"]}',
            '{"vace_ref_images": ["a\\u0000b.png"]}',  # NUL, and a component over NAME_MAX: no file can have these
            json.dumps({"first_frame_image": "a" * 300}),
            json.dumps({"last_frame_image": "x/" + "b" * 256}),
            '{"prompts": ' + "[" * 5000 + "]" * 5000 + "}",  # nesting deeper than any decoder's recursion limit
            b"\x00\x01binary",
            "x" * 70000,
        ]
        with pytest.raises(ValueError, match="65536"):  # the answer's a=max-message-size holds a compliant client back
            client.channel.send("x" * 70000)
        client.pc.sctp._remote_max_message_size = 2**20  # ...so play one that ignores it: the server still refuses
        for message in bad_messages:
            start = len(client.messages)
            await client.send(message)
            error = await client.wait_message("error", start=start)
            assert error["message"], message
            assert str(server.assets_dir.resolve()) not in error["message"]
        before = len(client.frames)
        await client.wait_frames(before + 10)  # the stream goes on
        described = await session_params(server, session_id)
        assert described["updates_rejected"] == len(bad_messages)
        assert described["parameters"]["noise_scale"] == 0.25  # rejected updates changed nothing
        stats = await client.wait_message("stats")
        assert {"fps_in", "fps_out", "latency_ms", "frames_dropped", "backend"} <= set(stats)
    finally:
        await client.close()


async def test_loading_another_pipeline_stops_sessions_with_stream_stopped(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url, initial_parameters={"input_mode": "video"})
    await client.connect()
    try:
        await client.wait_frames(5)
        load_pipeline(server.url, "passthrough", height=256, width=256)
        stopped = await client.wait_message("stream_stopped")
        assert "passthrough" in stopped["error_message"]
        assert server.metrics()["wanrt_sessions_active"] == 0
    finally:
        await client.close()


async def test_offer_past_the_session_limit_gets_503(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    clients = [ScopeClient(server.url) for _ in range(MAX_SESSIONS)]
    try:
        for client in clients:
            await client.connect()
        extra = ScopeClient(server.url)
        with pytest.raises(AssertionError, match="503"):
            await extra.connect()
        await extra.pc.close()
        assert server.metrics()["wanrt_sessions_active"] == MAX_SESSIONS
    finally:
        for client in clients:
            await client.close()


async def test_delete_closes_the_session(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url)
    session_id = await client.connect()
    await client.wait_frames(3)
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.delete(f"/api/v1/webrtc/offer/{session_id}")).status_code == 204
        assert (await http.delete(f"/api/v1/webrtc/offer/{session_id}")).status_code == 404
    # the log tells a DELETE from a peer that went away
    assert f"session={session_id} closed reason=the client's DELETE" in server.log()
    assert server.metrics()["wanrt_sessions_active"] == 0
    await client.close()


async def test_malformed_trickled_candidate_is_rejected(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url)
    session_id = await client.connect()
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            response = await http.patch(
                f"/api/v1/webrtc/offer/{session_id}", json={"candidates": [{"candidate": "candidate:garbage"}]}
            )
        detail = response.json()["detail"]
        assert response.status_code == 400 and "malformed ICE candidate 'candidate:garbage'" in detail
        assert re.search(r"'candidate:garbage' \(\w+", detail) and "'candidate:<foundation> <component>" in detail
        before = len(client.frames)
        await client.wait_frames(before + 5)
    finally:
        await client.close()


async def test_unload_stops_sessions_with_stream_stopped(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url)
    await client.connect()
    try:
        await client.wait_frames(3)
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.post("/api/v1/pipeline/unload", json={})).status_code == 200
        assert "unloaded" in (await client.wait_message("stream_stopped"))["error_message"]
        assert server.metrics()["wanrt_sessions_active"] == 0
    finally:
        await client.close()
        load_pipeline(server.url, "passthrough")


async def test_server_shutdown_sends_stream_stopped(tmp_path: Path) -> None:
    with run_server(tmp_path) as own_server:
        load_pipeline(own_server.url, "passthrough", height=128, width=128)
        client = ScopeClient(own_server.url)
        await client.connect()
        await client.wait_frames(3)
        own_server.process.send_signal(signal.SIGINT)
        stopped = await client.wait_message("stream_stopped")
        assert "shutting down" in stopped["error_message"]
        await client.close()
        assert await asyncio.to_thread(own_server.process.wait, 15) == 0


async def post_offer(server: RunningServer, sdp: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        return await http.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})


async def test_offers_too_big_to_parse_are_refused_before_aiortc_sees_them(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    one_section = await offer_sdp()
    video = one_section[one_section.index("m=video") :]
    huge = one_section + "".join(video.replace("a=mid:1", f"a=mid:{i}") for i in range(2, 250))  # the 112 KB
    response = await post_offer(server, huge)
    assert response.status_code == 400 and "sdp" in response.text, response.text
    response = await post_offer(server, await offer_sdp(video_sections=7))  # 8 sections, inside the byte limit
    assert response.status_code == 400 and "media sections" in response.json()["detail"], response.text
    lines = one_section.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("a=candidate:"))
    extra = [f"a=candidate:{i} 1 udp 2130706431 127.0.0.1 {20000 + i} typ host\r\n" for i in range(40)]
    response = await post_offer(server, "".join(lines[:at] + extra + lines[at:]))
    assert response.status_code == 400 and "ICE candidates" in response.json()["detail"], response.text
    assert server.metrics()["wanrt_sessions_active"] == 0


async def test_answer_advertises_the_message_size_the_server_accepts(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    response = await post_offer(server, await offer_sdp())
    assert response.status_code == 200, response.text
    answer = response.json()
    async with httpx.AsyncClient(base_url=server.url) as http:
        await http.delete(f"/api/v1/webrtc/offer/{answer['sessionId']}")
    assert "a=max-message-size:65536" in answer["sdp"].splitlines(), answer["sdp"]


async def test_a_candidate_for_a_media_section_the_offer_lacks_is_rejected(server: RunningServer) -> None:
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url)
    session_id = await client.connect()
    candidate = "candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host"
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            for where in ({"sdpMid": "7"}, {"sdpMLineIndex": 9}, {}):
                response = await http.patch(
                    f"/api/v1/webrtc/offer/{session_id}", json={"candidates": [{"candidate": candidate, **where}]}
                )
                assert response.status_code == 400 and "sdpMid" in response.json()["detail"], (where, response.text)
        before = len(client.frames)
        await client.wait_frames(before + 5)
    finally:
        await client.close()


async def test_a_flood_of_messages_is_refused_past_the_rate_and_the_stream_goes_on(server: RunningServer) -> None:
    """Thousands of messages a second, each checked on the event loop and many answered, starved the stream until
    ICE consent expired (found by fuzzing). Past MESSAGES_PER_S they are refused unread, said once a second."""
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url)
    session_id = await client.connect()
    try:
        await client.wait_frames(5)
        start, sent_at, flood = len(client.messages), time.monotonic(), 3 * MESSAGES_PER_S
        for i in range(flood):
            client.channel.send(json.dumps({"noise_scale": round((i % 100) / 100, 2)}))
        error = await client.wait_message("error", start=start)
        assert error["error"] == "TooManyMessages" and f"more than {MESSAGES_PER_S}" in error["message"]

        async def all_arrived() -> bool:
            described = await session_params(server, session_id)
            return described["updates_received"] + described["updates_rejected"] == flood

        await wait_until(all_arrived)
        elapsed_s = time.monotonic() - sent_at
        described = await session_params(server, session_id)
        assert described["updates_received"] <= MESSAGES_PER_S * (1 + elapsed_s), (described, elapsed_s)
        errors = [m for m in client.messages[start:] if m.get("type") == "error"]
        assert len(errors) <= 1 + elapsed_s, errors  # said at most once a second, not once a message
        before = len(client.frames)
        await client.wait_frames(before + 10)  # the stream goes on
        await asyncio.sleep(1.1)  # the budget refills
        await client.send({"noise_scale": 0.33})
        for _ in range(50):
            if (await session_params(server, session_id))["parameters"]["noise_scale"] == 0.33:
                break
            await asyncio.sleep(0.1)
        assert (await session_params(server, session_id))["parameters"]["noise_scale"] == 0.33
    finally:
        await client.close()


async def test_a_client_that_reads_nothing_of_its_channel_gets_a_bounded_backlog(server: RunningServer) -> None:
    """aiortc queues what it sends until the peer's SCTP acknowledges it, without bound: a client that reads nothing
    while it is answered (here its SCTP drops every DATA chunk, so it acknowledges none) must not grow the server's
    memory. Past MAX_CHANNEL_BACKLOG_BYTES stats and errors are dropped, and the stream goes on."""
    load_pipeline(server.url, "passthrough", height=128, width=128)
    client = ScopeClient(server.url)
    session_id = await client.connect()
    try:
        await client.wait_frames(5)

        async def read_nothing(chunk: object) -> None:
            return None

        client.pc.sctp._receive_data_chunk = read_nothing
        per_tick = MESSAGES_PER_S // 30  # two thirds of the rate: each message is read and answered with an error
        for _ in range(6 * 20):
            for _ in range(per_tick):
                client.channel.send("[]")
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            metrics = (await http.get(f"/api/v1/sessions/{session_id}/metrics")).json()
        rejected = (await session_params(server, session_id))["updates_rejected"]
        assert rejected >= 6 * 20 * per_tick * 0.9, rejected  # each answered: 130 kB of errors
        assert metrics["messages_dropped"] > 0, metrics
        assert metrics["channel_backlog_bytes"] <= MAX_CHANNEL_BACKLOG_BYTES + 1024, metrics
        before = metrics["frames_out"]
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            assert (await http.get(f"/api/v1/sessions/{session_id}/metrics")).json()["frames_out"] > before
    finally:
        await client.close()
