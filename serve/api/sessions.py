"""Headless access to a running session: its newest output frame as JPEG and its stats (Scope's /session/frame and
/session/metrics, addressed by session id since wanrt serves several sessions)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.params import Parameter

from serve.errors import NoFrameYet
from serve.openapi import FILE_MEDIA_TYPES_OPT, errors
from serve.webrtc.snapshot import encode_jpeg


class SessionController(Controller):
    path = "/api/v1/sessions"
    tags = ["sessions"]

    @get("/{session_id:str}/frame", media_type="image/jpeg", responses=errors(404, 409),
         opt={FILE_MEDIA_TYPES_OPT: ["image/jpeg"]})  # fmt: skip
    async def frame(
        self, session_id: str, state: State, quality: Annotated[int, Parameter(ge=1, le=100)] = 85
    ) -> Response[bytes]:
        """The frame the session sent last, as JPEG (409 until its first frame is out)."""
        frame = state.sessions.get(session_id).output.last_frame
        if frame is None:
            raise NoFrameYet(f"session {session_id} has not sent a frame yet; try again once its stream runs")
        data = await anyio.to_thread.run_sync(encode_jpeg, frame, quality)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @get("/{session_id:str}/metrics", responses=errors(404))
    async def metrics(self, session_id: str, state: State) -> dict[str, Any]:
        """The rates of the latest `stats` message (fps, latency) with the session's counters read now."""
        return state.sessions.get(session_id).metrics()
