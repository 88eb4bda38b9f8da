"""Which preset a checkpoint holds, from its tensor names and shapes alone (no tensor data is read).

A published file does not say which config it was trained with, and a hard-coded name would make every file of
another size (the 14B StreamDiffusionV2 checkpoint, the tiny test files) fail late, inside a strict load. So the
shapes are read from the header (safetensors metadata; pickles memory-mapped, see checkpoint.py) and compared with
the state dicts of the candidate modules built on the meta device. Exactly one candidate must match.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from serve.models.checkpoint import CheckpointError, canonical_names, read_checkpoint

Shapes = dict[str, tuple[int, ...]]


def checkpoint_shapes(path: Path | str, *, prefer: str | None = None) -> Shapes:
    """Our parameter name → shape for every tensor of a checkpoint (wrapper and prefixes removed)."""
    tensors = read_checkpoint(path, prefer=prefer)
    names = canonical_names(tensors)
    return {names[raw]: lazy.shape for raw, lazy in tensors.items()}


@functools.cache
def module_shapes(build: Callable[[], nn.Module]) -> Shapes:
    """The state-dict shapes of a module, built on the meta device (no memory even for the 14B DiT).

    Cached per builder: building the 1.3B and 14B DiTs, even on meta, takes about 2 s of CPU (parameter init runs
    op by op through the device mode), which a process should pay once, not at every load.
    """
    with torch.device("meta"):
        module = build()
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def detect_preset(
    path: Path | str, candidates: Mapping[str, Callable[[], nn.Module]], *, what: str, prefer: str | None = None
) -> str:
    """The name of the one candidate whose state dict has exactly the checkpoint's names and shapes.

    Raises CheckpointError naming the file, a few of its shapes and, per candidate, the first difference.
    """
    found = checkpoint_shapes(path, prefer=prefer)
    differences = {}
    for name, build in candidates.items():
        difference = describe_difference(module_shapes(build), found)
        if difference is None:
            return name
        differences[name] = difference
    sample = "; ".join(f"{k} {list(v)}" for k, v in list(found.items())[:4])  # file order: usually the stem first
    per_candidate = " | ".join(f"{name}: {diff}" for name, diff in differences.items())
    raise CheckpointError(
        f"{path}: the {what}'s tensor shapes match none of the known configs ({', '.join(candidates)}); "
        f"the file has {len(found)} tensors ({sample}; ...). Differences: {per_candidate}"
    )


def describe_difference(expected: Shapes, found: Shapes) -> str | None:
    """A short account of how `found` differs from `expected` (first key of each kind), or None if equal."""
    parts = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing:
        parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if misshaped:
        key = misshaped[0]
        parts.append(
            f"{len(misshaped)} shapes differ (e.g. {key}: file {list(found[key])} vs config {list(expected[key])})"
        )
    return ", ".join(parts) or None
