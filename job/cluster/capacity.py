"""Joining (or starting) Ray, and refusing work the cluster can never fit."""

from __future__ import annotations

import os
import socket
import time

from job.core.errors import UserError, install_sigterm_handler

# Ray inside each function: `--in-process` runs, `--help` and the driver's refusals before any cluster never import it.

_GCS_PORT_VAR = "RAY_GCS_SERVER_PORT"
_LOOPBACK = "127.0.0.1"


def connect(num_workers: int, cpus_per_worker: float, dashboard: bool = True) -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local Ray; `dashboard=False` where the job
    needs no state API (plain actors, not Ray Train): a local Ray then starts 1-2 s sooner."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        _start_local(num_cpus=max(os.cpu_count() or 1, int(num_workers * cpus_per_worker + 0.999)),
                     dashboard=dashboard)
    install_sigterm_handler()  # ray.init replaced ours with a bare sys.exit: `ray job stop` must abort cleanly


def _start_local(num_cpus: int, dashboard: bool = True, attempts: int = 3) -> None:
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
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=_LOOPBACK,
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


def check_capacity(num_workers: int, cpus_per_worker: float, use_gpu: bool,
                   wait_minutes: float | None = None) -> float:
    """Minutes to wait for the cluster to fit the workers: 0 when it fits them now. A static cluster that cannot
    is refused at once (instead of Ray Train waiting forever); one that can grow (an autoscaler answers that it
    can add the nodes, or `wait_minutes` > 0) gets `wait_minutes` (default 15 with an autoscaler): see
    wait_for_capacity."""
    short = _shortfall(num_workers, cpus_per_worker, use_gpu)
    if short is None:
        return 0.0
    if wait_minutes is None:
        grows = autoscaler_running(_bundles(num_workers, cpus_per_worker, use_gpu))
        wait_minutes = AUTOSCALER_WAIT_MINUTES if grows else 0.0
    if wait_minutes <= 0:
        fix = "lower --num-workers or add GPU nodes" if "GPUs" in short else \
            "lower --num-workers / --cpus-per-worker or add nodes"
        raise UserError(f"{short}; {fix} (or let it grow: --capacity-wait-minutes)")
    return wait_minutes


def wait_for_capacity(num_workers: int, cpus_per_worker: float, use_gpu: bool, wait_minutes: float,
                      log=print, poll_seconds: float = 2.0) -> None:
    """Ask the autoscaler for the workers' nodes and wait (bounded) until the cluster fits them."""
    import ray
    from ray.autoscaler.sdk import request_resources

    if wait_minutes <= 0:
        return
    short = _shortfall(num_workers, cpus_per_worker, use_gpu)
    if short is None:
        return
    log(f"{short}: waiting up to {wait_minutes:g} min for the cluster to grow (--capacity-wait-minutes)")
    request_resources(bundles=_bundles(num_workers, cpus_per_worker, use_gpu))  # no-op without an autoscaler
    deadline = time.monotonic() + wait_minutes * 60
    try:
        while (short := _shortfall(num_workers, cpus_per_worker, use_gpu)) is not None:
            if time.monotonic() > deadline:
                raise UserError(f"{short} after waiting {wait_minutes:g} min for more nodes; check the autoscaler "
                                "(its max replicas, node quotas) or lower --num-workers")
            time.sleep(poll_seconds)
    finally:
        # The request stands until overridden: left, it would keep those nodes up on a long-lived cluster after
        # this job (or keep scaling for a job that gave up). Ray Train's workers hold the nodes from here.
        request_resources(bundles=[])
    total = ray.cluster_resources()
    log(f"the cluster has grown to {total.get('CPU', 0.0):g} CPUs and {total.get('GPU', 0.0):g} GPUs")


AUTOSCALER_WAIT_MINUTES = 15.0


def _shortfall(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> str | None:
    """What the cluster lacks for the workers (its total resources, busy or not), or None."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if num_workers * cpus_per_worker > cpus:
        return f"the Ray cluster has {cpus:g} CPUs but {num_workers} workers x {cpus_per_worker:g} CPUs were asked for"
    if use_gpu and num_workers > gpus:
        return f"the Ray cluster has {gpus:g} GPUs but --use-gpu with {num_workers} workers needs one each"
    return None


def _bundles(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> list[dict[str, float]]:
    """The workers' resource shapes, as an autoscaler is asked for them."""
    return [{"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}] * num_workers


# How long the autoscaler gets to answer (it reports every AUTOSCALER_UPDATE_INTERVAL_S, 5 s by default).
AUTOSCALER_VERDICT_SECONDS = 30.0
_RPC_TIMEOUT_S = 10


def autoscaler_running(bundles: list[dict[str, float]], timeout_s: float = AUTOSCALER_VERDICT_SECONDS) -> bool:
    """Whether autoscaler v2, asked for `bundles`, reports them feasible: only one that can add nodes does."""
    # Not the v2 flag: `ray start --head` sets it on every KubeRay pod since Ray 2.48, autoscaling or not, and a
    # fixed head then runs the v2 monitor with a read-only provider, which reports everything its nodes cannot
    # hold as infeasible (as does a real autoscaler past its max replicas). A v1 autoscaler reports no verdict:
    # this says no (pass --capacity-wait-minutes). The request is withdrawn here; wait_for_capacity makes its own.
    try:
        import ray
        from ray._raylet import GCS_AUTOSCALER_STATE_NAMESPACE, GCS_AUTOSCALER_V2_ENABLED_KEY
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        gcs = ray._private.worker.global_worker.gcs_client  # raises without ray.init()
        if gcs.internal_kv_get(GCS_AUTOSCALER_V2_ENABLED_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode(),
                               timeout=_RPC_TIMEOUT_S) != b"1":
            return False  # no autoscaler v2: none, or a v1 one that cannot be asked

        def status() -> GetClusterStatusReply:
            return GetClusterStatusReply.FromString(gcs.get_cluster_status(timeout_s=_RPC_TIMEOUT_S))

        shapes = [dict(s) for s in {tuple(sorted(b.items())) for b in bundles}]
        gcs.request_cluster_resource_constraint(shapes, [{} for _ in shapes], [bundles.count(b) for b in shapes],
                                                timeout_s=_RPC_TIMEOUT_S)
        try:
            # Every state the GCS hands out gets a new version: one above this was read after the request.
            asked = status().cluster_resource_state.cluster_resource_state_version
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                reply = status()
                state = reply.autoscaling_state
                if reply.HasField("autoscaling_state") and state.last_seen_cluster_resource_state_version > asked:
                    return not state.infeasible_cluster_resource_constraints
                time.sleep(0.5)
            return False
        finally:
            gcs.request_cluster_resource_constraint([], [], [], timeout_s=_RPC_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - no GCS answer: behave as on a fixed cluster (refuse, never hang)
        return False
