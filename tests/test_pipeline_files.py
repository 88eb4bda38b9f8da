"""Every available model pipeline loaded from weight files in its published layout (tests/support/checkpoints.py:
real file names, wrappers, key names and dtypes at tiny size), through a running server and directly.

Through the server the inputs are still images: a still is the same input whatever frames the server happens to
take. The client sends it as one VP8 keyframe repeated (tests/support/rtc_client.py `StillTrack`) and estimates no
bandwidth, so both directions are coded the same way in every session however loaded the machine is, and two
sessions can be compared bit for bit. (Encoded live and steered by REMB, they differed under load: the encoders
restarted at different frames.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.errors import PipelineLoadError
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.pipelines.registry import PIPELINES, get_spec
from serve.schemas import LoadParams
from tests.support.checkpoints import PipelineFiles, write_pipeline_files
from tests.support.rtc_client import ScopeClient, StillTrack
from tests.support.server import RunningServer, load_pipeline, run_server

SIZE = 64
DIRECT_SIZE = 32
# Model pipelines that are built (`factory` set) and declare files; new ones are picked up when registered.
FILE_PIPELINES = [pid for pid, spec in PIPELINES.items() if spec.available and spec.files]
# Through the server each pipeline loads with its defaults (Krea's include fp8 weight storage).
LOAD_PARAMS: dict[str, Any] = {"height": SIZE, "width": SIZE}
# The direct weight check compares exact values: the weights' own precision, and a smaller size (the VAE on the CPU).
DIRECT_LOAD_PARAMS: dict[str, Any] = {"height": DIRECT_SIZE, "width": DIRECT_SIZE, "quantization": None}
PROMPT = [{"text": "a cat", "weight": 1.0}]
NEW_PROMPT = [{"text": "a dog in the snow", "weight": 1.0}]


def still(height: int = SIZE, width: int = SIZE, transposed: bool = False) -> np.ndarray:
    """A smooth colour gradient [H, W, 3] uint8.

    At the loaded size, so the server does not resample it. Measured: from a 64×64 gradient two sessions' outputs are
    bit-identical; from a 96×80 one (VP8-coded, then resized) they differed by about 2 levels from the first frame.
    """
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    if transposed:
        x, y = y, x
    return (np.stack([x, y, 1 - (x + y) / 2], axis=-1) * 255).round().astype(np.uint8)


def chunk_starts(pipeline_id: str, count: int) -> list[int]:
    """Indices of the output frames that begin a chunk: the first chunk decodes 1 + 4(c − 1) frames, later ones 4c."""
    latents = get_spec(pipeline_id).chunk_frames // 4
    first, later = 1 + 4 * (latents - 1), 4 * latents
    return [0, *range(first, count, later)]


@dataclass
class FileServer:
    server: RunningServer
    models_dir: Path
    written: dict[str, PipelineFiles]


@pytest.fixture(scope="module")
def file_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """A server without --allow-random-weights over a models folder holding every pipeline's synthetic files."""
    root = tmp_path_factory.mktemp("files")
    models_dir = root / "models"  # where run_server points --models-dir
    written = {pid: write_pipeline_files(pid, models_dir) for pid in FILE_PIPELINES}
    with run_server(root) as server:
        yield FileServer(server, models_dir, written)


async def stream(
    url: str, frames: int, *, image: np.ndarray | None, update_after: int | None = None
) -> tuple[np.ndarray, int]:
    """`frames` output frames [N, H, W, 3] of one session (video from `image`, or text mode when None), and how many
    had arrived when the prompt update was sent (`update_after` frames in; N when there was none)."""
    mode = "text" if image is None else "video"
    client = ScopeClient(
        url,
        send_video=image is not None,
        input_track=None if image is None else StillTrack(image),
        initial_parameters={"input_mode": mode, "prompts": PROMPT},
        keep_pixels=True,
        estimate_bandwidth=False,  # the same lossy coding in both sessions
    )
    await client.connect()
    sent_at = frames
    try:
        if update_after is not None:
            await client.wait_frames(update_after, timeout_s=120)
            sent_at = len(client.frames)
            await client.send({"prompts": NEW_PROMPT})
        await client.wait_frames(frames, timeout_s=120)
    finally:
        await client.close()
    assert {(f.width, f.height) for f in client.frames} == {(SIZE, SIZE)}  # the loaded resolution
    return np.stack([f.pixels for f in client.frames[:frames]]), sent_at


