"""The DiT step on a CUDA GPU: the attention kernel chosen for the GPU, and the steady-state chunk replayed from a
CUDA graph.

Why a graph: a 1.3B step at 320×576 is ~30 blocks × ~25 kernels; at the chunk rates wanrt aims for, launching them
one by one from Python costs as much as running them. Everything a steady-state step touches already lives at a
fixed address (the KV cache, the text K/V, the LoRA scales and the VACE scale are device buffers written in place;
see STYLE.md §4–5), so the step can be captured once and replayed.

What is graphed: the call whose latents have the chunk's own shape, the step every chunk runs. Reward Forcing's
window-relative keys are rotated at read time by per-slot cos/sin tables of a fixed shape: two more per-chunk inputs.
A re-cache over the whole window and Krea's context recompute run as they are (they are rare, and take another
shape), like the engines' fallbacks (serve/runtime/backends.py).

Binding: one graph per set of *persistent* buffers (the text K/V and the KV cache of one stream, found by their
addresses), holding its own copies of the per-chunk inputs (latents, timestep, the cache plan, the VACE context and
scale, the keys' rope tables). A call copies those in and replays; the KV cache writes replay in place, into the
stream's own buffers.
The first call for a set of buffers runs the step normally on the capture's stream (its result is this call's, and
it is the warm-up the capture needs: lazy cuBLAS/cuDNN handles and workspaces, autotuning), then captures. All
graphs share one memory pool: the worker runs one step at a time, and each output is consumed before the next step.

The output of a replay is the graph's own buffer: valid until the next call (the loop consumes it at once, as with
the TensorRT step).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

MAX_GRAPHS = 8  # one per stream's buffers; a ninth stream evicts the least recently used graph

# The base step's positional arguments that live at fixed addresses for a whole stream (text K/V, cache K, cache V);
# the VACE step adds its blocks' text K/V (serve/models/vace.py `step_vace`). Every other argument is per chunk.
DIT_STEP_PERSISTENT = (2, 3, 4)
VACE_STEP_PERSISTENT = (2, 3, 4, 9)

Args = tuple  # the step's positional arguments: tensors, and tuples of tensors (text K/V)


def attention_backends(device: torch.device) -> tuple[list[SDPBackend], str]:
    """The SDPA kernels to try, best first, for this GPU; and the words for the backend reason.

    Every backend stays in the list, so a kernel that cannot take a call (flash takes no additive mask: the
    self-attention's key bias) passes to the next one rather than failing. On Hopper (SM 9.x) cuDNN's fused
    attention comes first: it takes the additive key bias and is the one written for Hopper's TMA and wgmma; elsewhere
    flash then memory-efficient, PyTorch's own order. `make gpu-check` times each on the real shapes
    (benchmarks/gpu_check.py `part_attention`): revise this order from what it measures.
    """
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        words = "attention: cuDNN SDPA first (Hopper), then flash, memory-efficient"
    else:
        order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        words = f"attention: flash first (SM {major}.x), then memory-efficient, cuDNN"
    return [*order, SDPBackend.MATH], words


def leaves(values: Sequence) -> list[Tensor]:
    """The tensors of a step's arguments, tuples (text K/V) flattened."""
    out: list[Tensor] = []
    for value in values:
        out.extend(value if isinstance(value, tuple) else (value,))
    return out


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[int, Tensor]  # the graph's own copies of the per-chunk arguments, by position
    output: Tensor

    def replay(self, args: Args) -> Tensor:
        for position, buffer in self.inputs.items():
            buffer.copy_(args[position])
        self.graph.replay()
        return self.output


class CudaStep:
    """A DiT step (`WanDiT.step`, `VaceWanDiT.step_vace`, or a compiled engine's step) run on CUDA with the chosen
    attention kernels, its steady-state chunk replayed from a CUDA graph when `graphs` is on."""

    def __init__(self, step: Callable[..., Tensor], steady_shape: tuple[int, ...], persistent: tuple[int, ...],
                 device: torch.device, *, graphs: bool = True) -> None:  # fmt: skip
        self.step = step
        self.steady_shape = steady_shape  # the chunk's latents [1, 16, F, h, w]
        self.persistent = persistent
        self.device = device
        self.attention, self.attention_words = attention_backends(device)
        self.graphs_wanted = graphs
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.capture_stream = torch.cuda.Stream(device) if graphs else None
        self.failed: str | None = None  # why capture stopped being tried (said once), or None
        self.replays = 0

    def describe(self) -> str:
        graphs = "steady-state chunk replayed from a CUDA graph" if self.graphs_wanted else "no CUDA graph"
        return f"{graphs}; {self.attention_words}"

    def __call__(self, *args: Tensor | tuple[Tensor, Tensor], key_rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        with sdpa_kernel(self.attention, set_priority=True):
            steady = tuple(args[0].shape) == self.steady_shape
            if not self.graphs_wanted or self.failed or not steady:
                return self.step(*args, key_rope=key_rope)
            call = (*args, *(key_rope or ()))  # the rope tables ride as the last two per-chunk arguments
            key = (len(args), *self._key(call))
            captured = self.graphs.get(key)
            if captured is not None:
                self.graphs.move_to_end(key)
                self.replays += 1
                return captured.replay(call)
            output = self._warm_up(call, len(args))  # this call's result
            self._capture(key, call, len(args))
            return output

    def _run(self, call: Args, arity: int) -> Tensor:
        """The step on `call`: its first `arity` entries are the step's arguments, any others the keys' cos/sin."""
        rope = call[arity:]
        return self.step(*call[:arity], key_rope=(rope[0], rope[1]) if rope else None)

    def _key(self, args: Args) -> tuple:
        """The persistent buffers by address and shape, and every per-chunk argument's shape and dtype."""
        persistent = tuple((t.data_ptr(), tuple(t.shape)) for t in leaves([args[i] for i in self.persistent]))
        per_chunk = tuple((i, tuple(a.shape), a.dtype) for i, a in enumerate(args) if i not in self.persistent)
        return persistent + per_chunk

    def _warm_up(self, call: Args, arity: int) -> Tensor:
        """The step run normally, on the stream the capture will use: cuBLAS/cuDNN handles and workspaces are made per
        stream, and must exist before a capture rather than be allocated inside it."""
        assert self.capture_stream is not None
        current = torch.cuda.current_stream(self.device)
        self.capture_stream.wait_stream(current)
        with torch.cuda.stream(self.capture_stream):
            output = self._run(call, arity)
        current.wait_stream(self.capture_stream)
        output.record_stream(current)  # used on the caller's stream from here: its block is not reused before that
        return output

    def _capture(self, key: tuple, call: Args, arity: int) -> None:
        assert self.capture_stream is not None
        inputs = {i: a.clone() for i, a in enumerate(call) if i not in self.persistent}  # contiguous copies
        static = tuple(inputs.get(i, a) for i, a in enumerate(call))
        graph = torch.cuda.CUDAGraph()
        stream = self.capture_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            # thread_local: the capture fails on this thread's unsafe calls only, not on the encoder, decoder and
            # snapshot threads' event waits that run beside it once sessions stream (global mode fails on those).
            with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
                output = self._run(static, arity)
        except RuntimeError as exc:  # an op that cannot be captured: say so once, run ungraphed from now on
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            log.warning("cuda graph capture failed, the step runs ungraphed: %s", self.failed)
            return
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graphs[key] = Captured(graph, inputs, output)
        if len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        log.info("cuda graph captured latents=%s graphs=%d", tuple(call[0].shape), len(self.graphs))


def on_cuda(step: Callable[..., Tensor], backend: str, requested: str, steady_shape: tuple[int, ...],
            persistent: tuple[int, ...], device: torch.device) -> tuple[Callable[..., Tensor], str | None]:  # fmt: skip
    """(the step as it runs on `device`, words for the backend reason) for a step `select_backend` chose.

    A CUDA graph on the compiled backend and on eager when `auto` fell back to it; a load that asked for `eager` by
    name gets the step ungraphed (it is the reference), with the attention kernels chosen all the same. TensorRT
    steps capture their own graphs (serve/runtime/tensorrt_step.py) and run no SDPA. Elsewhere (CPU, the meta dry
    run) the step is returned as it is.
    """
    if device.type != "cuda" or backend == "tensorrt":
        return step, None
    wrapped = CudaStep(step, steady_shape, persistent, device, graphs=backend == "compiled" or requested == "auto")
    return wrapped, wrapped.describe()
