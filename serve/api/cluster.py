"""The cluster: its workers, their GPUs, pipelines, seats and sessions (served by a cluster front only)."""

from __future__ import annotations

from litestar import Controller, Request, get, route
from litestar.datastructures import State

from serve.errors import NotOnClusterFront
from serve.schemas import ClusterStatus

LOCAL_ONLY = ("loras", "models")
"""`wanrt serve` routes that read its own folders; a cluster front answers them with 501 rather than a bare 404.
(Uploads are the front's own, copied to every worker: serve/cluster/assets.py; recordings are on the worker that
served their session, and the front asks it.)"""


class ClusterController(Controller):
    path = "/api/v1/cluster"
    tags = ["cluster"]

    @get("/")
    async def cluster(self, state: State) -> ClusterStatus:
        """Every worker the front has seen, asked now: `alive`, `unreachable` (no new sessions) or `gone` (died or
        left; `lost_sessions` are the streams that ended with it)."""
        return await state.serving.cluster()


class LocalOnlyController(Controller):
    @route(
        [f"/api/v1/{name}{tail}" for name in LOCAL_ONLY for tail in ("", "/{rest:path}")],
        http_method=["GET", "POST"],
        include_in_schema=False,
    )
    async def local_only(self, request: Request) -> None:
        raise NotOnClusterFront(
            f"{request.url.path} reads one machine's own folders, and a cluster front has none of its workers'; "
            "LoRA files and weight downloads are served by `wanrt serve` on a worker machine "
            "(weights must be on every worker before a load)"
        )
