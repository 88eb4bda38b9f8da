"""Pipeline parallelism on CPU ranks (gloo: the code path NCCL runs, but the backend name): the pipelined stream's
frames, clean latents and KV caches equal the one-process stream's, chunk by chunk, through a prompt switch (LongLive
re-caches) and `reset_cache`, in text and video mode (rank 0 encodes, the last stage decodes); blocks moved between
stages (directly, and by the load's rebalance from a skewed `blocks_per_stage`) keep that equality; placement and
refusals. The dead-stage path through a real server is in
tests/test_pipeline_parallel_server.py.

Only one torch.distributed group can live in a process, so each test loads, checks and closes its own stages.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import multiprocessing
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.errors import InvalidParameters, PipelineLoadError, StageFailed
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.pipelines import weights
from serve.pipelines.autoregressive import LongLivePipeline, RewardForcingPipeline, StreamDiffusionV2Pipeline
from serve.pipelines.chunk_loop import AutoregressiveStream, StagedStream
from serve.pipelines.placement import balanced_split, check_blocks_per_stage, contiguous, parse_gpus, split_blocks
from serve.pipelines.registry import get_spec
from serve.pipelines.vram import module_bytes
from serve.schemas import LoadParams
from tests.support.checkpoints import (
    record_tensor_reads,
    tiny_dit_state,
    write_generator_checkpoint,
    write_lora,
    write_pipeline_files,
)
from tests.support.streams import PROMPT_A, PROMPT_B, SIZE

pytestmark = pytest.mark.slow
DEEP_TINY = dataclasses.replace(DIT_CONFIGS["tiny"], num_layers=4)  # 3 stages of [1, 2, 1] blocks
DEEPER_TINY = dataclasses.replace(DIT_CONFIGS["tiny"], num_layers=8)  # room for skewed splits and moves


class DeepStreamDiffusionV2(StreamDiffusionV2Pipeline):
    random_dit_config = DEEP_TINY


class DeepLongLive(LongLivePipeline):
    random_dit_config = DEEP_TINY


class DeeperStreamDiffusionV2(StreamDiffusionV2Pipeline):
    random_dit_config = DEEPER_TINY


class DeeperLongLive(LongLivePipeline):
    random_dit_config = DEEPER_TINY


def load(cls, pipeline_id: str, **load: object):
    spec = get_spec(pipeline_id)
    params = spec.effective_load_params(
        LoadParams(height=SIZE, width=SIZE, random_weights=True, quantization=None, **load),  # type: ignore[arg-type]
        allow_random_weights=True,
    )
    return cls.load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent")), spec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread here and so in every stage (they take rank 0's count): on this 2-core machine three
    processes of two spinning OpenMP threads each would mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_scenario(stream: AutoregressiveStream, spec, fetch,
                 video: bool = False) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Four chunks: two on prompt A, a switch to B (LongLive re-caches its window), then reset_cache and one more.
    After each: the frames and every layer's K and V. `video`: each chunk's input is seeded random frames, encoded
    (the first chunk's 1 + 4(F−1) of them) and mixed with noise, with the pipeline's noise defaults."""
    params = {**spec.runtime_defaults, "input_mode": "video" if video else "text", "prompts": PROMPT_A}
    rng = np.random.default_rng(11)
    out = []
    for chunk in range(4):
        if chunk == 2:
            params = {**params, "prompts": PROMPT_B}
        if chunk == 3:
            stream.reset()
        pixels = rng.integers(0, 256, (stream.p.chunk_frames, SIZE, SIZE, 3), dtype=np.uint8) if video else None
        frames = stream.process(pixels, params)
        assert len(frames), f"chunk {chunk}: no frames"
        out.append((frames, *fetch(stream)))
    return out


def fetched(staged):
    """A staged stream's K and V, every layer's, gathered from the stages."""
    return lambda stream: staged.stages.fetch_cache(stream.stream_id)


def assert_same_runs(got: list, expected: list, unit: str = "chunk") -> None:
    """Every call's frames and every layer's K and V equal, bit for bit (on the host: NCCL stages send CUDA tensors)."""
    for index, ((frames, k, v), (want_frames, want_k, want_v)) in enumerate(zip(got, expected, strict=True)):
        assert np.array_equal(frames, want_frames), f"{unit} {index}: frames differ"
        same_cache = torch.equal(k.cpu(), want_k.cpu()) and torch.equal(v.cpu(), want_v.cpu())
        assert same_cache, f"{unit} {index}: KV caches differ"


