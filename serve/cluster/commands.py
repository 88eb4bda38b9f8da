"""`wanrt cluster worker` (Ray actors that serve streams, on each GPU machine) and `wanrt cluster serve` (the HTTP
front). Imported only by those commands: nothing else in wanrt imports Ray."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve.cluster.names import NAMESPACE, worker_name
from serve.cluster.worker import WanrtWorker
from serve.schemas import LoadParams
from serve.settings import ClusterSettings, ServerSettings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # an actor's process start and imports (torch on a GPU machine) on a busy node
STOP_TIMEOUT_S = 15.0  # for every session to hear `stream_stopped` and the pipeline to be freed
MAX_WORKERS_PER_NODE = 64


def run_worker(args: argparse.Namespace, settings: ServerSettings) -> int:
    """Starts one actor per GPU of this node (or `--cpu-workers` CPU seats), then holds them until SIGINT/SIGTERM.

    The actors are owned by this process: if it dies, Ray ends them too (fate sharing), and the front marks them gone.
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
        "max_restarts": 0,  # a restarted actor would have lost every peer connection anyway
        "max_concurrency": 1000,  # asyncio actor: signalling calls of all its sessions interleave on one loop
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    }
    actor_class = ray.remote(WanrtWorker)
    actors, index = [], 0
    while len(actors) < count and index < MAX_WORKERS_PER_NODE:
        name = worker_name(node_id, index)
        index += 1
        try:
            actor = actor_class.options(name=name, **options).remote(name, settings)
        except ValueError:  # the name is taken: another `wanrt cluster worker` on this node holds that index
            continue
        actors.append((name, actor))
    summaries = ray.get([actor.summary.remote() for _, actor in actors], timeout=READY_TIMEOUT_S)
    for summary in summaries:
        print(f"worker {summary.name} ready: node {node_id[:8]} gpus {summary.gpus or 'none (CPU seat)'} "
              f"seats {summary.seats} pid {summary.pid}", flush=True)  # fmt: skip

    if settings.preload_pipeline:  # `--pipeline`: warm from the start (the load runs on in each actor)
        for name, actor in actors:
            reply = ray.get(actor.call.remote("load", settings.preload_pipeline, LoadParams()))
            if reply.error is not None:
                log.error("worker=%s cannot load %s: %s", name, settings.preload_pipeline, reply.detail)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    print("stopping: every session gets stream_stopped", flush=True)
    reason = "this worker is shutting down; reconnect to get a stream on another worker"
    try:
        ray.get([actor.shutdown.remote(reason) for _, actor in actors], timeout=STOP_TIMEOUT_S)
    except Exception as exc:  # a dead or stuck actor must not keep the others alive
        log.warning("not every worker stopped cleanly: %s", exc)
    for _, actor in actors:
        ray.kill(actor)
    ray.shutdown()
    return 0


def run_front(args: argparse.Namespace, settings: ServerSettings) -> int:
    import uvicorn

    from serve.cluster.front import create_cluster_app

    cluster = ClusterSettings(address=args.address, poll_interval_s=args.poll_interval_s)
    uvicorn.run(create_cluster_app(settings, cluster), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0
