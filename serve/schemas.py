"""Wire schemas: msgspec Structs for HTTP bodies and data-channel messages, named exactly as the Scope contract.

These Structs are the validation: types, ranges and unknown fields are checked by msgspec when a body or message is
decoded. Checks that need more than one field (a descending step list, a field the loaded pipeline does not take)
live in `serve/pipelines/spec.py`, next to the per-pipeline field sets.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

Timestep = Annotated[
    int, Meta(ge=0, le=1000, description="Timestep in [0, 1000]; the list is strictly descending, so 0 only last")
]
Dimension = Annotated[
    int, Meta(ge=64, le=2048, multiple_of=16, description="Pixels; a multiple of 16 (VAE stride 8 × patch 2)")
]
Seed = Annotated[int, Meta(ge=0, le=2**32 - 1)]
GPUS_PATTERN = r"^(cpu:[1-8]|[0-9]{1,2}(,[0-9]{1,2}){0,15})$"
"""`gpus`: CUDA device ids separated by commas, or `cpu:N` (serve/pipelines/placement.py parses it)."""
ShortText = Annotated[str, Meta(max_length=4096)]
AssetPath = Annotated[str, Meta(max_length=1024)]
MAX_REF_IMAGES = 8  # `vace_ref_images` per update
WarpSteps = Annotated[
    bool,
    Meta(
        description="Feed each listed step k to the model as t = 1000·shift(k/1000), the noise levels the few-step "
        "generator was distilled at (the original repos); false feeds the raw values, as Scope does"
    ),
]


class Prompt(Struct, forbid_unknown_fields=True):
    text: ShortText
    weight: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0


class Transition(Struct, forbid_unknown_fields=True):
    target_prompts: Annotated[list[Prompt], Meta(min_length=1, max_length=8)]
    num_steps: Annotated[int, Meta(ge=0, le=64)] = 4
    temporal_interpolation_method: Literal["linear", "slerp"] = "linear"


class LoraScale(Struct, forbid_unknown_fields=True):
    path: AssetPath
    scale: Annotated[float, Meta(ge=-10.0, le=10.0)]


class LoraFile(Struct, forbid_unknown_fields=True):
    path: AssetPath
    scale: Annotated[float, Meta(ge=-10.0, le=10.0)] = 1.0
    merge_mode: Literal["permanent_merge", "runtime_peft"] | UnsetType = UNSET


class RuntimeParameters(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """`initialParameters` of an offer and every data-channel message: any subset, applied at the next chunk."""

    input_mode: Literal["video", "text"] | UnsetType = UNSET
    prompts: Annotated[list[Prompt], Meta(max_length=8)] | UnsetType = UNSET
    prompt_interpolation_method: Literal["linear", "slerp"] | UnsetType = UNSET
    transition: Transition | UnsetType = UNSET
    denoising_step_list: Annotated[list[Timestep], Meta(min_length=1, max_length=8)] | UnsetType = UNSET
    warp_denoising_steps: WarpSteps | UnsetType = UNSET
    noise_scale: Annotated[float, Meta(ge=0.0, le=1.0)] | UnsetType = UNSET
    noise_controller: bool | UnsetType = UNSET
    manage_cache: bool | UnsetType = UNSET
    reset_cache: bool | UnsetType = UNSET
    kv_cache_attention_bias: Annotated[float, Meta(ge=0.01, le=1.0)] | UnsetType = UNSET
    paused: bool | UnsetType = UNSET
    lora_scales: Annotated[list[LoraScale], Meta(max_length=16)] | UnsetType = UNSET
    vace_enabled: (
        Annotated[
            bool, Meta(description="VACE for this session (needs a vace_enabled load; sessions start with the load's)")
        ]
        | UnsetType
    ) = UNSET
    vace_use_input_video: (
        Annotated[bool, Meta(description="With VACE, the camera is the VACE control and latents start from noise")]
        | UnsetType
    ) = UNSET
    vace_ref_images: (
        Annotated[
            list[AssetPath],
            Meta(
                max_length=MAX_REF_IMAGES,
                description="Uploaded image paths (POST /api/v1/assets): every chunk's references until a new list "
                "(or []) replaces them",
            ),
        ]
        | UnsetType
    ) = UNSET
    vace_context_scale: (
        Annotated[float, Meta(ge=0.0, le=2.0, description="Multiplies the VACE hints; applied from the next chunk")]
        | UnsetType
    ) = UNSET
    first_frame_image: (
        Annotated[AssetPath, Meta(description="Uploaded image kept as the next chunk's first latent frame (one-shot)")]
        | UnsetType
    ) = UNSET
    last_frame_image: (
        Annotated[AssetPath, Meta(description="Uploaded image kept as the next chunk's last latent frame (one-shot)")]
        | UnsetType
    ) = UNSET


class InitialParameters(RuntimeParameters, forbid_unknown_fields=True, omit_defaults=True):
    """An offer's `initialParameters`: any runtime parameter, plus Scope's `recording` (record from the first frame)."""

    recording: bool | UnsetType = UNSET


class LoadParams(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """`load_params` of a load request. Unset fields take the pipeline's defaults."""

    height: Dimension | UnsetType = UNSET
    width: Dimension | UnsetType = UNSET
    seed: Seed | UnsetType = UNSET
    base_seed: Seed | UnsetType = UNSET  # Scope's pipeline configs call the seed this; both are accepted
    quantization: Literal["fp8_e4m3fn"] | UnsetType | None = UNSET
    vace_enabled: bool | UnsetType = UNSET
    vae_type: Literal["wan", "lightvae", "tae", "lighttae"] | UnsetType = UNSET
    loras: Annotated[list[LoraFile], Meta(max_length=8)] | UnsetType = UNSET
    lora_merge_mode: Literal["permanent_merge", "runtime_peft"] | UnsetType = UNSET
    manage_cache: bool | UnsetType = UNSET
    denoising_step_list: Annotated[list[Timestep], Meta(min_length=1, max_length=8)] | UnsetType = UNSET
    warp_denoising_steps: WarpSteps | UnsetType = UNSET
    vace_context_scale: Annotated[float, Meta(ge=0.0, le=2.0)] | UnsetType = UNSET
    backend: Literal["auto", "tensorrt", "compiled", "eager"] | UnsetType = UNSET
    random_weights: bool | UnsetType = UNSET
    chunk_size: Annotated[int, Meta(ge=1, le=16)] | UnsetType = UNSET
    gpus: Annotated[str, Meta(pattern=GPUS_PATTERN, max_length=64)] | UnsetType = UNSET
    """Devices to split the DiT over, one pipeline stage each: CUDA ids `0,1,2,3`, or `cpu:N` CPU ranks (tests,
    development). One entry is a one-device load. Unset: the server's `--gpus`, else the one default device."""
    stream_batch: bool | UnsetType = UNSET
    """Run consecutive chunks' denoising steps as one batch (one chunk per step, plus its clean pass), so every
    pipeline stage is busy every micro-step; frames come out S·stages chunks later. Pipelines whose cache policy
    cannot do it run without it and say why in `pipeline_parallel.stream_batch_reason`. Default off."""
    blocks_per_stage: Annotated[list[Annotated[int, Meta(ge=1)]], Meta(min_length=2, max_length=16)] | UnsetType = UNSET
    """The starting split of the DiT's blocks over the `gpus` stages, in stage order: one entry per stage, each at
    least 1, adding up to the model's blocks (30 for the 1.3B, 40 for the 14B). Unset: as even as the count allows,
    the remainder on the middle stages."""
    rebalance_stages: bool | UnsetType = UNSET
    """With several stages: after the stages start, time a short warm-up at the load's chunk shape and move blocks
    between stages so that their times per micro-step even out (the VAE encode on the first stage and the decode on
    the last counted as work that stays); `pipeline_parallel.rebalance` says what it measured and moved. Default
    on; off keeps the starting split exactly."""


