"""`wanrt engines build | list | verify | clean`: the parser (no torch import, so `wanrt --help` stays fast) and the
commands."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DEFAULT_PIPELINES = ("streamdiffusionv2", "longlive")  # the pipelines this build serves, at their seed resolutions


def add_engines_parser(commands: argparse._SubParsersAction, engines_dir: Path, models_dir: Path) -> None:
    engines = commands.add_parser("engines", help="build and inspect TensorRT / AOTInductor engines")
    sub = engines.add_subparsers(dest="engines_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--engines-dir", type=Path, default=engines_dir,
                       help="engine folder (env WANRT_ENGINES_DIR; default %(default)s)")  # fmt: skip

    build = sub.add_parser("build", parents=[where], help="build the engines of pipelines (skips those up to date)")
    build.add_argument("--pipeline", action="append", default=[], metavar="P",
                       help=f"repeatable; default: {' '.join(DEFAULT_PIPELINES)}")  # fmt: skip
    build.add_argument("--height", type=int, help="default: the pipeline's seed resolution")
    build.add_argument("--width", type=int)
    build.add_argument("--precision", choices=("fp8", "bf16", "fp32"),
                       help="default: what the pipeline's default load runs: bf16 on a GPU (fp8 for Krea on "
                            "SM89+), fp32 on CPU")  # fmt: skip
    build.add_argument("--backend", choices=("tensorrt", "aoti"),
                       help="default: tensorrt where it is importable with a GPU, else aoti")  # fmt: skip
    build.add_argument("--vae-type", choices=("wan", "lightvae", "tae", "lighttae"),
                       help="the VAE whose chunk steps to build (load parameter vae_type); default: wan")  # fmt: skip
    build.add_argument("--random-weights", action="store_true",
                       help="tiny config, seeded random weights (no files needed; demos and tests)")  # fmt: skip
    build.add_argument("--seed", type=int, default=42, help="seed of the random weights (the server's default seed)")
    build.add_argument("--models-dir", type=Path, default=models_dir)
    build.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    build.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]", type=lora_argument,
                       help="merge this LoRA of the LoRA folder (repeatable; scale default 1): the engine a load with "
                            "loras [{path: NAME, scale: SCALE, merge_mode: permanent_merge}] uses")  # fmt: skip
    build.add_argument("--lora-dir", type=Path, default=None, help="default: lora/ in the models dir")
    build.add_argument("--vace", action="store_true",
                       help="also the VACE-enabled DiT step, for vace_enabled loads")  # fmt: skip

    sub.add_parser("list", parents=[where], help="engines on disk, and whether each fits this machine")
    sub.add_parser("verify", parents=[where], help="re-hash every engine file against its manifest and load it")
    clean = sub.add_parser("clean", parents=[where], help="delete engines")
    clean.add_argument(
        "--all", action="store_true", help="every engine; default: this GPU's engines that no longer fit (versions)"
    )
    clean.add_argument(
        "--other-gpus", action="store_true", help="also engines built for other GPUs (kept by default: a shared folder)"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    # Paths stay on one line and tables unclipped, for people who copy them and for logs and tests that grep (a pipe
    # would otherwise get rich's 80 columns).
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    command = {"build": build, "list": list_engines, "verify": verify, "clean": clean}[args.engines_command]
    return command(args, console)


def lora_argument(text: str) -> tuple[str, float]:
    """`NAME[:SCALE]` → (name, scale)."""
    name, _, scale = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return name, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME or NAME:SCALE, e.g. style.safetensors:0.8") from None


def build(args: argparse.Namespace, console) -> int:
    from build_engines.build import BuildRequest, EngineBuildError, build_pipeline

    failed = 0
    for pipeline in args.pipeline or DEFAULT_PIPELINES:
        request = BuildRequest(
            pipeline=pipeline, engines_dir=args.engines_dir, models_dir=args.models_dir, height=args.height,
            width=args.width, precision=args.precision, backend=args.backend, vae_type=args.vae_type,
            random_weights=args.random_weights, seed=args.seed, force=args.force, loras=tuple(args.lora),
            lora_dir=args.lora_dir, vace=args.vace,
        )  # fmt: skip
        try:
            results = build_pipeline(request, console)
        except EngineBuildError as exc:
            console.print(f"[red]cannot build {pipeline}[/red]: {exc}")
            failed += 1
            continue
        for result in results:
            console.print(f"{result.status}: {result.key.describe()} → {result.path} ({result.seconds:.1f} s)")
    return 1 if failed else 0


def _fit_here(manifest) -> str | None:
    """Why an engine does not fit this machine and toolchain (shapes and weights are the server's to check)."""
    from build_engines.manifest import Environment, mismatch

    return mismatch(manifest, manifest.key, Environment.current(), None)


def list_engines(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from build_engines.manifest import Manifest, all_manifests

    found = all_manifests(args.engines_dir)
    if not found:
        console.print(f"no engines under {args.engines_dir} (build some: wanrt engines build)")
        return 0
    table = Table(title=f"engines under {args.engines_dir}")
    for column in ("engine", "pipeline", "component", "H×W", "precision", "backend", "MB", "built", "here"):
        table.add_column(column)
    for path, manifest in found:
        if not isinstance(manifest, Manifest):
            table.add_row(str(path.relative_to(args.engines_dir)), *["-"] * 7, f"[red]{manifest}[/red]")
            continue
        key, engine = manifest.key, path.parent / manifest.file
        size = f"{engine.stat().st_size / 2**20:.1f}" if engine.exists() else "missing"
        table.add_row(
            str(engine.relative_to(args.engines_dir)), key.pipeline,
            key.component + (f" ({key.vae_type})" if key.vae_type else ""), f"{key.height}×{key.width}",
            key.precision, key.backend, size, manifest.built_at, _fit_here(manifest) or "fits",
        )  # fmt: skip
    console.print(table)
    return 0


def verify(args: argparse.Namespace, console) -> int:
    """Every engine: its file exists, hashes to its manifest, and loads here (where it can be loaded at all)."""
    from build_engines.manifest import Manifest, all_manifests, file_hash

    problems, found = 0, all_manifests(args.engines_dir)
    if not found:
        console.print(f"no engines under {args.engines_dir}")
    for path, manifest in found:
        if not isinstance(manifest, Manifest):
            console.print(f"[red]BAD[/red] {path}: {manifest}")
            problems += 1
            continue
        engine = path.parent / manifest.file
        if not engine.exists():
            verdict = "engine file missing"
        elif file_hash(engine) != manifest.file_sha256:
            verdict = "corrupt: sha256 differs from its manifest"
        elif reason := _fit_here(manifest):
            console.print(f"[yellow]SKIP[/yellow] {engine}: hash ok; not loadable here ({reason})")
            continue
        else:
            verdict = _load_error(engine, manifest)
        if verdict:
            console.print(f"[red]BAD[/red] {engine}: {verdict}")
            problems += 1
        else:
            console.print(f"[green]OK[/green] {engine}")
    return 1 if problems else 0


def _load_error(engine: Path, manifest) -> str | None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if manifest.key.backend == "aoti":
            from serve.runtime.backends import AotiEngine, first_input_shape

            AotiEngine(engine, first_input_shape(manifest)).warm_up(manifest, device)
        else:
            from build_engines.tensorrt import deserialize_engine

            deserialize_engine(engine)
    except Exception as exc:  # any load failure is the verdict, reported, not raised
        return f"does not load: {type(exc).__name__}: {exc}"
    return None


BUILD_LEFTOVERS = ("timing.cache", "timing.cache.*.tmp", "*.partial.pt2", "*.plan.tmp", "*.json.tmp", "*.lock",
                   "wanrt-onnx-*")  # fmt: skip
"""What builds leave beside their engines (TensorRT's timing cache, interrupted writes, build locks, ONNX work
folders): `--all` removes these too, and nothing else that is not an engine (the folder may be shared, or mistyped
as ~/.wanrt)."""


def clean(args: argparse.Namespace, console) -> int:
    from build_engines.manifest import Environment, Manifest, all_manifests

    here = Environment.current()
    removed = kept_other_gpu = kept_unjudged = 0
    for path, manifest in all_manifests(args.engines_dir):
        parsed = isinstance(manifest, Manifest)
        reason = _fit_here(manifest) if parsed else "unreadable manifest"
        if reason and parsed and not args.all:
            # Not stale, only not loadable here: a folder shared between machines holds other GPUs' engines, and a
            # machine without TensorRT (another venv, a broken library path) cannot judge TensorRT's plans.
            if (manifest.env.gpu, manifest.env.sm) != (here.gpu, here.sm):
                if not args.other_gpus:
                    kept_other_gpu += 1
                    continue
            elif here.backend_version(manifest.key.backend) is None:
                kept_unjudged += 1
                continue
        if args.all or reason:
            targets = [path] + ([path.parent / manifest.file] if parsed else [])
            for target in targets:
                target.unlink(missing_ok=True)
            console.print(f"removed {path.with_suffix('')}.*" + (f" ({reason})" if reason else ""))
            removed += 1
    if args.all:
        for pattern in BUILD_LEFTOVERS:
            for leftover in args.engines_dir.glob(f"*/*/{pattern}"):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
    # Drop emptied folders, deepest first (timing caches keep theirs unless --all).
    for folder in [*sorted(args.engines_dir.glob("*/*"), reverse=True), *args.engines_dir.glob("*"), args.engines_dir]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    console.print(f"{removed} engine(s) removed from {args.engines_dir}")
    if kept_other_gpu:
        console.print(f"{kept_other_gpu} engine(s) for other GPUs kept (--other-gpus removes them)")
    if kept_unjudged:
        console.print(f"{kept_unjudged} engine(s) of a backend not installed here kept (--all removes them)")
    return 0
