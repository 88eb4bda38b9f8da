"""Server settings: one frozen dataclass per concept, every field documented with its unit.

Values come from CLI flags (serve/cli.py), which default to environment variables, which default to the values
here. Nothing else in the server reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Browsers on the same machine only. A web page from any other origin must not be able to drive a local GPU server
# unasked, and the `null` origin (file:// pages, sandboxed iframes) is shared by every such page, so it is not
# admitted either.
DEFAULT_CORS_ORIGIN_REGEX = r"http://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")  # libx264's, fastest first
CODEC_PREFERENCES = ("client", "h264")
FRAME_PATHS = ("auto", "device", "host")
LOG_LEVELS = ("debug", "info", "warning", "error")


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "") in ("1", "true", "yes")


def env_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated environment value; empty items dropped."""
    return tuple(item for item in env.get(name, "").split(",") if item)


def one_of(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    """An environment value that must be one of `choices` (argparse checks the flag, not its default)."""
    value = env.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class CorsSettings:
    origin_regex: str = DEFAULT_CORS_ORIGIN_REGEX
    """Origins admitted by pattern (full match)."""
    extra_origins: tuple[str, ...] = ()
    """Exact origins admitted besides the pattern (`--cors-allow-origin`, repeatable)."""


@dataclass(frozen=True)
class AccessSettings:
    """Who may drive the server. A web page the user visits must not: state-changing routes take only JSON (so a
    cross-origin call needs the CORS preflight), a `Host` outside this list is refused (DNS rebinding), and with a
    token every API and WebRTC route needs `Authorization: Bearer <token>`."""

    api_token: str | None = None
    """Bearer token required on every /api/v1 route and /metrics when set (`--api-token`, env WANRT_API_TOKEN)."""
    allowed_hosts: tuple[str, ...] = ()
    """Names accepted in the `Host` header besides loopback names and the bound address (`--allowed-host`)."""


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on what one HTTP request may make the server read."""

    max_json_body_bytes: int = 2**20
    """Largest JSON body; a larger one gets 413 before any of it is decoded. Uploads have their own limit."""
    header_timeout_s: float = 10.0
    """A request head (request line and headers) not complete this long after its connection opened, or after its
    first byte on a kept-alive connection, gets 408 and the connection is closed (serve/http_server.py)."""
    body_timeout_s: float = 30.0
    """A request body that pauses longer than this between two reads has its connection closed."""


@dataclass(frozen=True)
class WebRTCSettings:
    ice_servers: tuple[str, ...] = ()
    """STUN/TURN URLs handed to clients and used by the server. Empty: host candidates only (offline by default)."""
    ice_interfaces: str = "all"
    """`all`: every interface plus loopback; `loopback`: 127.0.0.1 only (tests, single-machine setups)."""
    max_sessions: int = 4
    """Concurrent WebRTC sessions; an offer past this gets 503."""
    peer_timeout_s: float = 15.0
    """A peer that answers no ICE consent check for this long is considered gone and its session is freed."""
    connect_timeout_s: float = 10.0
    """An offer whose peer has not connected (ICE + DTLS) this long after the answer is closed and its slot freed."""
    max_message_bytes: int = 65536
    """Largest data-channel message accepted; larger ones get an error reply."""
    stats_interval_s: float = 1.0
    """Period of the `stats` message sent on the data channel."""
    start_bitrate_kbps: int = 1500
    """Video bitrate before the receiver's bandwidth estimate arrives."""
    max_bitrate_kbps: int = 4000
    """Upper bound of the video bitrate (aiortc's own cap is 1.5 Mb/s for VP8)."""
    frame_path: str = "auto"
    """`auto`: input frames go to a pipeline on a GPU as YUV planes, converted there (kernels/colour.py); on a CPU
    swscale converts them (the host is the device there, and swscale's SIMD converter is 10-15× faster than the
    torch reference: benchmarks/RESULTS.md). The output is encoded by our encoder, whose packets aiortc sends as
    they are: libvpx for VP8, NVENC or libx264 for H.264. `device`: YUV planes even on a CPU (tests run the plumbing
    so). `host`: the old path (swscale RGB, aiortc's own encoders), the benchmarks' baseline (serve_passthrough)."""
    nvdec: bool = False
    """Decode incoming H.264 with NVDEC (serve/webrtc/nvdec.py): frames stay on the GPU. CUDA machines only."""
    codec_preference: str = "client"
    """`client`: the answer lists the codecs in the offer's order, so a browser that offers VP8 first (every browser,
    unless told otherwise) gets VP8 both ways. `h264`: H.264 first whenever the offer has it, so the seed's JavaScript
    as it is gets H.264 both ways: the cheaper encoder on a CPU (libx264 `ultrafast` against libvpx), and on a GPU
    NVDEC in (with `--nvdec`) and NVENC out, frames never on the host (README, "Choosing the video codec")."""
    x264_preset: str = "ultrafast"
    """libx264's preset on the H.264 packet path without NVENC (one of X264_PRESETS). `ultrafast` cost 1.4 ms a 512²
    frame against `superfast`'s 1.9-2.3, at the same PSNR on the camera-like scene at 1.5 Mb/s, and 2.0 against 2.7
    within 0.1 dB on a smooth, model-like one (benchmarks/RESULTS.md, issue 13)."""


@dataclass(frozen=True)
class AssetSettings:
    directory: Path = field(default_factory=lambda: Path.home() / ".wanrt" / "assets")
    """Uploaded images and videos live here and nowhere else."""
    max_upload_bytes: int = 50 * 2**20
    """Largest accepted upload (`--max-upload-mb` counts MiB, 2**20 bytes); larger bodies get 413."""


@dataclass(frozen=True)
class RecordingSettings:
    directory: Path = field(default_factory=lambda: Path.home() / ".wanrt" / "recordings")
    """Recorded MP4 files live here and nowhere else."""
    max_bytes: int = 2 * 1024**3
    """Cap on the folder's total size; past it the oldest finished recordings are removed first."""
    queue_frames: int = 8
    """Frames waiting for the recorder's encoder; a frame that finds the queue full is dropped from the recording."""


@dataclass(frozen=True)
class ClusterSettings:
    """How a cluster front (`wanrt cluster serve`) finds and watches its Ray workers (serve/cluster/front.py)."""

    address: str = "auto"
    """Ray cluster address (`--address`, env RAY_ADDRESS): `auto` joins the cluster of this machine's `ray start`."""
    poll_interval_s: float = 1.0
    """How often every worker is asked for its summary; a dead worker is noticed within this (or at its next call)."""
    summary_timeout_s: float = 2.0
    """A worker that does not answer its summary in this long is `unreachable` and gets no new sessions."""
    call_timeout_s: float = 10.0
    """A call (offer, PATCH, status...) a worker has not answered in this long gets 503 and marks it `unreachable`."""
    release_timeout_s: float = 120.0
    """The same for the calls that free a pipeline (load, unload) or complete a recording (serve/cluster/front.py
    `RELEASING_CALLS`): the worker bounds what they wait for itself (its chunk in flight, its stage processes, the
    MP4's last frames), and those bounds add up past `call_timeout_s`."""
    placement_max_age_s: float = 0.25
    """An offer is placed on summaries at most this old (fresher ones are fetched first)."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    preload_pipeline: str | None = None
    """Pipeline id loaded at start (Scope's `PIPELINE` environment variable)."""
    load_timeout_s: float = 1800.0
    """A pipeline load still running after this long is reported as failed (its thread cannot be stopped; whatever
    it builds later is freed), so a hung load never leaves the server "loading" for good."""
    gpus: str | None = None
    """Devices a load splits its DiT over, one pipeline stage each (`0,1,2,3`, or `cpu:N` CPU ranks for tests);
    the default of the `gpus` load parameter. None: one device."""
    allow_random_weights: bool = False
    """Accept the `random_weights` load parameter (tiny config, seeded random weights) for demos and tests."""
    models_dir: Path = field(default_factory=lambda: Path.home() / ".wanrt" / "models")
    """Weight files, one folder per Hugging Face repo (`<repo name>/<path>`)."""
    lora_dir: Path | None = None
    """User LoRA files (`.safetensors`, `.pt`, `.bin`; subfolders allowed); a load's `loras` name files in here.
    None: `lora/` in `models_dir` (`lora_folder`)."""
    engines_dir: Path = field(default_factory=lambda: Path.home() / ".wanrt" / "engines")
    """Built engines and their manifests (`wanrt engines build`); an engine is used only if its manifest matches."""
    hub_endpoint: str = "https://huggingface.co"
    """Hugging Face hub (or a mirror) that weight downloads fetch from (env HF_ENDPOINT, huggingface_hub's name)."""
    cors: CorsSettings = field(default_factory=CorsSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    limits: RequestLimits = field(default_factory=RequestLimits)
    webrtc: WebRTCSettings = field(default_factory=WebRTCSettings)
    assets: AssetSettings = field(default_factory=AssetSettings)
    recordings: RecordingSettings = field(default_factory=RecordingSettings)

    @property
    def lora_folder(self) -> Path:
        return self.lora_dir if self.lora_dir is not None else self.models_dir / "lora"

    @classmethod
    def from_env(cls) -> ServerSettings:
        """Defaults overridden by WANRT_* variables (and Scope's PIPELINE, huggingface_hub's HF_ENDPOINT)."""
        env = os.environ
        home = Path(env.get("WANRT_HOME", Path.home() / ".wanrt"))
        return cls(
            host=env.get("WANRT_HOST", cls.host),
            port=int(env.get("WANRT_PORT", cls.port)),
            preload_pipeline=env.get("PIPELINE") or None,
            load_timeout_s=float(env.get("WANRT_LOAD_TIMEOUT_S", cls.load_timeout_s)),
            allow_random_weights=env_flag(env, "WANRT_ALLOW_RANDOM_WEIGHTS"),
            gpus=env.get("WANRT_GPUS") or None,
            models_dir=Path(env.get("WANRT_MODELS_DIR", home / "models")),
            lora_dir=Path(env["WANRT_LORA_DIR"]) if env.get("WANRT_LORA_DIR") else None,
            engines_dir=Path(env.get("WANRT_ENGINES_DIR", home / "engines")),
            hub_endpoint=env.get("HF_ENDPOINT", cls.hub_endpoint).rstrip("/"),
            cors=CorsSettings(extra_origins=env_list(env, "WANRT_CORS_ALLOW_ORIGINS")),
            access=AccessSettings(
                api_token=env.get("WANRT_API_TOKEN") or None,
                allowed_hosts=env_list(env, "WANRT_ALLOWED_HOSTS"),
            ),
            limits=RequestLimits(
                max_json_body_bytes=int(env.get("WANRT_MAX_JSON_BODY_BYTES", RequestLimits.max_json_body_bytes)),
                header_timeout_s=float(env.get("WANRT_HEADER_TIMEOUT_S", RequestLimits.header_timeout_s)),
                body_timeout_s=float(env.get("WANRT_BODY_TIMEOUT_S", RequestLimits.body_timeout_s)),
            ),
            webrtc=WebRTCSettings(
                ice_servers=env_list(env, "WANRT_ICE_SERVERS"),
                ice_interfaces=env.get("WANRT_ICE_INTERFACES", WebRTCSettings.ice_interfaces),
                max_sessions=int(env.get("WANRT_MAX_SESSIONS", WebRTCSettings.max_sessions)),
                peer_timeout_s=float(env.get("WANRT_PEER_TIMEOUT_S", WebRTCSettings.peer_timeout_s)),
                connect_timeout_s=float(env.get("WANRT_CONNECT_TIMEOUT_S", WebRTCSettings.connect_timeout_s)),
                codec_preference=one_of(
                    env, "WANRT_CODEC_PREFERENCE", CODEC_PREFERENCES, WebRTCSettings.codec_preference
                ),
                frame_path=one_of(env, "WANRT_FRAME_PATH", FRAME_PATHS, WebRTCSettings.frame_path),
                x264_preset=one_of(env, "WANRT_X264_PRESET", X264_PRESETS, WebRTCSettings.x264_preset),
                nvdec=env_flag(env, "WANRT_NVDEC"),
            ),
            assets=AssetSettings(
                directory=Path(env.get("WANRT_ASSETS_DIR", home / "assets")),
                max_upload_bytes=int(env.get("WANRT_MAX_UPLOAD_MB", 50)) * 1024 * 1024,
            ),
            recordings=RecordingSettings(
                directory=Path(env.get("WANRT_RECORDINGS_DIR", home / "recordings")),
                max_bytes=int(env.get("WANRT_RECORDINGS_MAX_MB", 2048)) * 1024 * 1024,
            ),
        )
