"""The session manager: creates sessions from offers, finds them by id, and closes them all on unload or shutdown."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import msgspec

from serve.assets import echo
from serve.errors import CapacityExceeded, InvalidRequest, PipelineNotLoaded, RecordingConflict, UnknownSession
from serve.pipelines.manager import PipelineManager
from serve.recording import Recorder, RecordingStore
from serve.schemas import Answer, IceCandidate, Offer
from serve.settings import WebRTCSettings
from serve.webrtc.session import PeerSession

log = logging.getLogger(__name__)


class SessionManager:
    def __init__(
        self,
        pipelines: PipelineManager,
        settings: WebRTCSettings,
        assets_dir: Path,
        recordings: RecordingStore,
        *,
        session_prefix: str = "",
    ) -> None:
        self._pipelines = pipelines
        # A cluster worker's session ids start with its actor's name ("<actor>.<uuid>"), so the cluster front finds
        # the owner of a PATCH or DELETE from the id alone (serve/cluster/names.py).
        self._session_prefix = session_prefix
        self.recordings = recordings
        self._settings = settings
        self._assets_dir = assets_dir
        self._sessions: dict[str, PeerSession] = {}
        # Offers being answered: they count against the limit, and an unload (or another load) stops them too.
        self._starting: dict[str, PeerSession] = {}
        self._opening = 0  # offers whose stream is being allocated (on a thread): they count against the limit too
        self._closed_totals = {"frames_in": 0, "frames_out": 0, "frames_dropped": 0}
        pipelines.on_unload(self.stop_all)

    @property
    def max_sessions(self) -> int:
        return self._settings.max_sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def live(self) -> int:
        """Sessions that hold a slot: connected, or still inside their connect timeout; not the ones closing."""
        return sum(not session.closing for session in self._sessions.values())

    async def create(self, offer: Offer) -> Answer:
        if offer.type != "offer":
            raise InvalidRequest(f"expected an SDP of type 'offer', got {offer.type!r}")
        if self.live() + len(self._starting) + self._opening >= self._settings.max_sessions:
            raise CapacityExceeded(
                f"the server is at its limit of {self._settings.max_sessions} concurrent sessions; "
                "close one (DELETE /api/v1/webrtc/offer/{sessionId}) or try again later"
            )
        pipeline, worker, load_params = self._pipelines.require_loaded()
        params = pipeline.spec.session_params(load_params)
        record = False
        if offer.initialParameters is not None:
            record = offer.initialParameters.recording is True
            runtime = msgspec.structs.replace(offer.initialParameters, recording=msgspec.UNSET)
            update = pipeline.spec.validate_update(runtime, self._assets_dir)
            pipeline.check_update(update)
            params.update(update)
        # The stream allocates its KV cache and state, gigabytes at real size on a CPU: on a thread, not the loop.
        self._opening += 1
        try:
            stream = await asyncio.to_thread(pipeline.open_stream, seed=int(load_params.get("seed", 42)))
        finally:
            self._opening -= 1
        if self._pipelines.pipeline is not pipeline:  # unloaded or replaced meanwhile: its sessions were stopped
            await asyncio.to_thread(stream.release)
            raise PipelineNotLoaded(
                "the pipeline was unloaded or replaced while this offer's stream was being made; wait for GET "
                "/api/v1/pipeline/status to say 'loaded', then send a new offer"
            )
        session = PeerSession(
            self._session_prefix + uuid.uuid4().hex,
            pipeline,
            worker,
            params,
            stream=stream,
            settings=self._settings,
            assets_dir=self._assets_dir,
            recordings=self.recordings,
            on_closed=self._forget,
        )
        self._starting[session.id] = session
        try:
            answer = await session.start(offer.sdp, offer.type)
        except BaseException as exc:  # the client gets the error as the response; the log says why it closed
            await session.close(f"offer not answered: {str(exc) or type(exc).__name__}")
            raise
        finally:
            del self._starting[session.id]
        self._sessions[session.id] = session
        if record:
            session.start_recording()
        return Answer(sdp=answer.sdp, type=answer.type, sessionId=session.id)

    def get(self, session_id: str) -> PeerSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSession(f"no session {echo(session_id)}; it ended or never existed") from None

    async def add_candidates(self, session_id: str, candidates: list[IceCandidate]) -> None:
        await self.get(session_id).add_candidates(candidates)

    async def close(self, session_id: str) -> None:
        await self.get(session_id).close(cause="the client's DELETE")

    def start_recording(self, session_id: str) -> Recorder:
        return self.get(session_id).start_recording()

    async def stop_recording(self, session_id: str) -> Recorder:
        session = self._sessions.get(session_id)
        if session is None:
            if self.recordings.has_recordings(session_id):
                raise RecordingConflict(
                    f"session {session_id} is not recording: it ended, and that stopped its recording"
                )
            self.get(session_id)  # raises UnknownSession
        assert session is not None
        return await session.stop_recording()

    async def stop_all(self, reason: str) -> None:
        sessions = [*self._sessions.values(), *self._starting.values()]
        await asyncio.gather(*(s.close(reason) for s in sessions), return_exceptions=True)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self._sessions.values()]

    def totals(self) -> dict[str, int]:
        """Frame counters since start, closed sessions included."""
        totals = dict(self._closed_totals)
        for session in self._sessions.values():
            for name, value in _counters(session).items():
                totals[name] += value
        return totals

    def _forget(self, session: PeerSession) -> None:
        if self._sessions.pop(session.id, None) is not None:
            for name, value in _counters(session).items():
                self._closed_totals[name] += value


def _counters(session: PeerSession) -> dict[str, int]:
    return {
        "frames_in": session.slot.frames_in,
        "frames_out": session.output.frames_out,
        "frames_dropped": session.slot.frames_dropped + session.output.frames_dropped,
    }
