"""The training job as users run it: `python -m job.train --corpus C --output O --max-minutes M` and nothing else
(local Ray started by the CLI, one worker, the default preset), timed end to end beside the in-process figures.

The held-out loss is that of the exported model under the full held-out protocol of docs/data.md
(`python -m job.evaluate`), as for the in-process runs, so the two are comparable.
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


def _final(stdout: str) -> dict[str, Any]:
    line = next(x for x in reversed(stdout.splitlines()) if x.startswith('{"final"'))
    return json.loads(line)["final"]


def run(corpus: str, workdir: Path, seconds: float) -> dict[str, Any]:
    out = workdir / "train-job"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "job.train", "--corpus", corpus, "--output", str(out),
           "--max-minutes", f"{seconds / 60:g}"]
    print(f"\n== training job through the CLI under local Ray: python {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"job.train exited with {proc.returncode}: {proc.stderr[-2000:]}", "process_wall_sec": wall}
    final = _final(proc.stdout)
    scored = subprocess.run([sys.executable, "-m", "job.evaluate", "--model", str(out), "--corpus", corpus],
                            cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if scored.returncode != 0:
        return {"error": f"job.evaluate exited with {scored.returncode}: {scored.stderr[-2000:]}",
                "process_wall_sec": wall}
    heldout = json.loads(scored.stdout.strip().splitlines()[-1])
    return {
        "command": " ".join(cmd[2:]),
        "heldout_loss_nats": heldout["loss_nats"], "heldout_bits_per_char": heldout["bits_per_char"],
        "train_chars": final["train_chars"], "elapsed_sec": final["elapsed_sec"],
        "chars_per_sec_overall": final["train_chars"] / max(final["elapsed_sec"], 1e-9),
        "epochs_seen": final.get("epoch_float"), "exported_epoch": final.get("best_epoch"),
        "process_wall_sec": wall,
    }


def markdown(result: dict[str, Any], in_process: dict[str, Any]) -> list[str]:
    """Rows comparing the CLI run with the in-process run of the same preset and budget."""
    if "error" in result:
        return [f"- training job through the CLI: failed: {result['error'][:300]}", ""]

    def fmt(r: dict[str, Any], key: str, digits: int) -> str:
        value = r.get(key)
        return "" if value is None else f"{value:,.{digits}f}"

    rows = [("held-out loss, nats/char (exported model)", "heldout_loss_nats", 4),
            ("predicted chars seen", "train_chars", 0),
            ("predicted chars/s over the training time", "chars_per_sec_overall", 0)]
    lines = ["| `default`, same budget | in-process `train_func` | `python -m job.train` (local Ray) |",
             "|---|---:|---:|"]
    lines += [f"| {label} | {fmt(in_process, key, d)} | {fmt(result, key, d)} |" for label, key, d in rows]
    lines += [f"| whole process, s | | {result['process_wall_sec']:.1f} |", "",
              f"CLI command: `python -m {result['command']}` (nothing else: what a user runs).", ""]
    return lines
