"""The VAE's steady-state chunk steps (encode 4F pixel frames → F latents, decode F latents → 4F frames) on each
backend, chosen at load like the DiT step (serve/runtime/backends.py `select_backend`).

Every backend is called like the model's own functional step:

    y, caches = step(x, caches)

with new cache tensors returned (the stream keeps the tuple, nothing is written in place). The first call of a
stream has other shapes (frame 0 alone) and stays eager in `StreamingAutoencoder`; an engine runs only the one input
shape it was built for, and any other (another batch or resolution) runs eager with one log line.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from serve.models.autoencoder import Caches, ChunkStepFn
from serve.runtime.backends import AotiEngine


class CompiledChunkStep(AotiEngine):
    """An AOTInductor package of `ChunkStep` (serve/models/autoencoder.py): (x, *caches) → (y, *new_caches). The
    package allocates its outputs per call, so streams sharing this step never share a cache buffer."""

    def __init__(self, path: Path, input_shape: tuple[int, ...], fallback: ChunkStepFn) -> None:
        super().__init__(path, input_shape, fallback)

    def __call__(self, x: Tensor, caches: Caches) -> tuple[Tensor, Caches]:
        if not self.runs_here(x, None):
            return self.fallback(x, caches)  # type: ignore[misc]
        # The package reads its inputs with the strides it was exported with (contiguous), whatever their own: the
        # stream's pixels are a permuted view of the camera frames, and a first call's caches may be slices of its
        # input. `contiguous()` is a no-op for everything else.
        y, *new_caches = self.runner(x.contiguous(), *(c.contiguous() for c in caches))
        return y, tuple(new_caches)
