"""User LoRAs: the LoRA folder, a load's `loras` resolved inside it, and how each is applied to a pipeline's DiT.

Order (scope-features.md §2, minus Scope's merge-all side effect): base weights → the pipeline's built-in LoRA
(LongLive, MemFlow: merged as the weights load) → user `permanent_merge` LoRAs in the order given (merged into the
weights, so the engine weight hash covers them) → fp8 storage → user `runtime_peft` LoRAs in the order given (factors
beside the Linears, `serve/models/lora.py`). A runtime adapter never touches the weights, so the built-in LoRA and
the merged ones stay exactly as loaded.

This module imports torch only inside the functions that need it: the HTTP layer lists the folder through it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.assets import confined_file, echo
from serve.errors import InvalidParameters, PipelineLoadError

if TYPE_CHECKING:
    from torch import nn

    from serve.models.lora import LoraAdapter, RuntimeLoras

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".bin")
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class LoraRequest:
    path: str  # as given: a name inside the LoRA folder
    scale: float
    merge_mode: str  # "permanent_merge" | "runtime_peft"


def requested_loras(load_params: dict[str, Any]) -> list[LoraRequest]:
    default_mode = load_params.get("lora_merge_mode", "permanent_merge")
    return [
        LoraRequest(item["path"], float(item.get("scale", 1.0)), item.get("merge_mode", default_mode))
        for item in load_params.get("loras") or []
    ]


def merged_lora_key(requests: list[LoraRequest]) -> str | None:
    """What the engine key says of the merged LoRAs (`name@scale,...`); the manifest's weight hash still checks the
    merged weights themselves."""
    merged = [f"{r.path}@{r.scale:g}" for r in requests if r.merge_mode == "permanent_merge"]
    return ",".join(merged) or None


def resolve_lora_path(lora_dir: Path, name: str) -> Path:
    """The file `name` names inside `lora_dir` (serve/assets.confined_file: the one check of a client's path);
    InvalidParameters for anything else, saying what is accepted and never where the folder is."""
    path = confined_file(lora_dir.resolve(), name)
    if path is None:
        raise InvalidParameters(
            f"LoRA {echo(name)}: no such file in the LoRA folder; give a path inside it, as GET /api/v1/loras lists"
        )
    if path.suffix not in LORA_SUFFIXES:
        raise InvalidParameters(f"LoRA {echo(name)}: a LoRA file ends in {', '.join(LORA_SUFFIXES)}")
    return path


def check_requests(requests: list[LoraRequest], lora_dir: Path) -> None:
    """At the load request, before the loaded pipeline is released: every path resolves to a file that holds LoRA
    factors (its header and shapes; `GET /api/v1/loras` reads the same), no path is given twice. Blocking (file
    headers): call it on a thread."""
    from serve.models.checkpoint import CheckpointError
    from serve.models.lora import read_lora_file

    seen: set[Path] = set()
    for request in requests:
        path = resolve_lora_path(lora_dir, request.path)
        if path in seen:
            raise InvalidParameters(f"LoRA {request.path!r} is listed twice; give it once with the scale you want")
        seen.add(path)
        try:
            read_lora_file(path)
        except CheckpointError as exc:  # else the load failed on it after the running pipeline had been released
            raise InvalidParameters(f"LoRA {request.path!r}: {_relative(exc, lora_dir)}") from None


@dataclass
class UserLoras:
    """What a load did with its `loras`; `adapters` is what the pipeline status lists."""

    runtime: list[tuple[str, LoraAdapter, float]]  # attached after fp8 storage
    adapters: list[dict[str, Any]]

    @property
    def runtime_scales(self) -> dict[str, float]:
        return {path: scale for path, _, scale in self.runtime}


def merge_user_loras(dit: nn.Module, requests: list[LoraRequest], lora_dir: Path, pipeline_id: str) -> UserLoras:
    """Read every requested LoRA against `dit` (which fails a file of another model size, naming it), merge the
    `permanent_merge` ones now, keep the `runtime_peft` ones for `attach_runtime`."""
    from serve.models.checkpoint import CheckpointError
    from serve.models.lora import match_model, merge_lora, read_lora_file

    runtime, adapters = [], []
    for request in requests:
        path = resolve_lora_path(lora_dir, request.path)
        try:
            adapter = match_model(read_lora_file(path), dit)
            if request.merge_mode == "permanent_merge":
                merge_lora(dit, adapter, request.scale)
        except CheckpointError as exc:
            raise PipelineLoadError(f"{pipeline_id}: {_relative(exc, lora_dir)}") from None
        if request.merge_mode == "runtime_peft":
            runtime.append((request.path, adapter, request.scale))
        adapters.append({
            "path": request.path, "scale": request.scale, "merge_mode": request.merge_mode, "rank": adapter.rank,
            "layers": len(adapter.layers), "unmatched_keys": len(adapter.unmatched), "base_model": adapter.base_model(),
        })  # fmt: skip
        log.info("pipeline=%s lora=%s mode=%s scale=%s layers=%d unmatched=%d", pipeline_id, request.path,
                 request.merge_mode, request.scale, len(adapter.layers), len(adapter.unmatched))  # fmt: skip
    return UserLoras(runtime, adapters)


def attach_runtime(dit: nn.Module, loras: UserLoras) -> RuntimeLoras | None:
    from serve.models.lora import attach_runtime_loras

    return attach_runtime_loras(dit, loras.runtime) if loras.runtime else None


def check_lora_scales(update: dict[str, Any], runtime_paths: tuple[str, ...]) -> None:
    """A `lora_scales` update may name only this load's runtime adapters (a merged LoRA has no live scale)."""
    for item in update.get("lora_scales") or []:
        if item["path"] not in runtime_paths:
            loaded = ", ".join(runtime_paths) or "none"
            raise InvalidParameters(
                f"lora_scales: {item['path']!r} is not a runtime LoRA of the loaded pipeline (runtime adapters: "
                f"{loaded}); load it with merge_mode 'runtime_peft' to steer its scale live"
            )


def _relative(exc: Exception, lora_dir: Path) -> str:
    """The error without the server's folder: users named the file relative to it."""
    return str(exc).replace(f"{lora_dir.resolve()}/", "").replace(f"{lora_dir}/", "")


# -- the folder, as GET /api/v1/loras lists it -----------------------------------------------------------------------


class LoraCatalog:
    """The LoRA folder's files with size, rank and the base model they fit (read from the file's shapes) and sha256
    (hashed once per file version, in the background: null until done)."""

    def __init__(self, lora_dir: Path) -> None:
        self.lora_dir = lora_dir
        self._described: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._hashing: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-sha256")

    def _files(self) -> list[Path]:
        if not self.lora_dir.is_dir():
            return []
        return sorted(p for p in self.lora_dir.resolve().rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file())

    def paths(self) -> list[str]:
        """The files' paths as a load's `loras` names them, and nothing read from them: cheap enough for every
        cluster summary (a front places a load on a worker whose folder has its LoRAs). Blocking: a folder walk."""
        root = self.lora_dir.resolve()
        return [str(path.relative_to(root)) for path in self._files()]

    def list(self) -> list[dict[str, Any]]:
        """Blocking (file headers, sometimes torch's import): call it on a thread."""
        root = self.lora_dir.resolve()
        out = []
        for path in self._files():
            stat = path.stat()
            version = (str(path), stat.st_size, stat.st_mtime_ns)
            relative = path.relative_to(root)
            entry = {
                "name": path.stem,
                "path": str(relative),
                "folder": str(relative.parent) if relative.parent != Path(".") else "",
                "size_bytes": stat.st_size,
                "size_mb": round(stat.st_size / 2**20, 2),
                **self._describe(path, version),
                "sha256": self._sha256(path, version),
            }
            out.append(entry)
        return out

    def _describe(self, path: Path, version: tuple[str, int, int]) -> dict[str, Any]:
        if version not in self._described:
            from serve.models.checkpoint import CheckpointError
            from serve.models.lora import read_lora_file

            try:
                adapter = read_lora_file(path)
                info = {"rank": adapter.rank, "base_model": adapter.base_model(), "layers": len(adapter.layers),
                        "error": None}  # fmt: skip
            except CheckpointError as exc:
                info = {"rank": None, "base_model": None, "layers": 0, "error": _relative(exc, self.lora_dir)}
            self._described[version] = info
        return self._described[version]

    def _sha256(self, path: Path, version: tuple[str, int, int]) -> str | None:
        with self._lock:
            if version in self._hashes:
                return self._hashes[version]
            if version not in self._hashing:
                self._hashing.add(version)
                self._hasher.submit(self._hash, path, version)
        return None

    def _hash(self, path: Path, version: tuple[str, int, int]) -> None:
        digest: hashlib._Hash | None = hashlib.sha256()
        try:
            with path.open("rb") as file:
                while chunk := file.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)  # type: ignore[union-attr]
        except OSError as exc:
            log.warning("lora=%s sha256 failed: %s", path, exc)
            digest = None
        with self._lock:
            if digest is not None:
                self._hashes[version] = digest.hexdigest()
            self._hashing.discard(version)

    def close(self) -> None:
        self._hasher.shutdown(wait=False, cancel_futures=True)
