"""The one autoregressive chunk loop every Wan pipeline runs: `AutoregressiveStream`, one per session (`StagedStream`
when the DiT's blocks run on pipeline stages). Pipelines (serve/pipelines/autoregressive.py) differ only in a
`ChunkShape` and a cache policy (serve/pipelines/cache_policies.py).

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from serve.errors import StreamOutOfMemory
from serve.models.autoencoder import StreamingAutoencoder, to_uint8_frames
from serve.models.dit import ROPE_MAX_POSITIONS
from serve.models.kv_cache import ChunkPlan, KVCache, KVCacheSpec, TextKVCache
from serve.pipelines.base import ChunkOutput, PipelineStream
from serve.pipelines.cache_policies import CachePolicy
from serve.pipelines.conditioning import Conditioning
from serve.pipelines.frames import HostBridge, YuvChunk
from serve.pipelines.policies import NoiseController
from serve.pipelines.stream_batch import ChunkInFlight, PlainSchedule, StreamBatch
from serve.pipelines.vace_context import ChunkVace, VaceConditioner, first_call_frames
from serve.pipelines.worker import VACE_IMAGE_FIELDS

if TYPE_CHECKING:
    from serve.pipelines.autoregressive import AutoregressivePipeline

log = logging.getLogger(__name__)


class AutoregressiveStream(PipelineStream):
    """One session's stream of a loaded pipeline: its KV cache, cache policy, schedule, VAE state, conditioning and
    seeded noise; `process` runs one call of the loop (a chunk in, the frames that come out)."""

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
                pipeline.shape.chunk_latents, pipeline.device, pipeline.vae_steps["encode"], pipeline.zero_video,
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
        """Drop this stream's device buffers (it cannot run again). Their blocks stay in the caching allocator, for
        the next stream to take: handing them back to the driver here (`empty_cache`) made every other stream's
        next chunk allocate afresh, a synchronising cudaMalloc, each time a session ended. An unload frees them
        (manager.py `free_device_memory`)."""
        self.cache = self.text_kv = None  # type: ignore[assignment]
        self.decoding.clear()
        self.vae.reset()
        self.policy = self.conditioning = None  # type: ignore[assignment]
        self.vace = self.vace_text_kv = None  # its VAE caches and encoded images

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
