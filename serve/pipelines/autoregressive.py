"""The Wan pipelines: what a load reads and chooses (weights, LoRAs, the step backends, fp8, pipeline stages, the
stream batch), and the five pipelines, each a `ChunkShape` and a cache policy (serve/pipelines/cache_policies.py)
over the one chunk loop (serve/pipelines/chunk_loop.py)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from build_engines.manifest import EngineKey, dit_step_key, precision_of, vae_step_key
from serve.errors import InvalidParameters, PipelineLoadError
from serve.models.autoencoder import ChunkStepFn, make_vae
from serve.models.dit import DIT_CONFIGS, DiTConfig
from serve.models.fp8 import store_dit_in_fp8
from serve.models.kv_cache import KVCacheSpec
from serve.models.lora import RuntimeLoras
from serve.models.scheduler import FlowMatchScheduler
from serve.pipelines.base import Pipeline, PipelineStream, ProgressFn
from serve.pipelines.cache_policies import CachePolicy, EmaSinkPolicy, MemoryBankPolicy, RecomputePolicy
from serve.pipelines.chunk_loop import AutoregressiveStream, StagedStream
from serve.pipelines.loras import (
    attach_runtime,
    check_lora_scales,
    merge_user_loras,
    merged_lora_key,
    requested_loras,
)
from serve.pipelines.placement import Gpus, parse_gpus, starting_split
from serve.pipelines.spec import PipelineSpec
from serve.pipelines.vace_context import ZeroVideoLatents
from serve.pipelines.vram import plan_load
from serve.pipelines.weights import LORA_SCALE, Models, StageSplit, dit_files, load_weights, random_models
from serve.runtime.backends import DiTStep, select_backend
from serve.runtime.cuda_step import DIT_STEP_PERSISTENT, VACE_STEP_PERSISTENT, on_cuda
from serve.runtime.stage_driver import StageDriver, check_visible
from serve.runtime.stages import CheckpointWeights, RandomWeights, VaeSpec
from serve.settings import ServerSettings

log = logging.getLogger(__name__)

VAE_DTYPE = torch.float32  # the streams run the VAE in fp32 on every device; its engines are fp32 builds
WARMUP_CHUNKS = 4  # chunks decoded in each timed warm-up of `rebalance_stages` (once the stream batch has filled)
WARMUP_MAX_CALLS = 64  # a bound on a warm-up's calls: the stream batch's fill is S·stages + stages − 1 calls


def builtin_lora(models: Models) -> list[dict[str, Any]]:
    """The pipeline's own LoRA (LongLive, MemFlow) as the status lists it: merged at load, first of all."""
    if models.builtin_lora is None:
        return []
    return [{"path": models.builtin_lora, "scale": LORA_SCALE, "merge_mode": "permanent_merge", "builtin": True}]


def load_vae_model(models: Models, device: torch.device, seed: int) -> torch.nn.Module:
    """The VAE every stream of a pipeline runs (each stream keeps its own caches around it); the engine builder
    loads it here too, so the weight hashes agree. Random weights follow the load seed, as the DiT's do."""
    vae = make_vae(models.vae_type, models.vae_path, size=models.vae_size, dtype=VAE_DTYPE, device=device, seed=seed)
    return vae.model


@dataclass(frozen=True)
class ChunkShape:
    """What makes one pipeline's loop differ from another's, as data."""

    dit_config: str
    shift: float
    chunk_latents: int  # latent frames per chunk (pixel frames = 4 × this)
    cache_frames: int  # frame slots of the KV cache
    checkpoint_prefer: str | None = None  # `generator_ema` for Reward Forcing


