"""`python -m job.train`: the training job. A thin Ray Train launcher around job.worker.train_func.

Under `ray job submit` (or with RAY_ADDRESS set) it joins that cluster; otherwise it starts a
local Ray instance, so the same command works on a laptop, a Ray cluster and a KubeRay RayJob.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from job import storage
from job.config import TrainConfig, load_train_config
from job.errors import UserError, run_cli


def preflight(cfg: TrainConfig) -> None:
    """Fail fast, before Ray starts or anything is written: the corpus must be usable."""
    from job import corpus as corpus_lib
    from job import data

    corpus = corpus_lib.load(cfg.corpus, lowercase=not cfg.keep_case)
    n = len(corpus.text)
    split = corpus_lib.split_point(n, cfg.val_fraction)
    plan = data.stream_plan if cfg.stateful else data.sliding_plan
    plan(split, cfg.seq_len, cfg.batch_size * cfg.num_workers, 0, cfg.seed)
    context = 100 if cfg.target == "all" else cfg.seq_len
    if split < context + 2:
        raise UserError(f"corpus too short: {n} chars; need more than {context} before the held-out part")


def run_name(cfg: TrainConfig) -> str:
    return cfg.run_name or "run"


def launch_ray(cfg: TrainConfig) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from job.worker import train_func

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # "local" avoids joining a stale cluster recorded in /tmp/ray (GUIDE §2 pitfall 13).
            need = cfg.num_workers * cfg.cpus_per_worker
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                     include_dashboard=False, log_to_driver=True)
    _check_capacity(cfg)
    filesystem, path = storage.pyarrow_filesystem(storage.join(cfg.output, "checkpoints"))
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = TensorflowTrainer(
        train_func,
        train_loop_config={**cfg.to_dict(), "_in_ray": True},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.return_value or {}


def _check_capacity(cfg: TrainConfig) -> None:
    """Refuse at once when the cluster can never fit the workers (instead of waiting forever)."""
    import ray

    total = ray.cluster_resources()
    cpus = total.get("CPU", 0.0)
    gpus = total.get("GPU", 0.0)
    if cfg.num_workers * cfg.cpus_per_worker > cpus:
        raise UserError(
            f"the Ray cluster has {cpus:g} CPUs but {cfg.num_workers} workers x {cfg.cpus_per_worker:g} "
            "CPUs were asked for; lower --num-workers / --cpus-per-worker or add nodes"
        )
    if cfg.use_gpu and cfg.num_workers > gpus:
        raise UserError(
            f"the Ray cluster has {gpus:g} GPUs but --use-gpu with {cfg.num_workers} workers needs one each; "
            "lower --num-workers or add GPU nodes"
        )


def main(argv: list[str] | None = None) -> int:
    cfg = load_train_config(argv)
    preflight(cfg)
    if cfg.in_process:
        from job.worker import train_func

        final = train_func(cfg.to_dict())
    else:
        final = launch_ray(cfg)
    print(json.dumps({"final": final}, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