def whole_cache(stream: AutoregressiveStream) -> tuple[torch.Tensor, torch.Tensor]:
    return stream.cache.k.clone(), stream.cache.v.clone()


@pytest.mark.parametrize(
    ("cls", "pipeline_id", "ranks"),
    [
        (StreamDiffusionV2Pipeline, "streamdiffusionv2", 2),
        (DeepStreamDiffusionV2, "streamdiffusionv2", 3),
        (DeepLongLive, "longlive", 3),  # LongLive on 2 ranks: the checkpoint-file test below
    ],
)
def test_pipelined_stream_equals_the_one_process_stream(cls, pipeline_id: str, ranks: int) -> None:
    single, spec = load(cls, pipeline_id)
    expected = run_scenario(single.open_stream(seed=7), spec, whole_cache)
    staged, _ = load(cls, pipeline_id, gpus=f"cpu:{ranks}")
    try:
        assert staged.stages is not None
        stream = staged.open_stream(seed=7)
        assert isinstance(stream, StagedStream)
        # Rank 0 holds only its blocks' weights and its layers' caches.
        owned = staged.stages.layers[0][1] - staged.stages.layers[0][0]
        assert stream.cache.k.shape[0] == owned
        assert sum(1 for block in staged.models.dit.blocks if list(block.parameters())) == owned
        assert not list(staged.models.dit.head.parameters())  # the last stage runs it
        got = run_scenario(stream, spec, fetched(staged))
        if pipeline_id == "longlive":
            assert stream.recaches == 1
        assert_same_runs(got, expected)
        placed = staged.placement()
        assert placed is not None
        assert placed["stages"] == ranks and placed["backend"] == "gloo"
        assert sum(placed["blocks_per_stage"]) == staged.models.dit.config.num_layers
        assert len(placed["stage_ms"]) == ranks and all(ms > 0 for ms in placed["stage_ms"])
    finally:
        staged.close()


def test_a_policy_that_cannot_be_pipelined_runs_on_one_device_and_says_why() -> None:
    pipeline, _ = load(RewardForcingPipeline, "reward-forcing", gpus="cpu:2")
    assert pipeline.stages is None
    placed = pipeline.placement()
    assert placed is not None and placed["stages"] == 1 and "EMA sink" in placed["reason"]


def test_gpus_are_parsed_and_bad_lists_refused() -> None:
    assert parse_gpus("0,1,2,3").devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    assert parse_gpus("cpu:3").devices == ("cpu",) * 3 and parse_gpus("cpu:3").backend == "gloo"
    for bad in ("0,0", "a,b", "cpu:0", "cpu:9", "", "0,,1"):
        with pytest.raises(InvalidParameters):
            parse_gpus(bad)


def test_blocks_split_contiguously_and_rebalance_toward_the_slow_stage() -> None:
    assert split_blocks(30, 4) == ((0, 7), (7, 15), (15, 23), (23, 30))
    assert split_blocks(4, 3) == ((0, 1), (1, 3), (3, 4))
    with pytest.raises(InvalidParameters):
        split_blocks(2, 3)
    # Two stages of 2 blocks at 2 ms each; the last also decodes for 6 ms: a block moves to the first (6 vs 8 ms,
    # not 4 vs 10), the decode counted as work that stays where it is.
    assert balanced_split([4.0, 4.0], [0.0, 6.0], ((0, 2), (2, 4))) == ((0, 3), (3, 4))
    assert balanced_split([4.0, 4.0], [0.0, 0.0], ((0, 3), (3, 4))) == ((0, 2), (2, 4))  # no fixed work: even
    # [2, 1, 1] at 1 ms a block is as balanced as the [1, 2, 1] the greedy split finds: kept, nothing moves.
    assert balanced_split([2.0, 1.0, 1.0], [0.0] * 3, ((0, 2), (2, 3), (3, 4))) == ((0, 2), (2, 3), (3, 4))


def test_the_balanced_split_minimises_the_slowest_stage() -> None:
    """SDv2-like stage times (30 blocks of 2 ms on 4 stages, a 12 ms encode on the first, a 20 ms decode on the
    last): the split's slowest stage is the least any contiguous split of at least one block per stage can give."""
    start = split_blocks(30, 4)
    step_ms = [2.0 * (end - begin) for begin, end in start]
    fixed = [12.0, 0.0, 0.0, 20.0]
    split = balanced_split(step_ms, fixed, start)
    counts = [end - begin for begin, end in split]
    assert split[0][0] == 0 and split[-1][1] == 30 and all(a[1] == b[0] for a, b in itertools.pairwise(split))

    def slowest(counts: list[int] | tuple[int, ...]) -> float:
        return max(extra + 2.0 * n for extra, n in zip(fixed, counts, strict=True))

    best = min(slowest(c) for c in itertools.product(range(1, 28), repeat=4) if sum(c) == 30)
    assert slowest(counts) == best == 24.0
    assert counts[0] < 7 and counts[-1] < 7  # off the ends, which carry the VAE


