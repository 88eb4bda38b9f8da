"""The causal DiT against its oracles: key layout, full-sequence attention, explicit window selection, RoPE."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.rope import apply_rope
from serve.models.dit import (
    DIT_CONFIGS,
    WanDiT,
    block_causal_mask,
    rope_axis_dims,
    sinusoidal_embedding,
)
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy

CHUNK = 3  # latent frames per chunk
H = W = 8  # latent size: 4×4 tokens per frame
LF = (H // 2) * (W // 2)


def tiny_model(seed: int = 0) -> WanDiT:
    """Random weights large enough that every term (modulation, gates, RoPE) changes the output."""
    torch.manual_seed(seed)
    model = WanDiT(DIT_CONFIGS["tiny"]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.2 if param.dim() > 1 else 0.1)
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight"):
                param.add_(1.0)
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# Table of models.md §1.3: key → shape as a function of (d, f).
def expected_shapes(d: int, f: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "patch_embedding.weight": (d, 16, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, 4096), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.head.weight": (64, d), "head.head.bias": (64,), "head.modulation": (1, 2, d),
    }  # fmt: skip
    for i in range(layers):
        block = f"blocks.{i}."
        shapes[block + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{block}{attn}.{proj}.weight"] = (d, d)
                shapes[f"{block}{attn}.{proj}.bias"] = (d,)
            shapes[f"{block}{attn}.norm_q.weight"] = (d,)
            shapes[f"{block}{attn}.norm_k.weight"] = (d,)
        shapes[block + "norm3.weight"] = (d,)
        shapes[block + "norm3.bias"] = (d,)
        shapes[block + "ffn.0.weight"], shapes[block + "ffn.0.bias"] = (f, d), (f,)
        shapes[block + "ffn.2.weight"], shapes[block + "ffn.2.bias"] = (d, f), (d,)
    return shapes


@pytest.mark.parametrize(
    ("name", "count", "params"), [("wan2.1-1.3b", 825, 1_418_996_800), ("wan2.1-14b", 1095, 14_288_491_584)]
)
def test_real_configs_have_the_published_key_layout(name: str, count: int, params: int) -> None:
    config = DIT_CONFIGS[name]
    with torch.device("meta"):
        model = WanDiT(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(state) == count
    assert state == expected_shapes(config.dim, config.ffn_dim, config.num_layers)
    assert sum(math.prod(s) for s in state.values()) == params  # models.md §1.1, matches the file sizes


def test_rope_split_is_22_21_21_for_head_dim_128() -> None:
    assert rope_axis_dims(128) == (22, 21, 21)


def test_sinusoid_is_cos_first() -> None:
    emb = sinusoidal_embedding(torch.tensor([0.0, 500.0]), 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert emb[1, 0].item() == pytest.approx(math.cos(500.0), abs=1e-6)


def test_rope_rotates_adjacent_channel_pairs() -> None:
    """Against complex multiplication of interleaved pairs (the reference's view_as_complex)."""
    x = torch.randn(1, 5, 2, 8)
    angles = torch.randn(5, 4)
    out = apply_rope(x, torch.cos(angles), torch.sin(angles))
    reference = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (4, 2))) * torch.polar(torch.ones(5, 1, 4), angles[:, None])
    )
    torch.testing.assert_close(out, reference.flatten(-2))


