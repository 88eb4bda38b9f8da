"""Engine identity and the manifest written next to every built engine.

An engine is valid only for the machine, toolchain and weights it was built with. `EngineKey` holds the fields that
change the built artifact (what is asked for); the `Manifest` adds what it was built *with* (GPU, SM, versions, weight
hash), so a server can say in one line why an engine does not fit instead of loading it and crashing, or quietly
running stale weights.

Layout: `<engines_dir>/<gpu>-sm<cc>/<backend>-<version>/<name>.{pt2,plan}` + `<name>.json` (`cpu` for the device
part on a machine without CUDA). The directory names are for people; matching always goes through the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import torch
from torch import nn

Component = Literal["dit_step", "dit_step_vace", "vae_encode", "vae_decode"]
Precision = Literal["fp8", "bf16", "fp32"]
Backend = Literal["tensorrt", "aoti"]
ENGINE_SUFFIX: dict[str, str] = {"aoti": ".pt2", "tensorrt": ".plan"}
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class EngineKey:
    """Exactly the fields that change the built engine (STYLE §2.2)."""

    pipeline: str
    component: Component
    height: int
    width: int
    chunk_frames: int  # latent frames per chunk: the step's static F
    cache_frames: int  # frame slots of the static KV cache
    text_len: int
    precision: Precision
    backend: Backend
    vae_type: str | None = None  # VAE steps only: wan, lightvae, tae, lighttae have different graphs
    merged_loras: str | None = None  # DiT steps with user LoRAs merged (`name@scale,...`): an engine of their own

    def digest(self) -> str:
        # Unset fields are left out, so the keys (and file names) of DiT engines built before `vae_type` existed
        # stay the same.
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def name(self) -> str:
        component = self.component if self.vae_type is None else f"{self.component}-{self.vae_type}"
        return f"{self.pipeline}-{component}-{self.height}x{self.width}-{self.precision}-{self.digest()}"

    def describe(self) -> str:
        component = self.component if self.vae_type is None else f"{self.component} ({self.vae_type})"
        return f"{self.pipeline} {component} {self.height}x{self.width} {self.precision} ({self.backend})"


def dit_step_key(
    pipeline: str,
    height: int,
    width: int,
    chunk_frames: int,
    cache_frames: int,
    text_len: int,
    precision: Precision,
    backend: Backend,
    component: Component = "dit_step",
    merged_loras: str | None = None,
) -> EngineKey:
    """The one place the DiT step's key is formed, for the builder and the server alike (`dit_step_vace`: the
    VACE-enabled step, serve/models/vace.py)."""
    return EngineKey(pipeline, component, height, width, chunk_frames, cache_frames, text_len, precision, backend,
                     merged_loras=merged_loras)  # fmt: skip


def vae_step_key(
    pipeline: str,
    direction: Literal["encode", "decode"],
    vae_type: str,
    height: int,
    width: int,
    chunk_frames: int,
    precision: Precision,
    backend: Backend,
) -> EngineKey:
    """The one place a VAE steady-state chunk step's key is formed. `chunk_frames` is in latents, like the DiT's
    (the encoder takes 4× as many pixel frames); a VAE step has no KV cache and no text."""
    component: Component = "vae_encode" if direction == "encode" else "vae_decode"
    return EngineKey(pipeline, component, height, width, chunk_frames, 0, 0, precision, backend, vae_type)


def precision_of(dtype: torch.dtype) -> Precision:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]  # type: ignore[return-value]


# -- the machine and toolchain ----------------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tensorrt_version() -> str | None:
    """The importable TensorRT's version; metadata alone is not enough (a stub sdist installs metadata, no libs)."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


@dataclass(frozen=True)
class Environment:
    """What an engine is tied to: the GPU (name + compute capability) and the versions of the tools."""

    gpu: str  # "cpu" without CUDA
    sm: str | None  # compute capability as TensorRT names it ("90"); None on CPU
    torch: str
    tensorrt: str | None
    modelopt: str | None

    @classmethod
    def current(cls, device: torch.device | None = None) -> Environment:
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gpu, sm = "cpu", None
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            gpu, sm = props.name, f"{props.major}{props.minor}"
        return cls(gpu, sm, torch.__version__, tensorrt_version(), package_version("nvidia-modelopt"))

    def describe(self) -> str:
        return "cpu" if self.sm is None else f"sm{self.sm} {self.gpu}"

    def device_dir(self) -> str:
        if self.sm is None:
            return "cpu"
        slug = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        return f"{slug}-sm{self.sm}"

    def backend_version(self, backend: Backend) -> str | None:
        """The version a backend's engines are tied to: TensorRT's plan format, torch's AOTInductor ABI."""
        return self.tensorrt if backend == "tensorrt" else self.torch


