"""Recording: a session's output frames, as they were sent, encoded as H.264 in MP4 on the recorder's own thread.

The frame path only offers frames (`Recorder.offer`): a non-blocking put into a small bounded queue. A frame that
finds the queue full is dropped from the recording and counted, never from the stream. The encoder thread writes a
fragmented MP4 as it goes (a fragment per keyframe), so a crash leaves a playable file up to the last fragment.

Files live in one folder and nowhere else: names are made here (`<sessionId>-<n>.mp4`), ids from requests must match
that pattern before they become paths, and the folder's total size is capped, the oldest finished recordings removed
first. A recording outlives its session: ending the session stops it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from av import VideoFrame
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter

from serve.cluster.names import WORKER_NAME
from serve.errors import InvalidRequest, RecordingConflict, UnknownRecording
from serve.schemas import Recording
from serve.settings import RecordingSettings

log = logging.getLogger(__name__)

SESSION_ID = re.compile(rf"(?:{WORKER_NAME}\.)?[0-9a-f]{{32}}")  # a uuid, prefixed by its worker on a cluster
RECORDING_ID = re.compile(rf"(?P<session>{SESSION_ID.pattern})-(?P<n>[0-9]{{1,6}})")
TIME_BASE = Fraction(1, 90000)  # the RTP video clock the output frames carry
FALLBACK_FRAME_S = Fraction(1, 30)  # frame spacing assumed after a timeline jump, until two frames set it again
MAX_GAP_S = 2  # a step between output timestamps beyond this (or backwards) means the timeline jumped
KEYFRAME_INTERVAL_FRAMES = 30  # one fragment per keyframe: what a crash can lose
CAP_CHECK_INTERVAL_S = 1.0
GET_TIMEOUT_S = 0.1  # how often an idle encoder thread looks at its stop flag
X264_OPTIONS = {"preset": "veryfast", "tune": "zerolatency", "g": str(KEYFRAME_INTERVAL_FRAMES)}
MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}


class Recorder:
    """One recording. `offer` runs on the event loop; everything else that touches the file runs on its thread."""

    def __init__(self, recording_id: str, session_id: str, path: Path, store: RecordingStore) -> None:
        self.id = recording_id
        self.session_id = session_id
        self.path = path
        self._store = store
        self._queue: queue.Queue[tuple[VideoFrame, int, Fraction]] = queue.Queue(maxsize=store.settings.queue_frames)
        self._stop = threading.Event()
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.state: str = "recording"
        self.error: str | None = None
        self.frames = 0  # written (encoder thread)
        self.frames_dropped = 0  # left out because the queue was full (event loop)
        self.width: int | None = None
        self.height: int | None = None
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._last_in: Fraction | None = None  # media time (s) of the last frame taken
        self._last_out = Fraction(0)  # its time in the recording (s)
        self._step = FALLBACK_FRAME_S
        self._last_pts = -1
        # Its own converter: `frame.reformat` would use one cached on the frame, which the WebRTC encoder's thread is
        # using at the same time (two threads in one swscale context hang).
        self._reformatter = VideoReformatter()
        self._thread = threading.Thread(target=self._run, name=f"recorder-{recording_id[:8]}", daemon=True)
        self._thread.start()

    # -- event-loop side --------------------------------------------------------------------------------------------

    def offer(self, frame: Any) -> None:
        """Never blocks. The timestamp is read now: the sender may reuse the frame object once this returns."""
        if self._stop.is_set():
            return
        try:
            self._queue.put_nowait((frame, frame.pts, frame.time_base))
        except queue.Full:
            self.frames_dropped += 1

    def stop(self) -> None:
        """Asks the thread to write what is queued and close the file; `join` waits for it. Idempotent."""
        self._stop.set()

    def join(self, timeout_s: float = 10.0) -> None:
        self._thread.join(timeout_s)

    @property
    def active(self) -> bool:
        return self.state == "recording"

    def describe(self) -> Recording:
        duration = float(self._last_out) if self.frames else 0.0
        return Recording(
            id=self.id,
            sessionId=self.session_id,
            state=self.state,  # type: ignore[arg-type]
            url=f"/api/v1/recordings/{self.id}",
            size_bytes=_size(self.path),
            started_at=self.started_at,
            ended_at=self.ended_at,
            frames=self.frames,
            frames_dropped=self.frames_dropped,
            duration_s=round(duration, 3),
            width=self.width,
            height=self.height,
            error=self.error,
        )

    # -- encoder thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        next_cap_check = 0.0
        try:
            while True:
                try:
                    frame, pts, time_base = self._queue.get(timeout=GET_TIMEOUT_S)
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                self._write(frame, pts, time_base)
                if time.monotonic() >= next_cap_check:
                    next_cap_check = time.monotonic() + CAP_CHECK_INTERVAL_S
                    if not self._store.enforce_cap(keep=self):
                        self.error = f"stopped: the recordings folder reached its cap of {self._store.cap_text}"
                        log.warning("recording=%s %s", self.id, self.error)
                        break
            self._finish()
            self.state = "done"
        except Exception as exc:  # a broken recording ends itself; the stream is not affected
            log.exception("recording=%s failed", self.id)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
        finally:
            self._stop.set()
            if self._container is not None:
                try:
                    self._container.close()
                except Exception:  # already reported above, or nothing left to write
                    log.debug("recording=%s close failed", self.id, exc_info=True)
            # The store keeps a finished recorder (its description) until the cap removes its file: it must not keep
            # libx264 (its threads and buffers: 4 threads and 25 MB at 1024², found by fuzzing), swscale's context,
            # or frames left in the queue.
            self._container = self._stream = self._reformatter = None  # type: ignore[assignment]
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
            self.ended_at = time.time()
            # The folder is checked once a second while recording; the last second's growth is checked here.
            self._store.enforce_cap(keep=self)
            log.info(
                "recording=%s ended state=%s frames=%d dropped=%d bytes=%d",
                self.id, self.state, self.frames, self.frames_dropped, _size(self.path),
            )  # fmt: skip

    def _open(self, width: int, height: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # yuv420p needs even sizes: an odd row or column is cut.
        self.width, self.height = max(width & ~1, 2), max(height & ~1, 2)
        self._container = av.open(str(self.path), "w", format="mp4", options=MP4_OPTIONS)
        stream = self._container.add_stream("libx264")
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        stream.time_base = TIME_BASE
        stream.codec_context.time_base = TIME_BASE
        stream.options = X264_OPTIONS
        self._stream = stream

    def _write(self, frame: Any, pts: int, time_base: Fraction) -> None:
        """`frame`: a VideoFrame, or a frame the output track holds on (or on its way from) the device, made a host
        one here, in this thread, since that may wait for the GPU (serve/webrtc/encoders.py `as_video_frame`)."""
        shared = isinstance(frame, VideoFrame)  # the track's own object; a device frame's host copy is ours
        if not shared:
            frame = frame.to_video_frame()
        if self._stream is None:
            self._open(frame.width, frame.height)
        assert self._stream is not None and self._container is not None
        media_s = Fraction(pts) * time_base
        if self._last_in is not None:
            step = media_s - self._last_in
            if 0 < step <= MAX_GAP_S:
                self._step = step
            self._last_out += self._step  # a jump (new input, mode switch) continues at the last frame spacing
        self._last_in = media_s
        out_pts = max(round(self._last_out / TIME_BASE), self._last_pts + 1)
        self._last_pts = out_pts
        video = self._reformatter.reformat(frame, width=self.width, height=self.height, format="yuv420p")
        if video is frame and shared:
            # swscale hands back the frame itself when there is nothing to convert (our VP8 encoder's yuv420p at the
            # recording's size), and the stream's encoder thread may be encoding that very object: it keeps its own
            # timestamp and picture type, and the recording writes a copy.
            video = VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
        video.pts, video.time_base = out_pts, TIME_BASE
        video.pict_type = PictureType.NONE  # the frame's props are copied, and the WebRTC encoder may have set an I
        for packet in self._stream.encode(video):
            self._container.mux(packet)
        self.frames += 1

    def _finish(self) -> None:
        if self._stream is not None and self._container is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)


class RecordingStore:
    """The recordings folder: starts and stops recorders, lists and resolves files, keeps the folder under its cap."""

    def __init__(self, settings: RecordingSettings) -> None:
        self.settings = settings
        self.directory = settings.directory.resolve()
        self._lock = threading.Lock()  # the file set: encoder threads enforce the cap while requests list it
        self._recorders: dict[str, Recorder] = {}  # by recording id, this process's recordings
        self._active: dict[str, Recorder] = {}  # by session id
        self._numbers: dict[str, int] = {}  # recordings made per session id

    @property
    def cap_text(self) -> str:
        return f"{self.settings.max_bytes / 2**20:g} MB (--recordings-max-mb)"

    # -- recorders --------------------------------------------------------------------------------------------------

    def start(self, session_id: str) -> Recorder:
        active = self._active.get(session_id)
        if active is not None and active.active:
            raise RecordingConflict(f"session {session_id} is already recording ({active.id}); stop it first")
        number = self._numbers[session_id] = self._numbers.get(session_id, 0) + 1
        recording_id = f"{session_id}-{number}"  # session ids are fresh uuids, so ids never repeat across restarts
        recorder = Recorder(recording_id, session_id, self.directory / f"{recording_id}.mp4", self)
        with self._lock:
            self._recorders[recording_id] = recorder
        self._active[session_id] = recorder
        log.info("recording=%s started session=%s", recording_id, session_id)
        return recorder

    def active(self, session_id: str) -> Recorder | None:
        recorder = self._active.get(session_id)
        return recorder if recorder is not None and recorder.active else None

    def active_count(self) -> int:
        return sum(r.active for r in self._active.values())

    def stop(self, session_id: str) -> Recorder:
        """Asks the session's recorder to finish (join it off the event loop); 409 when it is not recording."""
        recorder = self._active.pop(session_id, None)
        if recorder is None or not recorder.active:
            ended = f" (it stopped: {recorder.error})" if recorder is not None and recorder.error else ""
            raise RecordingConflict(f"session {session_id} is not recording{ended}; start it first")
        recorder.stop()
        return recorder

    def end_session(self, session_id: str) -> None:
        """The session closed: forget its recorder (stopped by `stop`, or one that stopped itself, at the folder's
        cap or on an error, which nothing else would remove)."""
        self._active.pop(session_id, None)

    def has_recordings(self, session_id: str) -> bool:
        """Whether this process recorded that session (start/stop need no disk access on the event loop)."""
        return session_id in self._numbers

    def close(self) -> None:
        """Stops every recorder and waits for their files to be closed (blocking: call it off the event loop)."""
        recorders = list(self._active.values())
        self._active.clear()
        for recorder in recorders:
            recorder.stop()
        for recorder in recorders:
            recorder.join()

    # -- files ------------------------------------------------------------------------------------------------------

    def list(self) -> list[Recording]:
        """Newest first: this process's recordings with their counters, and older files found in the folder."""
        with self._lock:
            ids = self._file_ids()
            for gone in self._recorders.keys() - set(ids):  # removed from the folder (or never written): forgotten
                if not self._recorders[gone].active:
                    del self._recorders[gone]
            recordings = []
            for recording_id in ids:
                recorder = self._recorders.get(recording_id)
                if recorder is not None:
                    recordings.append(recorder.describe())
                    continue
                path = self.directory / f"{recording_id}.mp4"
                stat = path.stat()
                recordings.append(
                    Recording(
                        id=recording_id,
                        sessionId=recording_id.rsplit("-", 1)[0],
                        state="done",
                        url=f"/api/v1/recordings/{recording_id}",
                        size_bytes=stat.st_size,
                        started_at=stat.st_mtime,
                        ended_at=stat.st_mtime,
                    )
                )
        return sorted(recordings, key=lambda r: r.started_at, reverse=True)

    def total_bytes(self) -> int:
        return sum(_size(self.directory / f"{i}.mp4") for i in self._file_ids())

    def resolve(self, id_: str) -> Path:
        """A finished recording's file from its id, or the newest recording of a session from the session id."""
        session_id = session_of(id_)
        if session_id == id_:  # its newest recording: on disk, or still being written (no file before its frame)
            with self._lock:
                ids = {*self._file_ids(), *(r.id for r in self._recorders.values() if r.session_id == id_)}
            matches = [m for m in map(RECORDING_ID.fullmatch, ids) if m and m["session"] == id_]
            numbered = [(int(m["n"]), m[0]) for m in matches]
            if not numbered:
                raise UnknownRecording(f"session {id_!r} has no recordings (GET /api/v1/recordings lists them)")
            recording_id = max(numbered)[1]
        else:
            recording_id = id_
        recorder = self._recorders.get(recording_id)
        if recorder is not None and recorder.active:
            raise RecordingConflict(f"recording {recording_id} is still being written; stop it first")
        if recorder is not None and recorder.frames == 0:
            raise UnknownRecording(f"recording {recording_id} holds no frames: the session sent none while it ran")
        path = (self.directory / f"{recording_id}.mp4").resolve()
        if path.parent != self.directory or not path.is_file():
            raise UnknownRecording(f"no recording {recording_id!r}; it was removed or never existed")
        return path

    def enforce_cap(self, keep: Recorder | None = None) -> bool:
        """Removes the oldest finished recordings until the folder fits its cap; False if active ones exceed it."""
        with self._lock:
            files = []
            for recording_id in self._file_ids():
                path = self.directory / f"{recording_id}.mp4"
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                files.append((stat.st_mtime, recording_id, path, stat.st_size))
            total = sum(size for *_, size in files)
            for _, recording_id, path, size in sorted(files):
                if total <= self.settings.max_bytes:
                    break
                recorder = self._recorders.get(recording_id)
                if recorder is keep or (recorder is not None and recorder.active):
                    continue
                path.unlink(missing_ok=True)
                self._recorders.pop(recording_id, None)
                total -= size
                log.info("recording=%s removed: the folder is over its cap of %s", recording_id, self.cap_text)
            return total <= self.settings.max_bytes

    def _file_ids(self) -> list[str]:
        """Ids of the recordings in the folder: regular files named by RECORDING_ID only (links and others ignored)."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        return [
            path.stem
            for path in entries
            if path.suffix == ".mp4" and RECORDING_ID.fullmatch(path.stem) and path.is_file() and not path.is_symlink()
        ]


def session_of(id_: str) -> str:
    """The session a recording id (`<sessionId>-<n>`) or a session id names; InvalidRequest for anything else."""
    if match := RECORDING_ID.fullmatch(id_):
        return match["session"]
    if SESSION_ID.fullmatch(id_):
        return id_
    raise InvalidRequest(
        f"{id_[:80]!r} is not a recording id (<sessionId>-<n>) or a session id (32 hex digits, after its worker's "
        "name and a dot on a cluster)"
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
