"""LoRA adapters for the Wan DiT: every published file layout read into one form, merged into the weights or kept as
runtime factors beside the Linears.

Layouts (scope-features.md §2), all normalised to Wan's own Linear names (`blocks.0.self_attn.q`):
- PEFT: `base_model.model.blocks.0.self_attn.q.lora_A.weight` / `lora_B` (LongLive's and MemFlow's built-in LoRAs);
- ComfyUI / Kijai: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `lora_up` (or `lora_A`/`lora_B`);
- kohya: `lora_unet_blocks_0_self_attn_q.lora_down.weight`;
- diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight`;
- bare Wan names: `blocks.0.self_attn.q.lora_A.weight`.
A layer's optional `.alpha` gives its scale α/r (r read per layer from A's rows) in every layout; without one the
factor is 1 (α = r, PEFT's files and LongLive's rank-256 / α-256 LoRA). Keys that name no LoRA factor of a Linear
of this model are reported by `LoraAdapter.unmatched`, never dropped unsaid.

Applied as W' = W + scale·(α/r)·B·A: `merged_weights` adds it to the weights as they load or `merge_lora` into a
built model; `attach_runtime_loras` keeps it apart (`LoraLinear`), with static shapes and the scale in a device
buffer, so a scale change is a buffer write at a chunk boundary: no reload, no recompile.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serve.models.checkpoint import CheckpointError, LazyTensor, diffusers_to_wan, read_checkpoint, strip_prefixes
from serve.models.dit import DIT_CONFIGS, compute_dtype

log = logging.getLogger(__name__)

# (suffix, which factor): the down projection A [r, in], the up projection B [out, r], and α.
FACTOR_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
LORA_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")
KOHYA_PREFIX = "lora_unet_"
# Name parts that contain an underscore, kept whole when kohya's `_`-joined names are split back into a path.
KOHYA_WORDS = ("self_attn", "cross_attn", "norm_q", "norm_k", "to_q", "to_k", "to_v", "to_out", "time_embedding",
               "text_embedding", "time_projection", "patch_embedding", "scale_shift_table")  # fmt: skip


@dataclass(frozen=True)
class LoraLayer:
    """One Linear's factors: ΔW = factor·up·down, factor = α/r."""

    down: LazyTensor  # A [r, in]
    up: LazyTensor  # B [out, r]
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def factor(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    layers: dict[str, LoraLayer]  # Wan Linear name (`blocks.0.self_attn.q`) → factors
    unmatched: tuple[str, ...] = ()  # keys in no LoRA layout, or naming no Linear of the model it was matched to

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    def model_dim(self) -> int | None:
        """The width of the model it was trained on, read from a block's self-attention factors."""
        for name, layer in self.layers.items():
            if ".self_attn." in name or ".cross_attn." in name:
                return layer.down.shape[1]
        return None

    def base_model(self) -> str | None:
        """The DiT preset (`wan2.1-1.3b`, `wan2.1-14b`, `tiny`) whose width it has, or None."""
        dim = self.model_dim()
        return next((name for name, config in DIT_CONFIGS.items() if config.dim == dim), None)


def linear_name(key: str) -> tuple[str, str] | None:
    """A file key → (Wan Linear name, factor), or None when it is no LoRA factor."""
    found = next(((key[: -len(suffix)], part) for suffix, part in FACTOR_SUFFIXES if key.endswith(suffix)), None)
    if found is None:
        return None
    name, part = found
    name = strip_prefixes(name, LORA_PREFIXES)
    if name.startswith(KOHYA_PREFIX):
        name = name[len(KOHYA_PREFIX) :]
        for i, word in enumerate(KOHYA_WORDS):
            name = name.replace(word, f"\0{i}\0")
        name = name.replace("_", ".")
        for i, word in enumerate(KOHYA_WORDS):
            name = name.replace(f"\0{i}\0", word)
    if ".attn1." in f".{name}." or ".attn2." in f".{name}." or ".ffn.net." in f".{name}.":
        name = diffusers_to_wan(f"{name}.weight").removesuffix(".weight")
    return name, part


def read_lora_file(path: Path | str) -> LoraAdapter:
    """Read a LoRA file's factors (shapes now, values when used); CheckpointError names the file and the problem."""
    path = Path(path)
    tensors = read_checkpoint(path)
    parts: dict[str, dict[str, LazyTensor]] = {}
    unmatched = []
    for key, lazy in tensors.items():
        parsed = linear_name(key)
        if parsed is None:
            unmatched.append(key)
            continue
        name, part = parsed
        parts.setdefault(name, {})[part] = lazy
    layers = {}
    for name, found in sorted(parts.items()):
        if "down" not in found or "up" not in found:
            raise CheckpointError(f"{path}: LoRA for {name!r} has {'B' if 'up' in found else 'A'} but not both")
        down, up = found["down"], found["up"]
        if len(down.shape) != 2 or len(up.shape) != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(
                f"{path}: LoRA for {name}: up {list(up.shape)} and down {list(down.shape)} are not one rank's factors"
            )
        alpha = float(found["alpha"].load().float()) if "alpha" in found else None
        layers[name] = LoraLayer(down, up, alpha)
    if not layers:
        raise CheckpointError(f"{path}: no LoRA factors (lora_A/lora_B or lora_down/lora_up) found")
    return LoraAdapter(path, layers, tuple(unmatched))


def match_model(adapter: LoraAdapter, model: nn.Module) -> LoraAdapter:
    """The adapter restricted to the Linears `model` has, shapes checked; names it has no Linear for are unmatched.

    A LoRA for another model size fails here, naming the file, the size it is for and the first mismatched key.
    """
    linears = {name: module for name, module in model.named_modules() if _linear_shape(module) is not None}
    layers, unmatched = {}, list(adapter.unmatched)
    for name, layer in adapter.layers.items():
        if name not in linears:
            unmatched.append(name)
            continue
        out_features, in_features = _linear_shape(linears[name])  # type: ignore[misc]
        if layer.down.shape[1] != in_features or layer.up.shape[0] != out_features:
            made_for = adapter.base_model()
            hint = f" (it is a LoRA for {made_for})" if made_for else ""
            raise CheckpointError(
                f"{adapter.path}: LoRA for {name} is [{layer.up.shape[0]}, {layer.down.shape[1]}] but the layer is "
                f"[{out_features}, {in_features}]{hint}"
            )
        layers[name] = layer
    if not layers:
        raise CheckpointError(f"{adapter.path}: no LoRA factor names a Linear of this model ({len(unmatched)} keys)")
    if unmatched:
        log.warning("lora=%s unmatched_keys=%d first=%s", adapter.path, len(unmatched), ", ".join(unmatched[:5]))
    return LoraAdapter(adapter.path, layers, tuple(unmatched))


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of an nn.Linear or a module standing in for one (Fp8Linear, LoraLinear)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return module.out_features, module.in_features
    return None


def delta(layer: LoraLayer, scale: float) -> Tensor:
    """scale·(α/r)·B·A in fp32 [out, in]."""
    return (scale * layer.factor) * (layer.up.load().float() @ layer.down.load().float())


def merged_weights(adapters: Sequence[tuple[LoraAdapter, float]]) -> dict[str, Tensor]:
    """{weight key: the sum of the adapters' ΔW}, fp32: what a load adds to each weight as it reads it."""
    deltas: dict[str, Tensor] = {}
    for adapter, scale in adapters:
        for name, layer in adapter.layers.items():
            key = f"{name}.weight"
            deltas[key] = deltas[key] + delta(layer, scale) if key in deltas else delta(layer, scale)
    return deltas


@torch.no_grad()
def merge_lora(model: nn.Module, adapter: LoraAdapter, scale: float) -> None:
    """W += scale·(α/r)·B·A for each matched nn.Linear of a built model, computed in fp32, stored in W's dtype."""
    for name, layer in adapter.layers.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{adapter.path}: {name} is stored as {type(linear).__name__}; merge before fp8")
        weight = linear.weight
        weight.copy_((weight.float() + delta(layer, scale).to(weight.device)).to(weight.dtype))


# -- runtime adapters ----------------------------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """A Linear (or Fp8Linear) plus the low-rank factors of every runtime adapter on it, concatenated along rank:

        y = base(x) + ((x·downᵀ) · column_scale)·upᵀ        down [R, in], up [out, R] (α/r folded in), R = Σ r_i

    `column_scale` [R] holds each adapter's user scale over its rank columns, written by `RuntimeLoras.set_scales`.
    Shapes never change after attach, so the same module runs eager or compiled, captured in a CUDA graph.
    """

    def __init__(self, base: nn.Module, down: Tensor, up: Tensor, adapter_of_column: Tensor) -> None:
        super().__init__()
        self.base = base
        self.out_features, self.in_features = _linear_shape(base)  # type: ignore[misc]
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("adapter_of_column", adapter_of_column, persistent=False)
        self.register_buffer("column_scale", torch.zeros_like(down[:, 0]), persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.base)

    def forward(self, x: Tensor) -> Tensor:
        low_rank = F.linear(x.to(self.down.dtype), self.down) * self.column_scale  # [..., R]
        return self.base(x) + F.linear(low_rank, self.up).to(x.dtype)


@dataclass
class RuntimeLoras:
    """The runtime adapters attached to a model, in load order, and the scales they currently run at."""

    paths: tuple[str, ...]  # as the load named them: the keys of `lora_scales`
    layers: list[LoraLinear]
    scales: Tensor  # [adapters] on the model's device
    current: list[float] = field(default_factory=list)

    def set_scales(self, scales: Mapping[str, float]) -> None:
        """Run at `scales` (by path) from the next step on. Writes device buffers only when a value changed (a copy
        of a few floats and one gather per layer); never reads the device."""
        wanted = [float(scales.get(path, now)) for path, now in zip(self.paths, self.current, strict=True)]
        if wanted == self.current:
            return
        for index, (value, now) in enumerate(zip(wanted, self.current, strict=True)):
            if value != now:
                self.scales[index].fill_(value)  # a kernel argument, not a copy: nothing waits on the device
        for layer in self.layers:
            layer.column_scale.copy_(self.scales.index_select(0, layer.adapter_of_column))
        self.current = wanted


@torch.no_grad()
def attach_runtime_loras(model: nn.Module, adapters: Sequence[tuple[str, LoraAdapter, float]]) -> RuntimeLoras:
    """Put a LoraLinear around every Linear that any of `adapters` ((path, matched adapter, scale)) targets."""
    first = next(iter(model.parameters()))
    device = first.device
    targets = sorted({name for _, adapter, _ in adapters for name in adapter.layers})
    layers = []
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        dtype = compute_dtype(base)
        downs, ups, owners = [], [], []
        for index, (_, adapter, _) in enumerate(adapters):
            layer = adapter.layers.get(name)
            if layer is None:
                continue
            downs.append(layer.down.load().float())
            ups.append(layer.up.load().float() * layer.factor)
            owners += [index] * layer.rank
        wrapped = LoraLinear(
            base,
            torch.cat(downs).to(device=device, dtype=dtype),
            torch.cat(ups, dim=1).to(device=device, dtype=dtype),
            torch.tensor(owners, dtype=torch.long, device=device),
        )
        setattr(parent, child, wrapped)
        layers.append(wrapped)
    loras = RuntimeLoras(
        tuple(path for path, _, _ in adapters), layers,
        torch.zeros(len(adapters), dtype=torch.float32, device=device), [0.0] * len(adapters),
    )  # fmt: skip
    loras.set_scales({path: scale for path, _, scale in adapters})
    log.info("runtime loras=%d layers=%d rank=%d", len(adapters), len(layers), sum(a.rank for _, a, _ in adapters))
    return loras
