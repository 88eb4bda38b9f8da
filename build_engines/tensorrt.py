"""TensorRT 11 engine build from an exported ONNX step (reference/trt.md §1.2–§1.7).

- Strongly typed only (TensorRT 11 has no precision flags): the ONNX graph's dtypes decide. bf16 comes from a bf16
  export, fp8 from ModelOpt's explicit Q/DQ around the block GEMMs (build_engines/quantize.py), which TensorRT fuses
  into fp8 GEMMs and stores as fp8 weights.
- Static shapes: every input's shape is fixed by the export (one resolution, one chunk length, one cache length), so
  no optimization profile is needed and the engine can be captured in a CUDA graph.
- KV caches are explicit inputs (`cache_k`, `cache_v`) and outputs (`cache_k_out`, `cache_v_out`). The runtime
  (serve/runtime/tensorrt_step.py) asks the engine which outputs alias which inputs and binds those to the same
  buffer; where TensorRT does not declare the alias, it binds a separate output and copies it back inside the graph.
- The timing cache is kept per GPU and TensorRT version next to the engines, so rebuilds reuse measured tactics.

Untested on a GPU so far (none was lent); every TensorRT name used here and in serve/runtime/tensorrt_step.py was
checked against the symbols of the tensorrt-cu13-bindings 11.4.0.106 wheel. `tensorrt` is imported lazily:
machines without it (no GPU, PyPI-only installs) can import this module and get a clear error only when they try to
build.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 8 << 30  # scratch for tactics; the 1.3B step at 480×832 needs well under this


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or the CUDA device it needs) is not present on this machine."""


def import_tensorrt() -> ModuleType:
    """TensorRT ≥ 11 with a CUDA device to build on or run with; TensorRTUnavailable saying which is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not importable here ({exc}); it comes from NVIDIA's index, not PyPI (whose tensorrt libs "
            "are stubs), and needs a GPU: use --backend aoti elsewhere"
        ) from None
    if int(str(tensorrt.__version__).split(".")[0]) < 11:
        raise TensorRTUnavailable(f"TensorRT {tensorrt.__version__} is installed; wanrt's engines need TensorRT ≥ 11")
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines are built on the GPU that serves them; no CUDA device here")
    return tensorrt


def build_tensorrt_engine(
    onnx_path: Path, plan_path: Path, timing_cache_path: Path, optimization_level: int = 3, precision: str = "bf16"
) -> Path:
    """ONNX (static shapes) → serialized plan at `plan_path`; updates the timing cache. Minutes for the 1.3B step.
    The network's types come from the ONNX (strongly typed); `precision` "fp32" also turns TF32 off, which TensorRT
    enables by default and which rounds fp32 GEMM inputs to a 10-bit mantissa."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # 0: strongly typed is the only mode in TensorRT 11
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): the weights of a large step live in external data next to the .onnx.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):  # a dynamic dim would need a profile and defeat the CUDA graph
            raise RuntimeError(f"{onnx_path}: input {tensor.name} has a dynamic shape {tuple(tensor.shape)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.builder_optimization_level = optimization_level
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_blob = timing_cache_path.read_bytes() if timing_cache_path.exists() else b""
    timing_cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)  # the cache lives per GPU + version: never foreign

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see the TensorRT log lines above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(plan))
    tmp.replace(plan_path)
    cache_tmp = timing_cache_path.with_name(f"{timing_cache_path.name}.{os.getpid()}.tmp")
    cache_tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    cache_tmp.replace(timing_cache_path)  # atomic: another engine's build reads a whole cache, never half of one
    log.info("built engine=%s from=%s timing_cache=%s", plan_path, onnx_path, timing_cache_path)
    return plan_path


def deserialize_engine(plan_path: Path):  # -> trt.ICudaEngine
    """Loads a plan; raises ValueError naming the file when TensorRT rejects it (corrupt, other version or GPU)."""
    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise ValueError(f"TensorRT could not deserialize {plan_path} (corrupt, or built by another TensorRT/GPU)")
    return engine
