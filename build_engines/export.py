"""Export of the model steps to ONNX with static shapes, caches as explicit inputs and outputs.

An exported step takes the caches as inputs and returns the updated caches as outputs; the runtime binds each
output to the same device buffer as its input (TensorRT's aliasing, or an explicit copy for onnxruntime), so the
graph needs no in-place mutation. The eager module is the oracle: tests run the exported graph in onnxruntime over
several chunks, feeding the caches back, and compare with eager.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from serve.models.autoencoder import ChunkStep
from serve.models.dit import WanDiT
from serve.models.vace import VaceWanDiT

DIT_STEP_INPUTS = (
    "latents", "timestep", "text_k", "text_v", "cache_k", "cache_v", "write_index", "key_bias", "frame_positions",
)  # fmt: skip
DIT_STEP_OUTPUTS = ("flow", "cache_k_out", "cache_v_out")


class DiTStepGraph(nn.Module):
    """`WanDiT.step` as a pure function: (inputs…) → (flow, cache_k', cache_v')."""

    def __init__(self, model: WanDiT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_k: Tensor,
        text_v: Tensor,
        cache_k: Tensor,
        cache_v: Tensor,
        write_index: Tensor,
        key_bias: Tensor,
        frame_positions: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # The step writes its chunk's K/V in place; on copies, the writes become outputs of the graph.
        cache_k, cache_v = cache_k.clone(), cache_v.clone()
        # TensorRT has no float64 arithmetic: the graph's time embedding is computed in float32.
        flow = self.model.step(
            latents, timestep, (text_k, text_v), cache_k, cache_v, write_index, key_bias, frame_positions,
            sinusoid_dtype=torch.float32,
        )  # fmt: skip
        return flow, cache_k, cache_v


VACE_STEP_INPUTS = (*DIT_STEP_INPUTS, "vace_context", "vace_text_k", "vace_text_v", "vace_scale")


class VaceStepGraph(nn.Module):
    """`VaceWanDiT.step_vace` as a pure function: the base step's inputs plus the chunk's VACE context, the VACE
    blocks' text K/V and the context scale (an input, so a new scale needs no new engine) → (flow, cache_k',
    cache_v')."""

    def __init__(self, model: VaceWanDiT) -> None:
        super().__init__()
        self.model = model

    def forward(self, latents: Tensor, timestep: Tensor, text_k: Tensor, text_v: Tensor, cache_k: Tensor,
                cache_v: Tensor, write_index: Tensor, key_bias: Tensor, frame_positions: Tensor,
                vace_context: Tensor, vace_text_k: Tensor, vace_text_v: Tensor,
                vace_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        cache_k, cache_v = cache_k.clone(), cache_v.clone()
        flow = self.model.step_vace(
            latents, timestep, (text_k, text_v), cache_k, cache_v, write_index, key_bias, frame_positions,
            vace_context, (vace_text_k, vace_text_v), vace_scale, sinusoid_dtype=torch.float32,
        )  # fmt: skip
        return flow, cache_k, cache_v


def export_onnx(module: nn.Module, args: tuple[Tensor, ...], path: Path, input_names, output_names) -> Path:
    """torch.export → ONNX (opset chosen by the exporter), static shapes from `args`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module.eval(), args, str(path), dynamo=True, input_names=list(input_names),
            output_names=list(output_names), verbose=False,
        )  # fmt: skip
    return path


def export_dit_step(model: WanDiT, example_args: tuple[Tensor, ...], path: Path) -> Path:
    return export_onnx(DiTStepGraph(model), example_args, path, DIT_STEP_INPUTS, DIT_STEP_OUTPUTS)


def export_vace_step(model: VaceWanDiT, example_args: tuple[Tensor, ...], path: Path) -> Path:
    return export_onnx(VaceStepGraph(model), example_args, path, VACE_STEP_INPUTS, DIT_STEP_OUTPUTS)


def vae_step_names(caches: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Tensor names of a VAE chunk step with `caches` cache tensors: (x, cache_0, …) → (y, cache_0_out, …)."""
    inputs = ("x", *(f"cache_{i}" for i in range(caches)))
    outputs = ("y", *(f"cache_{i}_out" for i in range(caches)))
    return inputs, outputs


def export_vae_step(model: nn.Module, direction: str, example_args: tuple[Tensor, ...], path: Path) -> Path:
    inputs, outputs = vae_step_names(len(example_args) - 1)
    return export_onnx(ChunkStep(model, direction), example_args, path, inputs, outputs)  # type: ignore[arg-type]
