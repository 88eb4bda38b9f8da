"""One DiT step, three backends (DESIGN.md "The model step"), and the choice between them at load time.

Every backend is called exactly like `WanDiT.step`:

    flow = step(latents, timestep, text_kv, cache_k, cache_v, write_index, key_bias, frame_positions)

with the caches updated in place, so the chunk loop does not know which one runs. `eager` is the reference;
`compiled` runs an AOTInductor package and `tensorrt` a TensorRT plan, each used only when its manifest matches this
machine, the toolchain, the shapes and the loaded weights (build_engines/manifest.py). Anything else is said in
words: `auto` falls back and reports why, a forced backend that cannot be honoured fails the load with the reason.
The VAE's steady-state chunk steps (serve/runtime/vae_steps.py) are chosen by the same `select_backend`, with their
own keys and step objects.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, Self

import torch
from torch import Tensor, nn

from build_engines.manifest import (
    Backend,
    EngineKey,
    Environment,
    Manifest,
    all_manifests,
    engine_path,
    file_hash,
    mismatch,
    weight_hash,
    with_backend,
)
from serve.errors import PipelineLoadError

log = logging.getLogger(__name__)

ENGINE_BACKEND: dict[str, Backend] = {"compiled": "aoti", "tensorrt": "tensorrt"}
AUTO_ORDER = ("tensorrt", "compiled")  # best first; eager is always there


KeyRope = tuple[Tensor, Tensor] | None


class DiTStep(Protocol):
    def __call__(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_kv: tuple[Tensor, Tensor],
        cache_k: Tensor,
        cache_v: Tensor,
        write_index: Tensor,
        key_bias: Tensor,
        frame_positions: Tensor,
        key_rope: KeyRope = None,
    ) -> Tensor: ...


Step = Any  # a DiTStep, or a VAE chunk step (serve/runtime/vae_steps.py): the component decides which


class BackendUnavailable(Exception):
    """This backend cannot run the step here; the message is the reason, for status and logs."""


class EngineStep:
    """What the engine backends share: an engine runs the one static shape it was built for, with keys cached at
    absolute positions. Other steps of a pipeline (LongLive's re-cache over the whole window, Krea's context
    recompute, window-relative keys, a VAE chunk of another geometry) run eager, and the first of each kind says so
    in one log line."""

    def __init__(self, path: Path, input_shape: tuple[int, ...], fallback: Callable | None) -> None:
        self.path = path
        self.input_shape = input_shape  # the DiT's latents, the VAE's pixels or latents
        self.fallback = fallback
        self._logged: set[tuple] = set()

    def runs_here(self, x: Tensor, key_rope: KeyRope) -> bool:
        if key_rope is None and tuple(x.shape) == self.input_shape:
            return True
        kind = (tuple(x.shape), key_rope is not None)
        if kind not in self._logged:
            self._logged.add(kind)
            log.info(
                "engine=%s built for input %s: a step with input %s%s runs eager", self.path.name,
                self.input_shape, tuple(x.shape), " and window-relative keys" if key_rope else "",
            )  # fmt: skip
        if self.fallback is None:
            raise ValueError(f"{self.path} runs input {self.input_shape} with absolute keys only")
        return False


class AotiEngine(EngineStep):
    """An AOTInductor package (build_engines/aoti.py), loaded; subclasses call `self.runner` with their step's
    arguments."""

    def __init__(self, path: Path, input_shape: tuple[int, ...], fallback: Callable | None = None) -> None:
        from build_engines.aoti import load_aoti_package

        super().__init__(path, input_shape, fallback)
        self.runner: Callable[..., tuple[Tensor, ...]] = load_aoti_package(path)

    def warm_up(self, manifest: Manifest, device: torch.device) -> Self:
        """One call on zero inputs of the manifest's shapes: loads the kernels now, and proves the package runs."""
        args = [
            torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
            for spec in manifest.tensors.values()
            if spec["io"] == "input"
        ]
        self.runner(*args)
        return self


