"""What rank 0 of a pipeline-parallel load reads from the DiT's file and holds, against a one-process load.

    python -m benchmarks.stage_load                      # 1.3B-wide blocks, 8 of them, rank 0 of 4 stages (CPU)
    python -m benchmarks.stage_load --layers 8 --ranks 4 --folder /var/tmp/wanrt-stage-load

A DiT at the 1.3B's width (`--layers` blocks, bf16, random values) is written once as safetensors; then, each in a
fresh process, `load_dit` loads it whole and as rank 0 of `--ranks` stages (`first_stage`: the embeddings and
rank 0's blocks of `split_blocks`). Before each load the file is dropped from the page cache (fsync, then
POSIX_FADV_DONTNEED), so `read MB` is what the kernel fetched from the disk during the load and one pass over
every held tensor (/proc/self/io read_bytes, readahead included; on the CPU a bf16 tensor from safetensors stays
backed by the file's mapping until it is touched, so without the pass the figures would show only what the
conversions touched); `RSS +MB` and `peak RSS +MB` the process's resident memory after the load and
its peak over the load, above those before it (VmRSS, VmHWM); `its tensors in the file MB` the header's size of the
tensors the module holds; `held MB` what the loaded module's weights take (its RoPE tables aside). CPU only: the bytes
read and held are the same on a GPU, where the held ones land in VRAM.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from serve.models.dit import DIT_CONFIGS, DiTConfig, WanDiT
from serve.pipelines.placement import split_blocks

MB = 1e6


def write_file(config: DiTConfig, path: Path) -> None:
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in WanDiT(config).state_dict().items()}
    state = {name: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02) for name, shape in shapes.items()}
    save_file(state, str(path))


def drop_from_page_cache(path: Path) -> None:
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_field(file: str, field: str) -> int:
    """A number from /proc/self/`file` (`read_bytes` of io; `VmHWM` of status, in kB)."""
    for line in Path("/proc/self", file).read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/{file} has no {field}")


def measure(config: DiTConfig, path: Path, first_stage: tuple[int, int] | None, out: dict) -> None:
    """In a fresh process: load, and report read bytes, peak RSS growth and held bytes. VmHWM, not ru_maxrss: a
    spawned process inherits its parent's ru_maxrss across exec, while VmHWM belongs to its own address space."""
    from serve.models.checkpoint import read_checkpoint
    from serve.models.dit import load_dit
    from serve.pipelines.vram import module_bytes

    read_before = proc_field("io", "read_bytes")
    rss_before, peak_before = proc_field("status", "VmRSS"), proc_field("status", "VmHWM")
    model = load_dit(config, path, dtype=torch.bfloat16, first_stage=first_stage)
    for tensor in model.state_dict().values():  # every held byte once, as the copy to a GPU would read it
        tensor.sum()
    out["read"] = proc_field("io", "read_bytes") - read_before
    out["rss"] = (proc_field("status", "VmRSS") - rss_before) * 1024
    out["peak"] = (proc_field("status", "VmHWM") - peak_before) * 1024
    names = set(model.state_dict())
    out["part"] = sum(lazy.nbytes for name, lazy in read_checkpoint(path).items() if name in names)
    out["held"] = module_bytes(model) - module_bytes(model.rope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--folder", type=Path, default=Path("/var/tmp/wanrt-stage-load"))
    args = parser.parse_args()
    config = dataclasses.replace(DIT_CONFIGS["wan2.1-1.3b"], num_layers=args.layers)
    args.folder.mkdir(parents=True, exist_ok=True)
    path = args.folder / f"dit-1.3b-width-{args.layers}-blocks.safetensors"
    if not path.exists():
        write_file(config, path)
    rank_0 = split_blocks(args.layers, args.ranks)[0]
    context = multiprocessing.get_context("spawn")
    table = Table(title=f"{path.name} ({path.stat().st_size / MB:.0f} MB), bf16, CPU")
    for column in ("load", "blocks", "its tensors in the file MB", "read MB", "RSS +MB", "peak RSS +MB", "held MB"):
        table.add_column(column, justify="right" if column != "load" else "left")
    for label, first_stage in (("one process (whole)", None), (f"rank 0 of {args.ranks}", rank_0)):
        drop_from_page_cache(path)
        with context.Manager() as manager:
            out = manager.dict()
            process = context.Process(target=measure, args=(config, path, first_stage, out))
            process.start()
            process.join()
            assert process.exitcode == 0, f"{label}: exit code {process.exitcode}"
            result = dict(out)
        blocks = args.layers if first_stage is None else first_stage[1] - first_stage[0]
        figures = (f"{result[key] / MB:.0f}" for key in ("part", "read", "rss", "peak", "held"))
        table.add_row(label, str(blocks), *figures)
    Console().print(table)


if __name__ == "__main__":
    main()
