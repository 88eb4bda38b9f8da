"""Round trips through a real server: aiortc clients send 512×512 at 30 fps through `passthrough` and back.

    python -m benchmarks.serve_passthrough [--seconds 20] [--size 512] [--path old,vp8,new,gpu,gpu-vp8]
                                           [--streams 1,2,4] [--scene camera|smooth|counter] [--threads]
                                           [--x264-presets ultrafast,superfast]

`--path old`: the server's `--frame-path host` and VP8 (swscale to RGB in, aiortc's VP8 encoder out: the path before
issue 13). `--path vp8`: the default frame path with VP8 offered first, what a browser running the seed's JavaScript
unchanged gets: the output is encoded by our libvpx encoder and its packets go straight to aiortc's packetizer
(serve/webrtc/encoders.py). `--path new`: the default frame path and H.264 asked for by the client
(`setCodecPreferences`), the same packet path; on this CPU the encoder is libx264 and swscale still converts input
(the host is the device). `--path gpu` (a CUDA machine): the zero-copy path, passthrough loaded on GPU 0 (`"gpus":
"0"`) with `--nvdec`, so frames are decoded by NVDEC, converted by the colour kernel and encoded by NVENC without a
host copy of the picture; `--path gpu-vp8` (CUDA): the same placement with VP8, what the seed's page gets from a GPU
server: libvpx on the host, fed YUV converted on the device (only YUV is copied to the host; no swscale). Each row
says which encoder, input format and output conversion the sessions had. Each (path, streams) pair
gets a fresh server. `--streams` runs that many clients at once.

`--scene camera` (default) sends a camera-like picture: a grainy texture panning ~3 px a frame, with the frame index
in a thin strip of bars at the top; `smooth` is what a model's output looks like to a codec (soft drifting shapes, no
grain; tests/support/scenes.py), with the same strip; `counter` sends the old full-frame bars, which are nearly free
to encode. The clients send a pre-encoded loop (encoded once, in the codec negotiated), so their own encoder costs
the two shared cores nothing; they still decode what comes back.

Reports per row: output fps (the slowest stream), frames lost in the round trip (index gaps), round-trip latency
p50/p95 (send → receive of the same frame), the server process's CPU in % of one core, total and per stream, and
the round trip's quality: PSNR (RGB, whole frame) of every 15th frame received against the scene the client drew
(so it counts the client's own encode too, the same for every row of a scene). An aiortc receiver holds each frame
about one frame interval in its jitter buffer (reference/browser-e2e.md).

`--threads`: the server's CPU per thread group over the same window, from /proc/<pid>/task/*/stat, grouped by the
names the server gives its threads (serve/threads.py; FFmpeg's helper threads inherit the name of the thread that
opened the codec), printed as one more table in % of a core per stream, with the group's thread count.

`--x264-presets`: the new path once per libx264 preset (the server's `--x264-preset`), plus the encoder alone on the
same scene (serve/webrtc/encoders.py `X264Encoder` at 1.5 Mb/s, one thread): CPU ms a frame of its RGB → NV12
conversion and of the encode, kb/s, and PSNR of the decoded output against the scene, so cost and quality are side
by side.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import fractions
import itertools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import psutil
from aiortc.mediastreams import MediaStreamTrack
from rich.console import Console
from rich.table import Table

from serve.pipelines.worker import FrameStamp
from serve.threads import DECODER, ENCODER, PIPELINE_WORKER
from serve.webrtc.encoders import X264Encoder
from tests.support.frames import draw_counter, read_counter
from tests.support.rtc_client import ScopeClient
from tests.support.scenes import smooth_scene, textured_scene
from tests.support.server import load_pipeline, run_server

FPS = 30
LOOP_FRAMES = 90  # the clip the clients loop (3 s): its frame index is the round trip's tag
STRIP = 1 / 16  # height of the index strip, as a fraction of the frame
CODECS = {  # path → (the codec the clients offer alone, the encoder of their own pre-encoded loop)
    "old": ("video/VP8", "libvpx"), "vp8": ("video/VP8", "libvpx"), "new": ("video/H264", "libx264"),
    "gpu": ("video/H264", "libx264"), "gpu-vp8": ("video/VP8", "libvpx"),
}  # fmt: skip
BITRATE_BPS = 1_500_000  # the clients' loop, the server's start bitrate, and the encoder-only preset figures
PSNR_EVERY = 15  # frames received per quality sample (a sample costs the shared cores a few ms)
THREAD_GROUPS = {  # OS thread name → what it does (serve/threads.py)
    PIPELINE_WORKER: "pipeline worker (swscale in, out)",
    ENCODER: "our encoder (libvpx, libx264, NVENC)",
    DECODER: "input decoder",
}
MAIN = "event loop (aiortc RTP, our tracks)"
UNNAMED = "unnamed (aiortc's own encoders, …)"


def tagged_frame(scene: str, index: int, size: int) -> np.ndarray:
    """A camera or smooth frame with its index in the strip at the top."""
    frame = (textured_scene if scene == "camera" else smooth_scene)(index, size, size)
    strip = max(int(size * STRIP), 8)
    frame[:strip] = draw_counter(index, strip, size)
    return frame


def read_strip(rgb: np.ndarray) -> int:
    strip = max(int(rgb.shape[0] * STRIP), 8)
    return read_counter(rgb[:strip])


def draw(scene: str, index: int, size: int) -> np.ndarray:
    return draw_counter(index, size, size) if scene == "counter" else tagged_frame(scene, index, size)


def psnr_db(squared_error: float, samples: int) -> float:
    """PSNR of the mean squared error over `samples` values of 8-bit data."""
    return 10 * np.log10(255**2 / (squared_error / samples)) if squared_error else float("inf")


def encode_loop(codec: str, scene: str, size: int) -> list[bytes]:
    """The clip, encoded once: frame 0 a keyframe (headers included), the rest predicted; realistic bitrate."""
    encoder = av.CodecContext.create(codec, "w")
    encoder.width = encoder.height = size
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = fractions.Fraction(1, FPS)
    encoder.bit_rate = BITRATE_BPS
    if codec == "libx264":
        encoder.options = {"preset": "veryfast", "tune": "zerolatency", "x264-params": "scenecut=0:repeat-headers=1"}
        encoder.profile = "Baseline"
    else:
        encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    packets = []
    for index in range(LOOP_FRAMES):
        frame = av.VideoFrame.from_ndarray(draw(scene, index, size), format="rgb24").reformat(format="yuv420p")
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


class QualityReader:
    """The client's `read_index`: the frame's loop index, and every PSNR_EVERY-th frame while `measuring` its
    squared error against the frame the client drew for that index."""

    def __init__(self, scene: str, size: int) -> None:
        self.scene, self.size = scene, size
        self.read = read_counter if scene == "counter" else read_strip
        self.measuring = False
        self.frames = self.samples = 0
        self.squared_error = 0.0

    def __call__(self, rgb: np.ndarray) -> int:
        index = self.read(rgb)
        self.frames += 1
        if self.measuring and self.frames % PSNR_EVERY == 0 and rgb.shape[:2] == (self.size, self.size):
            reference = draw(self.scene, index % LOOP_FRAMES, self.size)
            self.squared_error += float(np.square(rgb.astype(np.float32) - reference).sum())
            self.samples += rgb.size
        return index


def thread_times(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of `pid`: tid → (OS name, CPU seconds, user + system) from /proc/<pid>/task/<tid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended between the listing and the read
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)  # utime, stime: fields 14, 15
    return out


def thread_groups(pid: int, start: dict[int, tuple[str, float]], end: dict[int, tuple[str, float]], wall_s: float,
                  total_pct: float) -> dict[str, tuple[float, int]]:  # fmt: skip
    """% of a core and thread count per group over the window; a thread that started in it counts from zero, and
    what threads that ended in it used is the process total's remainder ("ended threads")."""
    main_name = end[pid][0]
    groups: dict[str, tuple[float, int]] = {}
    for tid, (name, cpu_s) in end.items():
        label = MAIN if tid == pid else UNNAMED if name == main_name else THREAD_GROUPS.get(name, name)
        used = cpu_s - (start[tid][1] if tid in start and start[tid][0] == name else 0.0)
        pct, count = groups.get(label, (0.0, 0))
        groups[label] = (pct + 100 * used / wall_s, count + 1)
    ended = total_pct - sum(pct for pct, _ in groups.values())
    if ended > 0.5:
        groups["ended threads (and rounding)"] = (ended, 0)
    return groups


