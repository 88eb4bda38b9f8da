"""Building a pipeline's models: from its published files, or the `tiny` configs with seeded random weights."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve.errors import PipelineLoadError
from serve.models.autoencoder import build_model
from serve.models.checkpoint import CheckpointError
from serve.models.config_detection import detect_preset
from serve.models.dit import DIT_CONFIGS, DiTConfig, WanDiT, first_stage_part, load_dit
from serve.models.prompts import PromptEncoder
from serve.models.text_encoder import UMT5_PRESETS, UMT5Encoder, load_text_encoder
from serve.models.tokenizer import UMT5Tokenizer
from serve.models.vace import attach_vace, check_vace_file
from serve.pipelines.base import ProgressFn
from serve.pipelines.spec import ModelFile, PipelineSpec

log = logging.getLogger(__name__)


@dataclass
class Models:
    dit: WanDiT
    prompts: PromptEncoder
    vae_type: str
    vae_path: Path | None
    vae_size: str | None
    builtin_lora: str | None = None  # `repo/path` of the pipeline's own LoRA (LongLive, MemFlow), merged as it loaded
    stage_layers: tuple[tuple[int, int], ...] | None = None
    """A staged load's split of the DiT's blocks over the pipeline stages: `dit` is then only the first stage's part
    (`first_stage_part`: its blocks, no head); None: `dit` is the whole model."""


# The presets a published file may hold; which one is read from the file's shapes (serve/models/config_detection.py).
DIT_CANDIDATES = {name: partial(WanDiT, config) for name, config in DIT_CONFIGS.items()}
TEXT_ENCODER_CANDIDATES = {name: partial(UMT5Encoder, config) for name, config in UMT5_PRESETS.items()}
# `vae_size` as make_vae takes it: None is the full Wan VAE, "tiny" the test size random_models uses.
VAE_CANDIDATES: dict[str, Callable[[], nn.Module]] = {
    "wan": partial(build_model, "wan"),
    "tiny": partial(build_model, "wan", "tiny"),
}
LORA_SCALE = 1.0  # α/r for LongLive and MemFlow (rank 256, α 256, models.md §3.2); PEFT files do not carry α
# A staged load's split of the DiT's blocks over the pipeline stages, from the model's block count.
StageSplit = Callable[[int], tuple[tuple[int, int], ...]]


def load_weights(spec: PipelineSpec, load_params: dict[str, Any], models_dir: Path, *, prefer: str | None,
                 device: torch.device, dtype: torch.dtype, report: ProgressFn,
                 dit_config: str | None = None, text_device: torch.device | None = None,
                 split: StageSplit | None = None) -> Models:  # fmt: skip
    """The pipeline's published files from `models_dir`; errors name the file and what to do.

    Each model's config comes from its file's shapes, not from the pipeline: `dit_config` is only the size the
    pipeline is published at, logged when a file holds another (StreamDiffusionV2's 14B checkpoint, tiny test files).
    All files are identified (headers only) before any is loaded, so a wrong file fails in seconds, not after
    minutes of reading the others. `text_device` is where the umT5 encoder runs (default `device`; the VRAM plan
    puts it on the CPU when the GPU cannot hold it: serve/pipelines/vram.py); its embeddings land on `device`.
    `split` (a staged load): only the first stage's part of the DiT is read (`Models.stage_layers`).
    """
    missing = spec.missing_files(models_dir)
    if missing:
        listed = ", ".join(str(f.local_path(models_dir)) for f in missing)
        raise PipelineLoadError(
            f"{spec.id}: weights missing: {listed}. Fetch them with `wanrt models download {spec.id}` (or POST "
            f"/api/v1/models/download), or load with random_weights (server flag --allow-random-weights)"
        )
    vace_path = None
    if load_params.get("vace_enabled"):
        vace_path = spec.vace_files[0].local_path(models_dir)
        if not vace_path.is_file():
            raise PipelineLoadError(
                f"{spec.id}: vace_enabled needs the VACE module {vace_path}. Fetch it with `wanrt models download "
                f'{spec.id} --vace` (or POST /api/v1/models/download with "vace": true), or load without VACE'
            )
    vae_type = load_params.get("vae_type", "wan")
    if vae_type != "wan":
        raise PipelineLoadError(f"{spec.id}: vae_type {vae_type!r} needs its weight file; only 'wan' is wired yet")
    dit_file, lora_file = dit_files(spec)
    vae_file, text_file, tokenizer_file = spec.files[-3:]
    dit_path, vae_path = dit_file.local_path(models_dir), vae_file.local_path(models_dir)
    text_path, tokenizer_path = text_file.local_path(models_dir), tokenizer_file.local_path(models_dir)
    try:
        report("checking files", 0.05)
        dit_name = detect_preset(dit_path, DIT_CANDIDATES, what="diffusion model", prefer=prefer)
        text_name = detect_preset(text_path, TEXT_ENCODER_CANDIDATES, what="text encoder")
        vae_name = detect_preset(vae_path, VAE_CANDIDATES, what="VAE")
        if vace_path is not None:
            check_vace_file(vace_path, DIT_CONFIGS[dit_name])
    except CheckpointError as exc:
        raise PipelineLoadError(f"{spec.id}: {exc}") from None
    dit_cfg, text_cfg = DIT_CONFIGS[dit_name], UMT5_PRESETS[text_name]
    if dit_cfg.text_dim != text_cfg.dim:
        raise PipelineLoadError(
            f"{spec.id}: {dit_path} ({dit_name}) takes {dit_cfg.text_dim}-wide text embeddings but {text_path} "
            f"({text_name}) makes {text_cfg.dim}-wide ones: the files are of different model sizes"
        )
    if dit_config is not None and dit_name != dit_config:
        log.info("pipeline=%s dit=%s file=%s (published size %s)", spec.id, dit_name, dit_path, dit_config)
    tokenizer = _load_tokenizer(spec, tokenizer_path, text_path, dit_cfg.text_len, text_cfg.vocab_size)
    stage_layers = split(dit_cfg.num_layers) if split is not None else None  # before any weight is read
    try:
        report("text encoder", 0.1)
        encoder = load_text_encoder(text_path, dtype=dtype, device=text_device or device, config=text_cfg)
        report("diffusion model", 0.4)
        dit = load_dit(
            dit_cfg, dit_path, dtype=dtype, device=device, prefer=prefer,
            lora=lora_file.local_path(models_dir) if lora_file else None, lora_scale=LORA_SCALE,
            first_stage=stage_layers[0] if stage_layers else None,
        )  # fmt: skip
        if vace_path is not None:
            report("VACE module", 0.8)
            dit = attach_vace(dit, vace_path, dtype=dtype, device=device)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        raise PipelineLoadError(f"{spec.id}: {exc}") from None
    prompts = PromptEncoder(tokenizer, encoder, output_dtype=dtype, output_device=device)
    vae_size = None if vae_name == "wan" else vae_name
    log.info("pipeline=%s dit=%s text_encoder=%s vae=%s", spec.id, dit_name, text_name, vae_name)
    builtin_lora = f"{lora_file.repo}/{lora_file.path}" if lora_file else None
    return Models(dit, prompts, vae_type, vae_path, vae_size, builtin_lora, stage_layers)


def dit_files(spec: PipelineSpec) -> tuple[ModelFile, ModelFile | None]:
    """The pipeline's DiT checkpoint and its built-in LoRA (LongLive, MemFlow), if it has one."""
    dit_file, *rest = spec.files
    return dit_file, next((f for f in rest if f.path.endswith("lora.pt")), None)


def _load_tokenizer(spec: PipelineSpec, path: Path, text_path: Path, text_len: int, vocab_size: int) -> UMT5Tokenizer:
    try:
        tokenizer = UMT5Tokenizer(path, max_length=text_len)
    except (RuntimeError, OSError, ValueError) as exc:  # sentencepiece raises RuntimeError/OSError on a bad file
        raise PipelineLoadError(f"{spec.id}: {path}: not a usable SentencePiece model ({exc})") from None
    if tokenizer.vocab_size > vocab_size:  # ids past the embedding table would fail at the first prompt
        raise PipelineLoadError(
            f"{spec.id}: {path} has {tokenizer.vocab_size} pieces but {text_path} embeds only {vocab_size} ids"
        )
    return tokenizer


def random_dit(seed: int, config: DiTConfig = DIT_CONFIGS["tiny"]) -> WanDiT:
    """The DiT `random_models` builds for `seed`, alone (on the CPU): what a pipeline stage takes its blocks from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanDiT(config).eval()


def random_models(load_params: dict[str, Any], device: torch.device, seed: int,
                  dit_config: DiTConfig = DIT_CONFIGS["tiny"], split: StageSplit | None = None) -> Models:  # fmt: skip
    """The `tiny` configs with seeded random weights (the `random_weights` load parameter): demos and tests.

    The tokenizer is a small SentencePiece model trained here on a fixed corpus, since no tokenizer file ships with
    random weights; it is deterministic, so the same prompt always gives the same ids. `dit_config` other than
    `tiny` is for tests that need more blocks (pipeline stages). `split` (a staged load): the DiT is built whole on
    the CPU (every block draws from the seed, as the stages' `random_dit` does), then cut to the first stage's part
    before it goes to `device`.
    """
    stage_layers = split(dit_config.num_layers) if split is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = WanDiT(dit_config)  # first from the seed: `random_dit` makes the same weights
        if stage_layers is not None:
            first_stage_part(dit, stage_layers[0])
        dit = dit.to(device).eval()
        encoder = UMT5Encoder(UMT5_PRESETS["tiny"]).to(device).eval()
    if load_params.get("vace_enabled"):  # after the others: their weights stay those of a load without VACE
        dit = attach_vace(dit, None, dtype=torch.float32, device=device, seed=seed + 1)
    tokenizer = UMT5Tokenizer(tiny_tokenizer_model(), max_length=dit.config.text_len)
    prompts = PromptEncoder(tokenizer, encoder, output_dtype=torch.float32, output_device=device)
    return Models(dit, prompts, load_params.get("vae_type", "wan"), None, "tiny", stage_layers=stage_layers)


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