def run_chunks(model: WanDiT, latents, timesteps, context, policy, cache, passes=()):
    """Chunk by chunk through the cache; `passes` = extra earlier timesteps run on the same slot first."""
    text_kv = model.text_kv(context)
    outputs = []
    for c in range(latents.shape[2] // CHUNK):
        plan = policy.plan(c * CHUNK, CHUNK)
        chunk = slice(c * CHUNK, (c + 1) * CHUNK)
        for t in passes:  # denoising passes write noisy K/V into the slot; the last pass overwrites them
            noisy = torch.randn_like(latents[:, :, chunk])
            model.step(noisy, torch.full_like(timesteps[:, chunk], t), text_kv, cache.k, cache.v, *plan.as_args())
        outputs.append(
            model.step(latents[:, :, chunk], timesteps[:, chunk], text_kv, cache.k, cache.v, *plan.as_args())
        )
    return torch.cat(outputs, dim=2)


def make_cache(model: WanDiT, frames: int) -> tuple[KVCacheSpec, KVCache]:
    config = model.config
    spec = KVCacheSpec(config.num_layers, 1, config.num_heads, config.head_dim, LF, frames)
    return spec, KVCache(spec, torch.float32)


@torch.no_grad()
def test_chunked_generation_through_the_kv_cache_equals_full_block_causal_attention() -> None:
    model = tiny_model()
    chunks = 4
    latents = torch.randn(1, 16, chunks * CHUNK, H, W)
    timesteps = torch.rand(1, chunks * CHUNK) * 1000  # per-frame timesteps
    context = torch.randn(1, model.config.text_len, model.config.text_dim)
    context[:, 20:] = 0  # padded rows: zero, but attended

    full = model.forward_full(latents, timesteps, context, block_causal_mask(chunks * CHUNK, LF, CHUNK))
    spec, cache = make_cache(model, chunks * CHUNK)
    policy = RollingSinkPolicy(spec, sink_frames=CHUNK)  # buffer holds everything: nothing is evicted
    cached = run_chunks(model, latents, timesteps, context, policy, cache, passes=(1000.0, 750.0))
    assert rel_error(cached, full) <= 1e-5


@torch.no_grad()
def test_rolling_window_with_sink_attends_exactly_the_reference_selection() -> None:
    model = tiny_model(1)
    chunks, sink, window = 5, 3, 9  # LongLive's shape: 3 sink frames + a 9-frame ring (6 past + the current 3)
    frames = chunks * CHUNK
    latents = torch.randn(1, 16, frames, H, W)
    timesteps = torch.rand(1, frames) * 1000
    context = torch.randn(1, model.config.text_len, model.config.text_dim)
    spec, cache = make_cache(model, sink + window)
    policy = RollingSinkPolicy(spec, sink_frames=sink)
    cached = run_chunks(model, latents, timesteps, context, policy, cache)

    # Explicit selection: chunk c's queries see frames [0, sink) and the `window` most recent frames up to its end.
    frame_of_token = torch.arange(frames * LF) // LF
    mask = torch.zeros(frames * LF, frames * LF, dtype=torch.bool)
    for c in range(chunks):
        end = (c + 1) * CHUNK
        visible = (frame_of_token < min(sink, end)) | (
            (frame_of_token >= max(sink, end - window)) & (frame_of_token < end)
        )
        mask[c * CHUNK * LF : end * LF] = visible
    assert policy.attended_frames(4 * CHUNK, CHUNK) == [0, 1, 2, *range(6, 15)]
    full = model.forward_full(latents, timesteps, context, mask)
    assert rel_error(cached, full) <= 1e-5
    # And eviction happened: without it, chunk 4 would also see frames 3..5.
    unlimited = model.forward_full(latents, timesteps, context, block_causal_mask(frames, LF, CHUNK))
    assert rel_error(cached[:, :, -CHUNK:], unlimited[:, :, -CHUNK:]) > 1e-3


@torch.no_grad()
def test_keys_cached_unrotated_and_rotated_at_read_equal_keys_cached_rotated() -> None:
    """The Reward Forcing mode: same step, keys rotated at read time from per-slot positions."""
    model = tiny_model(2)
    frames = 2 * CHUNK
    latents = torch.randn(1, 16, frames, H, W)
    timesteps = torch.rand(1, frames) * 1000
    context = torch.randn(1, model.config.text_len, model.config.text_dim)
    text_kv = model.text_kv(context)
    spec, rotated_cache = make_cache(model, frames)
    _, plain_cache = make_cache(model, frames)
    policy = RollingSinkPolicy(spec, sink_frames=CHUNK)
    slot_cos, slot_sin = model.rope.tables(torch.arange(frames), H // 2, W // 2)  # positions of every cache slot
    for c in range(2):
        plan = policy.plan(c * CHUNK, CHUNK)
        chunk = slice(c * CHUNK, (c + 1) * CHUNK)
        args = (latents[:, :, chunk], timesteps[:, chunk], text_kv)
        a = model.step(*args, rotated_cache.k, rotated_cache.v, *plan.as_args())
        b = model.step(*args, plain_cache.k, plain_cache.v, *plan.as_args(), key_rope=(slot_cos, slot_sin))
        assert rel_error(b, a) <= 1e-5


@torch.no_grad()
def test_key_bias_of_log_one_changes_nothing_and_log_small_damps_past_frames() -> None:
    model = tiny_model(3)
    latents = torch.randn(1, 16, 2 * CHUNK, H, W)
    timesteps = torch.full((1, 2 * CHUNK), 500.0)
    context = torch.randn(1, model.config.text_len, model.config.text_dim)
    text_kv = model.text_kv(context)
    spec, cache = make_cache(model, 2 * CHUNK)
    policy = RollingSinkPolicy(spec, sink_frames=CHUNK)
    model.step(latents[:, :, :CHUNK], timesteps[:, :CHUNK], text_kv, cache.k, cache.v, *policy.plan(0, CHUNK).as_args())
    plan = policy.plan(CHUNK, CHUNK)
    args = (latents[:, :, CHUNK:], timesteps[:, CHUNK:], text_kv, cache.k, cache.v, plan.write_index)
    plain = model.step(*args, plan.key_bias, plan.frame_positions)
    past = torch.arange(spec.max_tokens) < CHUNK * LF
    same = model.step(*args, plan.key_bias + past * math.log(1.0), plan.frame_positions)
    damped = model.step(*args, plan.key_bias + past * math.log(0.3), plan.frame_positions)
    assert torch.equal(same, plain)
    assert rel_error(damped, plain) > 1e-3
