"""The seam between the HTTP API and what serves it: the pipeline, WebRTC, recording, LoRA and models controllers
call a `Serving`.

Two implementations exist. `LocalServing` (here) is the single-GPU server: one pipeline manager and one session
manager in this process. `ClusterServing` (serve/cluster/front.py) places the same calls on Ray actors, each of which
owns a `LocalServing` of its own, so a worker is today's server behind a different front. The controllers cannot
tell them apart, which is what keeps the `/api/v1` contract the same for both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import anyio.to_thread
import msgspec

from serve.errors import NoFrameYet
from serve.hub import name_of
from serve.pipelines.registry import PIPELINES, get_spec
from serve.schemas import (
    Answer,
    IceCandidate,
    LoadParams,
    LoraFileInfo,
    LoraList,
    ModelsStatus,
    Offer,
    PipelineStatus,
    Recording,
    RecordingList,
)

if TYPE_CHECKING:
    from serve.hub import HubDownloads
    from serve.pipelines.loras import LoraCatalog
    from serve.pipelines.manager import PipelineManager
    from serve.pipelines.spec import PipelineSpec
    from serve.recording import RecordingStore
    from serve.webrtc.sessions import SessionManager


class Serving(Protocol):
    max_sessions: int
    """Sessions this server takes at once (a cluster: the seats of its live workers)."""

    async def load(self, pipeline_id: str, params: LoadParams) -> str: ...
    async def status(self) -> PipelineStatus: ...
    async def unload(self) -> str: ...
    async def create_session(self, offer: Offer) -> Answer: ...
    async def add_candidates(self, session_id: str, candidates: list[IceCandidate]) -> None: ...
    async def close_session(self, session_id: str) -> None: ...
    async def describe_sessions(self) -> list[dict[str, Any]]: ...
    async def session_frame(self, session_id: str, quality: int) -> bytes:
        """The session's newest output frame as JPEG; NoFrameYet (409) before its first."""
        ...

    async def session_metrics(self, session_id: str) -> dict[str, Any]: ...
    async def gauges(self) -> dict[str, float]:
        """The serving side of GET /metrics (Prometheus names, no process gauges)."""
        ...

    async def list_recordings(self) -> RecordingList: ...
    async def start_recording(self, session_id: str) -> Recording: ...
    async def stop_recording(self, session_id: str) -> Recording:
        """Returns once the MP4 is complete and downloadable."""
        ...

    async def recording_file(self, recording_id: str) -> tuple[str, int]:
        """The finished recording a recording id or a session id names: its recording id and size in bytes."""
        ...

    async def read_recording(self, recording_id: str, offset: int, size: int) -> bytes:
        """Up to `size` bytes of that recording from `offset` (a download reads it in such pieces, so a cluster
        front holds one piece at a time, never the whole file)."""
        ...

    async def list_loras(self) -> LoraList:
        """The LoRA files a load's `loras` can name (a cluster: every worker's folder, and which workers have each)."""
        ...

    async def models_status(self, pipeline_id: str, vace: bool) -> ModelsStatus:
        """Whether the pipeline's weight files are present, and its download's progress; UnknownPipeline (404)."""
        ...

    async def missing_weights(self) -> dict[str, list[str]]:
        """Every pipeline's weight files (`repo/path`) a load would lack: on a cluster front, those some live worker
        lacks (its own disk holds no weights that matter)."""
        ...

    async def download_models(self, pipeline_id: str, vace: bool) -> tuple[ModelsStatus, bool]:
        """Starts fetching the pipeline's files in the background: its status, and whether a download started
        (false: one is running already, or there is nothing to fetch)."""
        ...


