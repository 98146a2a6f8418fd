"""Joining (or starting) Ray, and refusing work the cluster can never fit."""

from __future__ import annotations

import os
import socket

from job.errors import UserError, install_sigterm_handler

_GCS_PORT_VAR = "RAY_GCS_SERVER_PORT"
_LOOPBACK = "127.0.0.1"


def connect(num_workers: int, cpus_per_worker: float) -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        _start_local(num_cpus=max(os.cpu_count() or 1, int(num_workers * cpus_per_worker + 0.999)))
    install_sigterm_handler()  # ray.init replaced ours with a bare sys.exit: `ray job stop` must abort cleanly


def _start_local(num_cpus: int, attempts: int = 3) -> None:
    """Start a private local Ray whose every process knows its address.

    `address="local"` keeps the driver off a stale cluster recorded in Ray's temp dir, but Ray's own actors
    (Ray Train's PlacementGroupCleaner asks the state API whether the controller lives) resolve "the
    cluster" from RAY_ADDRESS or else from `<tmp>/ray/ray_current_cluster`, which any earlier `ray start
    --head` on the machine leaves behind: a dead address there made every query time out for the whole run,
    and a live one would point them at another cluster. So the GCS port is chosen here and RAY_ADDRESS is
    put in the job's runtime environment, which every actor and worker of this cluster inherits (Ray Train
    merges its own env_vars into it). The state API is served by the dashboard process, so it runs too.
    """
    import ray

    last: Exception | None = None
    for _ in range(attempts):
        port, dashboard_port = _free_port(), _free_port()
        previous = os.environ.get(_GCS_PORT_VAR)
        os.environ[_GCS_PORT_VAR] = str(port)  # read by the head node as it starts; no ray.init() argument
        try:
            # The dashboard process serves the state API those actors query; it listens on loopback only.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=_LOOPBACK,
                     dashboard_port=dashboard_port, log_to_driver=True,
                     runtime_env={"env_vars": {"RAY_ADDRESS": f"{_LOOPBACK}:{port}"}})
            return
        except Exception as exc:  # noqa: BLE001 - the port was taken between the probe and the bind: retry
            last = exc
            ray.shutdown()
        finally:
            if previous is None:
                os.environ.pop(_GCS_PORT_VAR, None)
            else:
                os.environ[_GCS_PORT_VAR] = previous
    raise RuntimeError(f"could not start a local Ray instance: {last}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))  # the GCS listens on every interface; loopback reaches it from this machine
        return s.getsockname()[1]


def check_capacity(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Refuse at once when the cluster can never fit the workers (instead of waiting forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if num_workers * cpus_per_worker > cpus:
        raise UserError(
            f"the Ray cluster has {cpus:g} CPUs but {num_workers} workers x {cpus_per_worker:g} CPUs were "
            "asked for; lower --num-workers / --cpus-per-worker or add nodes"
        )
    if use_gpu and num_workers > gpus:
        raise UserError(
            f"the Ray cluster has {gpus:g} GPUs but --use-gpu with {num_workers} workers needs one each; "
            "lower --num-workers or add GPU nodes"
        )
