"""A cluster worker: today's single-GPU server (pipeline manager, its worker thread, its WebRTC sessions) as a Ray
actor, one per GPU (or per CPU seat on a machine without one).

The actor answers the `Serving` calls of the HTTP API (serve/serving.py) through one method, `call`, and reports
itself through `summary`. Its peer connections live in its own process, so the answer SDP carries this process's own
ICE candidates and the media flows between the browser and this actor, never through the front. Errors cross Ray as
a `Reply` naming the error class, so the front raises the same error the single server would (same status, same
JSON), without Ray's traceback text.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import ray

from serve.assets import AssetStore
from serve.cluster.names import session_prefix
from serve.errors import InternalError, InvalidRequest, WanrtError, WorkerUnavailable
from serve.hub import HubDownloads
from serve.pipelines.loras import LoraCatalog
from serve.pipelines.manager import PipelineManager
from serve.recording import RecordingStore
from serve.schemas import ClusterWorker
from serve.serving import LocalServing
from serve.settings import ServerSettings
from serve.webrtc.codecs import configure_codecs
from serve.webrtc.decoders import install_decoders
from serve.webrtc.ice import configure_ice
from serve.webrtc.session import configure_data_channel
from serve.webrtc.sessions import SessionManager

log = logging.getLogger(__name__)

CALLS = frozenset(
    {
        "load",
        "status",
        "unload",
        "create_session",
        "add_candidates",
        "close_session",
        "describe_sessions",
        "session_frame",
        "session_metrics",
        "gauges",
        "list_recordings",
        "start_recording",
        "stop_recording",
        "recording_file",
        "read_recording",
        "list_loras",
        "models_status",
        "download_models",
    }
)
"""The `Serving` methods a front may call on a worker."""
CLOCK_SKEW_S = 2.0
"""How far the front's and the workers' clocks may disagree (NTP keeps them within milliseconds) before a call
that came in time is taken for one that came too late."""


@dataclass(frozen=True)
class Reply:
    value: Any = None
    error: str | None = None
    """The WanrtError subclass's name (serve/errors.py), when the call failed."""
    detail: str = ""


class WanrtWorker:
    """Created by `wanrt cluster worker` (serve/cluster/commands.py) with `num_gpus=1`, or as a CPU seat."""

    def __init__(self, name: str, settings: ServerSettings, log_level: str = "INFO") -> None:
        # Ray sends the actor's output to `wanrt cluster worker`, which prints it with the actor's pid.
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        # ICE, codec and SCTP settings are module attributes: this actor's process is its own, so they are its own.
        configure_ice(settings.webrtc)
        configure_codecs(settings.webrtc)
        install_decoders(nvdec=settings.webrtc.nvdec)
        configure_data_channel(settings.webrtc)
        self.name = name
        self.stopping = False  # set by `shutdown`: the front stops placing here, and new sessions are refused
        self.pipelines = PipelineManager(
            models_dir=settings.models_dir, engines_dir=settings.engines_dir, lora_dir=settings.lora_folder,
            allow_random_weights=settings.allow_random_weights, load_timeout_s=settings.load_timeout_s,
            default_gpus=settings.gpus,
        )  # fmt: skip
        # A folder of its own under --recordings-dir: the actors of one machine share that directory, and each lists
        # and caps only the recordings it made (a replacement under the same name finds its predecessor's).
        self.recordings = RecordingStore(replace(settings.recordings, directory=settings.recordings.directory / name))
        self.sessions = SessionManager(
            self.pipelines,
            settings.webrtc,
            settings.assets.directory,
            self.recordings,
            session_prefix=session_prefix(name),
        )
        # Its own LoRA folder and models folder, as `wanrt serve` on this machine has: the front lists them and
        # starts downloads here (actors of one machine share the folders; a file lock fetches each file once).
        self.loras = LoraCatalog(settings.lora_folder)
        self.models = HubDownloads(settings.models_dir, settings.hub_endpoint)
        self.serving = LocalServing(self.pipelines, self.sessions, self.recordings, self.loras, self.models)
        self.assets = AssetStore(settings.assets.directory)
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.gpus = [str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])]
        log.info("worker=%s started node=%s gpus=%s pid=%d", name, self.node_id[:8], self.gpus, os.getpid())

    async def call(self, method: str, *args: Any, give_up_at: float | None = None) -> Reply:
        """`give_up_at`: the front's wall-clock time past which it no longer waits for the answer. A call that starts
        later than that (and CLOCK_SKEW_S) was queued while this actor was hung: it is dropped, not run, since an
        offer answered now would hold a seat for a client that was told to try again."""
        if give_up_at is not None and time.time() > give_up_at + CLOCK_SKEW_S:
            log.warning("worker=%s dropped a %s call its front gave up on %.1f s ago", self.name, method,
                        time.time() - give_up_at)  # fmt: skip
            return Reply(error=WorkerUnavailable.__name__, detail=f"{method} came after the front stopped waiting")
        if method not in CALLS:
            return Reply(error=InvalidRequest.__name__, detail=f"a worker has no call {method!r}")
        if self.stopping and method in ("create_session", "load"):  # placed before the front saw `stopping`
            return Reply(error=WorkerUnavailable.__name__, detail=f"worker {self.name} is stopping; try again")
        try:
            return Reply(value=await getattr(self.serving, method)(*args))
        except WanrtError as exc:
            return Reply(error=type(exc).__name__, detail=str(exc))
        except Exception:  # a bug: the single server's 500, not Ray's traceback failing a front's whole listing
            log.exception("worker=%s call %s failed", self.name, method)
            detail = f"internal error in {method} on worker {self.name}; it logged it, please report it with the time"
            return Reply(error=InternalError.__name__, detail=detail)

    async def put_asset(self, name: str, data: bytes) -> None:
        """An upload the front saved, under the name it gave (serve/cluster/assets.py): a session here resolves the
        path the front returned."""
        await asyncio.to_thread(self.assets.put, name, data)

    async def summary(self) -> ClusterWorker:
        return ClusterWorker(
            name=self.name,
            state="stopping" if self.stopping else "alive",
            node_id=self.node_id,
            node_ip=ray.util.get_node_ip_address(),
            gpus=self.gpus,
            pid=os.getpid(),
            pipeline=self.pipelines.status(),
            seats=self.sessions.max_sessions,
            sessions=[s["sessionId"] for s in self.sessions.describe()],
            lora_files=await asyncio.to_thread(self.loras.paths),
        )

    async def shutdown(self, reason: str) -> None:
        """Ends every session with `stream_stopped` (its data channel still works) and frees the pipeline."""
        log.info("worker=%s stopping: %s", self.name, reason)
        self.stopping = True  # else its summary said alive, loaded and idle: the best seat for every new offer
        await self.sessions.stop_all(reason)
        await self.pipelines.close()
        self.recordings.close()
        await asyncio.to_thread(self.models.close)  # stops downloads at their next chunk; partial files stay
        self.loras.close()
