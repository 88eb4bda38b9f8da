"""`wanrt` command line: `wanrt serve` starts the server; `wanrt models list|download|verify` manage weight files;
`wanrt engines build|list|verify|clean` build and check engines."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from build_engines.commands import add_engines_parser
from build_engines.commands import run as run_engines_command
from serve.settings import (
    CODEC_PREFERENCES,
    FRAME_PATHS,
    LOG_LEVELS,
    X264_PRESETS,
    AccessSettings,
    ClusterSettings,
    CorsSettings,
    RequestLimits,
    ServerSettings,
    one_of,
)

if TYPE_CHECKING:
    from rich.console import Console

    from serve.pipelines.spec import PipelineSpec

PROGRESS_REFRESH_S = 0.1


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerSettings.from_env()
    parser = argparse.ArgumentParser(prog="wanrt", description="Real-time Wan2.1 video diffusion server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP + WebRTC server")
    add_server_options(serve, defaults)

    cluster = commands.add_parser(
        "cluster", help="many sessions on many GPUs: Ray workers and the HTTP front (pip install 'wanrt[cluster]')"
    )
    roles = cluster.add_subparsers(dest="role", required=True)
    for role, text in (
        ("worker", "start one worker actor per GPU of this machine in the Ray cluster, and hold them until stopped"),
        ("serve", "serve the /api/v1 API and the UI, placing each session on a worker of the Ray cluster"),
    ):
        sub = roles.add_parser(role, help=text, description=text)
        sub.add_argument(
            "--address", default=os.environ.get("RAY_ADDRESS", "auto"),
            help="Ray cluster address (env RAY_ADDRESS; default %(default)s: the `ray start` of this machine)",
        )  # fmt: skip
        add_server_options(sub, defaults)
        if role == "worker":
            sub.add_argument(
                "--cpu-workers", type=int, default=0, metavar="N",
                help="start N CPU seats instead of one worker per GPU (machines without a GPU: development, tests)",
            )  # fmt: skip
        else:
            sub.add_argument(
                "--poll-interval-s", type=float, default=ClusterSettings.poll_interval_s,
                help="how often the front asks every worker for its state (a dead worker is noticed within this)",
            )  # fmt: skip
            sub.add_argument(
                "--call-timeout-s", type=float, default=ClusterSettings.call_timeout_s,
                help="a worker that has not answered a call (an offer, a PATCH...) in this long is unreachable: 503",
            )  # fmt: skip
            sub.add_argument(
                "--release-timeout-s", type=float, default=ClusterSettings.release_timeout_s,
                help="the same for a call that frees a pipeline (load, unload) or completes a recording: these wait "
                "for the worker's chunk in flight, its stages and its encoder",
            )  # fmt: skip

    models = commands.add_parser("models", help="list, download and verify the pipelines' weight files")
    actions = models.add_subparsers(dest="action", required=True)
    for action, text in (
        ("list", "every pipeline's files: present or missing, and their size"),
        ("download", "fetch a pipeline's files from the hub (resumes an interrupted download)"),
        ("verify", "re-hash a pipeline's files against what the hub published; non-zero exit names bad files"),
    ):
        sub = actions.add_parser(action, help=text, description=text)
        if action != "list":
            sub.add_argument("pipeline", help="pipeline id, e.g. streamdiffusionv2")
            sub.add_argument(
                "--endpoint", default=defaults.hub_endpoint, help="hub URL (env HF_ENDPOINT; default %(default)s)"
            )
            sub.add_argument("--vace", action="store_true", help="include the VACE module (for vace_enabled loads)")
        sub.add_argument(
            "--models-dir", type=Path, default=defaults.models_dir, help="env WANRT_MODELS_DIR; default %(default)s"
        )
    add_engines_parser(commands, defaults.engines_dir, defaults.models_dir)
    return parser


def add_server_options(serve: argparse.ArgumentParser, defaults: ServerSettings) -> None:
    """What `wanrt serve` takes; a cluster worker and a cluster front take the same (each uses its part)."""
    serve.add_argument("--host", default=defaults.host, help="bind address (env WANRT_HOST; default %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="port (env WANRT_PORT; default %(default)s)")
    serve.add_argument("--pipeline", default=defaults.preload_pipeline, help="pipeline to load at start (env PIPELINE)")
    serve.add_argument(
        "--allow-random-weights",
        action="store_true",
        default=defaults.allow_random_weights,
        help="accept the random_weights load parameter (tiny model, seeded random weights; demos and tests; "
        "env WANRT_ALLOW_RANDOM_WEIGHTS=1)",
    )
    serve.add_argument(
        "--cors-allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also admit this exact origin (repeatable; env WANRT_CORS_ALLOW_ORIGINS, comma-separated); localhost and "
        "127.0.0.1 on any port are always admitted",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (repeatable; env WANRT_ALLOWED_HOSTS, comma-separated); "
        "localhost, loopback addresses and the bound address always are",
    )
    serve.add_argument(
        "--api-token",
        default=defaults.access.api_token,
        help="require 'Authorization: Bearer TOKEN' on every /api/v1 route and /metrics (env WANRT_API_TOKEN, "
        "which keeps it out of the process list)",
    )
    serve.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="STUN/TURN URL (repeatable; env WANRT_ICE_SERVERS, comma-separated)",
    )
    serve.add_argument(
        "--ice-interfaces",
        choices=["all", "loopback"],
        default=defaults.webrtc.ice_interfaces,
        help="host candidates: every interface plus loopback, or loopback only (env WANRT_ICE_INTERFACES; "
        "default %(default)s)",
    )
    serve.add_argument("--max-sessions", type=int, default=defaults.webrtc.max_sessions, help="env WANRT_MAX_SESSIONS")
    serve.add_argument(
        "--nvdec",
        action="store_true",
        default=defaults.webrtc.nvdec,
        help="decode incoming H.264 with NVDEC, frames kept on the GPU (CUDA only; env WANRT_NVDEC=1)",
    )
    serve.add_argument(
        "--frame-path",
        choices=FRAME_PATHS,
        default=defaults.webrtc.frame_path,
        help="auto: YUV planes converted on the pipeline's GPU (swscale on a CPU), VP8 by libvpx and H.264 by "
        "NVENC/libx264 straight to RTP; device: YUV planes even on a CPU; host: swscale RGB and aiortc's own encoders "
        "(the old path) (env WANRT_FRAME_PATH; default %(default)s)",
    )
    serve.add_argument(
        "--codec-preference",
        choices=CODEC_PREFERENCES,
        default=defaults.webrtc.codec_preference,
        help="client: answer in the offer's codec order (browsers offer VP8 first); h264: H.264 whenever offered, "
        "both ways (cheaper to encode; NVDEC/NVENC on a GPU) (env WANRT_CODEC_PREFERENCE; default %(default)s)",
    )
    serve.add_argument(
        "--x264-preset",
        choices=X264_PRESETS,
        default=defaults.webrtc.x264_preset,
        help="libx264's preset for H.264 output where there is no NVENC (faster presets cost less CPU and quality; "
        "env WANRT_X264_PRESET; default %(default)s)",
    )
    serve.add_argument(
        "--peer-timeout-s",
        type=float,
        default=defaults.webrtc.peer_timeout_s,
        help="free a session whose peer stops answering ICE consent checks for this long (env WANRT_PEER_TIMEOUT_S; "
        "default %(default)s)",
    )
    serve.add_argument(
        "--connect-timeout-s",
        type=float,
        default=defaults.webrtc.connect_timeout_s,
        help="close an offer whose peer has not connected this long after the answer (env WANRT_CONNECT_TIMEOUT_S)",
    )
    serve.add_argument(
        "--load-timeout-s",
        type=float,
        default=defaults.load_timeout_s,
        help="report a pipeline load still running after this long as failed (env WANRT_LOAD_TIMEOUT_S)",
    )
    serve.add_argument(
        "--assets-dir", type=Path, default=defaults.assets.directory, help="uploaded assets (env WANRT_ASSETS_DIR)"
    )
    serve.add_argument(
        "--max-upload-mb",
        type=int,
        default=defaults.assets.max_upload_bytes // 2**20,
        help="largest upload in MiB (env WANRT_MAX_UPLOAD_MB; default %(default)s)",
    )
    serve.add_argument(
        "--max-json-body-bytes",
        type=int,
        default=defaults.limits.max_json_body_bytes,
        help="largest JSON request body (env WANRT_MAX_JSON_BODY_BYTES; default %(default)s)",
    )
    serve.add_argument(
        "--header-timeout-s",
        type=float,
        default=defaults.limits.header_timeout_s,
        help="a request whose headers take longer gets 408 and its connection closed (env WANRT_HEADER_TIMEOUT_S; "
        "default %(default)s)",
    )
    serve.add_argument(
        "--body-timeout-s",
        type=float,
        default=defaults.limits.body_timeout_s,
        help="a request body that pauses longer between two reads has its connection closed (env "
        "WANRT_BODY_TIMEOUT_S; default %(default)s)",
    )
    serve.add_argument(
        "--models-dir", type=Path, default=defaults.models_dir, help="weight files (env WANRT_MODELS_DIR)"
    )
    serve.add_argument(
        "--recordings-dir",
        type=Path,
        default=defaults.recordings.directory,
        help="recorded MP4 files (env WANRT_RECORDINGS_DIR; default %(default)s)",
    )
    serve.add_argument(
        "--recordings-max-mb",
        type=int,
        default=defaults.recordings.max_bytes // 2**20,
        help="cap on the recordings folder; the oldest are removed first (env WANRT_RECORDINGS_MAX_MB; "
        "default %(default)s)",
    )
    serve.add_argument(
        "--hub-endpoint", default=defaults.hub_endpoint, help="Hugging Face hub for downloads (env HF_ENDPOINT)"
    )
    serve.add_argument("--engines-dir", type=Path, default=defaults.engines_dir, help="env WANRT_ENGINES_DIR")
    serve.add_argument(
        "--lora-dir", type=Path, default=defaults.lora_dir,
        help="user LoRA files (env WANRT_LORA_DIR; default: lora/ in the models dir)",
    )  # fmt: skip
    serve.add_argument(
        "--gpus", type=gpus_argument, default=defaults.gpus, metavar="IDS",
        help="split each load's DiT over these GPUs, one pipeline stage each (e.g. 0,1,2,3; cpu:N for N CPU ranks, "
        "for tests); a load's own `gpus` parameter overrides it (env WANRT_GPUS; default: one device)",
    )  # fmt: skip
    serve.add_argument(
        "--log-level",
        default=one_of(os.environ, "WANRT_LOG_LEVEL", LOG_LEVELS, "info"),
        choices=LOG_LEVELS,
        help="env WANRT_LOG_LEVEL; default %(default)s",
    )


def gpus_argument(text: str) -> str:
    """`--gpus`, checked as the load parameter is (serve/pipelines/placement.py): argparse reports the reason."""
    from serve.errors import InvalidParameters
    from serve.pipelines.placement import parse_gpus

    try:
        return parse_gpus(text).spelled()
    except InvalidParameters as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    defaults = ServerSettings.from_env()
    return dataclasses.replace(
        defaults,
        host=args.host,
        port=args.port,
        preload_pipeline=args.pipeline,
        load_timeout_s=args.load_timeout_s,
        allow_random_weights=args.allow_random_weights,
        gpus=args.gpus,
        models_dir=args.models_dir,
        lora_dir=args.lora_dir,
        engines_dir=args.engines_dir,
        hub_endpoint=args.hub_endpoint.rstrip("/"),
        cors=CorsSettings(extra_origins=tuple(args.cors_allow_origin) or defaults.cors.extra_origins),
        access=AccessSettings(
            api_token=args.api_token or None,
            allowed_hosts=tuple(args.allowed_host) or defaults.access.allowed_hosts,
        ),
        limits=RequestLimits(
            max_json_body_bytes=args.max_json_body_bytes,
            header_timeout_s=args.header_timeout_s,
            body_timeout_s=args.body_timeout_s,
        ),
        webrtc=dataclasses.replace(
            defaults.webrtc,
            ice_servers=tuple(args.ice_server) or defaults.webrtc.ice_servers,
            ice_interfaces=args.ice_interfaces,
            max_sessions=args.max_sessions,
            frame_path=args.frame_path,
            nvdec=args.nvdec,
            x264_preset=args.x264_preset,
            codec_preference=args.codec_preference,
            peer_timeout_s=args.peer_timeout_s,
            connect_timeout_s=args.connect_timeout_s,
        ),
        assets=dataclasses.replace(
            defaults.assets, directory=args.assets_dir, max_upload_bytes=args.max_upload_mb * 2**20
        ),
        recordings=dataclasses.replace(
            defaults.recordings, directory=args.recordings_dir, max_bytes=args.recordings_max_mb * 2**20
        ),
    )


def run_models(args: argparse.Namespace) -> int:
    """`wanrt models ...`; returns the exit status (0 ok, 1 failed or bad files, 2 unknown pipeline, 130 stopped)."""
    from rich.console import Console

    from serve.errors import UnknownPipeline
    from serve.pipelines.registry import PIPELINES, get_spec

    console, errors = Console(), Console(stderr=True)
    if args.action == "list":
        list_models(console, list(PIPELINES.values()), args.models_dir)
        return 0
    try:
        spec = get_spec(args.pipeline)
    except UnknownPipeline as exc:
        errors.print(f"error: {exc}", markup=False, soft_wrap=True)
        return 2
    endpoint = args.endpoint.rstrip("/")
    if args.vace:
        spec = spec.with_vace_files()
    if args.action == "download":
        return download_models(console, errors, spec, args.models_dir, endpoint)
    return verify_models(console, errors, spec, args.models_dir, endpoint)


def list_models(console: Console, specs: list[PipelineSpec], models_dir: Path) -> None:
    from rich.filesize import decimal
    from rich.table import Table

    from serve.hub import file_states

    table = Table(title=f"weight files in {models_dir}")
    for column in ("pipeline", "file", "state", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for spec in specs:
        if not spec.files:
            table.add_row(spec.id, "(no files needed)", "", "")
        for state in file_states(spec, models_dir):
            label = ("verified" if state.verified else "present") if state.present else "missing"
            size = decimal(state.size_bytes) if state.size_bytes is not None else ""
            table.add_row(spec.id, f"{state.repo}/{state.path}", label, size)
    console.print(table)


def download_models(console: Console, errors: Console, spec: PipelineSpec, models_dir: Path, endpoint: str) -> int:
    """The server's download machinery in this process; the main thread only draws the bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from serve.hub import HubDownloads

    downloads = HubDownloads(models_dir, endpoint)
    if not spec.files:
        console.print(f"{spec.id} needs no weight files")
        return 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(spec.id, total=None)
        downloads.start(spec)
        try:
            while downloads.running(spec):
                progress = downloads.progress(spec)
                total = progress.bytes_total or None
                bar.update(task, completed=progress.bytes_done, total=total, description=progress.current_file)
                time.sleep(PROGRESS_REFRESH_S)
        except KeyboardInterrupt:
            # What is on disk is a prefix of the file whenever the thread stops, so do not wait long for it.
            downloads.close(timeout_s=2.0)
            errors.print("stopped; run the same command again to resume")
            return 130
        progress = downloads.progress(spec)
        bar.update(task, completed=progress.bytes_done, total=progress.bytes_total or None, description=spec.id)
    if progress.state != "done":
        errors.print(f"error: {spec.id}: {progress.error}", markup=False, soft_wrap=True)
        return 1
    for file in spec.files:
        console.print(f"ok {file.local_path(models_dir)}", markup=False, highlight=False, soft_wrap=True)
    return 0


