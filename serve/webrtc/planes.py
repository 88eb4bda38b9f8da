"""A decoded `av.VideoFrame` read as its YUV planes, without a CPU colour conversion (serve/pipelines/frames.py)."""

from __future__ import annotations

import logging

import numpy as np
from av import VideoFrame

from kernels.colour import Colour
from serve.errors import FrameConversionError
from serve.pipelines.frames import YuvFrame

log = logging.getLogger(__name__)

_said: set[str] = set()


def _plane(frame: VideoFrame, index: int, columns: int) -> np.ndarray:
    """Plane `index` as a [rows, columns] view: the buffer is `line_size` bytes a row, of which `columns` are used."""
    plane = frame.planes[index]
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :columns]


def read_planes(frame: VideoFrame) -> YuvFrame:
    """yuv420p (what aiortc's software decoders give) and nv12 (NVDEC's layout) are read in place; any other
    format is converted to yuv420p first by swscale, said once per format."""
    name = frame.format.name
    if name == "cuda":  # NVDEC (serve/webrtc/nvdec.py): the planes stay in device memory
        return _device_planes(frame)
    if name not in ("yuv420p", "yuvj420p", "nv12"):
        if name not in _said:
            _said.add(name)
            log.warning("input frames are %s, not yuv420p or nv12: converting them to yuv420p on the CPU", name)
        try:
            frame = frame.reformat(format="yuv420p")
        except Exception as exc:  # av raises ValueError, OSError or its own errors
            raise FrameConversionError(
                f"could not read a {frame.width}×{frame.height} {name} input frame as YUV 4:2:0 "
                f"({type(exc).__name__}); the stream ends. Send a common camera format"
            ) from exc
        name = "yuv420p"
    chroma_w = (frame.width + 1) // 2
    colour = Colour.of_frame(frame.colorspace, frame.color_range)
    if name == "yuvj420p":  # the deprecated JPEG-range format says so by its name, whatever its range tag says
        colour = Colour(colour.matrix, True)
    y = _plane(frame, 0, frame.width)
    if name == "nv12":
        uv = _plane(frame, 1, 2 * chroma_w)
        return YuvFrame(y, uv[:, 0::2], uv[:, 1::2], colour, frame)
    return YuvFrame(y, _plane(frame, 1, chroma_w), _plane(frame, 2, chroma_w), colour, frame)


def _device_planes(frame: VideoFrame) -> YuvFrame:
    """An NV12 frame's planes as torch tensors through DLPack: CUDA tensors for NVDEC's frames, the decoder done
    with them (`decode` returning the frame means so). Each plane's capsule is asked for with no stream: PyAV 18 and
    19 refuse one for a CUDA frame, and `torch.from_dlpack(plane)` would pass torch's current stream.

    PyAV exports the chroma plane as [h // 2, w // 2, 2] (U, V interleaved), short of an odd frame's last half
    block, so an odd frame is read as its even part (one row or column less, all of whose chroma is there)."""
    import torch

    y = torch.from_dlpack(frame.planes[0].__dlpack__())  # [h, w] uint8 (its pitch is the tensor's row stride)
    uv = torch.from_dlpack(frame.planes[1].__dlpack__())
    colour = Colour.of_frame(frame.colorspace, frame.color_range)
    y = y[: frame.height & ~1, : frame.width & ~1]
    return YuvFrame(y, uv[..., 0], uv[..., 1], colour, frame)  # type: ignore[arg-type]