def test_streams_share_the_stages_each_with_its_own_caches() -> None:
    """Two sessions of one pipeline take turns on the stages (as on the worker); each equals its one-process twin,
    and a stream that is gone frees its caches."""
    single, spec = load(StreamDiffusionV2Pipeline, "streamdiffusionv2")
    staged, _ = load(StreamDiffusionV2Pipeline, "streamdiffusionv2", gpus="cpu:2")
    params = {**spec.runtime_defaults, "input_mode": "text", "prompts": PROMPT_A}
    try:
        assert staged.stages is not None
        twins = [(single.open_stream(seed), staged.open_stream(seed)) for seed in (1, 2)]
        for _ in range(2):
            for want, got in twins:
                assert np.array_equal(got.process(None, params), want.process(None, params))
        assert len(staged.stages.local.streams) == 2
        del twins, want, got
        gc.collect()
        assert not staged.stages.local.streams
        stream = staged.open_stream(3)  # the stages take the CLOSEs, then the new stream
        stream.process(None, params)
    finally:
        staged.close()


def load_files(models_dir: Path, **extra: object) -> LongLivePipeline:
    """LongLive from the files under `models_dir`."""
    spec = get_spec("longlive")
    params = spec.effective_load_params(
        LoadParams(height=SIZE, width=SIZE, quantization=None, **extra),  # type: ignore[arg-type]
        allow_random_weights=False,
    )
    return LongLivePipeline.load(spec, params, report=lambda *_: None, models_dir=models_dir)  # type: ignore[return-value]


def first_stage_names(names: Iterable[str], end: int) -> set[str]:
    """Of a DiT's (Wan) names, those rank 0 holds with blocks [0, end): the embeddings and those blocks, no head."""
    return {
        name
        for name in names
        if not name.startswith("head.") and not (name.startswith("blocks.") and int(name.split(".")[1]) >= end)
    }


def assert_rank_0_read_and_holds_only_its_part(staged, single, files, reads: dict) -> None:
    """Right after a staged load: rank 0 read from the DiT file only the embeddings' and its blocks' tensors (the
    others' bytes never), holds only those blocks (no head), and its weights are what `weight_bytes_per_stage[0]`
    reports and what the one-process model's parts add up to."""
    counts = [end - start for start, end in staged.stages.layers]
    dit_path = files.paths["models/longlive_base.pt"]
    assert sorted(reads[dit_path]) == sorted(f"model.{name}" for name in first_stage_names(files.dit, counts[0]))
    assert owned_blocks(staged) == counts[0] and not list(staged.models.dit.head.parameters())
    assert set(staged.models.dit.state_dict()) == first_stage_names(files.dit, counts[0])
    placed = staged.placement()
    held = module_bytes(staged.models.dit) + module_bytes(staged.vae_model)
    assert placed["weight_bytes_per_stage"][0] == held == stage_module_bytes(single, counts)[0]


def test_stages_load_their_blocks_from_the_checkpoint_with_the_builtin_lora(tmp_path: Path, monkeypatch) -> None:
    """Real files (synthetic, Wan's names): each stage reads only its blocks' keys and merges LongLive's LoRA into
    them as it loads, rank 0 included (it reads no other block and no head); the stream equals the one-process load
    of the same files."""
    files = write_pipeline_files("longlive", tmp_path)
    spec = get_spec("longlive")
    single = load_files(tmp_path)
    expected = run_scenario(single.open_stream(seed=3), spec, whole_cache)
    reads = record_tensor_reads(monkeypatch)
    staged = load_files(tmp_path, gpus="cpu:2")
    try:
        assert staged.stages is not None and staged.lora_adapters[0]["builtin"]
        assert_rank_0_read_and_holds_only_its_part(staged, single, files, reads)
        stream = staged.open_stream(seed=3)
        got = run_scenario(stream, spec, fetched(staged))
        assert_same_runs(got, expected)
    finally:
        staged.close()


