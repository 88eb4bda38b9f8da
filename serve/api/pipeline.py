"""Pipelines: load, status, unload, and the schema of every registered pipeline."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, post
from litestar.datastructures import State

from serve.errors import InvalidRequest
from serve.openapi import errors
from serve.pipelines.registry import PIPELINES
from serve.schemas import LoadRequest, MessageResponse, PipelineStatus


class PipelineController(Controller):
    path = "/api/v1"
    tags = ["pipeline"]

    @post("/pipeline/load", status_code=200, responses=errors(404, 409, 422, 501, 503))
    async def load(self, data: LoadRequest, state: State) -> MessageResponse:
        """Starts loading; poll /pipeline/status. Takes `{pipeline_id}` (the seed) or `{pipeline_ids: [id]}` (Scope)."""
        ids = [data.pipeline_id] if isinstance(data.pipeline_id, str) else []
        ids += data.pipeline_ids if isinstance(data.pipeline_ids, list) else []
        if len(ids) != 1:
            raise InvalidRequest(
                "give exactly one pipeline: {'pipeline_id': ID} or {'pipeline_ids': [ID]} "
                "(preprocessor pipelines are not supported)"
            )
        return MessageResponse(message=await state.serving.load(ids[0], data.load_params))

    @get("/pipeline/status")
    async def status(self, state: State) -> PipelineStatus:
        return await state.serving.status()

    @post("/pipeline/unload", status_code=200)
    async def unload(self, state: State) -> MessageResponse:
        """Stops every session (they get `stream_stopped`) and frees the pipeline."""
        return MessageResponse(message=await state.serving.unload())

    @get("/pipelines/schemas")
    async def schemas(self, state: State) -> dict[str, Any]:
        missing = await state.serving.missing_weights()  # this server's folder, or a cluster's workers'
        return {"pipelines": {pid: spec.schema(missing[pid]) for pid, spec in PIPELINES.items()}}