class LoadRequest(Struct, forbid_unknown_fields=True):
    """Both forms are accepted: the seed's `{pipeline_id}` and Scope's `{pipeline_ids: [id]}`."""

    pipeline_id: Annotated[str, Meta(max_length=64)] | UnsetType = UNSET
    pipeline_ids: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(min_length=1, max_length=2)] | UnsetType = (
        UNSET
    )
    load_params: LoadParams = msgspec.field(default_factory=LoadParams)


class ErrorBody(Struct, omit_defaults=True):
    """Every error reply (serve/app.py's error_response): what went wrong and what to do, and the error's kind."""

    detail: str
    error: str
    extra: Any = None
    """Request-validation errors only: which fields failed, as `[{message, key, source}]`."""


class MessageResponse(Struct):
    message: str


class PipelineStatus(Struct):
    status: Literal["not_loaded", "loading", "loaded", "error"]
    pipeline_id: str | None = None
    load_params: dict[str, Any] | None = None
    loaded_lora_adapters: list[dict[str, Any]] = msgspec.field(default_factory=list)
    """Each LoRA in or beside the weights: path, scale, merge_mode (and rank, layers, unmatched_keys, base_model;
    `builtin` for the pipeline's own)."""
    error: str | None = None
    loading_stage: str | None = None
    progress: float | None = None
    backend: str | None = None
    backend_reason: str | None = None  # why this backend runs the step (and why better ones did not)
    backends: dict[str, dict[str, str]] | None = None  # per component (dit_step, vae_encode, vae_decode): both of those
    random_weights: bool = False
    pipeline_parallel: dict[str, Any] | None = None
    """How the DiT is placed when the load named several devices: stages, devices, blocks_per_stage,
    weight_bytes_per_stage (each stage's DiT blocks, embeddings or head, and VAE half, as held), stage_ms (the
    last chunk's DiT step plus VAE work, per stage), step_ms, encode_ms (first stage), decode_ms (last stage),
    suggested_blocks_per_stage, rebalance (the load's warm-up: blocks_before, blocks_after, stage_ms_before,
    stage_ms_after) when `rebalance_stages` ran; or one stage and the reason it could not be split. Also
    stream_batch ({rows, lanes}, or false) and stream_batch_reason when a `stream_batch` load runs without it."""


