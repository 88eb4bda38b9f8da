"""Encoders whose `av.Packet`s aiortc packetizes as they are (its pre-encoded path, reference/trt.md §6).

A track that returns `av.Packet`s from `recv()` makes aiortc's RTCRtpSender skip its own encoder and call its
codec's `pack` (H.264: NAL split, STAP-A / FU-A; VP8: the payload descriptor and 1300-byte fragments). Two things the
sender then no longer does, the output track does (serve/webrtc/tracks.py, serve/webrtc/codecs.py): a PLI/FIR
forces a keyframe here, and the receiver's REMB estimate (which aiortc still writes on its unused encoder) becomes
`target_bitrate` here.

- `X264Encoder`: PyAV's libx264 on the CPU. Measured here at 512×512 on the camera-like scene: `ultrafast` (the
  default, `--x264-preset`) 1.4 ms a frame and `superfast` 1.9 ms at the same PSNR, against 4.4 ms for aiortc's VP8
  and 13 ms for aiortc's own libx264 (preset medium), each with its RGB → YUV conversion (benchmarks/RESULTS.md).
- `NvencEncoder`: NVENC through PyNvVideoCodec, fed NV12 straight from device memory (CUDA only; imported lazily,
  because its import fails without the NVENC driver library).
- `Vp8Encoder`: PyAV's libvpx with aiortc's real-time settings, for the clients that take VP8 (every browser that
  is not told otherwise, so the seed's JavaScript). aiortc's own VP8 encoder converts each RGB frame with a fresh
  swscale context and thread pool and reopens libvpx, a keyframe, whenever the estimate moves by 10 %; here one
  single-threaded context converts on the pipeline worker, and a retune reopens at most once a second.
On a GPU server (the frame path's device side) the two CPU encoders take YUV converted on the device
(`DownloadingFrame`: the worker queues the kernel and the copy of YUV, half RGB's bytes, to pinned memory; the
encoder's thread waits for that copy), so no RGB frame is copied and swscale does not run.
The H.264 ones write Constrained Baseline (what aiortc offers: profile-level-id 42e01f / 42001f), no B-frames,
SPS/PPS before every IDR, and VUI colour tags matching kernels/colour.py's RGB → NV12 conversion (BT.601 limited);
VP8 has no colour tags, and its decoders assume BT.601 limited, the same conversion.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch
from av import VideoFrame
from av.video.reformatter import Interpolation, VideoReformatter

from kernels.colour import BT601_LIMITED, rgb_to_nv12
from serve.pipelines.frames import cuda_index, one_host_thread
from serve.pipelines.worker import FrameStamp
from serve.settings import WebRTCSettings

log = logging.getLogger(__name__)

KEYFRAME_INTERVAL_S = 10  # an IDR at least this often, for a receiver whose PLI got lost
FRAME_RATE_HINT = 30  # rate control's frame-rate assumption; timestamps still come from the frames
BITRATE_STEP = 0.1  # retune the encoder when the target moves by more than this fraction (as aiortc does)
REOPEN_MIN_FRAMES = FRAME_RATE_HINT  # FFmpeg's encoders retune by reopening (a keyframe): at most once a second
MAX_STAMPS_HELD = 64  # NVENC frames in flight whose timestamps are kept (PyNvVideoCodec 2.2 holds back a few)


NAL_IDR, NAL_SPS, NAL_PPS = 5, 7, 8


def nal_headers(data: bytes) -> Iterator[int]:
    """The offset of each NAL unit's header byte in Annex B data (the byte after each 00 00 01 start code)."""
    start = data.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(data):
        yield start + 3
        start = data.find(b"\x00\x00\x01", start + 3)


def nal_types(data: bytes) -> list[int]:
    """The nal_unit_type of each NAL unit of an Annex B access unit."""
    return [data[header] & 0x1F for header in nal_headers(data)]


H264_BASELINE = 66  # profile_idc; aiortc offers only (Constrained) Baseline, 42e01f / 42001f


def sps_profile(data: bytes) -> int | None:
    """The profile_idc of an Annex B stream's first SPS (the byte after its NAL header), None if it has none."""
    sps = (h for h in nal_headers(data) if data[h] & 0x1F == NAL_SPS and h + 1 < len(data))
    return data[header + 1] if (header := next(sps, None)) is not None else None


