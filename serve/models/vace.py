"""The VACE branch of the Wan DiT (Wan's `VaceWanModel`, vace.md §1), with Wan's parameter names, so the full
`Wan2.1-VACE-*` checkpoints, Kijai's VACE-module files and diffusers' names load strictly.

Structure: `vace_patch_embedding` (Conv3d 96 → d, kernel = stride = (1, 2, 2)) embeds the VACE context; VACE block 0
adds `before_proj(c)` to the main path's patch-embedded tokens x; every VACE block is a full Wan block (self- and
cross-attention, FFN, modulation by the same e0) followed by `after_proj`, whose output is the hint for the main
block at `vace_layers[i]`: after that block, x ← x + hint · vace_context_scale.

Streaming semantics (vace.md §3, Scope's): the context of a chunk is a fixed-shape step input [B, 96, F, h, w], one
context frame per latent frame of the chunk. The VACE blocks attend within the chunk only (bidirectional, local RoPE
frame positions 0..F−1, no KV cache) and are recomputed at every denoising step (x changes). Only the denoising
passes run them: the clean pass, LongLive's re-cache and Krea's recompute run the base step, so VACE never enters
the KV cache. The scale is a device scalar, so changing it recompiles nothing; at 0 the blocks still run (as Wan's).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from serve.models.checkpoint import (
    CheckpointError,
    LazyTensor,
    canonical_names,
    check_keys,
    load_checkpoint,
    read_checkpoint,
)
from serve.models.dit import (
    DiTBlock,
    DiTConfig,
    HintsFn,
    RotaryEmbedding,
    WanDiT,
    keep_in_fp32,
    linear,
)

log = logging.getLogger(__name__)

VACE_IN_DIM = 96  # 16 inactive latent + 16 reactive latent + 64 mask (8×8 pixel-unshuffle) channels
VACE_PREFIXES = ("vace_patch_embedding.", "vace_blocks.")
BASE_PARTS = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head", "rope")


def vace_layers(config: DiTConfig) -> tuple[int, ...]:
    """The main layers that receive a hint: every 5th for the 14B (dim 5120, 8 of 40), else every 2nd (15 of 30 for
    the 1.3B; the tiny config follows the same rule). Kijai's loader infers it the same way from the base's dim."""
    step = 5 if config.dim == 5120 else 2
    return tuple(range(0, config.num_layers, step))


class VaceBlock(DiTBlock):
    """A Wan block plus `after_proj` (every VACE block) and `before_proj` (block 0 only)."""

    def __init__(self, config: DiTConfig, first: bool) -> None:
        super().__init__(config)
        if first:
            self.before_proj = nn.Linear(config.dim, config.dim)
        self.after_proj = nn.Linear(config.dim, config.dim)


class VaceWanDiT(WanDiT):
    """A WanDiT with the VACE branch. `step` is the base step, unchanged; `step_vace` adds the hints."""

    def __init__(self, config: DiTConfig, layers: tuple[int, ...] | None = None) -> None:
        super().__init__(config)
        self.add_vace_branch(layers)

    def add_vace_branch(self, layers: tuple[int, ...] | None = None) -> None:
        config = self.config
        self.vace_layers = layers if layers is not None else vace_layers(config)
        patch = config.patch_size
        self.vace_patch_embedding = nn.Conv3d(VACE_IN_DIM, config.dim, kernel_size=patch, stride=patch)
        self.vace_blocks = nn.ModuleList(VaceBlock(config, first=i == 0) for i in range(len(self.vace_layers)))

    @classmethod
    def around(cls, base: WanDiT, layers: tuple[int, ...] | None = None, *, device: str = "meta") -> VaceWanDiT:
        """A VaceWanDiT that shares `base`'s modules (no copy); its VACE branch is built on `device` (meta: for
        `load_vace_branch` to fill)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = base.config
        for name in BASE_PARTS:
            setattr(model, name, getattr(base, name))
        with torch.device(device):
            model.add_vace_branch(layers)
        return model.train(base.training)

    def base_part(self) -> nn.Module:
        """The base model's modules as a module of their own (same objects): its state dict is the T2V model's, so
        an engine of the base step built from a VACE load and one from a plain load have the same weight hash."""
        base = nn.Module()
        for name in BASE_PARTS:
            setattr(base, name, getattr(self, name))
        return base

    def vace_branch(self) -> nn.Module:
        """The VACE parameters as a module of their own (same objects): its state dict is a VACE-module file's."""
        branch = nn.Module()
        branch.vace_patch_embedding = self.vace_patch_embedding
        branch.vace_blocks = self.vace_blocks
        return branch

    # -- the hints -----------------------------------------------------------------------------------------------

    def vace_text_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention K/V of every VACE block for a prompt: each [vace blocks, B, text_len, heads, hd]."""
        text = self.embed_text(context)
        keys, values = zip(*(block.cross_attn.project_kv(text) for block in self.vace_blocks), strict=True)
        return torch.stack(keys), torch.stack(values)

    def vace_hints(self, vace_context: Tensor, x: Tensor, e0: Tensor, grid: tuple[int, int, int],
                   vace_text_kv: tuple[Tensor, Tensor], scale: Tensor) -> dict[int, Tensor]:  # fmt: skip
        """{main layer: scale · hint} for one chunk. vace_context [B, 96, F, H, W] (latent resolution); x the main
        path's patch-embedded tokens [B, F·Lf, d]; e0 [B, F, 6, d]; attention within the chunk at positions 0..F−1."""
        c = self.vace_patch_embedding(vace_context.to(self.vace_patch_embedding.weight.dtype))
        if tuple(c.shape[2:]) != tuple(grid):
            raise ValueError(f"vace_context {tuple(vace_context.shape)} does not match the chunk's token grid {grid}")
        c = c.flatten(2).transpose(1, 2).float()  # [B, F·Lf, d], tokens in (f, h, w) order like x
        frames, height, width = grid
        cos, sin = self.rope.tables(torch.arange(frames, device=x.device), height, width)
        hints = {}
        for i, block in enumerate(self.vace_blocks):
            if i == 0:
                c = linear(block.before_proj, c).float() + x

            def self_attention(h: Tensor, block: VaceBlock = block) -> Tensor:
                attention = block.self_attn
                q = attention.project_q(h, (cos, sin))
                k, v = attention.project_kv(h, (cos, sin))
                return attention.attend(q, k, v, None)

            c = block(c, e0, frames, self_attention, (vace_text_kv[0][i], vace_text_kv[1][i]))
            hints[self.vace_layers[i]] = linear(block.after_proj, c).float() * scale.float()
        return hints

    def step_vace(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_kv: tuple[Tensor, Tensor],
        cache_k: Tensor,
        cache_v: Tensor,
        write_index: Tensor,
        key_bias: Tensor,
        frame_positions: Tensor,
        vace_context: Tensor,
        vace_text_kv: tuple[Tensor, Tensor],
        vace_scale: Tensor,
        key_rope: tuple[Tensor, Tensor] | None = None,
        sinusoid_dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """`step` with the chunk's VACE context [B, 96, F, H, W], the VACE blocks' text K/V (`vace_text_kv()`) and
        the context scale (a 0-d device tensor). The main path and its cache writes are exactly `step`'s."""

        def hints(x: Tensor, e0: Tensor, grid: tuple[int, int, int]) -> dict[int, Tensor]:
            return self.vace_hints(vace_context, x, e0, grid, vace_text_kv, vace_scale)

        return self._cached_step(
            latents, timestep, text_kv, cache_k, cache_v, write_index, key_bias, frame_positions, key_rope,
            sinusoid_dtype, hints=hints,
        )  # fmt: skip

    def forward_full_vace(self, latents: Tensor, timestep: Tensor, context: Tensor, mask: Tensor | None,
                          vace_context: Tensor, scale: float, chunk_frames: int) -> Tensor:  # fmt: skip
        """The oracle of streaming with VACE: every frame at once under `mask`, with each chunk's hints computed
        from that chunk alone (its own context frames, tokens and local positions), as `step_vace` defines them."""
        text_kv = self.vace_text_kv(context)
        scale_t = torch.tensor(scale, device=latents.device)

        def hints(x: Tensor, e0: Tensor, grid: tuple[int, int, int]) -> dict[int, Tensor]:
            frames, height, width = grid
            lf = height * width
            per_chunk = []
            for start in range(0, frames, chunk_frames):
                tokens = slice(start * lf, (start + chunk_frames) * lf)
                chunk_grid = (chunk_frames, height, width)
                context_chunk = vace_context[:, :, start : start + chunk_frames]
                e0_chunk = e0[:, start : start + chunk_frames]
                per_chunk.append(self.vace_hints(context_chunk, x[:, tokens], e0_chunk, chunk_grid, text_kv, scale_t))
            return {layer: torch.cat([h[layer] for h in per_chunk], dim=1) for layer in per_chunk[0]}

        full: HintsFn = hints
        return self.forward_full(latents, timestep, context, mask, hints=full)


# -- loading ------------------------------------------------------------------------------------------------------


def is_vace_name(name: str) -> bool:
    return name.startswith(VACE_PREFIXES)


def vace_file_kind(names: Iterable[str]) -> str | None:
    """`module` (a VACE-module file: Kijai's rule, `vace_blocks.0.after_proj.weight` without `patch_embedding.weight`),
    `full` (a whole VACE checkpoint), or None (no VACE branch), from canonical tensor names."""
    names = set(names)
    if "vace_blocks.0.after_proj.weight" not in names:
        return None
    return "full" if "patch_embedding.weight" in names else "module"


def vace_tensors(model: VaceWanDiT, path: Path | str) -> dict[str, LazyTensor]:
    """The `vace_*` tensors of a VACE-module file (only `vace_*` keys: Kijai's / Scope's, bf16 or fp8) or of a full
    `Wan2.1-VACE-*` checkpoint (its base keys are ignored), checked strictly against `model`'s branch without reading
    any data: every key present and of the model's shape. A module of the other model size is refused naming the
    file and both shapes (vace.md §1: a VACE module never fits a base of the other size)."""
    tensors = read_checkpoint(path)
    names = canonical_names(tensors)
    found = {names[raw]: lazy for raw, lazy in tensors.items() if is_vace_name(names[raw])}
    if not found:
        raise CheckpointError(f"{path}: no vace_* tensors: not a VACE module or a VACE checkpoint")
    expected = model.vace_branch().state_dict()
    embedding, ours = found.get("vace_patch_embedding.weight"), expected["vace_patch_embedding.weight"]
    if embedding is not None and tuple(embedding.shape) != tuple(ours.shape):
        blocks = len({n.split(".")[1] for n in found if n.startswith("vace_blocks.")})
        raise CheckpointError(
            f"{path}: a VACE module of another model size: vace_patch_embedding.weight {list(embedding.shape)} "
            f"({blocks} VACE blocks) vs this model's {list(ours.shape)} ({len(model.vace_blocks)} blocks, dim "
            f"{model.config.dim}); a VACE module only fits a base of its own size"
        )
    check_keys(expected, found, path)
    log.info("vace file=%s kind=%s tensors=%d", path, vace_file_kind(names.values()), len(found))
    return found


def check_vace_file(path: Path | str, config: DiTConfig) -> None:
    """`vace_tensors`' checks against a base of `config`, from the header alone (before anything is loaded)."""
    with torch.device("meta"):
        vace_tensors(VaceWanDiT(config), path)


def load_vace_branch(model: VaceWanDiT, path: Path | str, *, dtype: torch.dtype, device: torch.device | str) -> None:
    """Fill the VACE branch from `path`, checked as `vace_tensors` says; fp8 sources are widened to `dtype`."""
    vace_tensors(model, path)
    load_checkpoint(model.vace_branch(), path, dtype=dtype, device=device, keep_fp32=keep_in_fp32, select=is_vace_name)


def load_vace_dit(config: DiTConfig, path: Path | str, *, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cpu") -> VaceWanDiT:  # fmt: skip
    """A full `Wan2.1-VACE-*` checkpoint (T2V keys + vace_* keys, Wan or diffusers names), strictly."""
    with torch.device("meta"):
        model = VaceWanDiT(config)
    load_checkpoint(model, path, dtype=dtype, device=device, keep_fp32=keep_in_fp32)
    model.rope = RotaryEmbedding(config.head_dim).to(device)  # non-persistent: rebuilt, never in checkpoints
    return model.eval()


def attach_vace(base: WanDiT, path: Path | str | None, *, dtype: torch.dtype, device: torch.device | str,
                seed: int = 0) -> VaceWanDiT:  # fmt: skip
    """`base` (loaded) with a VACE branch: from `path`, or seeded random weights when `path` is None (the
    `random_weights` loads; the base's weights, and so a VACE-off stream, stay exactly those of a non-VACE load)."""
    if path is not None:
        model = VaceWanDiT.around(base)
        load_vace_branch(model, path, dtype=dtype, device=device)
        return model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VaceWanDiT.around(base, device="cpu")
    for name, tensor in model.vace_branch().state_dict(keep_vars=True).items():
        tensor.data = tensor.data.to(device=device, dtype=torch.float32 if keep_in_fp32(name) else dtype)
    return model.eval()
