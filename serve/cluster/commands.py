"""`wanrt cluster worker` (Ray actors that serve streams, on each GPU machine) and `wanrt cluster serve` (the HTTP
front). Imported only by those commands: nothing else in wanrt imports Ray."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve.cluster.names import NAMESPACE, worker_name
from serve.cluster.worker import WanrtWorker
from serve.schemas import LoadParams
from serve.settings import ClusterSettings, ServerSettings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # an actor's process start and imports (torch on a GPU machine) on a busy node
STOP_TIMEOUT_S = 15.0  # for every session to hear `stream_stopped` and the pipeline to be freed
MAX_WORKERS_PER_NODE = 64
WATCH_INTERVAL_S = 2.0  # how often this process checks that its actors live
WATCH_TIMEOUT_S = 1.0
RESTART_BACKOFF_S = 10.0  # an actor is replaced at most this often


@dataclass
class Slot:
    """One worker actor this process holds, under a name that outlives a crash of the actor."""

    name: str
    actor: Any | None
    """None between the death of an actor and the start of its successor."""
    started_at: float


def run_worker(args: argparse.Namespace, settings: ServerSettings) -> int:
    """Starts one actor per GPU of this node (or `--cpu-workers` CPU seats), then holds them until SIGINT/SIGTERM.

    The actors are owned by this process: if it dies, Ray ends them too (fate sharing), and the front marks them gone.
    An actor that dies on its own (a crash, an out-of-memory kill) is replaced under the same name: the front marks
    the dead one gone, with its sessions, and places new sessions on its successor once that answers.
    """
    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=True, logging_level="WARNING")
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    gpus = int(node["Resources"].get("GPU", 0))
    count = args.cpu_workers if args.cpu_workers else gpus
    if count == 0:
        log.error("this Ray node has no GPU (ray start --num-gpus N declares them); for CPU seats use --cpu-workers N")
        return 2
    options = {
        "num_gpus": 0 if args.cpu_workers else 1,
        "num_cpus": 1 if args.cpu_workers else 0,  # a GPU worker's CPU work is its own thread: do not reserve cores
        "max_restarts": 0,  # Ray's restart would keep no peer connection either; this process replaces it instead
        "max_concurrency": 1000,  # asyncio actor: signalling calls of all its sessions interleave on one loop
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    }
    actor_class = ray.remote(WanrtWorker)

    def start(name: str) -> Any:
        """Raises ValueError while the name is taken (another process's actor, or a dead one not yet released)."""
        actor = actor_class.options(name=name, **options).remote(name, settings, args.log_level.upper())
        if settings.preload_pipeline:  # `--pipeline`: warm from the start (the load runs on in the actor)
            actor.call.remote("load", settings.preload_pipeline, LoadParams())
        return actor

    slots, index = [], 0
    while len(slots) < count and index < MAX_WORKERS_PER_NODE:
        name = worker_name(node_id, index)
        index += 1
        try:
            slots.append(Slot(name, start(name), time.monotonic()))
        except ValueError:  # another `wanrt cluster worker` on this node holds that index
            continue
    summaries = ray.get([slot.actor.summary.remote() for slot in slots], timeout=READY_TIMEOUT_S)
    for summary in summaries:
        print(f"worker {summary.name} ready: node {node_id[:8]} gpus {summary.gpus or 'none (CPU seat)'} "
              f"seats {summary.seats} pid {summary.pid}", flush=True)  # fmt: skip

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(WATCH_INTERVAL_S):
        replace_dead(slots, start)
    print("stopping: every session gets stream_stopped", flush=True)
    reason = "this worker is shutting down; reconnect to get a stream on another worker"
    actors = [slot.actor for slot in slots if slot.actor is not None]
    try:
        ray.get([actor.shutdown.remote(reason) for actor in actors], timeout=STOP_TIMEOUT_S)
    except Exception as exc:  # a dead or stuck actor must not keep the others alive
        log.warning("not every worker stopped cleanly: %s", exc)
    for actor in actors:
        ray.kill(actor)
    ray.shutdown()
    return 0


def replace_dead(slots: list[Slot], start: Callable[[str], Any]) -> None:
    """A slot whose actor died gets a new one, at most once per RESTART_BACKOFF_S (a GPU that kills every actor on
    it must not make a busy loop); an actor that is only slow to answer is left alone."""
    now = time.monotonic()
    for slot in slots:
        if now - slot.started_at < RESTART_BACKOFF_S:
            continue
        if slot.actor is not None:
            try:
                ray.get(slot.actor.summary.remote(), timeout=WATCH_TIMEOUT_S)
                continue
            except ActorDiedError:
                slot.actor = None  # this process's handle holds the dead actor's name: dropping it frees the name
            except (GetTimeoutError, RayActorError):
                continue
        try:
            slot.actor = start(slot.name)
        except ValueError:  # the name is not released yet: the next round tries again
            continue
        slot.started_at = now
        print(f"worker {slot.name} died; a new actor takes its name", flush=True)


def run_front(args: argparse.Namespace, settings: ServerSettings) -> int:
    from serve.cluster.front import create_cluster_app
    from serve.http_server import run_http

    cluster = ClusterSettings(
        address=args.address,
        poll_interval_s=args.poll_interval_s,
        call_timeout_s=args.call_timeout_s,
        release_timeout_s=args.release_timeout_s,
    )
    run_http(create_cluster_app(settings, cluster), settings.host, settings.port, settings.limits, args.log_level)
    return 0
