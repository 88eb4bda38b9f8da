"""Recordings: start and stop a session's recording, list them, download one as MP4 (Scope's /recordings routes)."""

from __future__ import annotations

import anyio.to_thread
from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.response import File

from serve.openapi import FILE_MEDIA_TYPES_OPT, errors
from serve.schemas import RecordingList, RecordingStatus


class RecordingController(Controller):
    path = "/api/v1/recordings"
    tags = ["recordings"]

    @get("/")
    async def list_recordings(self, state: State) -> RecordingList:
        """Newest first, this server's and those already in the folder."""
        store = state.recordings
        recordings = await anyio.to_thread.run_sync(store.list)
        total = await anyio.to_thread.run_sync(store.total_bytes)
        return RecordingList(
            recordings=recordings, directory=str(store.directory), total_bytes=total, max_bytes=store.settings.max_bytes
        )

    @get("/{recording_id:str}", media_type="video/mp4", responses=errors(404, 409),
         opt={FILE_MEDIA_TYPES_OPT: ["video/mp4"]})  # fmt: skip
    async def download(self, recording_id: str, state: State) -> File:
        """A recording id (`<sessionId>-<n>`), or a session id for that session's newest recording (Scope's form)."""
        path = await anyio.to_thread.run_sync(state.recordings.resolve, recording_id)
        return File(path=path, filename=f"wanrt-{path.stem}.mp4", media_type="video/mp4")

    @post("/{session_id:str}/start", status_code=200, responses=errors(404, 409))
    async def start(self, session_id: str, state: State) -> RecordingStatus:
        """Records every frame the session sends from now on (409 if it is already recording)."""
        recorder = state.sessions.start_recording(session_id)
        return RecordingStatus(status="recording", recording=recorder.describe())

    @post("/{session_id:str}/stop", status_code=200, responses=errors(404, 409))
    async def stop(self, session_id: str, state: State) -> RecordingStatus:
        """Returns once the MP4 is complete and downloadable (409 if the session is not recording)."""
        recorder = await state.sessions.stop_recording(session_id)
        return RecordingStatus(status="stopped", recording=recorder.describe())
