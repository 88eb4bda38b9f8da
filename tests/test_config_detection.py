"""Model configs read from checkpoint shapes (serve/models/config_detection.py), for every preset load_weights knows.

Full-size checkpoints are written with meta tensors: torch.save keeps their names and shapes but no data, so a
"14B checkpoint" is a 90 kB file here, and detection, which reads only shapes, sees what it would see in the real one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from serve.models.checkpoint import CheckpointError
from serve.models.config_detection import detect_preset
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.models.text_encoder import UMT5_PRESETS, UMT5Encoder
from serve.models.vae import WAN_VAE_CONFIGS, WanVAE
from serve.pipelines.weights import DIT_CANDIDATES, TEXT_ENCODER_CANDIDATES, VAE_CANDIDATES


def meta_state(module_type: type[nn.Module], config: object) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return module_type(config).state_dict()


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_each_dit_size_is_read_from_a_self_forcing_style_checkpoint(tmp_path: Path, name: str) -> None:
    # StreamDiffusionV2's layout: {"generator": {"model.<key>": ...}}; its 14B file must load as 14B.
    path = tmp_path / "model.pt"
    state = meta_state(WanDiT, DIT_CONFIGS[name])
    torch.save({"generator": {f"model.{key}": tensor for key, tensor in state.items()}}, path)
    assert detect_preset(path, DIT_CANDIDATES, what="diffusion model") == name


def test_dit_size_is_read_from_safetensors_headers(tmp_path: Path) -> None:
    path = tmp_path / "krea-realtime-video-14b.safetensors"
    state = WanDiT(DIT_CONFIGS["tiny"]).state_dict()
    save_file({f"model.{key}": tensor.to(torch.bfloat16).contiguous() for key, tensor in state.items()}, str(path))
    assert detect_preset(path, DIT_CANDIDATES, what="diffusion model") == "tiny"


def test_the_preferred_wrapper_entry_is_the_one_identified(tmp_path: Path) -> None:
    path = tmp_path / "rewardforcing.pt"
    ema = meta_state(WanDiT, DIT_CONFIGS["wan2.1-1.3b"])
    other = meta_state(WanDiT, replace(DIT_CONFIGS["tiny"], num_layers=3))  # matches nothing
    torch.save({"generator": other, "generator_ema": ema}, path)
    assert detect_preset(path, DIT_CANDIDATES, what="diffusion model", prefer="generator_ema") == "wan2.1-1.3b"


@pytest.mark.parametrize("name", list(UMT5_PRESETS))
def test_each_text_encoder_size_is_read_from_its_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(meta_state(UMT5Encoder, UMT5_PRESETS[name]), path)
    assert detect_preset(path, TEXT_ENCODER_CANDIDATES, what="text encoder") == name


@pytest.mark.parametrize("name", ["wan", "tiny"])
def test_each_vae_size_is_read_from_its_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(meta_state(WanVAE, WAN_VAE_CONFIGS[name]), path)
    assert detect_preset(path, VAE_CANDIDATES, what="VAE") == name


def test_a_file_of_no_known_size_fails_naming_the_file_and_its_shapes(tmp_path: Path) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(meta_state(WanVAE, WAN_VAE_CONFIGS["lightvae"]), path)  # LightVAE where the Wan VAE belongs
    with pytest.raises(CheckpointError) as error:
        detect_preset(path, VAE_CANDIDATES, what="VAE")
    message = str(error.value)
    assert str(path) in message and "match none of the known configs (wan, tiny)" in message
    assert "the file has 194 tensors" in message  # the Wan VAE's key set: only the widths differ
    assert "wan: 188 shapes differ (e.g. decoder.conv1.bias: file [96] vs config [384])" in message
