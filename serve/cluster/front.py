"""The cluster front: the same `/api/v1` (and the same UI) as `wanrt serve`, with its `Serving` placed on Ray actors.

State lives on the workers. The front keeps only what it can rebuild by asking them: a view of each worker (its last
summary) and the pipeline the last load named. Routing needs no table: a session id names its worker
(serve/cluster/names.py).

An offer goes to the best-ranked live worker with a free seat (serve/cluster/views.py says how they rank). A worker
that dies is marked gone: its sessions' ids then answer 410 (their streams ended with the worker, and the front has
no channel to those clients), and new offers go elsewhere. A worker that joins is found by the next poll and takes
new sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import ray
from litestar import Litestar
from ray.exceptions import ActorDiedError, RayActorError

from serve import errors
from serve.api.assets import AssetController
from serve.api.cluster import ClusterController
from serve.api.loras import LoraController
from serve.api.models import ModelsController
from serve.api.pipeline import PipelineController
from serve.api.recordings import RecordingController
from serve.api.sessions import SessionController
from serve.api.system import SystemController
from serve.api.webrtc import WebRTCController
from serve.assets import AssetStore, echo
from serve.cluster.assets import ClusterAssets
from serve.cluster.folders import merge_loras, merge_models
from serve.cluster.names import NAMESPACE, WORKER_PREFIX, owner_of
from serve.cluster.views import Wanted, WorkerView
from serve.cluster.worker import Reply
from serve.errors import (
    CapacityExceeded,
    InvalidParameters,
    PipelineLoadError,
    PipelineNotLoaded,
    PipelineUnavailable,
    SessionGone,
    UnknownRecording,
    UnknownSession,
    WanrtError,
    WorkerUnavailable,
)
from serve.hub import name_of
from serve.pipelines.registry import PIPELINES, get_spec
from serve.recording import session_of
from serve.schemas import (
    Answer,
    ClusterStatus,
    IceCandidate,
    LoadParams,
    LoraList,
    ModelsStatus,
    Offer,
    PipelineStatus,
    Recording,
    RecordingList,
)
from serve.settings import ClusterSettings, ServerSettings

log = logging.getLogger(__name__)

LOAD_POLL_S = 0.05
RELEASING_CALLS = frozenset({"load", "unload", "stop_recording", "close_session"})
"""Worker calls that wait for a pipeline to be freed (a load replaces the one there) or a recording to be completed
(a session's close completes its recording): they get `release_timeout_s`, every other call `call_timeout_s`. One of
these that times out is left to finish, since stopping it half-way would leave half a release. Any other carries the
time the front gives up on it, and is cancelled then: a hung worker that wakes drops it rather than run it (an offer
answered there would hold a seat for a client told to try again), and a slow one stops it at its next await."""
# A dead worker's sessions, kept to answer their signalling 410 rather than 404: the newest this many (a front that
# outlives many restarts would otherwise keep every session id it ever routed).
MAX_LOST_SESSIONS = 4096
# How long a gone worker whose name Ray no longer lists stays in the listing (and answers its sessions 410): names
# carry the node id, so every node restart adds one, and a front that outlives many would list them all for good.
GONE_KEPT_S = 3600.0
CLUSTER_CONTROLLERS: list[type] = [
    PipelineController,
    WebRTCController,
    SessionController,
    SystemController,
    ClusterController,
    AssetController,
    RecordingController,
    LoraController,
    ModelsController,
]


class WorkerGone(Exception):
    """A call found its worker dead; the caller decides what that means for its request."""


class ClusterServing:
    def __init__(self, settings: ClusterSettings, load_timeout_s: float, assets: AssetStore) -> None:
        self.settings = settings
        self.assets = ClusterAssets(assets, lambda: [view for view in self._views() if view.usable])
        self.load_timeout_s = load_timeout_s
        self.workers: dict[str, WorkerView] = {}
        self._wanted: Wanted | None = None
        self._unloaded = False
        """Set by this front's unload, until its next load: the workers' pipelines are not adopted meanwhile."""
        self._unloads = 0  # unloads through this front so far: a load that met one does not undo it
        self._refreshed_at = 0.0
        self._refresh_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    @property
    def max_sessions(self) -> int:
        return sum(view.info.seats for view in self.workers.values() if view.usable)

    # -- the worker views ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._poller = asyncio.create_task(self._poll(), name="cluster-poll")

    async def close(self) -> None:
        tasks = [self._poller, *(task for view in self.workers.values() for task in (view.late_unload, view.sync))]
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # a GCS hiccup must not end the polling: the next round tries again
                log.exception("cluster refresh failed")

    async def refresh(self, max_age_s: float = 0.0) -> None:
        """Finds joined workers and asks every known one for its summary (unless the last round is fresh enough).

        With `max_age_s`, a round already under way is not waited for: a request is placed on the summaries there
        are (a worker refuses an offer past its seats itself), rather than held up by a worker slow to answer."""
        if max_age_s > 0 and self._refresh_lock.locked():
            return
        async with self._refresh_lock:
            if time.monotonic() - self._refreshed_at < max_age_s:
                return
            names = await asyncio.to_thread(_worker_names)
            # At once, not one after another: a joining node's actors answer nothing until their torch import is
            # done, and each would hold the round (and every request waiting on it) for its summary timeout.
            await asyncio.gather(*(
                self._discover(name, replaces=view)
                for name in names
                if (view := self.workers.get(name)) is None or view.info.state == "gone"  # joined, or a successor
            ))  # fmt: skip
            await asyncio.gather(*(self._update(view) for view in self.workers.values() if view.info.state != "gone"))
            long_gone = time.time() - GONE_KEPT_S
            for name, view in list(self.workers.items()):
                if view.info.state == "gone" and name not in names and (view.info.last_seen or 0) < long_gone:
                    del self.workers[name]
            self._refreshed_at = time.monotonic()

    async def _discover(self, name: str, replaces: WorkerView | None) -> None:
        try:
            handle = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
            info = await asyncio.wait_for(handle.summary.remote(), self.settings.summary_timeout_s)
        except (ValueError, RayActorError, TimeoutError):  # gone again before it answered: the next round retries
            return
        except Exception:  # its summary raised (a RayTaskError wrapping the worker's own error): not placed yet
            log.exception("worker=%s: its first summary failed; the next round asks again", name)
            return
        info.last_seen = time.time()
        if replaces is not None:  # the dead actor's sessions stay lost under its successor's name
            info.lost_sessions = replaces.info.lost_sessions
        self.workers[name] = WorkerView(name, handle, info)
        log.info("worker=%s %s node=%s gpus=%s seats=%d", name, "rejoined" if replaces else "joined",
                 (info.node_id or "")[:8], info.gpus, info.seats)  # fmt: skip

    async def _update(self, view: WorkerView) -> None:
        try:
            info = await asyncio.wait_for(view.handle.summary.remote(), self.settings.summary_timeout_s)
        except ActorDiedError as exc:
            self._mark_gone(view, _died(exc))
            return
        except (RayActorError, TimeoutError) as exc:  # ActorUnavailableError: it may come back
            view.info.state, view.info.error = "unreachable", f"no answer to its summary ({type(exc).__name__})"
            return
        except Exception as exc:  # its summary raised (RayTaskError: a folder walk's OSError, ...): this worker only
            # is left out of placement; else the whole round raised, and every request that refreshes answered 500
            log.warning("worker=%s: its summary failed: %s", view.name, exc)
            view.info.state, view.info.error = "unreachable", f"its summary failed ({type(exc).__name__})"
            return
        if view.info.state == "gone":  # marked dead by a call while this summary was on its way: stays dead
            return
        info.last_seen = time.time()
        info.lost_sessions = view.info.lost_sessions
        view.info = info
        if view.unload_pending and view.late_unload is None:
            view.late_unload = asyncio.create_task(self._unload_late(view), name=f"unload-{view.name}")
        if view.sync is None and self.assets.missing(view):  # uploads it missed (joined later, unreachable, replaced)
            # On its own: a worker that joins lacks every upload, up to --max-upload-mb each, and the round (which
            # finds dead workers, and which GET /cluster and an unload wait for) must not wait for those copies.
            view.sync = asyncio.create_task(self._sync_uploads(view), name=f"assets-{view.name}")

    async def uploads_copied(self) -> None:
        """Once the copies of uploads the polls started are done (each worker's runs on its own)."""
        await asyncio.gather(*(view.sync for view in self.workers.values() if view.sync), return_exceptions=True)

    async def _sync_uploads(self, view: WorkerView) -> None:
        try:
            await self.assets.sync(view)
        except Exception:  # whatever it is, the next poll tries again
            log.exception("worker=%s: copying the uploads it lacks failed", view.name)
        finally:
            view.sync = None

    async def _unload_late(self, view: WorkerView) -> None:
        try:
            await self._call(view, "unload")
            view.unload_pending = False
            log.info("worker=%s unloaded now that it answers (the unload came while it was unreachable)", view.name)
        except (WorkerGone, WanrtError) as exc:  # still pending: its next summary tries again
            log.warning("worker=%s: the unload it missed failed again: %s", view.name, exc)
        finally:
            view.late_unload = None

    def _mark_gone(self, view: WorkerView, reason: str) -> None:
        if view.info.state == "gone":
            return
        lost = [*view.info.lost_sessions, *view.info.sessions][-MAX_LOST_SESSIONS:]
        view.info = msgspec.structs.replace(view.info, state="gone", sessions=[], lost_sessions=lost, error=reason)
        log.warning("worker=%s gone (%s); its sessions ended: %s", view.name, reason, ", ".join(lost) or "none")

    async def _call(self, view: WorkerView, method: str, *args: Any) -> Any:
        """The worker's answer, or its error raised as the single server raises it; WorkerGone if it is dead."""
        if view.info.state == "gone":
            raise WorkerGone(view.info.error)
        releasing = method in RELEASING_CALLS
        timeout_s = self.settings.release_timeout_s if releasing else self.settings.call_timeout_s
        give_up_at = None if releasing else time.time() + timeout_s  # a hung worker that wakes drops it
        ref = view.handle.call.remote(method, *args, give_up_at=give_up_at)
        try:
            reply: Reply = await asyncio.wait_for(ref, timeout_s)
        except ActorDiedError as exc:
            self._mark_gone(view, _died(exc))
            raise WorkerGone(view.info.error) from None
        except (RayActorError, TimeoutError) as exc:  # ActorUnavailableError, or no answer: it may come back
            if isinstance(exc, TimeoutError) and not releasing:
                ray.cancel(ref)  # under way at a slow worker: cancelled at its next await
            view.info.state = "unreachable"
            view.info.error = f"no answer to {method} in {timeout_s:g} s ({type(exc).__name__})"
            raise WorkerUnavailable(f"worker {view.name} is unreachable: {view.info.error}; try again") from None
        if reply.error is None:
            return reply.value
        raise _error_class(reply.error)(reply.detail)

    def _views(self) -> list[WorkerView]:
        return [view for _, view in sorted(self.workers.items())]

    # -- pipelines ----------------------------------------------------------------------------------------------

    async def load(self, pipeline_id: str, params: LoadParams) -> str:
        spec = get_spec(pipeline_id)
        if not spec.available:
            raise PipelineUnavailable(f"pipeline {pipeline_id!r} is declared but not built into this server yet")
        # Each worker enforces its own --allow-random-weights; here the effective parameters are only a comparison key.
        wanted = Wanted(pipeline_id, params, spec.effective_load_params(params, allow_random_weights=True))
        unloads = self._unloads
        await self.refresh(max_age_s=self.settings.placement_max_age_s)
        live = [view for view in self._views() if view.usable]
        if not live:
            raise WorkerUnavailable(
                f"no live worker to load {pipeline_id!r} on (GET /api/v1/cluster lists the workers and why each is "
                "not live); start `wanrt cluster worker` on a GPU machine, or wait for one to answer again"
            )
        if wanted.loras and all(view.lacks(wanted) for view in live):
            raise InvalidParameters(
                "no live worker has every LoRA this load names ("
                + "; ".join(f"{view.name} lacks {', '.join(map(echo, view.lacks(wanted)))}" for view in live)
                + "): GET /api/v1/loras lists the workers that have each file; copy it into their LoRA folders"
            )
        ready = sorted((view.readiness(wanted), view.name) for view in live)
        if not ready or ready[0][0] == 3:
            holders = f" ({sum(not view.lacks(wanted) for view in live)} with its LoRA files)" if wanted.loras else ""
            raise CapacityExceeded(
                f"no worker can load {pipeline_id!r} now: {len(ready)} live worker(s){holders}, each streaming another "
                "pipeline (loading would stop those sessions). Try again when one is free, or add a worker"
            )
        readiness, name = ready[0]
        if readiness < 2:
            self._wanted, self._unloaded = wanted, False
            state = "loaded" if readiness == 0 else "loading"
            return f"pipeline {pipeline_id!r} is {state} on {name}; new offers go there"
        view = self.workers[name]
        async with view.load_lock:
            try:
                message = await self._call(view, "load", pipeline_id, params)
                view.info.pipeline = await self._call(view, "status")
            except WorkerGone as exc:
                raise WorkerUnavailable(f"worker {name} went away while loading ({exc}); load again") from None
        if self._unloads != unloads:  # an unload came while the worker loaded: it stands, and freed that load
            raise PipelineNotLoaded(f"an unload came while {pipeline_id!r} was loading on {name}; load it again")
        self._wanted, self._unloaded = wanted, False
        return f"{message} (on {name}; other workers load it when an offer needs them)"

    def _adopt(self) -> Wanted | None:
        """The pipeline new offers get. Without a load through this front (it restarted, or the workers were started
        with --pipeline), the one pipeline the live workers have loaded, if they agree on one."""
        if self._wanted is not None or self._unloaded:
            return self._wanted
        loaded = {
            (status.pipeline_id, msgspec.json.encode(status.load_params, order="sorted"))
            for view in self._views()
            if view.usable and (status := view.info.pipeline) is not None and status.status == "loaded"
        }
        if len(loaded) != 1:
            return None
        ((pipeline_id, params_json),) = loaded
        try:
            effective = msgspec.json.decode(params_json)
            self._wanted = Wanted(pipeline_id, msgspec.convert(effective, LoadParams), effective)
        except (msgspec.ValidationError, WanrtError):
            return None
        log.info("adopted pipeline=%s: every live worker that has one has loaded it", pipeline_id)
        return self._wanted

    async def status(self) -> PipelineStatus:
        await self.refresh(max_age_s=self.settings.placement_max_age_s)
        wanted = self._adopt()
        if wanted is None:
            return PipelineStatus(status="not_loaded")
        statuses = [view.info.pipeline for view in self._views() if view.usable and wanted.matches(view.info.pipeline)]
        for state in ("loaded", "loading", "error"):
            for status in statuses:
                if status is not None and status.status == state:
                    return status
        # The workers that had it left or dropped it: a load puts it on an idle worker again.
        return PipelineStatus(status="not_loaded", pipeline_id=wanted.pipeline_id)

    async def unload(self) -> str:
        """Frees the pipeline on every worker that has one (their sessions get `stream_stopped`); a worker that cannot
        be reached now frees it once it answers again."""
        self._wanted, self._unloaded = None, True  # before any await: an offer being placed checks it
        self._unloads += 1
        freed: list[str] = []
        later: list[str] = []

        async def unload_one(view: WorkerView) -> None:
            status = view.info.pipeline
            try:
                await self._call(view, "unload")
            except WorkerGone:
                return
            except WorkerUnavailable:
                view.unload_pending = True
                later.append(view.name)
                return
            if status is not None and status.status != "not_loaded":
                freed.append(view.name)

        for view in self._views():
            if view.info.state == "unreachable":
                view.unload_pending = True
                later.append(view.name)
        # Every live worker, whatever its last summary said (an offer may have just started a load on it), at once:
        # each may wait for its chunk in flight.
        await asyncio.gather(*(unload_one(view) for view in self._views() if view.usable))
        await self.refresh()
        message = f"unloaded on {', '.join(sorted(freed))}" if freed else "nothing was loaded"
        if later:
            message += f"; {', '.join(sorted(later))} cannot be reached now and unload(s) once it answers"
        return message

    async def _ensure_loaded(self, view: WorkerView, wanted: Wanted) -> None:
        async with view.load_lock:
            status: PipelineStatus = await self._call(view, "status")
            if not (wanted.matches(status) and status.status in ("loaded", "loading")):
                self._check_wanted(wanted)  # no await between this and the load: an unload's call comes after it
                log.info("worker=%s loading %s for an offer", view.name, wanted.pipeline_id)
                await self._call(view, "load", wanted.pipeline_id, wanted.params)
            deadline = time.monotonic() + self.load_timeout_s
            while True:
                status = view.info.pipeline = await self._call(view, "status")
                if status.status == "loaded" and wanted.matches(status):
                    return
                if status.status != "loading" or not wanted.matches(status) or time.monotonic() > deadline:
                    raise PipelineLoadError(
                        f"worker {view.name} could not load {wanted.pipeline_id!r}: {status.error or status.status}"
                    )
                await asyncio.sleep(LOAD_POLL_S)

    # -- sessions -----------------------------------------------------------------------------------------------

    async def create_session(self, offer: Offer) -> Answer:
        await self.refresh(max_age_s=self.settings.placement_max_age_s)
        wanted = self._adopt()
        if wanted is None:
            raise PipelineNotLoaded(
                "Pipeline not loaded: POST /api/v1/pipeline/load and wait for GET /api/v1/pipeline/status to say "
                "'loaded' before sending an offer"
            )
        tried: set[str] = set()
        failures: list[str] = []
        while (view := self._place(wanted, tried)) is not None:
            tried.add(view.name)
            view.pending += 1
            try:
                if view.readiness(wanted) != 0:
                    await self._ensure_loaded(view, wanted)
                await self._copy_uploads(view)
                self._check_wanted(wanted)
                answer: Answer = await self._call(view, "create_session", offer)
            except (WorkerGone, WorkerUnavailable, CapacityExceeded, PipelineLoadError, errors.PipelineBusy) as exc:
                failures.append(f"{view.name}: {exc}")  # another worker may take it
                continue
            except PipelineNotLoaded as exc:
                self._check_wanted(wanted)  # unloaded or replaced through this front: the client hears that
                failures.append(f"{view.name}: {exc}")  # the worker's own: it lost the pipeline since its summary
                continue
            finally:
                view.pending -= 1
            view.info.sessions.append(answer.sessionId)  # until its next summary says so itself
            log.info("session=%s placed on worker=%s", answer.sessionId, view.name)
            return answer
        alive = sum(view.usable for view in self.workers.values())
        raise CapacityExceeded(
            f"no worker has a free seat for {wanted.pipeline_id!r} ({alive} live worker(s), {self.max_sessions} "
            "seats); close a session (DELETE /api/v1/webrtc/offer/{sessionId}), try again later, or add a worker"
            + (f". Tried: {'; '.join(failures)}" if failures else "")
        )

    async def _copy_uploads(self, view: WorkerView) -> None:
        """The front's uploads onto a worker about to take a session (the one it streams may name any of them). One
        it cannot take is logged and the session goes ahead: a stream that names it gets the worker's error for that
        file, and one that does not loses nothing."""
        await self.assets.sync(view)
        if missing := self.assets.missing(view):
            log.warning("worker=%s takes a session without uploads it could not be given: %s", view.name,
                        ", ".join(missing))  # fmt: skip

    def _check_wanted(self, wanted: Wanted) -> None:
        """An offer waits (for a load, for a worker's answer): if the pipeline was unloaded or replaced meanwhile, it
        must not load the old one again somewhere, nor take a seat on it."""
        current = self._wanted
        if current is None or (current.pipeline_id, current.effective) != (wanted.pipeline_id, wanted.effective):
            raise PipelineNotLoaded(
                f"pipeline {wanted.pipeline_id!r} was unloaded or replaced while this offer was being placed; wait for "
                "GET /api/v1/pipeline/status to say 'loaded', then send a new offer"
            )

    def _place(self, wanted: Wanted, tried: set[str]) -> WorkerView | None:
        candidates = [
            (view.readiness(wanted), len(view.info.sessions) + view.pending, view.name)
            for view in self._views()
            if view.usable and view.name not in tried and view.free_seats > 0
        ]
        candidates = [c for c in candidates if c[0] < 3]
        return self.workers[min(candidates)[2]] if candidates else None

    def _owner(self, session_id: str) -> WorkerView:
        name = owner_of(session_id)
        view = self.workers.get(name) if name is not None else None
        if view is None:
            raise UnknownSession(f"no session {echo(session_id)}; it ended or never existed")
        return view

    async def _on_owner(self, session_id: str, method: str, *args: Any) -> Any:
        view = self._owner(session_id)
        if session_id not in view.info.lost_sessions:
            try:
                return await self._call(view, method, session_id, *args)
            except WorkerGone:
                pass
        raise SessionGone(
            f"session {session_id} was on worker {view.name}, whose actor is gone "
            f"({view.info.error or 'a new actor has replaced it'}); its stream ended with it. Make a new offer: it "
            "goes to a live worker"
        )

    async def add_candidates(self, session_id: str, candidates: list[IceCandidate]) -> None:
        await self._on_owner(session_id, "add_candidates", candidates)

    async def close_session(self, session_id: str) -> None:
        view = self._owner(session_id)
        await self._on_owner(session_id, "close_session")
        with contextlib.suppress(ValueError):
            view.info.sessions.remove(session_id)

    async def session_frame(self, session_id: str, quality: int) -> bytes:
        return await self._on_owner(session_id, "session_frame", quality)

    async def session_metrics(self, session_id: str) -> dict[str, Any]:
        return {**await self._on_owner(session_id, "session_metrics"), "worker": owner_of(session_id)}

    async def describe_sessions(self) -> list[dict[str, Any]]:
        described = await self._gather("describe_sessions")
        return [{**session, "worker": name} for name, sessions in described for session in sessions]

    async def gauges(self) -> dict[str, float]:
        gauges: dict[str, float] = {}
        for _, worker_gauges in await self._gather("gauges"):
            for key, value in worker_gauges.items():
                gauges[key] = gauges.get(key, 0) + value
        # The single server's 0 or 1 (whether offers can be answered), and how many workers have it loaded.
        gauges["wanrt_cluster_workers_loaded"] = gauges.get("wanrt_pipeline_loaded", 0)
        gauges["wanrt_pipeline_loaded"] = int(gauges["wanrt_cluster_workers_loaded"] > 0)
        states = [view.info.state for view in self.workers.values()]
        for state in ("alive", "stopping", "unreachable", "gone"):
            gauges[f"wanrt_cluster_workers_{state}"] = states.count(state)
        return gauges

    # -- recordings: each on the worker that served its session ---------------------------------------------------

    async def list_recordings(self) -> RecordingList:
        listed = await self._gather("list_recordings")
        return RecordingList(
            recordings=sorted(
                (recording for _, part in listed for recording in part.recordings),
                key=lambda r: r.started_at,
                reverse=True,
            ),
            directory=", ".join(f"{name}:{part.directory}" for name, part in listed),
            total_bytes=sum(part.total_bytes for _, part in listed),
            max_bytes=sum(part.max_bytes for _, part in listed),
        )

    async def start_recording(self, session_id: str) -> Recording:
        return await self._on_owner(session_id, "start_recording")

    async def stop_recording(self, session_id: str) -> Recording:
        return await self._on_owner(session_id, "stop_recording")

    async def recording_file(self, recording_id: str) -> tuple[str, int]:
        return await self._on_recordings_worker(recording_id, "recording_file")

    async def read_recording(self, recording_id: str, offset: int, size: int) -> bytes:
        return await self._on_recordings_worker(recording_id, "read_recording", offset, size)

    async def _on_recordings_worker(self, recording_id: str, method: str, *args: Any) -> Any:
        """A recording outlives its session, so its worker is asked even after the session ended; a worker that is
        gone took its recordings folder with it."""
        view = self.workers.get(owner_of(session_of(recording_id)) or "")
        if view is None:
            raise UnknownRecording(f"no recording {echo(recording_id)}: no worker of this cluster made it")
        try:
            return await self._call(view, method, recording_id, *args)
        except WorkerGone:
            raise UnknownRecording(
                f"recording {echo(recording_id)} was on worker {view.name}, which is gone ({view.info.error})"
            ) from None

    # -- the workers' own folders: LoRA files and weights (serve/cluster/folders.py) -------------------------------

    async def list_loras(self) -> LoraList:
        await self.refresh(max_age_s=self.settings.placement_max_age_s)  # a worker that just joined is listed
        return merge_loras(*await self._ask_all("list_loras"))

    async def models_status(self, pipeline_id: str, vace: bool) -> ModelsStatus:
        get_spec(pipeline_id)  # an unknown id is the single server's 404, without asking the workers
        await self.refresh(max_age_s=self.settings.placement_max_age_s)
        return merge_models(pipeline_id, *await self._ask_all("models_status", pipeline_id, vace))

    async def missing_weights(self) -> dict[str, list[str]]:
        """Each pipeline's files that some live worker lacks; with no worker to ask, every file."""
        await self.refresh(max_age_s=self.settings.placement_max_age_s)

        async def missing(pipeline_id: str) -> list[str]:
            answers, skipped = await self._ask_all("models_status", pipeline_id, False)
            if not answers:
                return [name_of(f) for f in PIPELINES[pipeline_id].files]
            return [f"{f.repo}/{f.path}" for f in merge_models(pipeline_id, answers, skipped).files if not f.present]

        return dict(zip(PIPELINES, await asyncio.gather(*map(missing, PIPELINES)), strict=True))

    async def download_models(self, pipeline_id: str, vace: bool) -> tuple[ModelsStatus, bool]:
        """Started on every live worker: a load may land on any of them."""
        get_spec(pipeline_id)
        await self.refresh(max_age_s=self.settings.placement_max_age_s)
        answers, skipped = await self._ask_all("download_models", pipeline_id, vace)
        if not answers:
            why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items()) or "no worker has joined"
            raise WorkerUnavailable(f"no live worker took the download of {pipeline_id!r} ({why}); try again")
        statuses = [(name, status) for name, (status, _) in answers]
        return merge_models(pipeline_id, statuses, skipped), any(started for _, (_, started) in answers)

    async def _gather(self, method: str) -> list[tuple[str, Any]]:
        answers, _ = await self._ask_all(method)
        return answers

    async def _ask_all(self, method: str, *args: Any) -> tuple[list[tuple[str, Any]], dict[str, str]]:
        """Every live worker's answer (in name order), and why each other worker has none: unreachable or gone
        (not asked), or the error its call ended with."""
        views = [view for view in self._views() if view.usable]
        skipped = {view.name: f"{view.info.state}: {view.info.error}" for view in self._views() if not view.usable}
        results = await asyncio.gather(*(self._call(view, method, *args) for view in views), return_exceptions=True)
        answers = []
        for view, result in zip(views, results, strict=True):
            if isinstance(result, WorkerGone):
                skipped[view.name] = f"gone: {result}"
            elif isinstance(result, WanrtError):  # WorkerUnavailable (no answer in time), or the worker's own error
                skipped[view.name] = f"{type(result).__name__}: {result}"
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append((view.name, result))
        return answers, dict(sorted(skipped.items()))

    async def cluster(self) -> ClusterStatus:
        await self.refresh()
        wanted = self._wanted
        return ClusterStatus(
            pipeline_id=wanted.pipeline_id if wanted else None, workers=[view.info for view in self._views()]
        )


def _worker_names() -> set[str]:
    return {name for name in ray.util.list_named_actors() if name.startswith(WORKER_PREFIX)}


def _died(exc: ActorDiedError) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "it died"
    return f"its actor died: {first[:200]}"


def _error_class(name: str) -> type[WanrtError]:
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, WanrtError) else WanrtError


def connect(address: str) -> None:
    """Joins the Ray cluster as a driver of the wanrt namespace (once per process)."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")


def create_cluster_app(settings: ServerSettings, cluster: ClusterSettings) -> Litestar:
    """`wanrt cluster serve`: the single server's controllers, on a `ClusterServing`."""
    from serve.app import build_app

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await asyncio.to_thread(connect, cluster.address)
        serving = ClusterServing(cluster, settings.load_timeout_s, AssetStore(settings.assets.directory))
        await serving.start()
        app.state.update(serving=serving, assets=serving.assets)
        log.info("cluster front on ray=%s workers=%s", cluster.address, ", ".join(serving.workers) or "none yet")
        try:
            yield
        finally:
            await serving.close()

    return build_app(settings, lifespan, CLUSTER_CONTROLLERS)
