"""The pipeline manager's load lifecycle, with a pipeline whose load the test holds open."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from serve.pipelines import registry
from serve.pipelines.manager import PipelineManager
from serve.pipelines.passthrough import PassthroughPipeline
from serve.schemas import LoadParams

release_load = threading.Event()
closed = threading.Event()


class GatedPipeline(PassthroughPipeline):
    """Passthrough whose load waits for the test, and whose close the test can see."""

    @classmethod
    def load(cls, spec, load_params: dict[str, Any], *, report, **context: Any):
        assert release_load.wait(10), "the test never released the load"
        return super().load(spec, load_params, report=report, **context)

    def close(self) -> None:
        closed.set()


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = dataclasses.replace(registry.PIPELINES["passthrough"], id="gated", factory=f"{__name__}:GatedPipeline")
    monkeypatch.setitem(registry.PIPELINES, "gated", spec)
    release_load.clear()
    closed.clear()
    return "gated"


async def test_a_pipeline_that_finishes_loading_after_an_unload_is_closed(gated: str, tmp_path: Path) -> None:
    manager = PipelineManager(models_dir=tmp_path, allow_random_weights=False)
    await manager.load(gated, LoadParams())
    await asyncio.sleep(0.1)  # the loading thread is now inside load()
    assert manager.status().status == "loading"
    await manager.unload()
    assert manager.status().status == "not_loaded" and not closed.is_set()
    release_load.set()  # the thread finishes after the unload: what it built must be freed, not leaked
    assert await asyncio.to_thread(closed.wait, 5)
    assert manager.pipeline is None and manager.status().status == "not_loaded"


async def test_a_load_that_completes_is_kept(gated: str, tmp_path: Path) -> None:
    manager = PipelineManager(models_dir=tmp_path, allow_random_weights=False)
    release_load.set()
    await manager.load(gated, LoadParams())
    for _ in range(100):
        if manager.status().status == "loaded":
            break
        await asyncio.sleep(0.05)
    assert manager.status().status == "loaded" and not closed.is_set()
    await manager.close()
    assert closed.is_set()
