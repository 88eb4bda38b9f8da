"""Checkpoint loading: every published layout into our modules, strictly, one tensor at a time.

Layouts (models.md §1.3, §3): safetensors (single, or sharded with `*.safetensors.index.json`), `.pt/.pth` pickles
read with `weights_only=True`; wrapper dicts `generator`, `generator_ema`, `model`, `state_dict` or flat; key
prefixes `model.`, `_fsdp_wrapped_module.`, `model.diffusion_model.`; diffusers names; fp32, bf16 or fp8-e4m3 source
tensors. LoRA deltas (serve/models/lora.py reads their files) are added to the weights as they load.

Memory: the module is built on the meta device, each tensor is read (safetensors reads one tensor; pickles are
memory-mapped), converted to the target dtype and device, and assigned. A 28.6 GB checkpoint therefore needs the
model's size in RAM once, not twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors import safe_open
from torch import Tensor, nn

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("generator", "generator_ema", "model", "state_dict")
PREFIXES = ("model.diffusion_model.", "_fsdp_wrapped_module.", "base_model.model.", "model.")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar for loads above 1 GiB

# diffusers' Wan transformer names → Wan's own (diffusers' conversion script, read in reverse).
DIFFUSERS_RENAMES = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
    (".attn1.to_out.0.", ".self_attn.o."),
    (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."),
    (".attn2.to_", ".cross_attn."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),  # diffusers' norm2 is the cross-attention norm, Wan's norm3
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the offending keys."""


@dataclass(frozen=True)
class LazyTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], Tensor]
    file: Path

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


# -- reading ------------------------------------------------------------------------------------------------------


def checkpoint_files(path: Path) -> list[Path]:
    """The files of a checkpoint: one file, the shards an index names, or what a folder holds."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return checkpoint_files(indexes[0])
        files = sorted(path.glob("*.safetensors")) or sorted([*path.glob("*.pt"), *path.glob("*.pth")])
        if not files:
            raise CheckpointError(f"{path}: no .safetensors, .pt or .pth files in this folder")
        return files
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: not a safetensors index ({exc})") from None
        shards = [path.parent / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(s) for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(f"{path}: shards missing: {', '.join(missing)}")
        return shards
    return [path]


def read_checkpoint(path: Path | str, *, prefer: str | None = None) -> dict[str, LazyTensor]:
    """Every tensor of a checkpoint by its raw name (wrapper removed), without reading the data yet."""
    tensors: dict[str, LazyTensor] = {}
    for file in checkpoint_files(Path(path)):
        tensors.update(_read_file(file, prefer))
    return tensors


def _read_file(file: Path, prefer: str | None) -> dict[str, LazyTensor]:
    if file.suffix == ".safetensors":
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
        out = {}
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
            view = handle.get_slice(name)
            dtype = _SAFETENSORS_DTYPES[view.get_dtype()]
            out[name] = LazyTensor(tuple(view.get_shape()), dtype, lambda n=name: handle.get_tensor(n), file)
        return out
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{file}: not a loadable PyTorch checkpoint ({exc})") from None
    except Exception as exc:
        raise CheckpointError(f"{file}: not a loadable PyTorch checkpoint ({exc})") from None
    state = unwrap(state, file, prefer)
    return {name: LazyTensor(tuple(t.shape), t.dtype, lambda t=t: t, file) for name, t in state.items()}


def unwrap(state: object, file: Path, prefer: str | None = None) -> dict[str, Tensor]:
    """The tensor dict inside a training checkpoint: `prefer` (e.g. `generator_ema`) first, then the usual keys."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    for key in ((prefer,) if prefer else ()) + WRAPPER_KEYS + ("generator_lora",):
        if key in state and isinstance(state[key], dict):
            return unwrap(state[key], file)
    if prefer:
        raise CheckpointError(f"{file}: no {prefer!r} entry; top-level keys: {sorted(state)[:8]}")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{file}: no tensors; top-level keys: {sorted(state)[:8]}")
    return tensors


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# -- naming -------------------------------------------------------------------------------------------------------


