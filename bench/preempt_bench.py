"""Node loss: the steps a run loses when a node goes, announced (drained first, as a spot reclaim, a scale-down or the
pods' preStop hook do) and unannounced (SIGKILL), on a real multi-node Ray cluster on this machine.

A head with no CPUs and two 1-CPU worker nodes (each its own process group), a local S3 server, the training CLI
as users submit it (`ray job submit -- python -m job.train`, default preset, elastic over 1-2 workers at a fixed
global batch, a step checkpoint every INTERVAL steps). Each scenario loses one of the two nodes halfway between
two step checkpoints:

- announced: `ray drain-node` (reason preemption, DEADLINE s), and the node is killed at the deadline;
- unannounced: the node is SIGKILLed at the same point, without notice.

A hook (bench/step_log.py) writes every worker's global step after each compiled call, so "lost" is counted from
the workers' own steps: the highest step a worker of the first group reached, minus the step the run resumed from.
"Recovery" is from the loss (the drain's notice, or the kill) to the first step of the restarted group.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from infra import localstack

REPO = Path(__file__).resolve().parents[1]
BUCKET = "charlstm-bench"
INTERVAL = 20  # --checkpoint-every-steps
DEADLINE = 30  # seconds of notice before the node is taken
EPOCHS = 3
_RESUMED = re.compile(r"resumed from checkpoint: epoch \d+, step \d+ of the next epoch, global step (\d+)")


def _job_logs(head: localstack.RayInfo, job_id: str) -> str:
    status, body = localstack._http_get(f"{head.address}/api/jobs/{job_id}/logs", head.auth_headers, timeout=10)
    return json.loads(body).get("logs", "") if status == 200 else ""


def _steps(path: Path) -> list[dict[str, Any]]:
    """The hook's lines: {"t": unix seconds, "pid": ..., "rank": ..., "step": ...}."""
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _worker_nodes(head: localstack.RayInfo, nodes: list[localstack.RayNode]) -> list[localstack.RayNode]:
    """The nodes of the live RayTrainWorker actors (Ray's state API)."""
    status, body = localstack._http_get(f"{head.address}/api/v0/actors?detail=1&limit=10000", head.auth_headers,
                                        timeout=30)
    actors = json.loads(body)["data"]["result"]["result"] if status == 200 else []
    ids = {a["node_id"] for a in actors if a.get("class_name") == "RayTrainWorker" and a["state"] == "ALIVE"}
    return [n for n in nodes if n.node_id in ids]


def scenario(kind: str, head: localstack.RayInfo, nodes: list[localstack.RayNode], env: dict[str, str],
             corpus_url: str, workdir: Path, timeout: float = 1200) -> dict[str, Any]:
    steps_file = workdir / f"steps-{kind}.jsonl"
    out = f"s3://{BUCKET}/runs/{kind}-{uuid.uuid4().hex[:6]}"
    job_id = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    hooks = {"CHARLSTM_HOOKS": "bench.step_log", "CHARLSTM_BENCH_STEPS": str(steps_file),
             "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    cmd = [localstack.ray_executable(), "job", "submit", "--address", head.address, "--submission-id", job_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": hooks}), "--",
           "python", "-m", "job.train", "--corpus", corpus_url, "--output", out, "--num-workers", "1-2",
           "--global-batch-size", "64", "--placement-strategy", "SPREAD", "--epochs", str(EPOCHS),
           "--checkpoint-every-steps", str(INTERVAL)]
    submit = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Halfway between the second and the third step checkpoints.
        target = 2 * INTERVAL + INTERVAL // 2
        deadline = time.monotonic() + timeout
        while max((s["step"] for s in _steps(steps_file)), default=0) < target:
            if submit.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: the run ended or stalled before step {target}: "
                                   f"{_job_logs(head, job_id)[-2000:]}")
            time.sleep(0.05)
        victim = _worker_nodes(head, nodes)[-1]
        lost_at = time.time()
        first_pids = {s["pid"] for s in _steps(steps_file)}
        if kind == "announced":
            subprocess.run([localstack.ray_executable(), "drain-node", "--address", head.gcs_address, "--node-id",
                            victim.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                            "bench: spot reclaim", "--deadline-remaining-seconds", str(DEADLINE)],
                           env=env, check=True, capture_output=True, timeout=60)
            time.sleep(max(0.0, lost_at + DEADLINE - time.time()))
        victim.kill()
        output, _ = submit.communicate(timeout=max(60.0, deadline - time.monotonic()))
    finally:
        if submit.poll() is None:
            submit.kill()
    logs = _job_logs(head, job_id)
    resumed = [int(x) for x in _RESUMED.findall(logs)]
    rows = _steps(steps_file)
    reached = max(s["step"] for s in rows if s["pid"] in first_pids)
    after = [s for s in rows if s["pid"] not in first_pids]
    ok = submit.returncode == 0 and bool(resumed)
    return {
        "kind": kind, "ok": ok, "resumed_from": resumed[0] if resumed else None, "reached": reached,
        "lost_steps": reached - resumed[0] if resumed else None,
        "recovery_sec": min(s["t"] for s in after) - lost_at if after else None,
        "notice_sec": DEADLINE if kind == "announced" else 0, "interval": INTERVAL,
        "final_step": max((s["step"] for s in after), default=None),
        **({} if ok else {"log_tail": (logs or output)[-3000:]}),
    }


def run(text: str, workdir: Path) -> dict[str, Any]:
    """Both scenarios on one fresh cluster; the corpus is the benchmark text."""
    workdir.mkdir(parents=True, exist_ok=True)
    s3 = localstack.start_s3(workdir / "s3", BUCKET)
    fast = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
    head = localstack.start_ray_head(workdir / "ray", num_cpus=0, extra_env={**s3.env, **fast}, multi_node=True)
    nodes: list[localstack.RayNode] = []
    try:
        localstack.boto3_client(s3.endpoint).put_object(Bucket=BUCKET, Key="corpus.txt", Body=text.encode())
        env = {**localstack.scrubbed_environ(), **s3.env, **head.client_env()}
        results = []
        for kind in ("announced", "unannounced"):
            while len(alive := [n for n in nodes if n.proc.alive()]) < 2:
                nodes.append(localstack.start_ray_node(head, workdir, f"w{len(nodes) + 1}", extra_env=s3.env))
            print(f"== node loss, {kind}", flush=True)
            results.append(scenario(kind, head, alive, env, f"s3://{BUCKET}/corpus.txt", workdir))
            print(json.dumps(results[-1]), flush=True)
        return {"scenarios": results, "interval": INTERVAL, "deadline_sec": DEADLINE}
    finally:
        for node in nodes:
            node.stop()
        localstack.stop_ray_head(head)
        s3.proc.stop()


def markdown(result: dict[str, Any]) -> str:
    lines = ["| node loss | notice | steps lost | resumed from / reached | recovery (loss -> first step) |",
             "|---|---|---|---|---|"]
    for r in result["scenarios"]:
        recovery = "-" if r["recovery_sec"] is None else f"{r['recovery_sec']:.0f} s"
        lines.append(f"| {r['kind']} | {r['notice_sec']} s | {r['lost_steps']} (interval {r['interval']}) | "
                     f"{r['resumed_from']} / {r['reached']} | {recovery} |")
    return "\n".join(lines)
