"""Input frames as their decoded YUV planes, their one trip to the device, and a stream's one place at the host.

The session reads each decoded frame's planes without converting it (serve/webrtc/planes.py); a chunk of them
reaches a pipeline whose `frame_input` is "yuv" as a `YuvChunk`. `upload_yuv` packs the chunk's planes into one
(pinned, on CUDA) host buffer, copies it to the device once, and runs the colour kernel per frame there
(kernels/colour.py: YUV → RGB, resize to the loaded resolution, normalise to [-1, 1]). On a CPU there is no copy at
all: the kernel reads the decoder's buffers in place. `HostBridge` is where a model stream's chunk loop meets the
host: these frames in, its decoded frames out, and its seeded noise.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels.colour import Colour, yuv420_to_rgb
from serve.models.transfer import to_device


@dataclass(frozen=True)
class YuvFrame:
    """One decoded 4:2:0 frame: views of the decoder's planes (rows may be padded; NV12's U and V are strided views
    of its interleaved plane). `owner` keeps the decoder's buffers alive while the views are in use."""

    y: np.ndarray | Tensor  # [h, w] uint8; a CUDA tensor when NVDEC decoded the frame (serve/webrtc/nvdec.py)
    u: np.ndarray | Tensor  # [ceil(h/2), ceil(w/2)] uint8
    v: np.ndarray | Tensor  # [ceil(h/2), ceil(w/2)] uint8
    colour: Colour
    owner: object = None


@dataclass(frozen=True)
class YuvChunk:
    frames: tuple[YuvFrame, ...]

    def __len__(self) -> int:
        return len(self.frames)


def upload_yuv(chunk: YuvChunk, device: torch.device, height: int, width: int) -> Tensor:
    """[T, 3, height, width] float32 in [-1, 1] on `device`: one host→device copy for the whole chunk."""
    if all(isinstance(f.y, Tensor) and same_device(f.y.device, device) for f in chunk.frames):
        planes = [[f.y, f.u, f.v] for f in chunk.frames]  # NVDEC's frames: already there, no copy at all
    elif device.type == "cuda" and all(isinstance(f.y, Tensor) and f.y.is_cuda for f in chunk.frames):
        # NVDEC decodes on its own GPU, and a load's `gpus` may start elsewhere: device to device, not via the host
        planes = [[plane.to(device) for plane in (f.y, f.u, f.v)] for f in chunk.frames]
    else:
        planes = [[_host(plane) for plane in (f.y, f.u, f.v)] for f in chunk.frames]
        if device.type != "cpu":
            planes = _to_device(planes, device)
    out = torch.empty((len(chunk), 3, height, width), dtype=torch.float32, device=device)
    with one_host_thread(device):
        for index, (frame, (y, u, v)) in enumerate(zip(chunk.frames, planes, strict=True)):
            yuv420_to_rgb(y, u, v, frame.colour, out[index])
    return out


def cuda_index(device: torch.device) -> int:
    """A CUDA device's ordinal: `cuda` (no index, as a load without `gpus` names it) is the current device."""
    return device.index if device.index is not None else torch.cuda.current_device()


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: `cuda` is NVDEC's `cuda:0` where 0 is current, which `==` says it is not."""
    return a.type == b.type and (a.type != "cuda" or cuda_index(a) == cuda_index(b))


@contextlib.contextmanager
def one_host_thread(device: torch.device) -> Iterator[None]:
    """Frame-sized ops on `device` on one thread if it is the CPU (elsewhere nothing changes): with torch's intra-op
    threads spinning beside aiortc's decoder and encoder threads on two cores, a 128×128 frame took 218 ms instead of
    1.8 ms (measured, benchmarks/RESULTS.md)."""
    if device.type != "cpu":
        yield
        return
    # torch's thread count is the process's: with two threads in here at once, the second must not save the first's 1
    # and restore it for good, so the count is saved by the first in and restored by the last out.
    global _single_thread_users, _saved_threads
    with _single_thread_lock:
        if _single_thread_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_thread_users += 1
    try:
        yield
    finally:
        with _single_thread_lock:
            _single_thread_users -= 1
            if _single_thread_users == 0:
                torch.set_num_threads(_saved_threads)


_single_thread_lock = threading.Lock()
_single_thread_users = 0
_saved_threads = 1