class AutoregressivePipeline(Pipeline):
    shape: ChunkShape
    frame_input = "yuv"  # input planes converted on the device (HostBridge.upload)
    random_dit_config: DiTConfig = DIT_CONFIGS["tiny"]
    """The DiT `random_weights` loads build (tests with pipeline stages use a deeper tiny one)."""
    stages: StageDriver | None = None
    """The pipeline-parallel stages when the load split the DiT over several devices (`gpus`)."""
    placement_reason: str | None = None
    """Why a load given several devices runs on one."""
    stream_batch_rows: int = 0
    """Rows of the stream batch (denoising steps + the clean pass), 0 without it (serve/pipelines/stream_batch.py)."""
    stream_lanes: int = 1
    """Micro-steps in flight at once: the pipeline stages' count (a one-process oracle may set it to match)."""
    stream_batch_reason: str | None = None
    """Why a load that asked for `stream_batch` runs without it."""
    zero_video: ZeroVideoLatents | None = None
    """A VACE load's inactive input-video latents, the same for every stream (serve/pipelines/vace_context.py)."""

    def __init__(self, spec: PipelineSpec, load_params: dict[str, Any], models: Models, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.spec = spec
        self.height, self.width = load_params["height"], load_params["width"]
        self.chunk_frames = 4 * self.shape.chunk_latents
        self.random_weights = bool(load_params.get("random_weights"))
        self.vace_enabled = bool(load_params.get("vace_enabled"))
        self.step: DiTStep = models.dit.step  # what `run_step` calls; `load` swaps in the chosen backend
        self.vace_step = getattr(models.dit, "step_vace", None)  # the VACE-enabled step likewise (VACE loads)
        self.backend = "eager"
        self.models = models
        self.device, self.dtype = device, dtype
        self.vae_model = load_vae_model(models, device, seed=int(load_params.get("seed", 0)))
        self.vae_steps: dict[str, ChunkStepFn | None] = {"encode": None, "decode": None}  # None: the model's own
        self.scheduler = FlowMatchScheduler(self.shape.shift)
        self.runtime_lora_scales: dict[str, float] = {}  # path → load scale of each runtime_peft LoRA
        self.runtime_loras: RuntimeLoras | None = None

    @classmethod
    def load(cls, spec: PipelineSpec, load_params: dict[str, Any], *, report: ProgressFn, **context: Any) -> Pipeline:
        # Never a silent fallback: what this build cannot honour yet is refused with the reason.
        quantization = load_params.get("quantization")
        if quantization not in (None, "fp8_e4m3fn"):
            raise PipelineLoadError(f"{spec.id}: quantization {quantization!r} is not supported; null or fp8_e4m3fn")
        gpus = parse_gpus(load_params["gpus"]) if load_params.get("gpus") else None
        if gpus is not None:
            check_visible(gpus)
        device = torch.device(gpus.devices[0] if gpus else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # Whether the DiT is split over stages is settled before any weight is read: rank 0 (here) then reads only
        # its own part of the DiT (`Models.stage_layers`).
        placement_reason: str | None = None
        split: StageSplit | None = None
        if gpus is not None and gpus.ranks > 1:
            placement_reason = cls.pipeline_parallel_refusal(spec, load_params)
            if placement_reason is None:
                split = partial(starting_split, spec.id, gpus.ranks, load_params.get("blocks_per_stage"))
        if load_params.get("random_weights"):
            models = random_models(load_params, device, seed=int(load_params["seed"]), dit_config=cls.random_dit_config,
                                   split=split)  # fmt: skip
        else:
            text_device = device
            if device.type == "cuda":  # refuse before allocating what cannot fit; place the text encoder
                report("memory plan", 0.02)
                steps = load_params.get("denoising_step_list") or spec.runtime_defaults["denoising_step_list"]
                devices = [torch.device(d) for d in gpus.devices] if split is not None and gpus else [device]
                rows = len(steps) + 1 if load_params.get("stream_batch") else 0
                plan = plan_load(spec.id, load_params, devices, rows, split)
                text_device = device if plan.text_encoder_on_gpu else torch.device("cpu")
            models = load_weights(
                spec, load_params, Path(context["models_dir"]), dit_config=cls.shape.dit_config,
                prefer=cls.shape.checkpoint_prefer, device=device, dtype=dtype, report=report, text_device=text_device,
                split=split,
            )  # fmt: skip
        loras, lora_dir = requested_loras(load_params), Path(context.get("lora_dir") or ServerSettings().lora_folder)
        if loras:
            report("LoRAs", 0.8)
        user_loras = merge_user_loras(models.dit, loras, lora_dir, spec.id)
        # The backend is chosen on the weights as loaded and merged (the hash an fp8 TensorRT engine was built from),
        # before the eager path's own fp8 storage below.
        report("model step backend", 0.85)
        pipeline = cls(spec, load_params, models, device, dtype)
        pipeline.lora_adapters = (*builtin_lora(models), *user_loras.adapters)
        if load_params.get("stream_batch"):
            pipeline.stream_batch_reason = pipeline.stream_batch_refusal()
            if pipeline.stream_batch_reason is None:
                steps = load_params.get("denoising_step_list") or spec.runtime_defaults["denoising_step_list"]
                pipeline.stream_batch_rows = len(steps) + 1
            else:
                log.warning("pipeline=%s runs without the stream batch: %s", spec.id, pipeline.stream_batch_reason)
        if gpus is not None and split is not None:
            engines_dir = Path(context.get("engines_dir") or ServerSettings().engines_dir)
            pipeline.start_stages(gpus, load_params, Path(context.get("models_dir") or "."), engines_dir, report)
            return pipeline
        if gpus is not None and placement_reason is not None:
            pipeline.placement_reason = placement_reason
            log.warning("pipeline=%s gpus=%s runs on %s alone: %s", spec.id, gpus.spelled(), device,
                        placement_reason)  # fmt: skip
        pipeline.runtime_lora_scales = user_loras.runtime_scales
        engines_dir = Path(context.get("engines_dir") or ServerSettings().engines_dir)
        requested = load_params.get("backend", "auto")
        pipeline.select_dit_backends(requested, engines_dir, merged_lora_key(loras), quantization)
        pipeline.select_vae_backends(requested, engines_dir)
        if pipeline.vace_enabled and device.type != "meta":  # the dry run's meta tensors cannot be compared
            report("VACE", 0.88)
            pipeline.zero_video = ZeroVideoLatents.encode(
                pipeline.vae_model, models.vae_type, pipeline.height, pipeline.width, cls.shape.chunk_latents,
                device, pipeline.vae_steps["encode"],
            )  # fmt: skip
        if quantization == "fp8_e4m3fn":  # fp8 weight storage; fp8 GEMMs where the GPU has them (serve/models/fp8.py)
            report("fp8 weights", 0.9)
            store_dit_in_fp8(models.dit, dtype)
        pipeline.runtime_loras = attach_runtime(models.dit, user_loras)  # beside fp8-stored weights too
        report("ready", 1.0)
        return pipeline

    @classmethod
    def policy_kind(cls) -> CachePolicy:
        """A policy of this pipeline's kind over a one-token cache on the CPU: only its class's flags are read."""
        return cls.make_policy(KVCacheSpec(1, 1, 1, 2, 1, cls.shape.cache_frames))

    @classmethod
    def pipeline_parallel_refusal(cls, spec: PipelineSpec, load_params: dict[str, Any]) -> str | None:
        """Why this load cannot split its DiT over stages (it then runs on the first device), or None. From the
        pipeline's kind and the load's parameters only: it is settled before the weights are read."""
        probe = cls.policy_kind()
        if probe.pipeline_parallel is not None:
            return f"{spec.id} cannot be pipelined: {probe.pipeline_parallel}"
        if load_params.get("vace_enabled"):
            return "vace_enabled loads are not pipelined yet (the VACE branch adds hints inside the blocks)"
        if requested_loras(load_params):
            return "user LoRAs are not pipelined yet (the stages load the published weights only)"
        if load_params.get("quantization"):
            return "fp8 quantization is not pipelined yet (the stages keep the load dtype)"
        if load_params.get("backend", "auto") not in ("auto", "eager"):
            return f"backend {load_params['backend']!r} is a whole-model engine; pipeline stages run the eager step"
        return None

    def stream_batch_refusal(self) -> str | None:
        """Why this load cannot run the stream batch (it then runs chunk after chunk), or None."""
        probe = self.policy_kind()
        if probe.stream_batch is not None:
            return f"{self.spec.id} cannot stream-batch: {probe.stream_batch}"
        if not probe.clean_pass or not probe.keys_rotated_at_write:
            return f"{self.spec.id} cannot stream-batch: its chunks need a clean pass and keys rotated at write"
        if self.vace_enabled:
            return "vace_enabled loads do not stream-batch yet (each chunk's VACE context would ride its rows)"
        return None

    def start_stages(self, gpus: Gpus, load_params: dict[str, Any], models_dir: Path, engines_dir: Path,
                     report: ProgressFn) -> None:  # fmt: skip
        """Spawn the stages, each building its blocks of the load's split; rank 0 (here) loaded only its own."""
        report("pipeline stages", 0.9)
        dit, layers = self.models.dit, self.models.stage_layers
        assert layers is not None, "a staged load reads only rank 0's part of the DiT (`split`)"
        weights: RandomWeights | CheckpointWeights
        if self.random_weights:
            weights = RandomWeights(int(load_params["seed"]))
        else:
            dit_file, lora_file = dit_files(self.spec)
            lora = lora_file.local_path(models_dir) if lora_file else None
            weights = CheckpointWeights(dit_file.local_path(models_dir), self.shape.checkpoint_prefer, lora, LORA_SCALE)
        models = self.models
        vae = VaeSpec(models.vae_type, models.vae_path, models.vae_size, int(load_params.get("seed", 0)))
        self.stages = StageDriver.start(gpus, layers, dit, self.dtype, weights, vae, self.vae_model)
        self.stream_lanes = gpus.ranks  # one micro-step in flight per stage
        self.backend = "eager"
        self.backend_reason = "pipeline-parallel stages run the eager step (engines are built for the whole model)"
        self.backends = {"dit_step": {"backend": self.backend, "reason": self.backend_reason}}
        self.select_vae_backends(load_params.get("backend", "auto"), engines_dir)
        last = f"the decode runs on the last stage ({gpus.devices[-1]}), eager"
        self.backends["vae_decode"] = {"backend": "eager", "reason": last}
        self.vae_steps["decode"] = None
        if load_params.get("rebalance_stages", True):
            report("rebalancing stages", 0.95)
            try:
                self.stages.rebalance(lambda: self.warm_up_stages(load_params))
            except BaseException:
                self.stages.close()
                raise
        report("ready", 1.0)

    def warm_up_stages(self, load_params: dict[str, Any]) -> None:
        """The rebalance's timed warm-up: a scratch stream at the load's real chunk shape (grid, cache frames,
        chunk latents, the stream batch's rows), in the pipeline's default mode (video: rank 0's encode runs),
        until WARMUP_CHUNKS chunks have been decoded on the last stage; then the stream is closed."""
        assert self.stages is not None
        stream = StagedStream(self, seed=0)
        params = {**self.spec.session_params(load_params), "input_mode": self.spec.default_mode}
        frames = None
        if self.spec.default_mode == "video":  # mid-grey: the input's content does not change the arithmetic's cost
            frames = np.full((self.chunk_frames, self.height, self.width, 3), 128, np.uint8)
        decoded = self.stages.decodes + WARMUP_CHUNKS
        try:
            for _ in range(WARMUP_MAX_CALLS):
                if self.stages.decodes >= decoded:
                    break
                stream.process(frames, params)
            assert self.stages.decodes >= decoded, f"warm-up: < {WARMUP_CHUNKS} decodes in {WARMUP_MAX_CALLS} calls"
        finally:
            stream.release()

    def placement(self) -> dict[str, Any] | None:
        placed: dict[str, Any] | None = None
        if self.stages is not None:
            placed = self.stages.placement()
        elif self.placement_reason is not None:
            placed = {"stages": 1, "devices": [str(self.device)], "reason": self.placement_reason}
        elif self.stream_batch_rows or self.stream_batch_reason:
            placed = {"stages": 1, "devices": [str(self.device)]}
        if placed is not None:
            placed["stream_batch"] = (
                {"rows": self.stream_batch_rows, "lanes": self.stream_lanes} if self.stream_batch_rows else False
            )
            if self.stream_batch_reason is not None:
                placed["stream_batch_reason"] = self.stream_batch_reason
        return placed

    def failure(self) -> str | None:
        return self.stages.poll_failure() if self.stages is not None else None

    def close(self) -> None:
        if self.stages is not None:
            self.stages.close()

    def select_dit_backends(self, requested: str, engines_dir: Path, merged_loras: str | None,
                            quantization: str | None) -> None:  # fmt: skip
        """The DiT step, and a VACE load's VACE step, from `select_backend` on the weights as loaded and merged
        (`merged_loras`: what the engine key records of them), each as it runs on the device (CUDA graph, SDPA
        order)."""
        if self.stream_batch_rows:  # engines and CUDA graphs are built for one chunk (batch 1)
            self.backend_reason = "the stream batch runs the eager step (engines are built for one chunk)"
            self.backends = {"dit_step": {"backend": "eager", "reason": self.backend_reason}}
            return
        dit, shape = self.models.dit, self.shape
        key = dit_step_key(
            self.spec.id, self.height, self.width, shape.chunk_latents, shape.cache_frames, dit.config.text_len,
            "fp8" if quantization else precision_of(self.dtype), "aoti", merged_loras=merged_loras,
        )  # fmt: skip
        steady = (1, 16, shape.chunk_latents, self.height // 8, self.width // 8)  # a chunk's latents
        unusable = self.engines_unusable()

        def choose(key: EngineKey, persistent: tuple[int, ...], weights_of: Any = None) -> tuple[Any, str, str]:
            step, backend, reason = select_backend(
                requested, key, dit, engines_dir, self.device, engines_unusable=unusable, weights_of=weights_of
            )
            step, on_gpu = on_cuda(step, backend, requested, steady, persistent, self.device)
            return step, backend, reason + (f"; {on_gpu}" if on_gpu else "")

        base = dit.base_part() if self.vace_enabled else None  # type: ignore[operator]
        self.step, self.backend, self.backend_reason = choose(key, DIT_STEP_PERSISTENT, base)
        self.backends = {"dit_step": {"backend": self.backend, "reason": self.backend_reason}}
        if self.vace_enabled:  # chunks with a VACE context run this step (serve/models/vace.py)
            vace_key = dataclasses.replace(key, component="dit_step_vace")
            self.vace_step, backend, reason = choose(vace_key, VACE_STEP_PERSISTENT)
            self.backends["dit_step_vace"] = {"backend": backend, "reason": reason}

    def select_vae_backends(self, requested: str, engines_dir: Path) -> None:
        """The VAE's steady-state chunk steps, chosen like the DiT step (the first call of a stream stays eager)."""
        for direction in ("encode", "decode"):
            key = vae_step_key(
                self.spec.id, direction, self.models.vae_type, self.height, self.width, self.shape.chunk_latents,
                precision_of(VAE_DTYPE), "aoti",
            )  # fmt: skip
            self.vae_steps[direction], backend, reason = select_backend(
                requested, key, self.vae_model, engines_dir, self.device
            )
            self.backends[key.component] = {"backend": backend, "reason": reason}

    def engines_unusable(self) -> str | None:
        """Why no engine can run this pipeline's chunk steps, or None. Engines cache keys rotated at absolute
        positions; a policy whose plans carry window-relative key positions (`key_rope`) cannot use them."""
        if not self.policy_kind().keys_rotated_at_write:
            return f"{self.spec.id} re-rotates cached keys per chunk (window-relative RoPE); engines store rotated keys"
        if self.runtime_lora_scales:
            return "runtime_peft LoRAs steer their scale per chunk; engines hold fixed weights (merge them instead)"
        return None

    def check_update(self, update: dict[str, Any]) -> None:
        check_lora_scales(update, tuple(self.runtime_lora_scales))
        steps = update.get("denoising_step_list")
        if self.stream_batch_rows and steps is not None and len(steps) > self.stream_batch_rows - 1:
            raise InvalidParameters(
                f"denoising_step_list has {len(steps)} steps; this load's stream batch has rows for "
                f"{self.stream_batch_rows - 1} (reload with the longer list, or fewer steps)"
            )

    def open_stream(self, seed: int) -> PipelineStream:
        if self.stages is not None:
            self.stages.check_alive("before a stream opened")
            return StagedStream(self, seed)
        return AutoregressiveStream(self, seed)

    @classmethod
    def make_policy(cls, spec: KVCacheSpec, device: torch.device | None = None) -> CachePolicy:
        """The pipeline's cache policy for a stream's cache of shape `spec`, its tensors on `device`."""
        raise NotImplementedError


class StreamDiffusionV2Pipeline(AutoregressivePipeline):
    """One latent frame per chunk, 6-frame cache with 3 sink frames, the motion-aware noise controller (Scope's
    port: a clean pass, no stream batch)."""

    shape = ChunkShape("wan2.1-1.3b", shift=8.0, chunk_latents=1, cache_frames=6)

    @classmethod
    def make_policy(cls, spec: KVCacheSpec, device: torch.device | None = None) -> CachePolicy:
        return CachePolicy(spec, sink_frames=3, device=device)


class LongLivePipeline(AutoregressivePipeline):
    """3-frame sink + 9-frame window (12 attended), K/V re-cached with the new prompt on a prompt switch."""

    shape = ChunkShape("wan2.1-1.3b", shift=5.0, chunk_latents=3, cache_frames=12)

    @classmethod
    def make_policy(cls, spec: KVCacheSpec, device: torch.device | None = None) -> CachePolicy:
        policy = CachePolicy(spec, sink_frames=3, device=device)
        policy.recache_on_prompt_switch = True
        return policy


class RewardForcingPipeline(AutoregressivePipeline):
    """3-frame EMA sink (α = 0.999) + 6-frame window, keys cached un-rotated with window-relative RoPE."""

    shape = ChunkShape("wan2.1-1.3b", shift=5.0, chunk_latents=3, cache_frames=9, checkpoint_prefer="generator_ema")

    @classmethod
    def make_policy(cls, spec: KVCacheSpec, device: torch.device | None = None) -> CachePolicy:
        return EmaSinkPolicy(spec, sink_frames=3, device=device, alpha=0.999)


class MemFlowPipeline(AutoregressivePipeline):
    """LongLive plus a 3-frame memory bank, filled every third chunk and re-ranked by the prompt."""

    shape = ChunkShape("wan2.1-1.3b", shift=5.0, chunk_latents=3, cache_frames=15)

    @classmethod
    def make_policy(cls, spec: KVCacheSpec, device: torch.device | None = None) -> CachePolicy:
        return MemoryBankPolicy(spec, sink_frames=3, bank_frames=3, record_every=9, device=device)


class KreaRealtimePipeline(AutoregressivePipeline):
    """The 14B model; the cache is recomputed from 3 context frames each chunk, `kv_cache_attention_bias` damps
    attention to the older context frames."""

    shape = ChunkShape("wan2.1-14b", shift=5.0, chunk_latents=3, cache_frames=6)
    text_fps = 24.0  # Krea's serving output rate

    @classmethod
    def make_policy(cls, spec: KVCacheSpec, device: torch.device | None = None) -> CachePolicy:
        return RecomputePolicy(spec, context_frames=3, device=device)