class LoraFileInfo(Struct):
    name: str
    path: str
    """What a load's `loras[].path` takes: relative to the LoRA folder."""
    folder: str
    size_bytes: int
    size_mb: float
    rank: int | None
    base_model: str | None
    """The DiT it fits (`wan2.1-1.3b` for SDv2, LongLive, Reward Forcing, MemFlow; `wan2.1-14b` for Krea)."""
    layers: int
    sha256: str | None
    """Computed in the background on the first listing; null until then."""
    error: str | None = None
    """Why the file is not a usable LoRA."""
    workers: list[str] | None = None
    """Cluster front only (null on `wanrt serve`): the workers whose LoRA folder has this path."""
    missing_on: list[str] | None = None
    """Cluster front only: the workers that answered without it; a load naming it fails on those (empty: on all)."""


class LoraList(Struct):
    lora_files: list[LoraFileInfo]
    skipped_workers: dict[str, str] | None = None
    """Cluster front only: the workers not in this answer (unreachable, gone, or their error), each with why."""


class ModelsDownloadRequest(Struct, forbid_unknown_fields=True):
    pipeline_id: Annotated[str, Meta(max_length=64)]
    vace: bool = False
    """Also fetch the pipeline's VACE module (needed only by `vace_enabled` loads)."""


class ModelFileState(Struct):
    repo: str
    path: str
    local_path: str
    present: bool
    size_bytes: int | None
    verified: bool
    """Unchanged since it was checked against the hub's hash (by a download or `wanrt models verify`)."""


class ModelsDownloadProgress(Struct):
    """Scope's fields (`is_downloading`, `percentage`, `current_artifact`, `error`) plus the state and byte counts."""

    state: Literal["idle", "downloading", "done", "error"]
    is_downloading: bool
    bytes_done: int
    bytes_total: int
    percentage: float
    current_artifact: str | None = None
    """`repo/path` of the file being fetched."""
    error: str | None = None


class WorkerModels(Struct):
    """One cluster worker's weights for a pipeline: its own `ModelsStatus` fields, or why it has none."""

    name: str
    downloaded: bool | None = None
    files: list[ModelFileState] | None = None
    progress: ModelsDownloadProgress | None = None
    error: str | None = None
    """Why it did not answer: unreachable, gone, or the error it raised."""


