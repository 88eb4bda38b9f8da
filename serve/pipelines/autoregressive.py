"""The one autoregressive chunk loop every Wan pipeline runs; pipelines differ only in a `ChunkShape` and a cache
policy (serve/pipelines/cache_policies.py).

Per chunk (models.md §2): conditioning (prompt, switch re-cache, transition step) → policy hook → encode the input
frames (video mode) → mix noise → denoise over the step list, each pass writing the chunk's K/V into its cache slots
→ a clean pass at t = 0 overwrites them with clean K/V (all but Krea) → decode → policy hook. The schedule
(serve/pipelines/stream_batch.py) runs the denoise and clean passes: chunk after chunk (`PlainSchedule`), or with a
`stream_batch` load as the stream batch (`StreamBatch`: the passes of consecutive chunks as one batch, so a chunk
comes out a few calls after it went in, and restarts and prompt jumps drain the chunks in flight first).

Parameters take effect at chunk boundaries. `reset_cache` (one-shot, applied by the worker) and `manage_cache`
(reset when `noise_scale`, `denoising_step_list` or `warp_denoising_steps` change: the cached history was made at the
old noise levels) restart the stream; the seed restarts with it, so the same seed and input give the same output again.

The timesteps a chunk is denoised at (models.md §2): the listed steps, warped to t = 1000·shift(k/1000) when
`warp_denoising_steps` is on (the levels the generators were distilled at) or fed raw (Scope's behaviour). In video
mode the encoded input is mixed with noise to σ = s (`noise_scale`, or the noise controller's strength); denoising
starts at that level's timestep (t = 1000·s; the controller's own first step), then takes those of the listed steps
after the first whose model timestep lies below it.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from build_engines.manifest import EngineKey, dit_step_key, precision_of, vae_step_key
from serve.errors import InvalidParameters, PipelineLoadError, StreamOutOfMemory
from serve.models.autoencoder import ChunkStepFn, StreamingAutoencoder, make_vae, to_uint8_frames
from serve.models.dit import DIT_CONFIGS, ROPE_MAX_POSITIONS, DiTConfig
from serve.models.fp8 import store_dit_in_fp8
from serve.models.kv_cache import ChunkPlan, KVCache, KVCacheSpec, TextKVCache
from serve.models.lora import RuntimeLoras
from serve.models.scheduler import FlowMatchScheduler
from serve.pipelines.base import ChunkOutput, Pipeline, PipelineStream, ProgressFn
from serve.pipelines.cache_policies import CachePolicy, EmaSinkPolicy, MemoryBankPolicy, RecomputePolicy
from serve.pipelines.conditioning import Conditioning
from serve.pipelines.frames import HostBridge, YuvChunk
from serve.pipelines.loras import (
    attach_runtime,
    check_lora_scales,
    merge_user_loras,
    merged_lora_key,
    requested_loras,
)
from serve.pipelines.placement import Gpus, parse_gpus, starting_split
from serve.pipelines.policies import NoiseController
from serve.pipelines.spec import PipelineSpec
from serve.pipelines.stream_batch import ChunkInFlight, PlainSchedule, StreamBatch
from serve.pipelines.vace_context import ChunkVace, VaceConditioner, first_call_frames
from serve.pipelines.vram import plan_load
from serve.pipelines.weights import LORA_SCALE, Models, StageSplit, dit_files, load_weights, random_models
from serve.pipelines.worker import VACE_IMAGE_FIELDS
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


class AutoregressiveStream(PipelineStream):
    def __init__(self, pipeline: AutoregressivePipeline, seed: int) -> None:
        self.p = pipeline
        config = pipeline.models.dit.config
        self.grid = (pipeline.height // 16, pipeline.width // 16)  # tokens per latent frame: rows, columns
        spec = KVCacheSpec(
            config.num_layers, 1, config.num_heads, config.head_dim, self.grid[0] * self.grid[1],
            pipeline.shape.cache_frames,
        )  # fmt: skip
        rows, chunk = pipeline.stream_batch_rows, pipeline.shape.chunk_latents
        # The stream batch's cache: the policy's window, then a scratch chunk per row (serve/pipelines/stream_batch.py)
        extra = StreamBatch.scratch_frames(rows, chunk) if rows else 0
        self.cache, self.text_kv = self.buffers(dataclasses.replace(spec, max_frames=spec.max_frames + extra))
        self.policy: CachePolicy = pipeline.make_policy(spec, pipeline.device)
        self.schedule: PlainSchedule | StreamBatch = (
            StreamBatch(pipeline.scheduler, self.policy, rows, pipeline.stream_lanes, chunk, pipeline.device)
            if rows else PlainSchedule(pipeline.scheduler)
        )  # fmt: skip
        self.latent_shape = (1, 16, chunk, pipeline.height // 8, pipeline.width // 8)
        self.denoised: deque[tuple[int, list[float | Tensor]]] = deque(maxlen=64)  # (first frame, timesteps) out
        # Decodes submitted whose frames have not gone out yet, oldest first: at most `schedule.decode_lag` after a
        # call (a decode on the last pipeline stage is collected that many micro-steps later).
        self.decoding: deque[Any] = deque()
        self._restart_pending = False  # a reset asked for while chunks are in flight: drained first
        self.vace: VaceConditioner | None = None
        self.vace_text_kv: TextKVCache | None = None
        if pipeline.vace_enabled:
            self.vace = VaceConditioner(
                pipeline.vae_model, pipeline.models.vae_type, pipeline.height, pipeline.width,
                pipeline.shape.chunk_latents, pipeline.device, pipeline.vae_steps["encode"],
            )  # fmt: skip
            self.vace_text_kv = TextKVCache(
                len(pipeline.models.dit.vace_blocks), 1, config.text_len, config.num_heads, config.head_dim,
                pipeline.dtype, pipeline.device,
            )  # fmt: skip
        self.conditioning = Conditioning(
            pipeline.models, pipeline.dtype, self.text_kv, self.vace_text_kv, self.text_setter()
        )
        self.vae = StreamingAutoencoder(
            pipeline.vae_model, pipeline.models.vae_type, pipeline.vae_steps["encode"], pipeline.vae_steps["decode"]
        )
        self.host = HostBridge(pipeline.device, seed)
        self.seed = seed
        self.noise_controller = NoiseController(pipeline.spec.runtime_defaults.get("noise_scale", 0.7))
        self.frame = 0  # absolute latent frame of the next chunk
        self.recaches = 0  # prompt-switch re-cache passes run (LongLive, MemFlow)
        self._noise_key: tuple | None = None
        self.lora_scales = dict(pipeline.runtime_lora_scales)  # this session's runtime LoRA scales, by path
        self._vace_ignored = False  # said once that this load has no VACE for the images sent

    @property
    def chunks_in_flight(self) -> int:
        return self.schedule.in_flight + len(self.decoding)

    def buffers(self, spec: KVCacheSpec) -> tuple[KVCache, TextKVCache]:
        """The stream's KV cache and prompt K/V, every layer's (a pipeline-parallel stream keeps rank 0's here)."""
        config, p = self.p.models.dit.config, self.p
        text_kv = TextKVCache(config.num_layers, 1, config.text_len, config.num_heads, config.head_dim, p.dtype,
                              p.device)  # fmt: skip
        return KVCache(spec, p.dtype, p.device), text_kv

    def text_setter(self) -> Callable[[Tensor], None] | None:
        """How a new prompt embedding becomes cross-attention K/V; None: the whole model's, on this device."""
        return None

    @torch.inference_mode()  # the worker calls it between chunks, and policies' buffers are inference tensors
    def reset(self) -> None:
        """Restart the stream; with chunks in flight (stream batch), the next chunk drains them first."""
        if self.schedule.busy or self.decoding:
            self._restart_pending = True
            return
        self._restart()

    @torch.inference_mode()
    def _restart(self) -> None:
        self.schedule.discard(self)
        self._restart_pending = False
        self.cache.reset()
        self.vae.reset()
        self.policy.reset()
        if self.vace is not None:
            self.vace.reset()
        self.frame = 0
        self.host.reseed()
        self.noise_controller.reset(self.p.spec.runtime_defaults.get("noise_scale", 0.7))  # as a new stream starts

    def timestep(self, t: float | Tensor, frames: int) -> Tensor:
        """[1, frames] float32 on the device: a listed step (a host float) or the noise controller's (a device 0-d)."""
        if isinstance(t, Tensor):
            return t.float().reshape(1, 1).expand(1, frames)
        return torch.full((1, frames), float(t), device=self.p.device)

    def noise(self) -> Tensor:
        """[1, 16, F, h, w] from the stream's seeded generator: a pass's re-noising."""
        return self.host.noise(self.latent_shape)

    def submit_step(self, latents: Tensor, timestep: Tensor, plan: ChunkPlan) -> Tensor:
        """A stream batch's micro-step: latents [B, 16, F, h, w], timestep [B, F], plan with per-row write_index
        [B, F·Lf], key_bias [B, S] and frame_positions [B, F]. Here it runs at once; stages overlap it."""
        return self.p.step(latents.to(self.p.dtype), timestep, self.text_kv.pair(), self.cache.k, self.cache.v,
                           *plan.as_args())  # fmt: skip

    def collect_step(self, pending: Tensor) -> Tensor:
        return pending

    def submit_decode(self, x0: Tensor) -> tuple[Tensor | None, Any]:
        """Start decoding a chunk's clean latents [1, 16, F, h, w]: (the decoded video [1, 3, T, H, W] in [-1, 1]
        where the decode runs here, else None; what `collect_decode` takes). Here it runs at once."""
        video = self.vae.decode_chunk(x0.float()).clamp(-1, 1)
        return video, to_uint8_frames(video)

    def collect_decode(self, pending: Any) -> Tensor:
        """uint8 frames [T, H, W, 3] on the device."""
        return pending

    def run_step(self, latents: Tensor, t: float | Tensor, plan: ChunkPlan, vace: ChunkVace | None = None) -> Tensor:
        """One DiT step over `latents` [1, 16, F, h, w] at timestep `t`, writing K/V where `plan` says; with the
        chunk's VACE inputs when given (denoising passes only: VACE never enters the KV cache, vace.md §3)."""
        dit = self.p.models.dit
        timestep = self.timestep(t, latents.shape[2])
        key_rope = None if plan.key_positions is None else dit.rope.tables(plan.key_positions, *self.grid)
        if vace is not None:
            assert self.vace_text_kv is not None
            return self.p.vace_step(  # type: ignore[operator]
                latents.to(self.p.dtype), timestep, self.text_kv.pair(), self.cache.k, self.cache.v,
                *plan.as_args(), vace.context, self.vace_text_kv.pair(), vace.scale, key_rope=key_rope,
            )  # fmt: skip
        return self.p.step(
            latents.to(self.p.dtype), timestep, self.text_kv.pair(), self.cache.k, self.cache.v, *plan.as_args(),
            key_rope=key_rope,
        )  # fmt: skip

    def _noise_changed(self, params: dict[str, Any]) -> bool:
        """Whether to restart because the noise level the cached history was made at changed (Scope's
        `manage_cache`). The noise controller's own per-chunk strength does not count: it moves every chunk."""
        key = (
            params.get("noise_scale"), tuple(params.get("denoising_step_list") or ()),
            params.get("warp_denoising_steps"), params.get("input_mode"),
        )  # fmt: skip
        changed = self._noise_key is not None and key != self._noise_key and params.get("manage_cache", True)
        self._noise_key = key
        return bool(changed)

    def process(self, frames: np.ndarray | YuvChunk | None, params: dict[str, Any]) -> np.ndarray:
        try:
            return self._process(frames, params)
        except torch.OutOfMemoryError as exc:
            self.release()
            raise StreamOutOfMemory(
                f"out of GPU memory in a chunk of {self.p.spec.id} at {self.p.height}×{self.p.width}; the stream "
                f"was stopped and its memory freed. Load with a smaller plan (quantization fp8_e4m3fn, vae_type "
                f"lighttae, a lower resolution) or run fewer sessions. ({str(exc).splitlines()[0]})"
            ) from None

    def start(self, frames: np.ndarray | YuvChunk | None, params: dict[str, Any]) -> ChunkOutput:
        """`process` without its final wait: on CUDA the output's copy is still in flight when this returns, so the
        worker can queue the next chunk before it waits (PipelineWorker `_run`)."""
        self.host.defer_wait = True
        try:
            out = self.process(frames, params)
        finally:
            self.host.defer_wait = False
        return ChunkOutput(out, self.host.take_pending())

    def release(self) -> None:
        """Drop this stream's device buffers (it cannot run again) and hand cached blocks back to the driver."""
        self.cache = self.text_kv = None  # type: ignore[assignment]
        self.decoding.clear()
        self.vae.reset()
        self.policy = self.conditioning = None  # type: ignore[assignment]
        if self.p.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _process(self, frames: np.ndarray | YuvChunk | None, params: dict[str, Any]) -> np.ndarray:
        p, policy = self.p, self.policy
        chunk = p.shape.chunk_latents
        out: list[np.ndarray] = []  # frames of every chunk that comes out of this call, in order
        restart = self._noise_changed(params) or self._restart_pending
        if restart or (policy.absolute_positions and self.frame + chunk > ROPE_MAX_POSITIONS):  # the RoPE table
            self._finish(self.schedule.drain(self))  # ends at 1024; in flight come out
            out += self._frames_out(keep=0)
            self._restart()
        self._apply_lora_scales(params)
        if self.schedule.busy and self.conditioning.will_jump(params):  # in-flight chunks finish on their prompt
            self._finish(self.schedule.drain(self))
            out += self._frames_out(keep=0)
        jumped = self.conditioning.update(params)
        if jumped and self.frame > 0 and policy.recache_on_prompt_switch:
            self._recache()
        policy.update_params(params)
        policy.before_chunk(self, self.frame, chunk)
        entering = self._enter(frames, params)
        self.frame += chunk
        # 2. Denoising passes and the clean pass, as the schedule runs them (serve/pipelines/stream_batch.py).
        self._finish(self.schedule.advance(self, entering))
        out += self._frames_out(keep=self.schedule.decode_lag)
        if not out:  # the stream batch filling its pipe
            return np.zeros((0, p.height, p.width, 3), dtype=np.uint8)
        if len(out) == 1:
            return out[0]
        return torch.cat(out) if isinstance(out[0], Tensor) else np.concatenate(out)  # type: ignore[return-value]

    def _enter(self, frames: np.ndarray | None, params: dict[str, Any]) -> ChunkInFlight:
        """1. A chunk's start point: input latents mixed with noise (video), or noise (text, or video that went to
        VACE), and the timesteps its passes run at."""
        p, scheduler, chunk = self.p, self.p.scheduler, self.p.shape.chunk_latents
        steps = scheduler.model_timesteps(params["denoising_step_list"], warp=params["warp_denoising_steps"])
        maybe_dropped: set[int] = set()  # passes that run only where the device says their step is kept
        pixels = None
        if frames is not None:
            pixels = self.host.upload(frames, p.height, p.width)
        vace = self.vace.chunk(pixels, params) if self.vace is not None else None
        if self.vace is None and not self._vace_ignored and any(params.get(name) for name in VACE_IMAGE_FIELDS):
            log.warning("pipeline=%s: VACE images sent to a load without vace_enabled: ignored", p.spec.id)
            self._vace_ignored = True  # once per stream: references stay in the parameters
        if pixels is not None and not (vace is not None and vace.uses_input_video):
            pixels = first_call_frames(self.vae, pixels, chunk)  # the first encode: 1 + 4(F−1) frames → F latents
            latents = self.encode(pixels)
            strength: float | Tensor
            first_t: float | Tensor
            if params.get("noise_controller", False):
                strength, first_t = self.noise_controller.update(pixels)  # device tensors: no host sync
                lowest, highest = self.noise_controller.first_timestep_bounds()
            else:
                strength = float(params.get("noise_scale", 0.7))
                first_t = lowest = highest = 1000 * strength
            # The input is mixed to the noise level `strength`; denoising starts at `first_t`, then takes the listed
            # steps (as the model sees them: warped or raw) below it. A step between the bounds of first_t may or may
            # not be below it: its pass runs and the device keeps or discards its result (dropped steps form a
            # prefix, so this is the same arithmetic).
            steps = [first_t] + [t for t in steps[1:] if t < highest]
            maybe_dropped = {i for i, t in enumerate(steps) if i > 0 and t >= lowest}
            x = (1 - strength) * latents + strength * self.host.noise(self.latent_shape)
        else:
            first_t = steps[0]
            x = self.host.noise(self.latent_shape)
        return ChunkInFlight(self.frame, x, list(steps), first_t, maybe_dropped, vace)

    def encode(self, pixels: Tensor) -> Tensor:
        """The VAE encode of a chunk's input pixels [1, 3, T, H, W] → latents [1, 16, F, h, w]."""
        return self.vae.encode_chunk(pixels)

    def _finish(self, chunks: list[ChunkInFlight]) -> None:
        """3. Start decoding each chunk whose clean latents are final (queued in `decoding`), in order."""
        for chunk in chunks:
            assert chunk.x0 is not None
            video, pending = self.submit_decode(chunk.x0)
            self.policy.after_chunk(self, chunk.frame, chunk.x0, video)
            self.denoised.append((chunk.frame, chunk.timesteps))
            self.decoding.append(pending)

    def _frames_out(self, keep: int) -> list[np.ndarray]:
        """The frames of the oldest decodes, leaving `keep` in flight: uint8 [T, H, W, 3] converted on the device,
        one copy to the host each (or left on the device for the encoder)."""
        out = []
        while len(self.decoding) > keep:
            frames = self.collect_decode(self.decoding.popleft())
            if self.keep_output_on_device and not self.host.dry:
                out.append(frames)  # the encoder converts and encodes it on the device
            else:
                out.append(self.host.download(frames))
        return out  # type: ignore[return-value]

    def _apply_lora_scales(self, params: dict[str, Any]) -> None:
        """The session's runtime LoRA scales, set on the pipeline's shared adapters before its chunk (streams of
        one pipeline take turns on the worker). The KV cache is kept: the history made at the old scale leaves the
        attention window over the next chunks; `reset_cache` in the same update restarts instead."""
        if self.p.runtime_loras is None:
            return
        for item in params.get("lora_scales") or ():
            self.lora_scales[item["path"]] = item["scale"]
        self.p.runtime_loras.set_scales(self.lora_scales)

    def _recache(self) -> None:
        """LongLive's KV re-cache: the cached window's clean latents run once more at t = 0 with the new prompt."""
        plan = self.policy.recache_plan(self.frame)
        if plan is not None:
            self.run_step(self.policy.clean_latents(self.frame), 0.0, self.schedule.widen(plan))
            self.recaches += 1


class StagedStream(AutoregressiveStream):
    """A stream whose DiT blocks run on pipeline stages (serve/runtime/stages.py). The chunk loop and the policy
    are the one-device ones: only the step, the prompt K/V and the cache reset go through the stage driver, and the
    stream's own `cache` holds rank 0's layers. Only policies that never touch the cache between steps run here
    (`CachePolicy.pipeline_parallel`). The VAE decode runs on the last stage, with this stream's decoder state
    there; the encode stays here."""

    def __init__(self, pipeline: AutoregressivePipeline, seed: int) -> None:
        self._decoder_started = False  # whether the last stage has decoded this stream's first chunk since a reset
        super().__init__(pipeline, seed)

    def buffers(self, spec: KVCacheSpec) -> tuple[KVCache, TextKVCache]:
        stages = self.p.stages
        assert stages is not None
        self.stream_id, caches = stages.open(self.grid, spec.max_frames)
        weakref.finalize(self, stages.forget, self.stream_id)  # the stages free its caches before their next command
        return caches.cache, caches.text_kv

    def text_setter(self) -> Callable[[Tensor], None]:
        stages = self.p.stages
        assert stages is not None
        return lambda context: stages.set_text(self.stream_id, context)

    def _restart(self) -> None:
        super()._restart()
        assert self.p.stages is not None
        self.p.stages.reset(self.stream_id)  # the last stage's decoder state too
        self._decoder_started = False

    def encode(self, pixels: Tensor) -> Tensor:
        assert self.p.stages is not None
        return self.p.stages.timed_encode(lambda: super(StagedStream, self).encode(pixels))

    def submit_decode(self, x0: Tensor) -> tuple[Tensor | None, Any]:
        """On the last stage (its decoder state is this stream's); no video here for the policy (only policies that
        never read it are pipelined)."""
        assert self.p.stages is not None
        frames = self.vae.num_frames(x0.shape[2], first=not self._decoder_started)
        self._decoder_started = True
        return None, self.p.stages.submit_decode(self.stream_id, x0, frames)

    def collect_decode(self, pending: Any) -> Tensor:
        assert self.p.stages is not None
        return self.p.stages.collect_decode(pending)

    def submit_step(self, latents: Tensor, timestep: Tensor, plan: ChunkPlan) -> Any:
        assert self.p.stages is not None
        return self.p.stages.submit(self.stream_id, latents.to(self.p.dtype), timestep, plan)

    def collect_step(self, pending: Any) -> Tensor:
        assert self.p.stages is not None
        return self.p.stages.collect(pending)

    def run_step(self, latents: Tensor, t: float | Tensor, plan: ChunkPlan, vace: ChunkVace | None = None) -> Tensor:
        assert vace is None and plan.key_positions is None  # refused at load (`pipeline_parallel_refusal`)
        assert self.p.stages is not None
        timestep = self.timestep(t, latents.shape[2])
        return self.p.stages.step(self.stream_id, latents.to(self.p.dtype), timestep, plan)

    def release(self) -> None:
        super().release()
        assert self.p.stages is not None
        self.p.stages.forget(self.stream_id)


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