@dataclass
class StreamResult:
    fps_out: float
    lost: int
    latencies_ms: list[float]


async def run_streams(url: str, args: argparse.Namespace, path: str, streams: int, pid: int) -> dict[str, Any]:
    codec, encoder = CODECS[path]
    loop = encode_loop(encoder, args.scene, args.size)
    clients = []
    quality = QualityReader(args.scene, args.size)
    for _ in range(streams):
        track = LoopTrack(loop)
        client = ScopeClient(url, initial_parameters={"input_mode": "video"}, input_track=track, codec=codec)
        client.read_index = quality
        await client.connect()
        clients.append((client, track))
    await asyncio.gather(*(client.wait_frames(30, timeout_s=30) for client, _ in clients))  # warm-up
    deadline = time.monotonic() + 5  # and each client's first RTCP sender report (about one a second)
    while any([await sent_counters(client) is None for client, _ in clients]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    process = psutil.Process(pid)
    threads_start = thread_times(pid) if args.threads else {}
    sent_start = [await sent_counters(client) for client, _ in clients]
    cpu_start, wall_start = process.cpu_times(), time.monotonic()
    starts = [len(client.frames) for client, _ in clients]
    quality.measuring = True
    await asyncio.sleep(args.seconds)
    cpu_end, wall_end = process.cpu_times(), time.monotonic()
    threads_end = thread_times(pid) if args.threads else {}
    quality.measuring = False
    sent_end = [await sent_counters(client) for client, _ in clients]
    videos = [await session_video(url, client.session_id) for client, _ in clients]
    bitrates = [video.get("bitrate_bps") for video in videos]
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
    known = [b for b in bitrates if b is not None]
    spans = [(e[0] - s[0], e[1] - s[1], e[2] - s[2]) for s, e in zip(sent_start, sent_end, strict=True) if s and e]
    return {
        "fps_out_min": min(r.fps_out for r in results),
        "lost": sum(r.lost for r in results),
        "latency_p50_ms": statistics.median(latencies),
        "latency_p95_ms": statistics.quantiles(latencies, n=20)[-1],
        "cpu_pct": cpu_pct,
        "cpu_pct_per_stream": cpu_pct / streams,
        "psnr_db": psnr_db(quality.squared_error, quality.samples) if quality.samples else float("nan"),
        "bitrate_kbps": statistics.mean(known) / 1000 if known else None,
        "sent_kbps": statistics.mean(8 * b / t / 1000 for t, b, _ in spans if t > 0) if spans else float("nan"),
        "packets_per_frame": sum(p for _, _, p in spans) / sum(t for t, _, _ in spans) / FPS if spans else float("nan"),
        "encoder": ",".join(sorted({str(video.get("encoder")) for video in videos})),
        "input_format": ",".join(sorted({str(video.get("input_format")) for video in videos})),
        "output_conversion": ",".join(sorted({str(video.get("output_conversion")) for video in videos})),
        "threads": thread_groups(pid, threads_start, threads_end, wall_end - wall_start, cpu_pct)
        if args.threads
        else {},
    }


async def sent_counters(client: ScopeClient) -> tuple[float, int, int] | None:
    """(time s, bytes, packets) the server had sent on the client's video stream at its latest RTCP sender report."""
    for stats in (await client.pc.getStats()).values():
        if stats.type == "remote-outbound-rtp" and stats.kind == "video":
            return stats.remoteTimestamp.timestamp(), stats.bytesSent, stats.packetsSent
    return None


async def session_video(url: str, session_id: str | None) -> dict[str, Any]:
    """The session's video metrics at the end: who encoded (and the target bitrate the receiver's estimate steered;
    None for aiortc's encoders) and the decoded input's format (`cuda`: NVDEC)."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        metrics = (await http.get(f"/api/v1/sessions/{session_id}/metrics")).json()
    return metrics.get("video", {})


def encoder_alone(preset: str, scene: str, size: int) -> dict[str, float]:
    """The packet path's encoder on the clip as the server gets it (NV12 by swscale), decoded again: CPU ms a frame
    of the RGB → NV12 conversion and of the encode calls (process time, one thread), kb/s, and PSNR (RGB) against the
    scene."""
    encoder = X264Encoder(BITRATE_BPS, preset)
    images = np.stack([draw(scene, i, size) for i in range(LOOP_FRAMES)])
    stamps = [FrameStamp(i, fractions.Fraction(1, FPS), None) for i in range(LOOP_FRAMES)]
    started = time.process_time()
    frames = encoder.prepare(images, stamps)
    convert_s = time.process_time() - started
    decoder = av.CodecContext.create("h264", "r")
    cpu_s, size_bytes, squared_error, samples = 0.0, 0, 0.0, 0
    for index, frame in enumerate(frames):
        started = time.process_time()
        packet = encoder.encode(frame, keyframe=index == 0)
        cpu_s += time.process_time() - started
        assert packet is not None, "zerolatency: one packet per frame"
        size_bytes += packet.size
        for decoded in decoder.decode(packet):
            rgb = decoded.to_ndarray(format="rgb24").astype(np.float32)
            squared_error += float(np.square(rgb - images[index]).sum())
            samples += rgb.size
    encoder.close()
    return {
        "convert_ms_per_frame": 1000 * convert_s / LOOP_FRAMES,
        "ms_per_frame": 1000 * cpu_s / LOOP_FRAMES,
        "kbps": size_bytes * 8 * FPS / LOOP_FRAMES / 1000,
        "psnr_db": psnr_db(squared_error, samples),
    }


def measure(args: argparse.Namespace, path: str, streams: int, preset: str | None) -> dict[str, Any]:
    """One fresh server, `streams` clients. `gpu`: the zero-copy path, passthrough on CUDA device 0 with NVDEC in and
    NVENC out (the row's `encoder` and `input_format` say whether they ran); `gpu-vp8`: on the same device, VP8 out
    by libvpx from YUV converted there (`output_conversion`)."""
    extra = {"old": ["--frame-path", "host"], "vp8": [], "new": [], "gpu": ["--nvdec"], "gpu-vp8": []}[path]
    if preset is not None:
        extra += ["--x264-preset", preset]
    placement = {"gpus": "0"} if path.startswith("gpu") else {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_server(Path(tmp), "--log-level", "warning", "--max-sessions", "16", *extra) as server,
    ):
        status = load_pipeline(server.url, "passthrough", height=args.size, width=args.size, **placement)
        if status["status"] != "loaded":
            raise RuntimeError(f"passthrough did not load: {status.get('error')}")
        return asyncio.run(run_streams(server.url, args, path, streams, server.process.pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--path",
        default="old,vp8,new",
        help="comma-separated: old, vp8, new, gpu (CUDA: NVDEC → NVENC), gpu-vp8 (CUDA: device YUV → libvpx)",
    )
    parser.add_argument("--streams", default="1", help="comma-separated stream counts, e.g. 1,2,4,6")
    parser.add_argument("--scene", choices=["camera", "smooth", "counter"], default="camera")
    parser.add_argument("--threads", action="store_true", help="the server's CPU per thread group, as a table")
    parser.add_argument(
        "--x264-presets", default="", help="comma-separated libx264 presets: the new path once per preset"
    )
    args = parser.parse_args()
    presets = [p for p in args.x264_presets.split(",") if p] or [None]
    console = Console(width=max(Console().width, 160))  # wide tables stay one line a row in a log
    if presets != [None]:
        kbps = BITRATE_BPS // 1000
        encoders = Table(title=f"libx264 alone, {args.size}×{args.size}, {args.scene} scene, {kbps} kb/s")
        for column in ("preset", "RGB → NV12 ms / frame", "encode ms / frame", "kb/s", "PSNR (dB)"):
            encoders.add_column(column, justify="right")
        for preset in presets:
            r = encoder_alone(preset, args.scene, args.size)
            encoders.add_row(
                preset, f"{r['convert_ms_per_frame']:.2f}", f"{r['ms_per_frame']:.2f}", f"{r['kbps']:.0f}",
                f"{r['psnr_db']:.2f}",
            )  # fmt: skip
        console.print(encoders)
    runs = [(path, None) for path in args.path.split(",") if path in ("old", "vp8")]
    runs += [("new", preset) for preset in presets if "new" in args.path.split(",")]
    runs += [(path, None) for path in ("gpu", "gpu-vp8") if path in args.path.split(",")]
    rows = []
    for streams in (int(s) for s in args.streams.split(",")):
        for path, preset in runs:
            rows.append((label(path, preset), streams, measure(args, path, streams, preset)))
            console.print(f"{rows[-1][0]} × {streams}: { {k: v for k, v in rows[-1][2].items() if k != 'threads'} }")

    table = Table(
        title=f"passthrough round trip, {args.size}×{args.size} @ {FPS} fps, {args.scene} scene, {args.seconds:.0f} s"
    )
    for column in ("path", "streams", "fps out (min)", "lost", "RTT p50 (ms)", "RTT p95 (ms)",
                   "server CPU (% core)", "per stream (% core)", "PSNR (dB)", "sent (kb/s)", "RTP packets / frame",
                   "encoder target (kb/s)"):  # fmt: skip
        table.add_column(column, justify="right")
    for name, streams, r in rows:
        table.add_row(
            name, str(streams), f"{r['fps_out_min']:.2f}", str(r["lost"]), f"{r['latency_p50_ms']:.1f}",
            f"{r['latency_p95_ms']:.1f}", f"{r['cpu_pct']:.1f}", f"{r['cpu_pct_per_stream']:.1f}",
            f"{r['psnr_db']:.2f}", f"{r['sent_kbps']:.0f}", f"{r['packets_per_frame']:.1f}",
            "aiortc's" if r["bitrate_kbps"] is None else f"{r['bitrate_kbps']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"(an aiortc receiver alone holds about {1000 / FPS:.0f} ms of each round trip)")
    if args.threads:
        console.print(threads_table(rows))


def label(path: str, preset: str | None) -> str:
    return f"{path} ({CODECS[path][0][6:]}{'' if preset is None else ', ' + preset})"


def threads_table(rows: list[tuple[str, int, dict[str, Any]]]) -> Table:
    """Groups down, runs across: % of a core per stream (the group's thread count in brackets)."""
    table = Table(title="server CPU per thread group, % of a core per stream (threads in the group)")
    table.add_column("thread group")
    for name, streams, _ in rows:
        table.add_column(f"{name} × {streams}", justify="right")
    groups = list(dict.fromkeys(group for _, _, r in rows for group in r["threads"]))
    for group in groups:
        cells = []
        for _, streams, r in rows:
            pct, count = r["threads"].get(group, (0.0, 0))
            cells.append(f"{pct / streams:.1f} ({count})" if group in r["threads"] else "–")
        table.add_row(group, *cells)
    table.add_row("process total", *(f"{r['cpu_pct_per_stream']:.1f}" for _, _, r in rows))
    return table


if __name__ == "__main__":
    main()
