"""Checkpoint loading in every published layout, written by the tests at tiny size with the real key names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serve.models.checkpoint import CheckpointError, load_checkpoint
from serve.models.dit import DIT_CONFIGS, WanDiT, keep_in_fp32, load_dit
from tests.support.checkpoints import record_tensor_reads

CONFIG = DIT_CONFIGS["tiny"]


def reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in WanDiT(CONFIG).state_dict().items()}


def to_diffusers(name: str) -> str:
    """Wan name → diffusers name (the direction of diffusers' conversion script)."""
    renames = [
        ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
        ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
        ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
        ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
        ("time_projection.1.", "condition_embedder.time_proj."),
        ("head.head.", "proj_out."),
        (".self_attn.o.", ".attn1.to_out.0."), (".cross_attn.o.", ".attn2.to_out.0."),
        (".self_attn.norm_", ".attn1.norm_"), (".cross_attn.norm_", ".attn2.norm_"),
        (".self_attn.", ".attn1.to_"), (".cross_attn.", ".attn2.to_"),
        (".ffn.0.", ".ffn.net.0.proj."), (".ffn.2.", ".ffn.net.2."), (".norm3.", ".norm2."),
    ]  # fmt: skip
    if name == "head.modulation":
        return "scale_shift_table"
    if name.endswith(".modulation"):
        return name.replace(".modulation", ".scale_shift_table")
    for old, new in renames:
        if old in f".{name}":
            return f".{name}".replace(old, new, 1)[1:]
    return name


def assert_loaded(model: WanDiT, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    loaded = model.state_dict()
    for name, tensor in state.items():
        expected = tensor.to(torch.float32 if keep_in_fp32(name) else dtype)
        assert loaded[name].dtype == expected.dtype, name
        torch.testing.assert_close(loaded[name], expected, msg=name)


@pytest.mark.parametrize(
    ("layout", "prefer"),
    [
        ("flat", None),
        ("generator", None),
        ("generator_ema", "generator_ema"),
        ("model", None),
        ("fsdp", None),
        ("comfy", None),
    ],
)
def test_pt_wrappers_and_prefixes_load(tmp_path: Path, layout: str, prefer: str | None) -> None:
    state = reference_state()
    prefix = {"generator": "model.", "generator_ema": "model.", "fsdp": "model._fsdp_wrapped_module."}.get(layout, "")
    prefix = "model.diffusion_model." if layout == "comfy" else prefix
    tensors = {prefix + k: v for k, v in state.items()}
    payload = {layout: tensors} if layout in ("generator", "model") else tensors
    if layout == "generator_ema":  # both present: the EMA weights must be the ones taken
        payload = {"generator": {k: torch.zeros_like(v) for k, v in tensors.items()}, "generator_ema": tensors}
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    assert_loaded(load_dit(CONFIG, path, dtype=torch.float32, prefer=prefer), state)


def test_safetensors_single_sharded_and_diffusers_names_load(tmp_path: Path) -> None:
    state = reference_state()
    save_file(state, tmp_path / "single.safetensors")
    assert_loaded(load_dit(CONFIG, tmp_path / "single.safetensors", dtype=torch.float32), state)

    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    names = sorted(state)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"diffusion_pytorch_model-0000{index + 1}-of-00002.safetensors"
        save_file({to_diffusers(n): state[n] for n in part}, shard_dir / file)
        weight_map.update({to_diffusers(n): file for n in part})
    index_path = shard_dir / "diffusion_pytorch_model.safetensors.index.json"
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_loaded(load_dit(CONFIG, shard_dir, dtype=torch.float32), state)


def test_bf16_and_fp8_sources_convert_to_the_target_dtype(tmp_path: Path) -> None:
    state = reference_state()
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file(bf16, tmp_path / "bf16.safetensors")
    model = load_dit(CONFIG, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32  # computed in fp32 by the reference
    assert_loaded(model, {k: v.float() for k, v in bf16.items()}, torch.bfloat16)

    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    save_file(fp8, tmp_path / "fp8.safetensors")
    model = load_dit(CONFIG, tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert_loaded(model, {k: v.float() for k, v in fp8.items()})


def test_loaded_model_computes_like_the_source_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = WanDiT(CONFIG).eval()
    torch.save({"generator": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "g.pt")
    loaded = load_dit(CONFIG, tmp_path / "g.pt", dtype=torch.float32)
    latents, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([[900.0, 100.0]])
    context = torch.randn(1, CONFIG.text_len, CONFIG.text_dim)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_full(latents, t, context), source.forward_full(latents, t, context))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.pop("blocks.1.ffn.2.bias"), "missing keys (1): blocks.1.ffn.2.bias"),
        (
            lambda s: s.__setitem__("blocks.0.extra.weight", torch.zeros(1)),
            "unexpected keys (1): blocks.0.extra.weight",
        ),
        (lambda s: s.__setitem__("head.head.weight", torch.zeros(3, 3)), "shape mismatch (1): head.head.weight"),
    ],
)
def test_mismatched_checkpoints_fail_naming_the_key_and_file(tmp_path: Path, edit, needle: str) -> None:
    state = reference_state()
    edit(state)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as error:
        load_dit(CONFIG, path, dtype=torch.float32)
    assert needle in str(error.value) and str(path) in str(error.value)


def test_corrupt_files_fail_naming_the_file(tmp_path: Path) -> None:
    for name in ("corrupt.safetensors", "corrupt.pt"):
        path = tmp_path / name
        path.write_bytes(b"this is not a checkpoint" * 10)
        with pytest.raises(CheckpointError, match=name):
            load_dit(CONFIG, path, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="no such file"):
        load_dit(CONFIG, tmp_path / "absent.pt", dtype=torch.float32)


def test_lora_merge_equals_base_plus_unmerged_lora(tmp_path: Path) -> None:
    """LongLive's layout: {"generator_lora": PEFT state dict} on every Linear of every block, α/r = 1."""
    torch.manual_seed(0)
    base = WanDiT(CONFIG).eval()
    torch.save({"generator": base.state_dict()}, tmp_path / "base.pt")
    rank, targets = 4, ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                        "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip
    lora = {}
    for i in range(CONFIG.num_layers):
        for target in targets:
            layer = base.get_submodule(f"blocks.{i}.{target}")
            key = f"base_model.model.blocks.{i}.{target}"
            lora[f"{key}.lora_A.weight"] = torch.randn(rank, layer.in_features) * 0.1
            lora[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, rank) * 0.1
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    merged = load_dit(CONFIG, tmp_path / "base.pt", dtype=torch.float32, lora=tmp_path / "lora.pt", lora_scale=0.5)

    # Unmerged reference: y = W x + b + 0.5 · B (A x), through forward hooks on the base model.
    def add_lora(name: str):
        a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
        return lambda module, inputs, output: output + 0.5 * (inputs[0] @ a.T) @ b.T

    for i in range(CONFIG.num_layers):
        for target in targets:
            base.get_submodule(f"blocks.{i}.{target}").register_forward_hook(add_lora(f"blocks.{i}.{target}"))
    latents, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([[800.0, 300.0]])
    context = torch.randn(1, CONFIG.text_len, CONFIG.text_dim)
    with torch.no_grad():
        torch.testing.assert_close(merged.forward_full(latents, t, context), base.forward_full(latents, t, context))


def test_loading_into_a_meta_model_assigns_without_a_second_copy(tmp_path: Path) -> None:
    state = reference_state()
    save_file(state, tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = WanDiT(CONFIG)
    load_checkpoint(model, tmp_path / "m.safetensors", dtype=torch.float32, keep_fp32=keep_in_fp32)
    assert all(not p.is_meta for p in model.parameters())


def test_a_first_stage_load_reads_only_its_blocks_and_the_embeddings(tmp_path: Path, monkeypatch) -> None:
    """A pipeline's first stage (rank 0) of a 4-block DiT in a real safetensors file, sharded so its blocks and the
    rest sit in different files: only the embeddings' and its blocks' tensors are read, equal to the file's; the other
    blocks are placeholders with no weights at their indices, and there is no head. The whole-model load of the same
    files reads every tensor (the watch sees what it should)."""
    config = dataclasses.replace(CONFIG, num_layers=4)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in WanDiT(config).state_dict().items()}
    folder = tmp_path / "sharded"
    folder.mkdir()
    first = {k: v for k, v in state.items() if not k.startswith(("blocks.2.", "blocks.3.", "head."))}
    save_file(first, folder / "first.safetensors")
    save_file({k: v for k, v in state.items() if k not in first}, folder / "rest.safetensors")
    weight_map = {k: "first.safetensors" if k in first else "rest.safetensors" for k in state}
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reads = record_tensor_reads(monkeypatch)

    model = load_dit(config, folder, dtype=torch.float32, first_stage=(0, 2))
    assert set(reads) == {folder / "first.safetensors"}  # not one tensor of the other shard
    assert sorted(reads[folder / "first.safetensors"]) == sorted(first)
    assert_loaded(model, first)
    assert set(model.state_dict()) == set(first)
    assert [bool(list(block.parameters())) for block in model.blocks] == [True, True, False, False]
    assert not list(model.head.parameters())

    reads.clear()
    whole = load_dit(config, folder, dtype=torch.float32)
    assert sorted(name for names in reads.values() for name in names) == sorted(state)
    assert_loaded(whole, state)


def test_a_first_stage_load_still_fails_on_its_own_missing_key(tmp_path: Path) -> None:
    """Strictness holds for what the stage reads: a file without one of its blocks' tensors fails naming it."""
    config = dataclasses.replace(CONFIG, num_layers=4)
    torch.manual_seed(0)
    state = WanDiT(config).state_dict()
    del state["blocks.1.ffn.0.weight"]
    save_file(state, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.ffn\.0\.weight"):
        load_dit(config, tmp_path / "m.safetensors", dtype=torch.float32, first_stage=(0, 2))
