"""Assets: upload (raw bytes), list, and serve reference images and videos."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.response import File

from serve.access import BODY_MEDIA_TYPE_OPT
from serve.errors import BodyTooLarge, InvalidRequest
from serve.openapi import FILE_MEDIA_TYPES_OPT, errors
from serve.schemas import Asset, AssetList

UPLOAD_MEDIA_TYPE = "application/octet-stream"


async def read_upload(request: Request, limit_bytes: int) -> bytes:
    """The body, refused with 413 as soon as its declared or received size passes the limit."""

    def too_large() -> BodyTooLarge:
        return BodyTooLarge(
            f"uploads are limited to {limit_bytes / 2**20:g} MiB (the server's --max-upload-mb sets it); "
            "send a smaller file"
        )

    if (request.content_length or 0) > limit_bytes:
        raise too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


class AssetController(Controller):
    path = "/api/v1/assets"
    tags = ["assets"]

    @post(
        "/",
        status_code=200,
        responses=errors(413, 415, 507),
        request_max_body_size=None,  # not the JSON limit: read_upload applies the upload limit
        opt={BODY_MEDIA_TYPE_OPT: UPLOAD_MEDIA_TYPE},
    )
    async def upload(
        self, request: Request, state: State, filename: Annotated[str, Parameter(max_length=255)] = ""
    ) -> Asset:
        """Body: the file's bytes (`application/octet-stream`). The returned `path` is what `vace_ref_images` takes."""
        if not filename:
            raise InvalidRequest("add ?filename=NAME to the upload URL")
        data = await read_upload(request, state.settings.assets.max_upload_bytes)
        return await anyio.to_thread.run_sync(state.assets.save, filename, data)

    @get("/")
    async def list_assets(self, state: State) -> AssetList:
        return AssetList(assets=await anyio.to_thread.run_sync(state.assets.list))

    @get("/{path:path}", responses=errors(404), opt={FILE_MEDIA_TYPES_OPT: ["image/*", "video/*"]})
    async def serve_asset(self, path: str, state: State) -> File:
        resolved = await anyio.to_thread.run_sync(state.assets.resolve, path.lstrip("/"))
        # Inline (an <img> or <video> shows it), named, and never sniffed: the type comes from the content check.
        return File(
            path=resolved,
            filename=resolved.name,
            content_disposition_type="inline",
            headers={"X-Content-Type-Options": "nosniff"},
        )
