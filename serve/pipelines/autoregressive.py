"""The one autoregressive chunk loop every Wan pipeline runs; pipelines differ only in a `ChunkShape` and policies.

Per chunk (models.md §2): encode the input frames (video mode) → mix noise → denoise over the step list, each pass
writing the chunk's K/V into its cache slots → a clean pass at t = 0 overwrites them with clean K/V → decode.

Status of issue 3: this loop, the rolling-sink cache policy and random/real weight loading are here; the
pipeline-specific policies (LongLive's re-cache on a prompt switch, StreamDiffusionV2's noise controller, Reward
Forcing's EMA sink, MemFlow's memory bank, Krea's recompute with attention bias) are not built yet.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.errors import PipelineLoadError
from serve.models.autoencoder import StreamingAutoencoder, make_vae
from serve.models.checkpoint import CheckpointError
from serve.models.dit import DIT_CONFIGS, ROPE_MAX_POSITIONS, WanDiT, load_dit
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy, TextKVCache
from serve.models.prompts import PromptEncoder
from serve.models.scheduler import FlowMatchScheduler
from serve.models.text_encoder import UMT5_PRESETS, UMT5Encoder, load_text_encoder
from serve.models.tokenizer import UMT5Tokenizer
from serve.pipelines.base import Pipeline, PipelineStream, ProgressFn
from serve.pipelines.policies import NoiseController
from serve.pipelines.spec import PipelineSpec

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


@dataclass
class Models:
    dit: WanDiT
    prompts: PromptEncoder
    vae_type: str
    vae_path: Path | None
    vae_size: str | None


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
        p, dit, scheduler = self.p, self.p.models.dit, self.p.scheduler
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
            flow = dit.step(x.to(p.dtype), timestep, self.text_kv.pair(), self.cache.k, self.cache.v, *plan.as_args())
            x0 = scheduler.to_x0(x, flow.float(), timestep)
            if i + 1 < len(steps):
                next_t = torch.full((1, chunk), float(steps[i + 1]), device=p.device)
                x = scheduler.add_noise(x0, self._noise(latent_shape), next_t)
        clean_t = torch.zeros(1, chunk, device=p.device)
        dit.step(x0.to(p.dtype), clean_t, self.text_kv.pair(), self.cache.k, self.cache.v, *plan.as_args())
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
        self.backend = "eager"
        self.models = models
        self.device, self.dtype = device, dtype
        self.scheduler = FlowMatchScheduler(self.shape.shift)

    @classmethod
    def load(cls, spec: PipelineSpec, load_params: dict[str, Any], *, report: ProgressFn, **context: Any) -> Pipeline:
        # Never a silent fallback: what this build cannot honour yet is refused with the reason.
        if load_params.get("backend", "auto") not in ("auto", "eager"):
            raise PipelineLoadError(
                f"{spec.id}: backend {load_params['backend']!r} is not built yet; use 'auto' or 'eager' (PyTorch)"
            )
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
            models = cls._load_weights(spec, load_params, Path(context["models_dir"]), device, dtype, report)
        report("ready", 1.0)
        return cls(spec, load_params, models, device, dtype)

    def open_stream(self, seed: int) -> PipelineStream:
        return AutoregressiveStream(self, seed)

    @classmethod
    def _load_weights(cls, spec: PipelineSpec, load_params: dict[str, Any], models_dir: Path, device: torch.device,
                      dtype: torch.dtype, report: ProgressFn) -> Models:  # fmt: skip
        missing = spec.missing_files(models_dir)
        if missing:
            listed = ", ".join(str(f.local_path(models_dir)) for f in missing)
            raise PipelineLoadError(
                f"{spec.id}: weights missing: {listed}. Place the published files there (one folder per Hugging "
                f"Face repo under {models_dir}), or load with random_weights (server flag --allow-random-weights)"
            )
        dit_file, *rest = spec.files
        lora = next((f for f in rest if f.path.endswith("lora.pt")), None)
        vae_file, text_file, tokenizer_file = spec.files[-3:]
        try:
            report("text encoder", 0.1)
            encoder = load_text_encoder(text_file.local_path(models_dir), dtype=dtype, device=device)
            tokenizer = UMT5Tokenizer(tokenizer_file.local_path(models_dir))
            report("diffusion model", 0.4)
            dit = load_dit(
                DIT_CONFIGS[cls.shape.dit_config], dit_file.local_path(models_dir), dtype=dtype, device=device,
                prefer=cls.shape.checkpoint_prefer, lora=lora.local_path(models_dir) if lora else None,
            )  # fmt: skip
        except (CheckpointError, ValueError, FileNotFoundError) as exc:
            raise PipelineLoadError(f"{spec.id}: {exc}") from None
        vae_type = load_params.get("vae_type", "wan")
        if vae_type != "wan":
            raise PipelineLoadError(f"{spec.id}: vae_type {vae_type!r} needs its weight file; only 'wan' is wired yet")
        prompts = PromptEncoder(tokenizer, encoder, output_dtype=dtype, output_device=device)
        return Models(dit, prompts, vae_type, vae_file.local_path(models_dir), None)


def random_models(load_params: dict[str, Any], device: torch.device, seed: int) -> Models:
    """The `tiny` configs with seeded random weights (the `random_weights` load parameter): demos and tests.

    The tokenizer is a small SentencePiece model trained here on a fixed corpus, since no tokenizer file ships with
    random weights; it is deterministic, so the same prompt always gives the same ids.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = WanDiT(DIT_CONFIGS["tiny"]).to(device).eval()
        encoder = UMT5Encoder(UMT5_PRESETS["tiny"]).to(device).eval()
    tokenizer = UMT5Tokenizer(tiny_tokenizer_model(), max_length=dit.config.text_len)
    prompts = PromptEncoder(tokenizer, encoder, output_dtype=torch.float32, output_device=device)
    return Models(dit, prompts, load_params.get("vae_type", "wan"), None, "tiny")


_TINY_CORPUS = (
    "a beautiful landscape with mountains and a river at sunset\n"
    "anime style portrait of a person walking through a forest\n"
    "cinematic scene, film grain, photorealistic portrait, 4k detail\n"
    "a cat and a dog playing in the snow under a blue sky\n"
) * 20


def tiny_tokenizer_model() -> Path:
    import sentencepiece as spm

    folder = Path(tempfile.gettempdir()) / "wanrt-tiny-tokenizer"
    model = folder / "spiece.model"
    if not model.exists():
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=folder))  # several processes may train at once: each in its own folder
        (work / "corpus.txt").write_text(_TINY_CORPUS)
        spm.SentencePieceTrainer.train(
            input=str(work / "corpus.txt"), model_prefix=str(work / "spiece"), vocab_size=60, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            minloglevel=2,
        )  # fmt: skip
        (work / "spiece.model").replace(model)  # atomic: readers see a whole model or none
    return model


class StreamDiffusionV2Pipeline(AutoregressivePipeline):
    shape = ChunkShape("wan2.1-1.3b", shift=8.0, chunk_latents=1, sink_frames=3, cache_frames=6)


class LongLivePipeline(AutoregressivePipeline):
    shape = ChunkShape("wan2.1-1.3b", shift=5.0, chunk_latents=3, sink_frames=3, cache_frames=12)
