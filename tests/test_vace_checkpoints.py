"""VACE weights in every published layout load strictly (tests/support/checkpoints.py writes them at tiny size):
the full `Wan2.1-VACE-*` checkpoint in Wan's and diffusers' names, Kijai's VACE-module files in bf16 and
fp8_e4m3fn, and a pipeline's files with the module; wrong files are refused naming the file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.errors import PipelineLoadError
from serve.models.checkpoint import CheckpointError, canonical_names, read_checkpoint
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.models.vace import attach_vace, check_vace_file, load_vace_dit, vace_file_kind
from serve.pipelines.registry import PIPELINES, get_spec
from serve.schemas import LoadParams
from tests.support.checkpoints import (
    tiny_dit_state,
    write_full_vace_checkpoint,
    write_pipeline_files,
    write_vace_module,
)

TINY = DIT_CONFIGS["tiny"]


def tiny_base(seed: int = 0) -> WanDiT:
    base = WanDiT(TINY).eval()
    base.load_state_dict({k: v.float() for k, v in tiny_dit_state(seed).items()})
    return base


def assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(expected) <= set(state)
    for name, tensor in expected.items():
        assert torch.equal(state[name].float(), tensor.float()), name


@pytest.mark.parametrize("diffusers", [False, True], ids=["wan-names", "diffusers-names"])
def test_full_vace_checkpoint_loads_strictly(tmp_path: Path, diffusers: bool) -> None:
    state = write_full_vace_checkpoint(tmp_path / "Wan2.1-VACE-1.3B", seed=1, diffusers=diffusers)
    model = load_vace_dit(TINY, tmp_path / "Wan2.1-VACE-1.3B", dtype=torch.float32)
    assert_state(model, state)
    assert len(model.state_dict()) == len(state)  # nothing left over, nothing missing
    # The same file as the VACE source of a separately loaded base: only its vace_* part is taken.
    attached = attach_vace(tiny_base(1), tmp_path / "Wan2.1-VACE-1.3B", dtype=torch.float32, device="cpu")
    assert_state(attached, state)
    assert vace_file_kind(canonical_names(read_checkpoint(tmp_path / "Wan2.1-VACE-1.3B")).values()) == "full"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8_e4m3fn"])
def test_vace_module_file_loads_onto_a_base(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / f"Wan2_1-VACE_module_1_3B_{'bf16' if dtype == torch.bfloat16 else 'fp8_e4m3fn'}.safetensors"
    written = write_vace_module(path, seed=2, dtype=dtype)
    assert all(name.startswith(("vace_blocks.", "vace_patch_embedding.")) for name in load_file(str(path)))
    assert vace_file_kind(load_file(str(path))) == "module"  # vace.md §2: Kijai's detection
    base = tiny_base()
    model = attach_vace(base, path, dtype=torch.float32, device="cpu")
    assert_state(model, written)  # fp8 values widened exactly
    assert_state(model, {k: v.float() for k, v in base.state_dict().items()})  # the base is untouched, shared
    assert model.blocks is base.blocks


def test_vace_module_of_the_other_size_is_refused_naming_file_and_shapes(tmp_path: Path) -> None:
    wider = dataclasses.replace(TINY, dim=96, num_heads=3)  # head_dim 32 as the tiny one; another "size"
    path = tmp_path / "Wan2_1-VACE_module_14B_bf16.safetensors"
    write_vace_module(path, config=wider)
    with pytest.raises(CheckpointError) as error:
        attach_vace(tiny_base(), path, dtype=torch.float32, device="cpu")
    message = str(error.value)
    assert str(path) in message and "[96, 96, 1, 2, 2]" in message and "[64, 96, 1, 2, 2]" in message
    tiny_module = tmp_path / "tiny.safetensors"
    write_vace_module(tiny_module)
    with pytest.raises(CheckpointError, match="another model size"):  # against a real 1.3B base, headers only
        check_vace_file(tiny_module, DIT_CONFIGS["wan2.1-1.3b"])


def test_vace_module_with_a_key_missing_or_no_vace_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.safetensors"
    state = write_vace_module(path)
    del state["vace_blocks.0.after_proj.weight"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys.*vace_blocks\.0\.after_proj\.weight"):
        attach_vace(tiny_base(), path, dtype=torch.float32, device="cpu")
    save_file({k: v.contiguous() for k, v in tiny_dit_state(0).items()}, str(path))  # a T2V file: no vace_* keys
    with pytest.raises(CheckpointError, match="no vace_"):
        attach_vace(tiny_base(), path, dtype=torch.float32, device="cpu")
    assert vace_file_kind(load_file(str(path))) is None


def test_registry_names_the_vace_module_per_model_size_only_for_vace_loads(tmp_path: Path) -> None:
    for pipeline_id, spec in PIPELINES.items():
        if spec.factory is None or not spec.files:
            continue
        size = "14B" if pipeline_id == "krea-realtime-video" else "1_3B"
        (vace_file,) = spec.vace_files
        assert (vace_file.repo, vace_file.path) == (
            "daydreamlive/WanVideo_comfy",
            f"Wan2_1-VACE_module_{size}_bf16.safetensors",
        )
        assert vace_file not in spec.files and vace_file in spec.with_vace_files().files
    write_pipeline_files("longlive", tmp_path)
    assert get_spec("longlive").missing_files(tmp_path) == []  # a non-VACE load needs no module


def load(pipeline_id: str, models_dir: Path, **params):
    spec = get_spec(pipeline_id)
    load_params = spec.effective_load_params(
        LoadParams(height=32, width=32, quantization=None, **params), allow_random_weights=False
    )
    return spec.resolve_factory().load(spec, load_params, report=lambda *_: None, models_dir=models_dir)


def test_vace_load_from_files_and_the_missing_module_error(tmp_path: Path) -> None:
    written = write_pipeline_files("longlive", tmp_path, vace=True)
    pipeline = load("longlive", tmp_path, vace_enabled=True)
    assert_state(pipeline.models.dit, written.vace)
    written.paths["Wan2_1-VACE_module_1_3B_bf16.safetensors"].unlink()
    with pytest.raises(PipelineLoadError) as error:
        load("longlive", tmp_path, vace_enabled=True)
    message = str(error.value)
    assert "WanVideo_comfy/Wan2_1-VACE_module_1_3B_bf16.safetensors" in message
    assert "wanrt models download longlive --vace" in message
    assert not hasattr(load("longlive", tmp_path).models.dit, "vace_blocks")  # without VACE: no module needed
