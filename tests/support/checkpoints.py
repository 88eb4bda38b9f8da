"""Synthetic weight files in each pipeline's published layout: real file names, wrappers, key names and dtypes, at
the tiny sizes (DIT_CONFIGS / UMT5_PRESETS / WAN_VAE_CONFIGS `tiny`), so a server loads them as it would the real
ones (models.md §1.3, §3 summary table, §4, §5).

Layouts written, by the file name the registry declares:

    wan_causal_dmd_v2v/model.pt            {"generator": {"model.<wan key>": bf16}}
    models/longlive_base.pt, base.pt       {"generator": ..., "generator_ema": ...}  (LongLive, MemFlow use generator)
    rewardforcing.pt                       {"generator": ..., "generator_ema": ...}  (Reward Forcing uses the EMA)
    models/lora.pt, lora.pt                {"generator_lora": {"base_model.model.blocks.{i}.<linear>.lora_A.weight",
                                                               "...lora_B.weight"}}  (PEFT, 10 Linears per block)
    krea-realtime-video-14b.safetensors    {"model.<wan key>": bf16}
    Wan2.1_VAE.pth                         {"<vae key>": fp32}                        (flat, as published)
    models_t5_umt5-xxl-enc-bf16.pth        {"<umt5 key>": bf16}                       (flat, as published)
    google/umt5-xxl/spiece.model           a small SentencePiece model with <pad>=0, </s>=1

The dtypes of the distilled `.pt` files are not published anywhere we could read; bf16 (the training param_dtype,
models.md §1.1) is assumed. The loader converts any float dtype, so this choice changes nothing it checks.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from serve.models.autoencoder import build_model
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.models.text_encoder import UMT5_PRESETS, UMT5Encoder
from serve.pipelines.registry import get_spec
from serve.pipelines.weights import tiny_tokenizer_model

DIT_DTYPE = torch.bfloat16  # distilled checkpoints: assumed (module docstring)
LORA_RANK = 4  # the published LoRAs are rank 256; the tiny model is 64 wide
LORA_LINEARS = (
    *(f"{attention}.{proj}" for attention in ("self_attn", "cross_attn") for proj in ("q", "k", "v", "o")),
    "ffn.0",
    "ffn.2",
)
# The sub-dict each published training checkpoint's pipeline runs (models.md §3: Reward Forcing loads with --use_ema).
USED_WRAPPER = {"rewardforcing.pt": "generator_ema"}


@dataclass
class PipelineFiles:
    """What was written, and the weights a correct loader must end up with."""

    paths: dict[str, Path] = field(default_factory=dict)  # registry file path → local path
    dit: dict[str, Tensor] = field(default_factory=dict)  # Wan key → the tensor the pipeline must run (pre-LoRA)
    lora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # Wan weight key → (A [r, in], B [out, r])


def write_pipeline_files(pipeline_id: str, models_dir: Path, seed: int = 0) -> PipelineFiles:
    """Writes every file the registry declares for `pipeline_id` at its `ModelFile.local_path` under models_dir."""
    written = PipelineFiles()
    for model_file in get_spec(pipeline_id).files:
        path = model_file.local_path(models_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _writer_for(model_file.path)
        writer(path, seed, written)
        written.paths[model_file.path] = path
    return written


def _writer_for(file_path: str) -> Callable[[Path, int, PipelineFiles], None]:
    name = file_path.rsplit("/", 1)[-1]
    if file_path == "wan_causal_dmd_v2v/model.pt":
        return _write_generator_only
    if name in ("longlive_base.pt", "base.pt", "rewardforcing.pt"):
        return _write_generator_and_ema
    if name == "lora.pt":
        return _write_lora
    if name.endswith(".safetensors"):
        return _write_flat_safetensors
    writers = {
        "Wan2.1_VAE.pth": _write_vae,
        "models_t5_umt5-xxl-enc-bf16.pth": _write_text_encoder,
        "spiece.model": _write_tokenizer,
    }
    if name not in writers:
        raise ValueError(f"no synthetic layout for {file_path!r}: add one to tests/support/checkpoints.py")
    return writers[name]


def tiny_dit_state(seed: int) -> dict[str, Tensor]:
    """A tiny DiT's state dict (Wan key names) from a seeded init, in the checkpoint dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanDiT(DIT_CONFIGS["tiny"])
    return {name: tensor.detach().to(DIT_DTYPE).clone() for name, tensor in model.state_dict().items()}


def _wrapped(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # Self-Forcing-style generators are `WanDiffusionWrapper`s: their Wan model is the `model` attribute.
    return {f"model.{name}": tensor for name, tensor in state.items()}


def _write_generator_only(path: Path, seed: int, written: PipelineFiles) -> None:
    written.dit = tiny_dit_state(seed)
    torch.save({"generator": _wrapped(written.dit)}, path)


def _write_generator_and_ema(path: Path, seed: int, written: PipelineFiles) -> None:
    # Different weights in the two entries, so a test can tell which one the pipeline took.
    states = {"generator": tiny_dit_state(seed), "generator_ema": tiny_dit_state(seed + 1)}
    written.dit = states[USED_WRAPPER.get(path.name, "generator")]
    torch.save({key: _wrapped(state) for key, state in states.items()}, path)


def _write_lora(path: Path, seed: int, written: PipelineFiles) -> None:
    config = DIT_CONFIGS["tiny"]
    generator = torch.Generator().manual_seed(seed + 100)
    tensors = {}
    shapes = {"ffn.0": (config.ffn_dim, config.dim), "ffn.2": (config.dim, config.ffn_dim)}  # (out, in)
    for block in range(config.num_layers):
        for linear in LORA_LINEARS:
            out_dim, in_dim = shapes.get(linear, (config.dim, config.dim))  # attention q, k, v, o: d → d
            a = (torch.randn(LORA_RANK, in_dim, generator=generator) * 0.05).to(DIT_DTYPE)
            b = (torch.randn(out_dim, LORA_RANK, generator=generator) * 0.05).to(DIT_DTYPE)
            key = f"blocks.{block}.{linear}"
            tensors[f"base_model.model.{key}.lora_A.weight"] = a
            tensors[f"base_model.model.{key}.lora_B.weight"] = b
            written.lora[f"{key}.weight"] = (a, b)
    torch.save({"generator_lora": tensors}, path)


def _write_flat_safetensors(path: Path, seed: int, written: PipelineFiles) -> None:
    written.dit = tiny_dit_state(seed)
    save_file({name: tensor.contiguous() for name, tensor in _wrapped(written.dit).items()}, str(path))


def _write_vae(path: Path, seed: int, written: PipelineFiles) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 200)
        model = build_model("wan", "tiny")
    torch.save({name: tensor.detach().float().clone() for name, tensor in model.state_dict().items()}, path)


def _write_text_encoder(path: Path, seed: int, written: PipelineFiles) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 300)
        model = UMT5Encoder(UMT5_PRESETS["tiny"])
    torch.save({name: tensor.detach().to(torch.bfloat16).clone() for name, tensor in model.state_dict().items()}, path)


def _write_tokenizer(path: Path, seed: int, written: PipelineFiles) -> None:
    shutil.copyfile(tiny_tokenizer_model(), path)