# swscale's area filter: its 2:1 decimation is the 2×2 mean. Its default (bilinear) one averages the two columns but
# spreads each chroma row over four luma rows ([1, 3, 3, 1] / 8, same midway siting), which put its chroma up to 6
# levels from the kernel's on a textured scene. FULL_CHR_H_INP: chroma is read at full width and then decimated by
# that filter (rather than read at half width): the same values within 1 level, in about half the time measured here
# (0.40 vs 0.76 ms at 512², benchmarks/RESULTS.md issue 13).
CHROMA_FLAGS = Interpolation.AREA | Interpolation.FULL_CHR_H_INP


def host_rgb_to_yuv420(reformatter: VideoReformatter, rgb: np.ndarray, pix_fmt: str = "nv12") -> VideoFrame:
    """uint8 RGB [H, W, 3] → an NV12 (or planar yuv420p) frame by swscale, in kernels/colour.py's convention (BT.601
    limited, each chroma sample the mean of its 2×2 block)."""
    frame = VideoFrame.from_ndarray(rgb, format="rgb24")
    return reformatter.reformat(
        frame, format=pix_fmt, dst_colorspace="ITU601", dst_color_range="MPEG", interpolation=CHROMA_FLAGS, threads=1
    )


def nv12_to_i420(nv12: torch.Tensor) -> torch.Tensor:
    """NV12 [H + H/2, W] → yuv420p in PyAV's array layout, [H + H/2, W] holding the Y, U and V planes one after the
    other (U and V are the interleaved chroma's even and odd bytes), on the tensor's device."""
    height = nv12.shape[0] * 2 // 3
    chroma = nv12[height:]
    planes = (nv12[:height].reshape(-1), chroma[:, 0::2].reshape(-1), chroma[:, 1::2].reshape(-1))
    return torch.cat(planes).reshape(nv12.shape)


class DeviceFrame:
    """An NV12 frame in device memory [H + H/2, W], with the timestamp fields the output track paces by."""

    def __init__(self, nv12: torch.Tensor, pts: int, time_base: Fraction) -> None:
        self.nv12, self.pts, self.time_base = nv12, pts, time_base
        # Recorded on the worker's stream after the conversion; the encoder thread waits on it, not on a whole
        # stream it does not own.
        self.ready = torch.cuda.Event() if nv12.is_cuda else None
        if self.ready is not None:
            self.ready.record(torch.cuda.current_stream(nv12.device))

    def to_video_frame(self) -> VideoFrame:
        """A host copy, for the snapshot and the recorder only (never on the encoding path); it waits for the
        device: call it off the event loop (`as_video_frame`)."""
        if self.ready is not None:
            self.ready.synchronize()
        frame = VideoFrame.from_ndarray(self.nv12.cpu().numpy(), format="nv12")
        frame.pts, frame.time_base = self.pts, self.time_base
        return frame


class DownloadingFrame:
    """A frame converted to a CPU encoder's YUV layout on the device, its copy to (pinned) host memory in flight:
    what a CPU encoder takes from a GPU pipeline. Only YUV crosses, half the bytes of RGB, and no swscale runs; the
    worker queues the conversion and the copy and goes on, and the encoder's thread waits for the copy's event.
    On a CPU tensor (`--frame-path device` on a CPU machine) the same steps run with nothing to wait for."""

    def __init__(self, yuv: torch.Tensor, pix_fmt: str, pts: int, time_base: Fraction) -> None:
        self.pix_fmt, self.pts, self.time_base = pix_fmt, pts, time_base
        self.copied: torch.cuda.Event | None = None
        if yuv.is_cuda:
            # The caching host allocator keeps the pinned block until the copy is done, then reuses it.
            self.host = torch.empty(yuv.shape, dtype=yuv.dtype, pin_memory=True)
            self.host.copy_(yuv, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(yuv.device))
        else:
            self.host = yuv

    def to_video_frame(self) -> VideoFrame:
        """The host frame, once its copy has landed (this thread waits on the copy's event, nothing else)."""
        if self.copied is not None:
            self.copied.synchronize()
        frame = VideoFrame.from_ndarray(self.host.numpy(), format=self.pix_fmt)
        frame.pts, frame.time_base = self.pts, self.time_base
        return frame


