"""Corpus scale: what a user's run costs as the corpus grows from 1 MB to 1 GB, measured through the CLIs.

For each size, a corpus folder is written by repeating the benchmark text (repetition is fine for timing; files
of at most 50 MB, as a many-file corpus arrives), then:

1. `python -m job.prepare --corpus DIR/ --output OUT/data --keep-case`: wall time and peak RSS;
2. `python -m job.train --in-process --corpus DIR/ --output OUT --keep-case --max-minutes M --epochs 1`: the
   dataset in OUT/data is reused (the run must say so), so this is a cached run as on resubmission: seconds from
   process start to the "training ..." line that precedes the first step, peak RSS of the process (the single
   worker), and training chars/s (median of the progress lines after the first, which includes compilation).

Peak RSS is the kernel's high-water mark of each child process (VmHWM in /proc/<pid>/status, which starts afresh
at exec; the rusage of a child would include the memory of the benchmark process it was forked from), read
every 50 ms while the child runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import common

REPO = Path(__file__).resolve().parents[1]
SIZES_MB = (1, 10, 100, 1000)
FILE_MB = 50
GOALS = {"prepare_sec_1gb": 180.0, "prepare_rss_mb_1gb": 1536.0, "first_step_sec": 30.0,
         "worker_rss_growth_mb": 300.0, "chars_per_sec_drop": 0.10}
_RATE = re.compile(r"^step [\d,]+ .* ([\d,]+) chars/s ")


def write_corpus(text: str, size_mb: int, folder: Path) -> int:
    """`size_mb` MB of repeated `text` in files of at most FILE_MB; returns the number of files."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    block = (text.rstrip("\n") + "\n\n").encode()
    total, n = size_mb * 1_000_000, 0
    while total > 0:
        size = min(total, FILE_MB * 1_000_000)
        reps, rest = divmod(size, len(block))
        with open(folder / f"part-{n:04d}.txt", "wb") as f:
            for _ in range(reps):
                f.write(block)
            f.write(block[:rest].rsplit(b" ", 1)[0])  # whole words: no split UTF-8 character
        total -= size
        n += 1
    return n


def _high_water_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run `cmd`; its stdout lines with the seconds since start, exit code, wall time and peak RSS (MB)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _high_water_kb(proc.pid) or 0)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines: list[tuple[float, str]] = []
    deadline = t0 + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))
        if time.monotonic() > deadline:
            proc.kill()
            break
    stderr = proc.stderr.read() if proc.stderr else ""
    proc.wait()
    watcher.join()
    return {"returncode": proc.returncode, "wall_sec": time.monotonic() - t0, "peak_rss_mb": peak[0] / 1024,
            "lines": lines, "stderr_tail": stderr.strip().splitlines()[-3:]}


def measure_size(text: str, size_mb: int, workdir: Path, minutes: float) -> dict[str, Any]:
    corpus, out = workdir / f"corpus-{size_mb}mb", workdir / f"run-{size_mb}mb"
    files = write_corpus(text, size_mb, corpus)
    shutil.rmtree(out, ignore_errors=True)
    row: dict[str, Any] = {"size_mb": size_mb, "files": files}
    print(f"== corpus scale: {size_mb} MB in {files} file(s)", flush=True)
    prep = run_measured([sys.executable, "-m", "job.prepare", "--corpus", f"{corpus}/", "--output",
                         str(out / "data"), "--keep-case"], timeout=1800)
    if prep["returncode"] != 0:
        return {**row, "error": f"prepare: exit {prep['returncode']}: {' | '.join(prep['stderr_tail'])}"}
    row.update(prepare_sec=prep["wall_sec"], prepare_rss_mb=prep["peak_rss_mb"])
    meta = json.loads((out / "data" / "meta.json").read_text())
    row.update(chars=meta["total_chars"], train_chars=meta["train_chars"], heldout_chars=meta["val_scored_chars"])
    run = run_measured([sys.executable, "-m", "job.train", "--in-process", "--corpus", f"{corpus}/", "--output",
                        str(out), "--keep-case", "--max-minutes", f"{minutes:g}", "--epochs", "1",
                        "--log-every-seconds", "5"], timeout=minutes * 60 + 900)
    text_out = [line for _, line in run["lines"]]
    if run["returncode"] != 0:
        return {**row, "error": f"train: exit {run['returncode']}: {' | '.join(run['stderr_tail'])}"}
    if not any("reusing it" in line for line in text_out):
        return {**row, "error": "the training run prepared the dataset again instead of reusing it"}
    first = next((t for t, line in run["lines"] if line.startswith("training ")), None)
    rates = [float(m.group(1).replace(",", "")) for line in text_out if (m := _RATE.match(line))]
    row.update(first_step_sec=first, run_wall_sec=run["wall_sec"], worker_rss_mb=run["peak_rss_mb"],
               progress_rates=rates, chars_per_sec=common.median(rates[1:]) if len(rates) > 1 else None)
    print(f"   prepare {row['prepare_sec']:.1f} s ({row['prepare_rss_mb']:.0f} MB), first step after "
          f"{first or float('nan'):.1f} s, worker {row['worker_rss_mb']:.0f} MB, "
          f"{row['chars_per_sec'] or 0:,.0f} chars/s", flush=True)
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return row


