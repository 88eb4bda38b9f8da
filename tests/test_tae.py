"""TAE (`taew2_1`) and LightTAE (`lighttaew2_1`): key layout, loading, latent spaces, and streaming oracles.

Oracles: the whole clip in one pass (all frames of a block at once), and a test-side frame-by-frame walk with the
reference's sequential semantics (madebyollin/taehv `apply_model_with_memblocks_sequential`: each MemBlock remembers
its previous input, TPool waits for `stride` frames, TGrow emits its frames in time order, depth first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from serve.models.autoencoder import StreamingAutoencoder, load_vae, make_vae
from serve.models.tae import TAEHV, MemBlock, TGrow, TPool, build_tae
from serve.models.vae import WAN_LATENT_MEAN, WAN_LATENT_STD

H, W = 16, 24
MEAN = torch.tensor(WAN_LATENT_MEAN).view(1, -1, 1, 1, 1)
STD = torch.tensor(WAN_LATENT_STD).view(1, -1, 1, 1, 1)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def pixels(t: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, H, W, generator=g) * 2 - 1


def latents(f: int, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, f, H // 8, W // 8, generator=g)


@pytest.fixture(scope="module", params=["tiny", "tiny-light", "tae"])  # "tae": real widths, tiny frames
def tiny(request: pytest.FixtureRequest) -> TAEHV:
    torch.manual_seed(0)
    return build_tae(request.param).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# Key layout and loading


def test_real_config_keys_and_size() -> None:
    with torch.device("meta"):
        state = build_tae("tae").state_dict()
    assert len(state) == 128
    assert 11.2e6 < sum(v.numel() for v in state.values()) < 11.4e6  # about 11.3 M [calc, models.md §4]
    shapes = {
        "encoder.0.weight": (64, 3, 3, 3),
        "encoder.2.conv.weight": (64, 128, 1, 1),  # TPool stride 2
        "encoder.3.weight": (64, 64, 3, 3),
        "encoder.4.conv.0.weight": (64, 128, 3, 3),  # MemBlock: cat[x, past]
        "encoder.12.conv.weight": (64, 64, 1, 1),  # TPool stride 1
        "encoder.17.weight": (16, 64, 3, 3),
        "decoder.1.weight": (256, 16, 3, 3),
        "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
        "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
        "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.22.weight": (3, 64, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "encoder.3.bias" not in state and "decoder.8.bias" not in state


def test_real_decode_step_flops_match_models_md() -> None:
    with torch.device("meta"), torch.no_grad():
        model = build_tae("tae").eval()
        z = torch.zeros(1, 16, 1, 60, 104)
        _, caches = model.decode_first(z)
        with FlopCounterMode(display=False) as counter:
            model.decode_step(z, caches)
    assert counter.get_total_flops() / 1e12 == pytest.approx(0.5, rel=0.1)  # "about 0.5 TFLOP per latent at 480p"


@pytest.mark.parametrize(("vae_type", "suffix"), [("tae", ".pth"), ("lighttae", ".safetensors")])
def test_synthetic_checkpoint_loads_strictly(tmp_path: Path, vae_type: str, suffix: str) -> None:
    torch.manual_seed(3)
    source = build_tae("tiny-light" if vae_type == "lighttae" else "tiny").eval()
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"{vae_type}{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = load_vae(path, vae_type, size="tiny")
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_video(latents(2)), source.decode_video(latents(2)), rtol=0, atol=0)

    del state["decoder.22.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"decoder\.22\.bias") as info:
        load_vae(tmp_path / "bad.pth", vae_type, size="tiny")
    assert "bad.pth" in str(info.value)


def test_tgrow_trained_with_larger_stride_keeps_last_time_step() -> None:
    # Reference `patch_tgrow_layers`: a TGrow weight with more output rows than the model keeps the last rows.
    expected = {"decoder.7.conv.weight": torch.Size([4, 4, 1, 1])}
    w = torch.arange(32.0).view(8, 4, 1, 1)
    out = TAEHV.remap_state_dict({"decoder.7.conv.weight": w}, expected)
    torch.testing.assert_close(out["decoder.7.conv.weight"], w[4:])


def test_lighttae_is_tae_in_raw_wan_latent_space() -> None:
    torch.manual_seed(0)
    tae = build_tae("tiny").eval()
    light = build_tae("tiny-light").eval()
    light.load_state_dict(tae.state_dict())
    x, z = pixels(5), latents(2)
    with torch.no_grad():
        assert rel_err(light.encode_video(x), (tae.encode_video(x) - MEAN) / STD) <= 1e-5
        assert rel_err(light.decode_video(z), tae.decode_video(z * STD + MEAN)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Frame-by-frame reference (oracle 2)


def sequential_reference(blocks: nn.Sequential, frames: list[Tensor]) -> list[Tensor]:
    memory: dict[int, Tensor] = {}
    pooled: dict[int, list[Tensor]] = {}
    outputs: list[Tensor] = []

    def push(x: Tensor, i: int) -> None:
        if i == len(blocks):
            outputs.append(x)
            return
        block = blocks[i]
        if isinstance(block, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            push(block(x, past), i + 1)
        elif isinstance(block, TPool):
            pooled.setdefault(i, []).append(x)
            if len(pooled[i]) == block.stride:
                push(block.conv(torch.cat(pooled.pop(i), 1)), i + 1)
        elif isinstance(block, TGrow):
            for part in block.conv(x).chunk(block.stride, 1):
                push(part, i + 1)
        else:
            push(block(x), i + 1)

    for frame in frames:
        push(frame, 0)
    return outputs


def reference_encode(m: TAEHV, x: Tensor) -> Tensor:
    x01 = (x + 1) / 2
    frames = [x01[:, :, 0]] * 3 + list(x01.unbind(2))  # frame 0 fills latent 0's group of 4
    z = torch.stack(sequential_reference(m.encoder, frames), 2)
    return (z - MEAN) / STD if m.cfg.raw_wan_latents else z


def reference_decode(m: TAEHV, z: Tensor) -> Tensor:
    z = z * STD + MEAN if m.cfg.raw_wan_latents else z
    frames = sequential_reference(m.decoder, list(z.unbind(2)))[m.frames_to_trim :]
    return torch.stack(frames, 2).clamp(0, 1) * 2 - 1


def test_whole_clip_equals_frame_by_frame_reference(tiny: TAEHV) -> None:
    x, z = pixels(9), latents(3)
    with torch.no_grad():
        assert rel_err(tiny.encode_video(x), reference_encode(tiny, x)) <= 1e-5
        y = tiny.decode_video(z)
        assert rel_err(y, reference_decode(tiny, z)) <= 1e-5
    assert ((y > -1) & (y < 1)).float().mean() > 0.3, "enough unclamped outputs for the comparison to mean something"


# ---------------------------------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("first_frames", [1, 5])
def test_streaming_encode_equals_whole_clip(tiny: TAEHV, first_frames: int) -> None:
    vae = StreamingAutoencoder(tiny, "tae")
    x = pixels(13)
    with torch.no_grad():
        whole = vae.encode_video(x)
        parts = [vae.encode_chunk(x[:, :, :first_frames])]
        parts += [vae.encode_chunk(x[:, :, s : s + 4]) for s in range(first_frames, 13, 4)]
    assert [p.shape[2] for p in parts] == [1 + (first_frames - 1) // 4] + [1] * ((13 - first_frames) // 4)
    assert whole.shape == (1, 16, 4, H // 8, W // 8)
    assert rel_err(torch.cat(parts, 2), whole) <= 1e-5


@pytest.mark.parametrize("chunks", [(1, 1, 1, 1), (1, 3), (3, 3)])
def test_streaming_decode_equals_whole_clip(tiny: TAEHV, chunks: tuple[int, ...]) -> None:
    vae = StreamingAutoencoder(tiny, "tae")
    z = latents(sum(chunks))
    with torch.no_grad():
        whole = vae.decode_video(z)
        parts, start = [], 0
        for n in chunks:
            parts.append(vae.decode_chunk(z[:, :, start : start + n]))
            start += n
    assert [p.shape[2] for p in parts] == [1 + 4 * (chunks[0] - 1)] + [4 * n for n in chunks[1:]]
    assert rel_err(torch.cat(parts, 2), whole) <= 1e-5


def test_caches_are_static_and_reset_restarts(tiny: TAEHV) -> None:
    x = pixels(9)
    with torch.no_grad():
        _, c0 = tiny.encode_first(x[:, :, :1])
        _, c1 = tiny.encode_step(x[:, :, 1:5], c0)
        _, d0 = tiny.decode_first(latents(1))
        _, d1 = tiny.decode_step(latents(1, seed=5), d0)
    assert len(c0) == len(d0) == 9
    assert [t.shape for t in c0] == [t.shape for t in c1] and [t.shape for t in d0] == [t.shape for t in d1]

    vae = make_vae("tae", size="tiny")
    with torch.no_grad():
        a = vae.decode_chunk(latents(1))
        vae.decode_chunk(latents(1, seed=7))
        vae.reset()
        torch.testing.assert_close(vae.decode_chunk(latents(1)), a, rtol=0, atol=0)
