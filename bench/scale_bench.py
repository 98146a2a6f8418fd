"""Scaling: measured training throughput with 1 and 2 Ray workers on this machine, and an on-paper sizing
estimate (per-step compute and all-reduce volume) for N GPU workers.

The measurement runs the real job, `python -m job.train --num-workers N --cpus-per-worker 1`, on a local Ray
that the launcher starts, with the `default` preset and its per-worker batch (weak scaling: the global batch
grows with N, as it does on a cluster). Throughput is the median of the per-epoch `chars_per_sec` figures
after the first epoch (which includes compilation).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from job.core.config import PRESETS

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ on paper


def param_count(cfg, vocab: int) -> int:
    """Trainable parameters: embedding, LSTM stack (kernel, recurrent kernel, one bias per layer), head."""
    total = vocab * int(cfg.embed_dim) if cfg.input_mode == "embedding" else 0
    d = common.input_dim(cfg)
    for u in cfg.units:
        total += 4 * int(u) * (d + int(u)) + 4 * int(u)
        d = int(u)
    return total + d * vocab + vocab


@dataclass(frozen=True)
class Hardware:
    """Assumptions for the on-paper estimate; stated next to every figure derived from them."""

    name: str
    tflops_fp32: float  # achieved, not peak: what cuDNN LSTMs of this size sustain
    link_gbps: float  # per-node network bandwidth available to the all-reduce
    # A recurrent layer runs its time steps one after another: each (layer, time step, pass) costs at least
    # a kernel launch, so small batches are latency-bound whatever the FLOP/s.
    launch_us: float = 10.0


def sizing(cfg, vocab: int, workers: list[int], hw: Hardware) -> dict[str, Any]:
    """Per optimizer step and worker: compute (3x forward FLOPs over the local batch) and ring all-reduce
    traffic (each worker sends and receives 2(N-1)/N times the fp32 gradient), and the times they take on `hw`.
    Compute and communication do not overlap in our loop (the all-reduce follows the backward pass), so a
    step costs about their sum."""
    params = param_count(cfg, vocab)
    grad_bytes = 4 * params
    chars = cfg.batch_size * (cfg.seq_len if cfg.target == "all" else 1)
    flops = 3 * common.forward_flops_per_predicted_char(cfg, vocab) * chars
    flops_ms = flops / (hw.tflops_fp32 * 1e12) * 1e3
    latency_ms = cfg.seq_len * len(cfg.units) * 3 * hw.launch_us / 1e3  # forward + ~2x backward
    compute_ms = max(flops_ms, latency_ms)
    rows = []
    for n in workers:
        traffic = 2 * (n - 1) / n * grad_bytes if n > 1 else 0.0
        comm_ms = traffic * 8 / (hw.link_gbps * 1e9) * 1e3
        step_ms = compute_ms + comm_ms
        rows.append({
            "workers": n, "global_batch": cfg.batch_size * n, "allreduce_mb_per_worker": traffic / 1e6,
            "compute_ms": compute_ms, "comm_ms": comm_ms, "step_ms": step_ms,
            "chars_per_sec": n * chars / (step_ms / 1e3), "efficiency": compute_ms / step_ms,
        })
    return {"params": params, "gradient_mb": grad_bytes / 1e6, "chars_per_worker_step": chars,
            "flops_ms": flops_ms, "latency_ms": latency_ms, "latency_bound": latency_ms > flops_ms,
            "gflop_per_worker_step": flops / 1e9, "hardware": hw.__dict__, "rows": rows}


# ------------------------------------------------------------------------------------------ measured


def measure(corpus: str, workdir: Path, workers: list[int], epochs: int, timeout: float = 900) -> dict[str, Any]:
    rows = []
    for n in workers:
        out = workdir / f"scale-{n}"
        shutil.rmtree(out, ignore_errors=True)  # a checkpoint there would be resumed
        cmd = [sys.executable, "-m", "job.train", "--corpus", corpus, "--output", str(out), "--preset", "default",
               "--num-workers", str(n), "--cpus-per-worker", "1", "--epochs", str(epochs), "--run-name", "scale"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the launcher starts a local Ray
        print(f"== scaling: {n} Ray worker(s), {epochs} epochs ({' '.join(cmd[1:])})", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"workers": n, "error": f"timed out after {timeout:g} s"})
            continue
        wall = time.perf_counter() - t0
        metrics = out / "metrics.jsonl"
        if proc.returncode != 0 or not metrics.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            rows.append({"workers": n, "error": f"exit {proc.returncode}: {' | '.join(tail)}"})
            continue
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        rates = [m["chars_per_sec"] for m in lines[1:] if not m.get("partial_epoch")]
        rows.append({"workers": n, "global_batch": PRESETS["default"]["batch_size"] * n, "epochs": len(lines),
                     "epoch_chars_per_sec": rates,
                     "chars_per_sec": common.median(rates) if rates else None, "wall_sec": wall})
        print(f"   {n} worker(s): {rows[-1]['chars_per_sec'] or 0:,.0f} chars/s (median of {len(rates)} epochs)",
              flush=True)
    base = next((r["chars_per_sec"] for r in rows if r.get("workers") == 1 and r.get("chars_per_sec")), None)
    for r in rows:
        if base and r.get("chars_per_sec"):
            r["speedup"] = r["chars_per_sec"] / base
            r["efficiency"] = r["speedup"] / r["workers"]
    return {"rows": rows, "epochs": epochs, "preset": "default", "cpus_per_worker": 1}
