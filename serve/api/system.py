"""Health, hardware and metrics: what operators and monitors poll."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import anyio.to_thread
from litestar import Controller, MediaType, get
from litestar.datastructures import State

from serve.access import PUBLIC_OPT
from serve.runtime.hardware import probe_hardware


class SystemController(Controller):
    tags = ["system"]

    @get("/health", opt={PUBLIC_OPT: True})
    async def health(self, state: State) -> dict[str, Any]:
        return {
            "status": "healthy",
            "timestamp": time.time(),
            "server_start_time": state.started_at,
            "version": state.version,
            "git_commit": state.git_commit,
        }

    @get("/api/v1/hardware/info")
    async def hardware(self, state: State) -> dict[str, Any]:
        if state.hardware is None:  # probed once: importing torch and querying CUDA is slow
            state.hardware = await anyio.to_thread.run_sync(probe_hardware)
        return state.hardware

    @get("/metrics", media_type=MediaType.TEXT)
    async def metrics(self, state: State) -> str:
        """Prometheus text format."""
        lines = {
            **await state.serving.gauges(),
            "wanrt_threads": threading.active_count(),
            "wanrt_asyncio_tasks": len(asyncio.all_tasks()),
        }
        return "".join(f"{name} {value}\n" for name, value in lines.items())
