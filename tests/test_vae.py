"""Wan VAE / LightVAE: key layout, strict loading, and streaming against two oracles.

Oracles: (1) the whole clip in one pass (full causal convs with zero front padding, no chunking), and (2) a test-side
re-statement of the reference's own chunked algorithm (`wan/modules/vae.py`: a lazily filled `feat_cache` list, the
`'Rep'` marker in up3d, frame 0 alone then chunks of 4 for encode, one latent per call for decode), run over the same
weights. Sizes are tiny (dim 8, 16×24 pixels) so the file runs in a few seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from serve.models.autoencoder import VAE_TYPES, ChunkStep, StreamingAutoencoder, load_vae, make_vae
from serve.models.vae import (
    WAN_LATENT_MEAN,
    WAN_LATENT_STD,
    CausalConv3d,
    Resample,
    ResidualBlock,
    WanVAE,
    build_wan_vae,
)

H, W = 16, 24  # non-square so a transposed H/W would fail


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def tiny() -> WanVAE:
    torch.manual_seed(0)
    model = build_wan_vae("tiny").eval().requires_grad_(False)
    # Random weights drive the decoder far past the [-1, 1] clamp, which would hide differences: shrink the last conv.
    model.decoder.head[2].weight.mul_(0.05)
    return model


def pixels(t: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, H, W, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------------
# Key layout


REAL_SHAPES = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.0.residual.2.weight": (96, 96, 3, 3, 3),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}


def test_real_config_has_194_tensors_with_reference_shapes() -> None:
    with torch.device("meta"):
        state = build_wan_vae("wan").state_dict()
    assert len(state) == 194
    assert sum(v.numel() for v in state.values()) == 126_892_531  # models.md §4
    for key, shape in REAL_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    convs = [k[: -len(".weight")] for k in state if k.endswith(".weight")]
    assert all(f"{c}.bias" in state for c in convs), "every conv has a bias"
    assert not any(k.endswith("norm.bias") or ".residual.0.bias" in k for k in state), "RMS_norm stores only gamma"


def test_lightvae_has_same_keys_with_pruned_widths() -> None:
    with torch.device("meta"):
        real = build_wan_vae("wan").state_dict()
        light = build_wan_vae("lightvae").state_dict()
    assert list(light) == list(real)
    assert tuple(light["encoder.conv1.weight"].shape) == (24, 3, 3, 3, 3)
    assert tuple(light["encoder.downsamples.3.shortcut.weight"].shape) == (48, 24, 1, 1, 1)
    assert tuple(light["encoder.middle.1.to_qkv.weight"].shape) == (288, 96, 1, 1)
    assert tuple(light["decoder.upsamples.3.time_conv.weight"].shape) == (192, 96, 3, 1, 1)
    assert tuple(light["decoder.head.2.weight"].shape) == (3, 24, 3, 3, 3)
    assert 7.9e6 < sum(v.numel() for v in light.values()) < 8.1e6  # about 8.0 M [calc, models.md §4]


@pytest.mark.parametrize(("height", "width", "tflop"), [(480, 832, 13.5), (512, 512, 8.9), (256, 256, 2.2)])
def test_real_decode_step_flops_match_models_md(height: int, width: int, tflop: float) -> None:
    # The numerical tests run tiny widths; this checks the full-size graph (counted on the meta device, no compute).
    with torch.device("meta"), torch.no_grad():
        model = build_wan_vae("wan").eval()
        z = torch.zeros(1, 16, 1, height // 8, width // 8)
        _, caches = model.decode_first(z)
        with FlopCounterMode(display=False) as counter:
            x, _ = model.decode_step(z, caches)
    assert x.shape == (1, 3, 4, height, width)
    assert counter.get_total_flops() / 1e12 == pytest.approx(tflop, rel=0.01)  # models.md §4 [calc]


# ---------------------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_synthetic_checkpoint_loads_strictly_and_computes_the_same(tiny: WanVAE, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = load_vae(path, "wan", size="tiny")
    x = pixels(5)
    torch.testing.assert_close(loaded.encode_video(x), tiny.encode_video(x), rtol=0, atol=0)
    assert loaded.latent_mean.flatten().tolist() == pytest.approx(WAN_LATENT_MEAN)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("missing", "decoder.head.2.bias"),
        ("unexpected", "decoder.head.3.weight"),
        ("shape", "encoder.downsamples.5.time_conv.weight"),
    ],
)
def test_bad_checkpoint_error_names_the_key_and_file(tiny: WanVAE, tmp_path: Path, edit: str, needle: str) -> None:
    state = dict(tiny.state_dict())
    if edit == "missing":
        del state[needle]
    elif edit == "unexpected":
        state[needle] = torch.zeros(1)
    else:
        state[needle] = torch.zeros(1, 1, 3, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=needle) as info:
        load_vae(path, "wan", size="tiny")
    assert str(path) in str(info.value)
    assert edit in str(info.value) or (edit == "shape" and "shape mismatch" in str(info.value))


# ---------------------------------------------------------------------------------------------------------------------
# The reference's chunked algorithm, re-stated over our modules (oracle 2)


def ref_causal(conv: CausalConv3d, x: Tensor, cache: Tensor | None) -> Tensor:
    pad = conv.cache_frames
    if cache is not None and pad > 0:
        x = torch.cat([cache, x], 2)
        pad -= cache.shape[2]
    return conv(F.pad(x, (0, 0, 0, 0, pad, 0)))


def ref_cached_conv(conv: CausalConv3d, x: Tensor, fc: list, idx: list[int]) -> Tensor:
    i = idx[0]
    cache_x = x[:, :, -2:].clone()
    if cache_x.shape[2] < 2 and fc[i] is not None:
        cache_x = torch.cat([fc[i][:, :, -1:], cache_x], 2)  # keep the last frame of the previous chunk too
    out = ref_causal(conv, x, fc[i])
    fc[i] = cache_x
    idx[0] += 1
    return out


def ref_resblock(block: ResidualBlock, x: Tensor, fc: list, idx: list[int]) -> Tensor:
    r = block.residual
    h = block.shortcut(x)
    x = ref_cached_conv(r[2], F.silu(r[0](x)), fc, idx)
    x = ref_cached_conv(r[6], F.silu(r[3](x)), fc, idx)
    return x + h


def ref_resample(block: Resample, x: Tensor, fc: list, idx: list[int]) -> Tensor:
    b, c, t, h, w = x.shape
    if block.mode == "up3d":
        i = idx[0]
        if fc[i] is None:
            fc[i] = "Rep"  # first call: no temporal doubling
        else:
            cache_x = x[:, :, -2:].clone()
            if cache_x.shape[2] < 2 and not isinstance(fc[i], str):
                cache_x = torch.cat([fc[i][:, :, -1:], cache_x], 2)
            if cache_x.shape[2] < 2 and isinstance(fc[i], str):
                cache_x = torch.cat([torch.zeros_like(cache_x), cache_x], 2)
            x = ref_causal(block.time_conv, x, None if isinstance(fc[i], str) else fc[i])
            fc[i] = cache_x
            x = torch.stack((x.reshape(b, 2, c, t, h, w)[:, 0], x.reshape(b, 2, c, t, h, w)[:, 1]), 3)
            x = x.reshape(b, c, t * 2, h, w)
        idx[0] += 1
    t = x.shape[2]
    y = block.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    x = y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)
    if block.mode == "down3d":
        i = idx[0]
        if fc[i] is None:
            fc[i] = x.clone()  # first call: no time_conv
        else:
            cache_x = x[:, :, -1:].clone()
            x = block.time_conv(torch.cat([fc[i][:, :, -1:], x], 2))
            fc[i] = cache_x
        idx[0] += 1
    return x


def ref_walk(blocks: list, x: Tensor, fc: list, idx: list[int]) -> Tensor:
    for blk in blocks:
        if isinstance(blk, CausalConv3d):
            x = ref_cached_conv(blk, x, fc, idx)
        elif isinstance(blk, ResidualBlock):
            x = ref_resblock(blk, x, fc, idx)
        elif isinstance(blk, Resample):
            x = ref_resample(blk, x, fc, idx)
        else:  # norms, activations, attention: no time mixing
            x = blk(x)
    return x


def ref_encode(m: WanVAE, x: Tensor) -> Tensor:
    e = m.encoder
    blocks = [e.conv1, *e.downsamples, *e.middle, *e.head]
    fc: list = [None] * 64
    outs = []
    for i in range(1 + (x.shape[2] - 1) // 4):
        chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1) : 1 + 4 * i]
        outs.append(ref_walk(blocks, chunk, fc, [0]))
    mu = m.conv1(torch.cat(outs, 2)).chunk(2, dim=1)[0]
    mean, std = torch.tensor(WAN_LATENT_MEAN).view(1, -1, 1, 1, 1), torch.tensor(WAN_LATENT_STD).view(1, -1, 1, 1, 1)
    return (mu - mean) / std


def ref_decode(m: WanVAE, z: Tensor) -> Tensor:
    d = m.decoder
    blocks = [d.conv1, *d.middle, *d.upsamples, *d.head]
    mean, std = torch.tensor(WAN_LATENT_MEAN).view(1, -1, 1, 1, 1), torch.tensor(WAN_LATENT_STD).view(1, -1, 1, 1, 1)
    x = m.conv2(z * std + mean)
    fc: list = [None] * 64
    outs = [ref_walk(blocks, x[:, :, i : i + 1], fc, [0]) for i in range(z.shape[2])]
    return torch.cat(outs, 2).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Streaming oracles


def test_whole_clip_equals_reference_chunked_algorithm(tiny: WanVAE) -> None:
    with torch.no_grad():
        x = pixels(9)
        z = tiny.encode_video(x)
        assert rel_err(z, ref_encode(tiny, x)) <= 1e-5
        y = tiny.decode_video(z)
        assert rel_err(y, ref_decode(tiny, z)) <= 1e-5
        assert (y.abs() < 1).float().mean() > 0.5, "most outputs unclamped, so the comparison means something"


@pytest.mark.parametrize("first_frames", [1, 5])
def test_streaming_encode_equals_whole_clip(tiny: WanVAE, first_frames: int) -> None:
    x = pixels(13)
    vae = StreamingAutoencoder(tiny, "wan")
    with torch.no_grad():
        whole = vae.encode_video(x)
        parts = [vae.encode_chunk(x[:, :, :first_frames])]
        for start in range(first_frames, 13, 4):
            parts.append(vae.encode_chunk(x[:, :, start : start + 4]))
    assert [p.shape[2] for p in parts] == [1 + (first_frames - 1) // 4] + [1] * ((13 - first_frames) // 4)
    assert whole.shape == (1, 16, 4, H // 8, W // 8)
    assert rel_err(torch.cat(parts, 2), whole) <= 1e-5


@pytest.mark.parametrize("chunks", [(1, 1, 1, 1), (1, 3), (3, 3)])
def test_streaming_decode_equals_whole_clip(tiny: WanVAE, chunks: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 16, sum(chunks), H // 8, W // 8, generator=g)
    vae = StreamingAutoencoder(tiny, "wan")
    with torch.no_grad():
        whole = vae.decode_video(z)
        parts, start = [], 0
        for n in chunks:
            parts.append(vae.decode_chunk(z[:, :, start : start + n]))
            start += n
    expected_frames = [vae.num_frames(chunks[0], first=True)] + [vae.num_frames(n, first=False) for n in chunks[1:]]
    assert [p.shape[2] for p in parts] == expected_frames
    assert whole.shape[2] == 1 + 4 * (sum(chunks) - 1)
    assert rel_err(torch.cat(parts, 2), whole) <= 1e-5


def test_steady_caches_are_static(tiny: WanVAE) -> None:
    x = pixels(9)
    with torch.no_grad():
        _, c0 = tiny.encode_first(x[:, :, :1])
        _, c1 = tiny.encode_step(x[:, :, 1:5], c0)
        _, c2 = tiny.encode_step(x[:, :, 5:9], c1)
        z = tiny.encode_video(x)
        _, d0 = tiny.decode_first(z[:, :, :1])
        _, d1 = tiny.decode_step(z[:, :, 1:2], d0)
        _, d2 = tiny.decode_step(z[:, :, 2:3], d1)
    for a, b, c in [(c0, c1, c2), (d0, d1, d2)]:
        assert [t.shape for t in a] == [t.shape for t in b] == [t.shape for t in c]
    assert len(c0) == 24 and len(d0) == 32  # kernel-3 convs + resamplers of the tiny (= real) layout


def test_reset_restarts_the_stream(tiny: WanVAE) -> None:
    vae = StreamingAutoencoder(tiny, "wan")
    x = pixels(5)
    with torch.no_grad():
        a = vae.encode_chunk(x)
        vae.encode_chunk(pixels(4, seed=3))
        vae.reset()
        b = vae.encode_chunk(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("t", [1, 5, 9])
def test_frame_latent_counts(tiny: WanVAE, t: int) -> None:
    with torch.no_grad():
        z = tiny.encode_video(pixels(t))
        assert z.shape[2] == 1 + (t - 1) // 4
        assert tiny.decode_video(z).shape == (1, 3, t, H, W)


def test_bad_chunk_lengths_are_rejected(tiny: WanVAE) -> None:
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        tiny.encode_first(pixels(4))
    _, caches = tiny.encode_first(pixels(1))
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny.encode_step(pixels(3), caches)


def test_exported_steady_steps_equal_eager_over_several_chunks(tiny: WanVAE) -> None:
    # The steps issue 4 exports: static shapes, caches as explicit inputs/outputs, no Python branches on values.
    x = pixels(9)
    with torch.no_grad():
        z0, enc_caches = tiny.encode_first(x[:, :, :1])
        _, dec_caches = tiny.decode_first(z0)
        encode = torch.export.export(ChunkStep(tiny, "encode"), (x[:, :, 1:5], *enc_caches)).module()
        decode = torch.export.export(ChunkStep(tiny, "decode"), (z0, *dec_caches)).module()
        eager_enc, eager_dec = ChunkStep(tiny, "encode"), ChunkStep(tiny, "decode")
        ce, cd, ee, ed = enc_caches, dec_caches, enc_caches, dec_caches
        for start in (1, 5):
            z, *ce = encode(x[:, :, start : start + 4], *ce)
            z_ref, *ee = eager_enc(x[:, :, start : start + 4], *ee)
            assert rel_err(z, z_ref) <= 1e-5
            y, *cd = decode(z, *cd)
            y_ref, *ed = eager_dec(z_ref, *ed)
            assert rel_err(y, y_ref) <= 1e-5


@pytest.mark.parametrize("vae_type", VAE_TYPES)
def test_every_vae_type_meets_the_same_streaming_contract(vae_type: str) -> None:
    vae = make_vae(vae_type, size="tiny")
    assert (vae.temporal_stride, vae.spatial_stride, vae.latent_channels) == (4, 8, 16)
    latent_counts = [vae.encode_chunk(pixels(1)).shape[2], vae.encode_chunk(pixels(4)).shape[2]]
    latent_counts.append(vae.encode_chunk(pixels(8)).shape[2])
    assert (
        latent_counts == [1, 1, 2] == [vae.num_latents(1, True), vae.num_latents(4, False), vae.num_latents(8, False)]
    )
    z = torch.randn(1, 16, 3, H // 8, W // 8)
    frames = [vae.decode_chunk(z[:, :, :1]), vae.decode_chunk(z[:, :, 1:2]), vae.decode_chunk(z)]
    assert [f.shape[2] for f in frames] == [1, 4, 12]
    assert all(f.shape[3:] == (H, W) and f.abs().max() <= 1 for f in frames)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode_chunk(torch.zeros(1, 3, 4, 12, 24))
    with pytest.raises(ValueError, match="reset"):
        vae.decode_chunk(torch.zeros(1, 16, 1, H // 8, W // 8 + 1))


def test_lightvae_widths_stream_like_the_reference() -> None:
    # The pruned real config (24/48/96/96): same code path at real LightVAE widths, tiny frames.
    torch.manual_seed(0)
    model = build_wan_vae("lightvae").eval().requires_grad_(False)
    model.decoder.head[2].weight.mul_(0.05)
    vae = StreamingAutoencoder(model, "lightvae")
    x = pixels(9)
    with torch.no_grad():
        z = torch.cat([vae.encode_chunk(x[:, :, :5]), vae.encode_chunk(x[:, :, 5:])], 2)
        assert rel_err(z, ref_encode(model, x)) <= 1e-5
        y = torch.cat([vae.decode_chunk(z[:, :, :1]), vae.decode_chunk(z[:, :, 1:])], 2)
        assert rel_err(y, ref_decode(model, z)) <= 1e-5