@pytest.mark.parametrize("pipeline_id", FILE_PIPELINES)
async def test_pipeline_loads_from_its_files_and_streams(file_server: FileServer, pipeline_id: str) -> None:
    server = file_server.server
    status = load_pipeline(server.url, pipeline_id, timeout_s=120, **LOAD_PARAMS)
    assert status["status"] == "loaded" and status["random_weights"] is False, status

    starts = chunk_starts(pipeline_id, 1000)
    update_after = starts[2]  # two chunks in: at least two chunks must come out bit-identical before it
    # Room for the chunks already computed or in flight when the update lands (the worker runs up to two ahead).
    count = next(start for start in starts if start >= max(starts[4], update_after + 30))
    reference, _ = await stream(server.url, count, image=still())
    updated, sent_at = await stream(server.url, count, image=still(), update_after=update_after)

    # Same seed, same input: every frame made before the update arrived is bit-identical. The update then changes
    # the output from a chunk that started after it was sent; that chunk's first frames may still match at uint8
    # precision (the VAE's causal cache carries the previous chunk into them), every chunk after it differs.
    differs = [not np.array_equal(a, b) for a, b in zip(reference, updated, strict=True)]
    assert any(differs), "the prompt update never reached the output"
    first = differs.index(True)
    chunk = max(start for start in starts if start <= first)
    assert chunk >= sent_at, f"frame {first} (chunk from {chunk}) changed before the update was sent ({sent_at} in)"
    following = next(start for start in starts if start > first)
    assert all(differs[following:]), f"the output went back to the old prompt: {differs}"

    text, _ = await stream(server.url, starts[2], image=None)  # T2V: no input track at all
    assert text.std() > 1, "text mode produced blank frames"


@pytest.mark.parametrize("pipeline_id", FILE_PIPELINES)
def test_file_loaded_pipeline_runs_the_written_weights_with_the_lora_merged(tmp_path: Path, pipeline_id: str) -> None:
    spec = get_spec(pipeline_id)
    written = write_pipeline_files(pipeline_id, tmp_path)
    params = spec.effective_load_params(LoadParams(**DIRECT_LOAD_PARAMS), allow_random_weights=False)
    pipeline = spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=tmp_path)
    loaded = pipeline.models.dit.state_dict()

    # A LoRA'd Linear: W' = W + (α/r)·B·A with α/r = 1 (models.md §3.2). Without a LoRA file, the weights as written
    # (for Reward Forcing the `generator_ema` entry, which the writer made different from `generator`).
    # The merge is done in fp32 and rounded once to the load dtype (fp32 on a CPU, bf16 on a GPU), as here.
    name = "blocks.0.ffn.0.weight"
    expected = written.dit[name].float()
    if written.lora:
        lora_a, lora_b = written.lora[name]
        expected = expected + lora_b.float() @ lora_a.float()
    torch.testing.assert_close(loaded[name].cpu(), expected.to(loaded[name].dtype), rtol=0, atol=0)
    head = loaded["head.head.weight"]
    torch.testing.assert_close(head.cpu(), written.dit["head.head.weight"].to(head.dtype), rtol=0, atol=0)

    # The input video reaches the output (through the server a still input is used, so it is checked here).
    runtime = {**spec.runtime_defaults, "prompts": PROMPT}
    one, other = (
        pipeline.open_stream(7).process(np.stack([image] * spec.chunk_frames), runtime)
        for image in (still(DIRECT_SIZE, DIRECT_SIZE), still(DIRECT_SIZE, DIRECT_SIZE, transposed=True))
    )
    assert not np.array_equal(one, other), "the input video does not reach the output"


