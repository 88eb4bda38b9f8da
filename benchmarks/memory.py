"""The VRAM plan of every pipeline (serve/pipelines/vram.py), measured on the meta device: no GPU needed.

    python -m benchmarks.memory                       # seed resolutions, and 480×832 for the 1.3B pipelines
    python -m benchmarks.memory --pipelines longlive --vae-types wan lighttae --json plan.json

Each row is one configuration's two-chunk dry run at real model size (bf16 DiT with its fp32 layers, fp32 VAE, bf16
umT5-XXL), one stream, in the pipeline's default mode; GB = 1e9 bytes. "total" is the peak of a steady chunk with
the text encoder on the GPU, "enc. on CPU" the same without its 11.4 GB. Scope's estimates (`estimated_vram_gb` of
its pipeline schemas) are for its own implementation, encoder on the GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from serve.pipelines.registry import PIPELINES
from serve.pipelines.vram import GB, VramPlan, measure_plan

MODEL_PIPELINES = ("streamdiffusionv2", "longlive", "reward-forcing", "memflow", "krea-realtime-video")
WIDE = (480, 832)  # the 1.3B pipelines' other resolution of interest
GOAL_GB = {"wan2.1-1.3b": 12.0, "wan2.1-14b": 24.0}  # issue 10: seed resolution, text encoder included


def configurations(pipelines: list[str], vae_types: list[str], wide: bool) -> list[dict]:
    rows = []
    for pipeline_id in pipelines:
        spec = PIPELINES[pipeline_id]
        sizes = [(spec.load_defaults["height"], spec.load_defaults["width"])]
        if wide and spec.base_model == "Wan2.1-T2V-1.3B":
            sizes.append(WIDE)
        for height, width in sizes:
            for vae_type in vae_types:
                rows.append({"pipeline_id": pipeline_id, "height": height, "width": width, "vae_type": vae_type})
    return rows


def table(plans: list[VramPlan]) -> Table:
    out = Table(title="VRAM plan (GB, one stream, peak of a steady chunk; meta-device dry run)")
    columns = ("pipeline", "H×W", "vae", "DiT weights", "VAE", "umT5", "KV", "text K/V", "stream state",
               "activations", "total", "enc. on CPU", "Scope est.")  # fmt: skip
    for column in columns:
        out.add_column(column, justify="left" if column in ("pipeline", "vae") else "right")
    for plan in plans:
        dit = {k.split()[1]: v for k, v in plan.weights.items() if k.startswith("dit ")}
        dit_text = " + ".join(f"{v / GB:.2f} {k.replace('float8_e4m3fn', 'fp8').replace('bfloat16', 'bf16')}"
                              for k, v in dit.items())  # fmt: skip
        vae = sum(v for k, v in plan.weights.items() if k.startswith("vae "))
        spec = PIPELINES[plan.pipeline]
        out.add_row(
            plan.pipeline + (" (fp8)" if plan.quantization else ""), f"{plan.height}×{plan.width}", plan.vae_type,
            dit_text, f"{vae / GB:.2f}", f"{plan.text_encoder / GB:.1f}", f"{plan.kv_cache / GB:.2f}",
            f"{plan.text_kv / GB:.2f}", f"{plan.stream_state / GB:.2f}", f"{plan.activations / GB:.2f}",
            f"{plan.with_text_encoder_on_gpu(True).total / GB:.1f}",
            f"{plan.with_text_encoder_on_gpu(False).total / GB:.1f}", f"{spec.estimated_vram_gb:.0f}",
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="*", default=list(MODEL_PIPELINES), choices=MODEL_PIPELINES)
    parser.add_argument("--vae-types", nargs="*", default=["wan"], choices=("wan", "lightvae", "tae", "lighttae"))
    parser.add_argument("--no-wide", action="store_true", help="only the seed resolutions")
    parser.add_argument("--json", help="also write the plans here")
    args = parser.parse_args()
    plans = []
    started = time.perf_counter()
    for config in configurations(args.pipelines, args.vae_types, not args.no_wide):
        plans.append(measure_plan(**config))
    Console(width=200).print(table(plans))
    print(f"{len(plans)} plans in {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(p), "total": p.total} for p in plans], f, indent=1)


if __name__ == "__main__":
    main()
