"""Building a pipeline's models: from its published files, or the `tiny` configs with seeded random weights."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serve.errors import PipelineLoadError
from serve.models.checkpoint import CheckpointError
from serve.models.dit import DIT_CONFIGS, WanDiT, load_dit
from serve.models.prompts import PromptEncoder
from serve.models.text_encoder import UMT5_PRESETS, UMT5Encoder, load_text_encoder
from serve.models.tokenizer import UMT5Tokenizer
from serve.pipelines.base import ProgressFn
from serve.pipelines.spec import PipelineSpec


@dataclass
class Models:
    dit: WanDiT
    prompts: PromptEncoder
    vae_type: str
    vae_path: Path | None
    vae_size: str | None


def load_weights(spec: PipelineSpec, load_params: dict[str, Any], models_dir: Path, *, dit_config: str,
                 prefer: str | None, device: torch.device, dtype: torch.dtype, report: ProgressFn) -> Models:  # fmt: skip
    """The pipeline's published files from `models_dir`; errors name the file and what to do."""
    missing = spec.missing_files(models_dir)
    if missing:
        listed = ", ".join(str(f.local_path(models_dir)) for f in missing)
        raise PipelineLoadError(
            f"{spec.id}: weights missing: {listed}. Place the published files there (one folder per Hugging "
            f"Face repo under {models_dir}), or load with random_weights (server flag --allow-random-weights)"
        )
    dit_file, *rest = spec.files
    lora = next((f for f in rest if f.path.endswith("lora.pt")), None)
    vae_file, text_file, tokenizer_file = spec.files[-3:]
    try:
        report("text encoder", 0.1)
        encoder = load_text_encoder(text_file.local_path(models_dir), dtype=dtype, device=device)
        tokenizer = UMT5Tokenizer(tokenizer_file.local_path(models_dir))
        report("diffusion model", 0.4)
        dit = load_dit(
            DIT_CONFIGS[dit_config], dit_file.local_path(models_dir), dtype=dtype, device=device,
            prefer=prefer, lora=lora.local_path(models_dir) if lora else None,
        )  # fmt: skip
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        raise PipelineLoadError(f"{spec.id}: {exc}") from None
    vae_type = load_params.get("vae_type", "wan")
    if vae_type != "wan":
        raise PipelineLoadError(f"{spec.id}: vae_type {vae_type!r} needs its weight file; only 'wan' is wired yet")
    prompts = PromptEncoder(tokenizer, encoder, output_dtype=dtype, output_device=device)
    return Models(dit, prompts, vae_type, vae_file.local_path(models_dir), None)


def random_models(load_params: dict[str, Any], device: torch.device, seed: int) -> Models:
    """The `tiny` configs with seeded random weights (the `random_weights` load parameter): demos and tests.

    The tokenizer is a small SentencePiece model trained here on a fixed corpus, since no tokenizer file ships with
    random weights; it is deterministic, so the same prompt always gives the same ids.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = WanDiT(DIT_CONFIGS["tiny"]).to(device).eval()
        encoder = UMT5Encoder(UMT5_PRESETS["tiny"]).to(device).eval()
    tokenizer = UMT5Tokenizer(tiny_tokenizer_model(), max_length=dit.config.text_len)
    prompts = PromptEncoder(tokenizer, encoder, output_dtype=torch.float32, output_device=device)
    return Models(dit, prompts, load_params.get("vae_type", "wan"), None, "tiny")


_TINY_CORPUS = (
    "a beautiful landscape with mountains and a river at sunset\n"
    "anime style portrait of a person walking through a forest\n"
    "cinematic scene, film grain, photorealistic portrait, 4k detail\n"
    "a cat and a dog playing in the snow under a blue sky\n"
) * 20


def tiny_tokenizer_model() -> Path:
    import sentencepiece as spm

    folder = Path(tempfile.gettempdir()) / "wanrt-tiny-tokenizer"
    model = folder / "spiece.model"
    if not model.exists():
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=folder))  # several processes may train at once: each in its own folder
        (work / "corpus.txt").write_text(_TINY_CORPUS)
        spm.SentencePieceTrainer.train(
            input=str(work / "corpus.txt"), model_prefix=str(work / "spiece"), vocab_size=60, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            minloglevel=2,
        )  # fmt: skip
        (work / "spiece.model").replace(model)  # atomic: readers see a whole model or none
    return model
