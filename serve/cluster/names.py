"""Names that tie a session to its worker without any shared table: the Ray namespace, actor names, session ids.

A worker actor is named `wanrt-worker-<node>-<n>` (the first 8 hex digits of its Ray node id, then its index on that
node), and each of its session ids is `<actor name>.<uuid hex>`. So the cluster front finds the owner of a PATCH, a
DELETE or a metrics call by splitting the id, and any number of fronts agree on it.
"""

from __future__ import annotations

NAMESPACE = "wanrt"
"""Every wanrt process joins this Ray namespace: named actors are only found within their namespace."""
WORKER_PREFIX = "wanrt-worker-"
WORKER_NAME = r"wanrt-worker-[0-9a-f]{8}-[0-9]{1,4}"
"""A worker's name as a pattern: what may stand before the dot of a cluster session id (recordings are named by
session ids, and their ids are checked against this before they become paths)."""


def worker_name(node_id: str, index: int) -> str:
    return f"{WORKER_PREFIX}{node_id[:8]}-{index}"


def session_prefix(worker: str) -> str:
    return f"{worker}."


def owner_of(session_id: str) -> str | None:
    """The worker a session id names, or None for an id no worker made."""
    worker, dot, rest = session_id.rpartition(".")
    if not dot or not rest or not worker.startswith(WORKER_PREFIX):
        return None
    return worker