class CompiledStep(AotiEngine):
    """An AOTInductor package of `DiTStepGraph`: caches in, updated caches out.

    The package returns new caches rather than writing its inputs, so they are copied back into the stream's
    buffers: one cache-sized copy per step. A package of `WanDiT.step` itself, writing its cache inputs in place,
    also works but measured 640 ms against 34 ms for this one (and 49 ms eager) on the tiny SDv2 step on CPU
    (torch 2.13): AOTInductor's handling of the mutated inputs costs far more than the copy. Re-measure on CUDA.
    """

    def __call__(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_kv: tuple[Tensor, Tensor],
        cache_k: Tensor,
        cache_v: Tensor,
        write_index: Tensor,
        key_bias: Tensor,
        frame_positions: Tensor,
        key_rope: KeyRope = None,
    ) -> Tensor:
        args = (latents, timestep, text_kv, cache_k, cache_v, write_index, key_bias, frame_positions)
        if not self.runs_here(latents, key_rope):
            return self.fallback(*args, key_rope=key_rope)  # type: ignore[misc]
        flow, new_k, new_v = self.runner(
            latents, timestep, text_kv[0], text_kv[1], cache_k, cache_v, write_index, key_bias, frame_positions
        )
        cache_k.copy_(new_k)
        cache_v.copy_(new_v)
        return flow


class CompiledVaceStep(AotiEngine):
    """An AOTInductor package of `VaceStepGraph` (build_engines/export.py), called like `VaceWanDiT.step_vace`;
    caches copied back as in `CompiledStep`."""

    def __call__(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_kv: tuple[Tensor, Tensor],
        cache_k: Tensor,
        cache_v: Tensor,
        write_index: Tensor,
        key_bias: Tensor,
        frame_positions: Tensor,
        vace_context: Tensor,
        vace_text_kv: tuple[Tensor, Tensor],
        vace_scale: Tensor,
        key_rope: KeyRope = None,
    ) -> Tensor:
        args = (latents, timestep, text_kv, cache_k, cache_v, write_index, key_bias, frame_positions, vace_context,
                vace_text_kv, vace_scale)  # fmt: skip
        if not self.runs_here(latents, key_rope):
            return self.fallback(*args, key_rope=key_rope)  # type: ignore[misc]
        flow, new_k, new_v = self.runner(
            latents, timestep, text_kv[0], text_kv[1], cache_k, cache_v, write_index, key_bias, frame_positions,
            vace_context, vace_text_kv[0], vace_text_kv[1], vace_scale,
        )  # fmt: skip
        cache_k.copy_(new_k)
        cache_v.copy_(new_v)
        return flow


def first_input_shape(manifest: Manifest) -> tuple[int, ...]:
    """The shape an engine runs: its first input's (the DiT's latents, the VAE's x); `tensors` keeps argument order."""
    return tuple(next(iter(manifest.tensors.values()))["shape"])


def find_engine(
    key: EngineKey, weights: Callable[[], str], engines_dir: Path, env: Environment
) -> tuple[Path, Manifest]:
    """The engine whose manifest matches `key` here, or BackendUnavailable naming the closest miss.

    Every manifest of the same pipeline, component and backend is a candidate, wherever it lies, so an engine built
    on another GPU or toolchain is reported as such rather than as "no engine". `weights()` hashes the loaded model
    (seconds for 1.3B) and is called only once some engine passes every other check.
    """
    candidates = [
        (path, manifest)
        for path, manifest in all_manifests(engines_dir)
        if isinstance(manifest, Manifest)
        and (manifest.key.pipeline, manifest.key.component, manifest.key.backend)
        == (key.pipeline, key.component, key.backend)
    ]
    if not candidates:
        raise BackendUnavailable(
            f"no {key.backend} engine for {key.describe()} under {engines_dir} (build it: wanrt engines build "
            f"--pipeline {key.pipeline} --height {key.height} --width {key.width} --backend {key.backend})"
        )
    here = engine_path(engines_dir, key, env).parent
    candidates.sort(key=lambda c: c[0].parent != here)  # engines for this machine and toolchain first
    reasons = []
    for path, manifest in candidates:
        reason = mismatch(manifest, key, env, None) or mismatch(manifest, key, env, weights())
        engine = path.parent / manifest.file
        if reason is None and not engine.exists():
            reason = f"engine file {engine} is missing"
        elif reason is None and file_hash(engine) != manifest.file_sha256:
            reason = f"engine file {engine} is corrupt (sha256 differs from its manifest); rebuild it"
        if reason is None:
            return engine, manifest
        reasons.append(f"{path.parent / manifest.file}: {reason}")
    reason_text = reasons[0] + (f" (and {len(reasons) - 1} other engines that do not fit)" if len(reasons) > 1 else "")
    raise BackendUnavailable(reason_text)


