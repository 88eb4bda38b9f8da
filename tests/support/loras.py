"""LoRA files in each published layout (scope-features.md §2), written from one set of factors at the tiny size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from serve.models.dit import BLOCK_LINEARS

DIFFUSERS_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                   "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                   "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                   "ffn.2": "ffn.net.2"}  # fmt: skip


@dataclass(frozen=True)
class Factors:
    down: Tensor  # A [r, in]
    up: Tensor  # B [out, r]
    alpha: float | None

    def delta(self, scale: float) -> Tensor:
        factor = 1.0 if self.alpha is None else self.alpha / self.down.shape[0]
        return scale * factor * (self.up.float() @ self.down.float())


def random_factors(model: nn.Module, names: list[str], rank: int, alpha: float | None, seed: int) -> dict[str, Factors]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        layer = model.get_submodule(name)
        down = torch.randn(rank, layer.in_features, generator=generator) * 0.2
        up = torch.randn(layer.out_features, rank, generator=generator) * 0.2
        out[name] = Factors(down, up, alpha)
    return out


def block_linears(layers: int) -> list[str]:
    return [f"blocks.{i}.{linear}" for i in range(layers) for linear in BLOCK_LINEARS]


def _diffusers(name: str) -> str:
    if not name.startswith("blocks."):
        return name
    _, index, linear = name.split(".", 2)
    return f"blocks.{index}.{DIFFUSERS_NAMES[linear]}"


def _keys(prefix: str, name: str, down: str, up: str) -> tuple[str, str, str]:
    return f"{prefix}{name}.{down}.weight", f"{prefix}{name}.{up}.weight", f"{prefix}{name}.alpha"


def _tensors(factors: dict[str, Factors], rename: Callable[[str], tuple[str, str, str]]) -> dict[str, Tensor]:
    tensors = {}
    for name, f in factors.items():
        down_key, up_key, alpha_key = rename(name)
        tensors[down_key], tensors[up_key] = f.down.contiguous(), f.up.contiguous()
        if f.alpha is not None:
            tensors[alpha_key] = torch.tensor(f.alpha)
    return tensors


# layout → (file name, the keys of one layer)
LAYOUTS: dict[str, tuple[str, Callable[[str], tuple[str, str, str]]]] = {
    "comfy_down_up": ("comfy.safetensors", lambda n: _keys("diffusion_model.", n, "lora_down", "lora_up")),
    "comfy_a_b": ("kijai.safetensors", lambda n: _keys("diffusion_model.", n, "lora_A", "lora_B")),
    "kohya": ("kohya.safetensors", lambda n: _keys("lora_unet_", n.replace(".", "_"), "lora_down", "lora_up")),
    "diffusers": ("diffusers.safetensors", lambda n: _keys("transformer.", _diffusers(n), "lora_A", "lora_B")),
    "bare": ("bare.bin", lambda n: _keys("", n, "lora_A", "lora_B")),
    "peft": ("peft.pt", lambda n: _keys("base_model.model.", n, "lora_A", "lora_B")),
}


def write_lora(folder: Path, layout: str, factors: dict[str, Factors], extra: dict[str, Tensor] | None = None) -> Path:
    """The factors in `layout` (PEFT files carry no α: give factors with alpha None for it)."""
    file_name, rename = LAYOUTS[layout]
    tensors = {**_tensors(factors, rename), **(extra or {})}
    path = folder / file_name
    folder.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(tensors, path)
    elif layout == "peft":
        torch.save({"generator_lora": tensors}, path)
    else:
        torch.save(tensors, path)
    return path
