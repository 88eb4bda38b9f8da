"""Every pipeline the server knows, with the defaults of the seed's comparison table (seeds/v2v-guide.md)."""

from __future__ import annotations

from serve.errors import UnknownPipeline
from serve.pipelines.spec import COMMON_RUNTIME_FIELDS, MODEL_LOAD_FIELDS, ModelFile, PipelineSpec

WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B"
# The VAE and the text encoder are shared by all five pipelines (the 14B model uses the same ones).
SHARED_FILES = (
    ModelFile(WAN_1_3B, "Wan2.1_VAE.pth"),
    ModelFile(WAN_1_3B, "models_t5_umt5-xxl-enc-bf16.pth"),
    ModelFile(WAN_1_3B, "google/umt5-xxl/spiece.model"),
)
# Kijai's VACE-module files (vace_* keys only, bf16) as Scope downloads them (vace.md §2): the 1.3B module for the
# four 1.3B pipelines, the 14B one for Krea. Needed only with `vace_enabled`.
VACE_REPO = "daydreamlive/WanVideo_comfy"
VACE_1_3B = ModelFile(VACE_REPO, "Wan2_1-VACE_module_1_3B_bf16.safetensors")
VACE_14B = ModelFile(VACE_REPO, "Wan2_1-VACE_module_14B_bf16.safetensors")
V2V_RUNTIME_DEFAULTS = {
    "input_mode": "video",
    "prompts": [],
    "prompt_interpolation_method": "linear",
    "noise_scale": 0.7,
    "noise_controller": True,
    "manage_cache": True,
    "paused": False,
    # The session switch: on by default, as the seed's table says, so that a VACE load conditions every session that
    # does not turn it off (a load without VACE ignores it). Sessions start with the load's value (webrtc/sessions.py).
    "vace_enabled": True,
    "vace_use_input_video": True,
    "vace_ref_images": [],
    "vace_context_scale": 1.0,
}


def _model_spec(
    id: str,
    name: str,
    description: str,
    *,
    base_model: str,
    default_mode: str,
    chunk_frames: int,
    height: int,
    width: int,
    steps: list[int],
    warp_steps: bool,
    files: tuple[ModelFile, ...],
    vram_gb: float,
    extra_runtime: dict | None = None,
    factory: str | None = None,
    quantization: str | None = None,
    vace_file: ModelFile = VACE_1_3B,
) -> PipelineSpec:
    # `warp_steps`: whether the original repo feeds its step list warped (models.md §2); the default here too.
    step_defaults = {"denoising_step_list": steps, "warp_denoising_steps": warp_steps}
    runtime_defaults = {**V2V_RUNTIME_DEFAULTS, "input_mode": default_mode, **step_defaults}
    runtime_defaults.update(extra_runtime or {})
    return PipelineSpec(
        id=id,
        name=name,
        description=description,
        base_model=base_model,
        default_mode=default_mode,  # type: ignore[arg-type]
        chunk_frames=chunk_frames,
        load_defaults={
            "height": height,
            "width": width,
            "seed": 42,
            "quantization": quantization,
            "vace_enabled": False,
            "vae_type": "wan",
            "loras": [],
            "lora_merge_mode": "permanent_merge",
            "manage_cache": True,
            **step_defaults,
            "vace_context_scale": 1.0,
            "backend": "auto",
            "random_weights": False,
        },
        runtime_defaults=runtime_defaults,
        load_fields=MODEL_LOAD_FIELDS,
        runtime_fields=COMMON_RUNTIME_FIELDS | set(extra_runtime or {}) | {"lora_scales"},
        estimated_vram_gb=vram_gb,
        supports_vace=True,
        supports_lora=True,
        supports_cache_management=True,
        supports_quantization=True,
        files=files + SHARED_FILES,
        vace_files=(vace_file,),
        factory=factory,
        mode_defaults={
            "video": {"height": height, "width": width, "denoising_step_list": steps, "noise_scale": 0.7},
            "text": {"height": height, "width": width, "denoising_step_list": steps},
        },
    )


