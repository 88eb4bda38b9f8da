"""The noise levels a chunk is denoised at: `warp_denoising_steps` (warped by default where the originals warp) against
reference loops written from the published algorithms (models.md §2, §3.1, §3.5), and the raw setting against the
outputs wanrt gave before the setting existed.

The references share nothing with the loop but the model's forward: their own scheduler table (numpy, float64), the
whole history in one `forward_full` pass under a block-causal mask instead of the KV cache (a chunk attends the clean
K/V of the chunks before it, its own noisy tokens, at absolute RoPE positions; the history at t = 0 is what the
clean pass leaves in the cache), fresh noise between steps drawn in the stream's order from the stream's seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from serve.models.dit import WanDiT, block_causal_mask
from tests.support.streams import LF, PROMPT_B, SIZE, Recorder, open_stream

SEED = 3
LATENT = SIZE // 8


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


# -- the published scheduler, written out (Self-Forcing's FlowMatchScheduler, sigma_min 0, extra_one_step) -------


def reference_grid(shift: float) -> tuple[np.ndarray, np.ndarray]:
    """σ_i = 1 − i/1000 for i = 0..999, shifted; and the timesteps 1000·σ."""
    sigmas = 1.0 - np.arange(1000, dtype=np.float64) / 1000
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas, 1000 * sigmas


def reference_warp(steps: list[int], shift: float) -> list[float]:
    """`warp_denoising_step`: entry k → timesteps[1000 − k], with 0 appended at index 1000."""
    table = np.append(reference_grid(shift)[1], 0.0)
    return [float(table[1000 - k]) for k in steps]


def reference_sigma(t: float, shift: float) -> float:
    """σ at the grid timestep nearest to t (t = 0 → the last grid point)."""
    sigmas, timesteps = reference_grid(shift)
    return float(sigmas[np.abs(timesteps - t).argmin()])


class ReferenceNoise:
    """The stream's draws, in its order: a chunk's start noise, then one fresh draw per re-noise."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, frames: int) -> Tensor:
        return torch.randn((1, 16, frames, LATENT, LATENT), generator=self.generator)


def denoise(flow_of, timesteps: list[float], shift: float, frames: int, noise: ReferenceNoise) -> Tensor:
    """Few-step sampling of one chunk: x0 = x − σ(t)·v, re-noised to the next level with fresh noise (float64)."""
    x = noise(frames)
    for i, t in enumerate(timesteps):
        x0 = (x.double() - reference_sigma(t, shift) * flow_of(x, t).double()).float()
        if i + 1 < len(timesteps):
            sigma = reference_sigma(timesteps[i + 1], shift)
            x = ((1 - sigma) * x0.double() + sigma * noise(frames).double()).float()
    return x0


def reference_self_forcing(
    dit: WanDiT, context: Tensor, timesteps: list[float], shift: float, chunk: int, chunks: int
) -> list[Tensor]:
    """Self-Forcing's `CausalInferencePipeline.inference` in text mode, global attention (every chunk here fits the
    pipelines' windows): chunk c attends the clean history of chunks < c and itself."""
    history = torch.zeros(1, 16, 0, LATENT, LATENT)
    out = []
    noise = ReferenceNoise(SEED)
    for _ in range(chunks):
        past = history.shape[2]
        mask = block_causal_mask(past + chunk, LF, chunk)

        def flow_of(x: Tensor, t: float, past: int = past, mask: Tensor = mask, history: Tensor = history) -> Tensor:
            timestep = torch.tensor([[0.0] * past + [t] * chunk])
            return dit.forward_full(torch.cat([history, x], dim=2), timestep, context, mask)[:, :, past:]

        x0 = denoise(flow_of, timesteps, shift, chunk, noise)
        history = torch.cat([history, x0], dim=2)
        out.append(x0)
    return out


def reference_krea(dit: WanDiT, vae, context: Tensor, timesteps: list[float], chunks: int, bias: float) -> list[Tensor]:
    """Krea Realtime (models.md §3.5): no clean pass; each chunk after the first attends a context recomputed at t = 0
    from [anchor, last 2 latents] at positions 0..2 (the anchor: the first latent while in range, then the oldest of
    the last 9 decoded frames re-encoded alone) and runs at positions 3..5, log(bias) on context frames 1–2."""
    out: list[Tensor] = []
    noise = ReferenceNoise(SEED)
    for c in range(chunks):
        if c == 0:
            x0 = denoise(lambda x, t: dit.forward_full(x, torch.full((1, 3), t), context), timesteps, 5.0, 3, noise)
        else:
            if c == 1:
                anchor = out[0][:, :, :1]
            else:
                decoded = vae.decode_video(torch.cat(out, dim=2)).clamp(-1, 1)  # the whole clip so far, at once
                anchor, _ = vae.encode_first(decoded[:, :, -9:-8])
            frames = torch.cat([anchor, out[-1][:, :, 1:]], dim=2)
            logits = torch.zeros(6 * LF, 6 * LF).masked_fill(~block_causal_mask(6, LF, 3), float("-inf"))
            logits[3 * LF :, LF : 3 * LF] += math.log(bias)  # the chunk's queries → context frames 1, 2

            def flow_of(x: Tensor, t: float, frames: Tensor = frames, logits: Tensor = logits) -> Tensor:
                timestep = torch.tensor([[0.0] * 3 + [t] * 3])
                return dit.forward_full(torch.cat([frames, x], dim=2), timestep, context, logits)[:, :, 3:]

            x0 = denoise(flow_of, timesteps, 5.0, 3, noise)
        out.append(x0)
    return out


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_text(pipeline_id: str, chunks: int, **params) -> tuple[list[Tensor], object]:
    stream, defaults = open_stream(pipeline_id, seed=SEED)
    recorder = Recorder(stream)
    for _ in range(chunks):
        stream.process(None, {**defaults, **params})
    return recorder.x0, stream


