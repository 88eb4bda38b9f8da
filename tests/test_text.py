"""Text side of the Wan2.1 core: umT5 encoder, loader, tokenizer, prompt blending/transitions/cache.

Tiny configs with the real key names; the encoder is checked against an independent loop-style reference written
below from the T5 equations, the tokenizer against a SentencePiece model trained here on a toy corpus.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from serve.models.checkpoint import CheckpointError
from serve.models.prompts import (
    EmbeddingCache,
    PromptEncoder,
    PromptTransition,
    blend_embeddings,
    slerp,
)
from serve.models.text_encoder import (
    UMT5_PRESETS,
    UMT5Config,
    UMT5Encoder,
    load_text_encoder,
    relative_position_buckets,
)
from serve.models.tokenizer import UMT5Tokenizer, clean_prompt

TINY = UMT5_PRESETS["tiny"]


def tiny_state_dict(cfg: UMT5Config = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with magnitudes large enough that attention is far from uniform (so bugs show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UMT5Encoder(cfg).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g) * (1.0 if "embedding" in k else 0.3)
    return sd


def tiny_encoder(seed: int = 0) -> UMT5Encoder:
    model = UMT5Encoder(TINY)
    model.load_state_dict(tiny_state_dict(seed=seed))
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# Independent reference: scalar bucket formula and an explicit per-head attention loop.


def ref_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    half = num_buckets // 2
    base = half if rel > 0 else 0
    d = abs(rel)
    exact = half // 2
    if d < exact:
        return base + d
    val = exact + int(math.log(d / exact) / math.log(max_distance / exact) * (half - exact))
    return base + min(val, half - 1)


def ref_encoder(sd: dict[str, torch.Tensor], cfg: UMT5Config, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fp32, one sequence at a time, true length only (as Wan effectively sees it), zero-padded back at the end."""

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps))

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    out = torch.zeros(ids.shape[0], ids.shape[1], cfg.dim)
    hd = cfg.head_dim
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        x = sd["token_embedding.weight"][ids[b, :n]]
        for i in range(cfg.num_layers):
            p = f"blocks.{i}."
            table = sd[p + "pos_embedding.embedding.weight"]
            h = rms(x, sd[p + "norm1.weight"])
            q, k, v = (h @ sd[p + f"attn.{m}.weight"].T for m in "qkv")
            heads = []
            for hh in range(cfg.num_heads):
                sl = slice(hh * hd, (hh + 1) * hd)
                logits = q[:, sl] @ k[:, sl].T  # no 1/sqrt(d)
                for qi in range(n):
                    for kj in range(n):
                        logits[qi, kj] += table[ref_bucket(kj - qi, cfg.num_buckets, cfg.max_distance), hh]
                heads.append(torch.softmax(logits, -1) @ v[:, sl])
            x = x + torch.cat(heads, -1) @ sd[p + "attn.o.weight"].T
            h = rms(x, sd[p + "norm2.weight"])
            gate = gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)
            x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gate) @ sd[p + "ffn.fc2.weight"].T
        out[b, :n] = rms(x, sd["norm.weight"])
    return out


# --------------------------------------------------------------------------------------------------------------------
# Encoder


def test_xxl_key_layout_on_meta_device():
    cfg = UMT5_PRESETS["umt5-xxl"]
    with torch.device("meta"):
        sd = UMT5Encoder(cfg).state_dict()
    # 1 token embedding + 24 · (norm1 + q,k,v,o + norm2 + gate,fc1,fc2 + pos_embedding) + final norm
    assert len(sd) == 1 + 24 * (1 + 4 + 1 + 3 + 1) + 1 == 242 == cfg.num_tensors()
    assert sd["token_embedding.weight"].shape == (256384, 4096)
    for i in (0, 23):
        p = f"blocks.{i}."
        assert sd[p + "norm1.weight"].shape == (4096,)
        assert sd[p + "norm2.weight"].shape == (4096,)
        for m in "qkvo":
            assert sd[p + f"attn.{m}.weight"].shape == (4096, 4096)
        assert sd[p + "ffn.gate.0.weight"].shape == (10240, 4096)
        assert sd[p + "ffn.fc1.weight"].shape == (10240, 4096)
        assert sd[p + "ffn.fc2.weight"].shape == (4096, 10240)
        assert sd[p + "pos_embedding.embedding.weight"].shape == (32, 64)
    assert sd["norm.weight"].shape == (4096,)
    assert "blocks.24.norm1.weight" not in sd
    params = sum(t.numel() for t in sd.values())
    assert 5.6e9 < params < 5.7e9  # models.md: about 5.68 B


