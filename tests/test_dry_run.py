"""The real-size dry run (serve/pipelines/dry_run.py): every pipeline's real chunk loop at real model size (1.3B /
14B DiT, umT5-XXL, each vae_type, fp8 storage for Krea) on the meta device, where a tensor on another device or any
read of a value back to the host raises. Each case crosses the loop's events: the first chunk, steady chunks, a
prompt switch (LongLive's / MemFlow's re-cache), a transition, Krea's recompute with the anchor re-encode, MemFlow's
bank filling and re-ranking, Reward Forcing's EMA sink; video mode runs the noise controller.

About 2 minutes in all on the 2-core dev VM: the models of one size are built once per module, and each case runs
the fewest chunks that reach its events.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.pipelines.dry_run import META, LiveBytes, dry_run_pipeline, meta_models, scripted_params, tracking
from serve.pipelines.policies import NoiseController

pytestmark = pytest.mark.slow

HOST_BYTES_LIMIT = 64 * 2**20  # the largest host tensor a dry run may make (tokenizer ids, plans: kilobytes)


@pytest.fixture(scope="module")
def models_1_3b():
    with LiveBytes() as tracker:
        models = meta_models("wan2.1-1.3b", "wan")
    assert tracker.largest_host < HOST_BYTES_LIMIT  # 1.4B + 5.7B parameters, none of them on the host
    return models


def run(pipeline, mode_chunks: list[tuple[str, int]]) -> tuple[list[np.ndarray], object, LiveBytes]:
    """Run the scripted chunks (each (mode, chunks) in turn, on one stream); returns the outputs, the stream and
    the tracker, after checking the one-copy-each-way rule and the frame counts of the streaming VAE contract."""
    stream = pipeline.open_stream(0)
    outputs = []
    chunk_latents = pipeline.shape.chunk_latents
    with tracking() as tracker:
        for mode, chunks in mode_chunks:
            frames = np.zeros((pipeline.chunk_frames, pipeline.height, pipeline.width, 3), np.uint8)
            for index, params in enumerate(scripted_params(pipeline.spec.runtime_defaults, mode, chunks)):
                uploads, downloads = stream.host.uploads, stream.host.downloads
                first = not stream.vae.decoder_started or index == 0  # a mode switch restarts the stream
                blocking = len(tracker.blocking_uploads)
                out = stream.process(frames if mode == "video" else None, params)
                # No host→device copy that waits for the device (it would drain the GPU's queue, and the host could
                # not run ahead): the plans and index tensors go through kv_cache.to_device.
                assert tracker.blocking_uploads[blocking:] == [], (mode, index, tracker.blocking_uploads[blocking:])
                assert stream.host.downloads == downloads + 1  # one device→host copy per chunk
                assert stream.host.uploads == uploads + (mode == "video")  # one host→device copy in video mode
                expected = 1 + 4 * (chunk_latents - 1) if first else 4 * chunk_latents
                assert out.shape == (expected, pipeline.height, pipeline.width, 3) and out.dtype == np.uint8
                outputs.append(out)
    assert tracker.largest_host < HOST_BYTES_LIMIT
    return outputs, stream, tracker


def test_noise_controller_stays_on_the_device() -> None:
    controller = NoiseController(0.7)
    for _ in range(2):  # the second update compares with the first chunk's last frame
        strength, first_t = controller.update(torch.empty(1, 3, 4, 8, 8, device=META))  # `.item()` would raise
        assert strength.device == META and first_t.device == META and strength.dtype == torch.float64
    low, high = controller.first_timestep_bounds()
    assert low <= high


def test_streamdiffusionv2_video_then_text_at_its_seed_resolution(models_1_3b) -> None:
    pipeline = dry_run_pipeline("streamdiffusionv2", models=models_1_3b)
    assert (pipeline.height, pipeline.width) == (320, 576)
    _, stream, tracker = run(pipeline, [("video", 3), ("text", 1)])  # the mode switch restarts the stream
    assert stream.frame == 1 and tracker.peak > 0


def test_longlive_recaches_on_a_prompt_switch_and_walks_a_transition(models_1_3b) -> None:
    pipeline = dry_run_pipeline("longlive", models=models_1_3b)
    _, stream, _ = run(pipeline, [("text", 4)])
    assert stream.recaches == 1
    assert stream.conditioning._transition is not None  # two steps: the second chunk of it is still ahead


def test_reward_forcing_folds_the_evicted_chunk_into_its_ema_sink_with_lightvae(models_1_3b) -> None:
    pipeline = dry_run_pipeline("reward-forcing", vae_type="lightvae", models=models_1_3b)
    assert pipeline.vae_model.cfg.dim == 24
    _, stream, _ = run(pipeline, [("text", 4)])
    assert stream.policy.evicted_frames(9, 3) == [3, 4, 5]  # the fourth chunk (frame 9) was the first to evict


def test_memflow_fills_and_reranks_its_memory_bank_with_tae(models_1_3b) -> None:
    pipeline = dry_run_pipeline("memflow", vae_type="tae", models=models_1_3b)
    _, stream, _ = run(pipeline, [("text", 11)])  # recordings at frames 0, 9, 18, 27: the fourth re-ranks
    policy = stream.policy
    assert policy.bank_filled == policy.bank_frames and policy._staged is None and stream.recaches == 1


@pytest.mark.parametrize("pipeline_id", ["streamdiffusionv2", "longlive"])
def test_1_3b_pipelines_at_480x832(models_1_3b, pipeline_id: str) -> None:
    vae_type = "lighttae" if pipeline_id == "streamdiffusionv2" else "wan"
    pipeline = dry_run_pipeline(pipeline_id, 480, 832, vae_type=vae_type, models=models_1_3b)
    mode = "video" if pipeline_id == "streamdiffusionv2" else "text"
    run(pipeline, [(mode, 2)])


def test_krea_14b_fp8_recomputes_its_context_and_reencodes_the_anchor() -> None:
    from serve.models.fp8 import FP8_DTYPE, Fp8Linear

    pipeline = dry_run_pipeline("krea-realtime-video")
    block = pipeline.models.dit.blocks[0]
    assert isinstance(block.ffn[0], Fp8Linear) and block.ffn[0].weight.dtype == FP8_DTYPE
    assert pipeline.models.dit.config.num_layers == 40
    _, stream, _ = run(pipeline, [("text", 4)])  # from frame 6 the anchor is a re-encoded decoded frame
    assert stream.policy._pixels is not None and stream.policy._pixels.shape[2] == 9
