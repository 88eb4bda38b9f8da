"""WebRTC signalling: ICE servers, offer/answer, trickled candidates, closing, and the session list."""

from __future__ import annotations

from typing import Any

from litestar import Controller, delete, get, patch, post
from litestar.datastructures import State

from serve.openapi import errors
from serve.schemas import Answer, CandidatesRequest, IceServer, IceServers, Offer


class WebRTCController(Controller):
    path = "/api/v1/webrtc"
    tags = ["webrtc"]

    @get("/ice-servers")
    async def ice_servers(self, state: State) -> IceServers:
        return IceServers(iceServers=[IceServer(urls=url) for url in state.settings.webrtc.ice_servers])

    @post("/offer", status_code=200, responses=errors(422, 503))
    async def offer(self, data: Offer, state: State) -> Answer:
        """Answers an SDP offer for the loaded pipeline; `initialParameters` apply from the first chunk."""
        return await state.serving.create_session(data)

    @patch("/offer/{session_id:str}", status_code=204, responses=errors(404, 410))
    async def add_candidates(self, session_id: str, data: CandidatesRequest, state: State) -> None:
        await state.serving.add_candidates(session_id, data.candidates)

    @delete("/offer/{session_id:str}", status_code=204, responses=errors(404, 410))
    async def close(self, session_id: str, state: State) -> None:
        await state.serving.close_session(session_id)

    @get("/sessions")
    async def sessions(self, state: State) -> dict[str, Any]:
        """For operators: every live session with its parameters and latest stats."""
        return {"sessions": await state.serving.describe_sessions(), "max_sessions": state.serving.max_sessions}
