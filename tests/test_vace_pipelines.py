"""VACE conditioning in the five pipelines (tiny config, seeded random weights): each latent frame gets the context
frame it should, the one chunk loop runs the VACE step where it should, and Krea's fp8 storage stays bounded."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.models.autoencoder import make_vae
from serve.models.fp8 import Fp8Linear, store_dit_in_fp8
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy
from serve.models.vace import VACE_IN_DIM, VaceWanDiT
from serve.pipelines import vace_context
from serve.pipelines.registry import get_spec
from serve.pipelines.vace_context import VaceConditioner, read_image
from serve.schemas import MAX_REF_IMAGES, LoadParams
from tests.support.images import black_png_bytes, gradient, write_png

SIZE = 32
MODEL_PIPELINES = ["streamdiffusionv2", "longlive", "reward-forcing", "memflow", "krea-realtime-video"]
PROMPT = [{"text": "a cat", "weight": 1.0}]
VACE_FP8_ERROR_BOUND = 0.025  # relative L2 error of the fp8-stored VACE step against fp32 (test below)


def pixels(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def camera(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (count, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return make_vae("wan", size="tiny", seed=3).model


def conditioner(vae: torch.nn.Module, chunk_latents: int = 3) -> VaceConditioner:
    return VaceConditioner(vae, "wan", SIZE, SIZE, chunk_latents, torch.device("cpu"))


def still_latent(vae: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    return vae.encode_video(pixels(image[None]))[:, :, 0]


def test_read_image_crops_to_fill_without_letterbox(tmp_path: Path) -> None:
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :16] = (255, 0, 0)  # left quarter red, right quarter blue: cropped away
    image[:, 16:48] = (0, 255, 0)
    image[:, 48:] = (0, 0, 255)
    fitted = read_image(write_png(tmp_path / "wide.png", image), 16, 16)
    assert fitted.shape == (16, 16, 3)
    # Only the green middle survives (no red or blue band), and no black bars: filled, not letterboxed.
    assert fitted[..., [0, 2]].max() <= 2 and fitted[..., 1].min() >= 230
    tall = read_image(write_png(tmp_path / "tall.png", image.transpose(1, 0, 2)), 8, 24)
    assert tall.shape == (8, 24, 3)


def test_read_image_crops_before_it_scales_and_refuses_more_pixels_than_uploads_may_hold(tmp_path: Path) -> None:
    """A 1×60000 strip used to be scaled to fill first: 64×3840000 RGB, 737 MB for a 300-byte file."""
    strip = np.full((60000, 1, 3), 90, np.uint8)
    assert (read_image(write_png(tmp_path / "strip.png", strip), 64, 64) == 90).all()
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(black_png_bytes(6000, 6000))  # put in the folder by hand: uploads refuse it
    with pytest.raises(ValueError, match="megapixels"):
        read_image(bomb, 64, 64)


def test_every_image_a_session_may_send_is_decoded_once_and_a_broken_one_logged_once(
    vae: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight references and a first and last frame are allowed, and four were cached: five distinct references were
    decoded again every chunk (one session slowed every stream to 0.8 fps), and a broken file logged every chunk."""
    refs = [str(write_png(tmp_path / f"ref{i}.png", gradient(8, 8, seed=i))) for i in range(MAX_REF_IMAGES + 1)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 8)
    reads: list[str] = []
    monkeypatch.setattr(vace_context, "read_image", lambda path, *size: reads.append(path) or read_image(path, *size))
    vace = conditioner(vae)
    for _ in range(3):  # three chunks, each with every image
        latents = [vace.encode_image("vace_ref_images", path) for path in refs]
        assert all(latent is not None for latent in latents)
        assert vace.encode_image("first_frame_image", str(broken)) is None
    assert sorted(reads) == sorted([*refs, str(broken)])  # each decoded once
    assert ["cannot be decoded" in record.message for record in caplog.records].count(True) == 1