class LocalServing:
    """Today's server: the calls go to this process's pipeline manager, session manager and folders."""

    def __init__(
        self,
        pipelines: PipelineManager,
        sessions: SessionManager,
        recordings: RecordingStore,
        loras: LoraCatalog,
        models: HubDownloads,
    ) -> None:
        self.pipelines = pipelines
        self.sessions = sessions
        self.recordings = recordings
        self.loras = loras
        self.models = models
        self.max_sessions = sessions.max_sessions

    async def load(self, pipeline_id: str, params: LoadParams) -> str:
        return await self.pipelines.load(pipeline_id, params)

    async def status(self) -> PipelineStatus:
        return self.pipelines.status()

    async def unload(self) -> str:
        return await self.pipelines.unload()

    async def create_session(self, offer: Offer) -> Answer:
        return await self.sessions.create(offer)

    async def add_candidates(self, session_id: str, candidates: list[IceCandidate]) -> None:
        await self.sessions.add_candidates(session_id, candidates)

    async def close_session(self, session_id: str) -> None:
        await self.sessions.close(session_id)

    async def describe_sessions(self) -> list[dict[str, Any]]:
        return self.sessions.describe()

    async def session_frame(self, session_id: str, quality: int) -> bytes:
        from serve.webrtc.encoders import as_video_frame  # torch and PyAV: only where a frame is encoded
        from serve.webrtc.snapshot import encode_jpeg

        frame = self.sessions.get(session_id).output.last_frame
        if frame is None:
            raise NoFrameYet(f"session {session_id} has not sent a frame yet; try again once its stream runs")
        # A device frame's host copy may wait for the GPU: in the thread, with the encode.
        return await anyio.to_thread.run_sync(lambda: encode_jpeg(as_video_frame(frame), quality))

    async def session_metrics(self, session_id: str) -> dict[str, Any]:
        return self.sessions.get(session_id).metrics()

    async def gauges(self) -> dict[str, float]:
        totals = self.sessions.totals()
        return {
            "wanrt_sessions_active": len(self.sessions),
            "wanrt_pipeline_loaded": int(self.pipelines.status().status == "loaded"),
            "wanrt_frames_in_total": totals["frames_in"],
            "wanrt_frames_out_total": totals["frames_out"],
            "wanrt_frames_dropped_total": totals["frames_dropped"],
            "wanrt_recordings_active": self.recordings.active_count(),
        }

    async def list_recordings(self) -> RecordingList:
        store = self.recordings
        recordings = await anyio.to_thread.run_sync(store.list)
        total = await anyio.to_thread.run_sync(store.total_bytes)
        return RecordingList(
            recordings=recordings, directory=str(store.directory), total_bytes=total, max_bytes=store.settings.max_bytes
        )

    async def start_recording(self, session_id: str) -> Recording:
        return self.sessions.start_recording(session_id).describe()

    async def stop_recording(self, session_id: str) -> Recording:
        return (await self.sessions.stop_recording(session_id)).describe()

    async def recording_file(self, recording_id: str) -> tuple[str, int]:
        path = await anyio.to_thread.run_sync(self.recordings.resolve, recording_id)
        return path.stem, path.stat().st_size

    async def read_recording(self, recording_id: str, offset: int, size: int) -> bytes:
        return await anyio.to_thread.run_sync(_read, self.recordings, recording_id, offset, size)

    async def list_loras(self) -> LoraList:
        files = await anyio.to_thread.run_sync(self.loras.list)
        return LoraList(lora_files=[msgspec.convert(f, LoraFileInfo) for f in files])

    async def models_status(self, pipeline_id: str, vace: bool) -> ModelsStatus:
        # It stats every file and reads its record: a models folder on a network disk may take its time.
        return await anyio.to_thread.run_sync(self.models.status, _weights_of(pipeline_id, vace))

    async def missing_weights(self) -> dict[str, list[str]]:
        def missing() -> dict[str, list[str]]:  # a stat per file: off the loop
            models_dir = self.models.models_dir
            return {pid: [name_of(f) for f in spec.missing_files(models_dir)] for pid, spec in PIPELINES.items()}

        return await anyio.to_thread.run_sync(missing)

    async def download_models(self, pipeline_id: str, vace: bool) -> tuple[ModelsStatus, bool]:
        spec = _weights_of(pipeline_id, vace)
        started = self.models.start(spec)
        return await anyio.to_thread.run_sync(self.models.status, spec), started


def _weights_of(pipeline_id: str, vace: bool) -> PipelineSpec:
    """The pipeline's spec with the files a load needs: with `vace`, the VACE module's too."""
    spec = get_spec(pipeline_id)
    return spec.with_vace_files() if vace else spec


def _read(store: RecordingStore, recording_id: str, offset: int, size: int) -> bytes:
    with store.resolve(recording_id).open("rb") as file:
        file.seek(offset)
        return file.read(size)
