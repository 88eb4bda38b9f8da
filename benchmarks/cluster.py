"""What the cluster front costs: offer → first frame with and without it, and sessions placed per second.

    python -m benchmarks.cluster [--sessions 10] [--offers 40] [--workers 2]

Two setups serve `passthrough` at 64×64 on this machine, over loopback:
- `wanrt serve`: the single server;
- `wanrt cluster serve` in front of `wanrt cluster worker --cpu-workers N` on a local Ray head (in this process).
For each: `--sessions` aiortc clients one after another, each timed from its offer POST to the end of its
signalling (answer applied, candidates PATCHed) and to its first decoded output frame (then closed); and `--offers`
offers that never connect, sent 8 at a time and deleted as soon as they are answered, for the placement rate
(offer → answer: the front's placement plus the worker's aiortc answer). The cold start (a worker loading the
pipeline on its first offer) is excluded: every worker is warmed first.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from tests.support.cluster import local_ray, start_worker
from tests.support.rtc_client import ScopeClient, offer_sdp
from tests.support.server import load_pipeline, run_server

SIZE = {"height": 64, "width": 64}
CONCURRENT_OFFERS = 8


async def first_frames(url: str, sessions: int) -> tuple[list[float], list[float]]:
    """Per session: offer → answer applied and candidates PATCHed (ms), and offer → first output frame (ms)."""
    answers, firsts = [], []
    for _ in range(sessions):
        client = ScopeClient(url)
        start = time.monotonic()
        await client.connect()  # POST offer, set the answer, PATCH the candidates
        answered = time.monotonic()
        frames = await client.wait_frames(1, timeout_s=30)
        answers.append((answered - start) * 1e3)
        firsts.append((frames[0].at - start) * 1e3)
        await client.close()
        await asyncio.sleep(0.3)  # the seat is freed when the worker sees the close
    return answers, firsts


async def patch_ms(url: str, calls: int = 50) -> float:
    """p50 of an empty trickle PATCH on a live session: the front's per-call cost, alone."""
    client = ScopeClient(url)
    session_id = await client.connect()
    times = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(calls):
            start = time.monotonic()
            response = await http.patch(f"/api/v1/webrtc/offer/{session_id}", json={"candidates": []})
            times.append((time.monotonic() - start) * 1e3)
            assert response.status_code == 204, response.text
    await client.close()
    await asyncio.sleep(0.3)
    return statistics.median(times)


async def placement_rate(url: str, offers: int) -> float:
    """Offers answered per second, CONCURRENT_OFFERS in flight, each deleted once answered."""
    sdp = await offer_sdp()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        gate = asyncio.Semaphore(CONCURRENT_OFFERS)

        async def one() -> None:
            async with gate:
                for _ in range(50):  # a seat taken by a just-deleted session frees in a moment
                    response = await http.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
                    if response.status_code != 503:
                        break
                    await asyncio.sleep(0.02)
                response.raise_for_status()
                await http.delete(f"/api/v1/webrtc/offer/{response.json()['sessionId']}")

        start = time.monotonic()
        await asyncio.gather(*(one() for _ in range(offers)))
        return offers / (time.monotonic() - start)


async def measure(url: str, sessions: int, offers: int) -> dict[str, float]:
    # Every seat taken once before anything is timed: each worker has loaded passthrough (a cold one on its first
    # offer), and every worker process has made a peer connection.
    clients = [ScopeClient(url) for _ in range(CONCURRENT_OFFERS)]
    for client in clients:
        await client.connect()
        await client.wait_frames(1, timeout_s=60)
    for client in clients:
        await client.close()
    await asyncio.sleep(1.0)
    answers, firsts = await first_frames(url, sessions)
    patch = await patch_ms(url)
    rate = await placement_rate(url, offers)
    return {
        "patch_p50_ms": patch,
        "answer_p50_ms": statistics.median(answers),
        "first_frame_p50_ms": statistics.median(firsts),
        "first_frame_max_ms": max(firsts),
        "offers_per_s": rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--offers", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        with run_server(tmp_dir, "--max-sessions", str(CONCURRENT_OFFERS)) as server:
            load_pipeline(server.url, "passthrough", **SIZE)
            results["wanrt serve"] = asyncio.run(measure(server.url, args.sessions, args.offers))
        with local_ray() as address:
            # The single server's seats, split over the workers: the concurrent offers need all of them.
            seats = str(max(1, CONCURRENT_OFFERS // args.workers))
            workers = start_worker(tmp_dir, address, args.workers, "--max-sessions", seats)
            try:
                command = ("cluster", "serve", "--address", address)
                with run_server(tmp_dir, "--poll-interval-s", "0.5", command=command) as front:
                    load_pipeline(front.url, "passthrough", **SIZE)
                    name = f"cluster front, {args.workers} workers"
                    results[name] = asyncio.run(measure(front.url, args.sessions, args.offers))
            finally:
                workers.stop()

    table = Table(title=f"offer → first frame and placement, passthrough 64×64, loopback ({args.sessions} sessions)")
    columns = (
        "setup",
        "offer→signalled p50 ms",
        "offer→first frame p50 ms",
        "max ms",
        "PATCH p50 ms",
        "offers placed /s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "setup" else "right")
    for name, r in results.items():
        keys = ("answer_p50_ms", "first_frame_p50_ms", "first_frame_max_ms", "patch_p50_ms", "offers_per_s")
        table.add_row(name, *(f"{r[key]:.1f}" for key in keys))
    single, cluster = results["wanrt serve"], results[f"cluster front, {args.workers} workers"]
    table.caption = (
        f"cluster front adds {cluster['first_frame_p50_ms'] - single['first_frame_p50_ms']:+.1f} ms to the first frame "
        f"(p50), {cluster['answer_p50_ms'] - single['answer_p50_ms']:+.1f} ms to the signalling (offer + PATCH)"
    )
    Console().print(table)


if __name__ == "__main__":
    main()
