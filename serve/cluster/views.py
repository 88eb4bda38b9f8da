"""What a cluster front knows of each worker, and how it ranks them for the pipeline new offers get.

Placement of an offer: the pipeline is the last load's (`Wanted`). Among live workers with a free seat, a worker that
has it loaded (the fewest sessions first) beats one loading it, which beats an idle worker that must load it first; a
worker with sessions of another pipeline is never reloaded under them, nor one that lacks a LoRA file the load names.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from serve.schemas import ClusterWorker, LoadParams, PipelineStatus


@dataclass(frozen=True)
class Wanted:
    """The pipeline new offers get: the last load's id and parameters, and the effective parameters a worker's
    status reports for them (what "has it loaded" compares)."""

    pipeline_id: str
    params: LoadParams
    effective: dict[str, Any]

    def matches(self, status: PipelineStatus | None) -> bool:
        return status is not None and status.pipeline_id == self.pipeline_id and status.load_params == self.effective

    @property
    def loras(self) -> list[str]:
        """The LoRA files the load names, spelled as a worker's summary lists its folder."""
        return [os.path.normpath(item["path"]) for item in self.effective.get("loras") or ()]


@dataclass
class WorkerView:
    name: str
    handle: Any
    info: ClusterWorker
    pending: int = 0
    """Offers being placed on it right now: they count against its seats before its summary shows them."""
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    assets: set[str] = field(default_factory=set)
    """Names of the front's uploads this worker holds (serve/cluster/assets.py)."""
    assets_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One copy of its missing uploads at a time (a poll's and an offer's): the second finds them there."""
    unload_pending: bool = False
    """An unload through this front could not reach it: it frees its pipeline as soon as it answers again, and takes
    no load nor session before (the pipeline it holds is one the user unloaded)."""
    late_unload: asyncio.Task[None] | None = None
    sync: asyncio.Task[None] | None = None
    """The copy of the uploads it lacks that a poll started (its own task: a round does not wait for it)."""

    @property
    def usable(self) -> bool:
        return self.info.state == "alive"

    @property
    def free_seats(self) -> int:
        return self.info.seats - len(self.info.sessions) - self.pending

    def lacks(self, wanted: Wanted) -> list[str]:
        """The wanted LoRA files its folder does not have (a load there would fail naming them)."""
        have = set(self.info.lora_files)
        return [path for path in wanted.loras if path not in have]

    def readiness(self, wanted: Wanted) -> int:
        """0: loaded with the wanted pipeline; 1: loading it; 2: idle, can load it; 3: cannot take it (streaming
        another pipeline, without one of its LoRA files, or still to be unloaded)."""
        if self.lacks(wanted) or self.unload_pending:
            return 3
        status = self.info.pipeline
        if wanted.matches(status):
            if status.status == "loaded":
                return 0
            if status.status == "loading":
                return 1
        return 2 if not self.info.sessions and self.pending == 0 else 3
