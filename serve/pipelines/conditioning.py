"""A stream's prompt conditioning, chunk by chunk: the embedding in use and the cross-attention K/V made from it.

`prompts` (weighted, blended by `prompt_interpolation_method`) switch the embedding at the next chunk; a
`transition` walks it to its target prompts over `num_steps` chunks (serve/models/prompts.py). A pipeline-parallel
stream passes `set_text` so that every stage gets the new K/V (serve/runtime/stages.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from serve.models.kv_cache import TextKVCache
from serve.models.prompts import PromptTransition
from serve.pipelines.weights import Models


class Conditioning:
    """The prompt embedding of each chunk: `prompts` switch it at once, a `transition` walks it over chunks."""

    def __init__(self, models: Models, dtype: torch.dtype, text_kv: TextKVCache,
                 vace_text_kv: TextKVCache | None = None,
                 set_text: Callable[[Tensor], None] | None = None) -> None:  # fmt: skip
        self.models, self.dtype = models, dtype
        self.text_kv = text_kv
        self.vace_text_kv = vace_text_kv  # the VACE blocks' cross-attention K/V, set with the main ones
        # context [1, text_len, text_dim] → the cross-attention K/V; a pipeline-parallel stream sets every stage's
        self.set_text = set_text or (lambda context: text_kv.set(models.dit.text_kv(context)))
        self.reset()

    def reset(self) -> None:
        """Forget the prompts in use: the next chunk encodes its prompts afresh."""
        self.context: Tensor | None = None  # [1, text_len, text_dim] in use
        self._prompts_key: tuple | None = None
        self._transition_seen: dict | None = None
        self._transition: PromptTransition | None = None

    def _encode(self, prompts: list[dict] | None, method: str) -> Tensor:
        pairs = [(p["text"], p.get("weight", 1.0)) for p in prompts or []] or [("", 1.0)]
        return self.models.prompts.encode(pairs, method)  # type: ignore[arg-type]

    def _key(self, params: dict[str, Any]) -> tuple:
        return (repr(params.get("prompts")), params.get("prompt_interpolation_method", "linear"))

    def will_jump(self, params: dict[str, Any]) -> bool:
        """Whether `update(params)` will report a jump (the stream batch drains before it does)."""
        return self._prompts_key is not None and self._key(params) != self._prompts_key

    def update(self, params: dict[str, Any]) -> bool:
        """Set this chunk's embedding; True when the prompt jumped (a `prompts` change after the first chunk).

        A transition changes the embedding gradually, which is what it is for, so it never counts as a jump.
        """
        method = params.get("prompt_interpolation_method", "linear")
        key = self._key(params)
        context, jumped = self.context, False
        if key != self._prompts_key:
            jumped = self._prompts_key is not None
            context = self._encode(params.get("prompts"), method)
            self._prompts_key, self._transition = key, None
        transition = params.get("transition")
        if transition is not None and transition != self._transition_seen:
            target = self._encode(transition["target_prompts"], method)
            source = context if context is not None else target
            method = transition.get("temporal_interpolation_method", "linear")
            self._transition = PromptTransition(source, target, transition.get("num_steps", 4), method)
            self._transition_seen = transition
        if self._transition is not None:
            context = self._transition.next()
            if self._transition.done:
                self._transition = None
        if context is not self.context:
            assert context is not None
            in_dtype = context.to(self.dtype)
            self.set_text(in_dtype)
            if self.vace_text_kv is not None:
                self.vace_text_kv.set(self.models.dit.vace_text_kv(in_dtype))  # type: ignore[operator]
            self.context = context
        return jumped
