"""Each pipeline's cache policy against an explicit reference computation (models.md §2–3), on the tiny config.

The streams run the real loop with seeded random weights; the references recompute what the cache must hold from
recorded clean latents and the model itself, by a different route (fresh buffers, explicit loops, full matrices).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from serve.models.kv_cache import ChunkPlan, KVCache, KVCacheSpec, RollingSinkPolicy, frame_bias, token_index
from tests.support.streams import LF, PROMPT_A, PROMPT_B, SIZE, Recorder, open_stream


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():  # the streams' tensors are inference tensors; so are the references'
        yield


def slot_tokens(slots: list[int]) -> torch.Tensor:
    return token_index(slots, LF)


# -- rolling sink (StreamDiffusionV2, LongLive) ------------------------------------------------------------------


def reference_roll(chunks: int, chunk: int, sink: int, size: int) -> list[int]:
    """The reference's shift-left rule (models.md §2, at frame granularity): the frames held after `chunks` chunks."""
    held: list[int] = []
    for c in range(chunks):
        new = list(range(c * chunk, (c + 1) * chunk))
        if len(held) + chunk > size:
            evict = len(held) + chunk - size
            held = held[:sink] + held[sink + evict :]
        held += new
    return held


@pytest.mark.parametrize(("chunk", "sink", "size"), [(1, 3, 6), (3, 3, 12)])
def test_rolling_sink_holds_the_frames_the_reference_rule_keeps(chunk: int, sink: int, size: int) -> None:
    policy = RollingSinkPolicy(KVCacheSpec(1, 1, 1, 1, LF, size), sink)
    for chunks in range(1, 12):
        next_frame = chunks * chunk
        attended = policy.attended_frames(next_frame - chunk, chunk)
        assert attended == reference_roll(chunks, chunk, sink, size)
        slots = [policy.slot_of_frame(f) for f in attended]
        assert len(set(slots)) == len(slots)  # every held frame has its own slot


# -- Reward Forcing: EMA sink, window-relative RoPE ---------------------------------------------------------------


def test_reward_forcing_sink_is_the_ema_of_evicted_chunks_and_positions_are_window_relative() -> None:
    stream, params = open_stream("reward-forcing")
    assert stream.policy.alpha == 0.999  # models.md §3.3
    stream.policy.alpha = 0.5  # a test value at which the EMA is far from the plain sink
    recorder = Recorder(stream)
    chunks = 6
    for _ in range(chunks):
        stream.process(None, params)

    # Reference: chunk c's clean K/V (cached un-rotated) as the clean pass left them in its slots; the sink starts
    # as chunk 0 and takes each chunk that leaves the 6-frame window: at chunk c ≥ 3, chunk c − 2.
    slots_of_chunk = [list(range(3))] + [[3, 4, 5] if c % 2 else [6, 7, 8] for c in range(1, chunks)]
    clean_k = [recorder.cache_k[c].index_select(2, slot_tokens(slots_of_chunk[c])) for c in range(chunks)]
    sink = clean_k[0]
    for c in range(3, chunks):
        sink = 0.5 * sink + 0.5 * clean_k[c - 2]
    assert torch.allclose(stream.cache.k.index_select(2, slot_tokens([0, 1, 2])), sink, atol=1e-6)
    assert not torch.allclose(sink, clean_k[0])

    # Keys at positions 0..8 in (sink, window by age) order; the chunk's queries are the last three.
    policy = stream.policy
    plan = policy.plan(5 * 3, 3)  # chunk 5: sink + chunks 4, 5
    assert plan.frame_positions.tolist() == [6, 7, 8]
    expected = {0: 0, 1: 1, 2: 2, policy.window.slot_of_frame(12): 3}
    for frame, position in zip(range(12, 18), range(3, 9), strict=True):
        expected[policy.window.slot_of_frame(frame)] = position
    assert {s: int(plan.key_positions[s]) for s in expected} == expected
    assert policy.plan(0, 3).frame_positions.tolist() == [0, 1, 2]
    assert policy.plan(3, 3).frame_positions.tolist() == [3, 4, 5]


# -- MemFlow: memory bank ----------------------------------------------------------------------------------------


