"""Where a pipeline runs: the `gpus` setting parsed, and the DiT's blocks split over ranks in contiguous stages.

Torch-free, so the HTTP side checks the syntax of `gpus` at request time; whether the named GPUs exist is checked by
the load (serve/runtime/stage_driver.py), which reports a missing one in the pipeline status.

`gpus` is a comma-separated list of CUDA device ids (`0,1,2,3`: one rank per GPU, NCCL), or `cpu:N` (N ranks on the
CPU, gloo: the same code path, for tests and development). One entry (`0`, `cpu:1`) is an ordinary one-device load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from serve.errors import InvalidParameters, PipelineLoadError
from serve.schemas import GPUS_PATTERN

MAX_CPU_RANKS = 8


@dataclass(frozen=True)
class Gpus:
    """The ranks of a load: `devices[r]` is rank r's torch device (`cuda:3`, or `cpu` for every CPU rank)."""

    devices: tuple[str, ...]

    @property
    def ranks(self) -> int:
        return len(self.devices)

    @property
    def on_cpu(self) -> bool:
        return self.devices[0] == "cpu"

    @property
    def backend(self) -> str:
        """The torch.distributed backend: the only thing that differs between CPU and GPU ranks."""
        return "gloo" if self.on_cpu else "nccl"

    def spelled(self) -> str:
        return f"cpu:{self.ranks}" if self.on_cpu else ",".join(d.removeprefix("cuda:") for d in self.devices)


def parse_gpus(text: str) -> Gpus:
    """`0,1,2,3` or `cpu:2` → Gpus; raises InvalidParameters naming what is wrong (400 at the load request)."""
    if not re.fullmatch(GPUS_PATTERN, text):
        raise InvalidParameters(
            f"gpus {text!r}: give CUDA device ids separated by commas (e.g. '0,1,2,3') or 'cpu:N' for N CPU ranks "
            f"(1 ≤ N ≤ {MAX_CPU_RANKS}, gloo; for tests and development)"
        )
    if text.startswith("cpu:"):
        return Gpus(("cpu",) * int(text.removeprefix("cpu:")))
    ids = [int(part) for part in text.split(",")]
    if len(set(ids)) != len(ids):
        raise InvalidParameters(f"gpus {text!r}: each GPU may appear once (one rank per GPU)")
    return Gpus(tuple(f"cuda:{i}" for i in ids))


def split_blocks(num_layers: int, ranks: int) -> tuple[tuple[int, int], ...]:
    """Contiguous [start, end) block ranges, one per rank, as even as the count allows. The remainder goes to the
    middle ranks first: rank 0 also embeds and runs the VAE, the last rank the head (scale.md §1: SDv2's scheduler
    moves blocks off those two for the same reason)."""
    if ranks > num_layers:
        raise InvalidParameters(f"{ranks} pipeline stages need at least {ranks} DiT blocks; the model has {num_layers}")
    counts = [num_layers // ranks] * ranks
    order = sorted(range(ranks), key=lambda r: (r in (0, ranks - 1), r))  # middle ranks, then the ends
    for r in order[: num_layers % ranks]:
        counts[r] += 1
    return contiguous(counts)


def contiguous(counts: list[int]) -> tuple[tuple[int, int], ...]:
    """Blocks per stage → the stages' contiguous [start, end) ranges, in order from block 0."""
    starts = [sum(counts[:r]) for r in range(len(counts))]
    return tuple((start, start + count) for start, count in zip(starts, counts, strict=True))


def check_blocks_per_stage(counts: list[int], ranks: int, num_layers: int | None = None) -> None:
    """A `blocks_per_stage` load parameter against the load's stages (and, once the model is known, its blocks);
    raises InvalidParameters saying what is wrong."""
    if ranks < 2:
        raise InvalidParameters(
            f"blocks_per_stage {counts} splits the DiT over pipeline stages; give gpus with {len(counts)} entries"
        )
    if len(counts) != ranks:
        raise InvalidParameters(f"blocks_per_stage {counts} has {len(counts)} entries; gpus names {ranks} stages")
    if min(counts) < 1:
        raise InvalidParameters(f"blocks_per_stage {counts}: every stage needs at least one block")
    if num_layers is not None and sum(counts) != num_layers:
        raise InvalidParameters(
            f"blocks_per_stage {counts} adds up to {sum(counts)} blocks; the model has {num_layers}"
        )


def stage_split(num_layers: int, ranks: int, counts: list[int] | None) -> tuple[tuple[int, int], ...]:
    """The load's starting split of `num_layers` blocks over `ranks` stages: `blocks_per_stage` (`counts`, checked
    against the model's blocks) if given, else `split_blocks`; raises InvalidParameters."""
    if counts is None:
        return split_blocks(num_layers, ranks)
    check_blocks_per_stage(counts, ranks, num_layers)
    return contiguous(counts)


def starting_split(pipeline_id: str, ranks: int, counts: list[int] | None,
                   num_layers: int) -> tuple[tuple[int, int], ...]:  # fmt: skip
    """A staged load's starting split (`stage_split`), known once the DiT file says how many blocks it has; a
    `blocks_per_stage` that does not fit the model fails the load (its length was checked at the request)."""
    try:
        return stage_split(num_layers, ranks, counts)
    except InvalidParameters as exc:
        raise PipelineLoadError(f"{pipeline_id}: {exc}") from None


def balanced_split(step_ms: list[float], fixed_ms: list[float],
                   blocks: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:  # fmt: skip
    """The contiguous split that evens out the stages' time per micro-step, from measured times: `step_ms[r]` is
    stage r's DiT step (its blocks; the embedding and the head ride along), `fixed_ms[r]` its work that does not
    move with the blocks (the VAE encode on the first stage, the decode on the last). A block costs the same on
    every stage (sum of step ms / blocks); blocks go one at a time to the stage whose time would stay lowest, every
    stage keeping at least one (ties to the middle stages, as `split_blocks`), which minimises the slowest stage's
    fixed + blocks·per-block. `blocks` itself when it is as good by that measure: a split already balanced is kept,
    not swapped for an equal one (each move costs a block's weights over the link, and noise would pick among ties)."""
    counts = [end - start for start, end in blocks]
    per_block = sum(step_ms) / sum(counts)

    def slowest(split: list[int]) -> float:
        return max(fixed + n * per_block for fixed, n in zip(fixed_ms, split, strict=True))

    new = [1] * len(blocks)
    for _ in range(sum(counts) - len(blocks)):
        r = min(range(len(blocks)), key=lambda i: (fixed_ms[i] + (new[i] + 1) * per_block, i in (0, len(new) - 1), i))
        new[r] += 1
    return contiguous(new) if slowest(new) < slowest(counts) else blocks
