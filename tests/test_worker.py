"""The pipeline worker thread: newest-frame dropping, atomic parameter updates, failure isolation, fairness."""

from __future__ import annotations

import itertools
import threading
import time
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from serve.errors import PipelineWorkerStopped
from serve.pipelines.base import ChunkOutput, PipelineStream
from serve.pipelines.worker import VIDEO_TIME_BASE, FrameStamp, OutputClock, PipelineWorker, StreamSlot
from serve.webrtc.encoders import Vp8Encoder

TB = Fraction(1, 90000)


class RecordingStream(PipelineStream):
    """Echoes its input after `delay_s`, recording what each chunk saw; fails on chunk `fail_at` if set."""

    def __init__(self, delay_s: float = 0.0, fail_at: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_at = fail_at
        self.seen: list[tuple[list[int], dict[str, Any]]] = []
        self.resets = 0

    def process(self, frames: np.ndarray | None, params: dict[str, Any]) -> np.ndarray:
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise RuntimeError("boom")
        time.sleep(self.delay_s)
        indices = [] if frames is None else [int(f[0, 0, 0]) for f in frames]
        self.seen.append((indices, dict(params)))
        return frames if frames is not None else np.zeros((2, 2, 2, 3), np.uint8)

    def reset(self) -> None:
        self.resets += 1


class Sink:
    def __init__(self) -> None:
        self.chunks: list[tuple[np.ndarray, list[FrameStamp]]] = []
        self.errors: list[BaseException] = []
        self.event = threading.Event()

    def emit(self, frames: np.ndarray, stamps: list[FrameStamp]) -> None:
        self.chunks.append((frames, stamps))
        self.event.set()

    def error(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.event.set()


def make_slot(worker: PipelineWorker, stream: PipelineStream, sink: Sink, chunk: int, **params: Any) -> StreamSlot:
    slot = StreamSlot(
        worker,
        "test",
        stream,
        chunk,
        {"input_mode": "video", **params},
        convert=lambda payload: np.full((2, 2, 3), payload, np.uint8),
        emit=sink.emit,
        output_has_room=lambda frames: len(sink.chunks) < 3,
        on_error=sink.error,
        text_fps=30,
    )
    worker.attach(slot)
    return slot


def push(slot: StreamSlot, index: int) -> None:
    slot.push_input(index, FrameStamp(index * 3000, TB, time.monotonic()))


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def worker():
    worker = PipelineWorker("test")
    yield worker
    worker.close()
    assert not worker.alive


def test_chunks_take_consecutive_frames_and_keep_their_timestamps(worker: PipelineWorker) -> None:
    stream, sink = RecordingStream(), Sink()
    slot = make_slot(worker, stream, sink, chunk=4)
    for index in range(8):
        push(slot, index)
        time.sleep(0.01)
    wait_for(lambda: len(stream.seen) == 2)
    assert [indices for indices, _ in stream.seen] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [s.pts for s in sink.chunks[1][1]] == [12000, 15000, 18000, 21000]
    assert slot.frames_dropped == 0


def test_frames_arriving_while_busy_are_dropped_oldest_first(worker: PipelineWorker) -> None:
    stream, sink = RecordingStream(delay_s=0.3), Sink()
    slot = make_slot(worker, stream, sink, chunk=2)
    push(slot, 0)
    push(slot, 1)
    wait_for(lambda: slot.chunks == 0 and len(slot._inputs) == 0)  # the worker took chunk [0, 1] and is busy
    for index in range(2, 12):
        push(slot, index)
    wait_for(lambda: len(stream.seen) == 2)
    assert stream.seen[1][0] == [10, 11]  # only the newest chunk survives a busy period
    assert slot.frames_dropped == 8
    assert slot.frames_in == 12


def test_parameter_updates_apply_together_at_the_next_chunk(worker: PipelineWorker) -> None:
    stream, sink = RecordingStream(delay_s=0.2), Sink()
    slot = make_slot(worker, stream, sink, chunk=1, noise_scale=0.7, prompts=["a"])
    push(slot, 0)
    wait_for(lambda: len(slot._inputs) == 0)  # chunk 0 running with the initial parameters
    slot.update_params({"noise_scale": 0.2})
    slot.update_params({"prompts": ["b"], "reset_cache": True})
    push(slot, 1)
    wait_for(lambda: len(stream.seen) == 2)
    first, second = stream.seen[0][1], stream.seen[1][1]
    assert (first["noise_scale"], first["prompts"]) == (0.7, ["a"])
    assert (second["noise_scale"], second["prompts"]) == (0.2, ["b"])
    assert "reset_cache" not in second and stream.resets == 1  # one-shot: consumed by one reset


def test_a_failing_chunk_ends_its_session_and_the_worker_serves_on(worker: PipelineWorker) -> None:
    failing_sink, healthy_sink = Sink(), Sink()
    failing = make_slot(worker, RecordingStream(fail_at=1), failing_sink, chunk=1)
    healthy_stream = RecordingStream()
    healthy = make_slot(worker, healthy_stream, healthy_sink, chunk=1)
    for index in range(3):
        push(failing, index)
        push(healthy, index)
        time.sleep(0.02)
    wait_for(lambda: failing_sink.errors and len(healthy_stream.seen) == 3)
    assert str(failing_sink.errors[0]) == "boom"
    assert failing.closed and not failing.ready()
    push(healthy, 3)
    wait_for(lambda: len(healthy_stream.seen) == 4)


def test_text_mode_generates_only_while_output_has_room(worker: PipelineWorker) -> None:
    stream, sink = RecordingStream(), Sink()
    make_slot(worker, stream, sink, chunk=2, input_mode="text")
    wait_for(lambda: len(sink.chunks) == 3)
    time.sleep(0.1)
    assert len(sink.chunks) == 3  # the output is full: no more chunks until it drains
    pts = [s.pts for _, stamps in sink.chunks for s in stamps]
    assert pts == [i * 3000 for i in range(6)]  # generated at 30 fps on the video clock


def test_paused_slot_runs_nothing(worker: PipelineWorker) -> None:
    stream, sink = RecordingStream(), Sink()
    slot = make_slot(worker, stream, sink, chunk=1, paused=True)
    push(slot, 0)
    time.sleep(0.1)
    assert stream.seen == []
    slot.update_params({"paused": False})
    wait_for(lambda: len(stream.seen) == 1)


class SerialDevice:
    """What CUDA events are to `ChunkOutput`, from a device that runs chunks one after another, ahead of the host:
    a chunk queued at t finishes `chunk_s` after both t and the chunk before it."""

    def __init__(self, chunk_s: float) -> None:
        self.chunk_s = chunk_s
        self.free_at = 0.0

    def queue(self) -> CopyDone:
        self.free_at = max(time.monotonic(), self.free_at) + self.chunk_s
        return CopyDone(self.free_at)


class CopyDone:
    def __init__(self, at: float) -> None:
        self.at = at

    def query(self) -> bool:
        return time.monotonic() >= self.at

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.at - time.monotonic()))


