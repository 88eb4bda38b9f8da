"""Pipeline stages through a real server (`wanrt serve --gpus cpu:2`) and an aiortc client: the status and the
`stats` messages say how the DiT is placed; a stage process killed mid-stream ends the stream with `stream_stopped`
and a reason, the pipeline's status turns to `error`, a new load (with the stream batch) works and streams again,
and a malformed `gpus` or `blocks_per_stage` is a 400. The NCCL path (several CUDA GPUs: steps, DECODE, MOVE) is
in the `gpu`-marked tests at the end."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.support.rtc_client import ScopeClient, offer_sdp
from tests.support.server import RunningServer, load_pipeline, run_server

pytestmark = pytest.mark.slow
SIZE = 64  # the wire's smallest


@pytest.fixture(scope="module")
def staged_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(tmp_path_factory.mktemp("pp"), "--allow-random-weights", "--gpus", "cpu:2") as running:
        yield running


def stage_pids(server_pid: int) -> list[int]:
    """The server's spawned stage processes (multiprocessing's spawn children), found through /proc."""
    children = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended while we listed them
            continue
    pids = []
    for pid in map(int, children):  # each thread lists its own children: the stages come from a loading thread
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


async def test_a_dead_stage_stops_the_stream_and_the_pipeline_reloads(staged_server: RunningServer) -> None:
    status = load_pipeline(staged_server.url, "streamdiffusionv2", height=SIZE, width=SIZE, random_weights=True)
    assert status["status"] == "loaded", status
    placed = status["pipeline_parallel"]
    assert placed["stages"] == 2 and placed["backend"] == "gloo" and placed["blocks_per_stage"] == [1, 1]
    # The load's warm-up timed the stages (two blocks over two stages: nothing can move).
    assert placed["rebalance"]["blocks_before"] == placed["rebalance"]["blocks_after"] == [1, 1], placed
    assert len(placed["rebalance"]["stage_ms_before"]) == 2, placed
    client = ScopeClient(staged_server.url, initial_parameters={"input_mode": "text"})
    await client.connect()
    try:
        await client.wait_frames(8, timeout_s=30)
        stats = await client.wait_message("stats")
        assert stats["pipeline_parallel"]["stages"] == 2 and len(stats["pipeline_parallel"]["stage_ms"]) == 2
        (pid,) = stage_pids(staged_server.process.pid)
        os.kill(pid, signal.SIGKILL)  # the stage process we had the server spawn
        stopped = await client.wait_message("stream_stopped", timeout_s=20)
    finally:
        await client.close()
    assert "pipeline stage 1" in stopped["error_message"] and "reloaded" in stopped["error_message"], stopped
    status = httpx.get(f"{staged_server.url}/api/v1/pipeline/status", timeout=5).json()
    assert status["status"] == "error" and "pipeline stage 1" in status["error"], status
    offer = httpx.post(f"{staged_server.url}/api/v1/webrtc/offer", json={"sdp": await offer_sdp(), "type": "offer"},
                       timeout=5)  # fmt: skip
    assert offer.status_code == 400 and "not loaded" in offer.text, offer.text  # no new stream on a failed pipeline

    # The new load runs the stream batch (one micro-step per stage in flight) and streams through the server.
    status = load_pipeline(staged_server.url, "streamdiffusionv2", height=SIZE, width=SIZE, random_weights=True,
                           stream_batch=True)  # fmt: skip
    assert status["status"] == "loaded" and status["pipeline_parallel"]["stages"] == 2, status
    assert status["pipeline_parallel"]["stream_batch"] == {"rows": 3, "lanes": 2}, status
    client = ScopeClient(staged_server.url, initial_parameters={"input_mode": "text"})
    await client.connect()
    try:
        await client.wait_frames(4, timeout_s=30)
    finally:
        await client.close()
    # A stage that dies with no stream running is noticed by the status too.
    (pid,) = stage_pids(staged_server.process.pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (status := httpx.get(f"{staged_server.url}/api/v1/pipeline/status", timeout=5).json())["status"] != "error":
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert "pipeline stage 1" in status["error"], status


def test_a_malformed_gpus_list_is_refused_at_the_request(staged_server: RunningServer) -> None:
    for gpus in ("0,0", "cpu:99", "gpu0"):
        response = httpx.post(
            f"{staged_server.url}/api/v1/pipeline/load",
            json={"pipeline_id": "streamdiffusionv2", "load_params": {"gpus": gpus, "random_weights": True}},
            timeout=10,
        )
        assert response.status_code in (400, 422) and "gpus" in response.text, response.text  # schema / value


def test_a_bad_blocks_per_stage_is_refused_saying_why(staged_server: RunningServer) -> None:
    """Its length and entries against the server's two stages at the request (400); its sum against the model's
    blocks at load (the tiny model has 2), in the status."""
    for counts, why in (([1, 1, 1], "gpus names 2 stages"), ([0, 2], "blocks_per_stage"), ([2], "blocks_per_stage")):
        response = httpx.post(
            f"{staged_server.url}/api/v1/pipeline/load",
            json={"pipeline_id": "streamdiffusionv2", "load_params": {"blocks_per_stage": counts,
                                                                      "random_weights": True}},
            timeout=10,
        )  # fmt: skip
        assert response.status_code in (400, 422) and why in response.text, response.text
    status = load_pipeline(staged_server.url, "streamdiffusionv2", height=SIZE, width=SIZE, random_weights=True,
                           blocks_per_stage=[2, 2])  # fmt: skip
    assert status["status"] == "error" and "adds up to 4 blocks; the model has 2" in status["error"], status


def test_a_gpu_that_does_not_exist_is_refused_at_the_request_naming_it(staged_server: RunningServer) -> None:
    """Before the loaded pipeline is released (it was found by the load, after that)."""
    response = httpx.post(
        f"{staged_server.url}/api/v1/pipeline/load",
        json={"pipeline_id": "streamdiffusionv2", "load_params": {"gpus": "0,1", "random_weights": True}},
        timeout=30,
    )
    assert response.status_code == 422 and "gpus 0,1" in response.text, response.text


@pytest.mark.gpu
def test_nccl_stages_equal_the_one_gpu_stream() -> None:
    """The same equality as tests/test_pipeline_parallel.py, on two CUDA GPUs with NCCL (bf16: equal bits, since
    each stage runs the one-GPU arithmetic on its own device)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs for NCCL stages; {torch.cuda.device_count()} visible")
    from serve.pipelines.autoregressive import StreamDiffusionV2Pipeline
    from tests.test_pipeline_parallel import assert_same_runs, fetched, load, run_scenario, whole_cache

    single, spec = load(StreamDiffusionV2Pipeline, "streamdiffusionv2", gpus="0")
    expected = run_scenario(single.open_stream(seed=7), spec, whole_cache)
    staged, _ = load(StreamDiffusionV2Pipeline, "streamdiffusionv2", gpus="0,1")
    try:
        assert staged.stages is not None and staged.placement()["backend"] == "nccl"
        started = time.perf_counter()
        got = run_scenario(staged.open_stream(seed=7), spec, fetched(staged))
        assert time.perf_counter() - started < 60
        assert_same_runs(got, expected)
    finally:
        staged.close()


