"""Time the streaming VAE chunk steps (encode / decode per chunk) at the seed resolutions.

    python -m benchmarks.vae_step                       # tiny configs on CPU (or the real ones on CUDA)
    python -m benchmarks.vae_step --size real --types wan tae --device cuda --dtype bf16

Each row is one call of the steady-state step (the one that runs every chunk and gets exported), measured after a
warm-up with the device synchronised, plus the first call of a stream. FLOPs are counted by torch's FlopCounterMode
on the same call (convs and matmuls only), so GFLOP/chunk is exact for the model and TFLOP/s is achieved throughput.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import time_ms
from serve.models.autoencoder import VAE_TYPES, build_model

SEED_RESOLUTIONS = ((320, 576), (512, 512), (256, 256))  # (height, width): streamdiffusionv2, longlive & co, krea


@dataclass(frozen=True)
class StepTiming:
    vae_type: str
    size: str
    height: int
    width: int
    step: str  # what one call does, e.g. "encode 4 px → 1 lat"
    ms: float  # median wall time per call
    gflop: float  # FLOPs of one call

    @property
    def tflops(self) -> float:
        return self.gflop / self.ms if self.ms > 0 else 0.0  # GFLOP/ms = TFLOP/s


def _gflop(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _step_calls(
    model: torch.nn.Module,
    height: int,
    width: int,
    dev: torch.device,
    dtype: torch.dtype,
    decode_latents: tuple[int, ...],
) -> list[tuple[str, Callable[[], object]]]:
    """The calls one stream makes, with inputs and steady-state caches prepared (works on the meta device too)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = (torch.rand(1, 3, 1, height, width, generator=gen) * 2 - 1).to(dev, dtype)
    x4 = (torch.rand(1, 3, 4, height, width, generator=gen) * 2 - 1).to(dev, dtype)
    z0, enc_caches = model.encode_first(x0)
    _, dec_caches = model.decode_first(z0)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("encode first 1 px → 1 lat", lambda: model.encode_first(x0)),
        ("encode 4 px → 1 lat", lambda: model.encode_step(x4, enc_caches)),
    ]
    for n in decode_latents:
        z = torch.randn(1, model.latent_channels, n, height // 8, width // 8, generator=gen).to(dev, dtype)
        calls.append((f"decode {n} lat → {4 * n} px", lambda z=z: model.decode_step(z, dec_caches)))
    return calls


@torch.no_grad()
def bench_vae_steps(
    vae_types: tuple[str, ...] = VAE_TYPES,
    size: str = "tiny",
    resolutions: tuple[tuple[int, int], ...] = SEED_RESOLUTIONS,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 1,
    iters: int = 3,
    decode_latents: tuple[int, ...] = (1, 3),
) -> list[StepTiming]:
    """Per-chunk times of encode (4 px frames → 1 latent) and decode (1 latent → 4 frames, 3 latents → 12).

    FLOPs are counted on a meta-device copy, so counting costs no compute.
    """
    dev, meta = torch.device(device), torch.device("meta")
    rows: list[StepTiming] = []
    for vae_type in vae_types:
        torch.manual_seed(0)
        model = build_model(vae_type, None if size == "real" else size).to(dev, dtype).eval()
        with meta:
            meta_model = build_model(vae_type, None if size == "real" else size).to(dtype).eval()
        for height, width in resolutions:
            timed = _step_calls(model, height, width, dev, dtype, decode_latents)
            with meta:
                counted = _step_calls(meta_model, height, width, meta, dtype, decode_latents)
            for (name, fn), (_, meta_fn) in zip(timed, counted, strict=True):
                ms = time_ms(fn, dev, warmup, iters)
                rows.append(StepTiming(vae_type, size, height, width, name, ms, _gflop(meta_fn)))
    return rows


def print_table(rows: list[StepTiming], title: str) -> None:
    table = Table(title=title)
    for col in ("vae", "size", "H×W", "step", "ms/chunk", "GFLOP/chunk", "TFLOP/s"):
        table.add_column(col, justify="right" if col in ("ms/chunk", "GFLOP/chunk", "TFLOP/s") else "left")
    for r in rows:
        table.add_row(
            r.vae_type, r.size, f"{r.height}×{r.width}", r.step, f"{r.ms:.1f}", f"{r.gflop:.2f}", f"{r.tflops:.3f}"
        )
    Console(width=max(140, Console().width)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Tiny lightvae/lighttae are the tiny wan/tae configs (same widths), so CPU runs default to the two distinct ones.
    parser.add_argument("--types", nargs="+", default=None, choices=VAE_TYPES, help="default: all on CUDA")
    parser.add_argument("--size", choices=("tiny", "real"), default=None, help="default: real on CUDA, tiny on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 CUDA, fp32 CPU")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    size = args.size or ("real" if on_cuda else "tiny")
    types = tuple(args.types or (VAE_TYPES if size == "real" else ("wan", "tae")))
    dtype_name = args.dtype or ("bf16" if on_cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    rows = bench_vae_steps(types, size, device=args.device, dtype=dtype, warmup=args.warmup, iters=args.iters)
    device_name = torch.cuda.get_device_name(args.device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    print_table(rows, f"VAE chunk steps: {size} configs, {dtype_name}, {device_name}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
