"""Output pacing: chunks spread over their timestamps, no waiting once behind, bounded buffer, no starvation."""

from __future__ import annotations

import asyncio
import itertools
import time
from fractions import Fraction

import numpy as np

from serve.pipelines.worker import FrameStamp
from serve.webrtc.tracks import OutputTrack

TB = Fraction(1, 90000)
INTERVAL = 3000  # 30 fps on the 90 kHz clock


def chunk(first: int, count: int, arrival: float | None) -> tuple[np.ndarray, list[FrameStamp]]:
    frames = np.zeros((count, 16, 16, 3), np.uint8)
    return frames, [FrameStamp((first + i) * INTERVAL, TB, arrival) for i in range(count)]


async def push(track: OutputTrack, first: int, count: int, arrival: float | None) -> None:
    await asyncio.to_thread(track.push_threadsafe, *chunk(first, count, arrival))
    await asyncio.sleep(0)  # let call_soon_threadsafe land


async def test_a_chunk_is_spread_over_the_time_its_timestamps_span() -> None:
    track = OutputTrack(capacity_frames=8)
    await push(track, 0, 4, arrival=None)
    started = time.monotonic()
    pts = [(await track.recv()).pts for _ in range(4)]
    elapsed = time.monotonic() - started
    assert pts == [0, 3000, 6000, 9000]
    assert 0.09 <= elapsed < 0.2  # three intervals of 33 ms between four frames


async def test_when_a_newer_video_chunk_waits_frames_play_at_once() -> None:
    track = OutputTrack(capacity_frames=8)
    await push(track, 0, 1, arrival=time.monotonic())
    await track.recv()
    await push(track, 1, 3, arrival=time.monotonic())
    await push(track, 4, 3, arrival=time.monotonic())  # the output is a whole chunk behind its input
    started = time.monotonic()
    for _ in range(3):
        await track.recv()
    assert time.monotonic() - started < 0.03


async def test_overflow_drops_the_oldest_frames() -> None:
    track = OutputTrack(capacity_frames=2)
    await push(track, 0, 5, arrival=time.monotonic())
    assert track.frames_dropped == 3
    assert (await track.recv()).pts == 3 * INTERVAL
    assert track.has_room(1)


async def test_a_burst_after_a_stall_does_not_starve_the_output() -> None:
    """After a stall, frames arrive faster than their timestamps advance. Paced against a clock anchored before the
    burst, each would wait while newer ones push it out of the buffer; the track must play them instead."""
    track = OutputTrack(capacity_frames=2)
    await push(track, 0, 1, arrival=time.monotonic())
    await track.recv()

    async def producer() -> None:
        for index in range(1, 31):
            await push(track, index, 1, arrival=time.monotonic())
            await asyncio.sleep(1 / 60)

    task = asyncio.create_task(producer())
    played_at = [time.monotonic()]
    while not task.done():
        try:
            await asyncio.wait_for(track.recv(), timeout=0.2)
        except TimeoutError:
            break
        played_at.append(time.monotonic())
    await task
    gaps = [b - a for a, b in itertools.pairwise(played_at)]
    # Twice as many frames as their timestamps allow: about half are dropped, but the output never stalls.
    assert len(played_at) >= 12 and max(gaps) < 0.1, (len(played_at), max(gaps))
