"""Announce this pod's coming loss to Ray: the worker pods' preStop hook.

    python -m job.drain_node --deadline-seconds 150 [--reason-message "..."]

Kubernetes runs it inside a Ray worker pod that is about to go (a spot reclaim, a node drain, a scale-down). It
drains this pod's Ray node with reason PREEMPTION and a deadline, the call `ray drain-node` makes, so that Ray
Train's PreemptionWatcher sees it within its poll interval and the workers checkpoint at the next step; then it
waits until no Ray Train worker is left on the node (the group restarted elsewhere) or the deadline passes, and
exits. It always exits 0, quickly when something is missing: a preStop hook that fails or hangs only delays the
pod's deletion, it never saves it.

Which Ray node is this pod's: KubeRay puts the pod's name in RAY_CLOUD_INSTANCE_ID and `ray start` records it as
the node's instance id; without it, the one raylet process running here. The GCS address is RAY_ADDRESS (KubeRay:
the head service's gcs port), and token auth reads RAY_AUTH_MODE / RAY_AUTH_TOKEN as every Ray process does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from typing import Any

# The actor class of Ray Train V2's workers (ray/train/v2/_internal/execution/worker_group/worker.py).
TRAIN_WORKER_CLASS = "RayTrainWorker"
# Between checks of the node's train workers; Ray Train itself polls drains every 5 s.
POLL_SECONDS = 1.0
# Each GCS request: a hung GCS must not eat the pod's grace period.
RPC_TIMEOUT_SECONDS = 5.0
# Ray's GcsClient waits 5 s + 5 s + 30 s for a GCS it cannot reach; a plain TCP connect answers first.
CONNECT_TIMEOUT_SECONDS = 3.0


class DrainSkipped(Exception):
    """Nothing to drain here or no way to: said in one line, exit 0."""


def _say(message: str) -> None:
    print(f"drain_node: {message}", flush=True)


def gcs_address() -> str:
    """host:port of the GCS from RAY_ADDRESS (KubeRay sets `<head service>:6379` on every Ray container)."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or address == "auto":
        raise DrainSkipped("RAY_ADDRESS is not set: not inside a Ray node's container, nothing to drain")
    if "://" in address:  # a dashboard URL (http://host:8265) is the job API, not the GCS
        raise DrainSkipped(f"RAY_ADDRESS={address} is not a GCS address (host:port)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DrainSkipped(f"RAY_ADDRESS={address} is not host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as exc:
        raise DrainSkipped(f"the GCS at {address} is unreachable ({exc.strerror or exc})") from None
    return address


def _local_raylet_ids() -> list[str]:
    """Node ids of the raylet processes on this host (in a pod: this pod's one)."""
    from ray._private.services import find_node_ids

    return list(find_node_ids())


def find_this_node(gcs: Any) -> Any:
    """The GcsNodeInfo of this pod's live Ray node."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    alive = list(gcs.get_all_node_info(timeout=RPC_TIMEOUT_SECONDS,
                                       state_filter=GcsNodeInfo.GcsNodeState.ALIVE).values())
    instance_id = os.environ.get("RAY_CLOUD_INSTANCE_ID", "")
    if instance_id:
        found = [n for n in alive if n.instance_id == instance_id]
        what = f"instance id {instance_id}"
    else:
        local = set(_local_raylet_ids())
        found = [n for n in alive if n.node_id.hex() in local]
        what = "a raylet process on this host"
    if not found:
        raise DrainSkipped(f"no live Ray node with {what}: the node is gone or never joined")
    if len(found) > 1:
        raise DrainSkipped(f"{len(found)} live Ray nodes with {what}; set RAY_CLOUD_INSTANCE_ID to choose one")
    if found[0].is_head_node:
        # Losing the head ends the job; a preemption signal cannot save it and would only stop scheduling there.
        raise DrainSkipped("this is the head node: not drained")
    return found[0]


def drain(gcs: Any, node_id: str, deadline_seconds: int, message: str) -> int:
    """Drain `node_id` (hex) as preempted with a deadline; the deadline in epoch ms."""
    from ray.core.generated import autoscaler_pb2

    deadline_ms = time.time_ns() // 1_000_000 + deadline_seconds * 1000
    # Hex, as `ray drain-node` passes it (ray/scripts/scripts.py, drain_node): the GCS decodes it with FromHex,
    # and a binary id would become the nil id, which it "accepts" without draining anything.
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   message, deadline_ms, timeout=RPC_TIMEOUT_SECONDS)
    if not accepted:  # a preemption drain is not rejectable; said in case a Ray version differs
        raise DrainSkipped(f"the drain request was rejected: {why}")
    return deadline_ms


def train_workers_on(gcs: Any, node_id: str) -> int:
    """How many Ray Train worker actors are alive on `node_id` (hex)."""

    async def alive_actors() -> dict:
        return await gcs.async_get_all_actor_info(actor_state_name="ALIVE", timeout=RPC_TIMEOUT_SECONDS)

    actors = asyncio.run(alive_actors())
    return sum(1 for a in actors.values()
               if a.class_name == TRAIN_WORKER_CLASS and a.address.node_id.hex() == node_id)


def node_alive(gcs: Any, node_id: str) -> bool:
    """Whether the GCS still lists `node_id` (hex) alive: a draining raylet with nothing left to run exits."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    alive = gcs.get_all_node_info(timeout=RPC_TIMEOUT_SECONDS, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
    return any(n.node_id.hex() == node_id for n in alive.values())


def wait_for_train_workers(gcs: Any, node_id: str, deadline: float) -> str:
    """Until no train worker is left on the node, the node is gone, or the monotonic `deadline`: which one."""
    while True:
        if not node_alive(gcs, node_id):
            return "the node has left the cluster"
        workers = train_workers_on(gcs, node_id)
        if workers == 0:
            return "no Ray Train worker is left on the node"
        if time.monotonic() >= deadline:
            return f"deadline reached with {workers} Ray Train worker(s) still on the node"
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def run(deadline_seconds: int, message: str) -> str:
    started = time.monotonic()
    address = gcs_address()
    from ray._raylet import GcsClient

    gcs = GcsClient(address=address)
    node = find_this_node(gcs)
    node_id = node.node_id.hex()
    drain(gcs, node_id, deadline_seconds, message)
    _say(f"node {node_id[:12]} ({node.instance_id or node.node_manager_address}) drained as preempted, "
         f"deadline in {deadline_seconds} s; waiting for its Ray Train workers to leave")
    outcome = wait_for_train_workers(gcs, node_id, started + deadline_seconds)
    return f"{outcome} after {time.monotonic() - started:.0f} s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m job.drain_node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline-seconds", type=int, required=True,
                        help="when the node will be gone, from now; the longest this command waits")
    parser.add_argument("--reason-message", default="Kubernetes is deleting this pod (preStop hook)",
                        help="shown by Ray next to the drain")
    args = parser.parse_args(argv)
    if args.deadline_seconds < 0:
        parser.error("--deadline-seconds cannot be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _say(run(args.deadline_seconds, args.reason_message))
    except DrainSkipped as exc:
        _say(f"{exc}; nothing done")
    except Exception as exc:  # noqa: BLE001 - a preStop hook must never fail or print a traceback: one line, exit 0
        _say(f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); "
             "nothing more done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
