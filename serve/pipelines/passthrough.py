"""The passthrough pipeline: input frames come back unchanged, resized to the loaded resolution by the frame path's
colour kernel. It exercises the whole chunk loop, WebRTC to WebRTC, without a model.

It runs on the CPU unless the load's `gpus` names a device (`"gpus": "0"`): then the frames take a model pipeline's
path there (planes up in one copy, or none from NVDEC; the colour kernel on the GPU; the output left on the device
for NVENC), which is how the zero-copy frame path is measured without a model (benchmarks/serve_passthrough.py
`--path gpu`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from serve.pipelines.base import Pipeline, PipelineStream, ProgressFn
from serve.pipelines.frames import YuvChunk, one_host_thread, to_uint8_frames, upload_yuv
from serve.pipelines.placement import parse_gpus
from serve.pipelines.spec import PipelineSpec
from serve.runtime.stage_driver import check_visible

CPU = torch.device("cpu")


class PassthroughStream(PipelineStream):
    def __init__(self, height: int, width: int, chunk_frames: int, device: torch.device = CPU) -> None:
        self.height, self.width = height, width
        self.device = device
        self.chunk_frames = chunk_frames
        self.frame_index = 0
        # Text mode draws a diagonal gradient that scrolls one pixel per frame: cheap, and visibly alive.
        ys, xs = np.mgrid[0:height, 0:width]
        self._pattern = np.stack([(xs + ys) % 256, (2 * ys) % 256, (255 - xs) % 256], axis=-1).astype(np.uint8)

    def process(self, frames: np.ndarray | YuvChunk | None, params: dict[str, Any]) -> np.ndarray:
        if isinstance(frames, YuvChunk):  # converted and resized where a model pipeline would: on its device
            with one_host_thread(self.device):
                pixels = to_uint8_frames(upload_yuv(frames, self.device, self.height, self.width))
            # Kept where they are for an encoder that converts them there (NVENC; the CPU encoders on the frame
            # path's device side, which `--frame-path device` forces on a CPU too).
            frames = pixels if self.keep_output_on_device else pixels.cpu().numpy()  # type: ignore[assignment]
        if frames is not None:
            self.frame_index += len(frames)
            return frames
        out = np.stack([np.roll(self._pattern, self.frame_index + i, axis=1) for i in range(self.chunk_frames)])
        self.frame_index += self.chunk_frames
        return out

    def reset(self) -> None:
        self.frame_index = 0


class PassthroughPipeline(Pipeline):
    backend = "none"
    frame_input = "yuv"
    text_fps = 30.0

    def __init__(
        self, spec: PipelineSpec, height: int, width: int, chunk_frames: int, device: torch.device = CPU
    ) -> None:
        self.spec = spec
        self.device = device
        self.height = height
        self.width = width
        self.chunk_frames = chunk_frames

    @classmethod
    def load(cls, spec: PipelineSpec, load_params: dict[str, Any], *, report: ProgressFn, **context: Any) -> Pipeline:
        device = CPU
        if load_params.get("gpus"):  # several devices: the first (passthrough has no model to split into stages)
            gpus = parse_gpus(load_params["gpus"])
            check_visible(gpus)
            device = torch.device(gpus.devices[0])
        report("ready", 1.0)
        return cls(spec, load_params["height"], load_params["width"], load_params["chunk_size"], device)

    def open_stream(self, seed: int) -> PipelineStream:
        return PassthroughStream(self.height, self.width, self.chunk_frames, self.device)
