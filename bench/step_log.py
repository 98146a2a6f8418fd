"""Training-loop hooks for bench/preempt_bench.py (CHARLSTM_HOOKS=bench.step_log): each worker appends its global
step after every compiled call to the file CHARLSTM_BENCH_STEPS names (one JSON line: time, pid, rank, step),
so the steps a node loss threw away are counted from what the workers did, not from log lines."""

from __future__ import annotations

import json
import os
import time


def after_step(trainer) -> None:
    path = os.environ.get("CHARLSTM_BENCH_STEPS")
    if path:
        line = {"t": time.time(), "pid": os.getpid(), "rank": trainer.rank, "step": trainer.progress.global_step}
        with open(path, "a") as f:  # one short write per line: workers on the same machine do not interleave
            f.write(json.dumps(line) + "\n")


def at_end(trainer) -> None:
    pass
