"""S3 scale: what preparing a large corpus costs from object storage, beside the same corpus on local disk.

One run, one corpus of SIZE MB (files of at most 50 MB, written by repeating the benchmark text), a local S3
server (moto over HTTP on 127.0.0.1, started and stopped here), the CLI with its default flags:

1. `python -m job.prepare --corpus DIR/ --output DIR2`           (local -> local)
2. the same corpus as one file (local -> local, one file: cleaned in parts side by side)
3. `python -m job.prepare --corpus s3://b/corpus/ --output s3://b/data`   (S3 -> S3)
4. a node's dataset download, as a worker does it (`prepare.open_local` of the S3 dataset into an empty cache).

Each row: wall time of the whole process, the part of it before publishing (the seconds the dataset's summary
line reports: listing, cleaning, encoding and, to S3, uploading the parts) and peak RSS of its process tree
(the sum over the process and its children, sampled every 50 ms: preparation cleans files in child processes).
Publishing to moto is slow where S3 is not: moto joins a multipart upload's parts in Python (~20 s per GB here),
S3 in about a second; and moto copies the whole object for each ranged GET, which the download row pays.
The goals: S3 -> S3 within 256 MB and 1.3x of local -> local, and the download's RSS as flat. The moto server
runs on the same machine and competes for its cores; a real S3 endpoint does not, so the S3 rows are a
pessimistic bound.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench import corpus_bench

REPO = Path(__file__).resolve().parents[1]
BUCKET = "charlstm-bench"
GOALS = {"rss_over_local_mb": 256.0, "time_ratio": 1.3}
_SUMMARY = re.compile(r"^dataset .*, ([\d.]+) s$")  # job.prepare's last line: "..., vocabulary 71 (uint8), 7.4 s"


def run_tree(cmd: list[str], env: dict[str, str], timeout: float, server_pid: int | None = None) -> dict[str, Any]:
    """Run `cmd`: exit code, wall seconds, peak RSS (MB) and CPU seconds of it and its children together, the
    S3 server's CPU seconds meanwhile, its last lines."""
    server = psutil.Process(server_pid) if server_pid else None
    server_cpu = sum(server.cpu_times()[:2]) if server else 0.0
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    cpu: dict[int, float] = {}  # per process, the last CPU seconds seen (sampled: each loses under 50 ms)

    def watch() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    try:
                        total += p.memory_info().rss
                        cpu[p.pid] = sum(p.cpu_times()[:2])
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    watcher.join()
    lines = out.strip().splitlines()
    prepared = next((float(m.group(1)) for line in lines[::-1] if (m := _SUMMARY.match(line))), None)
    return {"returncode": proc.returncode, "wall_sec": time.monotonic() - t0, "peak_rss_mb": peak[0] / 1e6,
            "prepared_sec": prepared, "cpu_sec": sum(cpu.values()),
            "server_cpu_sec": sum(server.cpu_times()[:2]) - server_cpu if server else None, "tail": lines[-3:]}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    return {**env, **extra}


