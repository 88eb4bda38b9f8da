"""One command on a CUDA machine, one report: `make gpu-check` (≤ 8 minutes).

    python -m benchmarks.gpu_check [--out DIR]      # DIR defaults to $OUT, else ./gpu-report
    python -m benchmarks.gpu_check --dry            # the same parts on the tiny config on the CPU, in seconds

Parts, each in its own process with its own time box, so a crash, a CUDA error or a hang in one is reported and
the next one runs:

  environment   GPU, driver, torch, CUDA; a measured bf16 matmul rate (the peak the % columns use) and copy bandwidth;
                the versions of the packages the bundle carried (benchmarks/gpu_bundle.py)
  frame_path    NVENC encode and NVDEC decode ms a frame at 512² and 480×832 beside libx264 and libavcodec
                (benchmarks/codecs.py), and the server's host CPU per 512² 30 fps passthrough stream, the old path
                against the zero-copy one (NVDEC → colour kernel → NVENC), 1 and 4 streams
                (benchmarks/serve_passthrough.py --path old,gpu), and VP8 from the GPU at 1 stream (gpu-vp8:
                YUV converted on the device, libvpx on the host)
  gpu_tests     the `gpu`-marked tests (pytest, when installed)
  dit_step      the DiT step (1.3B, bf16): eager (with window-relative keys too, and with the torch rope), compiled,
                CUDA graph (the served one), fp8 storage; ms, TFLOP/s, % of peak
  attention     each SDPA kernel (cuDNN, flash, memory-efficient, math) on the step's self- and cross-attention
                shapes: the measured order for serve/runtime/cuda_step.py `attention_backends`
  rope          kernels/rope.py's Triton kernel against its torch reference on the step's queries and Reward
                Forcing's cached window (ms, GB/s, max difference); dit_step has the whole step with each
  vae_steps     the VAE chunk steps of every vae_type at the seed resolutions
  pipelines     each pipeline's chunk latency and fps (video and text mode) at its seed resolution, LongLive also at
                480×832, Krea 14B with fp8; a new stream's first frame; peak memory against the VRAM plan
  adapters      what a runtime LoRA (0 / 1 / 4 adapters, rank 32) and VACE add to the 1.3B DiT step, with the FLOP
                each adds (benchmarks/lora.py, benchmarks/vace_step.py)

The parts run in that order (what an open issue waits for first) under one budget, `--budget-s` (540 s: one device
call is at most 600): a part gets its own time box or what is left of the budget, whichever is less.

Writes gpu-report.json (every figure, every error) and gpu-report.md (the same as tables), and nothing else, in the
output folder (a device call brings back at most 8 files). The model parts import only the model side (torch,
numpy, safetensors, msgspec, sentencepiece, ftfy, rich); `frame_path` needs the web stack and PyNvVideoCodec. A bare
GPU machine has neither msgspec nor ftfy nor the web stack: `make gpu-bundle` here packs them into .gpu-bundle/,
which a device call carries (`carry=['.gpu-bundle']`) and `activate` unpacks first.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any
from unittest.mock import patch

from benchmarks.gpu_bundle import activate

PARTS = (
    "environment",
    "frame_path",
    "gpu_tests",
    "dit_step",
    "attention",
    "rope",
    "vae_steps",
    "pipelines",
    "adapters",
)
# 590 s in all: the budget (below) cuts the last parts short, never the device call.
TIME_BOX_S = {"environment": 30, "frame_path": 100, "gpu_tests": 60, "dit_step": 120, "attention": 20, "rope": 15,
              "vae_steps": 50, "pipelines": 155, "adapters": 40}  # fmt: skip
BUDGET_S = 540
DRY_TIME_BOX_S = 120
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "L40S": 362.0, "4090": 165.0, "A100": 312.0}


# -- the parts (each runs in a child process: `--part NAME`) ----------------------------------------------------------

_partial_path: Path | None = None  # where a running part saves what it has so far (kept if its time box ends it)


def save_partial(result: dict[str, Any]) -> None:
    if _partial_path is not None:
        _partial_path.write_text(json.dumps(result, indent=1, default=str))


def part_environment(dry: bool) -> dict[str, Any]:
    import torch

    from benchmarks.timing import time_ms

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "device": str(device)}  # fmt: skip
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sm=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 1e9, 1))
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10)  # fmt: skip
            info["driver"] = driver.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["driver"] = f"unknown ({exc})"
        info["datasheet_bf16_tflops"] = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in props.name), None)
    n = 256 if dry else 8192
    dtype = torch.float32 if dry else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # random, never zeros (METHOD.md)
    ms = time_ms(lambda: a @ b, device, warmup=3, iters=10)
    info["matmul_tflops"] = 2 * n**3 / (ms / 1e3) / 1e12
    buffer = torch.empty(2**28 if cuda else 2**22, dtype=torch.uint8, device=device).random_()
    copy_ms = time_ms(lambda: buffer.clone(), device, warmup=2, iters=10)
    info["copy_gb_s"] = 2 * buffer.numel() / (copy_ms / 1e3) / 1e9  # read + write
    from benchmarks.gpu_bundle import check

    info["packages"] = check()  # each one's version, or why it does not import
    return info


def part_frame_path(dry: bool) -> dict[str, Any]:
    """Issue 13's GPU figures. Dry: the codecs at 64² on the CPU (NVENC and NVDEC say why not) and one old-path
    stream at 256² (128² blurs the index strip under VP8); the zero-copy path needs CUDA."""
    import argparse

    import torch

    from benchmarks.codecs import bench, rows_as_dicts
    from benchmarks.serve_passthrough import measure

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    sizes = [(512, 512), (480, 832)] if cuda else [(64, 64)]
    result: dict[str, Any] = {"codecs": rows_as_dicts(bench(sizes, 150 if cuda else 12, 10 if cuda else 2, device))}
    save_partial(result)
    options = argparse.Namespace(seconds=8.0 if cuda else 2.0, size=512 if cuda else 256, scene="camera", threads=True)
    result["streams"] = []
    # The issue's rows first; then VP8 (the seed's page as it is) from the same GPU placement.
    runs = [(1, "old"), (1, "gpu"), (4, "old"), (4, "gpu"), (1, "gpu-vp8")] if cuda else [(1, "old")]
    for streams, path in runs:
        row: dict[str, Any] = {"path": path, "streams": streams}
        try:
            row.update(measure(options, path, streams, None))
        except Exception as exc:  # a path that cannot run here says why; the next one still runs
            row["error"] = f"{type(exc).__name__}: {exc}"
        result["streams"].append(row)
        save_partial(result)
    return result


def part_gpu_tests(dry: bool) -> dict[str, Any]:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed here"}
    # One line per test as it ends (-v), the quick files first and the engine builds last: a run cut by the time box
    # still reports every test it finished.
    command = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py",
               "tests/test_fp8.py", "tests/test_packet_path.py", "tests/test_engines.py"]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIME_BOX_S["gpu_tests"] - 5)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:  # its output so far comes as bytes, whatever `text` says
        returncode = None
        output = b"".join(o for o in (exc.stdout, exc.stderr) if isinstance(o, bytes)).decode(errors="replace")
    lines = output.strip().splitlines()
    results = [line.split(" [")[0] for line in lines if line.startswith("tests/") and "::" in line]  # "… PASSED"
    summary = lines[-1] if lines and returncode is not None else f"cut at {TIME_BOX_S['gpu_tests'] - 5} s"
    return {"returncode": returncode, "summary": summary, "results": results, "tail": lines[-30:]}


def _dit_inputs(config_name: str, height: int, width: int, chunk: int, cache_frames: int, device, dtype):
    import torch

    from serve.models.dit import DIT_CONFIGS, WanDiT, keep_in_fp32
    from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy
    from serve.pipelines.dry_run import cast_as_loaded

    config = DIT_CONFIGS[config_name]
    torch.manual_seed(0)
    with torch.device(device):
        model = cast_as_loaded(WanDiT(config), dtype, keep_in_fp32).eval()
    frame_tokens = (height // 16) * (width // 16)
    spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, frame_tokens, cache_frames)
    cache = KVCache(spec, dtype, device)
    plan = RollingSinkPolicy(spec, 3, device).plan(cache_frames - chunk, chunk)
    latents = torch.randn(1, 16, chunk, height // 8, width // 8, device=device)
    timestep = torch.full((1, chunk), 750.0, device=device)
    with torch.inference_mode():
        text_kv = model.text_kv(torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype))
    return model, (latents, timestep, text_kv, cache.k, cache.v, *plan.as_args())


def part_dit_step(dry: bool) -> dict[str, Any]:
    import torch

    from benchmarks.model_step import Shape, step_tflop
    from benchmarks.timing import time_ms
    from kernels.rope import apply_rope_reference, norm_rope_reference
    from serve.models.dit import DIT_CONFIGS
    from serve.models.fp8 import store_dit_in_fp8

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config_name = "wan2.1-1.3b" if cuda else "tiny"
    height, width, chunk, cache_frames = (480, 832, 3, 12) if cuda else (64, 64, 3, 12)
    tflop = step_tflop(DIT_CONFIGS[config_name], Shape("longlive", height, width, chunk, cache_frames, 3))
    model, args = _dit_inputs(config_name, height, width, chunk, cache_frames, device, dtype)
    rows: list[dict[str, Any]] = []
    header = {"config": config_name, "shape": f"{height}×{width}, {chunk} frames, K={cache_frames}",
              "tflop_per_step": tflop}  # fmt: skip

    def measure(variant: str, fn) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                ms = time_ms(fn, device, warmup=3 if cuda else 1, iters=10 if cuda else 2)
            rows.append({"variant": variant, "ms": ms, "tflops": tflop / (ms / 1e3), "error": None})
        except Exception as exc:  # each variant reports its own failure; the others still run
            rows.append({"variant": variant, "ms": None, "tflops": None, "error": f"{type(exc).__name__}: {exc}"})
        rows[-1]["setup_and_run_s"] = time.perf_counter() - started
        save_partial({**header, "rows": rows})

    measure("eager", lambda: model.step(*args))
    slots = model.rope.tables(torch.arange(cache_frames, device=device), height // 16, width // 16)
    measure("eager, window-relative keys (Reward Forcing: the cache rotated at read)",
            lambda: model.step(*args, key_rope=slots))  # fmt: skip
    # The step as it ran before kernels/rope.py: the q/k norm and the rotations as torch's elementwise chains.
    with patch("serve.models.dit.apply_rope", apply_rope_reference), \
            patch("serve.models.dit.norm_rope", norm_rope_reference):  # fmt: skip
        measure("eager, torch rope", lambda: model.step(*args))
        measure("eager, window-relative keys, torch rope", lambda: model.step(*args, key_rope=slots))
    if cuda:
        from serve.runtime.cuda_step import DIT_STEP_PERSISTENT, CudaStep

        compiled = torch.compile(model.step, dynamic=False)
        measure("compiled (inductor)", lambda: compiled(*args))
        served = CudaStep(model.step, tuple(args[0].shape), DIT_STEP_PERSISTENT, device)  # what `auto` serves
        measure(f"CUDA graph (eager step, as served: {served.attention_words})", lambda: served(*args))
        graphed = torch.compile(model.step, mode="reduce-overhead", dynamic=False)
        measure("compiled + CUDA graphs (reduce-overhead)", lambda: graphed(*args))
    store_dit_in_fp8(model, dtype)  # fp8 GEMMs where the GPU has them (SM ≥ 8.9), else dequantize
    measure("fp8 storage, eager", lambda: model.step(*args))
    if cuda:
        compiled_fp8 = torch.compile(model.step, dynamic=False)
        measure("fp8 storage, compiled", lambda: compiled_fp8(*args))
        served_fp8 = CudaStep(model.step, tuple(args[0].shape), DIT_STEP_PERSISTENT, device)
        measure("fp8 storage, CUDA graph (as served)", lambda: served_fp8(*args))
    return {**header, "rows": rows}


def part_attention(dry: bool) -> dict[str, Any]:
    """Each SDPA kernel alone on the DiT step's attention shapes (1.3B: 12 heads × 128; LongLive at 480×832: a
    3-frame chunk of 1560 tokens per frame against a 12-frame window, with the additive key bias; and against the
    512 text tokens, no mask). A kernel that refuses the call (flash takes no additive mask) reports why."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    from benchmarks.timing import time_ms

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, head_dim, tokens = (12, 128, 1560) if cuda else (2, 32, 16)
    shapes = {"self (bias)": (3 * tokens, 12 * tokens, True), "cross": (3 * tokens, 512 if cuda else 8, False)}
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH] if cuda else [SDPBackend.MATH]  # fmt: skip
    rows = []
    for label, (queries, keys, masked) in shapes.items():
        q = torch.randn(1, heads, queries, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(1, heads, keys, head_dim, device=device, dtype=dtype) for _ in range(2))
        bias = torch.zeros(1, 1, 1, keys, device=device, dtype=dtype) if masked else None
        flop = 4 * heads * queries * keys * head_dim
        for backend in backends:
            try:
                with sdpa_kernel([backend]), torch.inference_mode():
                    ms = time_ms(lambda: scaled_dot_product_attention(q, k, v, attn_mask=bias), device,  # noqa: B023
                                 warmup=2 if cuda else 0, iters=10 if cuda else 1)  # fmt: skip
                rows.append({"attention": label, "kernel": backend.name, "ms": ms, "tflops": flop / ms / 1e9,
                             "error": None})  # fmt: skip
            except RuntimeError as exc:
                rows.append({"attention": label, "kernel": backend.name, "ms": None, "tflops": None,
                             "error": str(exc).splitlines()[0][:160]})  # fmt: skip
            save_partial({"rows": rows})
    return {"heads": heads, "head_dim": head_dim, "tokens_per_frame": tokens, "rows": rows}


