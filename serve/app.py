"""The Litestar application: routes, one error handler, CORS, the browser UI, and a lifespan that closes everything."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.static_files import create_static_files_router

from serve.access import PUBLIC_OPT, RequestGate, is_loopback
from serve.api.assets import AssetController
from serve.api.loras import LoraController
from serve.api.models import ModelsController
from serve.api.pipeline import PipelineController
from serve.api.recordings import RecordingController
from serve.api.sessions import SessionController
from serve.api.system import SystemController
from serve.api.webrtc import WebRTCController
from serve.assets import MAX_COMPONENT_BYTES, AssetStore, echo
from serve.errors import InvalidRequest, WanrtError
from serve.hub import HubDownloads
from serve.openapi import make_openapi_true
from serve.pipelines.loras import LoraCatalog
from serve.pipelines.manager import PipelineManager
from serve.recording import RecordingStore
from serve.schemas import LoadParams
from serve.serving import LocalServing
from serve.settings import ServerSettings
from serve.webrtc.codecs import configure_codecs
from serve.webrtc.decoders import install_decoders
from serve.webrtc.ice import configure_ice
from serve.webrtc.session import configure_data_channel
from serve.webrtc.sessions import SessionManager

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).parent / "web"


class BoundedJsonRequest(Request):
    """JSON bodies are already capped in bytes (`request_max_body_size`); this bounds their nesting too."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:  # msgspec's decoder stops at the interpreter's recursion limit
            raise InvalidRequest(
                "the JSON body is nested too deeply; no request of this API nests more than a few levels"
            ) from None


def plain_file_path(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """The browser UI's files have short plain names. A NUL, or a name longer than a filesystem allows, used to reach
    the filesystem and come back as a 500 (found by fuzzing)."""
    path = connection.scope["path"]
    if "\0" in path or any(len(part.encode()) > MAX_COMPONENT_BYTES for part in path.split("/")):
        raise NotFoundException(f"no file {echo(path)} here")


def error_response(request: Request, exc: Exception) -> Response:
    """Every error leaves the server as `{"detail", "error"}` JSON with its status code, and never a traceback."""
    if isinstance(exc, WanrtError):
        body = {"detail": str(exc), "error": type(exc).__name__}
        return Response(body, status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, HTTPException):
        detail = exc.detail
        if exc.status_code == 413:  # only JSON routes leave the limit to Litestar; uploads raise BodyTooLarge
            limit = request.app.state.settings.limits.max_json_body_bytes
            detail = f"JSON bodies are limited to {limit} bytes (the server's --max-json-body-bytes sets it)"
        body = {"detail": detail, "error": type(exc).__name__}
        if exc.extra:
            body["extra"] = exc.extra
        return Response(body, status_code=exc.status_code, headers=exc.headers)  # e.g. 405's Allow
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(
        {"detail": "internal error; the server logged it, please report it with the time", "error": "InternalError"},
        status_code=500,
    )


LOCAL_CONTROLLERS: list[type] = [
    PipelineController,
    WebRTCController,
    SessionController,
    RecordingController,
    AssetController,
    LoraController,
    ModelsController,
    SystemController,
]


def create_app(settings: ServerSettings | None = None) -> Litestar:
    """The single-machine server: one pipeline manager and its sessions in this process (`wanrt serve`)."""
    settings = settings or ServerSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        configure_ice(settings.webrtc)
        configure_codecs(settings.webrtc)
        install_decoders(nvdec=settings.webrtc.nvdec)
        configure_data_channel(settings.webrtc)
        pipelines = PipelineManager(
            models_dir=settings.models_dir, engines_dir=settings.engines_dir, lora_dir=settings.lora_folder,
            allow_random_weights=settings.allow_random_weights, load_timeout_s=settings.load_timeout_s,
            default_gpus=settings.gpus,
        )  # fmt: skip
        loras = LoraCatalog(settings.lora_folder)
        recordings = RecordingStore(settings.recordings)
        sessions = SessionManager(pipelines, settings.webrtc, settings.assets.directory, recordings)
        models = HubDownloads(settings.models_dir, settings.hub_endpoint)
        app.state.update(
            serving=LocalServing(pipelines, sessions, recordings, loras, models),
            pipelines=pipelines,
            sessions=sessions,
            assets=AssetStore(settings.assets.directory),
        )
        if settings.preload_pipeline:
            await pipelines.load(settings.preload_pipeline, LoadParams())
        try:
            yield
        finally:
            await sessions.stop_all("server shutting down")  # each session's recording is completed as it ends
            await asyncio.to_thread(recordings.close)
            await asyncio.to_thread(models.close)  # stops downloads at their next chunk; partial files stay
            await pipelines.close()
            loras.close()

    return build_app(settings, lifespan, LOCAL_CONTROLLERS)


def build_app(
    settings: ServerSettings,
    lifespan: Callable[[Litestar], AbstractAsyncContextManager[None]],
    controllers: list[type],
) -> Litestar:
    """What every wanrt HTTP front shares: error handling, the request gate, CORS, OpenAPI and the browser UI.

    `lifespan` puts a `Serving` on `app.state.serving` (and whatever else its `controllers` read)."""
    if not is_loopback(settings.host) and settings.access.api_token is None:
        log.warning(
            "\n%s\nwanrt is bound to %s without an API token: anyone who can reach this address can load "
            "pipelines, stream and upload files. Set WANRT_API_TOKEN (or --api-token) to require "
            "'Authorization: Bearer <token>'.\n%s",
            "!" * 100, settings.host, "!" * 100,
        )  # fmt: skip
    app = Litestar(
        route_handlers=[
            *controllers,
            create_static_files_router(
                path="/",
                directories=[WEB_DIR],
                html_mode=True,
                include_in_schema=False,
                opt={PUBLIC_OPT: True},
                guards=[plain_file_path],
            ),
        ],
        lifespan=[lifespan],
        middleware=[RequestGate(settings.access, settings.host)],
        exception_handlers={Exception: error_response},
        cors_config=CORSConfig(
            allow_origins=list(settings.cors.extra_origins),
            allow_origin_regex=settings.cors.origin_regex,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["content-type", "authorization"],
        ),
        request_class=BoundedJsonRequest,
        request_max_body_size=settings.limits.max_json_body_bytes,  # the upload route sets its own
        openapi_config=OpenAPIConfig(title="wanrt", version=_version(), path="/schema"),
        state=State(
            {
                "settings": settings,
                "started_at": time.time(),
                "version": _version(),
                "git_commit": _git_commit(),
                "hardware": None,
            }
        ),
    )
    make_openapi_true(app)
    return app


def _version() -> str:
    try:
        return version("wanrt")
    except PackageNotFoundError:
        return "0+unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
