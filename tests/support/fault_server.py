"""`python -m tests.support.fault_server serve ...`: the real server CLI with three more pipelines that fail on
purpose, for fault-injection tests. Each is passthrough with one fault:

- `fault-chunk`: its stream raises in the middle of its third chunk (a model that fails mid-stream);
- `fault-convert`: its loaded resolution is one no frame can be converted to (swscale refuses it);
- `fault-hang`: its load never returns until the file named by WANRT_FAULT_RELEASE exists (a hung load).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from serve import cli
from serve.pipelines import registry
from serve.pipelines.passthrough import PassthroughPipeline, PassthroughStream

FAILING_CHUNK = 3
RELEASE_ENV = "WANRT_FAULT_RELEASE"
HANG_LIMIT_S = 120.0  # a forgotten release still ends the load, so the server can shut down


class ChunkFailingStream(PassthroughStream):
    chunks = 0

    def process(self, frames: np.ndarray | None, params: dict[str, Any]) -> np.ndarray:
        self.chunks += 1
        if self.chunks == FAILING_CHUNK:
            raise RuntimeError("injected fault in /opt/models/secret/weights.bin at chunk 3")
        return super().process(frames, params)


class ChunkFailingPipeline(PassthroughPipeline):
    def open_stream(self, seed: int) -> PassthroughStream:
        return ChunkFailingStream(self.height, self.width, self.chunk_frames)


class UnconvertiblePipeline(PassthroughPipeline):
    def open_stream(self, seed: int) -> PassthroughStream:
        stream = super().open_stream(seed)
        self.width = -16  # what the frame path converts input frames to; swscale answers "Invalid argument"
        return stream


class HangingPipeline(PassthroughPipeline):
    @classmethod
    def load(cls, spec, load_params: dict[str, Any], *, report, **context: Any):
        report("reading weights", 0.1)
        release = Path(os.environ[RELEASE_ENV])
        deadline = time.monotonic() + HANG_LIMIT_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().load(spec, load_params, report=report, **context)


FAULTS = {"fault-chunk": ChunkFailingPipeline, "fault-convert": UnconvertiblePipeline, "fault-hang": HangingPipeline}


def register() -> None:
    passthrough = registry.PIPELINES["passthrough"]
    for pipeline_id, factory in FAULTS.items():
        registry.PIPELINES[pipeline_id] = dataclasses.replace(
            passthrough, id=pipeline_id, factory=f"{__name__}:{factory.__name__}"
        )


if __name__ == "__main__":
    register()
    cli.main()