# -- failures -----------------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def resave(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite a checkpoint with `edit` applied to each tensor dict in it (every wrapper entry, or the flat dict),
    so the spoiled weights are the ones loaded whichever entry a pipeline prefers."""
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        edit(tensors)
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
        return
    state = torch.load(path, weights_only=True)
    wrapped = [value for value in state.values() if isinstance(value, dict)]
    for tensors in wrapped or [state]:
        edit(tensors)
    torch.save(state, path)


def drop_first_norm3(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[next(k for k in tensors if k.endswith("blocks.0.norm3.weight"))]


def widen_text_embedding(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if k.endswith("text_embedding.0.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8, dtype=tensors[key].dtype)


def rank_mismatch(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:-1]


def shrink_first_tensor(tensors: dict[str, torch.Tensor]) -> None:
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][..., :1].clone()


def spoil_cases(pipeline_id: str) -> list[tuple[str, str, Callable[[Path], None]]]:
    """(what, file name, how to spoil it) for each of the pipeline's files."""
    names = [f.path.rsplit("/", 1)[-1] for f in get_spec(pipeline_id).files]
    dit_name = names[0]
    cases: list[tuple[str, str, Callable[[Path], None]]] = [
        ("truncated diffusion model", dit_name, truncate),
        ("truncated VAE", "Wan2.1_VAE.pth", truncate),
        ("truncated text encoder", "models_t5_umt5-xxl-enc-bf16.pth", truncate),
        ("truncated tokenizer", "spiece.model", truncate),
        ("VAE of no known size", "Wan2.1_VAE.pth", lambda p: resave(p, shrink_first_tensor)),
        ("text encoder of no known size", "models_t5_umt5-xxl-enc-bf16.pth", lambda p: resave(p, shrink_first_tensor)),
        ("diffusion model with a key missing", dit_name, lambda p: resave(p, drop_first_norm3)),
        ("diffusion model of no known size", dit_name, lambda p: resave(p, widen_text_embedding)),
    ]
    if "lora.pt" in names:
        cases += [
            ("truncated LoRA", "lora.pt", truncate),
            ("LoRA of another rank", "lora.pt", lambda p: resave(p, rank_mismatch)),
        ]
    return cases


@pytest.mark.parametrize("pipeline_id", FILE_PIPELINES)
def test_bad_files_end_in_an_error_naming_the_file_and_the_server_keeps_serving(
    file_server: FileServer, pipeline_id: str
) -> None:
    server, models_dir = file_server.server, file_server.models_dir
    spec, paths = get_spec(pipeline_id), file_server.written[pipeline_id].paths
    try:
        missing = [paths[spec.files[0].path], paths[spec.files[-3].path]]  # the diffusion model and the VAE
        for path in missing:
            path.unlink()
        status = load_pipeline(server.url, pipeline_id, **LOAD_PARAMS)
        assert status["status"] == "error" and "weights missing" in status["error"], status
        assert all(str(path) in status["error"] for path in missing), status["error"]

        for what, file_name, spoil in spoil_cases(pipeline_id):
            write_pipeline_files(pipeline_id, models_dir)
            path = next(p for p in paths.values() if p.name == file_name)
            spoil(path)
            status = load_pipeline(server.url, pipeline_id, **LOAD_PARAMS)
            assert status["status"] == "error", (what, status)
            assert str(path) in status["error"], (what, status["error"])
    finally:
        write_pipeline_files(pipeline_id, models_dir)  # the module's other tests share this folder
    status = load_pipeline(server.url, pipeline_id, timeout_s=120, **LOAD_PARAMS)
    assert status["status"] == "loaded", status


def test_files_of_different_model_sizes_are_refused_before_any_is_read(tmp_path: Path) -> None:
    # A full-size 1.3B base next to the tiny text encoder. Its tensors are meta (shapes, no data): reading it would
    # fail, so the error below shows the sizes were compared from the headers before anything was loaded.
    spec = get_spec("longlive")
    written = write_pipeline_files("longlive", tmp_path)
    with torch.device("meta"):
        base = WanDiT(DIT_CONFIGS["wan2.1-1.3b"]).state_dict()
    dit_path = written.paths["models/longlive_base.pt"]
    torch.save({"generator": {f"model.{key}": tensor for key, tensor in base.items()}}, dit_path)
    params = spec.effective_load_params(LoadParams(**LOAD_PARAMS), allow_random_weights=False)
    with pytest.raises(PipelineLoadError, match="different model sizes") as error:
        spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=tmp_path)
    assert str(dit_path) in str(error.value) and "models_t5_umt5-xxl-enc-bf16.pth" in str(error.value)