class RunsAheadStream(RecordingStream):
    """A stream on a device that runs ahead of the host: `start` returns while its frames are still coming."""

    def __init__(self, timeline: list[tuple[str, int]], copy_s: float | None) -> None:
        super().__init__()
        self.timeline = timeline
        self.device = None if copy_s is None else SerialDevice(copy_s)  # None: the host, done when `start` returns

    def start(self, frames, params) -> ChunkOutput:
        index = len(self.seen)
        self.timeline.append(("start", index))
        out = np.full((1, 2, 2, 3), index, np.uint8)
        self.process(frames, params)
        return ChunkOutput(out, None if self.device is None else self.device.queue())


@pytest.mark.parametrize("copy_s", [0.05, None])
def test_the_next_chunk_is_queued_before_waiting_for_frames_in_flight(worker: PipelineWorker, copy_s) -> None:
    """On CUDA the worker queues chunk n+1 before it waits for chunk n's frames (the GPU never idles while the host
    waits and emits); frames still come out in order, each once. On a CPU each chunk is emitted before the next."""
    timeline: list[tuple[str, int]] = []
    stream, sink = RunsAheadStream(timeline, copy_s), Sink()

    def emit(frames: np.ndarray, stamps: list[FrameStamp]) -> None:
        timeline.append(("emit", int(frames[0, 0, 0, 0])))
        sink.emit(frames, stamps)

    slot = StreamSlot(worker, "ahead", stream, 1, {"input_mode": "text"}, convert=lambda p: p, emit=emit,
                      output_has_room=lambda _: len(stream.seen) < 5, on_error=sink.error, text_fps=30)  # fmt: skip
    worker.attach(slot)
    wait_for(lambda: len(sink.chunks) == 5)
    emits = [index for kind, index in timeline if kind == "emit"]
    assert emits == [0, 1, 2, 3, 4] and not sink.errors
    for n in range(4):
        queued_first = timeline.index(("start", n + 1)) < timeline.index(("emit", n))
        assert queued_first == (copy_s is not None), timeline