def test_relative_buckets_match_scalar_formula_and_known_values():
    got = relative_position_buckets(300, 300, 32, 128)
    for qi in range(0, 300, 7):
        for kj in range(300):
            assert got[qi, kj] == ref_bucket(kj - qi, 32, 128), (qi, kj)
    # Hand-derived anchors: keys before the query use buckets 0..15, after it 16..31; far offsets saturate.
    assert got[10, 10] == 0 and got[10, 9] == 1 and got[10, 11] == 17
    assert got[299, 0] == 15 and got[0, 299] == 31


def test_encoder_matches_loop_reference():
    sd = tiny_state_dict()
    model = tiny_encoder()
    ids = torch.randint(2, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 24, dtype=torch.long)
    mask[0, :24] = 1  # longer than max_distance/2 so log-spaced buckets are exercised
    mask[1, :9] = 1
    ids[1, 9:] = 0
    with torch.inference_mode():
        got = model(ids, mask)
    want = ref_encoder(sd, TINY, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_padded_rows_are_zero_and_padding_length_does_not_change_output():
    model = tiny_encoder()
    seq = torch.tensor([5, 17, 33, 9, 1])
    short_ids = torch.zeros(1, 8, dtype=torch.long)
    long_ids = torch.zeros(1, 40, dtype=torch.long)
    short_ids[0, :5] = seq
    long_ids[0, :5] = seq
    with torch.inference_mode():
        short = model(short_ids, (short_ids != 0).long())
        long = model(long_ids, (long_ids != 0).long())
    assert torch.all(long[0, 5:] == 0) and torch.all(short[0, 5:] == 0)
    assert long[0, :5].abs().sum() > 0
    torch.testing.assert_close(short[0, :5], long[0, :5], rtol=1e-5, atol=1e-5)


def test_fp16_forward_stays_finite():
    model = tiny_encoder().half()
    ids = torch.tensor([[5, 6, 7, 1, 0, 0]])
    with torch.inference_mode():
        out = model(ids, (ids != 0).long())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------------
# Loader


def test_load_pth_bf16_strict(tmp_path: Path):
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_state_dict().items()}
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(sd, path)
    model = load_text_encoder(path, dtype=torch.float32, device="cpu", config="tiny")
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and v.dtype == torch.float32
        assert torch.equal(v, sd[k].float()), k
    assert not any(p.requires_grad for p in model.parameters())


def test_load_safetensors_fp8_upcasts(tmp_path: Path):
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in tiny_state_dict().items()}
    path = tmp_path / "umt5-xxl-enc-fp8_e4m3fn.safetensors"
    save_file(sd, str(path))
    model = load_text_encoder(path, dtype=torch.bfloat16, config=TINY)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, sd[k].to(torch.bfloat16)), k
    ids = torch.tensor([[3, 4, 1, 0]])
    with torch.inference_mode():
        out = model(ids, (ids != 0).long())
    assert out.shape == (1, 4, TINY.dim) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("corrupt", "key", "exc"),
    [
        (lambda sd: sd.pop("blocks.1.ffn.fc1.weight"), "blocks.1.ffn.fc1.weight", CheckpointError),
        (lambda sd: sd.__setitem__("blocks.0.attn.bias", torch.zeros(3)), "blocks.0.attn.bias", CheckpointError),
        (
            lambda sd: sd.__setitem__("blocks.0.attn.q.weight", torch.zeros(TINY.dim, TINY.dim + 1)),
            "blocks.0.attn.q.weight",
            CheckpointError,
        ),
    ],
    ids=["missing", "unexpected", "wrong_shape"],
)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loader_error_names_key_and_file(tmp_path: Path, corrupt, key: str, exc: type, suffix: str):
    sd = tiny_state_dict()
    corrupt(sd)
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    with pytest.raises(exc) as info:
        load_text_encoder(path, dtype=torch.float32, config="tiny")
    assert key in str(info.value) and str(path) in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer

