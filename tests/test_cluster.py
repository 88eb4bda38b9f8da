"""The cluster: `wanrt cluster serve` in front of `wanrt cluster worker` actors on a real local Ray cluster.

One Ray head per module (in this process), two worker actors with one seat each from one `wanrt cluster worker`,
and the front as a subprocess; aiortc clients (tests/support/rtc_client.py) stream through it. The tests run in
order and share the cluster: each leaves every seat free, except where it says otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import numpy as np
import psutil
import pytest
import torch

from serve.assets import AssetStore
from serve.errors import InternalError, WorkerUnavailable
from serve.hub import HubDownloads
from serve.pipelines.loras import LoraCatalog
from serve.pipelines.registry import PIPELINES
from serve.schemas import Offer
from serve.settings import ClusterSettings
from tests.support.browser import E2E, launch_chromium, seed_pointed_at, static_server
from tests.support.cluster import RunningWorker, local_ray, start_worker
from tests.support.images import png_bytes
from tests.support.local_hub import LocalHub, run_local_hub
from tests.support.loras import Factors, write_lora
from tests.support.rtc_client import ScopeClient, offer_sdp
from tests.support.server import RunningServer, load_pipeline, run_server
from tests.test_browser_ui import OUTPUT_FRAMES, load_in_page
from tests.test_hub import publish
from tests.test_recording import decode_mp4

pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")

pytestmark = pytest.mark.slow
PASSTHROUGH = {"height": 64, "width": 64}
TINY_MODEL = ("streamdiffusionv2", {"height": 64, "width": 64, "random_weights": True})


@dataclass
class Cluster:
    address: str
    tmp_dir: Path
    front: RunningServer
    workers: RunningWorker
    hub: LocalHub
    """The workers' --hub-endpoint: a local hub look-alike (tests/support/local_hub.py), empty until published to."""

    def state(self) -> dict:
        return httpx.get(f"{self.front.url}/api/v1/cluster", timeout=10).json()

    def worker(self, name: str) -> dict:
        return next(w for w in self.state()["workers"] if w["name"] == name)

    def wait(self, predicate, what: str, timeout_s: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while not predicate(state := self.state()):
            assert time.monotonic() < deadline, f"{what}: {state}"
            time.sleep(0.1)
        return state


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp_dir = tmp_path_factory.mktemp("cluster")
    with local_ray() as address, run_local_hub(tmp_dir / "hub") as hub:
        workers = start_worker(
            tmp_dir, address, 2, "--max-sessions", "1", "--allow-random-weights", "--peer-timeout-s", "3",
            "--hub-endpoint", hub.url,
        )  # fmt: skip
        try:
            with run_server(
                tmp_dir, "--poll-interval-s", "0.5", command=("cluster", "serve", "--address", address)
            ) as front:
                yield Cluster(address, tmp_dir, front, workers, hub)
        finally:
            workers.stop()


def tiny_lora(folder: Path, name: str, rank: int) -> Path:
    """A real LoRA file (ComfyUI's layout, one layer of the tiny DiT, 64 wide): what a worker's LoRA folder lists,
    and what a load of the tiny model can merge."""
    generator = torch.Generator().manual_seed(rank)
    factors = Factors(torch.randn(rank, 64, generator=generator), torch.randn(64, rank, generator=generator), 1.0)
    written = write_lora(folder, "comfy_down_up", {"blocks.0.self_attn.q": factors})
    return written.rename(folder / f"{name}.safetensors")


def listed_by_catalog(folder: Path) -> dict[str, dict]:
    """The oracle: what `wanrt serve`'s own catalog lists for that folder (sha256 aside: hashed in the background)."""
    catalog = LoraCatalog(folder)
    try:
        return {entry["path"]: {k: v for k, v in entry.items() if k != "sha256"} for entry in catalog.list()}
    finally:
        catalog.close()


def owner(session_id: str) -> str:
    return session_id.rpartition(".")[0]


def udp_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="udp")}


async def test_offers_land_on_different_workers_and_signalling_reaches_the_owner(cluster: Cluster) -> None:
    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    clients = [ScopeClient(cluster.front.url) for _ in range(2)]
    ids = [await client.connect() for client in clients]  # each PATCHes its candidates through the front: 204
    assert {owner(i) for i in ids} == set(cluster.workers.names), ids  # one seat each: one session per worker
    for client in clients:
        frames = await client.wait_frames(5)
        assert frames[-1].width == 64
    # Media never passes the front: the answer's candidates are UDP ports of the owning worker's own process.
    for session_id, client in zip(ids, clients, strict=True):
        ports = {int(line.split()[5]) for line in client.pc.remoteDescription.sdp.splitlines()
                 if line.startswith("a=candidate:")}  # fmt: skip
        worker_ports = udp_ports(cluster.worker(owner(session_id))["pid"])
        assert ports and ports <= worker_ports, (ports, worker_ports)
        assert not ports & udp_ports(cluster.front.process.pid)
    # Both seats are taken: the next offer is refused with the single server's error.
    async with httpx.AsyncClient(base_url=cluster.front.url, timeout=10) as http:
        response = await http.post("/api/v1/webrtc/offer", json={"sdp": await offer_sdp(), "type": "offer"})
        assert response.status_code == 503 and response.json()["error"] == "CapacityExceeded", response.text
        listed = {s["sessionId"]: s["worker"] for s in (await http.get("/api/v1/webrtc/sessions")).json()["sessions"]}
        assert listed == {i: owner(i) for i in ids}
        metrics = (await http.get(f"/api/v1/sessions/{ids[0]}/metrics")).json()
        assert metrics["sessionId"] == ids[0] and metrics["worker"] == owner(ids[0])
        # A data-channel update goes straight to the owner (media and data never pass the front).
        await clients[1].send({"noise_scale": 0.25})
        deadline = time.monotonic() + 10
        while True:
            sessions = (await http.get("/api/v1/webrtc/sessions")).json()["sessions"]
            if next(s for s in sessions if s["sessionId"] == ids[1])["parameters"].get("noise_scale") == 0.25:
                break
            assert time.monotonic() < deadline, sessions
            await asyncio.sleep(0.1)
        for session_id in ids:
            assert (await http.delete(f"/api/v1/webrtc/offer/{session_id}")).status_code == 204
            again = await http.delete(f"/api/v1/webrtc/offer/{session_id}")
            assert again.status_code == 404 and again.json()["error"] == "UnknownSession"
        unknown = await http.patch("/api/v1/webrtc/offer/nobody.abc", json={"candidates": []})
        assert unknown.status_code == 404
        # A worker's error crosses Ray as the single server raises it: same status, same JSON, no traceback.
        bad = await http.post("/api/v1/webrtc/offer", json={"sdp": "v=0\r\nnot an offer\r\n", "type": "offer"})
        assert bad.status_code == 400 and bad.json()["error"] == "InvalidRequest", bad.text
        assert "Traceback" not in bad.text and "ray" not in bad.json()["detail"].lower()
        # The same contract, declared: the cluster route and the gone-worker answer are in the front's OpenAPI.
        paths = (await http.get("/schema/openapi.json")).json()["paths"]
        assert "200" in paths["/api/v1/cluster"]["get"]["responses"]
        assert "410" in paths["/api/v1/webrtc/offer/{session_id}"]["patch"]["responses"]
        assert {"/api/v1/loras", "/api/v1/models/status", "/api/v1/models/download"} <= set(paths)
    for client in clients:
        await client.close()
    cluster.wait(lambda s: all(not w["sessions"] for w in s["workers"]), "seats not freed")


