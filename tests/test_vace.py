"""The VACE branch against its oracles: Wan's key layout, an explicit reference forward written here from Wan's
`VaceWanModel`, scale 0 = the base model bit for bit, and chunked streaming = the per-chunk semantics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from serve.models.dit import DIT_CONFIGS, WanDiT, block_causal_mask
from serve.models.kv_cache import KVCache, KVCacheSpec, RollingSinkPolicy
from serve.models.vace import VACE_IN_DIM, VaceWanDiT, attach_vace, vace_layers

CHUNK = 3
H = W = 8  # latent size: 4×4 tokens per frame
LF = (H // 2) * (W // 2)
# The tiny config with 4 layers: the 14B/1.3B rule (every 2nd) then maps layers 0 and 2, so two VACE blocks chain
# and two main blocks get no hint.
TINY4 = dataclasses.replace(DIT_CONFIGS["tiny"], num_layers=4)


def tiny_vace_model(seed: int = 0, config=TINY4) -> VaceWanDiT:
    torch.manual_seed(seed)
    model = VaceWanDiT(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.2 if param.dim() > 1 else 0.1)
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight"):
                param.add_(1.0)
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- key layout ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layers", "keys", "params"),
    [
        ("wan2.1-1.3b", tuple(range(0, 30, 2)), 439, 734_975_232),
        ("wan2.1-14b", (0, 5, 10, 15, 20, 25, 30, 35), 236, 3_049_101_312),
    ],
)
def test_real_vace_branch_has_wans_keys_and_counts(name: str, layers: tuple, keys: int, params: int) -> None:
    """vace.md §1-2: 15 / 8 blocks, 439 / 236 keys, 734,975,232 / 3,049,101,312 parameters."""
    config = DIT_CONFIGS[name]
    with torch.device("meta"):
        model = VaceWanDiT(config)
    assert model.vace_layers == layers == vace_layers(config)
    state = {k: tuple(v.shape) for k, v in model.vace_branch().state_dict().items()}
    assert len(state) == keys
    assert sum(math.prod(s) for s in state.values()) == params
    d, f = config.dim, config.ffn_dim
    assert state["vace_patch_embedding.weight"] == (d, VACE_IN_DIM, 1, 2, 2)
    assert state["vace_blocks.0.before_proj.weight"] == (d, d)
    assert "vace_blocks.1.before_proj.weight" not in state
    last = len(layers) - 1
    for key, shape in {
        "after_proj.weight": (d, d), "self_attn.q.weight": (d, d), "cross_attn.norm_k.weight": (d,),
        "norm3.bias": (d,), "ffn.0.weight": (f, d), "ffn.2.weight": (d, f), "modulation": (1, 6, d),
    }.items():  # fmt: skip
        assert state[f"vace_blocks.{last}.{key}"] == shape
    # The base keys are exactly the T2V model's: a full Wan2.1-VACE checkpoint is T2V + these.
    base = {k for k in model.state_dict() if not k.startswith("vace_")}
    with torch.device("meta"):
        assert base == set(WanDiT(config).state_dict())


# -- an explicit reference (Wan's `VaceWanModel.forward`, one clip, bidirectional) ---------------------------------


def reference_forward(model: VaceWanDiT, latents, timestep, context, vace_context, scale: float) -> torch.Tensor:
    """Written from Wan's model.py / vace_model.py with plain tensor ops on the state dict (complex RoPE, explicit
    softmax), sharing no code with serve/models/dit.py."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    d, heads = cfg.dim, cfg.num_heads
    hd = d // heads
    _, _, frames, height, width = latents.shape
    fh, fw = height // 2, width // 2
    n = frames * fh * fw

    def embed(conv: str, x):
        y = F.conv3d(x.double(), p[f"{conv}.weight"], p[f"{conv}.bias"], stride=(1, 2, 2))
        return y.flatten(2).transpose(1, 2)[0]  # [n, d]

    # RoPE as complex numbers: (frame, height, width) split of hd/2 pairs.
    c = hd // 2
    splits = (c - 2 * (c // 3), c // 3, c // 3)

    def freqs(positions, pairs):
        omega = 1.0 / 10000 ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
        return torch.polar(torch.ones(len(positions), pairs, dtype=torch.float64), torch.outer(positions, omega))

    grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(fh), torch.arange(fw), indexing="ij"), -1)
    grid = grid.reshape(n, 3).double()
    rot = torch.cat([freqs(grid[:, axis], splits[axis]) for axis in range(3)], dim=1)  # [n, hd/2] complex

    def rope(x):  # [n, heads, hd]
        xc = torch.view_as_complex(x.reshape(n, heads, hd // 2, 2).contiguous())
        return torch.view_as_real(xc * rot[:, None]).reshape(n, heads, hd)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps) * w

    def lin(x, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def attention(prefix, x, source, positional):
        q = rms(lin(x, f"{prefix}.q"), p[f"{prefix}.norm_q.weight"]).view(-1, heads, hd)
        k = rms(lin(source, f"{prefix}.k"), p[f"{prefix}.norm_k.weight"]).view(-1, heads, hd)
        v = lin(source, f"{prefix}.v").view(-1, heads, hd)
        if positional:
            q, k = rope(q), rope(k)
        logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        out = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(-1, d)
        return lin(out, f"{prefix}.o")

    def layer_norm(x, prefix=None):
        y = F.layer_norm(x, (d,), eps=cfg.eps)
        return y * p[f"{prefix}.weight"] + p[f"{prefix}.bias"] if prefix else y

    def gelu(x):
        return F.gelu(x, approximate="tanh")

    # Time: per-frame timesteps, cos-first sinusoid; e0 per token.
    half = cfg.freq_dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    angles = timestep[0].double()[:, None] * omega
    sinusoid = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    e = lin(F.silu(lin(sinusoid, "time_embedding.0")), "time_embedding.2")  # [F, d]
    e0 = lin(F.silu(e), "time_projection.1").view(frames, 6, d).repeat_interleave(fh * fw, 0)  # [n, 6, d]
    text = lin(gelu(lin(context[0].double(), "text_embedding.0")), "text_embedding.2")

    def block(prefix, x):
        mod = p[f"{prefix}.modulation"][0] + e0  # [n, 6, d]
        h = layer_norm(x) * (1 + mod[:, 1]) + mod[:, 0]
        y = attention(f"{prefix}.self_attn", h, h, True)
        x = x + y * mod[:, 2]
        x = x + attention(f"{prefix}.cross_attn", layer_norm(x, f"{prefix}.norm3"), text, False)
        y = lin(gelu(lin(layer_norm(x) * (1 + mod[:, 4]) + mod[:, 3], f"{prefix}.ffn.0")), f"{prefix}.ffn.2")
        return x + y * mod[:, 5]

    x = embed("patch_embedding", latents)
    # forward_vace: c = before_proj(embed(context)) + x, then each VACE block and its after_proj hint.
    cv = lin(embed("vace_patch_embedding", vace_context), "vace_blocks.0.before_proj") + x
    hints = []
    for i in range(len(model.vace_layers)):
        cv = block(f"vace_blocks.{i}", cv)
        hints.append(lin(cv, f"vace_blocks.{i}.after_proj"))
    for layer in range(cfg.num_layers):
        x = block(f"blocks.{layer}", x)
        if layer in model.vace_layers:
            x = x + hints[model.vace_layers.index(layer)] * scale
    mod = p["head.modulation"][0] + e.repeat_interleave(fh * fw, 0)[:, None]  # [n, 2, d]
    out = lin(layer_norm(x) * (1 + mod[:, 1]) + mod[:, 0], "head.head")  # [n, 64] ordered (pt, ph, pw, c)
    out = out.view(frames, fh, fw, 1, 2, 2, cfg.out_dim)
    return torch.einsum("fhwpqrc->cfphqwr", out).reshape(1, cfg.out_dim, frames, height, width).float()


def chunk_inputs(model: VaceWanDiT, frames: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, frames, H, W, generator=generator)
    timestep = torch.rand(1, frames, generator=generator) * 1000
    context = torch.randn(1, model.config.text_len, model.config.text_dim, generator=generator)
    vace_context = torch.randn(1, VACE_IN_DIM, frames, H, W, generator=generator)
    return latents, timestep, context, vace_context


def one_chunk_step(model: VaceWanDiT, latents, timestep, context, vace_context, scale: float):
    spec = KVCacheSpec(model.config.num_layers, 1, model.config.num_heads, model.config.head_dim, LF, 2 * CHUNK)
    cache = KVCache(spec, torch.float32)
    plan = RollingSinkPolicy(spec, sink_frames=CHUNK).plan(0, CHUNK)
    return model.step_vace(
        latents, timestep, model.text_kv(context), cache.k, cache.v, *plan.as_args(),
        vace_context, model.vace_text_kv(context), torch.tensor(scale),
    )  # fmt: skip


@torch.no_grad()
def test_vace_on_one_chunk_equals_the_explicit_reference() -> None:
    model = tiny_vace_model()
    latents, timestep, context, vace_context = chunk_inputs(model, CHUNK)
    reference = reference_forward(model, latents, timestep, context, vace_context, scale=0.7)
    stepped = one_chunk_step(model, latents, timestep, context, vace_context, scale=0.7)
    assert rel_error(stepped, reference) <= 1e-5
    full = model.forward_full_vace(latents, timestep, context, None, vace_context, 0.7, chunk_frames=CHUNK)
    assert rel_error(full, reference) <= 1e-5
    # The hints matter at this scale: without them the output is another.
    base = reference_forward(model, latents, timestep, context, vace_context, scale=0.0)
    assert rel_error(base, reference) > 1e-2


@torch.no_grad()
def test_scale_zero_is_the_base_model_bit_for_bit() -> None:
    model = tiny_vace_model(1)
    base = WanDiT(TINY4).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("vace_")})
    latents, timestep, context, vace_context = chunk_inputs(model, CHUNK, seed=1)
    spec = KVCacheSpec(TINY4.num_layers, 1, TINY4.num_heads, TINY4.head_dim, LF, 2 * CHUNK)
    plan = RollingSinkPolicy(spec, sink_frames=CHUNK).plan(0, CHUNK)
    caches = [KVCache(spec, torch.float32) for _ in range(3)]
    text_kv = model.text_kv(context)
    plain = base.step(latents, timestep, text_kv, caches[0].k, caches[0].v, *plan.as_args())
    same = model.step(latents, timestep, text_kv, caches[1].k, caches[1].v, *plan.as_args())
    zero = model.step_vace(
        latents, timestep, text_kv, caches[2].k, caches[2].v, *plan.as_args(), vace_context,
        model.vace_text_kv(context), torch.tensor(0.0),
    )  # fmt: skip
    assert torch.equal(same, plain) and torch.equal(zero, plain)
    assert torch.equal(caches[2].k, caches[0].k)  # and the cache writes are the base model's


