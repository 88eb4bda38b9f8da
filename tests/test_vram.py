"""The VRAM plan (serve/pipelines/vram.py): the fit check on given numbers, the text encoder's placement, a measured
plan against the exact buffer sizes, and a stream that runs out of GPU memory."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.errors import PipelineLoadError, StreamOutOfMemory
from serve.models.autoencoder import drop_half
from serve.models.dit import first_stage_part
from serve.pipelines.dry_run import dry_run_pipeline
from serve.pipelines.registry import get_spec
from serve.pipelines.vram import (
    GB,
    VramPlan,
    check_fits,
    fit_error,
    fits,
    measure_plan,
    measure_stage_plans,
    module_bytes,
    place_text_encoder,
)
from serve.pipelines.worker import PipelineWorker, StreamSlot
from serve.schemas import LoadParams


def plan(**change) -> VramPlan:
    base = VramPlan(
        pipeline="longlive", height=512, width=512, vae_type="wan", quantization=None,
        weights={"dit bfloat16": int(2.8 * GB), "dit float32": int(0.1 * GB), "vae float32": int(0.5 * GB)},
        text_encoder=int(11.4 * GB), kv_cache=int(2.3 * GB), text_kv=int(0.1 * GB), stream_state=int(2.4 * GB),
        activations=int(7.0 * GB),
    )  # fmt: skip
    return dataclasses.replace(base, **change)


def test_a_plan_that_fits_has_no_error_and_one_that_does_not_names_need_free_and_what_fits() -> None:
    big = plan()  # 26.6 GB with the encoder on the GPU
    assert big.total == pytest.approx(26.6 * GB, rel=1e-6)
    assert fit_error(big, int(40 * GB), []) is None
    smaller = plan(vae_type="lighttae", weights={"dit bfloat16": int(2.8 * GB)}, stream_state=int(0.1 * GB),
                   activations=int(1.8 * GB), text_encoder_on_gpu=False)  # fmt: skip
    too_big = plan(quantization="fp8_e4m3fn", activations=int(30 * GB), text_encoder_on_gpu=False)
    message = fit_error(big, int(16 * GB), [too_big, smaller])
    assert message is not None
    assert "needs 26.6 GB" in message and "16.0 GB are free" in message and "14.4 usable" in message
    assert "vae_type=lighttae" in message and "7.1 GB" in message  # the alternative that fits, with its need
    assert "activations=30" not in message and "fp8" not in message.split("What fits:")[1]
    assert "No smaller configuration" in fit_error(big, int(4 * GB), [too_big, smaller])


def test_the_text_encoder_goes_to_the_gpu_only_when_everything_fits_with_it() -> None:
    assert place_text_encoder(plan(), int(40 * GB)).text_encoder_on_gpu  # 26.6 GB of 36 usable
    on_cpu = place_text_encoder(plan(), int(24 * GB))
    assert not on_cpu.text_encoder_on_gpu and on_cpu.total == pytest.approx(15.2 * GB, rel=1e-6)
    assert fits(on_cpu, int(24 * GB)) and not fits(on_cpu, int(16 * GB))


@pytest.fixture(scope="module")
def sdv2_plan() -> VramPlan:
    return measure_plan("streamdiffusionv2")  # 320×576: 720 tokens a frame, 6 cache frames, 30 layers (seconds)


@pytest.mark.slow
def test_a_measured_plan_holds_the_exact_buffers_and_weights(sdv2_plan: VramPlan) -> None:
    measured = sdv2_plan
    assert measured.kv_cache == 2 * 30 * 6 * 720 * 1536 * 2  # K and V, bf16 (models.md §2: 0.80 GB)
    assert measured.text_kv == 2 * 30 * 512 * 1536 * 2  # 94 MB
    assert measured.weights["dit bfloat16"] + measured.weights["dit float32"] // 2 == pytest.approx(2.84e9, rel=0.01)
    assert measured.text_encoder == pytest.approx(11.36e9, rel=0.01)  # umT5-XXL bf16
    assert 1e9 < measured.stream_state < 5e9 and 0 < measured.activations < 5e9  # the fp32 Wan VAE's caches
    assert measured.with_text_encoder_on_gpu(False).total < 12e9  # issue 10's goal for the 1.3B pipelines
    # The stream batch (3 rows): a scratch frame per row after the 6-frame window, the chunks in flight, and a
    # micro-step's activations (at this size the VAE's peak still dominates).
    batched = measure_plan("streamdiffusionv2", stream_batch_rows=3)
    assert batched.kv_cache == measured.kv_cache * (6 + 3) // 6
    assert batched.activations >= measured.activations and batched.stream_state > measured.stream_state
    assert "stream batch of 3 rows" in batched.describe()


def test_a_chunk_out_of_gpu_memory_stops_its_stream_frees_it_and_the_worker_keeps_serving() -> None:
    spec = get_spec("streamdiffusionv2")
    params = spec.effective_load_params(LoadParams(height=32, width=32, random_weights=True), allow_random_weights=True)
    pipeline = spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"))
    failing, healthy = pipeline.open_stream(0), pipeline.open_stream(1)
    eager, failing_k = pipeline.step, failing.cache.k

    def step(*args, **kwargs):
        if args[3] is failing_k:  # the failing stream's own cache: a GPU would have run out here
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return eager(*args, **kwargs)

    pipeline.step = step
    runtime = {**spec.runtime_defaults, "input_mode": "text"}
    errors: list[BaseException] = []
    outputs: list[np.ndarray] = []
    done = threading.Event()
    worker = PipelineWorker("oom")
    slots = [
        StreamSlot(
            worker,
            name,
            stream,
            4,
            runtime,
            convert=lambda f: f,
            output_has_room=lambda frames: len(outputs) < 2,
            emit=lambda frames, _: (outputs.append(frames), done.set()),
            on_error=errors.append,
            text_fps=16.0,
        )
        for name, stream in (("failing", failing), ("healthy", healthy))
    ]
    try:
        for slot in slots:
            worker.attach(slot)
        assert done.wait(60)
    finally:
        worker.close()
    assert len(errors) == 1 and isinstance(errors[0], StreamOutOfMemory)
    assert "out of GPU memory" in str(errors[0]) and "Tried to allocate 2.00 GiB" in str(errors[0])
    assert failing.cache is None and failing.policy is None  # its buffers are gone
    assert slots[0].closed and outputs and outputs[0].shape == (1, 32, 32, 3)  # the other stream went on


def test_the_wan_vae_steady_decode_frees_each_old_cache_as_its_replacement_is_made() -> None:
    """At 512² the fp32 decoder's caches are 2.4 GB; a steady 3-latent decode used to peak at 7.0 GB above them (all
    three latents at once, every old cache alive until the step returned). One latent per call and caches handed
    over to the step keep the transient below the caches' own size."""
    from serve.models.autoencoder import make_vae
    from serve.pipelines.dry_run import tracking

    vae = make_vae("wan", None, device="meta")
    latents = torch.empty(1, 16, 3, 64, 64, device="meta")
    with tracking() as tracker:
        vae.decode_chunk(latents)  # the first call: its caches are the stream state
        caches = tracker.live
        tracker.reset_peak()
        out = vae.decode_chunk(latents)
        transient = tracker.peak - caches
    assert out.shape == (1, 3, 12, 512, 512)
    assert 2e9 < caches < 3e9 and transient < caches


