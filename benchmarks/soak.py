"""Soak: two real servers for many minutes, sampled every 30 s; does anything grow?

    python -m benchmarks.soak [--minutes 10] [--churn-s 4] [--sample-s 30]   (or `make soak SOAK_MINUTES=10`)

- server A runs a model pipeline (`streamdiffusionv2`, tiny random weights, 64×64) with one steady stream;
- server B runs `passthrough` (128×128) with one steady stream, and sessions that join and leave every `--churn-s`
  seconds next to it (alternately closing politely and vanishing without a word, which only ICE consent notices).

Every sample records each server's RSS, open fds, threads and sessions; at the end the table gives their slopes
after the warm-up (the first sample and the first minute are left out) and the steady streams' frames and drops
(counter gaps in the passthrough output, whose frames carry their input index). Goal (issue 14): RSS flat, ≤ 1 MB/min
after warm-up, fds and threads flat, no drops in the steady stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from tests.support.rtc_client import ScopeClient
from tests.support.server import RunningServer, load_pipeline, run_server

WARM_UP_S = 60.0


@dataclass
class Samples:
    name: str
    server: RunningServer
    rows: list[dict[str, float]] = field(default_factory=list)

    def take(self, elapsed_s: float) -> dict[str, float]:
        process = psutil.Process(self.server.process.pid)
        metrics = self.server.metrics()
        row = {
            "t_s": elapsed_s,
            "rss_mb": process.memory_info().rss / 1e6,
            "fds": process.num_fds(),
            "threads": process.num_threads(),
            "sessions": metrics["wanrt_sessions_active"],
            "frames_out": metrics["wanrt_frames_out_total"],
            "dropped": metrics["wanrt_frames_dropped_total"],
        }
        self.rows.append(row)
        return row

    def slope_per_min(self, key: str) -> float:
        """Least-squares slope after the warm-up, per minute."""
        rows = [r for r in self.rows[1:] if r["t_s"] >= WARM_UP_S] or self.rows[-2:]
        if len(rows) < 2:
            return float("nan")
        return statistics.linear_regression([r["t_s"] / 60 for r in rows], [r[key] for r in rows]).slope


async def churn(url: str, every_s: float, stop: asyncio.Event, counts: dict[str, int]) -> None:
    vanished: list[ScopeClient] = []
    while not stop.is_set():
        client = ScopeClient(url, initial_parameters={"input_mode": "video"})
        try:
            await client.connect()
            await client.wait_frames(3, timeout_s=15)
        except Exception as exc:  # a refused or slow join is a result, not a crash of the soak
            counts["failed"] += 1
            Console().print(f"churn join failed: {type(exc).__name__}: {exc}")
            await client.pc.close()
            continue
        counts["joined"] += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if counts["joined"] % 2:
            await client.vanish()
            vanished.append(client)
        else:
            await client.close()
    for client in vanished:
        await client.pc.close()


def gaps(client: ScopeClient) -> int:
    counters = [f.counter for f in client.frames]
    return sum(b - a - 1 for a, b in itertools.pairwise(counters) if b > a)


async def soak(model: Samples, passthrough: Samples, minutes: float, churn_s: float, sample_s: float) -> dict:
    steady_model = ScopeClient(model.server.url, initial_parameters={"input_mode": "video"})
    steady = ScopeClient(passthrough.server.url, initial_parameters={"input_mode": "video"})
    await steady_model.connect()
    await steady.connect()
    await steady.wait_frames(10)
    await steady_model.wait_frames(1, timeout_s=60)
    stop, counts = asyncio.Event(), {"joined": 0, "failed": 0}
    churning = asyncio.create_task(churn(passthrough.server.url, churn_s, stop, counts))
    started = time.monotonic()
    console = Console(width=140)
    while (elapsed := time.monotonic() - started) < minutes * 60:
        for samples in (model, passthrough):
            row = samples.take(elapsed)
            console.print(
                f"{elapsed:6.0f} s {samples.name:11} rss {row['rss_mb']:7.1f} MB fds {row['fds']:4.0f} "
                f"threads {row['threads']:3.0f} sessions {row['sessions']:2.0f} frames out {row['frames_out']:7.0f}"
            )
        await asyncio.sleep(max(0.0, sample_s - (time.monotonic() - started - elapsed)))
    for samples in (model, passthrough):
        samples.take(time.monotonic() - started)
    stop.set()
    await churning
    steady_frames = len(steady.frames)
    result = {
        "steady_frames": steady_frames,
        "steady_gaps": gaps(steady),
        "steady_fps": steady_frames / (time.monotonic() - started),
        "model_frames": len(steady_model.frames),
        **counts,
    }
    await steady.close()
    await steady_model.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--churn-s", type=float, default=4.0, help="how long each churn session stays")
    parser.add_argument("--sample-s", type=float, default=30.0)
    args = parser.parse_args()
    common = ("--log-level", "warning", "--peer-timeout-s", "3", "--max-sessions", "16")
    with (
        tempfile.TemporaryDirectory() as model_tmp,
        tempfile.TemporaryDirectory() as passthrough_tmp,
        run_server(Path(model_tmp), *common, "--allow-random-weights") as model_server,
        run_server(Path(passthrough_tmp), *common) as passthrough_server,
    ):
        status = load_pipeline(
            model_server.url, "streamdiffusionv2", timeout_s=300, height=64, width=64, random_weights=True
        )
        assert status["status"] == "loaded", status
        load_pipeline(passthrough_server.url, "passthrough", height=128, width=128)
        model, passthrough = Samples("model", model_server), Samples("passthrough", passthrough_server)
        result = asyncio.run(soak(model, passthrough, args.minutes, args.churn_s, args.sample_s))

    table = Table(title=f"soak, {args.minutes:g} min, a churn session every {args.churn_s:g} s on passthrough")
    for column in ("server", "RSS start → end (MB)", "RSS slope (MB/min)", "fds", "threads", "sessions at end"):
        table.add_column(column, justify="right")
    for samples in (model, passthrough):
        first, last = samples.rows[0], samples.rows[-1]
        table.add_row(
            samples.name,
            f"{first['rss_mb']:.1f} → {last['rss_mb']:.1f}",
            f"{samples.slope_per_min('rss_mb'):+.2f}",
            f"{first['fds']:.0f} → {last['fds']:.0f} ({samples.slope_per_min('fds'):+.2f}/min)",
            f"{first['threads']:.0f} → {last['threads']:.0f} ({samples.slope_per_min('threads'):+.2f}/min)",
            f"{last['sessions']:.0f}",
        )
    console = Console(width=140)
    console.print(table)
    console.print(
        f"steady passthrough stream: {result['steady_frames']} frames ({result['steady_fps']:.1f} fps), "
        f"{result['steady_gaps']} missing; steady model stream: {result['model_frames']} frames; "
        f"churn sessions: {result['joined']} joined, {result['failed']} failed to join"
    )


if __name__ == "__main__":
    main()
