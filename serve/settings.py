"""Server settings: one frozen dataclass per concept, every field documented with its unit.

Values come from CLI flags (serve/cli.py), which default to environment variables, which default to the values
here. Nothing else in the server reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Browsers on the same machine only. A web page from any other origin must not be able to drive a local GPU server
# unasked, and the `null` origin (file:// pages, sandboxed iframes) is shared by every such page, so it is not
# admitted either.
DEFAULT_CORS_ORIGIN_REGEX = r"http://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?"


@dataclass(frozen=True)
class CorsSettings:
    origin_regex: str = DEFAULT_CORS_ORIGIN_REGEX
    """Origins admitted by pattern (full match)."""
    extra_origins: tuple[str, ...] = ()
    """Exact origins admitted besides the pattern (`--cors-allow-origin`, repeatable)."""


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
    max_message_bytes: int = 65536
    """Largest data-channel message accepted; larger ones get an error reply."""
    stats_interval_s: float = 1.0
    """Period of the `stats` message sent on the data channel."""
    start_bitrate_kbps: int = 1500
    """Video bitrate before the receiver's bandwidth estimate arrives."""
    max_bitrate_kbps: int = 4000
    """Upper bound of the video bitrate (aiortc's own cap is 1.5 Mb/s for VP8)."""


@dataclass(frozen=True)
class AssetSettings:
    directory: Path = field(default_factory=lambda: Path.home() / ".wanrt" / "assets")
    """Uploaded images and videos live here and nowhere else."""
    max_upload_bytes: int = 50 * 1024 * 1024
    """Largest accepted upload; larger bodies get 413."""


@dataclass(frozen=True)
class RecordingSettings:
    directory: Path = field(default_factory=lambda: Path.home() / ".wanrt" / "recordings")
    """Recorded MP4 files live here and nowhere else."""
    max_bytes: int = 2 * 1024**3
    """Cap on the folder's total size; past it the oldest finished recordings are removed first."""
    queue_frames: int = 8
    """Frames waiting for the recorder's encoder; a frame that finds the queue full is dropped from the recording."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    preload_pipeline: str | None = None
    """Pipeline id loaded at start (Scope's `PIPELINE` environment variable)."""
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
            allow_random_weights=env.get("WANRT_ALLOW_RANDOM_WEIGHTS", "") in ("1", "true", "yes"),
            models_dir=Path(env.get("WANRT_MODELS_DIR", home / "models")),
            lora_dir=Path(env["WANRT_LORA_DIR"]) if env.get("WANRT_LORA_DIR") else None,
            engines_dir=Path(env.get("WANRT_ENGINES_DIR", home / "engines")),
            hub_endpoint=env.get("HF_ENDPOINT", cls.hub_endpoint).rstrip("/"),
            webrtc=WebRTCSettings(
                ice_servers=tuple(u for u in env.get("WANRT_ICE_SERVERS", "").split(",") if u),
                ice_interfaces=env.get("WANRT_ICE_INTERFACES", WebRTCSettings.ice_interfaces),
                max_sessions=int(env.get("WANRT_MAX_SESSIONS", WebRTCSettings.max_sessions)),
                peer_timeout_s=float(env.get("WANRT_PEER_TIMEOUT_S", WebRTCSettings.peer_timeout_s)),
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