def engine_path(engines_dir: Path, key: EngineKey, env: Environment) -> Path:
    version = env.backend_version(key.backend) or "none"
    return engines_dir / env.device_dir() / f"{key.backend}-{version}" / (key.name() + ENGINE_SUFFIX[key.backend])


def manifest_path(engine: Path) -> Path:
    return engine.with_suffix(".json")


# -- hashes -----------------------------------------------------------------------------------------------------------


def weight_hash(module: nn.Module) -> str:
    """sha256 over the state dict in name order: name, dtype, shape and bytes of every tensor.

    Taken in the dtype the engine is built from (bf16 for a bf16 or fp8 build), so the server, which loads the same
    checkpoint in the same dtype, gets the same hash. Seconds for 1.3B parameters.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# -- the manifest -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    key: EngineKey
    env: Environment
    file: str  # the engine's file name, next to this manifest
    file_sha256: str
    weight_sha256: str
    tensors: dict[str, dict[str, Any]]  # name → {"io": "input"|"output", "shape": [...], "dtype": "float32"}
    built_at: str  # UTC, ISO 8601
    build_s: float
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)  # unsorted: `tensors` keeps the step's argument order

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Raises ValueError (msgspec's errors are ValueErrors) for anything but a manifest of this version whose
        fields have their types, and whose `file` names a file beside it: a folder shared between machines may hold
        any JSON, and `clean` deletes what a manifest names."""
        data = msgspec.json.decode(text)
        if not isinstance(data, dict):
            raise ValueError(f"a manifest is a JSON object, not {type(data).__name__}")
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {data.get('version')!r}, this build reads {MANIFEST_VERSION}")
        manifest = msgspec.convert(data, cls)
        if Path(manifest.file).name != manifest.file or manifest.file in ("", ".", ".."):
            raise ValueError(f"'file' must name a file beside the manifest, not {manifest.file!r}")
        return manifest

    def write(self, engine: Path) -> Path:
        path = manifest_path(engine)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: a reader sees the old manifest or the new one, never half of one
        return path


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_manifest(path: Path) -> Manifest:
    """Raises ValueError with the file named when the manifest cannot be read."""
    try:
        return Manifest.from_json(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and msgspec's errors are ValueErrors
        raise ValueError(f"unreadable manifest {path}: {exc}") from None


def all_manifests(engines_dir: Path) -> list[tuple[Path, Manifest | str]]:
    """Every manifest under `engines_dir`, parsed, or the reason it could not be."""
    found: list[tuple[Path, Manifest | str]] = []
    for path in sorted(engines_dir.glob("*/*/*.json")):
        if not path.is_file():  # a folder named like one is not a manifest, nor a reason to fail
            continue
        try:
            found.append((path, read_manifest(path)))
        except ValueError as exc:
            found.append((path, str(exc)))
    return found


def mismatch(manifest: Manifest, key: EngineKey, env: Environment, weights: str | None) -> str | None:
    """None when the engine fits `key` on this machine with these weights, else the reason, in words.

    `weights` is the current weight hash, or None to skip that check (listing engines without loading a model).
    The checks go from the machine to the artifact, so the reason names the most basic difference.
    """
    built, key_built = manifest.env, manifest.key
    if (built.gpu, built.sm) != (env.gpu, env.sm):  # plans are tied to the GPU model by default (trt.md §1.7)
        return f"built for {built.describe()}, this is {env.describe()}"
    if key_built.backend != key.backend:
        return f"backend {key_built.backend} ≠ {key.backend}"
    tool = "TensorRT" if key.backend == "tensorrt" else "torch"
    if built.backend_version(key.backend) != env.backend_version(key.backend):
        return f"{tool} {built.backend_version(key.backend)} ≠ {env.backend_version(key.backend) or 'not installed'}"
    if (key_built.pipeline, key_built.component) != (key.pipeline, key.component):
        return f"engine of {key_built.pipeline} {key_built.component}, wanted {key.pipeline} {key.component}"
    if (key_built.height, key_built.width) != (key.height, key.width):
        return f"shape {key_built.height}x{key_built.width} ≠ {key.height}x{key.width}"
    for name in ("vae_type", "chunk_frames", "cache_frames", "text_len", "precision"):
        if getattr(key_built, name) != getattr(key, name):
            return f"{name} {getattr(key_built, name)} ≠ {getattr(key, name)}"
    if weights is not None and manifest.weight_sha256 != weights:
        return f"weights differ (engine built from {manifest.weight_sha256[:12]}, loaded {weights[:12]})"
    return None


def with_backend(key: EngineKey, backend: Backend) -> EngineKey:
    return dataclasses.replace(key, backend=backend)