def as_video_frame(frame: VideoFrame | DeviceFrame | DownloadingFrame) -> VideoFrame:
    """Any frame the output track carries as a host VideoFrame (the snapshot's, the recorder's). It may wait for the
    device: call it on a worker thread, never on the event loop."""
    return frame if isinstance(frame, VideoFrame) else frame.to_video_frame()


class PacketEncoder(ABC):
    """One stream's encoder. `prepare` runs on the pipeline worker (conversion on the device the frames are on);
    `encode` runs in a thread-pool executor, one frame at a time, in playout order."""

    name: str
    preset: str  # the encoder's speed/quality preset, as the session's metrics report it
    reads_device_memory = False  # True: `prepare` takes the pipeline's device tensors as they are

    def __init__(self, bitrate_bps: int) -> None:
        self.target_bitrate = bitrate_bps  # set by the output track from the receiver's estimate
        self.frames = 0
        self.keyframes = 0
        # `encode` runs on a pool thread and `stop` on another: NVENC's session must not end under a frame it is
        # encoding, nor be reopened by a frame queued before the stop.
        self._lock = threading.Lock()
        self._stopped = False

    @abstractmethod
    def prepare(self, frames: np.ndarray | torch.Tensor, stamps: list[FrameStamp]) -> list[Any]:
        """uint8 RGB [T, H, W, 3] (host or device) → one encoder input a frame, carrying `pts` and `time_base`
        (a VideoFrame, or a `DeviceFrame` / `DownloadingFrame` that `as_video_frame` makes one). No host sync: this
        runs on the pipeline worker."""

    @abstractmethod
    def _encode(self, frame: Any, keyframe: bool) -> bytes | None:
        """One frame → one encoded frame (H.264: an access unit in Annex B), None while the encoder holds it back."""

    def is_keyframe(self, data: bytes) -> bool:
        """Whether an encoded frame can start a stream (H.264: it holds an IDR)."""
        return NAL_IDR in nal_types(data)

    def _output_stamp(self, frame: Any) -> tuple[int, Fraction]:
        """(pts, time_base) of what `_encode` just returned: the frame's own, for an encoder without delay."""
        return frame.pts, frame.time_base

    def encode(self, frame: Any, keyframe: bool) -> av.Packet | None:
        with self._lock:
            if self._stopped:
                return None
            data = self._encode(frame, keyframe)
        self.frames += 1
        if not data:
            return None
        packet = av.Packet(data)
        packet.pts, packet.time_base = self._output_stamp(frame)
        if self.is_keyframe(data):
            self.keyframes += 1
        return packet

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the encoder; idempotent. The next frame reopens it (a keyframe): the track calls this on the
        encoding thread after an error, never while a frame is being encoded."""

    def stop(self) -> None:
        """For good, from any thread: after the frame being encoded, if any; later frames are not encoded."""
        with self._lock:
            self._stopped = True
            self.close()


class LibavEncoder(PacketEncoder):
    """One of FFmpeg's CPU encoders through PyAV, one thread, fed by one swscale context for the stream, or (with
    `convert_on_device`) by YUV converted on the pipeline's device (`DownloadingFrame`)."""

    pix_fmt: str  # what the codec takes: nv12 or yuv420p

    def __init__(self, bitrate_bps: int, convert_on_device: bool = False) -> None:
        super().__init__(bitrate_bps)
        # True: the pipeline keeps its output frames on its device and `prepare` converts them there.
        self.reads_device_memory = convert_on_device
        self._codec: Any = None
        self._opened_at = 0  # `frames` when the codec was last opened
        # One swscale context for the stream, one thread: a fresh frame's own reformatter builds a context and a
        # thread pool per call, which profiling showed as a large share of the path's CPU (benchmarks/RESULTS.md).
        self._reformatter = VideoReformatter()

    def prepare(
        self, frames: np.ndarray | torch.Tensor, stamps: list[FrameStamp]
    ) -> list[VideoFrame] | list[DownloadingFrame]:
        """Host frames: swscale converts them (on a CPU it is several times faster than the torch reference).
        Device frames: the kernel converts them there, and only YUV comes to the host, its copy still in flight."""
        if isinstance(frames, torch.Tensor):
            return [self._convert_on_device(image, stamp) for image, stamp in zip(frames, stamps, strict=True)]
        out = []
        for image, stamp in zip(frames, stamps, strict=True):
            frame = host_rgb_to_yuv420(self._reformatter, np.ascontiguousarray(image), self.pix_fmt)
            frame.pts, frame.time_base = stamp.pts, stamp.time_base
            out.append(frame)
        return out

    def _convert_on_device(self, image: torch.Tensor, stamp: FrameStamp) -> DownloadingFrame:
        with one_host_thread(image.device):
            yuv = rgb_to_nv12(image, BT601_LIMITED)
            yuv = yuv if self.pix_fmt == "nv12" else nv12_to_i420(yuv)
        return DownloadingFrame(yuv, self.pix_fmt, stamp.pts, stamp.time_base)

    @abstractmethod
    def _open(self, frame: VideoFrame) -> Any:
        """A codec context set up for `frame`'s size at `target_bitrate` (PyAV opens it at the first frame)."""

    def _context(self, codec_name: str, frame: VideoFrame) -> Any:
        """What every `_open` sets: `frame`'s size and timestamps, the target bitrate, one thread."""
        codec = av.CodecContext.create(codec_name, "w")
        codec.width, codec.height, codec.pix_fmt = frame.width, frame.height, self.pix_fmt
        codec.time_base = frame.time_base
        codec.framerate = Fraction(FRAME_RATE_HINT, 1)
        codec.bit_rate = self.target_bitrate
        codec.thread_count = 1  # one core per stream at most: many streams share two cores better than slices do
        return codec

    def _encode(self, frame: VideoFrame | DownloadingFrame, keyframe: bool) -> bytes | None:
        if isinstance(frame, DownloadingFrame):
            frame = frame.to_video_frame()  # this thread waits for the copy, never the pipeline worker
        codec = self._codec
        if codec is not None and (frame.width, frame.height) != (codec.width, codec.height):
            codec = None  # a new resolution (a reload): a new stream, starting with a keyframe
        retune = abs(self.target_bitrate - codec.bit_rate) > BITRATE_STEP * codec.bit_rate if codec else False
        if codec is None or (retune and self.frames - self._opened_at >= REOPEN_MIN_FRAMES):
            # A retune reopens at the new rate, as aiortc's own encoders do: setting bit_rate on the open context
            # does not retune it. x264 takes a new bitrate mid-stream only together with its VBV settings, and
            # FFmpeg resets those from the context's rc_max_rate, which PyAV cannot set after open (measured: the
            # output kept its first rate); FFmpeg's libvpx wrapper reads its rate at open only (measured likewise).
            # The new stream starts with a keyframe, so an estimate that moves every frame still costs at most one
            # keyframe a second.
            codec = self._codec = self._open(frame)
            self._opened_at = self.frames
        frame.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        return b"".join(bytes(packet) for packet in codec.encode(frame)) or None

    def close(self) -> None:
        self._codec = None