CORPUS = [
    "a cat sitting on a red chair",
    "a dog running through a green field",
    "the camera slowly pans across a city at night",
    "neon lights reflect on wet streets in the rain",
    "a bird flies over the ocean at sunset",
    "cinematic shot of mountains covered in snow",
    "fish & chips",
] * 20


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("umt5_tok")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    # Same special-id layout as google/umt5-xxl: <pad>=0, </s>=1, <unk>=2, no BOS.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spiece"),
        vocab_size=50,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return folder


def test_clean_prompt_matches_wan_cleaning():
    assert clean_prompt("  a\t cat \n\n on   a chair ") == "a cat on a chair"
    assert clean_prompt("fish &amp;amp; chips") == "fish & chips"  # double html.unescape
    assert clean_prompt("caf\u00c3\u00a9") == "café"  # ftfy repairs mojibake
    assert clean_prompt("a\u00a0cat") == "a cat"  # non-breaking space is whitespace too


def test_tokenizer_pads_appends_eos_and_masks(spiece_dir: Path):
    tok = UMT5Tokenizer(spiece_dir, max_length=16)  # folder path accepted
    sp = spm.SentencePieceProcessor(model_file=str(spiece_dir / "spiece.model"))
    ids, mask = tok(["a cat sitting", "  a   cat\tsitting  ", "fish &amp;amp; chips"])
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.long
    want = [*sp.encode("a cat sitting"), 1]
    assert ids[0, : len(want)].tolist() == want
    assert torch.all(ids[0, len(want) :] == 0)
    assert mask[0].tolist() == [1] * len(want) + [0] * (16 - len(want))
    assert torch.equal(ids[0], ids[1])  # whitespace cleaned before tokenizing
    assert ids[2, : mask[2].sum()].tolist() == [*sp.encode("fish & chips"), 1]


def test_tokenizer_truncation_keeps_eos_last(spiece_dir: Path):
    tok = UMT5Tokenizer(spiece_dir / "spiece.model", max_length=8)
    sp = spm.SentencePieceProcessor(model_file=str(spiece_dir / "spiece.model"))
    text = " ".join(CORPUS[:3])
    ids, mask = tok(text)
    assert mask.sum() == 8 and ids[0, -1] == 1
    assert ids[0, :7].tolist() == sp.encode(text)[:7]
    assert UMT5Tokenizer(spiece_dir).max_length == 512


# --------------------------------------------------------------------------------------------------------------------
# Blending, slerp, transitions


