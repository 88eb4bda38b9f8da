"""Recording cost: what the frame path pays per frame (`Recorder.offer`) and how fast the encoder thread writes.

    .venv/bin/python -m benchmarks.recording [--seconds 5] [--height 512] [--width 512]

Two runs on synthetic frames (moving bars over mild noise, so the encoder has real work): `paced` offers 30 frames a
second, as a stream does, and times each offer; `flood` offers a frame every millisecond, so the queue is always full
and the written rate is the encoder's own throughput (what the recording keeps when the stream is faster than that).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from serve.recording import RecordingStore
from serve.settings import RecordingSettings

STREAM_FPS = 30
FLOOD_INTERVAL_S = 0.001


def synthetic_frames(count: int, height: int, width: int) -> list[av.VideoFrame]:
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        image = rng.integers(0, 24, (height, width, 3), np.uint8)
        x = (i * 7) % width
        image[:, x : x + width // 8] += 200
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = i * 3000, Fraction(1, 90000)
        frames.append(frame)
    return frames


def run(mode: str, seconds: float, frames: list[av.VideoFrame], folder: Path) -> dict[str, float]:
    store = RecordingStore(RecordingSettings(directory=folder))
    recorder = store.start(f"{len(mode):032x}")
    interval = 1 / STREAM_FPS if mode == "paced" else FLOOD_INTERVAL_S
    offer_us = []
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        frame = frames[i % len(frames)]
        frame.pts = i * 3000
        t0 = time.perf_counter_ns()
        recorder.offer(frame)
        offer_us.append((time.perf_counter_ns() - t0) / 1000)
        i += 1
        time.sleep(max(0.0, started + i * interval - time.perf_counter()))
    elapsed = time.perf_counter() - started
    store.stop(recorder.session_id)
    recorder.join(60)
    offer_us.sort()
    return {
        "offered": i,
        "written": recorder.frames,
        "dropped": recorder.frames_dropped,
        "written_fps": recorder.frames / elapsed,
        "offer_p50_us": statistics.median(offer_us),
        "offer_p99_us": offer_us[int(0.99 * (len(offer_us) - 1))],
        "mb_per_s": recorder.path.stat().st_size / 2**20 / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    frames = synthetic_frames(60, args.height, args.width)
    print(f"recording {args.width}x{args.height}, {args.seconds:g} s per run, libx264 {av.__version__=}")
    print("| run | offered | written | dropped | written fps | offer p50 (µs) | offer p99 (µs) | MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("paced", "flood"):
            r = run(mode, args.seconds, frames, Path(folder))
            print(
                f"| {mode} | {r['offered']} | {r['written']} | {r['dropped']} | {r['written_fps']:.1f} "
                f"| {r['offer_p50_us']:.1f} | {r['offer_p99_us']:.1f} | {r['mb_per_s']:.2f} |"
            )


if __name__ == "__main__":
    main()
