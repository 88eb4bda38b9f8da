"""The one autoregressive chunk loop every Wan pipeline runs; pipelines differ only in a `ChunkShape` and policies.

Per chunk (models.md §2): encode the input frames (video mode) → mix noise → denoise over the step list, each pass
writing the chunk's K/V into its cache slots → a clean pass at t = 0 overwrites them with clean K/V → decode.

Status of issue 3: this loop, the rolling-sink cache policy and random/real weight loading are here; the
pipeline-specific policies (LongLive's re-cache on a prompt switch, StreamDiffusionV2's noise controller, Reward
Forcing's EMA sink, MemFlow's memory bank, Krea's recompute with attention bias) are not built yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from build_engines.manifest import dit_step_key, precision_of
from serve.errors import PipelineLoadError
from serve.models.autoencoder import StreamingAutoencoder, make_vae
from serve.models.dit import ROPE_MAX_POSITIONS
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy, TextKVCache
from serve.models.scheduler import FlowMatchScheduler
from serve.pipelines.base import Pipeline, PipelineStream, ProgressFn
from serve.pipelines.policies import NoiseController
from serve.pipelines.spec import PipelineSpec
from serve.pipelines.weights import Models, load_weights, random_models
from serve.runtime.backends import DiTStep, EagerStep, select_backend
from serve.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkShape:
    """What makes one pipeline's loop differ from another's, as data."""

    dit_config: str
    shift: float
    chunk_latents: int  # latent frames per chunk (pixel frames = 4 × this)
    sink_frames: int
    cache_frames: int  # sink + ring: the frames one chunk attends, its own included
    checkpoint_prefer: str | None = None  # `generator_ema` for Reward Forcing


class AutoregressiveStream(PipelineStream):
    def __init__(self, pipeline: AutoregressivePipeline, seed: int) -> None:
        self.p = pipeline
        config = pipeline.models.dit.config
        h, w = pipeline.height // 16, pipeline.width // 16
        spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, h * w, pipeline.shape.cache_frames)
        self.cache = KVCache(spec, pipeline.dtype, pipeline.device)
        self.text_kv = TextKVCache(
            config.num_layers, 1, config.text_len, config.num_heads, config.head_dim, pipeline.dtype, pipeline.device
        )
        self.policy = RollingSinkPolicy(spec, pipeline.shape.sink_frames, pipeline.device)
        self.vae: StreamingAutoencoder = make_vae(
            pipeline.models.vae_type, pipeline.models.vae_path, size=pipeline.models.vae_size,
            dtype=torch.float32, device=pipeline.device, seed=seed,
        )  # fmt: skip
        self.generator = torch.Generator(device=pipeline.device).manual_seed(seed)
        self.seed = seed
        self.noise_controller = NoiseController(pipeline.spec.runtime_defaults.get("noise_scale", 0.7))
        self.frame = 0  # absolute latent frame of the next chunk
        self._prompt_key: tuple | None = None

    def reset(self) -> None:
        self.cache.reset()
        self.vae.reset()
        self.frame = 0
        self.generator.manual_seed(self.seed)
        self.noise_controller.reset(self.noise_controller.strength)

    def _set_prompts(self, params: dict[str, Any]) -> None:
        prompts = [(p["text"], p.get("weight", 1.0)) for p in params.get("prompts") or []] or [("", 1.0)]
        key = (tuple(prompts), params.get("prompt_interpolation_method", "linear"))
        if key != self._prompt_key:
            context = self.p.models.prompts.encode(prompts, key[1])  # [1, text_len, text_dim]
            self.text_kv.set(self.p.models.dit.text_kv(context.to(self.p.dtype)))
            self._prompt_key = key

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.p.device)

    @torch.inference_mode()
    def process(self, frames: np.ndarray | None, params: dict[str, Any]) -> np.ndarray:
        p, scheduler = self.p, self.p.scheduler
        chunk = p.shape.chunk_latents
        if self.frame + chunk > ROPE_MAX_POSITIONS:  # absolute RoPE positions end at 1024 frames
            self.reset()
        self._set_prompts(params)
        first = self.frame == 0
        latent_shape = (1, 16, chunk, p.height // 8, p.width // 8)
        steps = scheduler.model_timesteps(params["denoising_step_list"])

        # 1. Start point: input latents mixed with noise (video), or noise (text).
        if frames is not None:
            pixels = torch.from_numpy(frames).to(p.device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
            if first:  # the VAE's first call takes frame 0 alone: 1 + 4(F−1) frames → F latents
                pixels = pixels[:, :, -(1 + 4 * (chunk - 1)) :]
            latents = self.vae.encode_chunk(pixels)
            if params.get("noise_controller", False):
                strength, first_t = self.noise_controller.update(pixels)
            else:
                strength = float(params.get("noise_scale", 0.7))
                first_t = 1000 * strength
            # The input is mixed to the noise level `strength`; denoising starts at `first_t`, then takes the listed
            # steps below it.
            steps = [first_t] + [t for t in steps[1:] if t < first_t]
            noise = self._noise(latent_shape)
            x = (1 - strength) * latents + strength * noise
        else:
            x = self._noise(latent_shape)

        # 2. Denoising passes, all writing this chunk's slots; then the clean pass at t = 0.
        plan = self.policy.plan(self.frame, chunk)
        x0 = x
        for i, t in enumerate(steps):
            timestep = torch.full((1, chunk), float(t), device=p.device)
            flow = p.step(x.to(p.dtype), timestep, self.text_kv.pair(), self.cache.k, self.cache.v, *plan.as_args())
            x0 = scheduler.to_x0(x, flow.float(), timestep)
            if i + 1 < len(steps):
                next_t = torch.full((1, chunk), float(steps[i + 1]), device=p.device)
                x = scheduler.add_noise(x0, self._noise(latent_shape), next_t)
        clean_t = torch.zeros(1, chunk, device=p.device)
        p.step(x0.to(p.dtype), clean_t, self.text_kv.pair(), self.cache.k, self.cache.v, *plan.as_args())
        self.frame += chunk

        # 3. Decode to uint8 frames [T, H, W, 3].
        video = self.vae.decode_chunk(x0.float())  # [1, 3, T, H, W] in [-1, 1]
        return ((video[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


class AutoregressivePipeline(Pipeline):
    shape: ChunkShape

    def __init__(self, spec: PipelineSpec, load_params: dict[str, Any], models: Models, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.spec = spec
        self.height, self.width = load_params["height"], load_params["width"]
        self.chunk_frames = 4 * self.shape.chunk_latents
        self.random_weights = bool(load_params.get("random_weights"))
        self.step: DiTStep = EagerStep(models.dit)  # what `process` calls; `load` swaps in the chosen backend
        self.backend = "eager"
        self.models = models
        self.device, self.dtype = device, dtype
        self.scheduler = FlowMatchScheduler(self.shape.shift)

    @classmethod
    def load(cls, spec: PipelineSpec, load_params: dict[str, Any], *, report: ProgressFn, **context: Any) -> Pipeline:
        # Never a silent fallback: what this build cannot honour yet is refused with the reason.
        if load_params.get("quantization"):
            raise PipelineLoadError(
                f"{spec.id}: quantization {load_params['quantization']!r} is not built yet; use null"
            )
        if load_params.get("vace_enabled") or load_params.get("loras"):
            raise PipelineLoadError(f"{spec.id}: VACE and user LoRAs are not built yet; load without them")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if load_params.get("random_weights"):
            models = random_models(load_params, device, seed=int(load_params["seed"]))
        else:
            models = load_weights(
                spec, load_params, Path(context["models_dir"]), dit_config=cls.shape.dit_config,
                prefer=cls.shape.checkpoint_prefer, device=device, dtype=dtype, report=report,
            )  # fmt: skip
        report("model step backend", 0.9)
        key = dit_step_key(spec.id, load_params["height"], load_params["width"], cls.shape.chunk_latents,
                           cls.shape.cache_frames, models.dit.config.text_len, precision_of(dtype), "aoti")  # fmt: skip
        engines_dir = Path(context.get("engines_dir") or ServerSettings().engines_dir)
        step, backend, reason = select_backend(load_params.get("backend", "auto"), key, models.dit, engines_dir, device)
        report("ready", 1.0)
        pipeline = cls(spec, load_params, models, device, dtype)
        pipeline.step, pipeline.backend, pipeline.backend_reason = step, backend, reason
        return pipeline

    def open_stream(self, seed: int) -> PipelineStream:
        return AutoregressiveStream(self, seed)

class StreamDiffusionV2Pipeline(AutoregressivePipeline):
    shape = ChunkShape("wan2.1-1.3b", shift=8.0, chunk_latents=1, sink_frames=3, cache_frames=6)


class LongLivePipeline(AutoregressivePipeline):
    shape = ChunkShape("wan2.1-1.3b", shift=5.0, chunk_latents=3, sink_frames=3, cache_frames=12)
