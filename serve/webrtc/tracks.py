"""The outgoing video track: frames from the pipeline worker, played out at the pace of their timestamps.

Two ways out: once `use_encoder` is called (VP8 or H.264 negotiated), `av.Packet`s from our own encoder
(serve/webrtc/encoders.py), which aiortc packetizes as they are; then a keyframe request (`request_keyframe`, the
sender's PLI/FIR) makes the next frame encoded a keyframe, and `bitrate_source` (the receiver's REMB estimate) steers
the encoder's bitrate. Otherwise (`--frame-path host`, another codec) `av.VideoFrame`s that aiortc encodes itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import Packet, VideoFrame

from serve.pipelines.worker import FrameStamp
from serve.threads import ENCODER, name_os_thread
from serve.webrtc.encoders import DeviceFrame, DownloadingFrame, PacketEncoder

log = logging.getLogger(__name__)

MAX_AHEAD_S = 1.0  # a frame due further ahead than this means the timeline jumped (new input, mode switch)
# Our encoders' own pool (as many threads as the loop's default executor would have): its threads carry a name the
# OS sees, so the encoder's CPU is told apart from aiortc's work in the default executor (serve/threads.py).
ENCODE_POOL = ThreadPoolExecutor(thread_name_prefix=ENCODER, initializer=name_os_thread, initargs=(ENCODER,))


class OutputTrack(MediaStreamTrack):
    """Bounded: at most `capacity_frames` wait for playout; when more arrive, the oldest are dropped and counted.

    In video mode the first frame of a chunk plays as soon as it is ready, and the rest of the chunk is spread over
    the time its timestamps span, each frame paced against the one played before it; once a newer chunk is already
    waiting, the output is behind its input and frames play at once, so lateness never builds up. In text mode every
    frame is paced against the one before it, which sets the playout rate. (An absolute clock anchor would not do:
    anchored on a late frame, every later frame looks early and waits while newer ones push it out of the buffer.)
    """

    kind = "video"

    def __init__(self, capacity_frames: int, on_drained: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._capacity = capacity_frames
        self._frames: deque[tuple[Any, FrameStamp, int]] = deque()  # (frame, stamp, batch number)
        self._batches = 0
        self._ready = asyncio.Event()
        self._on_drained = on_drained
        self._last: tuple[float, float, int] | None = None  # (monotonic s, media s, batch) of the last played frame
        # Frames pushed but not yet played, counted across threads so the worker never over-produces in text mode.
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.frames_out = 0
        self.frames_dropped = 0
        self.latencies_ms: deque[float] = deque(maxlen=240)
        self._last_frame: VideoFrame | DeviceFrame | DownloadingFrame | None = None  # the newest sent (snapshots)
        # Sees every frame sent, as the track holds it (a device frame is made a host one in the recorder's thread,
        # `as_video_frame`: its copy may wait for the GPU); must not block.
        self.tap: Callable[[VideoFrame | DeviceFrame | DownloadingFrame], None] | None = None
        self.encoder: PacketEncoder | None = None
        self.bitrate_source: Callable[[], int | None] | None = None
        self._keyframe_requested = False
        self.keyframes_requested = 0
        self.encode_errors = 0  # frames our encoder raised on (each dropped; the encoder reopened)
        # Where the encoder's last frames were converted from RGB: swscale on host arrays, or `device:<type>` where
        # the pipeline kept them on its device (the session's metrics say it).
        self.output_conversion: str | None = None

    def use_encoder(self, encoder: PacketEncoder, bitrate_source: Callable[[], int | None] | None = None) -> None:
        """Send packets from `encoder` from now on (call before the worker produces frames)."""
        self.encoder = encoder
        self.bitrate_source = bitrate_source

    def request_keyframe(self) -> None:
        """On the event loop (the sender's PLI/FIR): the next frame encoded is a keyframe (H.264: an IDR)."""
        self._keyframe_requested = True
        self.keyframes_requested += 1

    @property
    def last_frame(self) -> VideoFrame | DeviceFrame | DownloadingFrame | None:
        """The newest frame sent, as the track holds it: `as_video_frame` it off the event loop."""
        return self._last_frame

    def has_room(self, frames: int) -> bool:
        with self._in_flight_lock:
            return self._in_flight + frames <= self._capacity

    def push_threadsafe(self, frames: np.ndarray, stamps: list[FrameStamp]) -> None:
        """Called on the worker thread: the av frames (or the encoder's NV12 inputs) are built here, off the loop."""
        if self.encoder is not None:
            items = list(zip(self.encoder.prepare(frames, stamps), stamps, strict=True))
            self.output_conversion = "swscale" if isinstance(frames, np.ndarray) else f"device:{frames.device.type}"
        else:
            items = []
            for array, stamp in zip(frames, stamps, strict=True):
                frame = VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
                frame.pts = stamp.pts
                frame.time_base = stamp.time_base
                items.append((frame, stamp))
        with self._in_flight_lock:
            self._in_flight += len(items)
        self._loop.call_soon_threadsafe(self._append, items)

    def _append(self, items: list[tuple[VideoFrame, FrameStamp]]) -> None:
        self._batches += 1
        for frame, stamp in items:
            if len(self._frames) >= self._capacity:
                self._frames.popleft()
                self.frames_dropped += 1
                self._played(1)
            self._frames.append((frame, stamp, self._batches))
        self._ready.set()

    def _played(self, count: int) -> None:
        with self._in_flight_lock:
            self._in_flight -= count
        if self._on_drained is not None:
            self._on_drained()

    def _due(self, media_s: float, stamp: FrameStamp, batch: int, now: float) -> float:
        if self._last is None:
            return now
        last_wall, last_media, last_batch = self._last
        if stamp.arrival_s is not None and batch != last_batch:
            return now  # a new input chunk: show it as soon as it is ready
        due = last_wall + (media_s - last_media)
        newest_batch, newest_stamp = self._frames[-1][2], self._frames[-1][1]
        behind = newest_batch != batch and newest_stamp.arrival_s is not None
        if behind or due > now + MAX_AHEAD_S:
            return now
        return due

    async def recv(self) -> VideoFrame | Packet:
        while True:
            frame = await self._next_frame()
            if self.encoder is None:
                return frame
            packet = await self._encode(frame)
            if packet is not None:
                return packet

    async def _encode(self, frame: Any) -> Packet | None:
        encoder = self.encoder
        assert encoder is not None
        if self.bitrate_source is not None and (bitrate := self.bitrate_source()):
            encoder.target_bitrate = bitrate
        keyframe, self._keyframe_requested = self._keyframe_requested, False
        try:
            return await self._loop.run_in_executor(ENCODE_POOL, encoder.encode, frame, keyframe)
        except Exception:
            # aiortc's sender stops the stream's video for good on an exception from recv(): one frame the codec
            # refuses must not do that. It is dropped, and the encoder reopened, so the next frame is a keyframe the
            # receiver can start from again.
            self.encode_errors += 1
            if self.encode_errors == 1 or self.encode_errors % 100 == 0:
                log.exception("encoder=%s failed on a frame (%d so far); dropped, encoder reopened", encoder.name,
                              self.encode_errors)  # fmt: skip
            encoder.close()
            return None

    def stop(self) -> None:
        super().stop()
        self._ready.set()  # wake a waiting recv() so it sees the track ended
        if self.encoder is not None:  # on the encoders' pool: it waits for a frame being encoded (NVENC flushes)
            stopping = self._loop.run_in_executor(ENCODE_POOL, self.encoder.stop)
            stopping.add_done_callback(_log_failure)

    async def _next_frame(self) -> Any:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if not self._frames:
                self._ready.clear()
                await self._ready.wait()
                continue
            frame, stamp, batch = self._frames[0]
            media_s = float(frame.pts * frame.time_base)
            now = time.monotonic()
            due = self._due(media_s, stamp, batch, now)
            if due > now:
                await asyncio.sleep(due - now)
                if not self._frames or self._frames[0][0] is not frame:
                    continue  # dropped while we waited; take the next one
            self._frames.popleft()
            self._played(1)
            self._last = (max(due, now), media_s, batch)
            self.frames_out += 1
            if stamp.arrival_s is not None:
                self.latencies_ms.append((time.monotonic() - stamp.arrival_s) * 1000)
            self._last_frame = frame
            if (tap := self.tap) is not None:
                tap(frame)
            return frame


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.error("stopping an encoder failed: %s: %s", type(exc).__name__, exc)
