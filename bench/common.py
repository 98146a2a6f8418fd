"""Shared helpers: machine description, the matmul FLOP/s reference, FLOP formulas, small statistics.

FLOP formulas (multiply-add = 2 FLOPs; element-wise gate maths, softmax and embedding lookups ignored):
  LSTM layer, one time step, one sequence: 2 * 4 * u * (in + u)   (4 gates, input and recurrent matmuls)
  Dense head, one position:                2 * u_last * V
  Training ~ 3 x forward (the backward pass costs about twice the forward pass).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from importlib import metadata
from typing import Any


def lstm_step_flops(input_dim: int, units: list[int]) -> int:
    """Forward FLOPs of one time step through the LSTM stack, for one sequence."""
    total, d = 0, int(input_dim)
    for u in units:
        total += 2 * 4 * int(u) * (d + int(u))
        d = int(u)
    return total


def head_flops(units: list[int], vocab: int) -> int:
    return 2 * int(units[-1]) * int(vocab)


def input_dim(cfg) -> int:
    """Features per time step fed to the first LSTM: 1 for the tutorial's scaled ids, else the embedding size."""
    return 1 if cfg.input_mode == "scaled" else int(cfg.embed_dim)


def forward_flops_per_predicted_char(cfg, vocab: int) -> int:
    """Tutorial (target=last): a whole window of seq_len steps is run to predict one character.
    Ours (target=all): one step per predicted character."""
    step = lstm_step_flops(input_dim(cfg), cfg.units)
    if cfg.target == "last":
        return cfg.seq_len * step + head_flops(cfg.units, vocab)
    return step + head_flops(cfg.units, vocab)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "tensorflow": package_version("tensorflow"),
        "keras": package_version("keras"),
        "ray": package_version("ray"),
        "numpy": package_version("numpy"),
        "date": _dt.date.today().isoformat(),
        "datetime_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def matmul_samples(n: int = 2048, repeats: int = 7) -> list[float]:
    """Seconds per dense fp32 n x n matmul (after one warm-up), each result forced to the host."""
    import tensorflow as tf

    a = tf.random.stateless_normal((n, n), seed=(1, 2), dtype=tf.float32)
    b = tf.random.stateless_normal((n, n), seed=(3, 4), dtype=tf.float32)
    tf.matmul(a, b).numpy()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.matmul(a, b).numpy()
        out.append(time.perf_counter() - t0)
    return out


def matmul_flops(n: int, seconds: float) -> float:
    return 2.0 * n**3 / seconds
