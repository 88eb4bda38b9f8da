"""Uploads on a cluster front: kept in the front's own asset folder and copied, under the same name, to every worker.

The seed's VACE flow uploads a reference (`POST /api/v1/assets`) and sends the returned `path` in
`vace_ref_images`; the session that reads it may land on any worker. So the front saves the upload (it lists and
serves it from there), returns the name as the path (every store resolves a name inside its own folder), and puts
the bytes into each live worker's folder before it answers. A worker that was unreachable then, or joins later, or
is replaced under its name, gets what it lacks from the front's next poll (`sync`), and in any case before an offer
is placed on it: a worker just discovered is live before that poll's copy is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.from_thread
import msgspec
import ray

from serve.assets import AssetStore, is_upload_name
from serve.schemas import Asset

log = logging.getLogger(__name__)

PUT_TIMEOUT_S = 30.0  # one file to one worker (uploads are at most --max-upload-mb)
USABLE_CHECK_S = 0.25  # how often a put in flight looks whether the poll has found its worker unreachable


class ClusterAssets:
    """`state.assets` of a cluster front: the AssetStore API the asset routes call (in a worker thread). What each
    worker holds is its `WorkerView.assets` (a new view, so an empty set, when a new actor takes the name)."""

    def __init__(self, store: AssetStore, views: Callable[[], list[Any]]) -> None:
        self.store = store
        self._views = views  # the live WorkerViews (serve/cluster/views.py)
        self._names = {asset.name for asset in store.list()}  # every upload the workers should hold

    def save(self, filename: str, data: bytes) -> Asset:
        asset = self.store.save(filename, data)
        anyio.from_thread.run(self._put_everywhere, asset.name, data)
        return msgspec.structs.replace(asset, path=asset.name)

    def list(self) -> list[Asset]:
        return [msgspec.structs.replace(asset, path=asset.name) for asset in self.store.list()]

    def resolve(self, path: str) -> Path:
        return self.store.resolve(path)

    async def _put_everywhere(self, name: str, data: bytes) -> None:
        self._names.add(name)  # on the event loop, as `sync` reads it
        stored = await asyncio.to_thread(ray.put, data)  # once for every worker
        await asyncio.gather(*(self._put(view, name, stored) for view in self._views()))

    async def _put(self, view: Any, name: str, data: bytes | ray.ObjectRef) -> bool:
        """Whether the worker took the file. A worker the front's poll finds unreachable meanwhile is not waited for
        (an upload to a worker that just hung answered only after PUT_TIMEOUT_S): `sync` gives it the file later.

        The bytes go into Ray's object store on a thread: an argument that size is stored at `.remote()`, which
        copied up to --max-upload-mb on the event loop, once per worker."""
        if isinstance(data, bytes):
            data = await asyncio.to_thread(ray.put, data)
        put = asyncio.ensure_future(view.handle.put_asset.remote(name, data))  # Ray hands the actor the bytes
        deadline = time.monotonic() + PUT_TIMEOUT_S
        while not put.done() and view.usable and time.monotonic() < deadline:
            await asyncio.wait({put}, timeout=USABLE_CHECK_S)
        try:
            if not put.done():
                put.cancel()
                state = f"no answer in {PUT_TIMEOUT_S:g} s" if view.usable else f"it is {view.info.state}"
                raise TimeoutError(state)
            put.result()
        except Exception as exc:  # unreachable or gone: `sync` retries from the next poll while it lives
            log.warning("worker=%s did not take asset %s: %s: %s", view.name, name, type(exc).__name__, exc)
            return False
        view.assets.add(name)
        return True

    async def sync(self, view: Any) -> None:
        """Put every front asset this worker lacks into its folder (called with each summary of a live worker).

        A file that is gone from the front's folder, or that no upload could have been named (placed there by hand),
        is dropped from what the workers should hold, once: it must neither fail the front's every poll nor be read
        and refused on each of them. A copy that fails leaves the name missing and ends this sync (the worker may be
        hung: each further file would wait out its own timeout); the next sync tries again."""
        async with view.assets_lock:
            for name in sorted(self._names - view.assets):
                if not await self._sync_one(view, name):
                    return

    def missing(self, view: Any) -> list[str]:
        return sorted(self._names - view.assets)

    async def _sync_one(self, view: Any, name: str) -> bool:
        """False if the worker did not take the file."""
        try:
            data = await asyncio.to_thread((self.store.directory / name).read_bytes)
        except OSError as exc:
            log.warning("asset %s is not copied to the workers: %s", name, exc)
            self._names.discard(name)
            return True
        if not is_upload_name(name, data):
            log.warning("asset %s is not copied to the workers: no upload is named so (placed by hand?)", name)
            self._names.discard(name)
            return True
        return await self._put(view, name, data)
