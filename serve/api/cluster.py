"""The cluster: its workers, their GPUs, pipelines, seats and sessions (served by a cluster front only)."""

from __future__ import annotations

from litestar import Controller, get
from litestar.datastructures import State

from serve.schemas import ClusterStatus


class ClusterController(Controller):
    path = "/api/v1/cluster"
    tags = ["cluster"]

    @get("/")
    async def cluster(self, state: State) -> ClusterStatus:
        """Every worker the front has seen, asked now: `alive`, `unreachable` (no new sessions) or `gone` (died or
        left; `lost_sessions` are the streams that ended with it)."""
        return await state.serving.cluster()
