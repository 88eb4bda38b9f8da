"""The pipeline worker: one thread per loaded pipeline runs every session's chunks, so one thread owns the device.

The event loop and the worker meet only in `StreamSlot`, under the worker's single lock:
- the loop pushes input frames (`push_input`, bounded: the oldest unconsumed frame is dropped and counted) and
  parameter updates (`update_params`, merged and applied atomically at the next chunk boundary);
- the worker takes a whole chunk when one is ready, runs it with the lock released, and hands the output to
  `emit`, which must be thread-safe (the output track hops onto the loop with call_soon_threadsafe).
Nothing here waits on the event loop, and nothing on the event loop waits for a chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from serve.errors import PipelineNotLoaded, PipelineWorkerStopped
from serve.pipelines.base import ChunkOutput, PipelineStream
from serve.threads import PIPELINE_WORKER, name_os_thread

log = logging.getLogger(__name__)

VIDEO_TIME_BASE = Fraction(1, 90000)  # RTP video clock
ONE_SHOT_FIELDS = ("first_frame_image", "last_frame_image")
"""Given to exactly one chunk, the next after they are sent (Scope pops them once a chunk has its parameters): a first
or last frame is a boundary of one chunk; an unchanged value sent again conditions one more chunk. References
(`vace_ref_images`) are not one-shot here: they hold for every chunk until a new list (or `[]`) replaces them."""
VACE_IMAGE_FIELDS = ("vace_ref_images", *ONE_SHOT_FIELDS)


@dataclass(frozen=True)
class FrameStamp:
    """Where a frame sits in time: its media timestamp and when its input reached the server (for latency)."""

    pts: int
    time_base: Fraction
    arrival_s: float | None  # time.monotonic(); None for generated frames


EmitFn = Callable[[np.ndarray, list[FrameStamp]], None]


class OutputClock:
    """A session's output timestamps, in one time base and always increasing.

    Video mode's frames keep their inputs' spacing (the output track paces by it) and text mode's follow one frame
    interval apart; where a stamp would not follow the last one (a switch from the camera's clock to text mode's or
    back, the camera's RTP clock wrapping), the offset moves so that it comes one interval after. Without it a switch
    to text mode restarted at 0, behind the camera's random RTP origin: libvpx refuses a frame stamped before its
    stream's first (InvalidData, found by fuzzing), and the RTP timestamps aiortc sends would have stepped back."""

    def __init__(self, interval: int) -> None:
        self.interval = interval  # VIDEO_TIME_BASE ticks
        self._offset = 0
        self._last: int | None = None

    def follow(self, stamp: FrameStamp) -> FrameStamp:
        """An input frame's stamp on the output clock."""
        return self._place(round(stamp.pts * stamp.time_base / VIDEO_TIME_BASE) + self._offset, stamp.arrival_s)

    def generated(self) -> FrameStamp:
        """A generated frame's: one interval after the last frame."""
        return self._place(0 if self._last is None else self._last + self.interval, None)

    def _place(self, pts: int, arrival_s: float | None) -> FrameStamp:
        if self._last is not None and pts <= self._last:
            self._offset += self._last + self.interval - pts
            pts = self._last + self.interval
        self._last = pts
        return FrameStamp(pts, VIDEO_TIME_BASE, arrival_s)


class StreamSlot:
    """One session's seat on the worker. Created and fed on the event loop; run on the worker thread."""

    def __init__(
        self,
        worker: PipelineWorker,
        session_id: str,
        stream: PipelineStream,
        chunk_frames: int,
        params: dict[str, Any],
        *,
        convert: Callable[[Any], Any],
        emit: EmitFn,
        output_has_room: Callable[[int], bool],
        on_error: Callable[[BaseException], None],
        text_fps: float,
        collate: Callable[[list[Any]], Any] = np.stack,
    ) -> None:
        self._lock = worker.condition
        self._worker = worker
        self.session_id = session_id
        self.stream = stream
        self.chunk_frames = chunk_frames
        self._inputs: deque[tuple[Any, FrameStamp]] = deque(maxlen=chunk_frames)
        self._params = dict(params)  # effective; replaced only at chunk boundaries
        self._pending: dict[str, Any] = {}
        # The initial parameters' one-shot values go to the first chunk only; `_sent_once` keeps the last value of
        # each as sent, for `params` (what the session reports), never for a chunk.
        self._sent_once = {name: self._params.pop(name) for name in ONE_SHOT_FIELDS if name in self._params}
        self._pending.update({name: value for name, value in self._sent_once.items() if value})
        self._convert = convert  # one input payload → what `collate` takes (runs on the worker thread)
        self._collate = collate  # the chunk's converted payloads → what the stream's `process` takes
        self._emit = emit
        self._output_has_room = output_has_room  # whether the output takes this many more frames now
        self._on_error = on_error
        self._clock = OutputClock(round(1 / (text_fps * VIDEO_TIME_BASE)))
        # Input stamps of each chunk taken, until its frames come out: a stream batch returns a chunk S·P calls
        # after taking it (`chunks_in_flight`), and its frames keep their own inputs' timestamps. Bounded by the pipe.
        self._stamps_in_flight: deque[list[FrameStamp]] = deque(maxlen=64)
        self.closed = False
        self.stream_released = False  # set by the worker once it has freed the stream's buffers
        self._waiting_for_room = False  # set by `ready` (under the lock) when text mode found the output full
        self._unfinished = 0  # chunks started whose frames have not been emitted yet (worker thread only)
        # counters (read by stats; written under the lock)
        self.frames_in = 0
        self.frames_dropped = 0
        self.chunks = 0
        self.chunk_ms = 0.0
        self.updates_applied = 0

    # -- event-loop side --------------------------------------------------------------------------------------------

    def push_input(self, payload: Any, stamp: FrameStamp) -> None:
        with self._lock:
            if len(self._inputs) == self._inputs.maxlen:
                self.frames_dropped += 1  # the model is busy: the oldest unconsumed frame goes, not the newest
            self._inputs.append((payload, stamp))
            self.frames_in += 1
            self._lock.notify()

    def update_params(self, update: dict[str, Any]) -> None:
        with self._lock:
            self._pending.update(update)
            self._lock.notify()

    def wake(self) -> None:
        """The output played a frame: wake the worker only if this slot waits for output room (text mode). Called
        for every frame played, so a video stream's frames do not each wake the worker for nothing."""
        with self._lock:
            if self._waiting_for_room:
                self._lock.notify()

    @property
    def params(self) -> dict[str, Any]:
        with self._lock:
            return {**self._params, **self._sent_once, **self._pending}

    # -- worker side ------------------------------------------------------------------------------------------------

    def _mode(self) -> str:
        return self._pending.get("input_mode", self._params.get("input_mode", "video"))

    def ready(self) -> bool:
        """Called with the lock held."""
        self._waiting_for_room = False
        if self.closed or self._pending.get("paused", self._params.get("paused", False)):
            return False
        if self._mode() == "video":
            return len(self._inputs) == self.chunk_frames  # the output track bounds itself by dropping stale frames
        # Text mode generates only as fast as frames are played out, counting the frames of a chunk that is started
        # but not yet emitted (its copy in flight while the worker queues the next chunk): else the same slot was
        # started again beside it and the output, full, dropped a chunk's frames each time round.
        room = self._output_has_room(self.chunk_frames * (1 + self._unfinished))
        self._waiting_for_room = not room
        return room

    def start_chunk(self) -> StartedChunk | None:
        """Take the chunk's inputs and parameters and run it up to its frames' copy to the host (which may still be
        in flight); None when it failed (the session is ended)."""
        with self._lock:
            reset = self._pending.pop("reset_cache", False)
            once = {name: self._pending.pop(name) for name in ONE_SHOT_FIELDS if name in self._pending}
            self._sent_once.update(once)
            if self._pending or once:
                self._params.update(self._pending)
                self.updates_applied += 1
                self._pending.clear()
            params = {**self._params, **once} if once else self._params
            taken = list(self._inputs) if params.get("input_mode", "video") == "video" else []
            self._inputs.clear()
        try:
            if reset:
                self.stream.reset()
            frames = self._collate([self._convert(payload) for payload, _ in taken]) if taken else None
            started = time.perf_counter()
            out = self.stream.start(frames, params)
            self._stamps_in_flight.append([stamp for _, stamp in taken])
            source: list[FrameStamp] = []
            while len(self._stamps_in_flight) > self.stream.chunks_in_flight:  # the chunks that came out now
                source += self._stamps_in_flight.popleft()
        except Exception as exc:  # a failing chunk ends this session, not the worker
            self._fail(exc)
            return None
        self._unfinished += 1
        return StartedChunk(self, out, source, started)

    def finish_chunk(self, out: ChunkOutput, source: list[FrameStamp], started: float) -> None:
        """Wait for the chunk's frames on the host and emit them with their stamps."""
        try:
            frames = out.frames()
            if not self.closed:
                self._emit(frames, self._stamps(source, len(frames)))
        except Exception as exc:
            self._fail(exc)
            return
        finally:
            self._unfinished -= 1
        with self._lock:
            self.chunks += 1
            self.chunk_ms = (time.perf_counter() - started) * 1000

    def _fail(self, exc: BaseException) -> None:
        log.exception("session=%s chunk failed", self.session_id, exc_info=exc)
        self.closed = True
        self._on_error(exc)

    def _stamps(self, taken: list[FrameStamp], count: int) -> list[FrameStamp]:
        """Stamps for `count` frames out, from the input stamps of the chunks they came from (the newest: a model may
        emit fewer frames than it took, as a causal VAE's first chunk does), or generated ones (text mode)."""
        if count and len(taken) >= count:
            return [self._clock.follow(stamp) for stamp in taken[-count:]]
        return [self._clock.generated() for _ in range(count)]


@dataclass
class StartedChunk:
    """A chunk whose device work is queued and whose frames may still be on their way to the host."""

    slot: StreamSlot
    out: ChunkOutput
    source: list[FrameStamp]  # the input stamps of the chunks whose frames come out
    started: float  # time.perf_counter() when it started

    @property
    def in_flight(self) -> bool:
        return self.out.in_flight

    def finish(self) -> None:
        self.slot.finish_chunk(self.out, self.source, self.started)


class PipelineWorker:
    """Runs ready chunks of all attached slots, round robin, on one thread."""

    def __init__(self, name: str, device: Any = None) -> None:
        self.device = device  # the pipeline's torch device: the thread's current CUDA device when it is one
        self.condition = threading.Condition()
        self._slots: list[StreamSlot] = []
        # Detached slots whose streams' device buffers this thread frees (it owns the device, and knows whether a
        # chunk of theirs is still in flight). Left to the collector, a closed session's KV cache lived on in the
        # reference cycles between the session and its callbacks.
        self._released: list[StreamSlot] = []
        self._next = 0
        self._stopping = False
        self.failure: str | None = None  # why the thread stopped on an error (the manager's status reports it)
        self._exited = False
        self._then: list[Callable[[], None]] = []  # `close`'s: run by the thread as it leaves
        self._thread = threading.Thread(target=self._run, name=f"pipeline-{name}", daemon=True)
        self._thread.start()

    def attach(self, slot: StreamSlot) -> None:
        """Raises PipelineNotLoaded when the thread has stopped (on an error, or for an unload): a slot joined to it
        would never run, and its peer would connect to a stream that sends nothing and never says why."""
        with self.condition:
            if self._exited or self._stopping:
                raise PipelineNotLoaded(
                    self.failure or "the pipeline was unloaded while this offer was answered; load it again"
                )
            self._slots.append(slot)
            self.condition.notify()

    def detach(self, slot: StreamSlot) -> None:
        """The slot runs no more chunks, and its stream is freed on the worker thread: also one that was never
        attached (its offer failed after the stream was opened), whose KV cache would otherwise wait for the
        cyclic collector."""
        with self.condition:
            slot.closed = True
            if slot in self._slots:
                self._slots.remove(slot)
            elif slot in self._released or slot.stream_released or self._exited:
                return  # freed already, or about to be; a stopped thread's pipeline goes whole
            self._released.append(slot)
            self.condition.notify()

    def _release(self, slots: list[StreamSlot], busy: StreamSlot | None) -> None:
        for slot in slots:
            if slot is busy:  # its last chunk is still in flight: freed after it, next time round
                with self.condition:
                    self._released.append(slot)
                continue
            if slot.stream_released:
                continue
            slot.stream_released = True
            try:
                slot.stream.release()
            except Exception:
                log.exception("session=%s: freeing its stream failed", slot.session_id)

    def close(self, timeout_s: float = 10.0, then: Callable[[], None] | None = None) -> None:
        """Stops after the chunk in flight; idempotent. `then` (closing the pipeline) runs once the thread has
        stopped, on the thread as it leaves: a chunk that outlasts `timeout_s` (a hung stage holds it up to its op
        timeout) must not have its pipeline closed beside it, and only this thread may talk to a pipeline's stages."""
        with self.condition:
            self._stopping = True
            self.condition.notify_all()
            if then is not None and not self._exited:
                self._then.append(then)
                then = None
        if then is not None:  # the thread had already stopped
            then()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning(
                    "the pipeline worker is still in a chunk after %g s; it frees the pipeline once out", timeout_s
                )

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _pick(self) -> StreamSlot | None:
        count = len(self._slots)
        for offset in range(count):
            slot = self._slots[(self._next + offset) % count]
            if slot.ready():
                self._next = (self._next + offset + 1) % count
                return slot
        return None

    def _run(self) -> None:
        name_os_thread(PIPELINE_WORKER)
        try:
            if getattr(self.device, "type", None) == "cuda":  # see manager.on_first_gpu: what names no device
                import torch

                torch.cuda.set_device(self.device)
            self._serve()
        except BaseException as exc:  # outside any one chunk (an asynchronous CUDA error surfaces at any query)
            log.exception("pipeline worker stopped; every stream on it is stopped")
            with self.condition:
                self.failure = f"the pipeline's worker thread stopped ({type(exc).__name__}: {exc}); load it again"
                slots, self._slots = self._slots, []
            for slot in slots:  # else each stream would freeze, unheard, with the status still `loaded`
                slot.closed = True
                slot._on_error(PipelineWorkerStopped(self.failure))
        finally:
            with self.condition:
                self._exited = True
                then, self._then = self._then, []
            for step in then:
                try:
                    step()
                except Exception:
                    log.exception("closing the pipeline after its worker stopped failed")

    def _serve(self) -> None:
        """Round robin over ready slots, one chunk ahead of the host where the device allows: a chunk whose frames
        are still being copied (CUDA) waits until the next ready chunk's device work is queued behind it, so the GPU
        is not idle while the host waits, emits and prepares. With nothing else ready it is finished at once, and a
        chunk that is already done (a CPU) is emitted at once: neither delays a frame."""
        waiting: StartedChunk | None = None
        while True:
            with self.condition:
                slot = self._pick()
                while slot is None and waiting is None and not self._released and not self._stopping:
                    self.condition.wait()
                    slot = self._pick()
                if self._stopping:  # every stream is freed before the pipeline closes (`close`'s `then`)
                    left, self._released, self._slots = [*self._released, *self._slots], [], []
                    break
                released, self._released = self._released, []
            started = slot.start_chunk() if slot is not None else None
            if waiting is not None:
                waiting.finish()  # after the next chunk's work is queued: its frames are the next to show
                waiting = None
            if started is not None and started.in_flight:
                waiting = started
            elif started is not None:
                started.finish()
            self._release(released, busy=waiting.slot if waiting is not None else None)
        if waiting is not None:
            waiting.finish()  # its device work done before its buffers go (a closed slot emits nothing)
        for slot in left:
            slot.closed = True
        self._release(left, busy=None)
