"""The DiT step as a TensorRT 11 engine, replayed from a CUDA graph (reference/trt.md §1.5), and the VAE's chunk
steps as TensorRT engines (`TensorRTChunkStep`, at the end).

Binding: every tensor address is set once per set of caller buffers and baked into a CUDA graph around
`execute_async_v3`; each call then copies the small per-chunk inputs (latents, timestep, the cache plan) into
persistent buffers and replays. The big buffers are the stream's own: the text K/V and the KV cache are bound where
they live, never copied in. A cache output the engine declares aliased to its input (`get_aliased_input_tensor`, as
TensorRT's KV-cache-update layer does) is bound to the same address, so the update is in place; an output TensorRT
does not alias gets its own buffer and is copied back into the cache inside the same graph, since binding one
address to a non-aliased input and output is not a documented contract.

Needs TensorRT ≥ 11 and CUDA; the module imports neither at import time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from build_engines.export import DIT_STEP_INPUTS, DIT_STEP_OUTPUTS, VACE_STEP_INPUTS
from build_engines.tensorrt import deserialize_engine, import_tensorrt
from serve.models.autoencoder import Caches, ChunkStepFn
from serve.runtime.backends import DiTStep, EngineStep, KeyRope
from serve.runtime.cuda_step import leaves

log = logging.getLogger(__name__)

ADDRESS_ALIGNMENT = 256  # bytes; TensorRT rejects tensor addresses that are not (NvInferRuntime.h)
# Bound where the stream keeps them (per prompt or per stream, never per chunk): the text K/V of the main and the
# VACE blocks, and the KV cache.
CALLER_BUFFERS = ("text_k", "text_v", "cache_k", "cache_v", "vace_text_k", "vace_text_v")
MAX_GRAPHS = 8  # one per set of caller buffers (a session); more sessions than this re-capture


def torch_dtypes(trt) -> dict:
    """TensorRT's tensor dtypes → torch's."""
    return {
        trt.float32: torch.float32, trt.bfloat16: torch.bfloat16, trt.float16: torch.float16,
        trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool,
    }  # fmt: skip


class TensorRTStep(EngineStep):
    """`WanDiT.step` as a TensorRT plan of `DiTStepGraph` (build_engines/export.py)."""

    INPUTS = DIT_STEP_INPUTS

    def __init__(self, plan_path: Path, device: torch.device, fallback: DiTStep | None = None) -> None:
        trt = import_tensorrt()
        self.device = device
        self.engine = deserialize_engine(plan_path)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted(self.INPUTS + DIT_STEP_OUTPUTS):
            raise ValueError(f"{plan_path}: tensors {names}, expected {self.INPUTS + DIT_STEP_OUTPUTS}")
        dtypes = torch_dtypes(trt)
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        super().__init__(plan_path, self.shapes["latents"], fallback)
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        # Which input each cache output updates: TensorRT's declared alias, else the export's `<input>_out` naming.
        self.aliased = {o: self.engine.get_aliased_input_tensor(o) for o in ("cache_k_out", "cache_v_out")}
        self.updates = {o: self.aliased[o] or o.removesuffix("_out") for o in self.aliased}
        self.context = self.engine.create_execution_context()
        # Persistent buffers for everything the caller does not own; allocated once, never reallocated.
        self.static = {
            n: torch.zeros(self.shapes[n], dtype=self.dtypes[n], device=device)
            for n in names
            if n not in CALLER_BUFFERS and not (self.aliased.get(n))
        }
        self.graphs: OrderedDict[tuple[int, ...], torch.cuda.CUDAGraph] = OrderedDict()
        self.capture_stream = torch.cuda.Stream(device)
        log.info("tensorrt engine=%s aliased=%s", plan_path, {o: a for o, a in self.aliased.items() if a})

    def _check(self, name: str, tensor: Tensor) -> None:
        if tuple(tensor.shape) != self.shapes[name] or tensor.dtype != self.dtypes[name]:
            raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, engine wants "
                             f"{self.shapes[name]} {self.dtypes[name]}")  # fmt: skip
        if not tensor.is_contiguous() or tensor.data_ptr() % ADDRESS_ALIGNMENT:
            raise ValueError(
                f"{name}: TensorRT needs a contiguous buffer at a {ADDRESS_ALIGNMENT}-byte aligned address"
            )

    def _capture(self, caller: dict[str, Tensor]) -> torch.cuda.CUDAGraph:
        """Bind, run once (TensorRT allocates lazily on the first run; this run is the caller's real step), capture."""
        for name, tensor in caller.items():
            self._check(name, tensor)
        addresses = {
            **{n: t.data_ptr() for n, t in self.static.items()},
            **{n: t.data_ptr() for n, t in caller.items()},
        }
        for out, source in self.aliased.items():
            if source:  # declared aliased: the output *is* the cache input's buffer
                addresses[out] = caller[source].data_ptr()
        for name, address in addresses.items():
            assert address % ADDRESS_ALIGNMENT == 0, name  # torch's caching allocator hands out 512-byte blocks
            self.context.set_tensor_address(name, address)
        copy_back = [(self.static[o], caller[self.updates[o]]) for o, source in self.aliased.items() if not source]

        def run(stream: torch.cuda.Stream) -> None:
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path}")
            for source, target in copy_back:
                target.copy_(source)

        stream = self.capture_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            run(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):  # as TensorRT's guide does;
            run(stream)  # other threads (encoders, decoders) keep using CUDA while a new stream's graph is captured
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph

    def __call__(self, *args: Tensor | tuple[Tensor, Tensor], key_rope: KeyRope = None) -> Tensor:
        """The step's own arguments (`WanDiT.step`'s, or `VaceWanDiT.step_vace`'s), which flatten (text K/V pairs
        split) to the engine's `INPUTS` in order. Copies the per-chunk ones into their persistent buffers, then
        replays the graph captured for the caller's buffers (capturing it on their first call). Returns the engine's
        persistent `flow` buffer: valid until the next call (the loop consumes it at once)."""
        if not self.runs_here(args[0], key_rope):  # type: ignore[arg-type]
            return self.fallback(*args, key_rope=key_rope)  # type: ignore[misc]
        named = dict(zip(self.INPUTS, leaves(args), strict=True))
        caller = {name: named.pop(name) for name in CALLER_BUFFERS if name in named}
        for name, value in named.items():
            self.static[name].copy_(value.view(self.shapes[name]))
        bound = tuple(t.data_ptr() for t in caller.values())
        graph = self.graphs.get(bound)
        if graph is None:
            self.graphs[bound] = self._capture(caller)  # the capture's own first run was this call's step
            if len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(bound)
            graph.replay()
        return self.static["flow"]