# -- parity with the published loops -------------------------------------------------------------------------------

FOUR_STEPS = [1000, 750, 500, 250]


@pytest.mark.parametrize("pipeline_id", ["longlive", "reward-forcing"])
def test_warped_steps_equal_the_self_forcing_loop(pipeline_id: str) -> None:
    """Three chunks of three latent frames, text mode, [1000, 750, 500, 250] warped (the default for both)."""
    ours, stream = run_text(pipeline_id, 3, denoising_step_list=FOUR_STEPS)
    assert stream.p.spec.runtime_defaults["warp_denoising_steps"] is True
    warped = reference_warp(FOUR_STEPS, 5.0)
    assert warped == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)  # models.md §2's table
    reference = reference_self_forcing(stream.p.models.dit, stream.conditioning.context, warped, 5.0, 3, 3)
    for c, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert relative_error(a, b) <= 1e-5, f"chunk {c}: {relative_error(a, b)}"

    # The raw list (Scope's behaviour) is another sampler altogether: the check discriminates.
    raw, _ = run_text(pipeline_id, 3, denoising_step_list=FOUR_STEPS, warp_denoising_steps=False)
    assert all(relative_error(a, b) > 1e-2 for a, b in zip(raw, reference, strict=True))
    raw_reference = reference_self_forcing(
        stream.p.models.dit, stream.conditioning.context, [float(k) for k in FOUR_STEPS], 5.0, 3, 3
    )
    assert all(relative_error(a, b) <= 1e-5 for a, b in zip(raw, raw_reference, strict=True))


def test_streamdiffusionv2_feeds_its_list_raw_at_shift_8() -> None:
    """SDv2's original does not warp (models.md §3.1): [750, 250] reach the model as they are, σ from the shift-8
    grid; four one-frame chunks (within its 6-frame cache)."""
    ours, stream = run_text("streamdiffusionv2", 4)
    assert stream.p.spec.runtime_defaults["warp_denoising_steps"] is False
    assert stream.p.spec.runtime_defaults["denoising_step_list"] == [750, 250]
    reference = reference_self_forcing(stream.p.models.dit, stream.conditioning.context, [750.0, 250.0], 8.0, 1, 4)
    for c, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert relative_error(a, b) <= 1e-5, f"chunk {c}: {relative_error(a, b)}"


def test_krea_runs_its_original_schedule_warped() -> None:
    """Krea's `get_denoising_schedule`: linspace(strength·1000, 0, n) then warped; T2V strength 1, n = 5."""
    steps = torch.linspace(1000, 0, 5).long().tolist()
    assert steps == [1000, 750, 500, 250, 0]
    ours, stream = run_text("krea-realtime-video", 3, denoising_step_list=steps)
    warped = reference_warp(steps, 5.0)
    assert warped == pytest.approx([1000.0, 937.5, 833.333, 625.0, 0.0], abs=1e-3)  # Krea's config: 937, 833, 625
    assert stream.p.scheduler.model_timesteps(steps, warp=True) == pytest.approx(warped, abs=1e-9)
    bias = stream.p.spec.runtime_defaults["kv_cache_attention_bias"]
    reference = reference_krea(stream.p.models.dit, stream.p.vae_model, stream.conditioning.context, warped, 3, bias)
    for c, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert relative_error(a, b) <= 1e-5, f"chunk {c}: {relative_error(a, b)}"


# -- video mode ----------------------------------------------------------------------------------------------------


def model_timesteps_per_chunk(stream, chunks: list[np.ndarray], params: dict) -> list[list[float]]:
    """The t of every DiT step each chunk ran (denoising passes, then the clean pass at 0)."""
    seen: list[float] = []
    run_step = stream.run_step

    def recording(latents, t, plan):
        seen.append(float(t))
        return run_step(latents, t, plan)

    stream.run_step = recording
    out = []
    for frames in chunks:
        stream.process(frames, params)
        out.append(list(seen))
        seen.clear()
    return out