async def test_twenty_connect_disconnect_cycles_leave_every_seat_free(cluster: Cluster) -> None:
    placed = []
    for _ in range(20):
        client = ScopeClient(cluster.front.url)
        placed.append(owner(await client.connect()))
        await client.wait_frames(1)
        await client.close()
        # The worker frees the seat when the peer closes: the front sees it by its next summary.
        cluster.wait(lambda s: all(not w["sessions"] for w in s["workers"]), "a seat stayed taken", timeout_s=10)
    assert set(placed) <= set(cluster.workers.names)
    state = cluster.state()
    assert [w["sessions"] for w in state["workers"]] == [[], []]
    metrics = cluster.front.metrics()
    assert metrics["wanrt_sessions_active"] == 0 and metrics["wanrt_cluster_workers_alive"] == 2
    # Both workers have it loaded (the first test placed a session on each): loaded is still the one server's 0 or 1.
    assert metrics["wanrt_pipeline_loaded"] == 1 and metrics["wanrt_cluster_workers_loaded"] == 2, metrics


async def test_recordings_are_started_listed_and_downloaded_through_the_front(cluster: Cluster) -> None:
    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    by_parameter = ScopeClient(cluster.front.url, initial_parameters={"input_mode": "video", "recording": True})
    by_route = ScopeClient(cluster.front.url, initial_parameters={"input_mode": "video"})
    ids = [await by_parameter.connect(), await by_route.connect()]
    assert {owner(i) for i in ids} == set(cluster.workers.names)  # one seat each: each recording on its own worker
    async with httpx.AsyncClient(base_url=cluster.front.url, timeout=20) as http:
        started = await http.post(f"/api/v1/recordings/{ids[1]}/start", json={})
        assert started.status_code == 200, started.text
        for client in (by_parameter, by_route):
            await client.wait_frames(len(client.frames) + 30)
        stopped = await http.post(f"/api/v1/recordings/{ids[1]}/stop", json={})
        assert stopped.status_code == 200 and stopped.json()["recording"]["state"] == "done", stopped.text
        await by_parameter.close()  # ending the session stops the recording it started, on its worker
        deadline = time.monotonic() + 20
        while True:
            listing = (await http.get("/api/v1/recordings")).json()
            done = {r["sessionId"]: r for r in listing["recordings"] if r["state"] == "done"}
            if set(ids) <= set(done):
                break
            assert time.monotonic() < deadline, listing
            await asyncio.sleep(0.1)
        assert all(name in listing["directory"] for name in cluster.workers.names), listing["directory"]
        for session_id in ids:
            recording = done[session_id]
            download = await http.get(recording["url"])
            assert download.status_code == 200, download.text
            assert int(download.headers["content-length"]) == recording["size_bytes"] == len(download.content)
            assert f"wanrt-{recording['id']}.mp4" in download.headers["content-disposition"]
            frames = decode_mp4(download.content)
            assert len(frames) == recording["frames"] >= 20 and frames[0][1].shape == (64, 64, 3)
            newest = await http.get(f"/api/v1/recordings/{session_id}")  # Scope's form, after the session ended
            assert newest.content == download.content
        unknown = [f"{owner(ids[0])}.{'0' * 32}-1", f"wanrt-worker-00000000-9.{'0' * 32}-1"]
        for recording_id in unknown:
            response = await http.get(f"/api/v1/recordings/{recording_id}")
            assert response.status_code == 404 and response.json()["error"] == "UnknownRecording", response.text
        assert (await http.get("/api/v1/recordings/nope")).status_code == 400
        again = await http.post(f"/api/v1/recordings/{ids[0]}/start", json={})  # its session ended
        assert again.status_code in (404, 410), again.text
    await by_route.close()
    cluster.wait(lambda s: all(not w["sessions"] for w in s["workers"]), "seats not freed")


