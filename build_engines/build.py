"""`wanrt engines build`: weights → (fp8 quantization) → export → TensorRT plan or AOTInductor package + manifest,
for each of a pipeline's steps: the DiT step and the VAE's steady-state encode and decode chunk steps.

The models are loaded exactly as the server loads them (same functions, same dtype), so the weight hash in the
manifest is the one the server computes when it checks the engine. A build whose manifest already matches is
skipped ("up to date"), which makes `make engines` cheap to re-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from build_engines.manifest import (
    Backend,
    EngineKey,
    Environment,
    Manifest,
    Precision,
    dit_step_key,
    engine_path,
    file_hash,
    manifest_path,
    mismatch,
    precision_of,
    read_manifest,
    utc_now,
    vae_step_key,
    weight_hash,
)
from serve.errors import InvalidParameters, PipelineLoadError
from serve.models.dit import WanDiT
from serve.models.fp8 import Fp8Linear, store_dit_in_fp8
from serve.models.kv_cache import KVCacheSpec, RollingSinkPolicy
from serve.models.vace import VaceWanDiT
from serve.pipelines.loras import LoraRequest, merge_user_loras, merged_lora_key

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
FP8_MIN_SM = 89  # fp8 tensor cores: Ada and Hopper onwards (trt.md §0.4)


class EngineBuildError(RuntimeError):
    """A build that cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class BuildRequest:
    pipeline: str
    engines_dir: Path
    models_dir: Path
    height: int | None = None  # None: the pipeline's seed resolution
    width: int | None = None
    precision: Precision | None = None  # None: the default load's (`default_precision`)
    backend: Backend | None = None  # None: TensorRT where importable with a GPU, else AOTInductor
    vae_type: str | None = None  # None: the pipeline's default (`wan`)
    random_weights: bool = False
    seed: int = 42  # the random weights' seed: the server's default `seed` load parameter
    force: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # user LoRAs merged into the DiT (name in lora_dir, scale)
    lora_dir: Path | None = None  # None: lora/ in models_dir, as the server's default
    vace: bool = False  # also the VACE-enabled DiT step (`dit_step_vace`), from a `vace_enabled` load


@dataclass(frozen=True)
class BuildResult:
    key: EngineKey
    path: Path
    status: str  # "built" or "up to date"
    seconds: float


def default_backend(device: torch.device) -> Backend:
    from build_engines.manifest import tensorrt_version

    return "tensorrt" if device.type == "cuda" and tensorrt_version() else "aoti"


def default_precision(env: Environment, quantization: str | None) -> Precision:
    """What the pipeline's default load runs, so that `make engines` builds the engines `make serve` picks: a load
    looks for fp8 engines only with `quantization: fp8_e4m3fn` (Krea's default), bf16 ones otherwise (fp8 engines by
    default left every other pipeline's default load on eager); fp32 on a CPU."""
    if env.sm is None:
        return "fp32"
    return "fp8" if quantization == "fp8_e4m3fn" and int(env.sm) >= FP8_MIN_SM else "bf16"


def dit_step_args(model: WanDiT, key: EngineKey, device: torch.device) -> tuple[Tensor, ...]:
    """Inputs of one step with exactly the shapes and dtypes the chunk loop passes (serve/pipelines/chunk_loop.py):
    latents, text K/V and caches in the model dtype; timestep and key bias fp32; slots and positions int64."""
    config, dtype = model.config, DTYPES[key.precision]
    frame_tokens = (key.height // 16) * (key.width // 16)
    spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, frame_tokens, key.cache_frames)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, key.chunk_frames, key.height // 8, key.width // 8, generator=generator)
    context = torch.randn(1, config.text_len, config.text_dim, generator=generator)
    with torch.no_grad():
        text_k, text_v = model.text_kv(context.to(device, next(model.parameters()).dtype))
    cache_shape = (spec.layers, spec.batch, spec.max_tokens, spec.heads, spec.head_dim)
    cache_k = torch.zeros(cache_shape, dtype=dtype, device=device)
    plan = RollingSinkPolicy(spec, sink_frames=min(3, key.cache_frames - 1), device=device).plan(0, key.chunk_frames)
    return (
        latents.to(device, dtype), torch.full((1, key.chunk_frames), 750.0, device=device),
        text_k.to(dtype), text_v.to(dtype), cache_k, cache_k.clone(), *plan.as_args(),
    )  # fmt: skip


