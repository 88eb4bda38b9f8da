"""The GPU path where a CPU can check it (fp8 GEMM shapes and layouts on meta), and `gpu`-marked checks that need
CUDA (`make gpu-check` runs those): the chunk loop on the device, the pinned frame copy, the fp8 GEMM numerics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from serve.models.dit import DIT_CONFIGS
from serve.models.fp8 import fp8_gemm, quantize_rows
from serve.pipelines.frames import HostBridge
from serve.pipelines.registry import get_spec
from serve.schemas import LoadParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("config", ["wan2.1-1.3b", "wan2.1-14b"])
def test_fp8_gemm_takes_every_block_linear_shape_of_the_real_models_on_meta(config: str) -> None:
    d, f = DIT_CONFIGS[config].dim, DIT_CONFIGS[config].ffn_dim
    tokens = 3 * 1560  # a 480×832 chunk
    for out_features, in_features in ((d, d), (f, d), (d, f)):
        weight, scale = quantize_rows(torch.empty(out_features, in_features, device="meta", dtype=torch.bfloat16))
        x = torch.empty(tokens, in_features, device="meta", dtype=torch.bfloat16)
        out = fp8_gemm(x, weight, scale, torch.bfloat16)  # `_scaled_mm`'s meta kernel checks layouts and scales
        assert out.shape == (tokens, out_features) and out.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="col_major"):  # the layout the transposed row-major weight avoids
        fp8_gemm(x, weight.t().contiguous().t(), scale, torch.bfloat16)


def test_frames_cross_to_the_host_in_one_copy_with_their_values() -> None:
    bridge = HostBridge(torch.device("cpu"), seed=0)
    frames = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).view(2, 4, 4, 3)
    out = bridge.download(frames.permute(0, 2, 1, 3))  # the loop hands a permuted view
    assert np.array_equal(out, frames.permute(0, 2, 1, 3).numpy()) and bridge.downloads == 1


@pytest.mark.gpu
@cuda
def test_pinned_download_on_cuda_returns_the_frames() -> None:
    bridge = HostBridge(torch.device("cuda"), seed=0)
    frames = torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8, device="cuda")
    assert np.array_equal(bridge.download(frames.permute(0, 2, 1, 3)), frames.permute(0, 2, 1, 3).cpu().numpy())


@pytest.mark.gpu
@cuda
def test_an_rgb_upload_on_cuda_queues_from_pinned_memory_and_gives_the_cpu_pixels() -> None:
    """swscale's RGB frames go up without the host waiting (to_device pins them): the values must still be the
    frames', though the array may be reused as soon as `upload` returns."""
    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    expected = HostBridge(torch.device("cpu"), seed=0).upload(frames, 64, 64)
    uploaded = HostBridge(torch.device("cuda"), seed=0).upload(frames, 64, 64)
    frames[:] = 0  # the caller's buffer, reused: the pinned copy was taken before
    assert torch.equal(uploaded.cpu(), expected)


def test_devices_are_the_same_by_type_and_index() -> None:
    from serve.pipelines.frames import same_device

    cpu, cuda0, cuda1 = torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:1")
    assert same_device(cpu, torch.device("cpu")) and same_device(cuda0, torch.device("cuda", 0))
    assert not same_device(cpu, cuda0) and not same_device(cuda0, cuda1) and not same_device(torch.device("meta"), cpu)


@pytest.mark.gpu
@cuda
def test_an_unindexed_cuda_device_is_the_current_one() -> None:
    """A load without `gpus` runs on `cuda`; NVDEC's frames are on `cuda:0`, which `==` says is another device."""
    from serve.pipelines.frames import same_device

    current = torch.device("cuda", torch.cuda.current_device())
    assert same_device(torch.device("cuda"), current) and same_device(current, torch.device("cuda"))


@pytest.mark.gpu
@cuda
def test_a_deferred_download_is_valid_once_its_event_completes() -> None:
    """`AutoregressiveStream.start`'s copy: returned before it ends, right after its event (worker `_run` waits)."""
    bridge = HostBridge(torch.device("cuda"), seed=0)
    frames = torch.randint(0, 255, (12, 512, 512, 3), dtype=torch.uint8, device="cuda")
    bridge.defer_wait = True
    host = bridge.download(frames)
    done = bridge.take_pending()
    assert done is not None and bridge.take_pending() is None
    done.synchronize()
    assert np.array_equal(host, frames.cpu().numpy())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("pipeline_id", ["streamdiffusionv2", "longlive", "reward-forcing", "memflow",
                                         "krea-realtime-video"])  # fmt: skip
def test_every_pipeline_runs_its_chunk_loop_on_cuda(pipeline_id: str) -> None:
    spec = get_spec(pipeline_id)
    params = spec.effective_load_params(LoadParams(height=64, width=64, random_weights=True), allow_random_weights=True)
    pipeline = spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"))
    assert pipeline.device.type == "cuda"
    stream = pipeline.open_stream(0)
    runtime = {**spec.runtime_defaults, "prompts": [{"text": "a cat", "weight": 1.0}]}
    frames = np.random.default_rng(0).integers(0, 255, (pipeline.chunk_frames, 64, 64, 3), dtype=np.uint8)
    for mode in ("video", "text"):
        for _ in range(3):
            out = stream.process(frames if mode == "video" else None, {**runtime, "input_mode": mode})
            assert out.dtype == np.uint8 and out.shape[1:] == (64, 64, 3)


