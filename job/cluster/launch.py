"""The Ray Train launcher of `python -m job.train`: job.training.worker.train_func on every worker of a
DataParallelTrainer (the TF_CONFIG backend of job/cluster/backend.py), checkpoints under <output>/checkpoints; a
worker's UserError comes back as the driver's one-line error, Ctrl-C as an interrupted CLI."""

from __future__ import annotations

import signal
from typing import Any

from job.core import storage
from job.core.config import TrainConfig
from job.core.errors import UserError
from job.training.worker import train_func


def launch_ray(cfg: TrainConfig) -> dict[str, Any]:
    # Ray (and job.cluster.backend, which imports it) only once the flags, the output and the dataset are checked:
    # `--help` and every refusal before the cluster never pay for `import ray`.
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from job.cluster.backend import MirroredConfig

    filesystem, path = storage.pyarrow_filesystem(storage.join(cfg.output, "checkpoints"))
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = DataParallelTrainer(  # Ray's TensorflowTrainer, minus TensorFlow in this process (job/cluster/backend.py)
        train_func,
        backend_config=MirroredConfig(),
        train_loop_config={**cfg.to_dict(), "_in_ray": True},
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, cfg.num_workers) if cfg.elastic else cfg.num_workers,
            use_gpu=cfg.use_gpu, resources_per_worker=resources, placement_strategy=cfg.placement_strategy,
            elastic_resize_monitor_interval_s=cfg.elastic_resize_seconds),
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