@pytest.mark.gpu
def test_nccl_stream_batch_equals_the_one_gpu_stream_batch() -> None:
    """The stream batch on two CUDA GPUs (two micro-steps in flight, NCCL) equals its one-GPU schedule with two
    lanes, frames and KV caches."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs for NCCL stages; {torch.cuda.device_count()} visible")
    from serve.pipelines.autoregressive import StreamDiffusionV2Pipeline
    from tests.test_pipeline_parallel import assert_same_runs, fetched, load, stream_batch_scenario, whole_cache

    single, spec = load(StreamDiffusionV2Pipeline, "streamdiffusionv2", gpus="0", stream_batch=True)
    single.stream_lanes = 2
    expected = stream_batch_scenario(single.open_stream(seed=7), spec, whole_cache)
    staged, _ = load(StreamDiffusionV2Pipeline, "streamdiffusionv2", gpus="0,1", stream_batch=True)
    try:
        assert staged.stages is not None and staged.placement()["stream_batch"] == {"rows": 3, "lanes": 2}
        got = stream_batch_scenario(staged.open_stream(seed=7), spec, fetched(staged))
        assert_same_runs(got, expected)
    finally:
        staged.close()


@pytest.mark.gpu
def test_nccl_decode_and_block_moves_equal_the_one_gpu_stream() -> None:
    """DECODE and MOVE over NCCL: a video stream (rank 0 encodes, the last GPU decodes) of an 8-block model started
    at [1, 7] and rebalanced at load equals the one-GPU stream, frames and KV caches; so does one after blocks are
    moved again by hand (the other way, so both directions cross NCCL)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs for NCCL stages; {torch.cuda.device_count()} visible")
    from serve.pipelines.placement import contiguous
    from tests.test_pipeline_parallel import (
        DeeperStreamDiffusionV2,
        assert_same_runs,
        fetched,
        load,
        run_scenario,
        whole_cache,
    )

    single, spec = load(DeeperStreamDiffusionV2, "streamdiffusionv2", gpus="0")
    expected = run_scenario(single.open_stream(seed=7), spec, whole_cache, video=True)
    staged, _ = load(DeeperStreamDiffusionV2, "streamdiffusionv2", gpus="0,1", blocks_per_stage=[1, 7])
    try:
        assert staged.stages is not None
        placed = staged.placement()
        assert placed is not None and placed["backend"] == "nccl" and placed["rebalance"]["blocks_before"] == [1, 7]
        assert_same_runs(run_scenario(staged.open_stream(seed=7), spec, fetched(staged), video=True), expected)
        gc.collect()  # that stream is gone: blocks move only while none is open
        counts = [2, 6] if placed["blocks_per_stage"] != [2, 6] else [3, 5]
        staged.stages.move_blocks(contiguous(counts))
        assert staged.placement()["blocks_per_stage"] == counts
        assert_same_runs(run_scenario(staged.open_stream(seed=7), spec, fetched(staged), video=True), expected)
    finally:
        staged.close()
