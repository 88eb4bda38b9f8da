"""Model pipeline streams at the tiny config, opened as the server would open them, and a recorder of their chunks."""

from __future__ import annotations

from pathlib import Path

import torch

from serve.pipelines.chunk_loop import AutoregressiveStream
from serve.pipelines.registry import get_spec
from serve.schemas import LoadParams

SIZE = 32  # pixels → 4×4 latents → 2×2 tokens per frame
LF = 4  # tokens per latent frame at SIZE
PROMPT_A = [{"text": "a cat and a dog playing in the snow", "weight": 1.0}]
PROMPT_B = [{"text": "anime style portrait of a person", "weight": 1.0}]


def open_stream(
    pipeline_id: str, seed: int = 0, *, lora_dir: Path | None = None, **load: object
) -> tuple[AutoregressiveStream, dict]:
    """A stream of the pipeline with seeded random weights, and its runtime defaults in text mode with PROMPT_A.
    `load` adds load parameters (e.g. `loras`, named inside `lora_dir`)."""
    spec = get_spec(pipeline_id)
    load_params = spec.effective_load_params(
        LoadParams(**{"height": SIZE, "width": SIZE, "random_weights": True, "quantization": None, **load}),  # type: ignore[arg-type]
        allow_random_weights=True,
    )
    pipeline = spec.resolve_factory().load(
        spec, load_params, report=lambda *_: None, models_dir=Path("/nonexistent"), lora_dir=lora_dir
    )
    params = {**spec.runtime_defaults, "input_mode": "text", "prompts": PROMPT_A}
    stream = pipeline.open_stream(seed)
    assert isinstance(stream, AutoregressiveStream)
    return stream, params


class Recorder:
    """Wraps a stream's policy hook to keep what each chunk produced (clean latents, decoded video, cache)."""

    def __init__(self, stream: AutoregressiveStream) -> None:
        self.x0: list[torch.Tensor] = []
        self.video: list[torch.Tensor] = []
        self.cache_k: list[torch.Tensor] = []
        hook = stream.policy.after_chunk

        def after_chunk(run, first_frame, x0, video):
            hook(run, first_frame, x0, video)
            self.x0.append(x0.clone())
            self.video.append(video.clone())
            self.cache_k.append(run.cache.k.clone())

        stream.policy.after_chunk = after_chunk  # type: ignore[method-assign]
