"""The real-size dry run: a pipeline's real chunk loop at real model size on the meta device.

Meta tensors have shapes, dtypes and a device but no storage, so the 1.3B / 14B DiT, umT5-XXL and the Wan VAE cost
no memory and a chunk costs only Python dispatch (about a second). What it proves: every op of every chunk meets
tensors on one device with the dtypes the GPU run will have (a host tensor meeting a meta one raises), and nothing
reads a value back to the host (`.item()`, `bool(t)`, `.tolist()`, `.cpu()` all raise on meta). The loop meets the
host only through `HostBridge` (serve/pipelines/frames.py), which knows the meta device.

`LiveBytes` watches the same run from below (a TorchDispatchMode): the bytes of every tensor an op allocates,
while it lives, so the peak of a chunk's activations is known without a GPU (benchmarks/memory.py's VRAM plan).
The models here are built as a load builds them (bf16 with the reference's fp32 layers, the VAE in fp32), with no
weights: the tokenizer is the tiny test one padding to the real 512 tokens, since ids only need to be in range.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from serve.models.dit import DIT_CONFIGS, RotaryEmbedding, WanDiT, keep_in_fp32
from serve.models.fp8 import store_dit_in_fp8
from serve.models.prompts import PromptEncoder
from serve.models.text_encoder import UMT5_PRESETS, UMT5Encoder
from serve.models.tokenizer import UMT5Tokenizer
from serve.pipelines.autoregressive import AutoregressivePipeline
from serve.pipelines.registry import PIPELINES
from serve.pipelines.weights import Models, tiny_tokenizer_model
from serve.schemas import LoadParams

META = torch.device("meta")
DTYPE = torch.bfloat16  # what a CUDA load runs the DiT and the text encoder in


def cast_as_loaded(model: nn.Module, dtype: torch.dtype, keep_fp32=lambda name: False) -> nn.Module:
    """Parameters in `dtype`, those `keep_fp32(name)` selects in fp32: what `load_checkpoint` makes of a file."""
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep_fp32(name) else dtype)
    return model


def meta_models(dit_config: str, vae_type: str) -> Models:
    """The real-size models of a pipeline on the meta device, with the dtypes a CUDA load gives them."""
    with torch.device(META):
        dit = cast_as_loaded(WanDiT(DIT_CONFIGS[dit_config]), DTYPE, keep_in_fp32).eval()
        dit.rope = RotaryEmbedding(dit.config.head_dim)  # fp32 tables, rebuilt as load_dit does
        encoder = cast_as_loaded(UMT5Encoder(UMT5_PRESETS["umt5-xxl"]), DTYPE).eval()
    tokenizer = UMT5Tokenizer(tiny_tokenizer_model(), max_length=dit.config.text_len)
    prompts = PromptEncoder(tokenizer, encoder, output_dtype=DTYPE, output_device=META)
    return Models(dit, prompts, vae_type, None, None)


def dry_run_pipeline(pipeline_id: str, height: int | None = None, width: int | None = None, *, vae_type: str = "wan",
                     quantization: str | object | None = ..., models: Models | None = None,
                     ) -> AutoregressivePipeline:  # fmt: skip
    """The pipeline's class at real size on meta, at its seed resolution unless given; `quantization` defaults to
    the pipeline's own (fp8 storage for Krea), as a load applies it. `models` (from `meta_models`) may be shared
    between pipelines of one DiT size; fp8 storage changes them in place."""
    spec = PIPELINES[pipeline_id]
    cls = spec.resolve_factory()
    given: dict[str, Any] = {"vae_type": vae_type, "random_weights": True}
    given.update({k: v for k, v in (("height", height), ("width", width)) if v is not None})
    if quantization is not ...:
        given["quantization"] = quantization
    load_params = spec.effective_load_params(LoadParams(**given), allow_random_weights=True)
    if models is None:
        models = meta_models(cls.shape.dit_config, vae_type)
    models = dataclasses.replace(models, vae_type=vae_type)
    pipeline = cls(spec, load_params, models, META, DTYPE)
    if load_params.get("quantization") == "fp8_e4m3fn":
        store_dit_in_fp8(models.dit, DTYPE)
    return pipeline


PROMPT_A = [{"text": "a cat and a dog playing in the snow", "weight": 1.0}]
PROMPT_B = [{"text": "anime style portrait of a person", "weight": 1.0}]
PROMPT_C = [{"text": "a beautiful landscape with mountains", "weight": 0.5}, {"text": "film grain", "weight": 0.5}]


def scripted_params(defaults: dict[str, Any], mode: str, chunks: int) -> list[dict[str, Any]]:
    """Per-chunk parameters that cross every event of the loop: the first chunk, a steady chunk, a prompt switch
    (LongLive's and MemFlow's re-cache), a transition to a blend of two prompts, then steady chunks."""
    base = {**defaults, "input_mode": mode, "prompts": PROMPT_A}
    script = [base, base, {**base, "prompts": PROMPT_B}]
    transition = {"target_prompts": PROMPT_C, "num_steps": 2, "temporal_interpolation_method": "slerp"}
    script.append({**script[-1], "transition": transition})
    while len(script) < chunks:
        script.append(script[-1])
    return script[:chunks]


UPLOADS = (torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device, torch.ops.aten._to_copy.default)


def _is_blocking_upload(func: Any, args: tuple, kwargs: dict) -> bool:
    source = args[0]
    target = kwargs.get("device") if func is not torch.ops.aten.to.device else args[1]
    non_blocking = kwargs.get("non_blocking", False) or (func is torch.ops.aten.to.device and len(args) > 3 and args[3])
    return (
        isinstance(source, Tensor) and source.device.type == "cpu" and target is not None
        and torch.device(target).type != "cpu" and not non_blocking
    )  # fmt: skip


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors allocated while the mode is on, counted while they are alive; `peak` is the most at once.

    An op's output is a new allocation when its storage is none of its inputs' (views and in-place results share
    an input's storage). Storage identity is the C++ storage, which every view of it shares; a storage leaves the
    count when the last tracked tensor on it dies. Tensors allocated before the mode (weights, caches) never count.
    `largest_host` is the largest allocation on any device but meta: a dry run must make none of real size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest_host = 0
        self.blocking_uploads: list[tuple[int, ...]] = []
        """Shapes of the host→device copies that would make the host wait for the device (to_device's rule)."""
        self._refs: dict[int, list[int]] = {}  # storage id → [tracked tensors on it, bytes]

    def reset_peak(self) -> None:
        self.peak = self.live

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in UPLOADS and _is_blocking_upload(func, args, kwargs or {}):
            self.blocking_uploads.append(tuple(args[0].shape))
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs and key not in self._refs:
                continue  # a view of, or a write into, something allocated before the mode
            if key not in self._refs:
                nbytes = storage.nbytes()
                self._refs[key] = [0, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                if tensor.device.type != "meta":
                    self.largest_host = max(self.largest_host, nbytes)
            self._refs[key][0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


@contextmanager
def tracking() -> Iterator[LiveBytes]:
    with torch.inference_mode(), LiveBytes() as tracker:
        yield tracker