def run(text: str, workdir: Path, size_mb: int) -> dict[str, Any]:
    """The three rows for a corpus of `size_mb` MB, and the goals checked."""
    from infra import localstack

    shutil.rmtree(workdir, ignore_errors=True)
    corpus = workdir / "corpus"
    files = corpus_bench.write_corpus(text, size_mb, corpus)
    single = workdir / "one-file"
    single.mkdir()
    with open(single / "corpus.txt", "wb") as out:
        for part in sorted(corpus.iterdir()):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out)
    result: dict[str, Any] = {"size_mb": size_mb, "files": files, "goals": GOALS}
    print(f"\n== S3 scale: {size_mb} MB in {files} file(s)", flush=True)
    s3 = localstack.start_s3(workdir / "stack", bucket=BUCKET)
    try:
        aws = localstack.s3_env(s3.endpoint)
        client = localstack.boto3_client(s3.endpoint)
        for f in sorted(corpus.iterdir()):
            client.upload_file(str(f), BUCKET, f"corpus/{f.name}")
        rows = {
            "local_to_local": [sys.executable, "-m", "job.prepare", "--corpus", f"{corpus}/", "--output",
                               str(workdir / "data")],
            "one_file": [sys.executable, "-m", "job.prepare", "--corpus", str(single / "corpus.txt"), "--output",
                         str(workdir / "data-one")],
            "s3_to_s3": [sys.executable, "-m", "job.prepare", "--corpus", f"s3://{BUCKET}/corpus/", "--output",
                         f"s3://{BUCKET}/data"],
            "download": [sys.executable, "-c", "import sys; from job.data import prepare; "
                         "prepare.open_local(sys.argv[1], cache_dir=sys.argv[2])", f"s3://{BUCKET}/data",
                         str(workdir / "node-cache")],
        }
        for name, cmd in rows.items():
            row = run_tree(cmd, _env(aws), timeout=3600, server_pid=None if name.startswith(("local", "one")) else
                           s3.proc.pid)
            result[name] = row
            print(f"   {name}: exit {row['returncode']}, {row['wall_sec']:.1f} s (before publishing: "
                  f"{row['prepared_sec']} s), peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        s3.proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result.update(assess(result))
    return result


def assess(result: dict[str, Any]) -> dict[str, Any]:
    local, s3, dl = (result.get(k) for k in ("local_to_local", "s3_to_s3", "download"))
    ok = [r is not None and r["returncode"] == 0 for r in (local, s3, dl)]
    out: dict[str, Any] = {}
    if ok[0] and ok[1]:
        out["rss_over_local_mb"] = s3["peak_rss_mb"] - local["peak_rss_mb"]
        out["time_ratio"] = s3["wall_sec"] / local["wall_sec"]
        out["s3_ok"] = out["rss_over_local_mb"] <= GOALS["rss_over_local_mb"] and \
            out["time_ratio"] <= GOALS["time_ratio"]
        gb = result["size_mb"] / 1000
        out["per_gb"] = {k: {"sec": result[k]["wall_sec"] / gb} for k in ("local_to_local", "s3_to_s3")}
        if local.get("prepared_sec") and s3.get("prepared_sec"):
            out["prepared_ratio"] = s3["prepared_sec"] / local["prepared_sec"]
    if ok[0] and ok[2]:
        out["download_rss_over_local_mb"] = dl["peak_rss_mb"] - local["peak_rss_mb"]
        out["download_ok"] = out["download_rss_over_local_mb"] <= GOALS["rss_over_local_mb"]
        out.setdefault("per_gb", {})["download"] = {"sec": dl["wall_sec"] / (result["size_mb"] / 1000)}
    return out


def markdown(result: dict[str, Any]) -> str:
    def yes(v: bool | None) -> str:
        return "n/a" if v is None else ("**yes**" if v else "**NO**")

    lines = [f"S3 scale: a {result['size_mb']:,} MB corpus in {result['files']} file(s), `python -m job.prepare` "
             "with default flags; the S3 server (moto) shares this machine's cores.", "",
             "| path | whole process | before publishing | peak RSS (process tree) | CPU (process tree) | "
             "S3 server CPU | whole process per GB |", "|---|---:|---:|---:|---:|---:|---:|"]
    labels = {"local_to_local": "local -> local", "one_file": "local -> local, as one file", "s3_to_s3": "S3 -> S3",
              "download": "node download (open_local)"}
    for key, label in labels.items():
        row = result.get(key)
        if row is None:
            continue
        if row["returncode"] != 0:
            lines.append(f"| {label} | exit {row['returncode']}: {' | '.join(row['tail'])[:120]} | | | | | |")
            continue
        per_gb = row["wall_sec"] / (result["size_mb"] / 1000)
        prepared = row.get("prepared_sec")
        server = row.get("server_cpu_sec")
        lines.append(f"| {label} | {row['wall_sec']:.1f} s | {'' if prepared is None else f'{prepared:.1f} s'} | "
                     f"{row['peak_rss_mb']:,.0f} MB | {row.get('cpu_sec', 0):.1f} s | "
                     f"{'' if not server else f'{server:.1f} s'} | {per_gb:.1f} s |")
    goals = result["goals"]
    if "time_ratio" in result:
        lines += ["", f"S3 -> S3 vs local -> local: {result['rss_over_local_mb']:+,.0f} MB RSS (goal <= "
                  f"{goals['rss_over_local_mb']:.0f}), {result['time_ratio']:.2f}x the time (goal <= "
                  f"{goals['time_ratio']}): {yes(result.get('s3_ok'))}"]
        if "prepared_ratio" in result:
            lines.append(f"Before publishing (what does not depend on the S3 server's join of the parts): "
                         f"{result['prepared_ratio']:.2f}x the local time.")
    if "download_rss_over_local_mb" in result:
        lines.append(f"Node download: {result['download_rss_over_local_mb']:+,.0f} MB RSS over local -> local "
                     f"(goal <= {goals['rss_over_local_mb']:.0f}): {yes(result.get('download_ok'))}")
    return "\n".join(lines)