@pytest.mark.browser
def test_seed_client_in_chromium_streams_through_the_cluster(cluster: Cluster) -> None:
    """The seed's JavaScript, unchanged but for API_BASE, against the cluster front: signalling goes through the
    front, media and the data channel to the worker the answer names. Then the server's own page, from the front."""

    with static_server(E2E, seed_pointed_at(cluster.front.url)) as page_origin, launch_chromium() as browser:
        page = browser.new_page()
        page.goto(f"{page_origin}/seed_page.html")
        status = page.evaluate("seedFlow.load('passthrough', {height: 64, width: 64})")
        assert status["status"] == "loaded"
        session_id = page.evaluate("seedFlow.start('passthrough', {noise_scale: 0.7})")
        assert owner(session_id) in cluster.workers.names
        deadline = time.monotonic() + 30
        while (output := page.evaluate("seedFlow.outputFrames()"))["frames"] < 10:
            assert time.monotonic() < deadline, f"output {output}; front:\n{cluster.front.log()[-2000:]}"
            time.sleep(0.2)
        assert (output["width"], output["height"]) == (64, 64)
        page.evaluate("seedFlow.send({ noise_scale: 0.5 })")
        deadline = time.monotonic() + 10
        while True:
            sessions = httpx.get(f"{cluster.front.url}/api/v1/webrtc/sessions").json()["sessions"]
            if next(s for s in sessions if s["sessionId"] == session_id)["parameters"]["noise_scale"] == 0.5:
                break
            assert time.monotonic() < deadline, sessions
            time.sleep(0.1)
        page.wait_for_function("window.messages.some((m) => m.type === 'stats')", timeout=10_000)

        async def aiortc_beside() -> str:  # an aiortc client beside the browser's session: the other worker
            client = ScopeClient(cluster.front.url)
            try:
                other = await client.connect()
                await client.wait_frames(2)
                return other
            finally:
                await client.close()

        with ThreadPoolExecutor(1) as thread:  # Playwright's sync API holds this thread's event loop
            other = thread.submit(asyncio.run, aiortc_beside()).result(timeout=60)
        assert {owner(other), owner(session_id)} == set(cluster.workers.names)
        page.evaluate("seedFlow.stop()")
        cluster.wait(lambda s: all(not w["sessions"] for w in s["workers"]), "the seed's stopStream freed no seat")

        # The server's own page, served by the front: load, stream the webcam, stop.
        ui = browser.new_page()
        ui.goto(f"{cluster.front.url}/")
        ui.wait_for_selector("#pipeline-passthrough")
        load_in_page(ui, "passthrough", height=64, width=64)
        ui.wait_for_function("document.getElementById('load-state-text').textContent.includes(': loaded')")
        ui.select_option("#input-source", "webcam")
        ui.get_by_role("button", name="Start stream").click()
        ui.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=10_000)
        assert owner(ui.inner_text("#session-id").strip()) in cluster.workers.names
        deadline = time.monotonic() + 30
        while ui.evaluate(OUTPUT_FRAMES) < 10:
            assert time.monotonic() < deadline, ui.inner_text("header")
            time.sleep(0.2)
        ui.get_by_role("button", name="Stop stream").click()
    cluster.wait(lambda s: all(not w["sessions"] for w in s["workers"]), "the seed's stopStream freed no seat")


async def test_tiny_model_loads_on_an_idle_worker_and_streams(cluster: Cluster) -> None:
    pipeline_id, params = TINY_MODEL
    status = load_pipeline(cluster.front.url, pipeline_id, timeout_s=120, **params)
    assert status["status"] == "loaded", status
    state = cluster.state()
    loaded = [w["name"] for w in state["workers"] if w["pipeline"]["pipeline_id"] == pipeline_id]
    assert len(loaded) == 1 and state["pipeline_id"] == pipeline_id  # the other worker keeps passthrough, warm
    client = ScopeClient(cluster.front.url)
    session_id = await client.connect()
    assert owner(session_id) == loaded[0]  # placed where it is warm
    frames = await client.wait_frames(4, timeout_s=60)
    assert (frames[0].width, frames[0].height) == (64, 64)
    # The seed's reference upload goes to the front; the path it returns holds on the worker the session is on.
    reference = png_bytes(np.full((8, 8, 3), 200, np.uint8))
    uploaded = httpx.post(f"{cluster.front.url}/api/v1/assets", params={"filename": "ref.png"}, content=reference,
                          headers={"Content-Type": "application/octet-stream"}, timeout=10)  # fmt: skip
    assert uploaded.status_code == 200, uploaded.text
    path = uploaded.json()["path"]
    assert (cluster.tmp_dir / "worker-assets" / path).read_bytes() == reference
    assert path in [a["path"] for a in httpx.get(f"{cluster.front.url}/api/v1/assets").json()["assets"]]
    await client.send({"vace_ref_images": [path]})  # checked on the worker, against its own folder: accepted
    await client.send({"vace_ref_images": ["not-uploaded.png"]})
    error = await client.wait_message("error")
    assert "not-uploaded.png" in error["message"] and [m["type"] for m in client.messages].count("error") == 1
    await client.close()
    cluster.wait(lambda s: all(not w["sessions"] for w in s["workers"]), "seat not freed")


async def test_a_worker_cut_off_gets_no_sessions_until_it_answers_again(cluster: Cluster) -> None:
    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    warm = next(w for w in cluster.state()["workers"] if w["pipeline"]["pipeline_id"] == "passthrough")
    os.kill(warm["pid"], signal.SIGSTOP)  # alive to Ray, silent to the front: a hung process, a cut link
    try:
        cluster.wait(lambda s: cluster.worker(warm["name"])["state"] == "unreachable", "stopped worker reachable")
        client = ScopeClient(cluster.front.url)
        assert owner(await client.connect()) != warm["name"]  # the other worker loads passthrough and takes it
        await client.wait_frames(2)
        await client.close()
    finally:
        os.kill(warm["pid"], signal.SIGCONT)
    cluster.wait(lambda s: all(w["state"] == "alive" and not w["sessions"] for w in s["workers"]), "not back")


