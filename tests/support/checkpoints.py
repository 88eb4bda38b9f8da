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
    Wan2_1-VACE_module_*_bf16.safetensors  {"vace_patch_embedding.*", "vace_blocks.*": bf16}  (Kijai's VACE module,
                                           only with `vace=True`; `write_vace_module` also writes the fp8_e4m3fn one)

`write_full_vace_checkpoint` writes the `Wan-AI/Wan2.1-VACE-*` layout (T2V keys + vace_* keys in one flat
`diffusion_pytorch_model.safetensors`, plus config.json), in Wan's names or diffusers'.

The dtypes of the distilled `.pt` files are not published anywhere we could read; bf16 (the training param_dtype,
models.md §1.1) is assumed. The loader converts any float dtype, so this choice changes nothing it checks.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from serve.models.autoencoder import build_model
from serve.models.dit import DIT_CONFIGS, DiTConfig, WanDiT
from serve.models.text_encoder import UMT5_PRESETS, UMT5Encoder
from serve.models.vace import VaceWanDiT
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
    vace: dict[str, Tensor] = field(default_factory=dict)  # vace_* key → tensor as written


def write_pipeline_files(pipeline_id: str, models_dir: Path, seed: int = 0, *, vace: bool = False) -> PipelineFiles:
    """Writes every file the registry declares for `pipeline_id` at its `ModelFile.local_path` under models_dir
    (with `vace`, its VACE module too)."""
    written = PipelineFiles()
    spec = get_spec(pipeline_id)
    for model_file in spec.with_vace_files().files if vace else spec.files:
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
    if name.startswith("Wan2_1-VACE_module_"):
        return _write_vace_module_file
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


def tiny_dit_state(seed: int, config: DiTConfig = DIT_CONFIGS["tiny"]) -> dict[str, Tensor]:
    """A tiny DiT's state dict (Wan key names) from a seeded init, in the checkpoint dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanDiT(config)
    return {name: tensor.detach().to(DIT_DTYPE).clone() for name, tensor in model.state_dict().items()}


def write_generator_checkpoint(path: Path, state: dict[str, Tensor]) -> None:
    """`state` (Wan names) as a Self-Forcing-style training checkpoint: `{"generator": {"model.<key>": ...}}`."""
    torch.save({"generator": _wrapped(state)}, path)


def record_tensor_reads(monkeypatch: Any) -> dict[Path, list[str]]:
    """From now on in this process, the raw names of the checkpoint tensors `load_checkpoint` reads the data of,
    per file (each shard its own). It watches the real reader and changes nothing: a LazyTensor's `load` is the
    only way to a tensor's bytes (safetensors' `get_tensor`; a memory-mapped pickle's storage, which is touched only
    once `load` has handed it over for conversion)."""
    from serve.models import checkpoint

    reads: dict[Path, list[str]] = {}
    real = checkpoint.read_checkpoint

    def watched(path: Path | str, *, prefer: str | None = None) -> dict[str, checkpoint.LazyTensor]:
        def recorded(name: str, lazy: checkpoint.LazyTensor) -> Callable[[], Tensor]:
            def load() -> Tensor:
                reads.setdefault(lazy.file, []).append(name)
                return lazy.load()

            return load

        tensors = real(path, prefer=prefer)
        return {name: dataclasses.replace(lazy, load=recorded(name, lazy)) for name, lazy in tensors.items()}

    monkeypatch.setattr(checkpoint, "read_checkpoint", watched)
    return reads


def _wrapped(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # Self-Forcing-style generators are `WanDiffusionWrapper`s: their Wan model is the `model` attribute.
    return {f"model.{name}": tensor for name, tensor in state.items()}


def _write_generator_only(path: Path, seed: int, written: PipelineFiles) -> None:
    written.dit = tiny_dit_state(seed)
    write_generator_checkpoint(path, written.dit)


def _write_generator_and_ema(path: Path, seed: int, written: PipelineFiles) -> None:
    # Different weights in the two entries, so a test can tell which one the pipeline took.
    states = {"generator": tiny_dit_state(seed), "generator_ema": tiny_dit_state(seed + 1)}
    written.dit = states[USED_WRAPPER.get(path.name, "generator")]
    torch.save({key: _wrapped(state) for key, state in states.items()}, path)


def _write_lora(path: Path, seed: int, written: PipelineFiles) -> None:
    written.lora = write_lora(path, seed)


def write_lora(path: Path, seed: int, config: DiTConfig = DIT_CONFIGS["tiny"]) -> dict[str, tuple[Tensor, Tensor]]:
    """A PEFT LoRA in LongLive's layout for every block of `config`; returns Wan weight key → (A, B)."""
    generator = torch.Generator().manual_seed(seed + 100)
    tensors, written = {}, {}
    shapes = {"ffn.0": (config.ffn_dim, config.dim), "ffn.2": (config.dim, config.ffn_dim)}  # (out, in)
    for block in range(config.num_layers):
        for linear in LORA_LINEARS:
            out_dim, in_dim = shapes.get(linear, (config.dim, config.dim))  # attention q, k, v, o: d → d
            a = (torch.randn(LORA_RANK, in_dim, generator=generator) * 0.05).to(DIT_DTYPE)
            b = (torch.randn(out_dim, LORA_RANK, generator=generator) * 0.05).to(DIT_DTYPE)
            key = f"blocks.{block}.{linear}"
            tensors[f"base_model.model.{key}.lora_A.weight"] = a
            tensors[f"base_model.model.{key}.lora_B.weight"] = b
            written[f"{key}.weight"] = (a, b)
    torch.save({"generator_lora": tensors}, path)
    return written


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