def _host(plane: np.ndarray | Tensor) -> Tensor:
    return torch.from_numpy(plane) if isinstance(plane, np.ndarray) else plane.cpu()


def _to_device(planes: list[list[Tensor]], device: torch.device) -> list[list[Tensor]]:
    """Every plane of the chunk packed (rows compacted) into one host buffer, pinned on CUDA, and copied once."""
    sizes = [plane.numel() for frame in planes for plane in frame]
    staging = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=device.type == "cuda")
    offset, views = 0, []
    for frame in planes:
        for plane in frame:
            view = staging[offset : offset + plane.numel()].view(plane.shape)
            view.copy_(plane)  # one host memcpy per plane: the decoder's padded rows become packed ones
            views.append((offset, plane.shape))
            offset += plane.numel()
    on_device = staging.to(device, non_blocking=True)  # the caching host allocator keeps `staging` until it is done
    flat = [on_device[start : start + shape.numel()].view(shape) for start, shape in views]
    return [flat[i : i + 3] for i in range(0, len(flat), 3)]


def to_uint8_frames(pixels: Tensor) -> Tensor:
    """[T, 3, H, W] in [-1, 1] → uint8 [T, H, W, 3], as the pipelines' output is quantised."""
    return ((pixels + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class HostBridge:
    """Where a stream's chunk loop meets the host, and the only place it does: frames in (one host→device copy per
    chunk), frames out (one device→host copy per chunk, into pinned memory on CUDA) and the seeded noise generator.

    Everything between those three stays on the device, so the chunk never waits for the GPU before its output is
    read. On the meta device (the real-size dry run, serve/pipelines/dry_run.py) tensors have shapes but no values:
    noise needs no generator there and frames out are zeros of the decoded shape, still counted as one copy.
    """

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.seed = seed
        self.dry = device.type == "meta"
        self.generator = None if self.dry else torch.Generator(device=device).manual_seed(seed)
        self.uploads = 0  # host→device frame copies so far
        self.downloads = 0  # device→host frame copies so far
        self.defer_wait = False  # set by AutoregressiveStream.start: frames out are returned before their copy ends
        self._pending: torch.cuda.Event | None = None

    def reseed(self) -> None:
        if self.generator is not None:
            self.generator.manual_seed(self.seed)

    def noise(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device)

    def upload(self, frames: np.ndarray | YuvChunk, height: int, width: int) -> Tensor:
        """Host frames → [1, 3, T, height, width] float32 in [-1, 1] on the device, converted there: uint8 RGB
        [T, H, W, 3] (swscale's, at the loaded size), or a chunk of decoded YUV planes (kernels/colour.py)."""
        self.uploads += 1
        if isinstance(frames, YuvChunk):
            if self.dry:
                return torch.empty((1, 3, len(frames), height, width), device=self.device)
            return upload_yuv(frames, self.device, height, width).permute(1, 0, 2, 3)[None]
        pixels = to_device(torch.from_numpy(frames), self.device)  # pinned first: from pageable memory it would wait
        return pixels.permute(3, 0, 1, 2)[None].float() / 127.5 - 1

    def download(self, frames: Tensor) -> np.ndarray:
        """uint8 [T, H, W, 3] device frames → a host array; the chunk's one wait for the device is here, unless
        `defer_wait` is set: then the array is returned while the copy is still in flight, and the event it
        completes is kept for `take_pending` (AutoregressiveStream.start hands it to the worker)."""
        self.downloads += 1
        if self.dry:
            return np.zeros(tuple(frames.shape), dtype=np.uint8)
        if frames.device.type != "cuda":
            return frames.cpu().numpy()
        # Pinned memory lets the copy run as DMA; the caching host allocator reuses the block once the array dies.
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        if self.defer_wait:  # one stream: the last copy's event covers every earlier one
            self._pending = torch.cuda.Event()
            self._pending.record(torch.cuda.current_stream(frames.device))
        else:  # an event's wait, not the stream's: CUDA's sync debug mode flags a stream synchronize as hidden
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(frames.device))
            done.synchronize()
        return host.numpy()

    def take_pending(self) -> torch.cuda.Event | None:
        """The event the deferred copies complete, or None; cleared."""
        pending, self._pending = self._pending, None
        return pending