class X264Encoder(LibavEncoder):
    name = "libx264"
    pix_fmt = "nv12"

    def __init__(
        self, bitrate_bps: int, preset: str = WebRTCSettings.x264_preset, convert_on_device: bool = False
    ) -> None:
        super().__init__(bitrate_bps, convert_on_device)
        self.preset = preset

    def _open(self, frame: VideoFrame) -> Any:
        codec = self._context("libx264", frame)
        kbps = self.target_bitrate // 1000
        codec.options = {
            "preset": self.preset,
            "tune": "zerolatency",
            "level": "31",
            "forced-idr": "1",  # a forced keyframe is an IDR, which a browser can start from
            "g": str(KEYFRAME_INTERVAL_S * FRAME_RATE_HINT),
            "x264-params": (
                f"bframes=0:scenecut=0:repeat-headers=1:vbv-maxrate={kbps}:vbv-bufsize={kbps // 2}"
                ":colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m:range=tv"
            ),
        }
        codec.profile = "Baseline"  # x264's baseline is Constrained Baseline (no FMO/ASO/redundant slices)
        return codec


class Vp8Encoder(LibavEncoder):
    name = "libvpx"
    preset = "realtime"  # libvpx's real-time deadline at cpu-used -6 (`_open`)
    pix_fmt = "yuv420p"  # the only 4:2:0 layout FFmpeg's VP8 encoder takes

    def is_keyframe(self, data: bytes) -> bool:
        return not data[0] & 1  # the frame tag's first bit is 0 on a key frame (RFC 6386 §9.1)

    def _open(self, frame: VideoFrame) -> Any:
        codec = self._context("libvpx", frame)
        codec.gop_size = KEYFRAME_INTERVAL_S * FRAME_RATE_HINT
        codec.qmin, codec.qmax = 2, 56
        rate = str(self.target_bitrate)
        # aiortc's real-time settings, so the two VP8 paths differ only in how frames reach libvpx and how often it
        # reopens: CBR (minrate = maxrate = the target), a one-second buffer, no look-ahead, one token partition,
        # real-time speed 6, its temporal denoiser at level 4.
        codec.options = {
            "deadline": "realtime", "cpu-used": "-6", "lag-in-frames": "0", "bufsize": rate, "minrate": rate,
            "maxrate": rate, "undershoot-pct": "100", "overshoot-pct": "15", "noise-sensitivity": "4",
            "static-thresh": "1", "partitions": "0",
        }  # fmt: skip
        return codec