def test_a_text_mode_slot_waiting_for_room_is_woken_when_the_output_drains(worker: PipelineWorker) -> None:
    stream, sink = RecordingStream(), Sink()
    slot = make_slot(worker, stream, sink, chunk=2, input_mode="text")
    wait_for(lambda: len(sink.chunks) == 3)
    time.sleep(0.05)  # the worker found no room and waits
    sink.chunks.clear()  # the output played everything: what OutputTrack's `on_drained` reports with `wake`
    slot.wake()
    wait_for(lambda: len(sink.chunks) == 3)  # woken, it fills the output again


def test_the_output_clock_keeps_each_modes_spacing_and_never_steps_back() -> None:
    """Camera stamps start at a random RTP origin; text mode's are generated. Switching between them (and the RTP
    clock wrapping) must not step the output back: libvpx refuses a frame stamped before its stream's first."""
    clock = OutputClock(interval=3000)
    camera = [FrameStamp(4_000_000_000 + 3003 * i, VIDEO_TIME_BASE, 1.0) for i in range(3)]
    out = [clock.follow(stamp) for stamp in camera]
    assert [s.pts for s in out] == [s.pts for s in camera]  # the camera's own clock, unchanged while it runs
    assert out[0].arrival_s == 1.0
    text = [clock.generated() for _ in range(3)]  # a switch to text mode goes on from there, one interval apart
    assert [s.pts for s in text] == [out[-1].pts + 3000 * (i + 1) for i in range(3)]
    wrapped = [FrameStamp(500 + 3003 * i, VIDEO_TIME_BASE, 2.0) for i in range(3)]  # back to a camera, clock wrapped
    back = [clock.follow(stamp) for stamp in wrapped]
    assert back[0].pts == text[-1].pts + 3000 and [b.pts - a.pts for a, b in itertools.pairwise(back)] == [3003] * 2
    ms = clock.follow(FrameStamp(10**9, Fraction(1, 1000), 3.0))  # another time base: converted, and forward
    assert ms.time_base == VIDEO_TIME_BASE and ms.pts == back[-1].pts + 10**9 * 90 - wrapped[-1].pts