def verify_models(console: Console, errors: Console, spec: PipelineSpec, models_dir: Path, endpoint: str) -> int:
    from serve.hub import verify_pipeline

    checks = verify_pipeline(spec, models_dir, endpoint)
    for check in checks:
        out = console if check.state == "ok" else errors
        out.print(f"{check.state} {check.file.repo}/{check.file.path}: {check.detail}", markup=False, soft_wrap=True)
    bad = [c for c in checks if c.state != "ok"]
    if bad:
        message = f"{len(bad)} of {len(checks)} files missing, corrupt or unverified"
        hint = f"fetch them with `wanrt models download {spec.id}`"
        errors.print(f"error: {spec.id}: {message}; {hint}", markup=False, soft_wrap=True)
        return 1
    console.print(f"{spec.id}: all {len(checks)} files verified", markup=False)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s %(message)s")
        sys.exit(run_models(args))
    if args.command == "serve":
        from serve.app import create_app
        from serve.http_server import run_http

        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
        settings = settings_from_args(args)
        run_http(create_app(settings), settings.host, settings.port, settings.limits, args.log_level)
    elif args.command == "engines":
        sys.exit(run_engines_command(args))
    elif args.command == "cluster":
        from serve.cluster.commands import run_front, run_worker  # Ray: only for these commands

        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
        run = run_worker if args.role == "worker" else run_front
        sys.exit(run(args, settings_from_args(args)))


if __name__ == "__main__":
    main()
