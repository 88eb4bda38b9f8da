"""The pipeline manager's load lifecycle, with a pipeline whose load the test holds open, and with sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from serve.errors import PipelineBusy, PipelineNotLoaded, RecordingConflict
from serve.pipelines import registry
from serve.pipelines.base import PipelineStream
from serve.pipelines.manager import PipelineManager
from serve.pipelines.passthrough import PassthroughPipeline
from serve.recording import RecordingStore
from serve.schemas import LoadParams, Offer
from serve.settings import RecordingSettings, WebRTCSettings
from serve.webrtc.sessions import SessionManager
from tests.support.rtc_client import offer_sdp

release_load = threading.Event()
closed = threading.Event()
closes: list[GatedPipeline] = []


class GatedPipeline(PassthroughPipeline):
    """Passthrough whose load waits for the test, and whose close the test can see."""

    @classmethod
    def load(cls, spec, load_params: dict[str, Any], *, report, **context: Any):
        assert release_load.wait(10), "the test never released the load"
        return super().load(spec, load_params, report=report, **context)

    def close(self) -> None:
        closes.append(self)
        closed.set()


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = dataclasses.replace(registry.PIPELINES["passthrough"], id="gated", factory=f"{__name__}:GatedPipeline")
    monkeypatch.setitem(registry.PIPELINES, "gated", spec)
    release_load.clear()
    closed.clear()
    closes.clear()
    return "gated"


async def test_a_pipeline_that_finishes_loading_after_an_unload_is_closed(gated: str, tmp_path: Path) -> None:
    manager = PipelineManager(models_dir=tmp_path, allow_random_weights=False)
    await manager.load(gated, LoadParams())
    await asyncio.sleep(0.1)  # the loading thread is now inside load()
    assert manager.status().status == "loading"
    await manager.unload()
    assert manager.status().status == "not_loaded" and not closed.is_set()
    release_load.set()  # the thread finishes after the unload: what it built must be freed, not leaked
    assert await asyncio.to_thread(closed.wait, 5)
    assert manager.pipeline is None and manager.status().status == "not_loaded"


async def test_a_load_sent_with_an_unload_that_cancels_a_load_starts(gated: str, tmp_path: Path) -> None:
    """The unload cancelled the load in progress and answered before that task had left: a load queued behind it
    got 409 "pipeline None is loading" though the status already said not_loaded (found against a live server)."""
    manager = PipelineManager(models_dir=tmp_path, allow_random_weights=False)
    await manager.load(gated, LoadParams())
    await asyncio.sleep(0.1)  # the loading thread is now inside load()
    unloaded, loading = await asyncio.gather(manager.unload(), manager.load("passthrough", LoadParams()))
    assert unloaded == "unloaded 'gated'" and "loading pipeline 'passthrough'" in loading
    await until_loaded(manager)
    assert manager.status().pipeline_id == "passthrough"
    release_load.set()
    assert await asyncio.to_thread(closed.wait, 5)  # what the cancelled load built is freed
    await manager.close()


async def until_loaded(manager: PipelineManager) -> None:
    for _ in range(100):
        if manager.status().status == "loaded":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not loaded: {manager.status()}")


async def test_a_load_that_completes_is_kept(gated: str, tmp_path: Path) -> None:
    manager = PipelineManager(models_dir=tmp_path, allow_random_weights=False)
    release_load.set()
    await manager.load(gated, LoadParams())
    await until_loaded(manager)
    assert not closed.is_set()
    await manager.close()
    assert closed.is_set()


async def test_loads_sent_at_once_start_one_load_and_free_the_pipeline_it_replaces(gated: str, tmp_path: Path) -> None:
    """Releasing the loaded pipeline awaits; a second load let in there also passed the busy check, and the pipeline
    one of the two built was never freed (found by fuzzing: three concurrent loads answered 200, 200, 409)."""
    manager = PipelineManager(models_dir=tmp_path, allow_random_weights=False)
    release_load.set()
    await manager.load(gated, LoadParams())
    await until_loaded(manager)
    first = manager.pipeline
    answers = await asyncio.gather(*(manager.load(gated, LoadParams()) for _ in range(3)), return_exceptions=True)
    assert sum(isinstance(answer, str) for answer in answers) == 1, answers
    assert all(isinstance(answer, PipelineBusy) for answer in answers if not isinstance(answer, str)), answers
    await until_loaded(manager)
    second = manager.pipeline
    assert second is not first and closes == [first]  # only the replaced one: no other was built
    await manager.close()
    assert closes == [first, second]


async def test_an_offer_being_answered_when_the_pipeline_is_unloaded_gets_an_error_and_no_seat(tmp_path: Path) -> None:
    """An unload stops every session; one whose offer was still being answered was not yet listed, so it stayed
    connected to the freed worker with no frames and no `stream_stopped`, holding a seat (found by fuzzing)."""
    pipelines, sessions = await loaded_passthrough(tmp_path)
    offer = Offer(sdp=await offer_sdp(), type="offer")
    answering = asyncio.create_task(sessions.create(offer))
    while not sessions._starting:  # the offer is inside aiortc's negotiation (it gathers candidates there)
        await asyncio.sleep(0)
    await pipelines.unload()
    with pytest.raises(PipelineNotLoaded, match="stopped while its offer was being answered"):
        await answering
    assert len(sessions) == 0 and sessions.live() == 0
    await pipelines.load("passthrough", LoadParams())  # and the next load's offers are answered as ever
    await until_loaded(pipelines)
    answer = await sessions.create(offer)
    assert len(sessions) == 1 and answer.sessionId
    await sessions.stop_all("test over")
    await pipelines.close()


async def loaded_passthrough(
    tmp_path: Path, pipeline_id: str = "passthrough"
) -> tuple[PipelineManager, SessionManager]:
    pipelines = PipelineManager(models_dir=tmp_path, allow_random_weights=False)
    recordings = RecordingStore(RecordingSettings(directory=tmp_path / "recordings"))
    sessions = SessionManager(pipelines, WebRTCSettings(ice_interfaces="loopback"), tmp_path, recordings)
    await pipelines.load(pipeline_id, LoadParams())
    await until_loaded(pipelines)
    return pipelines, sessions


async def test_an_offer_that_comes_while_an_unload_stops_the_sessions_is_refused(tmp_path: Path) -> None:
    """Closing the sessions awaits (each flushes its `stream_stopped`); the pipeline was still there meanwhile, and
    an offer then joined it, after the sessions had been listed for stopping."""
    pipelines, sessions = await loaded_passthrough(tmp_path)
    stopping, stopped = asyncio.Event(), asyncio.Event()

    async def slow_stop(reason: str) -> None:  # a session whose data channel takes its time to drain
        stopping.set()
        await stopped.wait()

    pipelines.on_unload(slow_stop)
    unloading = asyncio.create_task(pipelines.unload())
    await stopping.wait()
    with pytest.raises(PipelineNotLoaded):
        await sessions.create(Offer(sdp=await offer_sdp(), type="offer"))
    stopped.set()
    await unloading
    assert len(sessions) == 0


async def test_an_unloaded_pipeline_is_freed_though_closed_sessions_still_point_at_it(tmp_path: Path) -> None:
    """A closed session refers to its pipeline through reference cycles (callbacks into its own methods): only the
    cyclic collector frees it, and a next load could run out of GPU memory beside the old weights meanwhile."""
    pipelines, _ = await loaded_passthrough(tmp_path)
    pipeline = weakref.ref(pipelines.pipeline)
    cycle: dict[str, Any] = {"pipeline": pipelines.pipeline}
    cycle["self"] = cycle
    del cycle
    gc.disable()  # the collector would run at a time of its choosing
    try:
        await pipelines.unload()
        assert pipeline() is None
    finally:
        gc.enable()


async def test_a_session_that_is_ending_cannot_start_a_recording(tmp_path: Path) -> None:
    """Its frames have stopped, and once it is gone nothing could stop the recording: its thread ran on for good."""
    pipelines, sessions = await loaded_passthrough(tmp_path)
    answer = await sessions.create(Offer(sdp=await offer_sdp(), type="offer"))
    session = sessions.get(answer.sessionId)
    session.close_soon("the test ends it")
    with pytest.raises(RecordingConflict, match="ending"):
        sessions.start_recording(answer.sessionId)
    await session.close()
    assert sessions.recordings.active(answer.sessionId) is None and len(sessions) == 0
    await pipelines.close()


async def test_a_session_whose_close_fails_midway_still_closes_and_gives_its_seat_back(tmp_path: Path) -> None:
    pipelines, sessions = await loaded_passthrough(tmp_path)
    answer = await sessions.create(Offer(sdp=await offer_sdp(), type="offer"))
    session = sessions.get(answer.sessionId)

    def fails() -> None:  # as NVENC's EndEncode may after a CUDA error
        raise RuntimeError("the encoder would not stop")

    session.output.stop = fails  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await session.close("the test ends it")
    assert len(sessions) == 0 and session.pc.connectionState == "closed"
    await pipelines.close()


class SlowStreamPipeline(PassthroughPipeline):
    """Passthrough whose streams take 0.5 s to open, as a real-size KV cache takes to allocate on a CPU."""

    released: list[PipelineStream] = []

    def open_stream(self, seed: int) -> PipelineStream:
        time.sleep(0.5)
        stream = super().open_stream(seed)
        stream.release = lambda: SlowStreamPipeline.released.append(stream)  # type: ignore[method-assign]
        return stream


@pytest.fixture
def slow_open(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = dataclasses.replace(
        registry.PIPELINES["passthrough"], id="slow-open", factory=f"{__name__}:SlowStreamPipeline"
    )
    monkeypatch.setitem(registry.PIPELINES, "slow-open", spec)
    SlowStreamPipeline.released.clear()
    return "slow-open"


async def test_a_stream_is_opened_off_the_event_loop(slow_open: str, tmp_path: Path) -> None:
    """Opening a stream allocates its KV cache (seconds at real size on a CPU); on the loop it stalled every other
    session's packets and requests for that long."""
    pipelines, sessions = await loaded_passthrough(tmp_path, slow_open)
    offer = Offer(sdp=await offer_sdp(), type="offer")
    answering = asyncio.create_task(sessions.create(offer))
    gaps, last = [], time.monotonic()
    while not answering.done():
        await asyncio.sleep(0.01)
        gaps.append(time.monotonic() - last)
        last = time.monotonic()
    await answering
    assert max(gaps) < 0.3, max(gaps)
    await sessions.stop_all("test over")
    await pipelines.close()


async def test_an_offer_whose_stream_opens_while_the_pipeline_is_unloaded_is_refused(
    slow_open: str, tmp_path: Path
) -> None:
    pipelines, sessions = await loaded_passthrough(tmp_path, slow_open)
    answering = asyncio.create_task(sessions.create(Offer(sdp=await offer_sdp(), type="offer")))
    await asyncio.sleep(0.1)  # the stream is being opened
    await pipelines.unload()
    with pytest.raises(PipelineNotLoaded, match="being made"):
        await answering
    assert len(sessions) == 0 and len(SlowStreamPipeline.released) == 1  # and its buffers freed