# -- VACE ---------------------------------------------------------------------------------------------------------


def tiny_vace_state(seed: int, config: DiTConfig | None = None, dtype: torch.dtype = DIT_DTYPE) -> dict[str, Tensor]:
    """The vace_* tensors of a VACE branch for a base of `config` (default tiny), seeded, in `dtype`."""
    config = config or DIT_CONFIGS["tiny"]
    with torch.device("meta"):
        base = WanDiT(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 400)
        model = VaceWanDiT.around(base, device="cpu")
        for tensor in model.vace_branch().parameters():  # away from the default init, so every tensor matters
            tensor.data.normal_(0, 0.1)
    state = model.vace_branch().state_dict()
    return {name: tensor.detach().float().to(dtype).clone() for name, tensor in state.items()}


def write_vace_module(path: Path, seed: int = 0, *, dtype: torch.dtype = DIT_DTYPE,
                      config: DiTConfig | None = None) -> dict[str, Tensor]:  # fmt: skip
    """Kijai's `Wan2_1-VACE_module_*` layout: only the vace_* keys, flat safetensors, bf16 or float8_e4m3fn."""
    state = tiny_vace_state(seed, config, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path))
    return state


def _write_vace_module_file(path: Path, seed: int, written: PipelineFiles) -> None:
    written.vace = write_vace_module(path, seed)


# diffusers' names for the Wan keys (convert_wan_to_diffusers.py), used to write diffusers-layout files.
WAN_TO_DIFFUSERS = (
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("self_attn.norm_", "attn1.norm_"),
    ("cross_attn.norm_", "attn2.norm_"),
    ("self_attn.", "attn1.to_"),
    ("cross_attn.", "attn2.to_"),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("norm3.", "norm2."),
    ("before_proj.", "proj_in."),
    ("after_proj.", "proj_out."),
)


def wan_to_diffusers(name: str) -> str:
    if name == "head.modulation":
        return "scale_shift_table"
    if name.endswith(".modulation"):
        return name[: -len("modulation")] + "scale_shift_table"
    for old, new in WAN_TO_DIFFUSERS:
        if name.startswith(old) or f".{old}" in name:
            return name.replace(old, new, 1)
    return name


def write_full_vace_checkpoint(folder: Path, seed: int = 0, *, diffusers: bool = False) -> dict[str, Tensor]:
    """`Wan-AI/Wan2.1-VACE-*` at the tiny size: T2V keys + vace_* keys in one file; returns them by Wan name."""
    state = {**tiny_dit_state(seed), **tiny_vace_state(seed)}
    folder.mkdir(parents=True, exist_ok=True)
    names = {name: wan_to_diffusers(name) if diffusers else name for name in state}
    save_file({names[n]: t.contiguous() for n, t in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    model_type = {"_class_name": "WanVACETransformer3DModel"} if diffusers else {"model_type": "vace"}
    (folder / "config.json").write_text(json.dumps({**model_type, "vace_in_dim": 96}))
    return state
