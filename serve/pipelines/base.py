"""The interface between the frame path and a pipeline: a loaded `Pipeline` opens one `PipelineStream` per session.

A stream turns one chunk of input frames (or none, in text mode) into output frames. Frames cross this boundary as
uint8 RGB arrays `[T, H, W, 3]` at the loaded resolution; a model pipeline moves them to its device in one copy.
All methods run on the pipeline's worker thread, never on the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from serve.pipelines.spec import PipelineSpec

if TYPE_CHECKING:
    from serve.pipelines.frames import YuvChunk

ProgressFn = Callable[[str, float], None]
"""`report(stage, fraction_done)`: called by a loading pipeline; thread-safe, cheap."""


class ChunkOutput:
    """A chunk's output frames, possibly still being copied to the host: `frames()` waits for the copy (the chunk's
    one wait for the device) and returns them. `done` is None when nothing is in flight (a CPU, the meta device, or
    frames kept on the device), else a CUDA event the copy completes."""

    def __init__(self, frames: np.ndarray, done: Any = None) -> None:
        self._frames = frames
        self.done = done

    @property
    def in_flight(self) -> bool:
        return self.done is not None and not self.done.query()

    def frames(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        return self._frames


class PipelineStream(ABC):
    """Per-session generation state (caches, noise generator, prompt state)."""

    keep_output_on_device = False
    """Set by a session whose encoder reads device memory (NVENC, or libvpx / libx264 fed YUV converted on the
    device): `process` may then return the uint8 [T', H, W, 3] frames as a device tensor instead of copying them to
    the host."""

    @abstractmethod
    def process(self, frames: np.ndarray | YuvChunk | None, params: dict[str, Any]) -> np.ndarray:
        """One chunk. `frames` is `[T, H, W, 3]` uint8 with T = chunk_frames (a `YuvChunk` of T frames where the
        pipeline's `frame_input` is "yuv"), or None in text mode.

        `params` is the complete effective parameter set for this chunk (defaults + every update so far); it changes
        only between chunks. Returns `[T', H, W, 3]` uint8 output frames: this chunk's, or with a stream batch
        (serve/pipelines/stream_batch.py) those of the chunks that came out now (none while its pipe fills).
        """

    def start(self, frames: np.ndarray | YuvChunk | None, params: dict[str, Any]) -> ChunkOutput:
        """`process`, split where the host waits for the device: runs the chunk up to its device→host copy and
        returns its output, which may still be in flight. A stream on a device that runs ahead of the host (CUDA)
        overrides this, so the worker can queue the next chunk's device work before it waits for these frames."""
        return ChunkOutput(self.process(frames, params))

    @property
    def chunks_in_flight(self) -> int:
        """Chunks taken by `process` whose frames have not come out yet (a stream batch's pipe); 0 otherwise."""
        return 0

    def reset(self) -> None:  # noqa: B027 - optional hook: stateless streams have nothing to clear
        """Clear caches (the `reset_cache` parameter)."""

    def release(self) -> None:  # noqa: B027 - optional hook: stateless streams hold nothing
        """Free the stream's buffers: its session has ended and it will not run again (called on the worker)."""


class Pipeline(ABC):
    spec: PipelineSpec
    height: int
    width: int
    chunk_frames: int
    backend: str
    """What executes the model step (`eager`, `compiled`, `tensorrt`, or `none` for passthrough)."""
    backend_reason: str | None = None
    """Why that backend was chosen and better ones were not (serve/runtime/backends.py); None where nothing chose."""
    backends: dict[str, dict[str, str]] | None = None
    """Every step component's choice, `{"dit_step" | "vae_encode" | "vae_decode": {"backend", "reason"}}`; the
    DiT's is also `backend` / `backend_reason` above."""
    random_weights: bool = False
    lora_adapters: tuple[dict[str, Any], ...] = ()
    """The LoRAs in the weights or beside them (path, scale, merge_mode, ...): the status' `loaded_lora_adapters`."""
    frame_input: str = "rgb"
    """What `process` takes in video mode: "rgb" (uint8 [T, H, W, 3] at the loaded size, converted by swscale on the
    host) or "yuv" (a serve/pipelines/frames.py `YuvChunk` of decoded planes, converted on the device)."""
    text_fps: float = 16.0
    """Playout rate of text-mode output (Wan's sample rate); video mode keeps the input's timestamps."""

    @classmethod
    @abstractmethod
    def load(cls, spec: PipelineSpec, load_params: dict[str, Any], *, report: ProgressFn, **context: Any) -> Pipeline:
        """Build the pipeline; slow (weights, engines). Raises serve.errors.PipelineLoadError with a clear reason."""

    @abstractmethod
    def open_stream(self, seed: int) -> PipelineStream: ...

    def check_update(self, update: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Checks of a validated runtime update that need the loaded pipeline (e.g. its LoRAs); raises
        InvalidParameters."""

    def placement(self) -> dict[str, Any] | None:
        """How the model is placed over devices (pipeline stages), for the status and `stats`; None: one device."""
        return None

    def failure(self) -> str | None:
        """Why the loaded pipeline can no longer run (a pipeline stage died), or None. Any thread; cheap."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook: pipelines without device memory have nothing to free
        """Release device memory; idempotent."""