@pytest.mark.parametrize("warp", [True, False])
def test_video_mode_mixes_to_noise_scale_then_takes_the_listed_steps_below_it(warp: bool) -> None:
    """σ = noise_scale for the mix and t = 1000·noise_scale for the first step, then the listed steps after the
    first whose model timestep (warped or raw) lies below it; with the noise controller its own first step."""
    stream, defaults = open_stream("longlive", seed=SEED)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 255, (12, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]
    params = {**defaults, "input_mode": "video", "noise_controller": False, "noise_scale": 0.9,
              "denoising_step_list": FOUR_STEPS, "warp_denoising_steps": warp}  # fmt: skip
    listed = reference_warp(FOUR_STEPS, 5.0) if warp else [float(k) for k in FOUR_STEPS]
    expected = [900.0, 833.333, 625.0, 0.0] if warp else [900.0, 750.0, 500.0, 250.0, 0.0]  # + the clean pass
    assert [900.0] + [t for t in listed[1:] if t < 900.0] + [0.0] == pytest.approx(expected, abs=1e-3)
    for seen in model_timesteps_per_chunk(stream, inputs, params):
        assert seen == pytest.approx(expected, abs=1e-3)

    # With the noise controller its first step is a device value: a listed step that may lie above it runs a pass
    # whose result the device discards (no host sync), so the kept passes are the rule's.
    controlled = open_stream("longlive", seed=SEED)[0]
    seen = model_timesteps_per_chunk(controlled, inputs[:1], {**params, "noise_controller": True})[0]
    first = float(int(1000 * float(controlled.noise_controller.strength)) - 100)
    kept = [seen[0]] + [t for t in seen[1:] if t < first]
    assert kept == pytest.approx([first] + [t for t in listed[1:] if t < first] + [0.0], abs=1e-3)


# -- switching ------------------------------------------------------------------------------------------------------


def test_changing_the_setting_mid_stream_restarts_like_a_step_list_change() -> None:
    stream, params = open_stream("longlive", seed=SEED)
    fresh, _ = open_stream("longlive", seed=SEED)
    steps = {**params, "denoising_step_list": FOUR_STEPS}
    for _ in range(2):
        stream.process(None, steps)
    assert stream.frame == 6
    raw = {**steps, "warp_denoising_steps": False}
    restarted = stream.process(None, raw)
    assert stream.frame == 3  # a first chunk again, from the seed
    assert np.array_equal(restarted, fresh.process(None, raw))
    stream.process(None, {**steps, "manage_cache": False})  # off: the history is kept across the change
    assert stream.frame == 6


# -- the raw setting is the behaviour from before the setting --------------------------------------------------------

# Each chunk's uint8 frames as commit 726ef25 gave them (before `warp_denoising_steps` existed: every list was fed
# raw), torch 2.13.0+cpu: 32×32, seed 3, three chunks, PROMPT_B from the third, video frames from numpy's
# default_rng(0), noise controller off. Compared within a bound, not by hash: CPU float kernels differ between
# machines (AVX-512 or not, thread count, oneDNN on or off) by a rounding step in a few pixels. Measured on one
# machine, 726ef25 and the raw setting agree bit for bit; 1 thread without oneDNN against 2 threads with it moves at
# most 1 level in at most 0.02% of the pixels; the warped sampler moves tens of levels almost everywhere.
RAW_OUTPUTS = Path(__file__).parent / "data" / "raw_outputs_726ef25.npz"
CASES = [f"{p}/{m}" for p in ("streamdiffusionv2", "longlive", "reward-forcing", "memflow", "krea-realtime-video")
         for m in ("text", "video")]  # fmt: skip


def chunk_frames(pipeline_id: str, mode: str, **params) -> list[np.ndarray]:
    stream, defaults = open_stream(pipeline_id, seed=SEED)
    rng = np.random.default_rng(0)
    chunks = []
    for c in range(3):
        update = {**defaults, **params, **({"prompts": PROMPT_B} if c == 2 else {})}
        frames = None
        if mode == "video":
            update.update(input_mode="video", noise_controller=False, noise_scale=0.7)
            frames = rng.integers(0, 256, size=(stream.p.chunk_frames, SIZE, SIZE, 3), dtype=np.uint8)
        chunks.append(stream.process(frames, update))
    return chunks


def level_difference(ours: np.ndarray, recorded: np.ndarray) -> tuple[int, float]:
    """(largest difference in levels, share of the values that differ at all)."""
    difference = np.abs(ours.astype(int) - recorded.astype(int))
    return int(difference.max()), float((difference > 0).mean())


@pytest.mark.parametrize("case", CASES)
def test_the_raw_setting_reproduces_the_outputs_from_before_the_setting(case: str) -> None:
    pipeline_id, mode = case.split("/")
    with np.load(RAW_OUTPUTS) as recorded:
        before = [recorded[f"{case}/{c}"] for c in range(3)]
    for chunk, (ours, then) in enumerate(zip(chunk_frames(pipeline_id, mode, warp_denoising_steps=False), before,
                                             strict=True)):  # fmt: skip
        largest, share = level_difference(ours, then)
        assert largest <= 2 and share <= 0.005, f"chunk {chunk}: up to {largest} levels in {share:.2%} of values"
    if mode == "text" and pipeline_id != "streamdiffusionv2":  # their default (warped) is another sampler
        largest, share = level_difference(chunk_frames(pipeline_id, mode)[1], before[1])
        assert share > 0.5, f"the warped sampler left {share:.0%} of the values as the raw one made them"