def test_a_switch_to_text_mode_goes_on_from_the_cameras_timestamps_and_libvpx_takes_every_frame(
    worker: PipelineWorker,
) -> None:
    """The camera's stamps start at its RTP clock's random origin; text mode's used to restart at 0, and libvpx,
    opened (or reopened, for a new bitrate) at a camera frame, refused every frame stamped before that one."""
    stream, sink = RecordingStream(), Sink()
    slot = make_slot(worker, stream, sink, chunk=2)
    for index in range(2):
        slot.push_input(index, FrameStamp(10**9 + index * 3000, TB, time.monotonic()))
    wait_for(lambda: len(sink.chunks) == 1)
    slot.update_params({"input_mode": "text"})
    wait_for(lambda: len(sink.chunks) == 3)
    stamps = [stamp for _, chunk_stamps in sink.chunks for stamp in chunk_stamps]
    assert stamps[0].pts == 10**9 and all(a.pts < b.pts for a, b in itertools.pairwise(stamps)), stamps
    encoder = Vp8Encoder(500_000)
    for frames, chunk_stamps in sink.chunks:
        images = np.zeros((len(frames), 16, 16, 3), np.uint8)
        for frame in encoder.prepare(images, chunk_stamps):
            assert encoder.encode(frame, keyframe=False) is not None


class ReleasedStream(RecordingStream):
    released: tuple[str, int] | None = None  # the thread that freed it, and the chunks it had run by then

    def release(self) -> None:
        self.released = (threading.current_thread().name, len(self.seen))


def test_a_detached_slot_has_its_stream_freed_on_the_worker_thread_after_its_chunk(worker: PipelineWorker) -> None:
    """A closed session's KV cache lived on until the cyclic collector found the session's reference cycles."""
    stream, sink = ReleasedStream(delay_s=0.3), Sink()
    slot = make_slot(worker, stream, sink, chunk=1)
    push(slot, 0)
    wait_for(lambda: not slot._inputs)  # the worker took the chunk, which runs for 0.3 s
    worker.detach(slot)
    wait_for(lambda: stream.released is not None)
    assert stream.released == ("pipeline-test", 1)  # by the thread that owns the device, once the chunk was done


class BrokenCopy(ChunkOutput):
    @property
    def in_flight(self) -> bool:  # CUDA reports an earlier kernel's fault at the next query
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class FaultsOutsideItsChunk(RecordingStream):
    def start(self, frames: np.ndarray | None, params: dict[str, Any]) -> ChunkOutput:
        return BrokenCopy(self.process(frames, params))


def test_an_error_outside_a_chunk_stops_every_stream_on_the_worker_and_says_why(worker: PipelineWorker) -> None:
    """It used to end the worker thread alone: every stream froze with no `stream_stopped`, the status `loaded`."""
    faulty, other = Sink(), Sink()
    slot = make_slot(worker, FaultsOutsideItsChunk(), faulty, chunk=1)
    make_slot(worker, RecordingStream(), other, chunk=1)
    push(slot, 0)
    wait_for(lambda: bool(faulty.errors and other.errors))
    assert all(isinstance(sink.errors[0], PipelineWorkerStopped) for sink in (faulty, other))
    assert worker.failure is not None and "illegal memory access" in worker.failure


def test_a_worker_closed_inside_a_long_chunk_closes_the_pipeline_as_it_leaves_the_chunk(worker: PipelineWorker) -> None:
    """An unload whose join timed out (a hung stage holds a chunk up to its op timeout) closed the pipeline beside the
    chunk: its stages were stopped and its process group destroyed from a second thread while the first waited on
    them."""
    stream, sink = RecordingStream(delay_s=0.5), Sink()
    slot = make_slot(worker, stream, sink, chunk=1)
    push(slot, 0)
    wait_for(lambda: not slot._inputs)  # the chunk runs for 0.5 s
    closed: list[tuple[str, int]] = []
    worker.close(timeout_s=0.05, then=lambda: closed.append((threading.current_thread().name, len(stream.seen))))
    assert closed == []
    wait_for(lambda: bool(closed))
    assert closed == [("pipeline-test", 1)]  # on the worker's thread, after its chunk


def test_closing_a_worker_that_already_stopped_closes_the_pipeline_at_once() -> None:
    worker = PipelineWorker("stopped")
    worker.close()
    closed: list[str] = []
    worker.close(then=lambda: closed.append(threading.current_thread().name))
    assert closed == [threading.current_thread().name]


