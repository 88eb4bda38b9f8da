"""The frame path's codecs alone, per frame, on a camera-like clip: NVENC and NVDEC beside libx264 and libavcodec.

    python -m benchmarks.codecs [--frames 150] [--sizes 512x512,480x832]

Each row times one frame's whole step as the server runs it, on one thread:
  encode  nvenc:    uint8 RGB on the GPU → the colour kernel's NV12 there → NVENC → H.264 bytes on the host
          libx264:  uint8 RGB on the host → swscale's NV12 → libx264 (`ultrafast`, the server's default)
  decode  nvdec:    H.264 bytes → NVDEC (PyAV's CUDA hwaccel) → the planes by DLPack → the colour kernel's [-1, 1]
                    RGB on the GPU (no host copy of the picture)
          libavcodec: H.264 bytes → one-thread software decode → the planes' one copy to the device (where there is
                    one) → the colour kernel
Both decoders read the same bitstream (NVENC's where it ran, else libx264's), at the server's 1.5 Mb/s start rate.
The first frames (codec open, kernel compile) are left out of the figures: `--warmup`. Where NVENC or NVDEC cannot
run (every CPU machine) its row says why. gpu-check's `frame_path` part runs this on the GPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from fractions import Fraction

import av
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from serve.pipelines.frames import YuvChunk, upload_yuv
from serve.pipelines.worker import FrameStamp
from serve.webrtc.encoders import PacketEncoder, X264Encoder
from serve.webrtc.planes import read_planes
from tests.support.scenes import textured_scene

BITRATE_BPS = 1_500_000
FPS = 30
TIME_BASE = Fraction(1, 90_000)


@dataclass
class CodecRow:
    step: str  # encode | decode
    codec: str
    size: str  # H×W
    frames: int = 0
    ms_mean: float | None = None
    ms_p95: float | None = None
    kbps: float | None = None
    error: str | None = None


def _summary(row: CodecRow, samples_ms: list[float], warmup: int) -> CodecRow:
    timed = samples_ms[warmup:]
    row.frames = len(timed)
    row.ms_mean = statistics.fmean(timed)
    row.ms_p95 = statistics.quantiles(timed, n=20)[-1] if len(timed) >= 2 else timed[0]
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encode(encoder: PacketEncoder, images: np.ndarray | torch.Tensor, row: CodecRow, warmup: int) -> list[bytes]:
    """Each frame prepared and encoded alone, as the output track does; the first one as an IDR."""
    stamps = [FrameStamp(i * 90_000 // FPS, TIME_BASE, None) for i in range(len(images))]
    samples, bitstream = [], []
    for index in range(len(images)):
        started = time.perf_counter()
        (frame,) = encoder.prepare(images[index : index + 1], stamps[index : index + 1])
        packet = encoder.encode(frame, keyframe=index == 0)
        samples.append((time.perf_counter() - started) * 1e3)
        bitstream.append(bytes(packet) if packet is not None else b"")
    encoder.close()
    _summary(row, samples, warmup)
    row.kbps = sum(map(len, bitstream[warmup:])) * 8 * FPS / max(1, len(bitstream) - warmup) / 1000
    return bitstream


def time_decode(codec: av.CodecContext, bitstream: list[bytes], device: torch.device, height: int, width: int,
                row: CodecRow, warmup: int) -> None:  # fmt: skip
    """Each access unit decoded and its picture converted to the model's [-1, 1] RGB on `device`."""
    samples = []
    for data in bitstream:
        if not data:
            continue
        started = time.perf_counter()
        for frame in codec.decode(av.Packet(data)):
            upload_yuv(YuvChunk((read_planes(frame),)), device, height, width)
        _sync(device)
        samples.append((time.perf_counter() - started) * 1e3)
    _summary(row, samples, warmup)


def bench(sizes: list[tuple[int, int]], frames: int, warmup: int, device: torch.device) -> list[CodecRow]:
    rows = []
    for height, width in sizes:
        size = f"{height}×{width}"
        clip = np.stack([textured_scene(i, height, width) for i in range(frames)])
        x264 = CodecRow("encode", "libx264", size)
        bitstream = time_encode(X264Encoder(BITRATE_BPS, "ultrafast"), clip, x264, warmup)
        nvenc = CodecRow("encode", "nvenc", size)
        try:
            if device.type != "cuda":
                raise RuntimeError("needs a CUDA GPU")
            from serve.webrtc.encoders import NvencEncoder, nvenc_unavailable

            if (reason := nvenc_unavailable(device)) is not None:  # H100, H200, A100: no NVENC
                raise RuntimeError(reason)
            on_device = torch.from_numpy(clip).to(device)
            bitstream = time_encode(NvencEncoder(BITRATE_BPS, device), on_device, nvenc, warmup)
        except Exception as exc:  # no GPU, no PyNvVideoCodec, no libnvidia-encode: the row says which
            nvenc.error = f"{type(exc).__name__}: {exc}"
        nvdec = CodecRow("decode", "nvdec", size)
        try:
            if device.type != "cuda":
                raise RuntimeError("needs a CUDA GPU")
            from serve.webrtc.nvdec import NvdecH264Decoder

            time_decode(NvdecH264Decoder().codec, bitstream, device, height, width, nvdec, warmup)
        except Exception as exc:
            nvdec.error = f"{type(exc).__name__}: {exc}"
        software = CodecRow("decode", "libavcodec (1 thread)", size)
        codec = av.CodecContext.create("h264", "r")
        codec.thread_count = 1  # as serve/webrtc/decoders.py opens it
        time_decode(codec, bitstream, device, height, width, software, warmup)
        rows += [x264, nvenc, nvdec, software]
    return rows


def table(rows: list[CodecRow], device: torch.device) -> Table:
    out = Table(title=f"codecs alone, camera-like clip, {BITRATE_BPS // 1000} kb/s target, device {device}")
    for column in ("step", "codec", "H×W", "frames", "ms / frame", "p95 ms", "kb/s", "error"):
        out.add_column(column, justify="right" if column not in ("codec", "error") else "left")
    for r in rows:
        out.add_row(r.step, r.codec, r.size, str(r.frames), "-" if r.ms_mean is None else f"{r.ms_mean:.2f}",
                    "-" if r.ms_p95 is None else f"{r.ms_p95:.2f}", "-" if r.kbps is None else f"{r.kbps:.0f}",
                    r.error or "")  # fmt: skip
    return out


def rows_as_dicts(rows: list[CodecRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sizes", default="512x512,480x832", help="comma-separated HxW")
    args = parser.parse_args()
    sizes = [tuple(map(int, s.split("x"))) for s in args.sizes.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = bench(sizes, args.frames, args.warmup, device)  # type: ignore[arg-type]
    Console(width=160).print(table(rows, device))


if __name__ == "__main__":
    main()