class TensorRTVaceStep(TensorRTStep):
    """`VaceWanDiT.step_vace` as a TensorRT plan of `VaceStepGraph`: the base step's binding, plus the chunk's VACE
    context and scale copied in like the latents, and the VACE blocks' text K/V bound where the stream keeps them
    (set once per prompt, like the main text K/V)."""

    INPUTS = VACE_STEP_INPUTS


class TensorRTChunkStep(EngineStep):
    """A VAE steady-state chunk step as a TensorRT plan: (x, cache_0, …) → (y, cache_0_out, …), the names
    `export_vae_step` gives.

    Persistent buffers for every input and output, bound once; a call copies x and the caches in, runs on the
    current stream and returns copies of the outputs. The copies out are deliberate: one step serves every stream of
    the pipeline, and a stream must never keep a buffer that the next stream's call overwrites. No CUDA graph yet:
    the VAE's convolutions are large next to their launch cost; measure before adding one.
    """

    def __init__(self, plan_path: Path, device: torch.device, fallback: ChunkStepFn | None = None) -> None:
        trt = import_tensorrt()
        self.device = device
        self.engine = deserialize_engine(plan_path)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.cache_names = [f"cache_{i}" for i in range(sum(n.startswith("cache_") for n in names) // 2)]
        expected = ["x", "y", *self.cache_names, *(f"{n}_out" for n in self.cache_names)]
        if sorted(names) != sorted(expected):
            raise ValueError(f"{plan_path}: tensors {names}, expected {expected}")
        dtypes = torch_dtypes(trt)
        self.buffers = {
            n: torch.zeros(tuple(self.engine.get_tensor_shape(n)), dtype=dtypes[self.engine.get_tensor_dtype(n)],
                           device=device)
            for n in names
        }  # fmt: skip
        super().__init__(plan_path, tuple(self.buffers["x"].shape), fallback)
        self.context = self.engine.create_execution_context()
        for name, buffer in self.buffers.items():
            self.context.set_tensor_address(name, buffer.data_ptr())
        log.info("tensorrt engine=%s caches=%d", plan_path, len(self.cache_names))

    def __call__(self, x: Tensor, caches: Caches) -> tuple[Tensor, Caches]:
        if not self.runs_here(x, None):
            return self.fallback(x, caches)  # type: ignore[misc]
        self.buffers["x"].copy_(x)
        for name, cache in zip(self.cache_names, caches, strict=True):
            self.buffers[name].copy_(cache)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path}")
        return self.buffers["y"].clone(), tuple(self.buffers[f"{n}_out"].clone() for n in self.cache_names)