def test_an_upload_does_not_wait_out_a_worker_that_just_hung(cluster: Cluster) -> None:
    """The upload is put into every live worker's folder before it is answered; one that hung had it wait 30 s. It
    waits no longer than the front's poll takes to find that worker unreachable (which gets it when it answers)."""
    stopped = cluster.state()["workers"][0]
    picture = png_bytes(np.full((8, 8, 3), 40, np.uint8))
    os.kill(stopped["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        uploaded = httpx.post(
            f"{cluster.front.url}/api/v1/assets", params={"filename": "while-hung.png"}, content=picture,
            headers={"Content-Type": "application/octet-stream"}, timeout=60,
        )  # fmt: skip
        waited = time.monotonic() - started
        assert uploaded.status_code == 200, uploaded.text
        assert waited < 15, waited  # the poll's 0.5 s and its 2 s summary timeout, and slack for a loaded machine
        assert cluster.worker(stopped["name"])["state"] == "unreachable"
    finally:
        os.kill(stopped["pid"], signal.SIGCONT)
    cluster.wait(lambda s: all(w["state"] == "alive" for w in s["workers"]), "not back")
    assert (cluster.tmp_dir / "worker-assets" / uploaded.json()["path"]).read_bytes() == picture


async def test_killed_worker_is_gone_and_offers_go_to_live_workers(cluster: Cluster) -> None:
    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    clients = [ScopeClient(cluster.front.url) for _ in range(2)]
    ids = [await client.connect() for client in clients]
    for client in clients:
        await client.wait_frames(2)
    victim, survivor = owner(ids[0]), owner(ids[1])
    old_pid = cluster.worker(victim)["pid"]
    os.kill(old_pid, signal.SIGKILL)  # the GPU process crashes

    # The front marks it gone with its session; then `wanrt cluster worker` starts a new actor under its name.
    cluster.wait(lambda s: ids[0] in cluster.worker(victim)["lost_sessions"], "the dead worker's session not lost")
    async with httpx.AsyncClient(base_url=cluster.front.url, timeout=10) as http:
        for response in (
            await http.patch(f"/api/v1/webrtc/offer/{ids[0]}", json={"candidates": []}),
            await http.delete(f"/api/v1/webrtc/offer/{ids[0]}"),
            await http.get(f"/api/v1/sessions/{ids[0]}/metrics"),
        ):
            assert response.status_code == 410, response.text
            assert response.json()["error"] == "SessionGone" and victim in response.json()["detail"]
        # The other worker's session is untouched.
        assert (await http.get(f"/api/v1/sessions/{ids[1]}/metrics")).status_code == 200
    count = len(clients[1].frames)
    await clients[1].wait_frames(count + 3)
    await clients[1].close()
    cluster.wait(lambda s: not cluster.worker(survivor)["sessions"], "survivor seat not freed")

    client = ScopeClient(cluster.front.url)
    assert owner(await client.connect()) == survivor  # the live, warm one (the dead one or its cold successor: not)
    await client.wait_frames(2)
    await client.close()
    await clients[0].close()
    # The successor answers under the dead one's name, and the old session stays gone.
    state = cluster.wait(
        lambda s: cluster.worker(victim)["state"] == "alive" and cluster.worker(victim)["pid"] != old_pid,
        "no new actor took the dead worker's name",
        timeout_s=30,
    )
    successor = next(w for w in state["workers"] if w["name"] == victim)
    assert successor["lost_sessions"] == [ids[0]] and not successor["sessions"]
    async with httpx.AsyncClient(base_url=cluster.front.url, timeout=10) as http:
        response = await http.delete(f"/api/v1/webrtc/offer/{ids[0]}")
        assert response.status_code == 410, response.text


async def test_joining_worker_takes_new_sessions_and_a_stopping_one_says_stream_stopped(cluster: Cluster) -> None:
    # --pipeline preloads passthrough at its default size, which is not the 64×64 the last load asked for.
    joined = start_worker(cluster.tmp_dir, cluster.address, 1, "--max-sessions", "1", "--pipeline", "passthrough")
    try:
        (name,) = joined.names
        cluster.wait(lambda s: any(w["name"] == name and w["state"] == "alive" for w in s["workers"]), "no join")
        preloaded = cluster.worker(name)["pipeline"]
        assert preloaded["pipeline_id"] == "passthrough" and preloaded["load_params"]["height"] != 64, preloaded
        assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
        alive = [w["name"] for w in cluster.state()["workers"] if w["state"] == "alive"]
        # One seat per worker: as many sessions as live workers fill them all, so one lands on the newcomer, which
        # loads the asked size first (a warm worker is preferred while it has a seat).
        clients = [ScopeClient(cluster.front.url) for _ in alive]
        placed = {owner(await client.connect()): client for client in clients}
        assert set(placed) == set(alive)
        second = placed[name]
        await second.wait_frames(2)
        # Stopping a worker (Ctrl-C): its sessions' data channels still work, so they hear why the stream ended.
        assert joined.stop() == 0
        stopped = await second.wait_message("stream_stopped")
        assert "shutting down" in stopped["error_message"]
        cluster.wait(lambda s: cluster.worker(name)["state"] == "gone", "stopped worker not gone")
        for client in clients:
            await client.close()
    finally:
        joined.stop()


async def test_a_second_front_adopts_the_workers_pipeline_and_routes_the_same_sessions(cluster: Cluster) -> None:
    """Fronts keep no state of their own: a new one (or a restarted one) offers on the pipeline the workers have
    loaded, and a session placed through one front is reached through the other by its id."""
    command = ("cluster", "serve", "--address", cluster.address)
    with run_server(cluster.tmp_dir, "--poll-interval-s", "0.5", command=command) as second:
        status = httpx.get(f"{second.url}/api/v1/pipeline/status", timeout=10).json()
        assert status["status"] == "loaded" and status["pipeline_id"] == "passthrough", status
        client = ScopeClient(second.url)
        session_id = await client.connect()
        await client.wait_frames(2)
        async with httpx.AsyncClient(base_url=cluster.front.url, timeout=10) as http:
            metrics = await http.get(f"/api/v1/sessions/{session_id}/metrics")
            assert metrics.status_code == 200 and metrics.json()["connection_state"] == "connected"
            assert (await http.delete(f"/api/v1/webrtc/offer/{session_id}")).status_code == 204
        await client.close()
    cluster.wait(lambda s: all(not w["sessions"] for w in s["workers"]), "seat not freed")


async def test_unload_frees_every_worker_and_offers_then_need_a_load(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.front.url, timeout=10) as http:
        assert (await http.post("/api/v1/pipeline/unload", json={})).status_code == 200
        assert (await http.get("/api/v1/pipeline/status")).json()["status"] == "not_loaded"
        response = await http.post("/api/v1/webrtc/offer", json={"sdp": await offer_sdp(), "type": "offer"})
        assert response.status_code == 400 and response.json()["error"] == "PipelineNotLoaded"
    state = cluster.state()
    assert all(w["pipeline"]["status"] == "not_loaded" for w in state["workers"] if w["state"] == "alive")


async def test_an_unload_is_waited_for_past_the_timeout_of_an_ordinary_call(cluster: Cluster) -> None:
    """A worker's unload waits for its chunk in flight and the pipeline's release, which may outlast an ordinary
    call's timeout: the front gives it `--release-timeout-s` and reports the worker it freed, while a quick call to the
    same slow worker is given up after `--call-timeout-s`."""
    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    slow = next(w for w in cluster.state()["workers"] if w["pipeline"]["status"] == "loaded")
    command = ("cluster", "serve", "--address", cluster.address)
    with run_server(cluster.tmp_dir, "--call-timeout-s", "1", command=command) as front:
        async with httpx.AsyncClient(base_url=front.url, timeout=30) as http:
            os.kill(slow["pid"], signal.SIGSTOP)  # its answers come late, as from a worker busy freeing a pipeline
            try:
                started = time.monotonic()
                unload = asyncio.create_task(http.post("/api/v1/pipeline/unload", json={}))
                gauges = await http.get("/metrics")  # asks every worker: the slow one is given up on
                assert gauges.status_code == 200 and time.monotonic() - started < 2.5, time.monotonic() - started
                await asyncio.sleep(3.0 - (time.monotonic() - started))
            finally:
                os.kill(slow["pid"], signal.SIGCONT)
            unloaded = await unload
    assert unloaded.status_code == 200 and slow["name"] in unloaded.json()["message"], unloaded.text
    assert time.monotonic() - started >= 3.0
    state = cluster.wait(lambda s: cluster.worker(slow["name"])["state"] == "alive", "slow worker not back")
    assert all(w["pipeline"]["status"] == "not_loaded" for w in state["workers"] if w["state"] != "gone")


async def test_an_unload_sticks_though_a_worker_could_not_be_reached(cluster: Cluster) -> None:
    """The front took the pipeline back from a worker its unload skipped (unreachable then) once that worker answered:
    status said loaded again and offers were placed on it. Now that worker unloads when it answers, and offers need a
    load, as on the single server."""
    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    hung = next(w for w in cluster.state()["workers"] if w["pipeline"]["status"] == "loaded")
    os.kill(hung["pid"], signal.SIGSTOP)
    try:
        cluster.wait(lambda s: cluster.worker(hung["name"])["state"] == "unreachable", "stopped worker reachable")
        async with httpx.AsyncClient(base_url=cluster.front.url, timeout=30) as http:
            unloaded = (await http.post("/api/v1/pipeline/unload", json={})).json()["message"]
        assert f"{hung['name']} cannot be reached now" in unloaded, unloaded
    finally:
        os.kill(hung["pid"], signal.SIGCONT)
    state = cluster.wait(
        lambda s: all(
            w["state"] == "alive" and w["pipeline"]["status"] == "not_loaded"
            for w in s["workers"]
            if w["state"] != "gone"
        ),
        "the unreachable worker did not unload once it answered",
    )
    async with httpx.AsyncClient(base_url=cluster.front.url, timeout=30) as http:
        assert (await http.get("/api/v1/pipeline/status")).json()["status"] == "not_loaded"
        response = await http.post("/api/v1/webrtc/offer", json={"sdp": await offer_sdp(), "type": "offer"})
        assert response.status_code == 400 and response.json()["error"] == "PipelineNotLoaded", response.text
    assert all(not w["sessions"] for w in state["workers"])


async def test_a_call_that_timed_out_is_not_run_by_the_worker_when_it_wakes(cluster: Cluster) -> None:
    """An offer given up on a hung worker was queued there all along: once it woke it answered the offer, and the
    session no client would connect held its seat. A timed-out call is cancelled now (the front, in this process,
    against the cluster's real actors)."""
    from serve.cluster.front import ClusterServing  # Ray: after the module's importorskip
    from serve.cluster.worker import CLOCK_SKEW_S

    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    front = ClusterServing(ClusterSettings(call_timeout_s=1.0), 60.0, AssetStore(cluster.tmp_dir / "front-assets"))
    await front.refresh()
    view = next(view for view in front.workers.values() if view.info.pipeline.status == "loaded")
    offer = Offer(sdp=await offer_sdp(), type="offer")
    os.kill(view.info.pid, signal.SIGSTOP)
    try:
        with pytest.raises(WorkerUnavailable, match="no answer to create_session in 1 s"):
            await front._call(view, "create_session", offer)
        await asyncio.sleep(CLOCK_SKEW_S + 0.5)  # hung for longer than the clocks of two hosts may disagree
    finally:
        os.kill(view.info.pid, signal.SIGCONT)
    await asyncio.sleep(1.0)  # a queued offer would be answered by now (the connect timeout is 10 s)
    view.info.state = "alive"
    assert await front._call(view, "describe_sessions") == []
    await front.close()


async def test_an_offer_to_a_worker_that_lost_the_pipeline_since_its_summary_goes_to_another(
    cluster: Cluster,
) -> None:
    """A worker whose pipeline went (failed, or unloaded behind the front) between two summaries answered the offer
    with PipelineNotLoaded, and the client got that 400 while the front's status said loaded; the next worker is
    tried now. The front here runs in this process on summaries it does not refresh (the cluster's real actors)."""
    from serve.cluster.front import ClusterServing  # Ray: after the module's importorskip

    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    warm = ScopeClient(cluster.front.url)  # warms the second worker too: each then has passthrough loaded
    await warm.connect()
    second = ScopeClient(cluster.front.url)
    await second.connect()
    await warm.close()
    await second.close()
    cluster.wait(lambda s: all(not w["sessions"] for w in s["workers"]), "seats not freed")
    settings = ClusterSettings(placement_max_age_s=3600.0)
    front = ClusterServing(settings, 60.0, AssetStore(cluster.tmp_dir / "front-assets"))
    await front.refresh()
    live = sorted(name for name, view in front.workers.items() if view.usable)
    assert all(front.workers[name].info.pipeline.status == "loaded" for name in live)
    first = front.workers[live[0]]  # the one placement tries first (same readiness, same sessions: by name)
    reply = await first.handle.call.remote("unload")  # behind the front's back: its summary still says loaded
    assert reply.error is None, reply
    answer = await front.create_session(Offer(sdp=await offer_sdp(), type="offer"))
    assert owner(answer.sessionId) == live[1], answer.sessionId
    await front.close_session(answer.sessionId)
    await front.close()


async def test_a_bug_in_a_worker_call_is_an_internal_error_that_costs_a_listing_only_that_worker(
    cluster: Cluster,
) -> None:
    """An exception other than the server's own (here a TypeError from an argument the call does not take) came back
    as Ray's traceback: raised through the front it was a 500 with no logged cause, and it failed a listing of every
    worker. It is the worker's logged InternalError now, and a listing names that worker as skipped."""
    from serve.cluster.front import ClusterServing  # Ray: after the module's importorskip

    front = ClusterServing(ClusterSettings(), 60.0, AssetStore(cluster.tmp_dir / "front-assets"))
    await front.refresh()
    live = [view for view in front.workers.values() if view.usable]
    with pytest.raises(InternalError, match=f"internal error in status on worker {live[0].name}"):
        await front._call(live[0], "status", "an argument it does not take")
    answers, skipped = await front._ask_all("status", "an argument it does not take")
    assert answers == [] and all(skipped[view.name].startswith("InternalError: ") for view in live), skipped
    assert (await front._call(live[0], "status")).status in ("loaded", "not_loaded")  # and it goes on serving
    await front.close()
    deadline = time.monotonic() + 20  # Ray forwards an actor's output to `wanrt cluster worker` in its own time
    while "call status failed" not in (log := cluster.workers.log()):
        assert time.monotonic() < deadline, log
        await asyncio.sleep(0.2)
    assert "TypeError" in log


async def test_an_upload_gone_from_the_front_or_placed_by_hand_costs_only_itself(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file missing from the front's asset folder failed every refresh of the front (500 on every route), and one no
    upload is named as was read and refused at every poll (ClusterAssets against a real worker actor)."""
    from serve.cluster.assets import ClusterAssets  # Ray: after the module's importorskip
    from serve.cluster.front import ClusterServing

    store = AssetStore(tmp_path / "front-assets")
    picture = png_bytes(np.zeros((8, 8, 3), np.uint8))
    for name in ("gone.png", "my photo.png", "ok.png"):  # the second: placed by hand, no upload gets that name
        (store.directory / name).write_bytes(picture)
    front = ClusterServing(ClusterSettings(), 60.0, store)
    await front.refresh()
    await front.uploads_copied()  # the refresh's own copies, on their own tasks
    view = front.workers[next(iter(sorted(front.workers)))]
    view.assets.clear()  # as a worker that just joined
    assets = ClusterAssets(store, lambda: [view])
    (store.directory / "gone.png").unlink()  # removed by hand after the front listed its folder
    caplog.clear()  # what the front's own refresh said
    with caplog.at_level("WARNING", logger="serve.cluster.assets"):
        await assets.sync(view)
        await assets.sync(view)
    assert view.assets == {"ok.png"}
    refused = sorted(r.getMessage() for r in caplog.records if "is not copied to the workers" in r.getMessage())
    assert len(refused) == 2, refused  # each said once, not at every poll
    assert "gone.png" in refused[0] and "my photo.png" in refused[1], refused
    await front.close()


async def test_a_worker_that_lacks_an_upload_is_given_it_before_it_takes_a_session(cluster: Cluster) -> None:
    """A worker just discovered is live, so placeable, before its poll's copy of the front's uploads is done: a
    session placed there in between that named an upload got the worker's "not found". An offer copies what its
    worker lacks first now (the front in this process, on summaries it does not refresh; the real actors)."""
    from serve.cluster.front import ClusterServing  # Ray: after the module's importorskip

    assert load_pipeline(cluster.front.url, "passthrough", **PASSTHROUGH)["status"] == "loaded"
    store = AssetStore(cluster.tmp_dir / "front-assets-late")
    picture = png_bytes(np.full((8, 8, 3), 90, np.uint8))
    name = store.save("late.png", picture).name
    front = ClusterServing(ClusterSettings(placement_max_age_s=3600.0), 60.0, store)
    await front.refresh()
    await front.uploads_copied()
    on_workers = cluster.tmp_dir / "worker-assets" / name  # the two actors share one folder
    assert on_workers.read_bytes() == picture  # the refresh copied it (on a task of its own)
    on_workers.unlink()
    for view in front.workers.values():
        view.assets.clear()  # as workers that just joined, their poll's copy not done yet
    answer = await front.create_session(Offer(sdp=await offer_sdp(), type="offer"))
    try:
        assert on_workers.read_bytes() == picture
        assert name in front.workers[owner(answer.sessionId)].assets
    finally:
        await front.close_session(answer.sessionId)
        await front.close()


async def test_lora_files_and_weights_are_asked_of_every_worker_through_the_front(cluster: Cluster) -> None:
    """LoRA listing and weight downloads read each worker's own folders: the front lists them with the workers that
    have each, reports and starts downloads per worker, and names a worker it could not ask (never a 500)."""
    shared_dir = cluster.tmp_dir / "models" / "lora"  # the fixture's two workers run on one machine, one folder
    shared = tiny_lora(shared_dir / "styles", "shared", rank=2)
    other_dir = cluster.tmp_dir / "other-machine"
    own = tiny_lora(other_dir / "lora", "own", rank=3)
    with run_local_hub(other_dir / "hub") as empty_hub:  # the other machine's hub has no such repository
        other = start_worker(
            cluster.tmp_dir, cluster.address, 1, "--max-sessions", "1", "--models-dir", str(other_dir / "models"),
            "--lora-dir", str(other_dir / "lora"), "--hub-endpoint", empty_hub.url, "--allow-random-weights",
        )  # fmt: skip
        try:
            await _lora_files_and_weights(cluster, other, shared_dir, shared, other_dir, own)
        finally:
            other.stop()


async def _lora_files_and_weights(
    cluster: Cluster, other: RunningWorker, shared_dir: Path, shared: Path, other_dir: Path, own: Path
) -> None:
    (other_name,) = other.names
    cluster.wait(lambda s: cluster.worker(other_name)["state"] == "alive", "the other machine's worker not alive")
    fixture_names = sorted(cluster.workers.names)
    async with httpx.AsyncClient(base_url=cluster.front.url, timeout=30) as http:
        # -- LoRAs: the union of the folders, each file with the workers that have it -------------------------------
        deadline = time.monotonic() + 30
        while True:  # sha256 is null until each worker's background hash is done
            listing = (await http.get("/api/v1/loras")).json()
            files = {f["path"]: f for f in listing["lora_files"]}
            if len(files) == 2 and all(f["sha256"] for f in files.values()):
                break
            assert time.monotonic() < deadline, listing
            await asyncio.sleep(0.2)
        expected = {**listed_by_catalog(shared_dir), **listed_by_catalog(other_dir / "lora")}
        assert set(files) == set(expected) == {"styles/shared.safetensors", "own.safetensors"}
        for path, entry in files.items():
            assert {k: v for k, v in entry.items() if k in expected[path]} == expected[path]  # every field, as served
        assert files["styles/shared.safetensors"]["sha256"] == hashlib.sha256(shared.read_bytes()).hexdigest()
        assert files["own.safetensors"]["sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()
        assert (files["own.safetensors"]["rank"], files["styles/shared.safetensors"]["rank"]) == (3, 2)
        assert files["styles/shared.safetensors"]["workers"] == fixture_names
        assert files["styles/shared.safetensors"]["missing_on"] == [other_name]
        assert (files["own.safetensors"]["workers"], files["own.safetensors"]["missing_on"]) == (
            [other_name],
            fixture_names,
        )
        assert all(why.startswith("gone") for why in listing["skipped_workers"].values()), listing  # earlier tests'

        # -- a load naming a LoRA goes where the file is, and so do its offers ------------------------------------
        pipeline_id, params = TINY_MODEL
        status = load_pipeline(cluster.front.url, pipeline_id, timeout_s=120, **params,
                               loras=[{"path": "own.safetensors", "scale": 0.5}])  # fmt: skip
        assert status["status"] == "loaded", status
        assert [a["path"] for a in status["loaded_lora_adapters"]] == ["own.safetensors"], status
        with_lora = [w["name"] for w in cluster.state()["workers"] if (w["pipeline"]["load_params"] or {}).get("loras")]
        assert with_lora == [other_name], cluster.state()  # the fixture's idle workers lack the file
        client = ScopeClient(cluster.front.url)
        assert owner(await client.connect()) == other_name
        await client.wait_frames(2, timeout_s=60)
        await client.close()
        nowhere = [{"path": "nowhere.safetensors"}]
        both = [{"path": "own.safetensors"}, {"path": "styles/shared.safetensors"}]
        for loras, lacking in (
            (nowhere, {name: "'nowhere.safetensors'" for name in [*fixture_names, other_name]}),
            (both, {**dict.fromkeys(fixture_names, "'own.safetensors'"), other_name: "'styles/shared.safetensors'"}),
        ):
            load = {"pipeline_id": pipeline_id, "load_params": {**params, "loras": loras}}
            refused = await http.post("/api/v1/pipeline/load", json=load)
            assert refused.status_code == 422 and "no live worker has every LoRA" in refused.text, refused.text
            assert all(f"{name} lacks {path}" in refused.text for name, path in lacking.items()), refused.text
        assert (await http.post("/api/v1/pipeline/unload", json={})).status_code == 200

        # -- weights: each worker's status, a download started on every one ---------------------------------------
        sdv2 = PIPELINES["streamdiffusionv2"]
        published = publish(cluster.hub, sdv2)
        total = sum(map(len, published.values()))
        dit = sdv2.files[0]
        cluster.hub.stall(f"{dit.repo}/{dit.path}", after_bytes=1000)
        query = {"pipeline_id": "streamdiffusionv2"}
        before = (await http.get("/api/v1/models/status", params=query)).json()
        assert before["downloaded"] is False and before["progress"]["state"] == "idle"
        assert [w["name"] for w in before["workers"] if not w["error"]] == sorted([*fixture_names, other_name])
        assert all([f["present"] for f in w["files"]] == [False] * len(sdv2.files) for w in before["workers"]
                   if not w["error"])  # fmt: skip
        started = await http.post("/api/v1/models/download", json=query)
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 30
        while True:  # the progress of the workers' downloads, read through the front
            progress = (await http.get("/api/v1/models/status", params=query)).json()["progress"]
            if progress["current_artifact"] == f"{dit.repo}/{dit.path}" and progress["bytes_total"] == 2 * total:
                break  # both of the fixture's workers at its first file: the sum of their totals
            assert time.monotonic() < deadline, progress
            await asyncio.sleep(0.05)
        assert progress["state"] == "downloading" and progress["is_downloading"]
        cluster.hub.release()
        deadline = time.monotonic() + 30
        while (status := (await http.get("/api/v1/models/status", params=query)).json())["progress"]["is_downloading"]:
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
        # The other machine's hub lacks the repository: its worker's error, with its message, in the sum and its own.
        by_name = {w["name"]: w for w in status["workers"]}
        assert status["progress"]["state"] == "error" and status["downloaded"] is False, status
        assert status["progress"]["error"].startswith(f"{other_name}: ") and "not found" in status["progress"]["error"]
        assert by_name[other_name]["progress"]["error"] in status["progress"]["error"]
        assert by_name[other_name]["downloaded"] is False
        # The fixture's workers: what `wanrt serve`'s own status says of their folder, files present and verified.
        oracle = HubDownloads(cluster.tmp_dir / "models", cluster.hub.url).status(sdv2)
        assert oracle.downloaded and all(f.verified for f in oracle.files)
        for name in fixture_names:
            assert by_name[name]["downloaded"] is True and by_name[name]["progress"]["state"] == "done"
            assert by_name[name]["files"] == [msgspec.to_builtins(f) for f in oracle.files]
        for file, data in published.items():
            assert file.local_path(cluster.tmp_dir / "models").read_bytes() == data
            assert len(cluster.hub.gets(file.repo, file.path)) == 1  # two actors, one folder: fetched once
        assert all(not f["present"] for f in status["files"])  # not on every worker
        assert all(other_name in f["local_path"] for f in status["files"])
        # The page's badge: what the workers lack, not what the front's own folder holds (here the fixture's
        # workers' folder, which has every file; the other machine's worker has none).
        schema = (await http.get("/api/v1/pipelines/schemas")).json()["pipelines"]["streamdiffusionv2"]
        assert schema["weights_present"] is False, schema
        assert schema["missing_files"] == [f"{f.repo}/{f.path}" for f in sdv2.files]
        vace = (await http.get("/api/v1/models/status", params={**query, "vace": "true"})).json()
        assert len(vace["files"]) == len(sdv2.files) + len(sdv2.vace_files) > len(status["files"])
        for method, kwargs in (
            ("GET", {"params": {"pipeline_id": "nope"}}),
            ("POST", {"json": {"pipeline_id": "nope"}}),
        ):
            url = "/api/v1/models/status" if method == "GET" else "/api/v1/models/download"
            unknown = await http.request(method, url, **kwargs)
            assert unknown.status_code == 404 and unknown.json()["error"] == "UnknownPipeline", unknown.text

        # -- a worker that cannot answer: named with why, the others' answers stand -------------------------------
        pid = cluster.worker(other_name)["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            cluster.wait(lambda s: cluster.worker(other_name)["state"] == "unreachable", "stopped worker reachable")
            listing = (await http.get("/api/v1/loras")).json()
            assert [f["path"] for f in listing["lora_files"]] == ["styles/shared.safetensors"]
            assert listing["lora_files"][0]["missing_on"] == []
            assert listing["skipped_workers"][other_name].startswith("unreachable: "), listing
            status = (await http.get("/api/v1/models/status", params=query)).json()
            assert status["downloaded"] is True and status["progress"]["state"] == "done"  # on every worker it asked
            assert {w["name"]: w["error"] for w in status["workers"]}[other_name].startswith("unreachable: ")
        finally:
            os.kill(pid, signal.SIGCONT)
        cluster.wait(lambda s: cluster.worker(other_name)["state"] == "alive", "the other worker not back")
        assert other.stop() == 0
        cluster.wait(lambda s: cluster.worker(other_name)["state"] == "gone", "stopped worker not gone")
        listing = (await http.get("/api/v1/loras")).json()
        assert listing["skipped_workers"][other_name].startswith("gone: ")
        assert [f["workers"] for f in listing["lora_files"]] == [fixture_names]
        again = await http.post("/api/v1/models/download", json={"pipeline_id": "passthrough"})
        assert again.status_code == 200 and again.json()["downloaded"] is True  # nothing to fetch: none started
        schema = (await http.get("/api/v1/pipelines/schemas")).json()["pipelines"]["streamdiffusionv2"]
        assert schema["weights_present"] is True and schema["missing_files"] == []  # every live worker has them


async def test_a_worker_whose_summary_fails_is_left_out_and_the_front_still_answers(cluster: Cluster) -> None:
    """A summary that raised (Ray's RayTaskError wrapping the worker's own error, say the FileNotFoundError of a LoRA
    folder walk that met a subfolder removed meanwhile) was neither a dead nor an unreachable actor to the front: the
    whole refresh raised, and every request that refreshes (offers, loads, status, listings) answered 500. A real
    actor under a worker's name here answers its summaries until the test has it fail (the cluster's own front polls
    it too)."""
    import ray

    from serve.cluster.front import ClusterServing  # Ray: after the module's importorskip
    from serve.cluster.names import NAMESPACE, WORKER_PREFIX
    from serve.schemas import ClusterWorker

    name = f"{WORKER_PREFIX}flaky000-0"

    @ray.remote(num_cpus=0)
    class FailingSummary:
        def __init__(self) -> None:
            self.failing = False

        def fail(self) -> None:
            self.failing = True

        def summary(self) -> ClusterWorker:
            if self.failing:
                raise FileNotFoundError("styles/old: no such folder (removed during the walk)")
            return ClusterWorker(name=name, state="alive", seats=1)

    actor = FailingSummary.options(name=name, namespace=NAMESPACE).remote()
    front = ClusterServing(ClusterSettings(), 60.0, AssetStore(cluster.tmp_dir / "front-assets"))
    try:
        await front.refresh()
        assert front.workers[name].usable
        await actor.fail.remote()
        await front.refresh()  # raised here
        flaky = front.workers[name].info
        assert flaky.state == "unreachable" and "FileNotFoundError" in (flaky.error or ""), flaky
        assert sum(view.usable for view in front.workers.values()) == 2  # the real workers are still placed
        assert (await front.status()).status in ("loaded", "not_loaded")
        assert httpx.get(f"{cluster.front.url}/api/v1/pipeline/status", timeout=10).status_code == 200
    finally:
        await front.close()
        ray.kill(actor)


async def test_a_stopping_worker_is_not_given_new_sessions(cluster: Cluster) -> None:
    """A worker ending its sessions to leave (Ctrl-C: `shutdown`) still said alive, loaded and idle, the best seat
    for every new offer, which it answered and then dropped with its process, without a `stream_stopped`. It says
    `stopping` now, and refuses an offer placed before its front saw that."""
    from serve.cluster.front import ClusterServing  # Ray: after the module's importorskip

    joined = start_worker(cluster.tmp_dir, cluster.address, 1, "--max-sessions", "1", "--pipeline", "passthrough")
    front = ClusterServing(ClusterSettings(), 60.0, AssetStore(cluster.tmp_dir / "front-assets"))
    try:
        (name,) = joined.names
        await front.refresh()
        view = front.workers[name]
        assert view.usable
        await view.handle.shutdown.remote("a test stops it")
        await front.refresh()
        assert view.info.state == "stopping" and not view.usable
        with pytest.raises(WorkerUnavailable, match="is stopping"):
            await front._call(view, "create_session", Offer(sdp=await offer_sdp(), type="offer"))
        metrics = httpx.get(f"{cluster.front.url}/metrics", timeout=10).text
        assert "wanrt_cluster_workers_stopping" in metrics
    finally:
        await front.close()
        joined.stop()


async def test_a_load_with_no_live_worker_says_so(cluster: Cluster) -> None:
    """It was refused as if every worker were "streaming another pipeline", which sent a user to close sessions
    that did not exist."""
    from serve.cluster.front import ClusterServing  # Ray: after the module's importorskip
    from serve.schemas import LoadParams

    front = ClusterServing(ClusterSettings(placement_max_age_s=3600.0), 60.0, AssetStore(cluster.tmp_dir / "fa"))
    try:
        await front.refresh()
        for view in front.workers.values():
            view.info.state = "unreachable"  # what the poll makes of workers that stopped answering
        with pytest.raises(WorkerUnavailable, match="no live worker to load 'passthrough'"):
            await front.load("passthrough", LoadParams(height=64, width=64))
    finally:
        await front.close()


async def test_a_worker_long_gone_leaves_the_listing(cluster: Cluster) -> None:
    """Worker names carry their node's id, so each node restart adds a gone worker, and the front listed (and
    sorted, and counted) every one it ever saw. One gone for over GONE_KEPT_S whose name Ray no longer lists goes;
    one gone just now stays, to answer its sessions 410."""
    from serve.cluster.front import GONE_KEPT_S, ClusterServing  # Ray: after the module's importorskip
    from serve.cluster.views import WorkerView
    from serve.schemas import ClusterWorker

    front = ClusterServing(ClusterSettings(), 60.0, AssetStore(cluster.tmp_dir / "fa"))
    try:
        for name, seen in (("wanrt-worker-restart1-0", time.time() - GONE_KEPT_S - 1), ("wanrt-worker-recent0-0",
                                                                                         time.time())):  # fmt: skip
            front.workers[name] = WorkerView(name, None, ClusterWorker(name=name, state="gone", last_seen=seen))
        await front.refresh()
        assert "wanrt-worker-restart1-0" not in front.workers and "wanrt-worker-recent0-0" in front.workers
        assert sum(view.usable for view in front.workers.values()) == 2  # the live ones stay, of course
    finally:
        await front.close()