def assess(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals, checked on the rows that ran (None where a row is missing)."""
    by = {r["size_mb"]: r for r in rows if "error" not in r}
    small, big = by.get(min(by, default=0)), by.get(1000)
    out: dict[str, Any] = {"goals": GOALS}
    if big:
        out["prepare_1gb_ok"] = big["prepare_sec"] <= GOALS["prepare_sec_1gb"] and \
            big["prepare_rss_mb"] <= GOALS["prepare_rss_mb_1gb"]
    out["first_step_ok"] = all((r.get("first_step_sec") or 1e9) <= GOALS["first_step_sec"] for r in by.values())
    if big and small and big is not small:
        out["rss_growth_mb"] = big["worker_rss_mb"] - small["worker_rss_mb"]
        out["rss_ok"] = out["rss_growth_mb"] <= GOALS["worker_rss_growth_mb"]
        if big.get("chars_per_sec") and small.get("chars_per_sec"):
            out["rate_ratio"] = big["chars_per_sec"] / small["chars_per_sec"]
            out["rate_ok"] = out["rate_ratio"] >= 1 - GOALS["chars_per_sec_drop"]
    return out


def markdown(result: dict[str, Any]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["| corpus | files | prepare | prepare peak RSS | cached run: first step after | worker peak RSS | "
             "training chars/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['size_mb']:,} MB | {r.get('files', '-')} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['size_mb']:,} MB | {r['files']} | {r['prepare_sec']:.1f} s | {r['prepare_rss_mb']:,.0f} MB "
                     f"| {f(r['first_step_sec'], '.1f')} s | {r['worker_rss_mb']:,.0f} MB | "
                     f"{f(r['chars_per_sec'], ',.0f')} |")
    a = result["assessment"]
    ok = {True: "met", False: "**missed**", None: "not measured"}
    lines += ["", f"Goals: 1 GB prepared in <= {GOALS['prepare_sec_1gb']:.0f} s with <= "
                  f"{GOALS['prepare_rss_mb_1gb']:,.0f} MB peak RSS: {ok[a.get('prepare_1gb_ok')]}; first step of a "
                  f"cached run within {GOALS['first_step_sec']:.0f} s: {ok[a.get('first_step_ok')]}; worker peak RSS "
                  f"at 1 GB within {GOALS['worker_rss_growth_mb']:.0f} MB of the smallest corpus: "
                  f"{ok[a.get('rss_ok')]} ({f(a.get('rss_growth_mb'), '+,.0f')} MB); training chars/s at 1 GB within "
                  f"{100 * GOALS['chars_per_sec_drop']:.0f}% of the smallest: {ok[a.get('rate_ok')]} "
                  f"(ratio {f(a.get('rate_ratio'), '.3f')})."]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    if not rows:
        return
    xs = [r["size_mb"] for r in rows]
    panels = [("prepare_sec", "prepare (s)"), ("first_step_sec", "cached run: first step after (s)"),
              ("worker_rss_mb", "worker peak RSS (MB)"), ("chars_per_sec", "training chars/s")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=100)
    for ax, (key, label) in zip(axes.ravel(), panels, strict=True):
        ax.plot(xs, [r.get(key) or 0 for r in rows], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("corpus size (MB)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if key != "prepare_sec":
            ax.set_ylim(bottom=0)
    fig.suptitle("charlstm: cost against corpus size (default preset, in-process, 2 cores)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(text: str, workdir: Path, sizes: list[int], minutes: float) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [measure_size(text, size, workdir, minutes) for size in sizes]
    result = {"sizes_mb": sizes, "minutes": minutes, "rows": rows}
    result["assessment"] = assess(rows)
    return result