def test_rank_0_of_three_reads_only_its_block_and_takes_a_moved_one_it_never_read(tmp_path: Path,
                                                                                   monkeypatch) -> None:  # fmt: skip
    """A 4-block LongLive file over 3 stages ([1, 2, 1], rebalancing off): rank 0 reads the embeddings and block 0
    only. Block 1 then moves to it from stage 1 (MOVE: never read from the file here), and the stream still equals
    the one-process load of the same files, bit for bit."""
    files = write_pipeline_files("longlive", tmp_path)
    files.dit = tiny_dit_state(5, DEEP_TINY)
    write_generator_checkpoint(files.paths["models/longlive_base.pt"], files.dit)
    files.lora = write_lora(files.paths["models/lora.pt"], 5, DEEP_TINY)
    # A test-only preset, detected from the file's shapes as the published sizes are.
    monkeypatch.setitem(DIT_CONFIGS, "tiny-4-blocks", DEEP_TINY)
    monkeypatch.setitem(weights.DIT_CANDIDATES, "tiny-4-blocks", partial(WanDiT, DEEP_TINY))
    spec = get_spec("longlive")
    single = load_files(tmp_path)
    assert single.models.dit.config == DEEP_TINY
    expected = run_scenario(single.open_stream(seed=3), spec, whole_cache)
    reads = record_tensor_reads(monkeypatch)
    staged = load_files(tmp_path, gpus="cpu:3", rebalance_stages=False)
    try:
        assert staged.stages is not None and staged.stages.layers == ((0, 1), (1, 3), (3, 4))
        assert_rank_0_read_and_holds_only_its_part(staged, single, files, reads)
        read_at_load = {path: list(names) for path, names in reads.items()}
        staged.stages.move_blocks(contiguous([2, 1, 1]))
        assert reads == read_at_load  # the moved block came from stage 1, not from the file
        assert owned_blocks(staged) == 2
        assert staged.placement()["weight_bytes_per_stage"] == stage_module_bytes(single, [2, 1, 1])
        got = run_scenario(staged.open_stream(seed=3), spec, fetched(staged))
        assert_same_runs(got, expected)
    finally:
        staged.close()


def stream_batch_scenario(stream: AutoregressiveStream, spec, fetch) -> list[tuple[np.ndarray, torch.Tensor, ...]]:
    """Nine chunks through the stream batch: seven on prompt A (the pipe fills, then runs full), a switch to B (the
    pipe drains, LongLive re-caches), then reset_cache (drained again). After each: the frames out and the K/V."""
    params = {**spec.runtime_defaults, "input_mode": "text", "prompts": PROMPT_A}
    out = []
    for chunk in range(9):
        if chunk == 7:
            params = {**params, "prompts": PROMPT_B}
        if chunk == 8:
            stream.reset()
        out.append((stream.process(None, params), *fetch(stream)))
    return out


@pytest.mark.parametrize(
    ("cls", "pipeline_id", "ranks"),
    [
        (StreamDiffusionV2Pipeline, "streamdiffusionv2", 2),
        (DeepStreamDiffusionV2, "streamdiffusionv2", 3),
        (DeepLongLive, "longlive", 2),
    ],
)
def test_staged_stream_batch_equals_the_one_process_stream_batch(cls, pipeline_id: str, ranks: int) -> None:
    """The oracle runs the same schedule in one process with as many lanes as there are stages."""
    single, spec = load(cls, pipeline_id, stream_batch=True)
    single.stream_lanes = ranks
    oracle = single.open_stream(seed=7)
    expected = stream_batch_scenario(oracle, spec, whole_cache)
    staged, _ = load(cls, pipeline_id, gpus=f"cpu:{ranks}", stream_batch=True)
    try:
        assert staged.stages is not None and staged.stream_lanes == ranks
        stream = staged.open_stream(seed=7)
        assert isinstance(stream, StagedStream)
        got = stream_batch_scenario(stream, spec, fetched(staged))
        assert_same_runs(got, expected, "call")
        # The pipe filled for S·D calls (S = 2 steps) and the first decode, on the last stage, came back D − 1 calls
        # later (or the switch at call 7 drained it first); then one chunk per call.
        first_out = next(call for call, (frames, _, _) in enumerate(got) if len(frames))
        assert first_out == min(2 * ranks + ranks - 1, 7)
        assert [frame for frame, _ in stream.denoised] == [frame for frame, _ in oracle.denoised]
        if pipeline_id == "longlive":
            assert stream.recaches == oracle.recaches == 1
        placed = staged.placement()
        assert placed is not None and placed["stream_batch"] == {"rows": 3, "lanes": ranks}
        # The load's warm-up ran the stream batch too (its pipe filled, then 4 chunks decoded) before rebalancing.
        assert sum(placed["rebalance"]["blocks_after"]) == staged.models.dit.config.num_layers
        # A stream that goes away with micro-steps in flight: they complete before its caches are freed, and the
        # next stream starts clean, equal to a fresh oracle stream.
        assert staged.stages._outstanding
        del stream
        gc.collect()
        params = {**spec.runtime_defaults, "input_mode": "text", "prompts": PROMPT_A}
        again, fresh = staged.open_stream(seed=5), single.open_stream(seed=5)
        for _ in range(2 * ranks + 1):
            assert np.array_equal(again.process(None, params), fresh.process(None, params))
        assert list(staged.stages.local.streams) == [again.stream_id]
    finally:
        staged.close()


