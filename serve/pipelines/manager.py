"""The pipeline manager: the one object the HTTP layer talks to about pipelines (load, status, unload).

Loading runs in a thread so the event loop keeps serving (status polls, other sessions). At most one pipeline is
loaded; loading another first stops every session of the old one (they get `stream_stopped`) and frees it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from serve.errors import InvalidParameters, PipelineBusy, PipelineLoadError, PipelineNotLoaded, PipelineUnavailable
from serve.pipelines.base import Pipeline
from serve.pipelines.loras import LoraRequest, check_requests, requested_loras
from serve.pipelines.placement import Gpus, check_blocks_per_stage, parse_gpus
from serve.pipelines.registry import PIPELINES, get_spec
from serve.pipelines.worker import PipelineWorker
from serve.schemas import LoadParams, PipelineStatus

log = logging.getLogger(__name__)

StopSessionsFn = Callable[[str], Awaitable[None]]


class PipelineManager:
    def __init__(
        self,
        *,
        models_dir: Path,
        allow_random_weights: bool,
        engines_dir: Path | None = None,
        lora_dir: Path | None = None,
        load_timeout_s: float | None = None,
        default_gpus: str | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.default_gpus = default_gpus  # `--gpus`: loads that do not name their devices get these
        self.load_timeout_s = load_timeout_s
        self.engines_dir = engines_dir
        self.lora_dir = lora_dir if lora_dir is not None else models_dir / "lora"
        self.allow_random_weights = allow_random_weights
        self.pipeline: Pipeline | None = None
        self.worker: PipelineWorker | None = None
        self._status = PipelineStatus(status="not_loaded")
        self._load_task: asyncio.Task[None] | None = None
        # Held from a load's busy check until its task exists, and through an unload: releasing the old pipeline
        # awaits (sessions closing, the worker stopping), and a second load let in there would also pass the check,
        # and the pipeline one of the two loads built would never be freed.
        self._changing = asyncio.Lock()
        self._stop_sessions: list[StopSessionsFn] = []

    def on_unload(self, stop_sessions: StopSessionsFn) -> None:
        """Register a callback that stops every session of the current pipeline, given the reason."""
        self._stop_sessions.append(stop_sessions)

    def status(self) -> PipelineStatus:
        pipeline, worker, status = self.pipeline, self.worker, self._status
        if pipeline is not None and status.status == "loaded":
            # A stage or the worker thread died: its streams were stopped; a new load replaces it.
            failure = pipeline.failure() or (worker.failure if worker is not None else None)
            if failure is not None:
                log.error("pipeline=%s failed: %s", status.pipeline_id, failure)
                self._status = PipelineStatus(
                    status="error", pipeline_id=status.pipeline_id, load_params=status.load_params, error=failure,
                    pipeline_parallel=pipeline.placement(),
                )  # fmt: skip
            else:
                status.pipeline_parallel = pipeline.placement()  # per-stage times move with every chunk
        return self._status

    def require_loaded(self) -> tuple[Pipeline, PipelineWorker, dict[str, Any]]:
        self.status()
        if self.pipeline is None or self.worker is None or self._status.status != "loaded":
            raise PipelineNotLoaded(
                "Pipeline not loaded: POST /api/v1/pipeline/load and wait for GET /api/v1/pipeline/status to say "
                "'loaded' before sending an offer"
            )
        return self.pipeline, self.worker, self._status.load_params or {}

    async def load(self, pipeline_id: str, params: LoadParams) -> str:
        """Validate now (errors go back to the caller), then load in the background (errors go to the status)."""
        spec = get_spec(pipeline_id)
        if not spec.available:
            raise PipelineUnavailable(
                f"pipeline {pipeline_id!r} is declared but not built into this server yet; available: "
                + ", ".join(pid for pid, other in PIPELINES.items() if other.available)
            )
        load_params = spec.effective_load_params(params, allow_random_weights=self.allow_random_weights)
        if "gpus" in spec.load_fields and "gpus" not in load_params and self.default_gpus:
            load_params["gpus"] = self.default_gpus
        gpus = parse_gpus(load_params["gpus"]) if "gpus" in load_params else None  # malformed: a 400 now
        if "blocks_per_stage" in load_params:  # its sum is checked against the model's blocks at load
            check_blocks_per_stage(load_params["blocks_per_stage"], gpus.ranks if gpus else 1)
        # What the load would fail on that is known now: a 4xx before the loaded pipeline and its sessions are gone.
        await asyncio.to_thread(check_before_release, gpus, requested_loras(load_params), self.lora_dir)
        async with self._changing:
            if self._load_task is not None and not self._load_task.done():
                raise PipelineBusy(
                    f"pipeline {self._status.pipeline_id!r} is loading; wait for it, or POST /api/v1/pipeline/unload"
                )
            await self._release(f"pipeline {pipeline_id!r} is being loaded")
            self._status = PipelineStatus(
                status="loading",
                pipeline_id=pipeline_id,
                load_params=load_params,
                loading_stage="starting",
                progress=0.0,
                random_weights=bool(load_params.get("random_weights")),
            )
            self._load_task = asyncio.create_task(self._load(pipeline_id, load_params), name=f"load-{pipeline_id}")
        return f"loading pipeline {pipeline_id!r}; poll GET /api/v1/pipeline/status"

    async def _load(self, pipeline_id: str, load_params: dict[str, Any]) -> None:
        spec = get_spec(pipeline_id)
        status = self._status

        def report(stage: str, progress: float) -> None:  # called from the loading thread
            status.loading_stage = stage
            status.progress = progress

        loop = asyncio.get_running_loop()
        # The factory import pulls in torch and the model code (seconds): it runs on the thread, not the loop.
        loading = loop.run_in_executor(
            None,
            lambda: on_first_gpu(
                load_params,
                lambda: spec.resolve_factory().load(
                    spec,
                    load_params,
                    report=report,
                    models_dir=self.models_dir,
                    engines_dir=self.engines_dir,
                    lora_dir=self.lora_dir,
                ),
            ),
        )
        try:
            pipeline = await asyncio.wait_for(asyncio.shield(loading), self.load_timeout_s)
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                # Python 3.11's wait_for returns a result that is ready when the cancel comes (3.12 raises): an
                # unload that met the load finishing must still win.
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            # Unloaded mid-load: a loading thread cannot be interrupted, so free what it builds once it is done.
            loading.add_done_callback(lambda done: _close_when_built(loop, done))
            raise
        except TimeoutError:
            loading.add_done_callback(lambda done: _close_when_built(loop, done))
            self._failed(
                pipeline_id,
                load_params,
                f"loading did not finish within {self.load_timeout_s:g} s (stage: {status.loading_stage}); its thread "
                "cannot be stopped and frees what it builds if it ever finishes. Load again, or another pipeline",
            )
            return
        except Exception as exc:
            reason = str(exc) if isinstance(exc, PipelineLoadError) else f"{type(exc).__name__}: {exc}"
            self._failed(pipeline_id, load_params, reason)
            return
        self.pipeline = pipeline
        self.worker = PipelineWorker(pipeline_id, getattr(pipeline, "device", None))
        self._status = PipelineStatus(
            status="loaded",
            pipeline_id=pipeline_id,
            load_params=load_params,
            loading_stage="ready",
            progress=1.0,
            backend=pipeline.backend,
            backend_reason=pipeline.backend_reason,
            backends=pipeline.backends,
            random_weights=pipeline.random_weights,
            loaded_lora_adapters=list(pipeline.lora_adapters),
            pipeline_parallel=pipeline.placement(),
        )
        log.info("pipeline=%s loaded backend=%s", pipeline_id, pipeline.backend)

    def _failed(self, pipeline_id: str, load_params: dict[str, Any], reason: str) -> None:
        log.error("pipeline=%s load failed: %s", pipeline_id, reason)
        self._status = PipelineStatus(status="error", pipeline_id=pipeline_id, load_params=load_params, error=reason)

    async def unload(self) -> str:
        async with self._changing:
            if self._load_task is not None and not self._load_task.done():
                self._load_task.cancel()  # the thread finishes on its own; its result is dropped
                # The task leaves at once; until it has, a load queued behind this unload saw it running and
                # answered 409 "is loading" though the unload had answered and the status said not_loaded.
                await asyncio.wait([self._load_task])
            pipeline_id = self._status.pipeline_id
            await self._release("pipeline unloaded")
            self._status = PipelineStatus(status="not_loaded")
        return f"unloaded {pipeline_id!r}" if pipeline_id else "nothing was loaded"

    async def _release(self, reason: str) -> None:
        # Unset before the first await: an offer that comes while the sessions close must not join this pipeline.
        worker, pipeline = self.worker, self.pipeline
        self.worker = self.pipeline = None
        for stop in self._stop_sessions:
            await stop(reason)
        if worker is not None:  # it closes the pipeline once its thread is out of its chunk
            await asyncio.to_thread(worker.close, then=pipeline.close if pipeline is not None else None)
        elif pipeline is not None:
            await asyncio.to_thread(pipeline.close)
        if pipeline is not None:
            # Closed sessions refer to the pipeline through reference cycles (callbacks into their own methods), so
            # only the cyclic collector frees its weights, at a time of its choosing: a next load could run out of
            # memory beside them. Nothing here may still hold it then (the worker holds its slots until its thread
            # is out).
            del pipeline, worker
            await asyncio.to_thread(free_device_memory)

    async def close(self) -> None:
        await self.unload()


def on_first_gpu(load_params: dict[str, Any], load: Callable[[], Pipeline]) -> Pipeline:
    """`load()` with the first GPU its `gpus` names as the thread's current CUDA device. Tensors name their device,
    but what does not takes the current one, 0 unless set: Triton's launches and streams, TensorRT's engine and
    context, AOTInductor's load, `torch.cuda.current_stream()`. A GPU that is not there is left to the load, which
    names it in its error."""
    gpus = load_params.get("gpus")
    device = parse_gpus(gpus).devices[0] if gpus else "cpu"
    if not device.startswith("cuda"):
        return load()
    import torch  # a GPU load: the factory needs it anyway (on this thread, not the event loop's)

    if not torch.cuda.is_available() or int(device.removeprefix("cuda:")) >= torch.cuda.device_count():
        return load()
    with torch.cuda.device(torch.device(device)):
        return load()


def check_before_release(gpus: Gpus | None, loras: list[LoraRequest], lora_dir: Path) -> None:
    """Blocking (file headers, torch's import): every GPU `gpus` names is visible here, and every LoRA resolves to
    a LoRA file; raises InvalidParameters otherwise."""
    if gpus is not None and not gpus.on_cpu:
        from serve.runtime.stage_driver import check_visible

        try:
            check_visible(gpus)
        except PipelineLoadError as exc:
            raise InvalidParameters(str(exc)) from None
    check_requests(loras, lora_dir)


def free_device_memory() -> None:
    """Collect what unloaded pipelines left in reference cycles, and hand the cached GPU blocks back to the driver."""
    gc.collect()
    torch = sys.modules.get("torch")  # every model pipeline imports it; the manager itself does not need to
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _close_when_built(loop: asyncio.AbstractEventLoop, done: asyncio.Future[Pipeline]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    pipeline = done.result()
    log.info("pipeline=%s finished loading after it was unloaded or timed out; freeing it", pipeline.spec.id)
    loop.run_in_executor(None, pipeline.close)