def test_closing_the_worker_inside_a_chunk_frees_every_stream_before_the_pipeline_closes(worker) -> None:
    """An unload detaches its sessions, then closes the worker. A chunk still running then (a 14B chunk outlasts the
    sessions' closing) made the thread leave without freeing the detached streams, whose KV caches lived on beside
    the next load."""
    running, queued = ReleasedStream(delay_s=0.3), ReleasedStream()
    busy = make_slot(worker, running, Sink(), chunk=1)
    make_slot(worker, queued, Sink(), chunk=1)  # attached still, as a session that had not closed yet
    push(busy, 0)
    wait_for(lambda: not busy._inputs)  # the worker is in the chunk
    worker.detach(busy)
    order: list[str] = []
    worker.close(then=lambda: order.append(f"pipeline closed, streams freed: {running.released} {queued.released}"))
    assert not worker.alive
    assert order == ["pipeline closed, streams freed: ('pipeline-test', 1) ('pipeline-test', 0)"]


def test_a_slot_that_was_never_attached_has_its_stream_freed_once(worker: PipelineWorker) -> None:
    """An offer that fails after its stream was opened (a bad SDP, a missing fingerprint) detaches a slot the worker
    never had: its stream is freed all the same, on the worker thread, and a second detach frees nothing more."""
    released: list[str] = []

    class Counted(RecordingStream):
        def release(self) -> None:
            released.append(threading.current_thread().name)

    slot = StreamSlot(worker, "failed-offer", Counted(), 1, {"input_mode": "video"}, convert=lambda p: p,
                      emit=Sink().emit, output_has_room=lambda frames: True, on_error=Sink().error,
                      text_fps=30)  # fmt: skip
    worker.detach(slot)
    wait_for(lambda: bool(released))
    worker.detach(slot)
    time.sleep(0.05)
    assert released == ["pipeline-test"]


def test_a_slot_cannot_join_a_worker_that_stopped() -> None:
    """A worker that died (an asynchronous CUDA error) while an offer was being answered: the slot joined a thread
    that would never run it, and the peer connected to a stream that sent nothing and never said why."""
    from serve.errors import PipelineNotLoaded

    worker = PipelineWorker("stopped")
    worker.close()
    with pytest.raises(PipelineNotLoaded, match="load it again"):
        make_slot(worker, RecordingStream(), Sink(), chunk=1)


async def test_text_mode_with_copies_in_flight_fills_the_output_without_dropping_frames(worker) -> None:
    """Text mode on a GPU with the frames copied to the host (`--frame-path host`): the worker starts the next ready
    chunk while the last one's copy is in flight. `ready` counted only frames already in the output, so the same slot
    was started again beside its copying chunk, three chunks met a two-chunk output, and half the frames were
    dropped (47 out and 44 dropped in 3 s, where 91 should play)."""
    from serve.webrtc.tracks import OutputTrack

    chunk = 4
    device = SerialDevice(0.02)  # far faster than playout: 4 frames at 30 fps take 133 ms

    class CopiesFrames(RecordingStream):
        def start(self, frames, params) -> ChunkOutput:
            return ChunkOutput(np.zeros((chunk, 16, 16, 3), np.uint8), device.queue())

    output = OutputTrack(capacity_frames=2 * chunk, on_drained=lambda: slot.wake())
    slot = StreamSlot(worker, "text", CopiesFrames(), chunk, {"input_mode": "text"}, convert=lambda p: p,
                      emit=output.push_threadsafe, output_has_room=output.has_room, on_error=Sink().error,
                      text_fps=30)  # fmt: skip
    worker.attach(slot)
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        await output.recv()
    worker.detach(slot)
    assert output.frames_out >= 40 and output.frames_dropped == 0, (output.frames_out, output.frames_dropped)
