"""One error hierarchy for the whole server; app.py turns every one of them into JSON in a single handler.

Each message says what went wrong and what to do about it, because it is what an API user reads.
"""

from __future__ import annotations


class WanrtError(Exception):
    status_code = 500


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


class DownloadError(WanrtError):
    """Fetching weight files failed (the hub refused, lacks the file, or the transfer broke); names the file."""

    status_code = 502
