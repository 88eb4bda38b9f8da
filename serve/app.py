"""The Litestar application: routes, one error handler, CORS, the browser UI, and a lifespan that closes everything."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.static_files import create_static_files_router

from serve.api.assets import AssetController
from serve.api.loras import LoraController
from serve.api.models import ModelsController
from serve.api.pipeline import PipelineController
from serve.api.recordings import RecordingController
from serve.api.sessions import SessionController
from serve.api.system import SystemController
from serve.api.webrtc import WebRTCController
from serve.assets import AssetStore
from serve.errors import WanrtError
from serve.hub import HubDownloads
from serve.pipelines.loras import LoraCatalog
from serve.pipelines.manager import PipelineManager
from serve.recording import RecordingStore
from serve.schemas import LoadParams
from serve.settings import ServerSettings
from serve.webrtc.codecs import configure_codecs
from serve.webrtc.ice import configure_ice
from serve.webrtc.sessions import SessionManager

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).parent / "web"
JSON_BODY_LIMIT_BYTES = 1_000_000


def error_response(request: Request, exc: Exception) -> Response:
    """Every error leaves the server as `{"detail", "error"}` JSON with its status code."""
    if isinstance(exc, WanrtError):
        return Response({"detail": str(exc), "error": type(exc).__name__}, status_code=exc.status_code)
    if isinstance(exc, HTTPException):
        detail = exc.detail
        if exc.status_code == 413:
            limit_mb = request.app.state.settings.assets.max_upload_bytes / 2**20
            detail = f"request body over the {limit_mb:g} MB limit (the server's --max-upload-mb sets it)"
        body = {"detail": detail, "error": type(exc).__name__}
        if exc.extra:
            body["extra"] = exc.extra
        return Response(body, status_code=exc.status_code)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(
        {"detail": f"internal error: {type(exc).__name__}: {exc}", "error": "InternalError"}, status_code=500
    )


def create_app(settings: ServerSettings | None = None) -> Litestar:
    settings = settings or ServerSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        configure_ice(settings.webrtc)
        configure_codecs(settings.webrtc)
        pipelines = PipelineManager(
            models_dir=settings.models_dir, engines_dir=settings.engines_dir, lora_dir=settings.lora_folder,
            allow_random_weights=settings.allow_random_weights,
        )  # fmt: skip
        loras = LoraCatalog(settings.lora_folder)
        recordings = RecordingStore(settings.recordings)
        sessions = SessionManager(pipelines, settings.webrtc, settings.assets.directory, recordings)
        models = HubDownloads(settings.models_dir, settings.hub_endpoint)
        app.state.update(
            pipelines=pipelines,
            sessions=sessions,
            assets=AssetStore(settings.assets.directory),
            models=models,
            recordings=recordings,
            loras=loras,
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

    return Litestar(
        route_handlers=[
            PipelineController,
            WebRTCController,
            SessionController,
            RecordingController,
            AssetController,
            LoraController,
            ModelsController,
            SystemController,
            create_static_files_router(path="/", directories=[WEB_DIR], html_mode=True, include_in_schema=False),
        ],
        lifespan=[lifespan],
        exception_handlers={Exception: error_response},
        cors_config=CORSConfig(
            allow_origins=list(settings.cors.extra_origins),
            allow_origin_regex=settings.cors.origin_regex,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["content-type"],
        ),
        request_max_body_size=max(settings.assets.max_upload_bytes, JSON_BODY_LIMIT_BYTES),
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
