"""Prompt embeddings: cache, weighted blending, slerp and temporal transitions (Scope's ``prompts`` /
``prompt_interpolation_method`` / ``transition`` parameters).

All of this is plain synchronous torch code meant for a worker thread; nothing here touches an event loop.
Embeddings are ``[512, dim]`` per prompt (padding rows zero) and ``[1, 512, dim]`` once blended for the DiT.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from serve.models.text_encoder import UMT5Encoder
from serve.models.tokenizer import UMT5Tokenizer, clean_prompt
from serve.models.transfer import to_device

__all__ = [
    "EmbeddingCache",
    "InterpolationMethod",
    "PromptEncoder",
    "PromptTransition",
    "blend_embeddings",
    "lerp",
    "slerp",
]

InterpolationMethod = Literal["linear", "slerp"]

SLERP_LERP_FALLBACK_OMEGA = 1e-4  # rad; below this sin(ω) ≈ 0 and the slerp weights blow up, lerp is exact enough
TRANSITION_SKIP_NORM = 0.01  # Frobenius ‖target − source‖ below which a transition is skipped (jumps at once)


# --------------------------------------------------------------------------------------------------------------------
# Math


def lerp(e1: Tensor, e2: Tensor, t: float) -> Tensor:
    return e1 + (e2 - e1) * t


def slerp(e1: Tensor, e2: Tensor, t: float) -> Tensor:
    """Spherical interpolation per token row (last dim), computed in fp32, returned in ``e1``'s dtype.

    ω is the angle between the normalised rows; the coefficients apply to the *unnormalised* rows, so a row's
    magnitude moves smoothly between the two endpoints. Rows with ω < 1e-4 (parallel, or both zero padding) use lerp.
    """
    a, b = e1.float(), e2.float()
    a_n = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b_n = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dot = (a_n * b_n).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    small = omega < SLERP_LERP_FALLBACK_OMEGA
    safe_sin = torch.where(small, torch.ones_like(sin_omega), sin_omega)  # avoid 0/0 in the branch we discard
    w1 = torch.where(small, torch.full_like(omega, 1.0 - t), torch.sin((1.0 - t) * omega) / safe_sin)
    w2 = torch.where(small, torch.full_like(omega, t), torch.sin(t * omega) / safe_sin)
    return (w1 * a + w2 * b).to(e1.dtype)


def interpolate(e1: Tensor, e2: Tensor, t: float, method: InterpolationMethod) -> Tensor:
    if method == "linear":
        return lerp(e1, e2, t)
    if method == "slerp":
        return slerp(e1, e2, t)
    raise ValueError(f"unknown interpolation method {method!r} (expected 'linear' or 'slerp')")


def _normalised_weights(weights: Sequence[float]) -> list[float]:
    if any(w < 0 for w in weights):
        raise ValueError(f"prompt weights must be >= 0, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"prompt weights must sum to > 0, got {list(weights)}")
    return [float(w) / total for w in weights]


def blend_embeddings(
    embeddings: Sequence[Tensor], weights: Sequence[float], method: InterpolationMethod = "linear"
) -> Tensor:
    """Weighted blend of prompt embeddings (each ``[..., L, dim]``, same shape), weights normalised to sum 1.

    ``linear``: ``E = Σ wᵢ·Eᵢ`` rescaled by ``(Σ wᵢ‖Eᵢ‖) / ‖E‖`` (Frobenius norms) — averaging partly cancelling
    vectors shrinks them, and the DiT was never trained on shrunken contexts, so the blend keeps the weighted-average
    magnitude. ``slerp``: for exactly two prompts, slerp with ``t = w₂``; with more prompts slerp is undefined and
    the linear blend is used.
    """
    if len(embeddings) == 0 or len(embeddings) != len(weights):
        raise ValueError(f"need matching non-empty embeddings/weights, got {len(embeddings)}/{len(weights)}")
    if len(embeddings) == 1:
        return embeddings[0]  # identity: a lone prompt's weight has nothing to be relative to
    w = _normalised_weights(weights)
    if method == "slerp" and len(embeddings) == 2:
        return slerp(embeddings[0], embeddings[1], w[1])
    if method not in ("linear", "slerp"):
        raise ValueError(f"unknown interpolation method {method!r} (expected 'linear' or 'slerp')")
    dtype = embeddings[0].dtype
    mixed = torch.zeros_like(embeddings[0], dtype=torch.float32)
    target_norm = 0.0
    for wi, e in zip(w, embeddings, strict=True):
        ef = e.float()
        mixed += wi * ef
        target_norm += wi * ef.norm()
    norm = mixed.norm()
    # Fully cancelling prompts leave nothing to rescale: keep the (zero) mix rather than dividing by 0. Chosen on
    # the device, so a blend never waits for the GPU.
    mixed = torch.where(norm > 0, mixed * (target_norm / norm.clamp_min(torch.finfo(torch.float32).tiny)), mixed)
    return mixed.to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# Temporal transition


class PromptTransition:
    """Walks from ``source`` to ``target`` over ``num_steps`` generated chunks, one embedding per chunk.

    Interpolants are precomputed at ``t = linspace(0, 1, num_steps)`` (so the first chunk still sees the source and
    the last sees exactly the target). ``num_steps`` 0 or 1 means an instant switch: a single step that is the
    target. ``‖target − source‖ < 0.01`` also jumps at once: every step is the target (chosen on the device, so
    starting a transition never waits for the GPU). After the last step ``next()`` keeps returning the target.
    """

    def __init__(
        self, source: Tensor, target: Tensor, num_steps: int = 4, method: InterpolationMethod = "linear"
    ) -> None:
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        if source.shape != target.shape:
            raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
        self.target = target
        if num_steps <= 1:
            self.steps: list[Tensor] = [target]
        else:
            jump = (target.float() - source.float()).norm() < TRANSITION_SKIP_NORM  # a 0-d device bool
            ts = torch.linspace(0.0, 1.0, num_steps).tolist()  # host floats
            walk = [torch.where(jump, target, interpolate(source, target, t, method)) for t in ts[:-1]]
            self.steps = [*walk, target]
        self._index = 0

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def done(self) -> bool:
        return self._index >= len(self.steps)

    def next(self) -> Tensor:
        """Embedding for the next generated chunk."""
        if self.done:
            return self.target
        out = self.steps[self._index]
        self._index += 1
        return out

    def __iter__(self) -> Iterator[Tensor]:
        while not self.done:
            yield self.next()


# --------------------------------------------------------------------------------------------------------------------
# Cache + encoder front end


class EmbeddingCache:
    """Bounded LRU of ``cleaned prompt text → [L, dim]`` embedding. Thread-safe for one writer and readers."""

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: Tensor) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class PromptEncoder:
    """Tokenizer + umT5 encoder + cache: ``[(text, weight), ...]`` → blended ``[1, 512, dim]`` context."""

    def __init__(
        self,
        tokenizer: UMT5Tokenizer,
        encoder: UMT5Encoder,
        cache_entries: int = 64,
        output_dtype: torch.dtype | None = None,
        output_device: str | torch.device | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.cache = EmbeddingCache(cache_entries)
        param = next(encoder.parameters())
        self.encoder_device = param.device
        self.output_dtype = output_dtype or param.dtype
        self.output_device = torch.device(output_device) if output_device is not None else param.device

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> list[Tensor]:
        """Per-prompt ``[L, dim]`` embeddings (padding rows zero); uncached prompts are encoded in one batch."""
        keys = [clean_prompt(t) for t in texts]
        found: dict[str, Tensor] = {}
        for k in keys:
            hit = self.cache.get(k)
            if hit is not None:
                found[k] = hit
        missing = list(dict.fromkeys(k for k in keys if k not in found))  # de-duplicated, order kept
        if missing:
            ids, mask = self.tokenizer(missing)
            out = self.encoder(to_device(ids, self.encoder_device), to_device(mask, self.encoder_device))  # [B, L, dim]
            out = out.to(device=self.output_device, dtype=self.output_dtype)
            for k, e in zip(missing, out, strict=True):
                e = e.clone()  # detach from the batch storage so evicting one entry frees its memory
                self.cache.put(k, e)
                found[k] = e
        return [found[k] for k in keys]

    def encode(self, prompts: Sequence[tuple[str, float]], method: InterpolationMethod = "linear") -> Tensor:
        """Weighted prompts → ``[1, L, dim]``. One prompt returns its cached embedding unchanged (weight ignored).

        The result may be a view of a cache entry: treat it as read-only (the DiT only reads its context).
        """
        if not prompts:
            raise ValueError("need at least one prompt")
        texts = [t for t, _ in prompts]
        weights = [w for _, w in prompts]
        embeddings = self.embed(texts)
        return blend_embeddings(embeddings, weights, method).unsqueeze(0)