def stage_module_bytes(single, counts: list[int]) -> list[int]:
    """What each stage should hold, from the one-process pipeline's modules: its blocks; rank 0 also the embeddings
    and the VAE without its decoder, the last the head and the VAE without its encoder, each spawned stage the
    rotary tables."""
    dit, vae = single.models.dit, single.vae_model
    block = module_bytes(dit.blocks[0])
    expected = [n * block for n in counts]
    expected[0] += module_bytes(dit) - sum(counts) * block - module_bytes(dit.head) + module_bytes(vae)
    expected[0] -= module_bytes(vae.decoder)
    expected[-1] += module_bytes(dit.head) + module_bytes(vae) - module_bytes(vae.encoder)
    for rank in range(1, len(counts)):  # each spawned stage builds its own rotary tables
        expected[rank] += module_bytes(dit.rope)
    return expected


def test_a_video_stream_encodes_on_rank_0_decodes_on_the_last_stage_and_equals_the_one_process_stream() -> None:
    single, spec = load(StreamDiffusionV2Pipeline, "streamdiffusionv2")
    expected = run_scenario(single.open_stream(seed=7), spec, whole_cache, video=True)
    staged, _ = load(StreamDiffusionV2Pipeline, "streamdiffusionv2", gpus="cpu:2")
    try:
        assert staged.stages is not None
        # Each end holds only its VAE half: the last stage built no encoder (its own count), rank 0 freed its decoder.
        placed = staged.placement()
        assert placed is not None
        assert placed["weight_bytes_per_stage"] == stage_module_bytes(single, placed["blocks_per_stage"])
        with pytest.raises(RuntimeError, match="decoder runs on the last pipeline stage"):
            staged.vae_model.decode_video(torch.zeros(1, 16, 1, SIZE // 8, SIZE // 8))
        decodes = staged.stages.decodes
        got = run_scenario(staged.open_stream(seed=7), spec, fetched(staged), video=True)
        assert_same_runs(got, expected)
        assert staged.stages.decodes == decodes + 4  # every chunk decoded on the last stage
        placed = staged.placement()
        assert placed is not None and placed["encode_ms"] > 0 and placed["decode_ms"] > 0
    finally:
        staged.close()


@pytest.fixture(scope="module")
def deeper_oracle() -> tuple:
    """The one-process 8-block StreamDiffusionV2 and its runs, text mode (no stages: no group is held)."""
    single, spec = load(DeeperStreamDiffusionV2, "streamdiffusionv2")
    return single, run_scenario(single.open_stream(seed=7), spec, whole_cache)


def owned_blocks(staged) -> int:
    """The blocks rank 0 holds weights of (the others are empty placeholders)."""
    return sum(1 for block in staged.models.dit.blocks if list(block.parameters()))


def test_blocks_move_between_three_stages_every_way_and_the_stream_still_equals_one_process(
    deeper_oracle: tuple,
) -> None:
    """`move_blocks` through splits that send blocks from every rank to every other (rank 0 included); the start
    split, given with rebalancing off, is kept exactly until then. Then a stream equals the one-process one."""
    staged, spec = load(DeeperStreamDiffusionV2, "streamdiffusionv2", gpus="cpu:3", blocks_per_stage=[2, 4, 2],
                        rebalance_stages=False)  # fmt: skip
    try:
        assert staged.stages is not None and staged.stages.layers == ((0, 2), (2, 6), (6, 8))
        placed = staged.placement()
        assert placed is not None and placed["blocks_per_stage"] == [2, 4, 2] and "rebalance" not in placed
        staged.open_stream(seed=1).process(None, {**spec.runtime_defaults, "input_mode": "text"})
        gc.collect()  # that stream is gone: its CLOSE goes out before the first move
        # 1→0 and 1→2; then 0→1, 0→2 and 1→2; 1→2; then 1→0, 2→0 and 2→1.
        for counts in ([4, 1, 3], [1, 2, 5], [1, 1, 6], [3, 1, 4]):
            staged.stages.move_blocks(contiguous(counts))
            placed = staged.placement()
            assert placed["blocks_per_stage"] == counts
            assert owned_blocks(staged) == counts[0]
            assert placed["weight_bytes_per_stage"] == stage_module_bytes(deeper_oracle[0], counts)
        stream = staged.open_stream(seed=7)
        assert stream.cache.k.shape[0] == 3  # rank 0's layers
        assert_same_runs(run_scenario(stream, spec, fetched(staged)), deeper_oracle[1])
    finally:
        staged.close()


def test_a_skewed_split_is_rebalanced_at_load_and_the_stream_still_equals_one_process() -> None:
    """[1, 7]: the last stage holds seven blocks and the decode. The load's warm-up times the stages and moves blocks
    off it (text mode, so the first stage has no encode: whatever the times, a balanced split then leaves the last
    stage at most half the blocks);
    the stream then equals the one-process stream, through LongLive's re-cache."""
    single, spec = load(DeeperLongLive, "longlive")
    expected = run_scenario(single.open_stream(seed=7), spec, whole_cache)
    staged, _ = load(DeeperLongLive, "longlive", gpus="cpu:2", blocks_per_stage=[1, 7])
    try:
        placed = staged.placement()
        assert placed is not None
        record = placed["rebalance"]
        assert record["blocks_before"] == [1, 7] and placed["blocks_per_stage"] == record["blocks_after"]
        after = record["blocks_after"]
        assert sum(after) == 8 and after[1] <= 4, record
        assert len(record["stage_ms_before"]) == len(record["stage_ms_after"]) == 2
        # No assertion on the times themselves: on a shared CPU the decode's noise exceeds a tiny block's cost.
        assert owned_blocks(staged) == after[0] and not staged.stages.local.streams  # the warm-up's stream closed
        stream = staged.open_stream(seed=7)
        assert_same_runs(run_scenario(stream, spec, fetched(staged)), expected)
        assert stream.recaches == 1
    finally:
        staged.close()


def test_a_bad_blocks_per_stage_is_refused_saying_why() -> None:
    for counts, ranks, why in (([1, 1, 1], 2, "3 entries; gpus names 2"), ([0, 2], 2, "at least one block"),
                               ([2, 2], 1, "give gpus with 2 entries"), ([3, 3], 2, "the model has 2")):  # fmt: skip
        with pytest.raises(InvalidParameters, match=why):
            check_blocks_per_stage(counts, ranks, 2)
    with pytest.raises(PipelineLoadError, match=r"blocks_per_stage \[3, 3\] adds up to 6 blocks; the model has 8"):
        load(DeeperStreamDiffusionV2, "streamdiffusionv2", gpus="cpu:2", blocks_per_stage=[3, 3])


def stage_processes() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("wanrt-stage")]


def test_a_stage_that_dies_during_the_warm_up_fails_the_load_naming_it_and_a_new_load_works() -> None:
    """The rebalance's warm-up is the first talk with the stages: a stage killed as it starts fails the load with
    StageFailed naming the stage, no stage process is left behind, and the next staged load works (the group was
    left)."""
    spec = get_spec("streamdiffusionv2")
    params = spec.effective_load_params(
        LoadParams(height=SIZE, width=SIZE, random_weights=True, quantization=None, gpus="cpu:2"),
        allow_random_weights=True,
    )

    def kill_stage_1(stage: str, progress: float) -> None:
        if stage == "rebalancing stages":
            (process,) = [p for p in stage_processes() if p.name == "wanrt-stage1"]
            process.kill()
            process.join(5)

    with pytest.raises(StageFailed, match=r"pipeline stage 1 on cpu \(pid \d+\) died"):
        StreamDiffusionV2Pipeline.load(spec, params, report=kill_stage_1, models_dir=Path("/nonexistent"))
    assert not stage_processes()
    staged, _ = load(StreamDiffusionV2Pipeline, "streamdiffusionv2", gpus="cpu:2")
    try:
        placed = staged.placement()
        assert placed is not None and placed["rebalance"]["blocks_after"] == placed["blocks_per_stage"]
    finally:
        staged.close()
