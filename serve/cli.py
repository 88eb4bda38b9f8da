"""`wanrt` command line: `wanrt serve` starts the server, `wanrt engines ...` builds and checks engines."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from build_engines.commands import add_engines_parser
from build_engines.commands import run as run_engines_command
from serve.settings import CorsSettings, ServerSettings


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerSettings.from_env()
    parser = argparse.ArgumentParser(prog="wanrt", description="Real-time Wan2.1 video diffusion server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP + WebRTC server")
    serve.add_argument("--host", default=defaults.host, help="bind address (env WANRT_HOST; default %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="port (env WANRT_PORT; default %(default)s)")
    serve.add_argument("--pipeline", default=defaults.preload_pipeline, help="pipeline to load at start (env PIPELINE)")
    serve.add_argument(
        "--allow-random-weights",
        action="store_true",
        default=defaults.allow_random_weights,
        help="accept the random_weights load parameter (tiny model, seeded random weights; demos and tests)",
    )
    serve.add_argument(
        "--cors-allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also admit this exact origin (repeatable); localhost and 127.0.0.1 on any port are always admitted",
    )
    serve.add_argument("--ice-server", action="append", default=[], metavar="URL", help="STUN/TURN URL (repeatable)")
    serve.add_argument(
        "--ice-interfaces",
        choices=["all", "loopback"],
        default=defaults.webrtc.ice_interfaces,
        help="host candidates: every interface plus loopback, or loopback only",
    )
    serve.add_argument("--max-sessions", type=int, default=defaults.webrtc.max_sessions)
    serve.add_argument(
        "--peer-timeout-s",
        type=float,
        default=defaults.webrtc.peer_timeout_s,
        help="free a session whose peer stops answering ICE consent checks for this long",
    )
    serve.add_argument("--assets-dir", type=Path, default=defaults.assets.directory)
    serve.add_argument("--max-upload-mb", type=int, default=defaults.assets.max_upload_bytes // 2**20)
    serve.add_argument("--models-dir", type=Path, default=defaults.models_dir)
    serve.add_argument("--engines-dir", type=Path, default=defaults.engines_dir, help="env WANRT_ENGINES_DIR")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engines_parser(commands, defaults.engines_dir, defaults.models_dir)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    defaults = ServerSettings.from_env()
    return dataclasses.replace(
        defaults,
        host=args.host,
        port=args.port,
        preload_pipeline=args.pipeline,
        allow_random_weights=args.allow_random_weights,
        models_dir=args.models_dir,
        engines_dir=args.engines_dir,
        cors=CorsSettings(extra_origins=tuple(args.cors_allow_origin)),
        webrtc=dataclasses.replace(
            defaults.webrtc,
            ice_servers=tuple(args.ice_server) or defaults.webrtc.ice_servers,
            ice_interfaces=args.ice_interfaces,
            max_sessions=args.max_sessions,
            peer_timeout_s=args.peer_timeout_s,
        ),
        assets=dataclasses.replace(
            defaults.assets, directory=args.assets_dir, max_upload_bytes=args.max_upload_mb * 2**20
        ),
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        import uvicorn

        from serve.app import create_app

        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
        settings = settings_from_args(args)
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    elif args.command == "engines":
        sys.exit(run_engines_command(args))


if __name__ == "__main__":
    main()