class NvencPlanes:
    """An NV12 device frame [H + H/2, W] as PyNvVideoCodec's samples give `Encode` one: an object whose `cuda()`
    returns the luma [H, W, 1] and the interleaved chroma [H/2, W/2, 2], each with a `__cuda_array_interface__`
    (torch's views carry it). Not the tensor itself: the library calls a tensor's `__dlpack__` with the stream as a
    positional argument, which torch's keyword-only signature refuses (read in its 2.2.4 binary)."""

    def __init__(self, nv12: torch.Tensor) -> None:
        height, width = nv12.shape[0] * 2 // 3, nv12.shape[1]
        self.planes = [nv12[:height].unsqueeze(-1), nv12[height:].view(height // 2, width // 2, 2)]

    def cuda(self) -> list[torch.Tensor]:
        return self.planes


class NvencEncoder(PacketEncoder):
    """NVENC via PyNvVideoCodec: NV12 from device memory, no host copy of the frame.

    Written against PyNvVideoCodec 2.2's API as its samples use it (reference/perf-and-zero-copy.md B4); exercised
    only by the gpu-marked tests (tests/test_packet_path.py), on a GPU with NVENC, which the datacenter Hoppers
    (H100, H200) and the A100 lack: `nvenc_unavailable` finds that out before a session is given one.

    Its own CUDA stream: the library copies each frame from our buffer on the stream it is given, which waits for
    the conversion's event, and the buffer is recorded on it, so torch does not reuse it before the copy ran. Each
    frame carries a sequence number (`inputTimeStamp`): 2.2 returns an encoded frame some frames after its input,
    and the packet takes the timestamps of the frame it encodes, not of the frame just given."""

    name = "nvenc"
    preset = "P1"  # NVENC's fastest (`_open`)
    reads_device_memory = True

    def __init__(self, bitrate_bps: int, device: torch.device) -> None:
        super().__init__(bitrate_bps)
        import PyNvVideoCodec as nvc

        self._nvc = nvc
        self.device = device
        self._gpu = cuda_index(device)
        self._stream = torch.cuda.Stream(device)
        self._encoder: Any = None
        self._size: tuple[int, int] | None = None
        self._bitrate = bitrate_bps
        self._sequence = 0
        self._stamps: dict[int, tuple[int, Fraction]] = {}  # by sequence number, until their frame comes out
        self._stamp: tuple[int, Fraction] = (0, Fraction(1, 90000))  # of the last encoded frame returned

    def prepare(self, frames: np.ndarray | torch.Tensor, stamps: list[FrameStamp]) -> list[DeviceFrame]:
        rgb = torch.from_numpy(frames).to(self.device, non_blocking=True) if isinstance(frames, np.ndarray) else frames
        return [
            DeviceFrame(rgb_to_nv12(image, BT601_LIMITED), stamp.pts, stamp.time_base)
            for image, stamp in zip(rgb, stamps, strict=True)
        ]

    def _open(self, height: int, width: int) -> Any:
        gop = KEYFRAME_INTERVAL_S * FRAME_RATE_HINT
        config = {  # the sample configs spell these as strings or numbers
            "codec": "h264", "profile": "baseline", "preset": self.preset, "tuning_info": "ultra_low_latency",
            "rc": "cbr", "bitrate": self._bitrate, "fps": FRAME_RATE_HINT, "gop": gop, "idrperiod": gop, "bf": 0,
            "repeatspspps": 1, "vbvbufsize": self._bitrate // 2,
        }  # fmt: skip
        # usecpuinputbuffer=False: frames come as CUDA arrays. NVENC's default VUI is unspecified colour, which
        # decoders read as BT.601 limited, the matrix the conversion used [unverified on a GPU].
        return self._nvc.CreateEncoder(
            width, height, "NV12", False, gpu_id=self._gpu, cudastream=self._stream.cuda_stream,
            **{k: str(v) for k, v in config.items()},
        )  # fmt: skip

    def _encode(self, frame: DeviceFrame, keyframe: bool) -> bytes | None:
        height, width = frame.nv12.shape[0] * 2 // 3, frame.nv12.shape[1]
        if self._encoder is None or self._size != (height, width):
            self.close()
            self._encoder, self._size = self._open(height, width), (height, width)
        elif abs(self.target_bitrate - self._bitrate) > BITRATE_STEP * self._bitrate:
            params = self._encoder.GetEncodeReconfigureParams()
            params.averageBitrate = self._bitrate = self.target_bitrate
            params.vbvBufferSize = params.vbvInitialDelay = self._bitrate // 2
            self._encoder.Reconfigure(params)
        if frame.ready is not None:
            self._stream.wait_event(frame.ready)  # the conversion kernel has written the frame
        pic = self._nvc.NV_ENC_PIC_PARAMS()
        pic.inputTimeStamp = self._sequence
        if keyframe:
            flags = self._nvc.NV_ENC_PIC_FLAGS
            pic.encodePicFlags = int(flags.FORCEIDR) | int(flags.OUTPUT_SPSPPS)
        self._stamps[self._sequence] = (frame.pts, frame.time_base)
        if len(self._stamps) > MAX_STAMPS_HELD:  # a library that returns no timestamps must not grow this for good
            del self._stamps[next(iter(self._stamps))]
        self._sequence += 1
        out = self._encoder.Encode(NvencPlanes(frame.nv12), pic)
        frame.nv12.record_stream(self._stream)  # read by the library's copy on that stream: not reused before it
        return self._take(out)

    def _take(self, out: Any) -> bytes | None:
        """The encoded frames `Encode` returned, as one access unit stamped like the last of them (steady state:
        exactly one)."""
        packets = out if isinstance(out, list | tuple) else [out]
        sequences = [p["timestamp"] for p in packets if isinstance(p, dict) and "timestamp" in p]
        if sequences:
            last = max(sequences)
            self._stamp = self._stamps.get(last, self._stamp)
            self._stamps = {n: stamp for n, stamp in self._stamps.items() if n > last}
        return _bitstream(out) or None

    def _output_stamp(self, frame: DeviceFrame) -> tuple[int, Fraction]:
        return self._stamp

    def flush(self) -> bytes:
        """Ends the encoder's session and returns what it still held, encoded (a probe's or a test's; a stream's
        `close` drops it)."""
        if self._encoder is None:
            return b""
        held, self._encoder = self._encoder.EndEncode(), None
        self._stamps.clear()
        return _bitstream(held)

    def close(self) -> None:
        self.flush()


_nvenc_checked: dict[int, str | None] = {}
_nvenc_lock = threading.Lock()
PROBE_SIZE = 256  # NVENC takes frames from 145×49 up
PROBE_TIMEOUT_S = 10.0  # a probe that takes longer (a wedged driver) leaves NVENC unused, said so


def nvenc_unavailable(device: torch.device) -> str | None:
    """Why NVENC cannot serve H.264 sessions on this CUDA device, or None; found once per GPU by a real encode.

    Importing PyNvVideoCodec succeeds wherever the driver's encode library is installed, but the H100, H200 and
    A100 have no NVENC: there CreateEncoder fails, and every frame of every session would fail with it. So a small
    stream is encoded here (a few frames, flushed) and its first SPS must say Baseline, the profile aiortc offers
    (PyNvVideoCodec 2.2 may not apply the `profile` option). Blocking (an encoder opens in tens of milliseconds):
    call it off the event loop. A probe still running after PROBE_TIMEOUT_S is answered as a reason, not waited on."""
    index = cuda_index(device)
    if index in _nvenc_checked:
        return _nvenc_checked[index]
    if not _nvenc_lock.acquire(timeout=PROBE_TIMEOUT_S):
        return f"the probe of GPU {index}'s NVENC has not finished in {PROBE_TIMEOUT_S:g} s"
    try:
        if index not in _nvenc_checked:
            _nvenc_checked[index] = _probe_nvenc(torch.device("cuda", index))
        return _nvenc_checked[index]
    finally:
        _nvenc_lock.release()


def nvenc_probed(device: torch.device) -> str | None:
    """What `nvenc_unavailable` found for this GPU, without probing (for the event loop): a reason, None when NVENC
    serves, or a reason saying no probe of it has finished."""
    index = cuda_index(device)
    return _nvenc_checked.get(index, f"no probe of GPU {index}'s NVENC has finished")


def _probe_nvenc(device: torch.device) -> str | None:
    try:
        encoder = NvencEncoder(1_000_000, device)
        grey = torch.full((PROBE_SIZE * 3 // 2, PROBE_SIZE), 128, dtype=torch.uint8, device=device)
        data = b"".join(encoder._encode(DeviceFrame(grey, n, Fraction(1, 30)), n == 0) or b"" for n in range(4))
        data += encoder.flush()
    except Exception as exc:  # ImportError without the wheel; its own errors without NVENC or its library
        return f"{type(exc).__name__}: {exc}"
    if NAL_IDR not in nal_types(data):
        return "a probe encode gave no IDR frame"
    if (profile := sps_profile(data)) != H264_BASELINE:
        return f"it writes H.264 profile {profile}, not Baseline (profile-level-id 42e01f, what aiortc offers)"
    return None


def _bitstream(out: Any) -> bytes:
    """Encode's result as bytes: bytes-like, or (with picture params) a list of packets with a `data` field."""
    if isinstance(out, bytes | bytearray | memoryview):
        return bytes(out)
    if isinstance(out, list | tuple):
        return b"".join(_bitstream(item) for item in out)
    if isinstance(out, dict):
        return _bitstream(out["data"])
    return bytes(getattr(out, "data", out))


_said: set[str] = set()


def make_encoder(
    codec: str, device: torch.device, bitrate_bps: int, x264_preset: str, convert_on_device: bool = False
) -> PacketEncoder | None:
    """The encoder for a negotiated codec (a mimeType), None for one aiortc encodes itself. H.264: NVENC where the
    pipeline's device is a CUDA GPU with NVENC, else libx264; one log line says which and why. The CPU encoders take
    frames converted on `device` when `convert_on_device` (the frame path's device side: a GPU pipeline, or
    `--frame-path device`), else host RGB through swscale."""
    if codec == "video/VP8":
        return Vp8Encoder(bitrate_bps, convert_on_device)
    if codec != "video/H264":
        return None
    reason = "the pipeline runs on the CPU"
    if device.type == "cuda":
        unavailable = nvenc_probed(device)  # the session's start probed it, off the event loop
        if unavailable is None:
            _say("h264 encoder=nvenc")
            return NvencEncoder(bitrate_bps, device)
        reason = f"NVENC unavailable: {unavailable}"
    _say(f"h264 encoder=libx264 preset={x264_preset} ({reason})")
    return X264Encoder(bitrate_bps, x264_preset, convert_on_device)


def _say(line: str) -> None:
    if line not in _said:
        _said.add(line)
        log.info(line)
