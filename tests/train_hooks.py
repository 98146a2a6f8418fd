"""Training-loop hooks the tests load into every worker with CHARLSTM_HOOKS=tests.train_hooks
(job.training.worker.load_hooks; under `ray job submit` the repository is the working dir, so this module is importable
on every worker):

- CHARLSTM_TEST_CRASH_AT_STEP=N + CHARLSTM_TEST_CRASH_MARKER=path: the last worker dies hard, once, at the first
  step >= N (the marker file remembers it happened);
- CHARLSTM_TEST_DUMP_WEIGHTS=folder: every worker saves its final weights there as rank-<r>.npz, to prove
  that all workers hold the same weights.
"""

from __future__ import annotations

import os

import numpy as np


def after_step(trainer) -> None:
    at, marker = os.environ.get("CHARLSTM_TEST_CRASH_AT_STEP"), os.environ.get("CHARLSTM_TEST_CRASH_MARKER")
    step = trainer.progress.global_step
    if not (at and marker) or trainer.rank != trainer.world - 1 or step < int(at) or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"crashed at global step {step}\n")
    print(f"test fault injection: worker {trainer.rank} exits at global step {step}", flush=True)
    os._exit(17)


def at_end(trainer) -> None:
    directory = os.environ.get("CHARLSTM_TEST_DUMP_WEIGHTS")
    if directory:
        os.makedirs(directory, exist_ok=True)
        np.savez(os.path.join(directory, f"rank-{trainer.rank}.npz"),
                 *[np.asarray(v.numpy()) for v in trainer.model.trainable_variables])