@torch.no_grad()
def test_chunked_streaming_with_vace_equals_the_per_chunk_semantics() -> None:
    """Chunk by chunk through the KV cache (denoising passes first, as the loop runs them) = all frames at once
    under the block-causal mask with each chunk's hints from that chunk alone."""
    model = tiny_vace_model(2)
    chunks = 3
    frames = chunks * CHUNK
    latents, timestep, context, vace_context = chunk_inputs(model, frames, seed=2)
    spec = KVCacheSpec(TINY4.num_layers, 1, TINY4.num_heads, TINY4.head_dim, LF, frames)
    cache = KVCache(spec, torch.float32)
    policy = RollingSinkPolicy(spec, sink_frames=CHUNK)
    text_kv, vace_kv, scale = model.text_kv(context), model.vace_text_kv(context), torch.tensor(1.3)
    outputs = []
    for c in range(chunks):
        plan = policy.plan(c * CHUNK, CHUNK)
        part = slice(c * CHUNK, (c + 1) * CHUNK)
        args = (text_kv, cache.k, cache.v, *plan.as_args(), vace_context[:, :, part], vace_kv, scale)
        noisy = torch.randn_like(latents[:, :, part])
        model.step_vace(noisy, torch.full_like(timestep[:, part], 900.0), *args)  # overwritten by the next pass
        outputs.append(model.step_vace(latents[:, :, part], timestep[:, part], *args))
    streamed = torch.cat(outputs, dim=2)
    mask = block_causal_mask(frames, LF, CHUNK)
    full = model.forward_full_vace(latents, timestep, context, mask, vace_context, 1.3, chunk_frames=CHUNK)
    assert rel_error(streamed, full) <= 1e-5
    # The VACE attention is per chunk: hints computed over the whole clip at once are another thing.
    whole = model.forward_full_vace(latents, timestep, context, mask, vace_context, 1.3, chunk_frames=frames)
    assert rel_error(whole, full) > 1e-3


@torch.no_grad()
def test_random_vace_branch_leaves_the_base_weights_alone() -> None:
    torch.manual_seed(5)
    base = WanDiT(DIT_CONFIGS["tiny"]).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach_vace(base, None, dtype=torch.float32, device="cpu", seed=3)
    assert model.vace_layers == (0,)  # tiny: 2 layers, every 2nd
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)
    again = attach_vace(base, None, dtype=torch.float32, device="cpu", seed=3)
    assert torch.equal(again.vace_patch_embedding.weight, model.vace_patch_embedding.weight)