PIPELINES: dict[str, PipelineSpec] = {
    spec.id: spec
    for spec in (
        PipelineSpec(
            id="passthrough",
            name="Passthrough",
            description=(
                "Returns the input frames resized to the loaded resolution, through the same chunk machinery as the "
                "model pipelines. With no input (text mode) it generates a moving test pattern. Generation parameters "
                "are accepted and recorded so any client flow works; they change nothing."
            ),
            base_model=None,
            default_mode="video",
            chunk_frames=1,
            load_defaults={"height": 512, "width": 512, "seed": 42, "chunk_size": 1},
            runtime_defaults={**V2V_RUNTIME_DEFAULTS, "denoising_step_list": [750, 250]},
            load_fields=frozenset({"height", "width", "seed", "base_seed", "chunk_size", "gpus"}),
            runtime_fields=COMMON_RUNTIME_FIELDS,
            factory="serve.pipelines.passthrough:PassthroughPipeline",
        ),
        _model_spec(
            "streamdiffusionv2",
            "StreamDiffusionV2",
            "Wan2.1 1.3B causal DiT tuned for video-to-video: one latent frame (4 pixel frames) per chunk, rolling "
            "6-frame KV cache with 3 sink frames, motion-aware noise controller. Lowest latency.",
            base_model="Wan2.1-T2V-1.3B",
            default_mode="video",
            chunk_frames=4,
            height=320,
            width=576,
            steps=[750, 250],
            warp_steps=False,  # its original feeds the raw list (shift 8)
            files=(ModelFile("jerryfeng/StreamDiffusionV2", "wan_causal_dmd_v2v/model.pt"),),
            vram_gb=20,
            factory="serve.pipelines.autoregressive:StreamDiffusionV2Pipeline",
        ),
        _model_spec(
            "longlive",
            "LongLive",
            "Wan2.1 1.3B with a 3-frame sink and 12-frame window, for long generation with smooth prompt changes. "
            "Base weights plus a merged LoRA.",
            base_model="Wan2.1-T2V-1.3B",
            default_mode="text",
            chunk_frames=12,
            height=512,
            width=512,
            steps=[1000, 750],
            warp_steps=True,
            files=(
                ModelFile("Efficient-Large-Model/LongLive-1.3B", "models/longlive_base.pt"),
                ModelFile("Efficient-Large-Model/LongLive-1.3B", "models/lora.pt"),
            ),
            vram_gb=20,
            factory="serve.pipelines.autoregressive:LongLivePipeline",
        ),
        _model_spec(
            "reward-forcing",
            "RewardForcing",
            "Wan2.1 1.3B trained with Rewarded Distribution Matching; EMA sink with window-relative RoPE.",
            base_model="Wan2.1-T2V-1.3B",
            default_mode="text",
            chunk_frames=12,
            height=512,
            width=512,
            steps=[1000, 750],
            warp_steps=True,
            files=(ModelFile("JaydenLu666/Reward-Forcing-T2V-1.3B", "rewardforcing.pt"),),
            vram_gb=20,
            factory="serve.pipelines.autoregressive:RewardForcingPipeline",
        ),
        _model_spec(
            "memflow",
            "MemFlow",
            "LongLive plus a 3-frame memory bank re-ranked by the prompt, for long-range consistency.",
            base_model="Wan2.1-T2V-1.3B",
            default_mode="text",
            chunk_frames=12,
            height=512,
            width=512,
            steps=[1000, 750],
            warp_steps=True,
            files=(ModelFile("KlingTeam/MemFlow", "base.pt"), ModelFile("KlingTeam/MemFlow", "lora.pt")),
            vram_gb=20,
            factory="serve.pipelines.autoregressive:MemFlowPipeline",
        ),
        _model_spec(
            "krea-realtime-video",
            "Krea Realtime Video",
            "Wan2.1 14B distilled for real time; recomputes the KV cache from 3 context frames each chunk and damps "
            "attention to older frames with kv_cache_attention_bias. fp8 weights by default.",
            base_model="Wan2.1-T2V-14B",
            default_mode="text",
            chunk_frames=12,
            height=256,
            width=256,
            steps=[1000, 750],
            warp_steps=True,
            files=(ModelFile("krea/krea-realtime-video", "krea-realtime-video-14b.safetensors"),),
            vram_gb=32,
            extra_runtime={"kv_cache_attention_bias": 0.3},
            quantization="fp8_e4m3fn",
            vace_file=VACE_14B,
            factory="serve.pipelines.autoregressive:KreaRealtimePipeline",
        ),
    )
}


def get_spec(pipeline_id: str) -> PipelineSpec:
    try:
        return PIPELINES[pipeline_id]
    except KeyError:
        raise UnknownPipeline(
            f"unknown pipeline {pipeline_id!r}; known pipelines: {', '.join(PIPELINES)} (GET /api/v1/pipelines/schemas)"
        ) from None
