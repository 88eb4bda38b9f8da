"""The VRAM plan of a pipeline: what a load will hold on the GPU, measured on the meta device before anything is
allocated, and the check that refuses a load that cannot fit.

Parts (bytes): weights by model and dtype (exact, from the built modules), the self-attention KV cache and the text
K/V (exact buffer sizes), the stream state the loop keeps between chunks (VAE caches, the policy's latents: what is
still alive after a steady chunk), and the peak of activations during a steady chunk above that state. The last
two come from a dry run of the real loop (serve/pipelines/dry_run.py) under `LiveBytes`, which counts what the ops
allocate; the CUDA caching allocator rounds blocks up and fragments, so `FIT_MARGIN` is kept free on top.

Where the umT5-XXL encoder lives (11.4 GB in bf16) is the plan's one choice, `text_encoder_on_gpu`: on the GPU a
new prompt encodes in milliseconds; on the CPU the GPU saves those bytes and a new prompt costs seconds of CPU time
(about 5.8 TFLOP for 512 tokens; repeated prompts come from the embedding cache). `place_text_encoder` puts it on
the GPU when everything fits with it there, otherwise on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from serve.errors import PipelineLoadError
from serve.models.fp8 import Fp8Linear
from serve.pipelines.weights import Models, StageSplit

log = logging.getLogger(__name__)

GB = 1e9
FIT_MARGIN = 0.10  # of the free memory, kept for the allocator's rounding, fragmentation and the CUDA context


@dataclass(frozen=True)
class VramPlan:
    pipeline: str
    height: int
    width: int
    vae_type: str
    quantization: str | None
    weights: dict[str, int]  # "dit bf16", "dit fp32", "dit fp8", "vae fp32", ... → bytes
    text_encoder: int  # umT5 weight bytes (not in `weights`: where they live is chosen)
    kv_cache: int
    text_kv: int
    stream_state: int  # VAE caches and other state alive between chunks
    activations: int  # peak transient bytes of a steady chunk
    text_encoder_on_gpu: bool = True
    notes: tuple[str, ...] = field(default=())
    stream_batch_rows: int = 0  # the stream batch's rows (serve/pipelines/stream_batch.py), 0 without it
    stage: str | None = None  # a pipeline stage's share (`split_plan`): "stage 1 of 4 (blocks 8–15)"

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values()) + (self.text_encoder if self.text_encoder_on_gpu else 0)

    @property
    def total(self) -> int:
        """Bytes on the GPU at the peak of a steady chunk, one stream."""
        return self.weight_bytes + self.kv_cache + self.text_kv + self.stream_state + self.activations

    def with_text_encoder_on_gpu(self, on_gpu: bool) -> VramPlan:
        return dataclasses.replace(self, text_encoder_on_gpu=on_gpu)

    def describe(self) -> str:
        return (
            f"{self.pipeline} {self.height}×{self.width} vae_type={self.vae_type} "
            f"quantization={self.quantization or 'none'} text encoder on {'GPU' if self.text_encoder_on_gpu else 'CPU'}"
            + (f" stream batch of {self.stream_batch_rows} rows" if self.stream_batch_rows else "")
            + (f", {self.stage}" if self.stage else "")
        )


def bytes_by_dtype(module: nn.Module, prefix: str) -> dict[str, int]:
    """Parameter and buffer bytes of `module` by dtype, keyed `"<prefix> <dtype>"`."""
    totals: dict[str, int] = defaultdict(int)
    for tensor in (*module.parameters(), *module.buffers()):
        totals[f"{prefix} {str(tensor.dtype).removeprefix('torch.')}"] += tensor.numel() * tensor.element_size()
    return dict(totals)


def module_bytes(module: nn.Module) -> int:
    """Parameter and buffer bytes of `module`, all dtypes."""
    return sum(bytes_by_dtype(module, "").values())


def measure_plan(pipeline_id: str, height: int | None = None, width: int | None = None, *, vae_type: str = "wan",
                 quantization: str | object | None = ..., models: Models | None = None,
                 stream_batch_rows: int = 0) -> VramPlan:  # fmt: skip
    """The plan of one configuration, from a two-chunk dry run in the pipeline's default mode (seconds of CPU).
    With `stream_batch_rows`, the pipe is filled first, so the measured chunk is a full micro-step (every row)."""
    plan, _ = _measure(pipeline_id, height, width, vae_type, quantization, models, stream_batch_rows)
    return plan


def measure_stage_plans(pipeline_id: str, height: int, width: int, *, vae_type: str = "wan",
                        quantization: str | None = None, stream_batch_rows: int = 0,
                        split: Callable[[int], tuple[tuple[int, int], ...]]) -> list[VramPlan]:  # fmt: skip
    """Each pipeline stage's plan (`split_plan`) of a staged load, `split` giving its blocks from the DiT's count:
    the same dry run as `measure_plan`, and the same split the load will make."""
    plan, pipeline = _measure(pipeline_id, height, width, vae_type, quantization, None, stream_batch_rows)
    dit = pipeline.models.dit
    return split_plan(plan, dit, pipeline.vae_model, split(dit.config.num_layers))


def _measure(pipeline_id: str, height: int | None, width: int | None, vae_type: str, quantization: str | object | None,
             models: Models | None, stream_batch_rows: int) -> tuple[VramPlan, Any]:  # fmt: skip
    from serve.pipelines.dry_run import dry_run_pipeline, scripted_params, tracking

    pipeline = dry_run_pipeline(pipeline_id, height, width, vae_type=vae_type, quantization=quantization,
                                models=models)  # fmt: skip
    pipeline.stream_batch_rows = stream_batch_rows
    stream = pipeline.open_stream(0)
    mode = pipeline.spec.default_mode
    frames = np.zeros((pipeline.chunk_frames, pipeline.height, pipeline.width, 3), np.uint8)
    with tracking() as tracker:
        first, steady = scripted_params(pipeline.spec.runtime_defaults, mode, 2)
        stream.process(frames if mode == "video" else None, first)
        for _ in range(max(stream_batch_rows - 1, 0)):  # the pipe fills: one more row in flight per chunk
            stream.process(frames if mode == "video" else None, steady)
        before = tracker.live
        tracker.reset_peak()
        stream.process(frames if mode == "video" else None, steady)
        activations, state = tracker.peak - before, tracker.live
    weights = {**bytes_by_dtype(pipeline.models.dit, "dit"), **bytes_by_dtype(pipeline.vae_model, "vae")}
    text_encoder = module_bytes(pipeline.models.prompts.encoder)
    cache = stream.cache.k.nbytes + stream.cache.v.nbytes
    text_kv = stream.text_kv.k.nbytes + stream.text_kv.v.nbytes
    stored_fp8 = isinstance(pipeline.models.dit.blocks[0].ffn[0], Fp8Linear)
    plan = VramPlan(
        pipeline_id, pipeline.height, pipeline.width, vae_type, "fp8_e4m3fn" if stored_fp8 else None, weights,
        text_encoder, cache, text_kv, state, activations, stream_batch_rows=stream_batch_rows,
    )  # fmt: skip
    return plan, pipeline


def split_plan(plan: VramPlan, dit: nn.Module, vae: nn.Module, layers: tuple[tuple[int, int], ...]) -> list[VramPlan]:
    """The one-device `plan` (measured with `dit` and `vae`) as each pipeline stage holds it (serve/runtime/stages.py).

    Exact where the bytes are: weights (rank 0 the DiT's embeddings and its blocks, each stage its blocks, the last
    the head too; the VAE's encoder half on rank 0, its decoder half on the last, what is outside both halves on
    both), the text encoder (rank 0's), and the KV cache and prompt K/V (each layer's share is the same). An upper
    bound elsewhere: the stream state (VAE caches, the policy's latents) is counted whole on rank 0 and the last
    stage, and a steady chunk's activation peak (one block's attention, or the VAE) whole on every stage."""
    blocks = [bytes_by_dtype(block, "dit") for block in dit.blocks]
    head = bytes_by_dtype(dit.head, "dit")
    embeddings = _minus(bytes_by_dtype(dit, "dit"), *blocks, head)
    encoder, decoder = bytes_by_dtype(vae.encoder, "vae"), bytes_by_dtype(vae.decoder, "vae")
    vae_rest = _minus(bytes_by_dtype(vae, "vae"), encoder, decoder)
    num_layers, last = len(dit.blocks), len(layers) - 1
    plans = []
    for rank, (start, end) in enumerate(layers):
        parts = blocks[start:end]
        if rank == 0:
            parts += [embeddings, encoder, vae_rest]
        if rank == last:
            parts += [head, decoder, vae_rest]
        share = end - start
        plans.append(dataclasses.replace(
            plan,
            weights=_plus(*parts),
            text_encoder=plan.text_encoder if rank == 0 else 0,
            text_encoder_on_gpu=plan.text_encoder_on_gpu and rank == 0,
            kv_cache=plan.kv_cache * share // num_layers,
            text_kv=plan.text_kv * share // num_layers,
            stream_state=plan.stream_state if rank in (0, last) else 0,
            stage=f"stage {rank} of {len(layers)} (blocks {start}–{end - 1})",
        ))  # fmt: skip
    return plans


def _plus(*parts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for part in parts:
        for key, size in part.items():
            total[key] += size
    return {key: size for key, size in total.items() if size}


def _minus(whole: dict[str, int], *parts: dict[str, int]) -> dict[str, int]:
    return _plus(whole, *({key: -size for key, size in part.items()} for part in parts))


def place_text_encoder(plan: VramPlan, free_bytes: int) -> VramPlan:
    """The encoder on the GPU when the whole plan fits with it there, else on the CPU."""
    if plan.text_encoder == 0:  # a pipeline stage after the first: rank 0 runs the encoder
        return plan
    on_gpu = plan.with_text_encoder_on_gpu(True)
    return on_gpu if fits(on_gpu, free_bytes) else plan.with_text_encoder_on_gpu(False)


def fits(plan: VramPlan, free_bytes: int) -> bool:
    return plan.total <= free_bytes * (1 - FIT_MARGIN)


def fit_error(plan: VramPlan, free_bytes: int, alternatives: list[VramPlan]) -> str | None:
    """None when `plan` fits `free_bytes`; else the reason, naming the need, the free memory and what fits instead
    (the first alternatives, in the order given, whose plans fit)."""
    if fits(plan, free_bytes):
        return None
    usable = free_bytes * (1 - FIT_MARGIN)
    fitting = [alt for alt in alternatives if fits(alt, free_bytes)]
    message = (
        f"{plan.describe()} needs {plan.total / GB:.1f} GB of GPU memory (weights {plan.weight_bytes / GB:.1f}, KV "
        f"cache {plan.kv_cache / GB:.1f}, text K/V {plan.text_kv / GB:.2f}, stream state {plan.stream_state / GB:.1f}"
        f", activations {plan.activations / GB:.1f}); {free_bytes / GB:.1f} GB are free, {usable / GB:.1f} usable "
        f"after a {FIT_MARGIN:.0%} margin"
    )
    if plan.stage is not None:
        return f"{message}. Give this stage fewer blocks (`blocks_per_stage`) or split over more GPUs (`gpus`)"
    if fitting:
        options = "; ".join(f"{alt.describe()} ({alt.total / GB:.1f} GB)" for alt in fitting[:3])
        return f"{message}. What fits: {options}"
    return f"{message}. No smaller configuration tried fits: free GPU memory (other processes) or use a larger GPU"


def alternatives(plan: VramPlan) -> list[VramPlan]:
    """Smaller configurations to suggest, cheapest change first: fp8 storage, a smaller VAE, lower resolution."""
    candidates: list[dict] = []
    if plan.quantization is None:
        candidates.append({"quantization": "fp8_e4m3fn", "vae_type": plan.vae_type})
    for vae_type in ("lighttae", "lightvae"):
        if vae_type != plan.vae_type:
            candidates.append({"quantization": plan.quantization or "fp8_e4m3fn", "vae_type": vae_type})
    height, width = (plan.height * 3 // 4) // 16 * 16, (plan.width * 3 // 4) // 16 * 16
    candidates.append({"quantization": plan.quantization or "fp8_e4m3fn", "vae_type": "lighttae", "height": height,
                       "width": width})  # fmt: skip
    measured = []
    for change in candidates:
        size = {"height": change.pop("height", plan.height), "width": change.pop("width", plan.width)}
        alt = measure_plan(plan.pipeline, **size, **change, stream_batch_rows=plan.stream_batch_rows)
        measured.append(alt.with_text_encoder_on_gpu(False))
    return measured


def check_fits(plan: VramPlan, free_bytes: int) -> VramPlan:
    """The plan with the encoder placed, or PipelineLoadError naming need, free memory and what fits."""
    placed = place_text_encoder(plan, free_bytes)
    if fits(placed, free_bytes):
        return placed
    # A stage's share is not a configuration of its own: the one-device alternatives would not say what fits it.
    error = fit_error(placed, free_bytes, alternatives(placed) if placed.stage is None else [])
    raise PipelineLoadError(f"{plan.pipeline}: does not fit this GPU: {error}")


def plan_load(pipeline_id: str, load_params: dict[str, Any], devices: list[torch.device], rows: int = 0,
              split: StageSplit | None = None) -> VramPlan:  # fmt: skip
    """The VRAM plan of this load (`measure_plan`) against each GPU's free memory, rank 0's returned: one
    device, or with `split` (a staged load) each stage's share on its own GPU. Raises PipelineLoadError naming the
    GPU, need, free memory and what fits. Costs a meta-device dry run: seconds of CPU, no GPU memory. `rows`: the
    stream batch's, counted as asked for (a policy that cannot run it only makes the plan an upper bound)."""
    size = {"height": load_params["height"], "width": load_params["width"]}
    options = {"vae_type": load_params.get("vae_type", "wan"), "quantization": load_params.get("quantization"),
               "stream_batch_rows": rows}  # fmt: skip
    if split is None:
        plans = [measure_plan(pipeline_id, **size, **options)]
    else:
        plans = measure_stage_plans(pipeline_id, **size, **options, split=split)
    placed = []
    for device, plan in zip(devices, plans, strict=True):
        free_bytes, _ = torch.cuda.mem_get_info(device)
        try:
            placed.append(check_fits(plan, free_bytes))
        except PipelineLoadError as exc:
            raise PipelineLoadError(f"{exc} ({device})") from None
        where = "gpu" if placed[-1].text_encoder_on_gpu else "cpu"
        log.info("pipeline=%s %s vram plan %.1f GB of %.1f GB free, text encoder on %s", pipeline_id, device,
                 placed[-1].total / 1e9, free_bytes / 1e9, where)  # fmt: skip
    return placed[0]
