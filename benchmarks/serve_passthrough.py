"""Round trips through a real server: aiortc clients send 512×512 at 30 fps through `passthrough` and back.

    python -m benchmarks.serve_passthrough [--seconds 20] [--size 512] [--path old,new] [--streams 1,2,4]
                                           [--scene camera|counter]

`--path old`: the server's `--frame-path host` and VP8 (swscale to RGB in, aiortc's VP8 encoder out: the path before
issue 13). `--path new`: the default frame path and H.264 asked for by the client (`setCodecPreferences`): the output
is encoded by our encoder and its packets go straight to aiortc's packetizer (serve/webrtc/encoders.py); on this CPU
the encoder is libx264 and swscale still converts input (the host is the device). Each (path, streams) pair gets a
fresh server. `--streams` runs that many clients at once.

`--scene camera` (default) sends a camera-like picture: a grainy texture panning ~3 px a frame, with the frame index
in a thin strip of bars at the top; `counter` sends the old full-frame bars, which are nearly free to encode. The
clients send a pre-encoded loop (encoded once, in the codec negotiated), so their own encoder costs the two shared
cores nothing; they still decode what comes back.

Reports per row: output fps (the slowest stream), frames lost in the round trip (index gaps), round-trip latency
p50/p95 (send → receive of the same frame), and the server process's CPU in % of one core, total and per stream.
An aiortc receiver holds each frame about one frame interval in its jitter buffer (reference/browser-e2e.md).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import fractions
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import psutil
from aiortc.mediastreams import MediaStreamTrack
from rich.console import Console
from rich.table import Table

from tests.support.frames import draw_counter, read_counter
from tests.support.rtc_client import ScopeClient
from tests.support.scenes import textured_scene
from tests.support.server import load_pipeline, run_server

FPS = 30
LOOP_FRAMES = 90  # the clip the clients loop (3 s): its frame index is the round trip's tag
STRIP = 1 / 16  # height of the index strip, as a fraction of the frame
CODECS = {"old": ("video/VP8", "libvpx"), "new": ("video/H264", "libx264")}


def camera_frame(index: int, size: int) -> np.ndarray:
    frame = textured_scene(index, size, size)
    strip = max(int(size * STRIP), 8)
    frame[:strip] = draw_counter(index, strip, size)
    return frame


def read_strip(rgb: np.ndarray) -> int:
    strip = max(int(rgb.shape[0] * STRIP), 8)
    return read_counter(rgb[:strip])


def encode_loop(codec: str, scene: str, size: int) -> list[bytes]:
    """The clip, encoded once: frame 0 a keyframe (headers included), the rest predicted; realistic bitrate."""
    encoder = av.CodecContext.create(codec, "w")
    encoder.width = encoder.height = size
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = fractions.Fraction(1, FPS)
    encoder.bit_rate = 1_500_000
    if codec == "libx264":
        encoder.options = {"preset": "veryfast", "tune": "zerolatency", "x264-params": "scenecut=0:repeat-headers=1"}
        encoder.profile = "Baseline"
    else:
        encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    draw = camera_frame if scene == "camera" else lambda i, s: draw_counter(i, s, s)
    packets = []
    for index in range(LOOP_FRAMES):
        frame = av.VideoFrame.from_ndarray(draw(index, size), format="rgb24").reformat(format="yuv420p")
        frame.pts = index
        frame.pict_type = av.video.frame.PictureType.I if index == 0 else av.video.frame.PictureType.NONE
        packets.append(b"".join(bytes(p) for p in encoder.encode(frame)))
    assert all(packets), "one packet per frame (no encoder delay)"
    return packets


class LoopTrack(MediaStreamTrack):
    """Sends the pre-encoded clip at 30 fps as av.Packets (aiortc packetizes them as they are)."""

    kind = "video"

    def __init__(self, packets: list[bytes]) -> None:
        super().__init__()
        self.packets = packets
        self.sent = 0
        self.sent_at: dict[int, list[float]] = {}  # loop index → when it left, each time
        self._start: float | None = None

    async def recv(self) -> av.Packet:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent / FPS
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        index = self.sent % LOOP_FRAMES
        packet = av.Packet(self.packets[index])
        packet.pts, packet.time_base = self.sent, fractions.Fraction(1, FPS)
        self.sent_at.setdefault(index, []).append(time.monotonic())
        self.sent += 1
        return packet


def last_sent(track: LoopTrack, index: int, received_at: float) -> float | None:
    """When this loop index last left before `received_at` (the loop repeats every 3 s; a round trip is far less)."""
    times = track.sent_at.get(index, [])
    position = bisect.bisect_right(times, received_at)
    return times[position - 1] if position else None


@dataclass
class StreamResult:
    fps_out: float
    lost: int
    latencies_ms: list[float]


async def run_streams(url: str, args: argparse.Namespace, path: str, streams: int, pid: int) -> dict[str, float]:
    codec, encoder = CODECS[path]
    loop = encode_loop(encoder, args.scene, args.size)
    reader = read_strip if args.scene == "camera" else read_counter
    clients = []
    for _ in range(streams):
        track = LoopTrack(loop)
        client = ScopeClient(url, initial_parameters={"input_mode": "video"}, input_track=track, codec=codec)
        client.read_index = reader
        await client.connect()
        clients.append((client, track))
    await asyncio.gather(*(client.wait_frames(30, timeout_s=30) for client, _ in clients))  # warm-up
    process = psutil.Process(pid)
    cpu_start, wall_start = process.cpu_times(), time.monotonic()
    starts = [len(client.frames) for client, _ in clients]
    await asyncio.sleep(args.seconds)
    cpu_end, wall_end = process.cpu_times(), time.monotonic()
    results = []
    for (client, track), start in zip(clients, starts, strict=True):
        received = client.frames[start:]
        indices = [f.counter for f in received]
        steps = [(b - a) % LOOP_FRAMES for a, b in itertools.pairwise(indices)]
        lost = sum(step - 1 for step in steps if step > 1)
        latencies = [(f.at - sent) * 1000 for f in received if (sent := last_sent(track, f.counter, f.at)) is not None]
        results.append(StreamResult(len(received) / (wall_end - wall_start), lost, latencies))
    for client, _ in clients:
        await client.close()
    latencies = sorted(ms for r in results for ms in r.latencies_ms)
    cpu_s = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    cpu_pct = 100 * cpu_s / (wall_end - wall_start)
    return {
        "fps_out_min": min(r.fps_out for r in results),
        "lost": sum(r.lost for r in results),
        "latency_p50_ms": statistics.median(latencies),
        "latency_p95_ms": statistics.quantiles(latencies, n=20)[-1],
        "cpu_pct": cpu_pct,
        "cpu_pct_per_stream": cpu_pct / streams,
    }


def measure(args: argparse.Namespace, path: str, streams: int) -> dict[str, float]:
    extra = ["--frame-path", "host"] if path == "old" else []
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_server(Path(tmp), "--log-level", "warning", "--max-sessions", "16", *extra) as server,
    ):
        load_pipeline(server.url, "passthrough", height=args.size, width=args.size)
        return asyncio.run(run_streams(server.url, args, path, streams, server.process.pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--path", default="old,new", help="comma-separated: old, new")
    parser.add_argument("--streams", default="1", help="comma-separated stream counts, e.g. 1,2,4,6")
    parser.add_argument("--scene", choices=["camera", "counter"], default="camera")
    args = parser.parse_args()
    rows = []
    for streams in (int(s) for s in args.streams.split(",")):
        for path in args.path.split(","):
            rows.append((path, streams, measure(args, path, streams)))
            Console().print(f"{path} × {streams}: {rows[-1][2]}")

    table = Table(
        title=f"passthrough round trip, {args.size}×{args.size} @ {FPS} fps, {args.scene} scene, {args.seconds:.0f} s"
    )
    for column in ("path", "streams", "fps out (min)", "lost", "RTT p50 (ms)", "RTT p95 (ms)",
                   "server CPU (% core)", "per stream (% core)"):  # fmt: skip
        table.add_column(column, justify="right")
    for path, streams, r in rows:
        table.add_row(
            f"{path} ({CODECS[path][0][6:]})", str(streams), f"{r['fps_out_min']:.2f}", str(r["lost"]),
            f"{r['latency_p50_ms']:.1f}", f"{r['latency_p95_ms']:.1f}", f"{r['cpu_pct']:.1f}",
            f"{r['cpu_pct_per_stream']:.1f}",
        )  # fmt: skip
    Console().print(table)
    Console().print(f"(an aiortc receiver alone holds about {1000 / FPS:.0f} ms of each round trip)")


if __name__ == "__main__":
    main()
