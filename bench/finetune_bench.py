"""Fine-tuning against training from scratch, at equal time, on a second corpus (the CLI, default flags).

A parent is trained on the main corpus for the training budget (`python -m job.train --in-process --max-minutes`,
as the training part does); then, on the second corpus, `--init-from` that parent and a run from scratch get the
same budget. Both are scored on the second corpus's held-out part with `python -m job.evaluate` (the same
protocol: the last 10 % of each file, every scored character with at least 100 of context); their per-evaluation
held-out losses against elapsed time are the curves. The second corpus is CORPUS2 when given, else invented prose
the project writes itself (tests/textgen.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GENERATED_CHARS = 400_000


def second_corpus(corpus2: str | None, workdir: Path) -> tuple[str, str]:
    """(path, description) of the corpus to fine-tune on."""
    if corpus2:
        return corpus2, corpus2
    sys.path.insert(0, str(REPO / "tests"))
    import textgen

    path = workdir / "corpus2.txt"
    path.write_text(textgen.book(GENERATED_CHARS, seed=21), encoding="utf-8")
    return str(path), f"{GENERATED_CHARS:,} characters of invented prose (tests/textgen.py, seed 21)"


def _train(corpus: str, out: Path, seconds: float, *extra: str) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "job.train", "--in-process", "--corpus", corpus, "--output", str(out),
           "--max-minutes", f"{seconds / 60:.6f}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"job.train exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}", "wall_sec": wall}
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_sec": wall, "curve": [[m["elapsed_sec"], m["val_loss"]] for m in history],
            "train_chars": history[-1]["train_chars"] if history else 0}


def _evaluate(out: Path) -> float | None:
    proc = subprocess.run([sys.executable, "-m", "job.evaluate", "--model", str(out)], cwd=REPO, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    return json.loads(proc.stdout.strip().splitlines()[-1])["loss_nats"] if proc.returncode == 0 else None


def run(corpus: str, corpus2: str | None, workdir: Path, parent_seconds: float, seconds: float) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    path2, described = second_corpus(corpus2, workdir)
    parent = workdir / "ft-parent"
    print(f"\n== fine-tuning: a parent on the main corpus for {parent_seconds:g} s ({parent})", flush=True)
    result: dict[str, Any] = {"corpus2": described, "parent_seconds": parent_seconds, "seconds": seconds,
                              "parent": _train(corpus, parent, parent_seconds)}
    if "error" in result["parent"]:
        return result
    for key, extra in (("fine_tuned", ["--init-from", str(parent)]), ("scratch", [])):
        out = workdir / f"ft-{key}"
        print(f"== fine-tuning: {key.replace('_', '-')} on the second corpus for {seconds:g} s ({out})", flush=True)
        row = _train(path2, out, seconds, *extra)
        if "error" not in row:
            row["heldout_nats"] = _evaluate(out)
            print(f"   held-out {row['heldout_nats']:.4f} nats/char after {row['train_chars']:,} chars", flush=True)
        result[key] = row
    return result


def target(result: dict[str, Any]) -> dict[str, Any] | None:
    ft, scratch = result.get("fine_tuned", {}), result.get("scratch", {})
    if ft.get("heldout_nats") is None or scratch.get("heldout_nats") is None:
        return None
    return {"target": f"fine-tuning beats training from scratch after {result['seconds']:g} s on the second corpus",
            "measured": ft["heldout_nats"], "met": bool(ft["heldout_nats"] < scratch["heldout_nats"])}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [f"## Fine-tuning (`--init-from`) vs from scratch, {result['seconds']:g} s each on the second corpus", "",
             f"Second corpus: {result['corpus2']}. Parent: the default preset trained {result['parent_seconds']:g} s "
             "on the main corpus. Held-out loss of each run's exported model on the second corpus's held-out part "
             "(`job.evaluate`, same protocol).", "",
             "| run | held-out nats/char | bits/char | chars trained | held-out curve (s: nats) |",
             "|---|---:|---:|---:|---|"]
    for key, label in (("fine_tuned", "fine-tuned from the parent"), ("scratch", "from scratch")):
        row = result.get(key)
        if not row or "error" in row or row.get("heldout_nats") is None:
            lines.append(f"| {label} | failed | | | |")
            continue
        curve = ", ".join(f"{t:.0f}: {v:.3f}" for t, v in row["curve"][:: max(1, len(row["curve"]) // 8)])
        lines.append(f"| {label} | {row['heldout_nats']:.4f} | {row['heldout_nats'] / 0.6931471805599453:.3f} | "
                     f"{row['train_chars']:,} | {curve} |")
    return [*lines, ""]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("fine_tuned", "fine-tuned (--init-from)"), ("scratch", "from scratch")):
        row = result.get(key) or {}
        if row.get("curve"):
            ax.plot(*zip(*row["curve"], strict=True), marker=".", label=label)
    ax.set_xlabel("seconds of training on the second corpus")
    ax.set_ylabel("held-out loss (nats/char)")
    ax.set_title("fine-tuning vs from scratch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