def part_rope(dry: bool) -> dict[str, Any]:
    """kernels/rope.py's Triton kernels against their torch references on the 1.3B step's shapes at 480×832: one
    layer's chunk queries normalised and rotated (the projection's bf16 output, 3 frames of 1560 tokens), the
    rotation alone (fp32), and Reward Forcing's cached window (bf16, 9 frames) rotated at read time. GB/s counts
    what one fused pass must move (the input, the output, the tables, the weight)."""
    import torch

    from benchmarks.timing import time_ms
    from kernels import triton_rope
    from kernels.rope import apply_rope_reference, kernel_refusal, norm_rope_reference

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    heads, head_dim, frame_tokens = (12, 128, 1560) if cuda else (2, 32, 16)
    weight = torch.rand(heads * head_dim, device=device) + 0.5
    rows = []
    for label, frames, dtype, normed in (("chunk queries: norm + rope", 3, torch.bfloat16, True),
                                         ("chunk queries: rope", 3, torch.float32, False),
                                         ("cached window: rope", 9, torch.bfloat16, False)):  # fmt: skip
        tokens = frames * frame_tokens
        x = torch.randn((1, tokens, heads * head_dim) if normed else (1, tokens, heads, head_dim), device=device)
        x = x.to(dtype)
        angles = torch.rand(tokens, head_dim // 2, device=device) * 100
        cos, sin = torch.cos(angles), torch.sin(angles)
        if normed:
            reference = functools.partial(norm_rope_reference, x, weight, 1e-6, heads, cos, sin)
            kernel = functools.partial(triton_rope.norm_rope, x, weight, 1e-6, heads, cos, sin)
        else:
            reference = functools.partial(apply_rope_reference, x, cos, sin)
            kernel = functools.partial(triton_rope.apply_rope, x, cos, sin)
        out_bytes = x.numel() * (4 if normed else x.element_size())  # the norm's output is fp32, as the reference's
        moved = x.numel() * x.element_size() + out_bytes + 2 * cos.numel() * 4 + normed * weight.numel() * 4
        expected = reference()
        for variant, call in (("torch reference", reference), ("triton", kernel)):
            row: dict[str, Any] = {
                "tensor": label,
                "shape": list(x.shape),
                "dtype": str(dtype).removeprefix("torch."),
                "variant": variant,
                "ms": None,
                "gb_s": None,
                "max_abs_diff": None,
                "error": None,
            }
            try:
                if variant == "triton" and (refusal := kernel_refusal(x, cos, sin)) is not None:
                    raise RuntimeError(f"the dispatch would not run it: {refusal}")
                with torch.inference_mode():
                    row["ms"] = time_ms(call, device, warmup=3 if cuda else 1, iters=20 if cuda else 2)
                    out = call()
                row["gb_s"] = moved / row["ms"] / 1e6
                row["max_abs_diff"] = (out.float() - expected.float()).abs().max().item()
            except Exception as exc:  # without CUDA the kernels are refused: the reference rows still count
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            save_partial({"rows": rows})
    return {"rows": rows}


def part_vae_steps(dry: bool) -> dict[str, Any]:
    import torch

    from benchmarks.vae_step import bench_vae_steps

    cuda = torch.cuda.is_available() and not dry
    rows = bench_vae_steps(
        size="real" if cuda else "tiny", device="cuda" if cuda else "cpu", dtype=torch.float32,
        resolutions=((320, 576), (512, 512), (256, 256)) if cuda else ((32, 32),), warmup=1 if cuda else 0,
        iters=3 if cuda else 1, decode_latents=(1, 3) if cuda else (3,),
    )  # fmt: skip
    return {"dtype": "fp32 (as the streams run it)",
            "rows": [{**r.__dict__, "tflops": r.tflops} for r in rows]}  # fmt: skip


def part_pipelines(dry: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from benchmarks.pipelines import MODEL_PIPELINES, chunk_tflop, real_size_models
    from benchmarks.timing import time_ms
    from serve.models.fp8 import store_dit_in_fp8
    from serve.pipelines.registry import PIPELINES
    from serve.pipelines.weights import random_models
    from serve.schemas import LoadParams

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cases = [(pid, None) for pid in MODEL_PIPELINES] + ([("longlive", (480, 832))] if cuda else [])
    rows = []
    for pipeline_id, size in cases:
        row: dict[str, Any] = {"pipeline": pipeline_id}
        try:
            spec = PIPELINES[pipeline_id]
            cls = spec.resolve_factory()
            given = {"random_weights": True, "vae_type": "wan" if cuda else "tae"}
            if size:
                given.update(height=size[0], width=size[1])
            elif not cuda:
                given.update(height=32, width=32)
            load_params = spec.effective_load_params(LoadParams(**given), allow_random_weights=True)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            if cuda:
                models = real_size_models(cls.shape.dit_config, load_params["vae_type"], device, dtype)
            else:
                models = random_models(load_params, device, seed=0)
            if load_params.get("quantization") == "fp8_e4m3fn":
                store_dit_in_fp8(models.dit, dtype)
            pipeline = cls(spec, load_params, models, device, dtype)
            row.update(size=f"{pipeline.height}×{pipeline.width}", frames=pipeline.chunk_frames,
                       quantization=load_params.get("quantization"), build_s=time.perf_counter() - started)  # fmt: skip
            params = {**spec.runtime_defaults, "prompts": [{"text": "a cat in the snow", "weight": 1.0}]}
            frames = np.random.default_rng(0).integers(0, 255, (pipeline.chunk_frames, pipeline.height,
                                                               pipeline.width, 3)).astype(np.uint8)  # fmt: skip
            for mode, given_frames in (("video", frames), ("text", None)):
                mode_params = {**params, "input_mode": mode}
                stream = pipeline.open_stream(0)
                first_started = time.perf_counter()
                stream.process(given_frames, mode_params)  # a new stream's first chunk: its first frames out
                row[f"{mode}_first_chunk_ms"] = (time.perf_counter() - first_started) * 1e3
                for _ in range(2 if cuda else 0):
                    stream.process(given_frames, mode_params)
                ms = time_ms(lambda s=stream, g=given_frames, p=mode_params: s.process(g, p), device, 0,
                             5 if cuda else 1)  # fmt: skip
                row[f"{mode}_ms"], row[f"{mode}_fps"] = ms, 1e3 * pipeline.chunk_frames / ms
                # Warm: a second new stream on the loaded pipeline (Scope's "load → first frame" once warm).
                fresh = pipeline.open_stream(1)
                warm_started = time.perf_counter()
                fresh.process(given_frames, mode_params)
                if cuda:
                    torch.cuda.synchronize(device)
                row[f"{mode}_first_frame_warm_ms"] = (time.perf_counter() - warm_started) * 1e3
                del stream, fresh
            row["dit_tflop_per_chunk"] = chunk_tflop(pipeline, len(params["denoising_step_list"]))
            if cuda:
                row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                row["plan"] = _plan_row(pipeline_id, pipeline, load_params, models)
            pipeline.close()
            del pipeline, models
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=4)
        rows.append(row)
        save_partial({"dtype": str(dtype), "rows": rows})
    return {"dtype": str(dtype), "rows": rows}


def _plan_row(pipeline_id: str, pipeline, load_params: dict, models) -> dict[str, Any]:
    """The VRAM plan of the same configuration, against what was allocated. The benchmark's umT5 is one layer of
    the real width, so the plan is compared with the encoder on the CPU plus that layer's bytes; two streams of one
    pipeline were alive at the peak (the measured one and the warm first-frame one), the plan counts one."""
    from serve.pipelines.vram import measure_plan

    plan = measure_plan(pipeline_id, pipeline.height, pipeline.width, vae_type=load_params["vae_type"],
                        quantization=load_params.get("quantization"))  # fmt: skip
    encoder = sum(p.numel() * p.element_size() for p in models.prompts.encoder.parameters())
    return {"plan_total_gb": plan.total / 1e9,
            "plan_without_encoder_gb": (plan.with_text_encoder_on_gpu(False).total + encoder) / 1e9,
            "per_stream_state_gb": (plan.kv_cache + plan.text_kv + plan.stream_state) / 1e9}  # fmt: skip


# -- the driver -----------------------------------------------------------------------------------------------------


def part_adapters(dry: bool) -> dict[str, Any]:
    import dataclasses

    import torch

    from benchmarks.lora import bench as bench_lora
    from benchmarks.lora import lora_targets
    from benchmarks.model_step import SHAPES, step_tflop
    from benchmarks.vace_step import bench_steps
    from serve.models.dit import DIT_CONFIGS

    cuda = torch.cuda.is_available() and not dry
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    config_name = "wan2.1-1.3b" if cuda else "tiny"
    config, rank = DIT_CONFIGS[config_name], 32 if cuda else 2
    shape = SHAPES[1] if cuda else dataclasses.replace(SHAPES[1], height=32, width=32)
    tokens = shape.chunk_frames * (shape.height // 16) * (shape.width // 16)
    flop_per_rank = sum(2 * tokens * (m.in_features + m.out_features) for m in lora_targets(config))
    result: dict[str, Any] = {"config": config_name, "shape": f"{shape.height}×{shape.width}", "lora_rank": rank}
    lora_rows = bench_lora(config, shape, rank, device, dtype, iters=10 if cuda else 1)
    step_flop = step_tflop(config, shape) * 1e12
    result["lora"] = [
        {"adapters": label, "ms": ms, "flop_added": count * rank * flop_per_rank / step_flop}
        for (label, ms), count in zip(lora_rows, (0, 1, 4), strict=True)
    ]
    save_partial(result)
    result["vace"] = [
        {"shape": s.pipeline, "base_ms": base, "vace_ms": vace, "flop_added": vace_flop / base_flop}
        for s, base, vace, base_flop, vace_flop in bench_steps(config_name, device, dtype, 1 if cuda else 0,
                                                               5 if cuda else 1)
    ]  # fmt: skip
    return result


def run_part(name: str, scratch: Path, dry: bool, budget_left_s: float = BUDGET_S) -> dict[str, Any]:
    """Run one part in a child process under its time box (or what is left of the budget); its result, or its error,
    never an exception. The child writes its result into `scratch`."""
    result_path = scratch / f"{name}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, "--out", str(scratch)] + (["--dry"] * dry)
    limit = max(1, round(min(DRY_TIME_BOX_S if dry else TIME_BOX_S.get(name, 60), budget_left_s)))
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        log = (done.stdout + done.stderr)[-4000:]
        status = "ok" if done.returncode == 0 and result_path.exists() else f"failed (exit {done.returncode})"
        if done.returncode == 0 and not result_path.exists():
            status = "failed (no result written)"
    except subprocess.TimeoutExpired as exc:
        log = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"))[-4000:]
        status = f"timed out after {limit} s (the rows it finished are kept)"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    return {"part": name, "status": status, "seconds": time.perf_counter() - started, "result": result,
            "log_tail": log if status != "ok" else ""}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    env = next((p["result"] for p in report["parts"] if p["part"] == "environment"), {})
    peak = env.get("matmul_tflops")
    lines = [f"# gpu-check {'(DRY: tiny config on the CPU)' if report['dry'] else ''}", "",
             f"{report['date']}; {env.get('gpu', 'no GPU')} (SM {env.get('sm', '-')}), "
             f"driver {env.get('driver', '-')}, torch {env.get('torch', '-')}, CUDA {env.get('cuda', '-')}; "
             f"{report['seconds']:.0f} s in all.", "",
             "| part | status | seconds |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']:.0f} |" for p in report["parts"]]
    for part in report["parts"]:
        result = part["result"]
        lines += ["", f"## {part['part']}", ""]
        if part["part"] == "environment" and result:
            lines += [f"- measured matmul: {result['matmul_tflops']:.1f} TFLOP/s; copy: {result['copy_gb_s']:.0f} GB/s;"
                      f" datasheet bf16: {result.get('datasheet_bf16_tflops')}"]  # fmt: skip
            lines += [f"- packages: {', '.join(f'{k} {v}' for k, v in result.get('packages', {}).items())}"]
        elif part["part"] == "frame_path" and result:
            lines += _frame_path_lines(result)
        elif part["part"] == "dit_step" and result:
            lines += [f"{result['config']}, {result['shape']}, {result['tflop_per_step']:.2f} TFLOP/step; % of the "
                      "measured matmul rate", "", "| variant | ms | TFLOP/s | % of peak | error |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for r in result["rows"]:
                share = f"{100 * r['tflops'] / peak:.1f}" if r["tflops"] and peak else "-"
                ms = f"{r['ms']:.2f}" if r["ms"] else "-"
                tflops = f"{r['tflops']:.1f}" if r["tflops"] else "-"
                lines.append(f"| {r['variant']} | {ms} | {tflops} | {share} | {r['error'] or ''} |")
        elif part["part"] == "attention" and result:
            lines += [f"{result['heads']} heads × {result['head_dim']}, {result['tokens_per_frame']} tokens per frame",
                      "", "| attention | kernel | ms | TFLOP/s | error |", "|---|---|---|---|---|"]  # fmt: skip
            for r in result["rows"]:
                timing = f"{r['ms']:.3f} | {r['tflops']:.1f} |" if r["ms"] else "- | - |"
                lines.append(f"| {r['attention']} | {r['kernel']} | {timing} {r['error'] or ''} |")
        elif part["part"] == "rope" and result:
            lines += ["| tensor | shape | dtype | variant | ms | GB/s | max abs diff | error |", "|---" * 8 + "|"]
            for r in result["rows"]:
                timing = f"{r['ms']:.3f} | {r['gb_s']:.0f} | {r['max_abs_diff']:.2g} |" if r["ms"] else "- | - | - |"
                lines.append(f"| {r['tensor']} | {'×'.join(map(str, r['shape']))} | {r['dtype']} | {r['variant']} | "
                             f"{timing} {r['error'] or ''} |")  # fmt: skip
        elif part["part"] == "vae_steps" and result:
            lines += ["| vae | H×W | step | ms | GFLOP | TFLOP/s |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['vae_type']} | {r['height']}×{r['width']} | {r['step']} | {r['ms']:.2f} | "
                      f"{r['gflop']:.1f} | {r['tflops']:.2f} |" for r in result["rows"]]  # fmt: skip
        elif part["part"] == "pipelines" and result:
            lines += ["| pipeline | H×W | V2V ms | V2V fps | T2V ms | T2V fps | first frame warm ms (V2V/T2V) | "
                      "peak GB | plan GB | error |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in result["rows"]:

                def num(key: str, fmt: str = ".1f", r=r) -> str:
                    return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-"

                plan = r.get("plan", {}).get("plan_without_encoder_gb")
                lines.append(
                    f"| {r['pipeline']}{' (fp8)' if r.get('quantization') else ''} | {r.get('size', '-')} | "
                    f"{num('video_ms')} | {num('video_fps')} | {num('text_ms')} | {num('text_fps')} | "
                    f"{num('video_first_frame_warm_ms', '.0f')}/{num('text_first_frame_warm_ms', '.0f')} | "
                    f"{num('peak_memory_gb', '.2f')} | {f'{plan:.2f}' if plan else '-'} | {r.get('error', '')} |"
                )
        elif part["part"] == "adapters" and result:
            lines += [f"{result['config']} DiT step at {result['shape']}; runtime LoRA rank {result['lora_rank']}", "",
                      "| adapters | ms | time added | FLOP added |", "|---|---|---|---|"]  # fmt: skip
            base = result["lora"][0]["ms"]
            lines += [f"| {r['adapters']} | {r['ms']:.2f} | {100 * (r['ms'] / base - 1):+.1f} % | "
                      f"{100 * r['flop_added']:+.1f} % |" for r in result["lora"]]  # fmt: skip
            lines += ["", "| VACE at | base ms | VACE ms | time added | FLOP added |", "|---|---|---|---|---|"]
            lines += [f"| {r['shape']} | {r['base_ms']:.2f} | {r['vace_ms']:.2f} | "
                      f"{100 * (r['vace_ms'] / r['base_ms'] - 1):+.1f} % | {100 * r['flop_added']:+.1f} % |"
                      for r in result.get("vace", [])]  # fmt: skip
        elif part["part"] == "gpu_tests" and result:
            lines += [f"- {result.get('summary') or result.get('skipped', '')}"]
            lines += [f"  - {line}" for line in result.get("results", []) if not line.endswith(" PASSED")]
        if part["status"] != "ok":
            lines += ["", "```", part["log_tail"][-2000:], "```"]
    return "\n".join(lines) + "\n"


def _frame_path_lines(result: dict[str, Any]) -> list[str]:
    def num(value: Any, fmt: str = ".2f") -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    lines = ["| step | codec | H×W | frames | ms / frame | p95 ms | kb/s | error |", "|---" * 8 + "|"]
    for r in result["codecs"]:
        lines.append(f"| {r['step']} | {r['codec']} | {r['size']} | {r['frames']} | {num(r['ms_mean'])} | "
                     f"{num(r['ms_p95'])} | {num(r['kbps'], '.0f')} | {r['error'] or ''} |")  # fmt: skip
    lines += ["", "| path | streams | encoder | input | output conversion | fps out (min) | lost | RTT p50 / p95 ms | "
              "server CPU % core | per stream | error |", "|---" * 11 + "|"]  # fmt: skip
    for r in result.get("streams", []):
        lines.append(
            f"| {r['path']} | {r['streams']} | {r.get('encoder', '-')} | {r.get('input_format', '-')} | "
            f"{r.get('output_conversion', '-')} | "
            f"{num(r.get('fps_out_min'), '.1f')} | {r.get('lost', '-')} | {num(r.get('latency_p50_ms'), '.0f')} / "
            f"{num(r.get('latency_p95_ms'), '.0f')} | {num(r.get('cpu_pct'), '.1f')} | "
            f"{num(r.get('cpu_pct_per_stream'), '.1f')} | {r.get('error', '')} |"
        )
    for r in result.get("streams", []):
        groups = ", ".join(f"{name} {pct / r['streams']:.1f}" for name, (pct, _) in r.get("threads", {}).items())
        if groups:
            lines.append(f"- {r['path']} × {r['streams']}, % of a core per stream by thread group: {groups}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-report", help="folder for the reports")
    parser.add_argument("--dry", action="store_true", help="tiny config on the CPU: checks the script, not a GPU")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="all parts together, seconds")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a child process runs one part
    args = parser.parse_args()
    out = Path(args.out)
    if args.part:
        global _partial_path
        _partial_path = out / f"{args.part}.json"  # `out` is the driver's scratch folder here
        save_partial(globals()[f"part_{args.part}"](args.dry))
        return
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        site = activate()  # the bundle's packages, first on this path and the parts' (a bare GPU machine lacks them)
        bundle = f"packages from {site}" if site else "no bundle: the installed packages"
    except RuntimeError as exc:  # built for another Python: its packages would not import
        site, bundle = None, f"bundle not used: {exc}"
    print(f"gpu-check: {bundle}", flush=True)
    parts = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for name in args.parts:
            left = args.budget_s - (time.perf_counter() - started)
            if left < 5:
                parts.append({"part": name, "status": f"not run: the {args.budget_s:.0f} s budget is spent",
                              "seconds": 0.0, "result": {}, "log_tail": ""})  # fmt: skip
            else:
                parts.append(run_part(name, Path(scratch), args.dry, left))
            print(f"gpu-check {name}: {parts[-1]['status']} ({parts[-1]['seconds']:.0f} s)", flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry": args.dry, "bundle": bundle,
              "seconds": time.perf_counter() - started, "parts": parts}  # fmt: skip
    (out / "gpu-report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu-report.md").write_text(markdown(report))
    print(f"wrote {out / 'gpu-report.md'} and {out / 'gpu-report.json'}")


if __name__ == "__main__":
    main()