def eager_step(key: EngineKey, model: nn.Module) -> Step:
    """The model's own step, the oracle for the engines: `WanDiT.step`, or the VAE's `encode_step` / `decode_step`."""
    if key.component == "dit_step":
        return model.step
    if key.component == "dit_step_vace":
        return model.step_vace
    return model.encode_step if key.component == "vae_encode" else model.decode_step


def engine_step(backend: str, key: EngineKey, engine: Path, manifest: Manifest, model: nn.Module,
                device: torch.device) -> Step:  # fmt: skip
    """The step object of one component on one engine backend, loaded and ready."""
    fallback = eager_step(key, model)
    if key.component in ("dit_step", "dit_step_vace") and backend == "compiled":
        compiled = CompiledStep if key.component == "dit_step" else CompiledVaceStep
        return compiled(engine, first_input_shape(manifest), fallback).warm_up(manifest, device)
    if key.component in ("dit_step", "dit_step_vace"):
        from serve.runtime.tensorrt_step import TensorRTStep, TensorRTVaceStep

        tensorrt = TensorRTStep if key.component == "dit_step" else TensorRTVaceStep
        return tensorrt(engine, device, fallback)  # type: ignore[arg-type]
    if backend == "compiled":
        from serve.runtime.vae_steps import CompiledChunkStep

        return CompiledChunkStep(engine, first_input_shape(manifest), fallback).warm_up(manifest, device)  # type: ignore[arg-type]
    from serve.runtime.tensorrt_step import TensorRTChunkStep

    return TensorRTChunkStep(engine, device, fallback)  # type: ignore[arg-type]


def load_backend(
    backend: str, key: EngineKey, model: nn.Module, weights: Callable[[], str], engines_dir: Path, device: torch.device
) -> tuple[Step, str]:
    """(step, reason it was chosen) for one named backend; BackendUnavailable with the reason otherwise."""
    if backend == "eager":
        return eager_step(key, model), "eager PyTorch"
    env = Environment.current(device)
    if backend == "tensorrt":
        from build_engines.tensorrt import TensorRTUnavailable, import_tensorrt

        try:
            import_tensorrt()
        except TensorRTUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None
    engine, manifest = find_engine(with_backend(key, ENGINE_BACKEND[backend]), weights, engines_dir, env)
    try:
        step = engine_step(backend, key, engine, manifest, model, device)
    except Exception as exc:  # a file that passed its hash but does not load is still only this backend's failure
        raise BackendUnavailable(f"engine {engine} failed to load: {type(exc).__name__}: {exc}") from None
    return step, f"engine {engine} matches (built {manifest.built_at})"


def select_backend(
    requested: str,
    key: EngineKey,
    model: nn.Module,
    engines_dir: Path,
    device: torch.device,
    engines_unusable: str | None = None,
    weights_of: nn.Module | None = None,
) -> tuple[Step, str, str]:
    """(step, backend name, reason) for the component `key` names: the DiT step, or a VAE chunk step with `model`
    the VAE. `auto` takes the best backend whose engine fits and says why the better ones did not; a named backend
    is honoured or the load fails with PipelineLoadError naming the reason. `engines_unusable`: why this pipeline
    cannot run any engine of this component at all (its own reason), or None. `weights_of`: the module whose weights
    the engine must match, when not all of `model` (the base step of a VACE model: `VaceWanDiT.base_part()`)."""
    weights = functools.cache(
        lambda: weight_hash(weights_of if weights_of is not None else model)
    )  # hashed once, and only if some engine needs the check

    order = (*AUTO_ORDER, "eager") if requested == "auto" else (requested,)
    skipped = []
    for backend in order:
        try:
            if engines_unusable and backend != "eager":
                raise BackendUnavailable(engines_unusable)
            step, why = load_backend(backend, key, model, weights, engines_dir, device)
        except BackendUnavailable as exc:
            if requested != "auto":
                where = "" if key.component == "dit_step" else f" for {key.component}"
                raise PipelineLoadError(f"{key.pipeline}: backend {backend!r} cannot be used{where}: {exc}") from None
            skipped.append(f"{backend}: {exc}")
            continue
        reason = why if not skipped else f"{why}; skipped " + "; ".join(skipped)
        log.log(
            logging.WARNING if skipped else logging.INFO,
            "pipeline=%s component=%s backend=%s requested=%s reason=%s", key.pipeline, key.component, backend,
            requested, reason,
        )  # fmt: skip
        return step, backend, reason
    raise AssertionError("eager is always available")  # pragma: no cover
