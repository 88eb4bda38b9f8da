"""Model weights: whether a pipeline's files are downloaded, and starting their download (Scope's /models routes)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from serve.openapi import errors
from serve.schemas import ModelsDownloadRequest, ModelsStatus


class ModelsController(Controller):
    path = "/api/v1/models"
    tags = ["models"]

    @get("/status", responses=errors(404))
    async def status(
        self, pipeline_id: Annotated[str, Parameter(max_length=64)], state: State, vace: bool = False
    ) -> ModelsStatus:
        """Per-file presence and the download's progress; `downloaded` is true once every file is present (with
        `vace=true`, the VACE module counts too). A cluster front asks every worker: `workers` lists their answers."""
        return await state.serving.models_status(pipeline_id, vace)

    @post(
        "/download",
        status_code=202,
        responses={
            200: ResponseSpec(data_container=ModelsStatus, description="A download is already running: its status"),
            **errors(404),
        },
    )
    async def download(self, data: ModelsDownloadRequest, state: State) -> Response[ModelsStatus]:
        """Starts fetching the files in the background (202); while one runs, answers its status (200). Poll /status.
        A cluster front starts it on every live worker (202 if any started one)."""
        status, started = await state.serving.download_models(data.pipeline_id, data.vace)
        return Response(status, status_code=202 if started else 200)