@torch.no_grad()
def test_each_latent_frame_gets_its_own_input_video_frame_and_refs_take_their_own_frames(
    vae: torch.nn.Module, tmp_path: Path
) -> None:
    """Against the whole-clip encode: chunk c's context frame i holds the reactive latent of clip latent 3c + i, with
    or without a ref (Scope shifts them by one when a ref is prepended, and cuts its first chunk from 4 to 3)."""
    video = camera(24, seed=0)
    clip = vae.encode_video(pixels(video[3:]))  # 21 frames → 6 latents: the stream's first chunk takes 9 of 12
    gray = vae.encode_video(torch.zeros(1, 3, 21, SIZE, SIZE))  # inactive = frames·(1 − 1)
    ref_image = gradient(SIZE, SIZE, seed=4)
    ref_path = write_png(tmp_path / "ref.png", ref_image)
    ref = still_latent(vae, ref_image)

    plain, with_ref = conditioner(vae), conditioner(vae)
    params = {"vace_context_scale": 0.5}
    for c in range(2):
        chunk = pixels(video[12 * c : 12 * (c + 1)])
        a = plain.chunk(chunk, params)
        b = with_ref.chunk(chunk, {**params, "vace_ref_images": [str(ref_path)]} if c == 1 else params)
        assert a is not None and b is not None and a.uses_input_video
        assert a.context.shape == (1, VACE_IN_DIM, 3, SIZE // 8, SIZE // 8) and a.scale.item() == 0.5
        expected = clip[:, :, 3 * c : 3 * c + 3]
        torch.testing.assert_close(a.context[:, 16:32], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.context[:, :16], gray[:, :, 3 * c : 3 * c + 3], atol=1e-5, rtol=1e-4)
        assert (a.context[:, 32:] == 1).all()  # mask: generate everywhere
        if c == 0:
            torch.testing.assert_close(b.context, a.context, atol=0, rtol=0)
            continue
        # The ref takes frame 0 as [16 ref | 80 zeros]; frames 1 and 2 keep their own video latents.
        torch.testing.assert_close(b.context[:, :16, 0], ref, atol=1e-5, rtol=1e-4)
        assert (b.context[:, 16:, 0] == 0).all()
        torch.testing.assert_close(b.context[:, :, 1:], a.context[:, :, 1:], atol=0, rtol=0)


class CountingStep:
    """A VAE's own steady encode step, counting its calls (the work a chunk does)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae, self.calls = vae, 0

    def __call__(self, x: torch.Tensor, caches: tuple[torch.Tensor, ...]):
        self.calls += 1
        return self.vae.encode_step(x, caches)


@pytest.mark.parametrize(("vae_type", "chunk_latents"), [("wan", 1), ("wan", 3), ("tae", 3)])
@torch.no_grad()
def test_the_inactive_latents_encoded_at_load_are_the_live_streams_and_save_an_encode_a_chunk(
    vae_type: str, chunk_latents: int
) -> None:
    """VAE(frames·0) was encoded beside the camera every chunk, the same for every camera. Read from the load's
    sequence instead, every context is the live one bit for bit: before the encoder settles, after it, across a
    restart, and with chunks that take no input video between; and a chunk runs half the steady encode steps."""
    model, cpu = make_vae(vae_type, size="tiny", seed=3).model, torch.device("cpu")
    # The same step kind as the streams': a step given runs the whole chunk, the model's own one latent at a time.
    zero_video = vace_context.ZeroVideoLatents.encode(
        model, vae_type, SIZE, SIZE, chunk_latents, cpu, CountingStep(model)
    )
    assert zero_video is not None and len(zero_video.latents) > 1  # the start differs from the steady state
    live_step, read_step = CountingStep(model), CountingStep(model)
    live = VaceConditioner(model, vae_type, SIZE, SIZE, chunk_latents, cpu, live_step)
    read = VaceConditioner(model, vae_type, SIZE, SIZE, chunk_latents, cpu, read_step, zero_video)
    chunks = len(zero_video.latents) + 3
    for c in range(2 * chunks):
        if c == chunks:
            live.reset(), read.reset()
        params = {"vace_use_input_video": c % 7 != 5}  # now and then a chunk of text-like VACE: no video taken
        frames = pixels(camera(4 * chunk_latents, seed=c))
        a, b = live.chunk(frames, params), read.chunk(frames, params)
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert torch.equal(a.context, b.context), c
    assert read_step.calls > 0 and 2 * read_step.calls == live_step.calls


def test_an_encoder_that_does_not_settle_in_time_leaves_the_streams_encoding_it(
    vae: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    zero_video = vace_context.ZeroVideoLatents.encode(vae, "wan", SIZE, SIZE, 3, torch.device("cpu"), max_frames=24)
    assert zero_video is None and "did not settle within 24 frames" in caplog.text


@torch.no_grad()
def test_refs_without_video_and_first_last_frames(
    vae: torch.nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = [gradient(SIZE, SIZE, seed=s) for s in (1, 2, 3)]
    paths = [str(write_png(tmp_path / f"i{k}.png", image)) for k, image in enumerate(images)]
    latents = [still_latent(vae, image) for image in images]
    vace = conditioner(vae)
    assert vace.chunk(None, {}) is None  # nothing given: the base step runs

    r2v = vace.chunk(None, {"vace_ref_images": paths[:2]})
    assert r2v is not None and not r2v.uses_input_video
    for frame in (0, 1):  # one ref per frame, in order
        torch.testing.assert_close(r2v.context[:, :16, frame], latents[frame], atol=1e-5, rtol=1e-4)
    assert (r2v.context[:, 16:, :2] == 0).all() and (r2v.context[:, :, 2] == 0).all()

    fflf = vace.chunk(None, {"first_frame_image": paths[0], "last_frame_image": paths[1]})
    assert fflf is not None
    gray = still_latent(vae, np.full((SIZE, SIZE, 3), 127.5))
    torch.testing.assert_close(fflf.context[:, :16, 0], latents[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fflf.context[:, :16, 2], latents[1], atol=1e-5, rtol=1e-4)
    assert (fflf.context[:, 32:, 0] == 0).all() and (fflf.context[:, 32:, 2] == 0).all()  # kept
    assert (fflf.context[:, 32:, 1] == 1).all()  # generated, from gray
    torch.testing.assert_close(fflf.context[:, :16, 1], gray, atol=1e-4, rtol=1e-3)

    sdv2_vace = conditioner(vae, chunk_latents=1)
    sdv2 = sdv2_vace.chunk(None, {"vace_ref_images": paths})
    assert sdv2 is not None and sdv2.context.shape[2] == 1  # one frame: the first ref only
    torch.testing.assert_close(sdv2.context[:, :16, 0], latents[0], atol=1e-5, rtol=1e-4)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # said once, not every chunk (it filled the log three times a second)
            sdv2_vace.chunk(None, {"vace_ref_images": paths})
    said = [r.message for r in caplog.records if r.message.startswith("vace_ref_images: 3 refs for 1 free")]
    assert len(said) == 1, said

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert vace.chunk(None, {"vace_ref_images": [str(tmp_path / "broken.png")]}) is None  # skipped, no raise
    assert vace.chunk(None, {"vace_enabled": False, "vace_ref_images": paths}) is None


def load(pipeline_id: str, **params):
    spec = get_spec(pipeline_id)
    load_params = spec.effective_load_params(
        LoadParams(height=SIZE, width=SIZE, random_weights=True, **params), allow_random_weights=True
    )
    return spec, spec.resolve_factory().load(spec, load_params, report=lambda *_: None, models_dir=Path("/none"))


@pytest.mark.slow
@pytest.mark.parametrize("pipeline_id", MODEL_PIPELINES)
def test_vace_streams_in_every_pipeline(pipeline_id: str, tmp_path: Path) -> None:
    """- input video at scale 0 is the text-mode stream bit for bit (the latents start from the same noise and the
    VACE step at scale 0 is the base step), and at scale 1 it follows the camera;
    - a ref changes the chunk it is given to, and a chunk whose parameters hold none runs no VACE context."""
    spec, pipeline = load(pipeline_id, vace_enabled=True)
    assert pipeline.backends["dit_step_vace"]["backend"] == "eager"
    assert pipeline.zero_video is not None  # the inactive input-video latents, encoded at load
    params = {**spec.runtime_defaults, "vace_enabled": True, "input_mode": "video", "prompts": PROMPT}
    chunk = pipeline.chunk_frames
    text = pipeline.open_stream(5)
    text_out = [text.process(None, {**params, "input_mode": "text"}) for _ in range(2)]
    zero, one, other = (pipeline.open_stream(5) for _ in range(3))
    zero_out = [zero.process(camera(chunk, c), {**params, "vace_context_scale": 0.0}) for c in range(2)]
    one_out = [one.process(camera(chunk, c), params) for c in range(2)]
    other_out = [other.process(camera(chunk, c + 10), params) for c in range(2)]
    for a, b in zip(zero_out, text_out, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(one_out[1], text_out[1]) and not np.array_equal(one_out[1], other_out[1])

    ref = str(write_png(tmp_path / "ref.png", gradient(SIZE, SIZE, seed=7)))
    plain, referenced = pipeline.open_stream(6), pipeline.open_stream(6)
    text_params = {**params, "input_mode": "text"}
    assert not np.array_equal(
        plain.process(None, text_params), referenced.process(None, {**text_params, "vace_ref_images": [ref]})
    )
    assert referenced.vace is not None and referenced.vace.chunk(None, text_params) is None
    assert referenced.process(None, text_params).shape[0] == chunk  # the stream goes on


def test_krea_vace_with_fp8_weight_storage_stays_within_the_bound() -> None:
    """Scope calls VACE incompatible with fp8; here the VACE blocks' Linears are stored in fp8 like the main ones
    (the one selection, build_engines.quantize.fp8_linear_names), and the VACE step stays within a stated bound of
    fp32. Measured on the tiny model, seeds 0-3: 1.45-1.60 % relative (the base step: 0.45-0.61 %, bound 1.5 %,
    tests/test_fp8.py): the hints add the VACE block's own 12 fp8 Linears on top of the main path's, so the bound
    here is 2.5 %."""
    from tests.test_fp8 import relative_error

    _, pipeline = load("krea-realtime-video", vace_enabled=True)  # fp8_e4m3fn is Krea's default
    block = pipeline.models.dit.vace_blocks[0]
    assert all(isinstance(layer, Fp8Linear) for layer in (block.self_attn.q, block.before_proj, block.after_proj))

    torch.manual_seed(0)
    reference = VaceWanDiT(pipeline.models.dit.config).eval()
    quantized = copy.deepcopy(reference)
    store_dit_in_fp8(quantized, torch.float32)
    config = reference.config
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 8, 8, generator=generator)
    context = torch.randn(1, config.text_len, config.text_dim, generator=generator)
    vace_context = torch.randn(1, VACE_IN_DIM, 3, 8, 8, generator=generator)
    timestep = torch.full((1, 3), 750.0)
    spec_kv = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, 16, 6)
    plan = RollingSinkPolicy(spec_kv, sink_frames=3).plan(0, 3)

    def run(model: VaceWanDiT) -> torch.Tensor:
        cache = KVCache(spec_kv, torch.float32)
        with torch.no_grad():
            return model.step_vace(
                latents, timestep, model.text_kv(context), cache.k, cache.v, *plan.as_args(), vace_context,
                model.vace_text_kv(context), torch.tensor(1.0),
            )  # fmt: skip

    exact, approx = run(reference), run(quantized)
    error = relative_error(approx, exact)
    assert 0 < error <= VACE_FP8_ERROR_BOUND, error