@pytest.mark.gpu
@cuda
def test_steady_state_chunk_makes_no_unexpected_host_sync() -> None:
    """CUDA's sync debug mode flags every synchronising call; a steady chunk makes exactly the frames-out wait."""
    spec = get_spec("longlive")
    params = spec.effective_load_params(LoadParams(height=64, width=64, random_weights=True), allow_random_weights=True)
    pipeline = spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"))
    stream = pipeline.open_stream(0)
    runtime = {**spec.runtime_defaults, "input_mode": "text", "prompts": [{"text": "a cat", "weight": 1.0}]}
    for _ in range(2):
        stream.process(None, runtime)
    torch.cuda.set_sync_debug_mode("error")
    try:
        stream.process(None, runtime)  # the download's stream synchronize is explicit, not a hidden sync
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_step_sees_the_same_cache_and_text_buffers_every_chunk() -> None:
    """What a captured CUDA graph replays against: the KV cache and the text K/V keep their addresses through
    prompt switches (re-cache), transitions and MemFlow's bank updates; only their contents change."""
    from serve.pipelines.dry_run import scripted_params

    spec = get_spec("memflow")  # LongLive's re-cache plus the bank's writes
    params = spec.effective_load_params(LoadParams(height=32, width=32, random_weights=True), allow_random_weights=True)
    pipeline = spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"))
    seen: set[tuple[int, ...]] = set()
    eager = pipeline.step

    def step(latents, timestep, text_kv, cache_k, cache_v, *rest, **kwargs):
        seen.add(tuple(t.data_ptr() for t in (*text_kv, cache_k, cache_v)))
        return eager(latents, timestep, text_kv, cache_k, cache_v, *rest, **kwargs)

    pipeline.step = step
    stream = pipeline.open_stream(0)
    for chunk_params in scripted_params(spec.runtime_defaults, "text", 6):
        stream.process(None, chunk_params)
    assert stream.recaches == 1 and len(seen) == 1


GRAPHED_CASES = [
    ("streamdiffusionv2", "video", False), ("longlive", "text", False), ("krea-realtime-video", "text", False),
    ("reward-forcing", "video", False), ("longlive", "video", True),
]  # fmt: skip


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("pipeline_id", "mode", "vace"), GRAPHED_CASES)
def test_cuda_graph_replay_equals_the_ungraphed_stream(pipeline_id: str, mode: str, vace: bool) -> None:
    """`auto` replays the steady chunk from a CUDA graph (serve/runtime/cuda_step.py); `eager` by name does not.
    Same kernels, same order: the frames and the KV cache agree through a prompt switch (re-cache, ungraphed) and
    Krea's recompute, and the graph really replayed."""
    from serve.pipelines.dry_run import scripted_params
    from serve.runtime.cuda_step import CudaStep

    spec = get_spec(pipeline_id)
    streams, steps = [], []
    for backend in ("eager", "auto"):
        params = spec.effective_load_params(
            LoadParams(height=64, width=64, random_weights=True, backend=backend, vace_enabled=vace),
            allow_random_weights=True,
        )
        pipeline = spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"))
        step = pipeline.vace_step if vace else pipeline.step
        assert isinstance(step, CudaStep) and step.graphs_wanted == (backend == "auto"), pipeline.backends
        streams.append(pipeline.open_stream(0))
        steps.append(step)
    frames = np.random.default_rng(0).integers(0, 255, (streams[0].p.chunk_frames, 64, 64, 3), dtype=np.uint8)
    for chunk_params in scripted_params({**spec.runtime_defaults, "vace_enabled": vace}, mode, 6):
        reference, ours = (s.process(frames if mode == "video" else None, chunk_params) for s in streams)
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    assert steps[1].failed is None and steps[1].replays > 0
    assert torch.allclose(streams[1].cache.k.float(), streams[0].cache.k.float(), atol=1e-2)


@pytest.mark.gpu
@cuda
def test_nvdec_planes_on_another_gpu_are_copied_device_to_device() -> None:
    """NVDEC decodes on its own GPU; a pipeline loaded on another one (`gpus: "1"`) took the planes through the host,
    a blocking copy per plane. The result must be the planes' own conversion, and the copy must stay on the GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs; {torch.cuda.device_count()} visible")
    from kernels.colour import BT601_LIMITED
    from serve.pipelines.frames import YuvChunk, YuvFrame, upload_yuv

    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 256, (64, 64), dtype=torch.uint8, generator=generator)
    uv = torch.randint(0, 256, (32, 64), dtype=torch.uint8, generator=generator)
    frame = YuvFrame(y.cuda(0), uv[:, 0::2].cuda(0), uv[:, 1::2].cuda(0), BT601_LIMITED)
    host = YuvFrame(y, uv[:, 0::2].contiguous(), uv[:, 1::2].contiguous(), BT601_LIMITED)
    with torch.cuda.device(1):  # the pipeline's worker thread has its GPU current (Triton launches there)
        expected = upload_yuv(YuvChunk((host,)), torch.device("cuda:1"), 64, 64)
        out = upload_yuv(YuvChunk((frame,)), torch.device("cuda:1"), 64, 64)
    assert out.device == torch.device("cuda:1") and torch.equal(out, expected)
