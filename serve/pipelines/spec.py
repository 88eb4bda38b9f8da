"""What a pipeline declares about itself: defaults, accepted fields, files, and the JSON schemas built from them.

Specs are plain data and import no torch, so the HTTP layer can list pipelines, validate requests and check weights
without loading a model. The implementation behind a spec is imported only when it is loaded (`factory`).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from serve.assets import confined_file, echo, sniff_media
from serve.errors import InvalidParameters, RandomWeightsNotAllowed, UnsupportedMedia
from serve.schemas import LoadParams, RuntimeParameters

Mode = Literal["video", "text"]

# Runtime fields every pipeline takes. VACE fields are accepted everywhere so that the seed's flows work unchanged;
# a pipeline without VACE support says so in its schema (`supports_vace`).
COMMON_RUNTIME_FIELDS = frozenset(
    {
        "input_mode",
        "prompts",
        "prompt_interpolation_method",
        "transition",
        "denoising_step_list",
        "warp_denoising_steps",
        "noise_scale",
        "noise_controller",
        "manage_cache",
        "reset_cache",
        "paused",
        "vace_enabled",
        "vace_use_input_video",
        "vace_ref_images",
        "vace_context_scale",
        "first_frame_image",
        "last_frame_image",
    }
)
MODEL_LOAD_FIELDS = frozenset(
    {
        "height",
        "width",
        "seed",
        "base_seed",
        "quantization",
        "vace_enabled",
        "vae_type",
        "loras",
        "lora_merge_mode",
        "manage_cache",
        "gpus",
        "stream_batch",
        "blocks_per_stage",
        "rebalance_stages",
        "denoising_step_list",
        "warp_denoising_steps",
        "vace_context_scale",
        "backend",
        "random_weights",
    }
)
ASSET_PATH_FIELDS = ("vace_ref_images", "first_frame_image", "last_frame_image")


@dataclass(frozen=True)
class ModelFile:
    """One file a pipeline needs, as published: `repo` on the Hugging Face hub, `path` inside it."""

    repo: str
    path: str

    def local_path(self, models_dir: Path) -> Path:
        # One folder per published repo, named as the repo (Scope's layout).
        return models_dir / self.repo.split("/")[-1] / self.path


@dataclass(frozen=True)
class PipelineSpec:
    id: str
    name: str
    description: str
    base_model: str | None
    default_mode: Mode
    chunk_frames: int
    """Pixel frames consumed and produced per chunk in video mode (4 = 1 latent frame, 12 = 3 latent frames)."""
    load_defaults: dict[str, Any]
    runtime_defaults: dict[str, Any]
    load_fields: frozenset[str]
    runtime_fields: frozenset[str]
    estimated_vram_gb: float = 0.0
    supports_vace: bool = False
    supports_lora: bool = False
    supports_cache_management: bool = False
    supports_quantization: bool = False
    files: tuple[ModelFile, ...] = ()
    vace_files: tuple[ModelFile, ...] = ()
    """Needed only by a `vace_enabled` load (the VACE module: 1.5 GB / 6 GB), fetched only when asked for."""
    factory: str | None = None
    """`module:attribute` of the implementation, imported at load time; None while it is not built yet."""
    mode_defaults: dict[Mode, dict[str, Any]] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.factory is not None

    def missing_files(self, models_dir: Path) -> list[ModelFile]:
        return [f for f in self.files if not f.local_path(models_dir).is_file()]

    def with_vace_files(self) -> PipelineSpec:
        """This spec with the VACE files among `files` (for downloads and checks asked to include them)."""
        return dataclasses.replace(self, files=self.files + self.vace_files)

    def resolve_factory(self) -> Any:
        assert self.factory is not None
        module_name, attribute = self.factory.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    # -- validation -------------------------------------------------------------------------------------------------

    def effective_load_params(self, params: LoadParams, *, allow_random_weights: bool) -> dict[str, Any]:
        """Defaults overlaid with what the request set; raises with a message naming the offending field."""
        given = msgspec.to_builtins(params)
        _reject_unknown(given, self.load_fields, f"load parameter for pipeline '{self.id}'")
        if "base_seed" in given:
            if "seed" in given and given["seed"] != given["base_seed"]:
                raise InvalidParameters("'seed' and 'base_seed' name the same value; give one, or equal values")
            given["seed"] = given.pop("base_seed")
        if "denoising_step_list" in given:
            _check_descending(given["denoising_step_list"])
        if given.get("random_weights") and not allow_random_weights:
            raise RandomWeightsNotAllowed(
                "random_weights is accepted only when the server was started with --allow-random-weights "
                "(it serves a tiny model with seeded random weights, for demos and tests)"
            )
        return {**self.load_defaults, **given}

    def session_params(self, load_params: dict[str, Any]) -> dict[str, Any]:
        """The runtime parameters a new session starts with: the defaults, then the load-time values sessions take."""
        params = {**self.runtime_defaults}
        for name in ("denoising_step_list", "warp_denoising_steps", "vace_enabled", "vace_context_scale"):
            if name in load_params:
                params[name] = load_params[name]
        return params

    def validate_update(self, params: RuntimeParameters, assets_dir: Path) -> dict[str, Any]:
        """The set fields of a runtime update, checked against this pipeline; raises InvalidParameters."""
        given = msgspec.to_builtins(params)
        _reject_unknown(given, self.runtime_fields, f"runtime parameter for pipeline '{self.id}'")
        if "denoising_step_list" in given:
            _check_descending(given["denoising_step_list"])
        if given.get("prompts"):
            _check_weights("prompts", given["prompts"])
        if "transition" in given:
            _check_weights("transition.target_prompts", given["transition"]["target_prompts"])
        for name in ASSET_PATH_FIELDS:
            if name in given:  # replaced by the resolved absolute paths: the pipeline reads exactly what was checked
                if isinstance(given[name], list):
                    given[name] = [_check_asset_path(name, path, assets_dir) for path in given[name]]
                else:
                    given[name] = _check_asset_path(name, given[name], assets_dir)
        return given

    # -- schema -----------------------------------------------------------------------------------------------------

    def schema(self, missing_files: list[str]) -> dict[str, Any]:
        """What `GET /api/v1/pipelines/schemas` says of it; `missing_files` (`repo/path`) from the serving side."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "base_model": self.base_model,
            "default_mode": self.default_mode,
            "chunk_frames": self.chunk_frames,
            "estimated_vram_gb": self.estimated_vram_gb,
            "supports_vace": self.supports_vace,
            "supports_lora": self.supports_lora,
            "supports_cache_management": self.supports_cache_management,
            "supports_quantization": self.supports_quantization,
            "available": self.available,
            "weights_present": not missing_files,
            "missing_files": missing_files,
            "load_params": _object_schema(LoadParams, self.load_fields, self.load_defaults),
            "runtime_params": _object_schema(RuntimeParameters, self.runtime_fields, self.runtime_defaults),
            "mode_defaults": self.mode_defaults,
        }


