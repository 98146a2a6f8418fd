"""Joining (or starting) Ray, and refusing work the cluster can never fit."""

from __future__ import annotations

import os

from job.errors import UserError, install_sigterm_handler


def connect(num_workers: int, cpus_per_worker: float) -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # "local" avoids joining a stale cluster recorded in /tmp/ray (GUIDE §2 pitfall 13).
        need = num_workers * cpus_per_worker
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                 include_dashboard=False, log_to_driver=True)
    install_sigterm_handler()  # ray.init replaced ours with a bare sys.exit: `ray job stop` must abort cleanly


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
