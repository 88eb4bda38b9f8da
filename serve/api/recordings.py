"""Recordings: start and stop a session's recording, list them, download one as MP4 (Scope's /recordings routes).

Everything goes through the `Serving` (serve/serving.py), so a cluster front answers these as a single server does:
a recording lives on the worker that served its session, whose name its id carries."""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.response import Stream

from serve.errors import WanrtError
from serve.openapi import FILE_MEDIA_TYPES_OPT, errors
from serve.schemas import RecordingList, RecordingStatus
from serve.serving import Serving

PIECE_BYTES = 4 * 2**20  # a download is read (and, from a cluster worker, sent) in pieces of this size


class RecordingController(Controller):
    path = "/api/v1/recordings"
    tags = ["recordings"]

    @get("/")
    async def list_recordings(self, state: State) -> RecordingList:
        """Newest first, this server's and those already in the folder (a cluster front: every live worker's)."""
        return await state.serving.list_recordings()

    @get("/{recording_id:str}", media_type="video/mp4", responses=errors(404, 409),
         opt={FILE_MEDIA_TYPES_OPT: ["video/mp4"]})  # fmt: skip
    async def download(self, recording_id: str, state: State) -> Stream:
        """A recording id (`<sessionId>-<n>`), or a session id for that session's newest recording (Scope's form)."""
        resolved, size = await state.serving.recording_file(recording_id)
        return Stream(
            _pieces(state.serving, resolved, size),
            media_type="video/mp4",
            headers={
                "content-length": str(size),
                "content-disposition": f'attachment; filename="wanrt-{resolved}.mp4"',
            },
        )

    @post("/{session_id:str}/start", status_code=200, responses=errors(404, 409))
    async def start(self, session_id: str, state: State) -> RecordingStatus:
        """Records every frame the session sends from now on (409 if it is already recording)."""
        return RecordingStatus(status="recording", recording=await state.serving.start_recording(session_id))

    @post("/{session_id:str}/stop", status_code=200, responses=errors(404, 409))
    async def stop(self, session_id: str, state: State) -> RecordingStatus:
        """Returns once the MP4 is complete and downloadable (409 if the session is not recording)."""
        return RecordingStatus(status="stopped", recording=await state.serving.stop_recording(session_id))


async def _pieces(serving: Serving, recording_id: str, size: int) -> AsyncIterator[bytes]:
    """The file's first `size` bytes (what its length said when the download began; a finished recording does not
    grow)."""
    offset = 0
    while offset < size:
        try:
            piece = await serving.read_recording(recording_id, offset, min(PIECE_BYTES, size - offset))
        except WanrtError:  # removed under the folder's cap, or its worker left, meanwhile: a short body
            return
        if not piece:
            return
        offset += len(piece)
        yield piece
