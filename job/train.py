"""`python -m job.train`: the training job. A thin Ray Train launcher around job.worker.train_func.

Under `ray job submit` (or with RAY_ADDRESS set) it joins that cluster; otherwise it starts a
local Ray instance, so the same command works on a laptop, a Ray cluster and a KubeRay RayJob.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from job import cluster, guard, prepare, report, storage
from job.config import TrainConfig, load_train_config
from job.errors import UserError, run_cli


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """Before any training, in this order (main has checked that --output is writable and taken its lease):
    --output must hold this run or nothing (job.session.refuse_mixed_runs); the corpus must list and the dataset
    location take files, both before any Ray starts; under Ray, the cluster must be able to fit the workers (or be
    able to grow: job.cluster); then the prepared dataset must exist for this corpus and these options (made here
    once, streaming the raw files; reused on resubmission and resume, so workers never read raw text) and be long
    enough for one batch and the held-out protocol; then a growing cluster is waited for (bounded); last, --output
    records the run. A refusal before the dataset step leaves --output as it was; a wait that ends without the
    nodes leaves only the prepared dataset, which the next attempt reuses, whatever its worker count."""
    from job.session import record_run, refuse_mixed_runs
    from job.worker import ensure_dataset

    record = refuse_mixed_runs(cfg)
    # Everything that can be checked without a cluster, before one starts: a typo costs a second, not Ray's start.
    prepare.list_sources(cfg.corpus, (cfg.output, cfg.data_url))
    storage.check_writable(cfg.data_url)
    wait = 0.0
    if not cfg.in_process:
        cluster.connect(cfg.num_workers, cfg.cpus_per_worker)
        wait = cluster.check_capacity(cfg.worker_counts[0], cfg.cpus_per_worker, cfg.use_gpu, cfg.capacity_wait_minutes)
    meta = ensure_dataset(cfg, log=lambda line: print(line, flush=True))
    # After the dataset: preparing a large corpus and an autoscaler bringing nodes up both take minutes.
    cluster.wait_for_capacity(cfg.worker_counts[0], cfg.cpus_per_worker, cfg.use_gpu, wait,
                              log=lambda line: print(line, flush=True))
    if record is None:  # the run will start: only now does --output take its identity (and settings)
        record_run(cfg)
    return meta


def launch_ray(cfg: TrainConfig) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from job.backend import MirroredConfig
    from job.worker import train_func

    filesystem, path = storage.pyarrow_filesystem(storage.join(cfg.output, "checkpoints"))
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = DataParallelTrainer(  # Ray's TensorflowTrainer, minus TensorFlow in this process (job/backend.py)
        train_func,
        backend_config=MirroredConfig(),
        train_loop_config={**cfg.to_dict(), "_in_ray": True},
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, cfg.num_workers) if cfg.elastic else cfg.num_workers,
            use_gpu=cfg.use_gpu, resources_per_worker=resources, placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=cfg.run,
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines (every report, every worker-group step) say less than our own lines.
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
        ),
    )
    try:
        result = _fit_interruptibly(trainer)
        if result.error:
            raise result.error
    except Exception as exc:
        user_error = _user_error_in(exc)
        if user_error is None:
            raise
        raise user_error from None
    return result.return_value or {}


def _user_error_in(error: BaseException) -> UserError | None:
    """A UserError a worker raised (damaged data, no checkpoint that loads), found inside Ray Train's wrappers
    (WorkerGroupError.worker_failures, ControllerError, RayTaskError.cause, exception chains): one line for the
    user, as the driver's own refusals are."""
    seen, todo = set(), [error]
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, UserError):
            cause = getattr(exc, "cause", None)  # Ray's RayTaskError posing as the worker's exception class
            text = str(cause if isinstance(cause, UserError) else exc).strip().splitlines()
            return UserError(text[-1] if text else type(exc).__name__)
        todo += list(getattr(exc, "worker_failures", {}).values())
        todo += [getattr(exc, "controller_failure", None), getattr(exc, "cause", None), exc.__cause__,
                 exc.__context__]
    return None


def _fit_interruptibly(trainer):
    """trainer.fit(), with Ctrl-C meaning "stop the run" and exiting like any interrupted CLI (130).

    Ray Train (V2) installs its own SIGINT handler for the duration of fit(): the first Ctrl-C asks the
    controller to abort, which stops every worker, and the handler then calls sys.exit(0) from inside fit();
    left alone, the driver ended with status 1 and no word on why. Turn that SystemExit into
    KeyboardInterrupt (run_cli: "interrupted", exit 130), and put the previous handler back so that a later
    Ctrl-C does not reach a dead controller. (`ray job stop` sends SIGTERM instead; Ray then ends the job's
    actors with the driver.)
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit as exc:
        if signal.getsignal(signal.SIGINT) is previous:
            raise  # not Ray Train's handler: leave it alone
        raise KeyboardInterrupt from exc
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    cfg = load_train_config(argv)
    report.quiet_tensorflow(cfg.verbose)
    storage.check_writable(cfg.output)
    # One writer per --output for the whole run: the driver holds the lease, so Ray's worker restarts and elastic
    # resizes stay one writer, and a second command into the same --output is refused in one line.
    with guard.Lease(cfg.output, f"training run {cfg.run!r}", log=lambda line: print(line, flush=True)):
        preflight(cfg)
        if cfg.in_process:
            from job.worker import train_func

            final = train_func({**cfg.to_dict(), "_dataset_ready": True})
        else:
            final = launch_ray(cfg)
    print(json.dumps({"final": final}, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