class ModelsStatus(Struct):
    pipeline_id: str
    downloaded: bool
    """Every file the pipeline needs is present (true for a pipeline that needs none). On a cluster front: on every
    worker that answered (at least one); `workers` names any that did not."""
    files: list[ModelFileState]
    progress: ModelsDownloadProgress
    workers: list[WorkerModels] | None = None
    """Cluster front only (null on `wanrt serve`): each worker's own answer; `files` and `progress` above sum them."""


class IceServer(Struct, omit_defaults=True):
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class IceServers(Struct):
    iceServers: list[IceServer]


MAX_SDP_CHARS = 32_768  # a browser's offer is 3 to 10 KB; serve/webrtc/offers.py also bounds its sections


class Offer(Struct, forbid_unknown_fields=True):
    sdp: Annotated[str, Meta(max_length=MAX_SDP_CHARS)]
    type: Annotated[str, Meta(max_length=16, description="always 'offer'")]
    initialParameters: InitialParameters | None = None


class Answer(Struct):
    sdp: str
    type: str
    sessionId: str


class IceCandidate(Struct, forbid_unknown_fields=True):
    candidate: Annotated[str, Meta(max_length=1024)]
    sdpMid: Annotated[str, Meta(max_length=64)] | None = None
    sdpMLineIndex: Annotated[int, Meta(ge=0, le=1023)] | None = None
    usernameFragment: Annotated[str, Meta(max_length=256)] | None = None


class CandidatesRequest(Struct, forbid_unknown_fields=True):
    candidates: Annotated[list[IceCandidate], Meta(max_length=64)]


class Recording(Struct):
    """One recording: H.264 in MP4, the session's output frames as they were sent."""

    id: str
    """`<sessionId>-<n>`, the n-th recording of that session."""
    sessionId: str
    state: Literal["recording", "done", "failed"]
    url: str
    """Where to download it (GET)."""
    size_bytes: int
    started_at: float
    """Unix time (s)."""
    ended_at: float | None = None
    frames: int | None = None
    """Frames written (known for recordings made since the server started)."""
    frames_dropped: int | None = None
    """Frames left out of the recording because its encoder was behind (the stream kept them)."""
    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None


class RecordingList(Struct):
    recordings: list[Recording]
    directory: str
    total_bytes: int
    max_bytes: int


class RecordingStatus(Struct):
    """Answer of start and stop (Scope answers `{status}`)."""

    status: Literal["recording", "stopped"]
    recording: Recording


class Asset(Struct):
    name: str
    path: str
    size_mb: float
    type: Literal["image", "video"]
    created_at: float


class AssetList(Struct):
    assets: list[Asset]


def params_to_dict(params: Struct) -> dict[str, Any]:
    """The fields that were set, as plain JSON-able values."""
    return msgspec.to_builtins(params)


class ClusterWorker(Struct):
    """One wanrt worker of a cluster (a Ray actor that owns one GPU, or a CPU seat), as GET /api/v1/cluster lists it."""

    name: str
    """The actor's name; the ids of its sessions start with it (`<name>.<uuid>`)."""
    state: Literal["alive", "stopping", "unreachable", "gone"]
    """`stopping`: it is ending its sessions to leave (no new sessions go there, its own still end cleanly);
    `unreachable`: its last call timed out (no new sessions go there); `gone`: its actor died or left."""
    node_id: str | None = None
    node_ip: str | None = None
    gpus: list[str] = msgspec.field(default_factory=list)
    """The accelerator ids Ray gave the actor; empty for a CPU seat."""
    pid: int | None = None
    pipeline: PipelineStatus | None = None
    seats: int = 0
    """Sessions it takes at once (its --max-sessions)."""
    sessions: list[str] = msgspec.field(default_factory=list)
    """Its live session ids."""
    lora_files: list[str] = msgspec.field(default_factory=list)
    """The paths in its LoRA folder: a load naming LoRAs goes to a worker that has them all."""
    lost_sessions: list[str] = msgspec.field(default_factory=list)
    """The sessions it held when it went: their streams ended with it."""
    error: str | None = None
    """Why it is unreachable or gone."""
    last_seen: float | None = None
    """Unix time of its last answer to the front."""


class ClusterStatus(Struct):
    pipeline_id: str | None
    """The pipeline new offers get (the last load's)."""
    workers: list[ClusterWorker]