def reference_bank(text_k: torch.Tensor, bank: list[torch.Tensor], new: torch.Tensor, keep: int) -> torch.Tensor:
    """Per layer: score each bank frame by the mean over text tokens, heads and frame tokens of q·k/√d (the full
    text × frame matrix), keep the top `keep` in stored order, append the new frame."""
    layers = text_k.shape[0]
    out = []
    for layer in range(layers):
        q = text_k[layer, 0].float()  # [text, heads, d]
        scores = [
            torch.einsum("ihd,thd->iht", q, frame[layer, 0].float()).mean().item() / math.sqrt(q.shape[-1])
            for frame in bank
        ]
        chosen = sorted(sorted(range(len(bank)), key=lambda j: -scores[j])[:keep])
        out.append(torch.cat([bank[j][layer] for j in chosen] + [new[layer]], dim=1))
    return torch.stack(out)


def test_memflow_bank_records_every_third_chunk_and_keeps_what_the_prompt_selects() -> None:
    stream, params = open_stream("memflow")
    recorder = Recorder(stream)
    policy = stream.policy
    for c in range(11):
        if c == 10:  # the prompt of the coming chunk re-ranks the bank
            params = {**params, "prompts": PROMPT_B}
        stream.process(None, params)
        assert policy.bank_filled == min((c + 2) // 3, 3)  # recorded after chunks 0, 3, 6, 9; entered a chunk later

    # The first latent frame of chunks 0, 3, 6, 9 (frames 0, 9, 18, 27), as their clean passes left them.
    recorded = [
        recorder.cache_k[c].index_select(2, slot_tokens([policy.window.slot_of_frame(3 * c)])) for c in (0, 3, 6, 9)
    ]
    bank_tokens = slot_tokens(policy.bank_slots)
    expected = reference_bank(stream.text_kv.k, recorded[:3], recorded[3], keep=2)
    assert torch.allclose(stream.cache.k.index_select(2, bank_tokens), expected, atol=1e-6)
    # Before the bank was full, entries were appended in order.
    before = recorder.cache_k[9].index_select(2, bank_tokens)
    assert torch.equal(before, torch.cat(recorded[:3], dim=2))
    # The bank is attended once filled: plan bias over the bank slots.
    assert torch.all(policy.plan(33, 3).key_bias[bank_tokens] == 0)
    assert stream.recaches == 1  # the prompt switch at chunk 10 (MemFlow is LongLive plus the bank)


# -- Krea: recompute from 3 context frames, attention bias -------------------------------------------------------


def test_krea_recomputes_the_cache_from_the_anchor_and_the_last_two_latents() -> None:
    stream, params = open_stream("krea-realtime-video")
    recorder = Recorder(stream)
    dit = stream.p.models.dit
    for c in range(4):
        stream.process(None, params)
        if c == 0:
            continue
        # Reference: a fresh cache, one step at t = 0 over [anchor, last 2 latents] at positions 0..2.
        previous = recorder.x0[c - 1]
        if c == 1:
            anchor = recorder.x0[0][:, :, :1]  # the real first latent
        else:
            decoded = torch.cat(recorder.video[:c], dim=2)
            anchor, _ = stream.vae.model.encode_first(decoded[:, :, -9:-8])  # oldest of the last 9 frames, alone
        context = torch.cat([anchor, previous[:, :, 1:]], dim=2)
        fresh = KVCache(stream.cache.spec, stream.cache.k.dtype)
        plan = ChunkPlan(slot_tokens([0, 1, 2]), frame_bias(6, LF, dict.fromkeys(range(3), 0.0)), torch.arange(3))
        dit.step(context, torch.zeros(1, 3), stream.text_kv.pair(), fresh.k, fresh.v, *plan.as_args())
        context_tokens = slot_tokens([0, 1, 2])
        got = recorder.cache_k[c].index_select(2, context_tokens)
        assert torch.allclose(got, fresh.k.index_select(2, context_tokens), atol=1e-5), f"chunk {c}"
    assert stream.policy.plan(30, 3).frame_positions.tolist() == [3, 4, 5]  # positions never grow


def test_krea_reads_nothing_of_the_cache_it_held_before_a_chunk() -> None:
    """Krea no longer zeroes its whole cache before each chunk's context pass: whatever its slots held (here
    large random values, written before every chunk) the frames are the same bit for bit."""
    clean, params = open_stream("krea-realtime-video")
    stale, _ = open_stream("krea-realtime-video")
    generator = torch.Generator().manual_seed(9)
    for c in range(4):
        if c > 0:
            for buffer in (stale.cache.k, stale.cache.v):
                buffer.copy_(100 * torch.randn(buffer.shape, generator=generator))
        assert np.array_equal(stale.process(None, params), clean.process(None, params)), f"chunk {c}"


def test_krea_attention_bias_damps_the_context_except_the_anchor_and_one_is_no_bias() -> None:
    stream, _ = open_stream("krea-realtime-video")
    policy = stream.policy
    policy.update_params({"kv_cache_attention_bias": 0.3})
    bias = policy.plan(3, 3).key_bias
    assert torch.all(bias[:LF] == 0)  # the first frame
    assert torch.allclose(bias[LF : 3 * LF], torch.full((2 * LF,), math.log(0.3)))  # the rest of the context
    assert torch.all(bias[3 * LF :] == 0)  # the current chunk
    assert torch.all(torch.isinf(policy.plan(0, 3).key_bias[: 3 * LF]))  # the first chunk has no context
    assert torch.all(torch.isfinite(policy.context_plan().key_bias[: 3 * LF]))  # the recompute pass: no bias

    def run(attention_bias: float | None) -> list[np.ndarray]:
        stream, params = open_stream("krea-realtime-video")
        if attention_bias is None:  # no bias at all: plans with a zero bias over every context frame
            plan = stream.policy.plan
            stream.policy.plan = lambda f, n: ChunkPlan(  # type: ignore[method-assign]
                plan(f, n).write_index, plan(f, n).key_bias.clamp(min=0) if f else plan(f, n).key_bias,
                plan(f, n).frame_positions,
            )  # fmt: skip
            attention_bias = 1.0
        return [stream.process(None, {**params, "kv_cache_attention_bias": attention_bias}) for _ in range(3)]

    one, none, damped = run(1.0), run(None), run(0.3)
    assert all(np.array_equal(a, b) for a, b in zip(one, none, strict=True))
    assert np.array_equal(damped[0], one[0])  # no context yet: nothing to damp
    assert not np.array_equal(damped[1], one[1])


# -- LongLive: re-cache on a prompt switch, and only then ----------------------------------------------------------


def test_longlive_recaches_the_window_with_the_new_prompt_on_a_switch_and_only_then() -> None:
    stream, params = open_stream("longlive")
    params = {**params, "manage_cache": False}  # the noise_scale change below must not restart the stream
    recorder = Recorder(stream)
    for _ in range(5):
        stream.process(None, params)
    stream.process(None, {**params, "noise_scale": 0.5})  # not a prompt change
    stream.process(None, {**params, "prompts": [dict(p) for p in PROMPT_A]})  # the same prompt again
    transition = {"target_prompts": PROMPT_B, "num_steps": 3, "temporal_interpolation_method": "linear"}
    stream.process(None, {**params, "transition": transition})  # gradual: no re-cache
    assert stream.recaches == 0

    before = stream.cache.k.clone(), stream.cache.v.clone()
    next_frame = stream.frame
    switched = {**params, "prompts": PROMPT_B}
    stream.process(None, switched)
    assert stream.recaches == 1
    stream.process(None, switched)
    assert stream.recaches == 1

    # Reference: the saved cache, the new prompt's text K/V, one pass at t = 0 over the window's clean latents
    # (frames next−9 .. next−1) at their positions, attending the sink and the window.
    window = stream.policy.window
    frames = list(range(next_frame - 9, next_frame))
    latents = torch.cat([recorder.x0[f // 3][:, :, f % 3 : f % 3 + 1] for f in frames], dim=2)
    cache = KVCache(stream.cache.spec, stream.cache.k.dtype)
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    slots = [window.slot_of_frame(f) for f in frames]
    plan = ChunkPlan(
        slot_tokens(slots), frame_bias(12, LF, dict.fromkeys([0, 1, 2, *slots], 0.0)), torch.tensor(frames)
    )
    dit = stream.p.models.dit
    text_kv = dit.text_kv(stream.p.models.prompts.encode([(PROMPT_B[0]["text"], 1.0)]))
    dit.step(latents, torch.zeros(1, 9), text_kv, cache.k, cache.v, *plan.as_args())
    # The switch chunk then overwrote the oldest three recached frames; the other six must match the reference.
    kept = slot_tokens([window.slot_of_frame(f) for f in frames[3:]])
    after_switch = recorder.cache_k[-2]
    assert torch.allclose(after_switch.index_select(2, kept), cache.k.index_select(2, kept), atol=1e-5)
    sink = slot_tokens([0, 1, 2])
    assert torch.equal(after_switch.index_select(2, sink), before[0].index_select(2, sink))  # the sink is kept


# -- the loop: transitions, manage_cache, determinism --------------------------------------------------------------


def test_a_transition_walks_the_embedding_linearly_over_its_chunks() -> None:
    stream, params = open_stream("longlive")
    prompts = stream.p.models.prompts
    a = prompts.encode([(PROMPT_A[0]["text"], 1.0)])
    b = prompts.encode([(PROMPT_B[0]["text"], 1.0)])
    stream.process(None, params)
    transition = {"target_prompts": PROMPT_B, "num_steps": 4, "temporal_interpolation_method": "linear"}
    seen = []
    for _ in range(5):
        stream.process(None, {**params, "transition": transition})
        seen.append(stream.conditioning.context)
    for context, t in zip(seen, [0, 1 / 3, 2 / 3, 1, 1], strict=True):
        assert torch.allclose(context, a + t * (b - a), atol=1e-6)
    text_k = stream.p.models.dit.text_kv(b)[0]
    assert torch.allclose(stream.text_kv.k, text_k, atol=1e-6)


def test_manage_cache_restarts_the_stream_when_the_noise_level_changes() -> None:
    stream, params = open_stream("streamdiffusionv2")
    frames = np.random.default_rng(0).integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
    video = {**params, "input_mode": "video", "noise_controller": False}
    first = stream.process(frames, video)
    stream.process(frames, video)
    assert stream.frame == 2
    restarted = stream.process(frames, {**video, "noise_scale": 0.5})
    assert stream.frame == 1 and restarted.shape[0] == 1  # a first chunk again: the VAE restarted too
    stream.process(frames, {**video, "noise_scale": 0.4, "manage_cache": False})
    assert stream.frame == 2
    stream.reset()
    assert np.array_equal(stream.process(frames, video), first)  # same seed, same input → same output


@pytest.mark.parametrize(
    "pipeline_id", ["streamdiffusionv2", "longlive", "reward-forcing", "memflow", "krea-realtime-video"]
)
def test_every_pipeline_is_deterministic_and_a_prompt_update_changes_the_next_chunk(pipeline_id: str) -> None:
    a, params = open_stream(pipeline_id, seed=3)
    b, _ = open_stream(pipeline_id, seed=3)
    chunk = a.p.chunk_frames
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 255, (chunk, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)]
    video = {**params, "input_mode": "video"}
    for i, frames in enumerate(inputs):
        update = {**video, "prompts": PROMPT_B} if i >= 2 else video
        out_a, out_b = a.process(frames, video), b.process(frames, update)
        assert out_a.shape[1:] == (SIZE, SIZE, 3)
        assert np.array_equal(out_a, out_b) == (i < 2), f"chunk {i}"


def test_reset_cache_restarts_the_noise_controller_too() -> None:
    stream, params = open_stream("streamdiffusionv2")
    rng = np.random.default_rng(2)
    inputs = [rng.integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3)]
    video = {**params, "input_mode": "video", "noise_controller": True}
    first = stream.process(inputs[0], video)
    for frames in inputs[1:]:  # motion moves the controller's strength away from its start
        stream.process(frames, video)
    stream.reset()  # what `reset_cache` does
    assert np.array_equal(stream.process(inputs[0], video), first)
