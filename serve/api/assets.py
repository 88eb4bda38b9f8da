"""Assets: upload (raw bytes), list, and serve reference images and videos."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.response import File

from serve.errors import InvalidRequest
from serve.schemas import Asset, AssetList


class AssetController(Controller):
    path = "/api/v1/assets"
    tags = ["assets"]

    @post("/", status_code=200)
    async def upload(
        self, request: Request, state: State, filename: Annotated[str, Parameter(max_length=255)] = ""
    ) -> Asset:
        """Body: the file's bytes (`application/octet-stream`). The returned `path` is what `vace_ref_images` takes."""
        if not filename:
            raise InvalidRequest("add ?filename=NAME to the upload URL")
        data = await request.body()  # bounded by the app's request_max_body_size: larger bodies get 413
        return await anyio.to_thread.run_sync(state.assets.save, filename, data)

    @get("/")
    async def list_assets(self, state: State) -> AssetList:
        return AssetList(assets=await anyio.to_thread.run_sync(state.assets.list))

    @get("/{path:path}")
    async def serve_asset(self, path: str, state: State) -> File:
        return File(path=await anyio.to_thread.run_sync(state.assets.resolve, path.lstrip("/")))