def rand_emb(seed: int, shape=(6, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_blend_preserves_weighted_magnitude_and_normalises_weights():
    e1, e2, e3 = rand_emb(1), -rand_emb(2) * 3, rand_emb(3) * 0.5
    blended = blend_embeddings([e1, e2, e3], [2.0, 1.0, 1.0])
    w = [0.5, 0.25, 0.25]
    want_norm = sum(wi * e.norm() for wi, e in zip(w, (e1, e2, e3), strict=True))
    torch.testing.assert_close(blended.norm(), want_norm)
    direction = 0.5 * e1 + 0.25 * e2 + 0.25 * e3
    torch.testing.assert_close(blended / blended.norm(), direction / direction.norm())
    torch.testing.assert_close(blend_embeddings([e1, e2, e3], [4.0, 2.0, 2.0]), blended)


def test_blend_single_prompt_is_identity_and_bad_weights_raise():
    e = rand_emb(4)
    assert blend_embeddings([e], [0.3]) is e
    with pytest.raises(ValueError):
        blend_embeddings([e, e], [0.0, 0.0])
    with pytest.raises(ValueError):
        blend_embeddings([e, e], [1.0, -1.0])


def test_slerp_endpoints_midpoint_and_lerp_fallback():
    e1, e2 = rand_emb(5), rand_emb(6)
    torch.testing.assert_close(slerp(e1, e2, 0.0), e1)
    torch.testing.assert_close(slerp(e1, e2, 1.0), e2)
    # Orthogonal unit rows: the midpoint stays on the unit circle (lerp would shrink it to 1/√2).
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    # Parallel rows (ω = 0) and all-zero padding rows take the lerp path: finite, linear in t.
    p, q = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[2.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(slerp(p, q, 0.25), torch.tensor([[1.25, 2.5], [0.0, 0.0]]))
    # slerp blend of two prompts uses t = normalised second weight.
    torch.testing.assert_close(blend_embeddings([e1, e2], [3.0, 1.0], "slerp"), slerp(e1, e2, 0.25))


def test_transition_yields_num_steps_ending_at_target():
    src, dst = rand_emb(7), rand_emb(8)
    tr = PromptTransition(src, dst, num_steps=4, method="linear")
    steps = list(tr)
    assert len(steps) == 4 and tr.done
    torch.testing.assert_close(steps[0], src)
    torch.testing.assert_close(steps[1], src + (dst - src) / 3)
    assert steps[-1] is dst
    assert tr.next() is dst  # keeps returning the target after the end
    slerp_steps = list(PromptTransition(src, dst, num_steps=5, method="slerp"))
    torch.testing.assert_close(slerp_steps[2], slerp(src, dst, 0.5))


def test_transition_instant_when_zero_steps_or_tiny_change():
    src, dst = rand_emb(9), rand_emb(10)
    assert [s is dst for s in PromptTransition(src, dst, num_steps=0)] == [True]
    near = src + 1e-4  # below the skip norm: every step of the walk is already the target
    assert all(torch.equal(step, near) for step in PromptTransition(src, near, num_steps=8))


# --------------------------------------------------------------------------------------------------------------------
# Cache + PromptEncoder


def test_embedding_cache_evicts_least_recently_used():
    cache = EmbeddingCache(max_entries=2)
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # touch a, so b is now the oldest
    cache.put("c", c)
    assert "b" not in cache and cache.get("a") is a and cache.get("c") is c


def test_prompt_encoder_caches_by_normalised_text(spiece_dir: Path):
    tok = UMT5Tokenizer(spiece_dir, max_length=16)
    assert tok.vocab_size <= TINY.vocab_size
    encoder = tiny_encoder()
    calls = []
    encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    pe = PromptEncoder(tok, encoder, cache_entries=4)

    first = pe.encode([("a cat sitting on a red chair", 1.0)])
    assert first.shape == (1, 16, TINY.dim) and calls == [1]
    again = pe.encode([("  a cat  sitting on a red chair ", 5.0)])
    assert calls == [1]  # served from cache: same normalised text
    assert again.data_ptr() == first.data_ptr()

    # Output equals a direct encoder run; padding rows are zero.
    ids, mask = tok("a cat sitting on a red chair")
    with torch.inference_mode():
        direct = encoder(ids, mask)
    assert calls == [1, 1]
    torch.testing.assert_close(first, direct)
    assert torch.all(first[0, int(mask.sum()) :] == 0)

    # Two prompts, one cached: only the new one is encoded, then blended.
    mixed = pe.encode([("a cat sitting on a red chair", 1.0), ("a dog running", 1.0)])
    assert calls == [1, 1, 1]
    dog = pe.embed(["a dog running"])[0]
    torch.testing.assert_close(mixed[0], blend_embeddings([first[0], dog], [0.5, 0.5]))


def test_tokenizer_refuses_model_without_t5_special_ids(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    # SentencePiece defaults: <unk>=0, <s>=1, </s>=2, no pad — ids the umT5 embedding table would misread.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "spiece"),
        vocab_size=50,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match=r"spiece\.model"):
        UMT5Tokenizer(tmp_path)
