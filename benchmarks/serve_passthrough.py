"""Round trip through a real server: an aiortc client sends 512×512 at 30 fps through `passthrough` and back.

    python -m benchmarks.serve_passthrough [--seconds 30] [--size 512]

Reports output fps, round-trip latency p50/p95 (send → receive of the same frame, read from the frame's pixels),
frames dropped, and the server process's CPU use. An aiortc receiver holds each frame about one frame interval in
its jitter buffer (reference/browser-e2e.md); the table says how much of the round trip that is.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from tests.support.rtc_client import ScopeClient
from tests.support.server import load_pipeline, run_server

FPS = 30


async def measure(url: str, seconds: float, size: int, server_pid: int) -> dict[str, float]:
    client = ScopeClient(url, initial_parameters={"input_mode": "video"})
    await client.connect()
    client.track.height = client.track.width = size
    sent_at: dict[int, float] = {}
    original_recv = client.track.recv

    async def timed_recv():  # stamp each frame as the sender takes it
        frame = await original_recv()
        sent_at[client.track.sent - 1] = time.monotonic()
        return frame

    client.track.recv = timed_recv
    await client.wait_frames(10)  # warm-up: connection, first keyframe
    process = psutil.Process(server_pid)
    cpu_start, wall_start = process.cpu_times(), time.monotonic()
    sent_start, received_start = client.track.sent, len(client.frames)
    await asyncio.sleep(seconds)
    cpu_end, wall_end = process.cpu_times(), time.monotonic()
    sent, received = client.track.sent - sent_start, client.frames[received_start:]
    await client.close()

    latencies = [(f.at - sent_at[f.counter]) * 1000 for f in received if f.counter in sent_at]
    counters = [f.counter for f in received]
    elapsed = wall_end - wall_start
    cpu_s = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    return {
        "fps_in": sent / elapsed,
        "fps_out": len(received) / elapsed,
        "latency_p50_ms": statistics.median(latencies),
        "latency_p95_ms": statistics.quantiles(latencies, n=20)[-1],
        "dropped": (counters[-1] - counters[0] + 1) - len(counters) if counters else sent,
        "server_cpu_pct_of_core": 100 * cpu_s / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp), "--log-level", "warning") as server:
        load_pipeline(server.url, "passthrough", height=args.size, width=args.size)
        result = asyncio.run(measure(server.url, args.seconds, args.size, server.process.pid))

    table = Table(title=f"passthrough round trip, {args.size}×{args.size} @ {FPS} fps, {args.seconds:.0f} s")
    for column in ("fps in", "fps out", "RTT p50 (ms)", "RTT p95 (ms)", "dropped", "server CPU (% of a core)"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{result['fps_in']:.2f}",
        f"{result['fps_out']:.2f}",
        f"{result['latency_p50_ms']:.1f}",
        f"{result['latency_p95_ms']:.1f}",
        str(result["dropped"]),
        f"{result['server_cpu_pct_of_core']:.1f}",
    )
    Console().print(table)
    Console().print(f"(an aiortc receiver alone holds about {1000 / FPS:.0f} ms of each round trip)")


if __name__ == "__main__":
    main()