def _reject_unknown(given: dict[str, Any], accepted: frozenset[str], what: str) -> None:
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise InvalidParameters(
            f"{', '.join(map(repr, unknown))} is not a {what}; accepted: {', '.join(sorted(accepted))}"
        )


def _check_descending(steps: list[int]) -> None:
    if any(a <= b for a, b in itertools.pairwise(steps)):
        raise InvalidParameters(f"denoising_step_list must be strictly descending, got {steps}")


def _check_weights(name: str, prompts: list[dict[str, Any]]) -> None:
    """The blend normalises the weights to sum 1 (serve/models/prompts.py): all zero has no blend."""
    if sum(prompt.get("weight", 1.0) for prompt in prompts) <= 0:
        raise InvalidParameters(f"{name}: the weights sum to 0; give at least one prompt a weight above 0")


def _check_asset_path(name: str, path: str, assets_dir: Path) -> str:
    """The resolved path of an uploaded image (serve/assets.confined_file: the one check of a client's path);
    raises InvalidParameters for anything else."""
    resolved = confined_file(assets_dir.resolve(), path)
    if resolved is None:
        raise InvalidParameters(
            f"{name}: {echo(path)} is not an uploaded asset; upload it with POST /api/v1/assets and use the returned "
            "path"
        )
    with resolved.open("rb") as file:  # 16 bytes: the content decides, as at upload (a video is not an image)
        head = file.read(16)
    try:
        kind, _ = sniff_media(head)
    except UnsupportedMedia:
        kind = None
    if kind != "image":
        raise InvalidParameters(f"{name}: {echo(path)} is not an image (PNG, JPEG, WebP, GIF or BMP)")
    return str(resolved)


def _object_schema(struct: type, fields: frozenset[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of the Struct restricted to `fields`, with this pipeline's defaults filled in."""
    schema = msgspec.json.schema(struct)
    defs = schema["$defs"]
    body = defs[struct.__name__]
    properties = {}
    for name, prop in body["properties"].items():
        if name in fields:
            properties[name] = {**prop, "default": defaults[name]} if name in defaults else prop
    referenced = {k: v for k, v in defs.items() if k != struct.__name__}
    return {"type": "object", "properties": properties, "additionalProperties": False, "$defs": referenced}