def strip_prefixes(name: str, prefixes: tuple[str, ...] = PREFIXES) -> str:
    """`name` without any of `prefixes`, however nested (`model.diffusion_model.model.x` → `x`)."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def diffusers_to_wan(name: str) -> str:
    if name.startswith("vace_blocks."):  # diffusers' WanVACETransformer3DModel: before/after_proj are proj_in/out
        name = name.replace(".proj_in.", ".before_proj.").replace(".proj_out.", ".after_proj.")
    if name == "scale_shift_table":
        return "head.modulation"
    if name.endswith(".scale_shift_table"):
        return name.replace(".scale_shift_table", ".modulation")
    for old, new in DIFFUSERS_RENAMES:
        if old in f".{name}":
            name = f".{name}".replace(old, new, 1)[1:]
    return name


def canonical_names(names: Iterable[str]) -> dict[str, str]:
    """Raw checkpoint name → our parameter name."""
    stripped = {name: strip_prefixes(name) for name in names}
    is_diffusers = any(n.startswith("condition_embedder.") or ".attn1." in n for n in stripped.values())
    return {raw: diffusers_to_wan(n) if is_diffusers else n for raw, n in stripped.items()}


# -- loading ------------------------------------------------------------------------------------------------------


def load_checkpoint(
    module: nn.Module,
    path: Path | str,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    prefer: str | None = None,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    deltas: Mapping[str, Tensor] | None = None,
    progress: bool | None = None,
    select: Callable[[str], bool] | None = None,
) -> None:
    """Load strictly into `module` (ideally built on the meta device), converting each tensor as it is read.

    `deltas`: fp32 tensors added to the named weights as they load (a merged LoRA, `lora.merged_weights`).
    `select`: only the tensors whose (canonical) name it accepts are read, e.g. the `vace_*` part of a full VACE
    checkpoint; strictness then applies to those. Raises CheckpointError naming the file and the missing,
    unexpected or mis-shaped keys.
    """
    tensors = read_checkpoint(path, prefer=prefer)
    names = canonical_names(tensors)
    by_name = {names[raw]: lazy for raw, lazy in tensors.items() if select is None or select(names[raw])}
    expected = module.state_dict()
    check_keys(expected, by_name, path)
    deltas = deltas or {}

    total = sum(lazy.nbytes for lazy in by_name.values())
    show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
    loaded: dict[str, Tensor] = {}
    with Progress(disable=not show, transient=True) as bar:
        task = bar.add_task(f"loading {Path(path).name}", total=total)
        for name, lazy in by_name.items():
            tensor = lazy.load()
            target = torch.float32 if keep_fp32(name) else dtype
            if tensor.dtype in FP8_DTYPES or name in deltas:
                tensor = tensor.float()
            if name in deltas:
                tensor = tensor + deltas[name]
            loaded[name] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
            bar.advance(task, lazy.nbytes)
    module.load_state_dict(loaded, strict=True, assign=True)
    log.info("loaded %s tensors=%d bytes=%d lora_deltas=%d", path, len(loaded), total, len(deltas))


def read_state_dict(path: Path | str, *, prefer: str | None = None) -> dict[str, Tensor]:
    """Every tensor, read now (small models; the VAE's TAE remap needs the values)."""
    return {name: lazy.load() for name, lazy in read_checkpoint(path, prefer=prefer).items()}


def check_keys(expected: Mapping[str, Any], found: Mapping[str, Any], path: Path | str) -> None:
    """Both mappings give objects with `.shape`; raises CheckpointError naming every mismatch and the file."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{name}: checkpoint {list(found[name].shape)} vs model {list(expected[name].shape)}"
        for name in sorted(set(expected) & set(found))
        if tuple(found[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
    if misshaped:
        problems.append(f"shape mismatch ({len(misshaped)}): {'; '.join(misshaped[:10])}")
    if problems:
        raise CheckpointError(f"{path}: does not match the model: " + " | ".join(problems))