def tensor_specs(names: tuple[str, ...], tensors: tuple[Tensor, ...], io: str) -> dict[str, dict[str, Any]]:
    return {
        n: {"io": io, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for n, t in zip(names, tensors, strict=True)
    }


@contextlib.contextmanager
def stage(progress: Progress, description: str) -> Iterator[None]:
    """One line per long stage, with a spinner and the elapsed time, left on screen when done."""
    task = progress.add_task(description, total=1)
    try:
        yield
    finally:
        progress.update(task, completed=1)


def load_models(request: BuildRequest, spec: Any, shape: Any, device: torch.device, dtype: torch.dtype):
    """The same loading as `AutoregressivePipeline.load`, so the weight hash matches the server's."""
    from serve.pipelines.weights import load_weights, random_models
    from serve.schemas import LoadParams

    vae_type = {"vae_type": request.vae_type} if request.vae_type else {}  # unset: the pipeline's default
    load = LoadParams(height=request.height, width=request.width, seed=request.seed,
                      random_weights=request.random_weights, vace_enabled=request.vace, **vae_type)  # fmt: skip
    params = spec.effective_load_params(load, allow_random_weights=True)
    if request.random_weights:
        models = random_models(params, device, seed=request.seed)
    else:
        try:
            models = load_weights(
                spec, params, request.models_dir, dit_config=shape.dit_config, prefer=shape.checkpoint_prefer,
                device=device, dtype=dtype, report=lambda *_: None,
            )  # fmt: skip
        except Exception as exc:  # PipelineLoadError and friends: the message names the missing files
            raise EngineBuildError(f"{exc} (or build with --random-weights)") from None
    try:
        merge_user_loras(models.dit, lora_requests(request), lora_dir(request), spec.id)
    except (InvalidParameters, PipelineLoadError) as exc:
        raise EngineBuildError(str(exc)) from None
    return models


def lora_requests(request: BuildRequest) -> list[LoraRequest]:
    return [LoraRequest(name, scale, "permanent_merge") for name, scale in request.loras]


def lora_dir(request: BuildRequest) -> Path:
    return request.lora_dir or request.models_dir / "lora"


@dataclass(frozen=True)
class Plan:
    """What a build request resolves to on this machine."""

    request: BuildRequest  # height and width filled in
    spec: Any
    shape: Any  # the pipeline's ChunkShape
    device: torch.device
    env: Environment
    backend: Backend
    precision: Precision


def plan_build(request: BuildRequest) -> Plan:
    """Defaults filled in and every choice checked before minutes of loading and export."""
    from serve.pipelines.registry import get_spec

    spec = get_spec(request.pipeline)
    shape = getattr(spec.resolve_factory() if spec.available else None, "shape", None)
    if shape is None:
        raise EngineBuildError(f"pipeline {request.pipeline!r} has no model step to build engines for")
    request = dataclasses.replace(
        request,
        height=request.height or spec.load_defaults["height"],
        width=request.width or spec.load_defaults["width"],
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = Environment.current(device)
    backend = request.backend or default_backend(device)
    if backend == "tensorrt":
        from build_engines.tensorrt import TensorRTUnavailable, import_tensorrt

        try:
            import_tensorrt()
        except TensorRTUnavailable as exc:
            raise EngineBuildError(str(exc)) from None
    precision = request.precision or default_precision(env, spec.load_defaults.get("quantization"))
    if precision == "fp8" and (env.sm is None or int(env.sm) < FP8_MIN_SM):
        raise EngineBuildError(f"fp8 needs SM{FP8_MIN_SM}+ (Ada, Hopper); this is {env.describe()}")
    if precision != "fp32" and device.type == "cpu":
        raise EngineBuildError(f"{precision} engines are GPU engines; on CPU build fp32")
    return Plan(request, spec, shape, device, env, backend, precision)


def stale_reason(path: Path, key: EngineKey, env: Environment, weights: str) -> str | None:
    """None when the engine at `path` is up to date for `key`, these tools and these weights."""
    if not manifest_path(path).exists():
        return "not built yet"
    try:
        manifest = read_manifest(manifest_path(path))
    except ValueError as exc:
        return str(exc)
    if reason := mismatch(manifest, key, env, weights):
        return reason
    if not path.exists() or file_hash(path) != manifest.file_sha256:
        return "engine file missing or changed since its manifest"
    return None


@dataclass(frozen=True)
class StepBuild:
    """One component to build: its key and weight hash (enough to tell "up to date"), and how to make the graph
    and its example inputs (only when it must be built)."""

    key: EngineKey
    weights: str
    make: Callable[[], tuple[nn.Module, tuple[Tensor, ...], tuple[str, ...], tuple[str, ...]]]


def dit_step_build(model: WanDiT, plan: Plan) -> StepBuild:
    request, shape = plan.request, plan.shape
    key = dit_step_key(request.pipeline, request.height, request.width, shape.chunk_latents, shape.cache_frames,
                       model.config.text_len, plan.precision, plan.backend,  # type: ignore[arg-type]
                       merged_loras=merged_lora_key(lora_requests(request)))  # fmt: skip

    def make():
        from build_engines.export import DIT_STEP_INPUTS, DIT_STEP_OUTPUTS, DiTStepGraph

        store_fp8_for_aoti(model, plan)
        return DiTStepGraph(model).eval(), dit_step_args(model, key, plan.device), DIT_STEP_INPUTS, DIT_STEP_OUTPUTS

    base = model.base_part() if isinstance(model, VaceWanDiT) else model  # the base step's weights only
    return StepBuild(key, weight_hash(base), make)


def store_fp8_for_aoti(model: WanDiT, plan: Plan) -> None:
    """An fp8 AOTInductor step is the served fp8 path compiled: block Linears stored fp8 with per-row scales
    (serve/models/fp8.py), their GEMMs `torch._scaled_mm` with per-token activation scales (SM ≥ 8.9, checked by
    `plan_build`), exported into the package. TensorRT's fp8 is ModelOpt's calibrated Q/DQ instead (`build_tensorrt`).
    Runs once, after every step's weight hash was taken from the weights as loaded (what the server hashes)."""
    if plan.precision != "fp8" or plan.backend != "aoti" or any(isinstance(m, Fp8Linear) for m in model.modules()):
        return
    store_dit_in_fp8(model, torch.bfloat16)


def vace_step_build(model: VaceWanDiT, plan: Plan) -> StepBuild:
    """The VACE-enabled step: the base step's inputs plus the chunk's context [1, 96, F, h, w], the VACE blocks'
    text K/V and the scale (an input: every scale runs on the one engine)."""
    request, shape = plan.request, plan.shape
    key = dit_step_key(request.pipeline, request.height, request.width, shape.chunk_latents, shape.cache_frames,
                       model.config.text_len, plan.precision, plan.backend, "dit_step_vace")  # type: ignore[arg-type]  # fmt: skip

    def make():
        from build_engines.export import DIT_STEP_OUTPUTS, VACE_STEP_INPUTS, VaceStepGraph
        from serve.models.vace import VACE_IN_DIM

        args = dit_step_args(model, key, plan.device)
        dtype = DTYPES[key.precision]
        context = torch.randn(
            1, model.config.text_len, model.config.text_dim, generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            vace_k, vace_v = model.vace_text_kv(context.to(plan.device, next(model.parameters()).dtype))
        vace_context = torch.zeros(1, VACE_IN_DIM, *args[0].shape[2:], device=plan.device, dtype=torch.float32)
        scale = torch.ones((), device=plan.device)
        vace_args = (*args, vace_context, vace_k.to(dtype), vace_v.to(dtype), scale)
        store_fp8_for_aoti(model, plan)
        return VaceStepGraph(model).eval(), vace_args, VACE_STEP_INPUTS, DIT_STEP_OUTPUTS

    return StepBuild(key, weight_hash(model), make)


def vae_step_builds(vae: nn.Module, vae_type: str, plan: Plan) -> list[StepBuild]:
    """The VAE's steady-state encode and decode chunk steps, fp32 as the streams run them. Their caches come from
    the first calls a stream makes: 1 + 4(F-1) pixel frames → F latents, then those F latents decoded."""
    from build_engines.export import vae_step_names
    from serve.models.autoencoder import ChunkStep
    from serve.pipelines.autoregressive import VAE_DTYPE

    request, chunk, weights = plan.request, plan.shape.chunk_latents, weight_hash(vae)
    height, width = request.height, request.width
    assert height is not None and width is not None

    @functools.cache
    def first_calls() -> dict[str, tuple[Tensor, ...]]:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.rand(1, 3, 1 + 4 * chunk, height, width, generator=generator) * 2 - 1
        pixels = pixels.to(plan.device, VAE_DTYPE)
        with torch.no_grad():
            latents, enc_caches = vae.encode_first(pixels[:, :, : 1 + 4 * (chunk - 1)])
            _, dec_caches = vae.decode_first(latents)
        steady = torch.rand(1, 3, 4 * chunk, height, width, generator=generator).to(plan.device, VAE_DTYPE) * 2 - 1
        return {"encode": (steady, *enc_caches), "decode": (torch.randn_like(latents), *dec_caches)}

    builds = []
    for direction in ("encode", "decode"):
        key = vae_step_key(request.pipeline, direction, vae_type, height, width, chunk, precision_of(VAE_DTYPE),
                           plan.backend)  # type: ignore[arg-type]  # fmt: skip

        def make(direction: str = direction):
            args = first_calls()[direction]
            return ChunkStep(vae, direction).eval(), args, *vae_step_names(len(args) - 1)  # type: ignore[arg-type]

        builds.append(StepBuild(key, weights, make))
    return builds


def build_pipeline(request: BuildRequest, console: Console) -> list[BuildResult]:
    """Every engine of a pipeline: the DiT step, then the VAE's encode and decode chunk steps; each skipped when
    its manifest is up to date."""
    plan = plan_build(request)
    request, env, backend, precision, device = plan.request, plan.env, plan.backend, plan.precision, plan.device
    why_backend = "asked for" if request.backend else ("TensorRT + GPU present" if backend == "tensorrt" else
                                                        "TensorRT or a GPU absent")  # fmt: skip
    console.print(
        f"{request.pipeline}: DiT step and VAE chunk steps {request.height}x{request.width}, {backend} "
        f"({why_backend}), DiT {precision}, VAE fp32, "
        f"{'random tiny weights' if request.random_weights else 'weights from ' + str(request.models_dir)}, "
        f"on {env.describe()} → {request.engines_dir}"
    )
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
    with progress:
        with stage(
            progress, f"{request.pipeline}: load weights ({'random, tiny' if request.random_weights else 'files'})"
        ):
            from serve.pipelines.autoregressive import load_vae_model

            models = load_models(request, plan.spec, plan.shape, device, DTYPES[precision])
            vae = load_vae_model(models, device, seed=request.seed)
            steps = [dit_step_build(models.dit, plan), *vae_step_builds(vae, models.vae_type, plan)]
            if request.vace:
                steps.insert(1, vace_step_build(models.dit, plan))  # type: ignore[arg-type]
        return [build_step(step, plan, progress, console) for step in steps]


def build_step(step: StepBuild, plan: Plan, progress: Progress, console: Console) -> BuildResult:
    start = time.perf_counter()
    key, env = step.key, plan.env
    path = engine_path(plan.request.engines_dir, key, env)
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(path, console):
        reason = "--force" if plan.request.force else stale_reason(path, key, env, step.weights)
        if reason is None:
            return BuildResult(key, path, "up to date", time.perf_counter() - start)
        return build_stale_step(step, plan, progress, console, path, reason, start)


@contextlib.contextmanager
def build_lock(path: Path, console: Console) -> Iterator[None]:
    """Held over an engine's check, build and manifest: a second build of the same engine (another shell, a second
    `make engines`) waits, then finds it up to date, instead of writing the same temporary file and a manifest
    that names the other build's hash."""
    lock = filelock.FileLock(path.with_name(path.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        console.print(f"waiting for another build of {path.name} (it holds {lock.lock_file})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_stale_step(step: StepBuild, plan: Plan, progress: Progress, console: Console, path: Path, reason: str,
                     start: float) -> BuildResult:  # fmt: skip
    key, env, device = step.key, plan.env, plan.device
    console.print(f"building {path.name}: {reason}")
    graph, args, input_names, output_names = step.make()
    with torch.no_grad():
        outputs = graph(*args)  # the oracle's output shapes and dtypes, for the manifest
    if key.backend == "aoti":
        from build_engines.aoti import build_aoti_package

        with stage(progress, f"{key.describe()}: torch.export + AOTInductor compile (minutes on a CPU)"):
            tmp = path.with_name(path.stem + ".partial.pt2")  # AOTInductor insists on the .pt2 suffix
            build_aoti_package(graph, args, tmp)
            tmp.replace(path)
    else:
        build_tensorrt(graph, args, input_names, output_names, key, path, progress)
    manifest = Manifest(
        key=key, env=env, file=path.name, file_sha256=file_hash(path), weight_sha256=step.weights,
        tensors={**tensor_specs(input_names, args, "input"), **tensor_specs(output_names, outputs, "output")},
        built_at=utc_now(), build_s=round(time.perf_counter() - start, 1),
        extra={"random_weights": plan.request.random_weights, "device": str(device)},
    )  # fmt: skip
    manifest.write(path)
    return BuildResult(key, path, "built", time.perf_counter() - start)


def build_tensorrt(
    graph: torch.nn.Module,
    args: tuple[Tensor, ...],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    key: EngineKey,
    path: Path,
    progress: Progress,
) -> None:
    """Export the step to ONNX (through ModelOpt fp8 Q/DQ for an fp8 DiT step), then the TensorRT build. The ONNX and
    its external weight data go to a temporary folder: only the plan is kept."""
    from build_engines.export import export_onnx
    from build_engines.tensorrt import build_tensorrt_engine

    work = Path(tempfile.mkdtemp(prefix="wanrt-onnx-", dir=path.parent))
    try:
        onnx_path = work / f"{key.component}.onnx"
        names = {"input_names": list(input_names), "output_names": list(output_names)}
        if key.precision == "fp8":
            from build_engines.quantize import quantize_fp8, standard_fp8_qdq_file

            with stage(progress, f"{key.describe()}: ModelOpt fp8 calibration"):
                quantize_fp8(graph.model, lambda _: calibrate_step(graph, args))
            with stage(progress, f"{key.describe()}: export ONNX with fp8 Q/DQ"):
                # ModelOpt's Q/DQ symbolics live in the TorchScript exporter (see tests/test_quantize_fp8.py).
                with torch.no_grad():
                    torch.onnx.export(graph.eval(), args, str(onnx_path), dynamo=False, opset_version=19, **names)
                standard_fp8_qdq_file(onnx_path)
        else:
            with stage(progress, f"{key.describe()}: export ONNX"):
                export_onnx(graph, args, onnx_path, input_names, output_names)
        with stage(progress, f"{key.describe()}: TensorRT build (minutes)"):
            build_tensorrt_engine(onnx_path, path, path.parent / "timing.cache", precision=key.precision)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def calibrate_step(graph: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
    """Activation ranges from steps over random latents at the denoising timesteps the pipelines use. Real prompts
    and video latents would give tighter ranges; this keeps the build self-contained."""
    generator = torch.Generator(device=args[0].device).manual_seed(1)
    with torch.no_grad():
        for t in (1000.0, 750.0, 500.0, 250.0, 0.0):
            latents = torch.randn(args[0].shape, generator=generator, device=args[0].device).to(args[0].dtype)
            graph(latents, torch.full_like(args[1], t), *args[2:])
