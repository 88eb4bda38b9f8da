"""One WebRTC session: its peer connection, input reader, output track, data channel and seat on the worker.

Everything a session owns is created in `start` and released in `close`, which is idempotent and safe to call from
any cause (client DELETE, connection failure, pipeline error, unload, shutdown). Log lines start with the session id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from aiortc import RTCPeerConnection, RTCSessionDescription, rtcsctptransport
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame
from av.video.reformatter import VideoReformatter

from serve.errors import (
    FrameConversionError,
    InvalidParameters,
    InvalidRequest,
    PipelineNotLoaded,
    RecordingConflict,
    WanrtError,
)
from serve.pipelines.base import Pipeline, PipelineStream
from serve.pipelines.frames import YuvChunk, YuvFrame
from serve.pipelines.spec import PipelineSpec
from serve.pipelines.worker import FrameStamp, PipelineWorker, StreamSlot
from serve.recording import Recorder, RecordingStore
from serve.schemas import IceCandidate, RuntimeParameters
from serve.settings import WebRTCSettings
from serve.webrtc.codecs import hook_sender, prefer_codec, sending_codec
from serve.webrtc.encoders import PROBE_TIMEOUT_S, make_encoder, nvenc_unavailable
from serve.webrtc.ice import parse_candidate, rtc_configuration
from serve.webrtc.offers import check_fingerprints, check_offer_sdp, offers_video_input
from serve.webrtc.planes import read_planes
from serve.webrtc.tracks import OutputTrack

log = logging.getLogger(__name__)

CHANNEL_LABEL = "parameters"
FLUSH_TIMEOUT_S = 0.5  # how long a closing session waits for its last data-channel message to leave
MAX_TRICKLED_CANDIDATES = 256  # per session, over all PATCHes
# Data-channel messages a session may send a second (and in one burst): far past a slider dragged at 60 events a
# second, whose updates merge at the next chunk anyway. A flood of thousands a second, each checked on the event
# loop and many answered with an error, starved the stream until ICE consent expired (found by fuzzing); past the
# budget a message is refused unread, and the client hears so at most once a second.
MESSAGES_PER_S = 300
# aiortc queues every message sent on a data channel in memory until the peer's SCTP acknowledges it, without bound. A
# client that reads nothing (a stalled tab, a hostile peer) while it is answered would grow that queue for as long as
# it stays connected. Past this backlog, stats and errors are not sent (stats are stale a second later anyway);
# `stream_stopped` always is. A client that reads keeps it near 0: a second of stats is about a kilobyte.
MAX_CHANNEL_BACKLOG_BYTES = 64 * 1024


def pipeline_device(pipeline: Pipeline) -> torch.device:
    return getattr(pipeline, "device", None) or torch.device("cpu")


def collate_yuv(frames: list[YuvFrame]) -> YuvChunk:
    return YuvChunk(tuple(frames))


def configure_data_channel(settings: WebRTCSettings) -> None:
    """The answer's `a=max-message-size` is what this server accepts, so a client never sends more.

    Like ICE's, aiortc's SCTP limits are module attributes, set once per process."""
    rtcsctptransport.LOCAL_MAX_MESSAGE_SIZE = settings.max_message_bytes


class PeerSession:
    def __init__(
        self,
        session_id: str,
        pipeline: Pipeline,
        worker: PipelineWorker,
        params: dict[str, Any],
        *,
        stream: PipelineStream,
        settings: WebRTCSettings,
        assets_dir: Path,
        recordings: RecordingStore,
        on_closed: Callable[[PeerSession], None],
    ) -> None:
        self.id = session_id
        self.created_at = time.time()
        self.pipeline = pipeline
        self.spec: PipelineSpec = pipeline.spec
        self._settings = settings
        self._assets_dir = assets_dir
        self._recordings = recordings
        self._on_closed = on_closed
        self.pc = RTCPeerConnection(rtc_configuration(settings))
        self.channel: Any = None
        self.output = OutputTrack(capacity_frames=2 * pipeline.chunk_frames, on_drained=self._wake_worker)
        self.output_codec: str | None = None
        self.input_format: str | None = None  # the latest decoded input frame's: "cuda" when NVDEC decoded it
        self._reformatter = None if settings.frame_path == "host" else VideoReformatter()
        # The frame path's device side: decoded input planes, and output frames for our CPU encoders, converted on
        # the pipeline's device (a GPU's; `--frame-path device` forces it on a CPU); else swscale on the host.
        self._convert_on_device = settings.frame_path == "device" or (
            settings.frame_path == "auto" and pipeline_device(pipeline).type != "cpu"
        )
        yuv_input = pipeline.frame_input == "yuv" and self._convert_on_device  # else swscale RGB (`_to_array`)
        self.slot = StreamSlot(
            worker,
            session_id,
            stream,
            pipeline.chunk_frames,
            params,
            convert=self._read_planes if yuv_input else self._to_array,
            collate=collate_yuv if yuv_input else np.stack,
            emit=self.output.push_threadsafe,
            output_has_room=self.output.has_room,
            on_error=self._on_pipeline_error,
            text_fps=pipeline.text_fps,
        )
        self._worker = worker
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.get_running_loop()
        self._closing: asyncio.Task[None] | None = None
        self._close_reason = ""
        self._mids: list[str] = []
        self._sends_video = True  # whether the offer sends a camera track (set by `start`)
        self._candidates_added = 0
        self.updates_received = 0
        self.updates_rejected = 0
        self.messages_dropped = 0
        self._message_budget, self._budget_at, self._throttle_said_at = float(MESSAGES_PER_S), time.monotonic(), 0.0
        self._stats_prev = (time.monotonic(), 0, 0)
        self.last_stats: dict[str, Any] = {}

    # -- setup ------------------------------------------------------------------------------------------------------

    async def start(self, sdp: str, sdp_type: str) -> RTCSessionDescription:
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        self._mids = check_offer_sdp(sdp)
        self._sends_video = offers_video_input(sdp)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=sdp_type))
        except Exception as exc:  # aiortc raises ValueError, KeyError, IndexError, AssertionError... on a bad SDP
            if self.closing:
                raise self._stopped_while_answering() from None
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else "a line it needs is missing or malformed"
            raise InvalidRequest(
                f"malformed SDP offer ({reason}); send the browser's pc.localDescription.sdp unchanged"
            ) from None
        if self.closing:  # an unload or another load stops every session, this one too while it is answered
            raise self._stopped_while_answering()
        check_fingerprints(sdp)
        for transceiver in pc.getTransceivers():
            if transceiver.kind != "video":  # a browser's microphone: answered inactive, so aiortc starts no receiver
                transceiver.direction = "inactive"  # (whose decoded frames would pile up in a queue nobody reads)
        pc.addTrack(self.output)  # fills the offered video transceiver: sendrecv with a camera, sendonly without
        device = pipeline_device(self.pipeline)
        if device.type == "cuda" and self._settings.frame_path != "host":  # once per GPU, a real encode
            with contextlib.suppress(TimeoutError):  # a wedged probe: this session encodes with libx264
                await asyncio.wait_for(asyncio.to_thread(nvenc_unavailable, device), PROBE_TIMEOUT_S + 1)
        self._choose_output_path()
        try:
            await pc.setLocalDescription(await pc.createAnswer())  # aiortc gathers its candidates here
        except Exception as exc:  # closed meanwhile (next check), or an offer aiortc took but cannot answer (a mid
            # outside its BUNDLE group)
            if not self.closing:
                raise InvalidRequest(
                    f"the offer cannot be answered ({type(exc).__name__}: {exc}); send the browser's "
                    "pc.localDescription.sdp unchanged"
                ) from None
        if self.closing:
            raise self._stopped_while_answering()
        self._worker.attach(self.slot)
        self._spawn(self._send_stats(), "stats")
        self._spawn(self._close_unless_connected(), "connect-timeout")
        log.info("session=%s started pipeline=%s", self.id, self.spec.id)
        return pc.localDescription

    def _stopped_while_answering(self) -> PipelineNotLoaded:
        return PipelineNotLoaded(
            f"the session was stopped while its offer was being answered ({self._close_reason}); wait for GET "
            "/api/v1/pipeline/status to say 'loaded', then send a new offer"
        )

    def _choose_output_path(self) -> None:
        """The codec: the offer's first, or H.264 where it is offered and preferred (`--codec-preference h264`). VP8 or
        H.264 (and the frame path not `host`): our encoder, its packets straight to aiortc's packetizer. Otherwise
        aiortc's own encoder, from frames."""
        transceiver = next(t for t in self.pc.getTransceivers() if t.sender.track is self.output)
        if self._settings.codec_preference == "h264":
            prefer_codec(transceiver, "video/H264")
        codec = sending_codec(transceiver)
        self.output_codec = codec
        encoder = None
        if self._settings.frame_path != "host" and codec is not None:
            bitrate = self._settings.start_bitrate_kbps * 1000
            encoder = make_encoder(codec, pipeline_device(self.pipeline), bitrate, self._settings.x264_preset,
                                   self._convert_on_device)  # fmt: skip
        if encoder is None:
            log.info("session=%s output codec=%s encoder=aiortc", self.id, codec)
            return
        self.output.use_encoder(encoder, hook_sender(transceiver, self.output.request_keyframe))
        # NVENC reads device memory, and the CPU encoders convert on the device before the copy: the pipeline's output
        # frames then stay there (no RGB download, no swscale).
        self.slot.stream.keep_output_on_device = encoder.reads_device_memory
        log.info("session=%s output codec=%s encoder=%s", self.id, codec, encoder.name)

    async def _close_unless_connected(self) -> None:
        """A peer that never completes ICE + DTLS (no usable candidate, a page that went away) frees its slot."""
        timeout_s = self._settings.connect_timeout_s
        await asyncio.sleep(timeout_s)
        if self.pc.connectionState != "connected":
            self.close_soon(f"the peer did not connect within {timeout_s:g} s (no usable ICE candidate?)")

    async def add_candidates(self, candidates: list[IceCandidate]) -> None:
        self._candidates_added += len(candidates)
        if self._candidates_added > MAX_TRICKLED_CANDIDATES:
            raise InvalidRequest(f"a session takes at most {MAX_TRICKLED_CANDIDATES} trickled ICE candidates")
        for candidate in candidates:
            parsed = parse_candidate(candidate)
            if parsed is None:
                continue
            self._check_media_section(candidate)
            try:
                await self.pc.addIceCandidate(parsed)
            except Exception as exc:  # aiortc parses and pairs it here; any failure means a candidate it cannot use
                raise InvalidRequest(f"ICE candidate not accepted: {type(exc).__name__}: {exc}") from None

    def _check_media_section(self, candidate: IceCandidate) -> None:
        # aiortc silently drops a candidate for a section it does not have; the client should hear it went nowhere.
        if candidate.sdpMid is not None:
            if candidate.sdpMid not in self._mids:
                raise InvalidRequest(
                    f"ICE candidate for sdpMid {candidate.sdpMid[:20]!r}, which the offer does not have "
                    f"(its mids: {', '.join(self._mids)})"
                )
        elif candidate.sdpMLineIndex is None or not 0 <= candidate.sdpMLineIndex < len(self._mids):
            raise InvalidRequest(
                f"ICE candidate needs sdpMid (one of {', '.join(self._mids)}) or an sdpMLineIndex below "
                f"{len(self._mids)}"
            )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{self.id[:8]}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- media ------------------------------------------------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self._spawn(self._read(track), "reader")

    async def _read(self, track: MediaStreamTrack) -> None:
        """Always drains the receiver, so aiortc's unbounded decode queue stays empty; the slot keeps the newest."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.slot.push_input(frame, FrameStamp(frame.pts, frame.time_base, time.monotonic()))

    def _read_planes(self, frame: VideoFrame) -> YuvFrame:
        self.input_format = frame.format.name
        return read_planes(frame)

    def _to_array(self, frame: VideoFrame) -> np.ndarray:
        self.input_format = frame.format.name
        # Runs on the worker thread: one swscale pass converts to RGB and resizes to the loaded resolution. The new
        # frame paths keep one single-threaded swscale context per session (a frame's own builds a context and a
        # thread pool per call); `--frame-path host` keeps the old per-frame one, for comparison.
        width, height = self.pipeline.width, self.pipeline.height
        try:
            if self._reformatter is None:
                return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
            return self._reformatter.reformat(frame, width, height, "rgb24", threads=1).to_ndarray()
        except Exception as exc:  # av raises ValueError, OSError or its own errors
            raise FrameConversionError(
                f"could not convert a {frame.width}×{frame.height} {frame.format.name} input frame to {width}×{height} "
                f"RGB ({type(exc).__name__}); the stream ends. Send a common camera format, or reload the pipeline"
            ) from exc

    def _wake_worker(self) -> None:
        self.slot.wake()

    # -- recording --------------------------------------------------------------------------------------------------

    def start_recording(self) -> Recorder:
        """Every frame sent from now on is also offered to the recorder (409 if one is running, or the session is
        ending: no frame would reach it, and nothing would stop it once the session is gone)."""
        if self.closing:
            raise RecordingConflict(f"session {self.id} is ending ({self._close_reason}); it cannot start a recording")
        recorder = self._recordings.start(self.id)
        self.output.tap = recorder.offer
        return recorder

    async def stop_recording(self) -> Recorder:
        """Returns once the file is complete (409 if not recording)."""
        recorder = self._recordings.stop(self.id)
        self.output.tap = None
        await asyncio.to_thread(recorder.join)
        return recorder

    # -- data channel -----------------------------------------------------------------------------------------------

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != CHANNEL_LABEL:
            log.info("session=%s ignoring data channel label=%r", self.id, channel.label)
            return
        self.channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._say_if_no_input(self.slot.params)
        else:
            channel.on("open", lambda: self._say_if_no_input(self.slot.params))

    def _say_if_no_input(self, update: dict[str, Any]) -> None:
        """Video mode without a camera track makes nothing, and the peer would wait in silence: say why, once per
        switch to it."""
        if not self._sends_video and update.get("input_mode", "video") == "video":
            self.send({"type": "error", "error": "NoInputVideo", "message": (
                "input_mode is 'video' but this connection sends no video (its video transceiver is receive-only): "
                "nothing is generated. Send {\"input_mode\": \"text\"} to generate from the prompt, or reconnect "
                "with a camera track"
            )})  # fmt: skip

    def _on_message(self, message: str | bytes) -> None:
        now = time.monotonic()
        self._message_budget = min(MESSAGES_PER_S, self._message_budget + (now - self._budget_at) * MESSAGES_PER_S)
        self._budget_at = now
        if self._message_budget < 1:
            if now - self._throttle_said_at < 1:
                self.updates_rejected += 1
                return
            self._throttle_said_at = now
            self._reject("TooManyMessages", f"more than {MESSAGES_PER_S} messages a second: this one and the "
                         "others past that rate are refused unread; send the latest values again")  # fmt: skip
            return
        self._message_budget -= 1
        try:
            update = self.validate_message(message)
        except (InvalidParameters, InvalidRequest) as exc:
            self._reject(type(exc).__name__, str(exc))
            return
        except Exception:  # a bug in a check must cost this message, never the session (aiortc would drop it)
            log.exception("session=%s checking a data-channel message failed", self.id)
            self._reject("InternalError", "the server could not check this message (it logged why); it was ignored")
            return
        self.updates_received += 1
        self.slot.update_params(update)
        if "input_mode" in update:
            self._say_if_no_input(update)

    def _reject(self, error: str, message: str) -> None:
        self.updates_rejected += 1
        self.send({"type": "error", "error": error, "message": message})

    def validate_message(self, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, bytes):
            raise InvalidRequest("binary messages are not accepted on 'parameters'; send a JSON object as text")
        if len(message) > self._settings.max_message_bytes:
            raise InvalidRequest(
                f"message of {len(message)} bytes is over the {self._settings.max_message_bytes}-byte limit"
            )
        try:
            params = msgspec.json.decode(message, type=RuntimeParameters)
        except msgspec.ValidationError as exc:
            raise InvalidParameters(f"invalid parameters: {exc}") from None
        except msgspec.DecodeError as exc:
            reason = "it is empty" if not message.strip() else str(exc)
            raise InvalidRequest(
                f'not a JSON object ({reason}); send one as text, e.g. {{"noise_scale": 0.5}}'
            ) from None
        update = self.spec.validate_update(params, self._assets_dir)
        self.pipeline.check_update(update)
        return update

    def send(self, message: dict[str, Any]) -> bool:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return False
        if message["type"] != "stream_stopped" and channel.bufferedAmount > MAX_CHANNEL_BACKLOG_BYTES:
            self.messages_dropped += 1
            if self.messages_dropped == 1:
                log.warning("session=%s reads nothing of its data channel (%d bytes queued): its stats and errors "
                            "are dropped until it does", self.id, channel.bufferedAmount)  # fmt: skip
            return False
        try:
            channel.send(json.dumps(message))
        except ValueError:  # over what the peer takes (checked at the offer); never out of a stats task or a reply
            self.messages_dropped += 1
            return False
        return True

    async def _send_stats(self) -> None:
        while True:
            await asyncio.sleep(self._settings.stats_interval_s)
            self.last_stats = self.stats()
            self.send({"type": "stats", **self.last_stats})

    def stats(self) -> dict[str, Any]:
        """Rates since the previous call (the stats loop's interval) and the counters; sent as the `stats` message."""
        now = time.monotonic()
        prev_t, prev_in, prev_out = self._stats_prev
        frames_in, frames_out = self.slot.frames_in, self.output.frames_out
        elapsed = max(now - prev_t, 1e-6)
        self._stats_prev = (now, frames_in, frames_out)
        latencies = sorted(self.output.latencies_ms)
        return {
            **self.identity(),
            "fps_in": round((frames_in - prev_in) / elapsed, 2),
            "fps_out": round((frames_out - prev_out) / elapsed, 2),
            "latency_ms": round(latencies[len(latencies) // 2], 1) if latencies else None,
            **self.counters(),
            **({"pipeline_parallel": placement} if (placement := self.pipeline.placement()) is not None else {}),
        }

    def identity(self) -> dict[str, Any]:
        """What the session runs: known from its start, not only from its first stats message."""
        return {
            "pipeline_id": self.spec.id,
            "backend": self.pipeline.backend,
            "backend_reason": self.pipeline.backend_reason,
            "backends": self.pipeline.backends,
        }

    def counters(self) -> dict[str, Any]:
        """Totals read now (the rates need an interval, so only the stats loop computes them)."""
        recorder = self._recordings.active(self.id)
        return {
            "frames_in": self.slot.frames_in,
            "frames_out": self.output.frames_out,
            "frames_dropped": self.slot.frames_dropped + self.output.frames_dropped,
            "video": self.video_counters(),
            "chunk_ms": round(self.slot.chunk_ms, 2),
            "chunks": self.slot.chunks,
            "messages_dropped": self.messages_dropped,
            "channel_backlog_bytes": self.channel.bufferedAmount if self.channel is not None else 0,
            "recording": None
            if recorder is None
            else {"id": recorder.id, "frames": recorder.frames, "frames_dropped": recorder.frames_dropped},
        }

    def video_counters(self) -> dict[str, Any]:
        """The outgoing video: its codec, who encodes it (`aiortc` for its own encoders) with which preset, where its
        frames were converted to YUV (`swscale` on the host, `device:cuda` on the GPU), IDRs, PLI/FIRs and frames it
        failed on; and the incoming video's decoded format (`cuda`: NVDEC's frames, in device memory)."""
        encoder = self.output.encoder
        return {
            "input_format": self.input_format,
            "codec": self.output_codec,
            "encoder": "aiortc" if encoder is None else encoder.name,
            "output_conversion": "aiortc" if encoder is None else self.output.output_conversion,
            "preset": None if encoder is None else encoder.preset,
            "keyframes": None if encoder is None else encoder.keyframes,
            "keyframes_requested": self.output.keyframes_requested,
            "encode_errors": self.output.encode_errors,
            "bitrate_bps": None if encoder is None else encoder.target_bitrate,
        }

    def metrics(self) -> dict[str, Any]:
        """The latest `stats` message's rates with the counters read now (GET /api/v1/sessions/{id}/metrics)."""
        return {
            "sessionId": self.id,
            "connection_state": self.pc.connectionState,
            "created_at": self.created_at,
            "stats_interval_s": self._settings.stats_interval_s,
            **self.identity(),  # also in the first stats interval, before `last_stats` holds anything
            **self.last_stats,
            **self.counters(),
        }

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("session=%s connection=%s", self.id, state)
        if state in ("failed", "closed"):
            self.close_soon(None)

    def _on_pipeline_error(self, exc: BaseException) -> None:
        # Called on the worker thread, which logged the traceback. The client hears our own messages in full, and of
        # anything else only its kind: exception texts may name the server's files.
        if isinstance(exc, WanrtError):
            reason = str(exc)
        else:
            reason = (
                f"pipeline error ({type(exc).__name__}) while generating this stream; the server logged the details. "
                "Reconnect to start a new stream"
            )
        self._loop.call_soon_threadsafe(self.close_soon, reason)

    @property
    def closing(self) -> bool:
        return self._closing is not None

    def close_soon(self, reason: str | None, cause: str = "peer") -> None:
        """`reason` goes to the client (`stream_stopped`); the log says it, or `cause` without one."""
        if self._closing is None:
            self._close_reason = reason or cause
            self._closing = asyncio.create_task(self._close(reason), name=f"{self.id[:8]}-close")

    async def close(self, reason: str | None = None, cause: str = "peer") -> None:
        """Idempotent. With a reason, the client is told with `stream_stopped` before the connection closes."""
        self.close_soon(reason, cause)
        assert self._closing is not None
        await asyncio.shield(self._closing)

    async def _close(self, reason: str | None) -> None:
        self._worker.detach(self.slot)
        try:
            if reason is not None and self.send({"type": "stream_stopped", "error_message": reason}):
                await self._flush_channel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.output.stop()
            if self._recordings.active(self.id) is not None:
                # The recording outlives the session: ending it is a stop. It may have just stopped itself (at the
                # folder's cap), which is no reason to leave the session half closed.
                with contextlib.suppress(RecordingConflict):
                    await self.stop_recording()
            self._recordings.end_session(self.id)
        finally:  # whatever failed above, the connection closes and the seat is given back
            with contextlib.suppress(Exception):  # closing a half-negotiated connection may raise inside aiortc
                await self.pc.close()
            log.info("session=%s closed reason=%s", self.id, self._close_reason)
            self._on_closed(self)

    async def _flush_channel(self) -> None:
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self.channel.bufferedAmount > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # bufferedAmount counts what aiortc queued, not what SCTP has put on the wire

    def describe(self) -> dict[str, Any]:
        return {
            "sessionId": self.id,
            "pipeline_id": self.spec.id,
            "connection_state": self.pc.connectionState,
            "created_at": self.created_at,
            "parameters": self.slot.params,
            "updates_received": self.updates_received,
            "updates_rejected": self.updates_rejected,
            "stats": self.last_stats,
        }
