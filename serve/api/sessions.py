"""Headless access to a running session: its newest output frame as JPEG and its stats (Scope's /session/frame and
/session/metrics, addressed by session id since wanrt serves several sessions)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.params import Parameter

from serve.openapi import FILE_MEDIA_TYPES_OPT, errors


class SessionController(Controller):
    path = "/api/v1/sessions"
    tags = ["sessions"]

    @get("/{session_id:str}/frame", media_type="image/jpeg", responses=errors(404, 409, 410),
         opt={FILE_MEDIA_TYPES_OPT: ["image/jpeg"]})  # fmt: skip
    async def frame(
        self, session_id: str, state: State, quality: Annotated[int, Parameter(ge=1, le=100)] = 85
    ) -> Response[bytes]:
        """The frame the session sent last, as JPEG (409 until its first frame is out)."""
        data = await state.serving.session_frame(session_id, quality)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @get("/{session_id:str}/metrics", responses=errors(404, 410))
    async def metrics(self, session_id: str, state: State) -> dict[str, Any]:
        """The rates of the latest `stats` message (fps, latency) with the session's counters read now."""
        return await state.serving.session_metrics(session_id)
