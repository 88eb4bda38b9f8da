"""One error hierarchy for the whole server; app.py turns every one of them into JSON in a single handler.

Each message says what went wrong and what to do about it, because it is what an API user reads.
"""

from __future__ import annotations

from typing import ClassVar


class WanrtError(Exception):
    status_code = 500
    headers: ClassVar[dict[str, str]] = {}


class InvalidRequest(WanrtError):
    """The request is malformed (bad SDP, wrong body shape)."""

    status_code = 400


class InvalidParameters(WanrtError):
    """Parameters that parse but are not valid for the pipeline (unknown field, out of range, wrong order)."""

    status_code = 422


class UnknownPipeline(WanrtError):
    status_code = 404


class PipelineUnavailable(WanrtError):
    """A registered pipeline whose implementation is not part of this build."""

    status_code = 501


class PipelineNotLoaded(WanrtError):
    # Scope answers an offer without a loaded pipeline with 400 "Pipeline not loaded"; clients depend on it.
    status_code = 400


class PipelineBusy(WanrtError):
    """A load is in progress; the caller should wait for it or unload first."""

    status_code = 409


class RandomWeightsNotAllowed(WanrtError):
    status_code = 400


class UnknownSession(WanrtError):
    status_code = 404


class SessionGone(WanrtError):
    """A cluster session whose worker died: its stream ended with the worker, and nothing of it can be reached."""

    status_code = 410


class WorkerUnavailable(WanrtError):
    """A cluster worker did not answer in time (busy or cut off); it gets no new sessions until it answers again."""

    status_code = 503


class UnknownAsset(WanrtError):
    status_code = 404


class UnsupportedMedia(WanrtError):
    status_code = 415


class CapacityExceeded(WanrtError):
    status_code = 503


class PipelineLoadError(WanrtError):
    """Loading failed (missing or corrupt weights, out of memory); reported through the status endpoint."""

    status_code = 500


class StreamOutOfMemory(WanrtError):
    """A stream's chunk ran out of GPU memory: the stream is stopped (`stream_stopped` carries this message) and its
    buffers are freed; the loaded pipeline and the other sessions go on."""


class PipelineWorkerStopped(WanrtError):
    """The thread that runs every stream's chunks stopped on an error outside a chunk: its streams are stopped
    (`stream_stopped` carries this message) and the pipeline's status turns to `error`; a new load replaces it."""


class StageFailed(WanrtError):
    """A pipeline-parallel stage process died or stopped answering: the stream is stopped (`stream_stopped` carries
    this message), the pipeline's status turns to `error`, and a new load replaces it; the server goes on."""


class DownloadError(WanrtError):
    """Fetching weight files failed (the hub refused, lacks the file, or the transfer broke); names the file."""

    status_code = 502


class UnknownRecording(WanrtError):
    status_code = 404


class RecordingConflict(WanrtError):
    """Start while recording, stop while not, or download while the file is still being written."""

    status_code = 409


class NoFrameYet(WanrtError):
    """The session has not sent an output frame yet (its first chunk is still being made)."""

    status_code = 409


class BodyTooLarge(WanrtError):
    status_code = 413


class WrongContentType(WanrtError):
    """A state-changing request whose Content-Type is not the route's (JSON, or octet-stream for uploads)."""

    status_code = 415


class HostNotAllowed(WanrtError):
    """The `Host` header names neither loopback, the bound address nor a configured name (DNS rebinding)."""

    status_code = 400


class Unauthorized(WanrtError):
    """The server has an API token and the request did not carry it."""

    status_code = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="wanrt"'}


class InsufficientStorage(WanrtError):
    """The asset folder's disk (or the server's file-size limit) has no room for an upload."""

    status_code = 507


class FrameConversionError(WanrtError):
    """An input frame could not be turned into the pipeline's RGB frames; it ends that stream (a data-channel reply)."""


class InternalError(WanrtError):
    """A bug, logged where it happened (a cluster worker's, raised again at its front): never a traceback to clients."""