def test_one_latent_per_call_decodes_and_encodes_what_the_whole_chunk_does() -> None:
    from serve.models.autoencoder import StreamingAutoencoder, make_vae

    model = make_vae("wan", None, size="tiny", seed=0).model
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 1 + 12, 32, 32, generator=generator) * 2 - 1
    latents = torch.randn(1, 16, 4, 4, 4, generator=generator)
    with torch.no_grad():
        _, enc = model.encode_first(pixels[:, :, :1])
        whole_z, _ = model.encode_step(pixels[:, :, 1:], enc)
        _, dec = model.decode_first(latents[:, :, :1])
        whole_x, _ = model.decode_step(latents[:, :, 1:], dec)
    stream = StreamingAutoencoder(model, "wan")
    stream.encode_chunk(pixels[:, :, :1])
    stream.decode_chunk(latents[:, :, :1])
    torch.testing.assert_close(stream.encode_chunk(pixels[:, :, 1:]), whole_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream.decode_chunk(latents[:, :, 1:]), whole_x, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_each_pipeline_stage_plans_only_its_share(sdv2_plan: VramPlan) -> None:
    """A staged load's plan per GPU (serve/pipelines/vram.py `split_plan`), at real size on meta: rank 0's weights
    are what the load builds for it (`first_stage_part`, the VAE without its decoder), the last stage's VAE has no
    encoder, the DiT's weights and the KV cache are shared out with nothing lost or counted twice, and only rank 0
    holds the text encoder."""
    layers = ((0, 8), (8, 16), (16, 23), (23, 30))  # split_blocks(30, 4)
    whole = sdv2_plan
    stages = measure_stage_plans("streamdiffusionv2", 320, 576, split=lambda num_layers: layers)

    oracle = dry_run_pipeline("streamdiffusionv2")
    dit, vae = oracle.models.dit, oracle.vae_model
    last_blocks = sum(module_bytes(dit.blocks[i]) for i in range(23, 30)) + module_bytes(dit.head)
    drop_half(vae, "decoder", "the last stage")
    assert sum(stages[0].weights.values()) == module_bytes(first_stage_part(dit, layers[0])) + module_bytes(vae)
    vae = dry_run_pipeline("streamdiffusionv2").vae_model
    drop_half(vae, "encoder", "the first stage")
    assert sum(stages[3].weights.values()) == last_blocks + module_bytes(vae)

    def dit_bytes(p: VramPlan) -> int:
        return sum(size for key, size in p.weights.items() if key.startswith("dit"))

    assert sum(dit_bytes(p) for p in stages) == dit_bytes(whole)
    assert [p.kv_cache for p in stages] == [whole.kv_cache * (end - start) // 30 for start, end in layers]
    assert sum(p.kv_cache for p in stages) == whole.kv_cache and sum(p.text_kv for p in stages) == whole.text_kv
    assert [p.text_encoder for p in stages] == [whole.text_encoder, 0, 0, 0]
    assert all(p.total < whole.total for p in stages) and "stage 2 of 4 (blocks 16–22)" in stages[2].describe()

    # A stage that does not fit its GPU is refused naming it, with what to change (not a one-device alternative).
    with pytest.raises(PipelineLoadError, match=r"stage 1 of 4 .* fewer blocks \(`blocks_per_stage`\)"):
        check_fits(stages[1], stages[1].total)
    assert check_fits(stages[1], 2 * stages[1].total) == stages[1]
