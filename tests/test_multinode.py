"""A real multi-node Ray cluster on one machine: a head with no CPUs and 1-CPU worker nodes, each node its own
process group, jobs sent with `ray job submit`, corpus and checkpoints on the local S3 server (no filesystem
is shared between the nodes' workers: every resume reads S3).

A whole node is SIGKILLed (raylet, agents and the Ray Train worker on it, as a preempted machine disappears)
between two step checkpoints:
- fixed `--num-workers 2`: a replacement node joins, the group restarts on it, the run finishes;
- elastic `--num-workers 1-2`: the run goes on with the surviving worker without waiting, at the same global
  batch; once a node joins it grows back to 2 workers (`--elastic-resize-seconds`), and its losses equal those of
  a run that never lost a node.

A node drained first (`ray drain-node`, reason preemption, with a deadline: what a cloud's notice, the pods'
preStop hook or an autoscaler sends) costs no step: the run checkpoints at the next step, waits, and goes on from
that step once the node is gone, with the losses of a run never drained.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import e2e_helpers
import pytest
import textgen
import yaml
from tiny import EXACT

from job.core.config import PRESETS, TrainConfig

pytestmark = pytest.mark.e2e

# Tiny and dropout-free, so that runs on 1 and 2 workers are comparable step by step.
TINY = EXACT
INTERVAL = 10  # --checkpoint-every-steps
EPOCHS = 2
# Ray Train waits this long for a worker group it believes fits (the AutoscalingCoordinator still counts the
# dead node's CPU for a moment) before retrying with what is left; its default, 60 s, only slows the test.
START_TIMEOUT = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
# Loaded into the elastic run's workers (CHARLSTM_HOOKS): a group of one worker holds after its first step
# checkpoint until Ray Train restarts it on more workers (or the bound passes). A node that joins counts for Ray
# Train only at its next look at the cluster, up to ~25 s later: without the hold the run could end on one worker
# first, and with it the grown group must start from a checkpoint the single worker wrote.
HOLD_HOOKS = """
import os
import sys
import time

_saved = None  # the step of this process's first step checkpoint


def after_step(trainer):
    global _saved
    step = trainer.progress.global_step
    if trainer.world != 1 or _saved == -1:
        return
    if _saved is None:
        if step % trainer.cfg.checkpoint_every_steps == 0:
            _saved = step  # saved right after this hook returns
        return
    sys.stdout.write(f"test hold: 1 worker, checkpoint at global step {_saved}; waiting to grow\\n")
    sys.stdout.flush()
    deadline = time.monotonic() + float(os.environ["CHARLSTM_TEST_HOLD_SECONDS"])
    while time.monotonic() < deadline:
        time.sleep(0.5)
    _saved = -1


def at_end(trainer):
    pass
"""
HELD = re.compile(r"test hold: 1 worker, checkpoint at global step (\d+); waiting to grow")


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    with e2e_helpers.multinode_cluster(tmp_path_factory.mktemp("multinode"), s3_server, workers=2) as c:
        yield c


@pytest.fixture
def inputs(s3_server, s3_prefix):
    base = s3_prefix.split("/", 3)[3]
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key=f"{base}/corpus.txt", Body=textgen.book(8000, seed=5).encode())
    client.put_object(Bucket=s3_server.bucket, Key=f"{base}/tiny.yaml", Body=yaml.safe_dump(TINY).encode())
    return s3_server.url(f"{base}/corpus.txt"), s3_server.url(f"{base}/tiny.yaml"), f"{s3_prefix}/run"


def _metrics(out: str) -> list[dict]:
    from job.core import storage

    return [json.loads(x) for x in storage.read_text(storage.join(out, "metrics.jsonl")).splitlines()]


def _newest_step(out: str, run: str) -> int:
    from job.training import session

    found = session.complete_checkpoints(f"{out}/checkpoints/{run}")
    return found[-1][0] if found else -1


def _run_until_checkpoint_then_kill(cluster, args: list[str], out: str, run: str, env: dict[str, str] = START_TIMEOUT):
    """Start the job, check its two workers were spread over the two nodes, SIGKILL the node of one of them
    once a mid-epoch step checkpoint is in S3 and before the next. Returns (submission, newest step at kill)."""
    before = {a["actor_id"] for a in cluster.train_actors()}
    job = cluster.start(args, env=env)
    deadline = time.monotonic() + 240
    while _newest_step(out, run) < 2 * INTERVAL:
        assert job.proc.poll() is None, job.wait(10).describe()
        assert time.monotonic() < deadline, "no step checkpoint within 240 s"
        time.sleep(0.2)
    placed = cluster.worker_nodes_of_run(before)
    alive = {n.node_id: n for n in cluster.alive_nodes()}
    # One worker per node: Ray's state API places each worker on a different node, both ours.
    assert len(placed) == 2 and set(placed) == set(alive), (placed, list(alive))
    at_kill = _newest_step(out, run)
    alive[placed[-1]].kill()
    return job, at_kill


def _resumes(logs: str) -> list[tuple[int, int, int]]:
    found = re.findall(r"resumed from checkpoint: epoch (\d+), step (\d+) of the next epoch, global step (\d+)", logs)
    return sorted({tuple(int(x) for x in m) for m in found})


def _spread_run(inputs, run: str, *flags: str) -> list[str]:
    corpus, config, out = inputs
    return ["python", "-m", "job.train", "--corpus", corpus, "--output", out, "--config", config, "--run-name", run,
            "--placement-strategy", "SPREAD", "--epochs", str(EPOCHS), "--checkpoint-every-steps", str(INTERVAL),
            *flags]


def _reference_losses(corpus: str, out, seed: int) -> list[dict]:
    """metrics.jsonl of the same run on one worker at the same global batch, never interrupted."""
    from job.training.worker import train_func

    train_func(TrainConfig(**{**PRESETS["default"], **TINY, "preset": "default", "corpus": corpus,
                              "output": str(out), "epochs": EPOCHS, "seed": seed, "batch_size": 8,
                              "in_process": True}).to_dict())
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _same_losses(got: list[dict], expected: list[dict]) -> None:
    assert [m["epoch"] for m in got] == list(range(1, EPOCHS + 1))
    for lost, ref in zip(got, expected, strict=True):
        assert lost["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
        assert lost["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)


def test_fixed_size_run_survives_a_lost_node_once_a_replacement_joins(cluster, inputs):
    out = inputs[2]
    cluster.ensure_nodes(2)
    args = _spread_run(inputs, "fixed", "--num-workers", "2", "--max-failures", "5")
    job, at_kill = _run_until_checkpoint_then_kill(cluster, args, out, "fixed")
    time.sleep(3)
    cluster.add_node()  # the replacement a cloud autoscaler would bring
    result = job.wait(420)
    assert result.ok, result.describe()
    resumes = _resumes(result.logs)
    assert resumes, result.logs[-3000:]
    # From the newest checkpoint complete at the kill (or one written in the instant after): under one interval.
    step = resumes[0][2]
    assert step >= at_kill and step % INTERVAL == 0, (resumes, at_kill)
    assert [m["epoch"] for m in _metrics(out)] == list(range(1, EPOCHS + 1))
    final = json.loads(next(x for x in result.logs.splitlines() if x.startswith('{"final"')))["final"]
    assert final["workers"] == 2 and final["global_batch"] == 8


def test_elastic_run_continues_on_the_surviving_node_and_grows_back_with_the_same_losses(cluster, inputs, tmp_path):
    corpus, config, out = inputs
    cluster.ensure_nodes(2)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "elastic_hold.py").write_text(HOLD_HOOKS)
    # Every node runs on this machine: the workers import the hook from the test's folder.
    env = {**START_TIMEOUT, "PYTHONPATH": str(hooks), "CHARLSTM_HOOKS": "elastic_hold",
           "CHARLSTM_TEST_HOLD_SECONDS": "300"}
    args = _spread_run(inputs, "el", "--num-workers", "1-2", "--seed", "3", "--elastic-resize-seconds", "5")
    job, at_kill = _run_until_checkpoint_then_kill(cluster, args, out, "el", env)
    # No replacement yet: the run must go on without one, on the surviving worker.
    deadline = time.monotonic() + 300
    while not (held := HELD.findall(cluster.job_logs(job.job_id))):
        assert job.proc.poll() is None, job.wait(10).describe()
        assert time.monotonic() < deadline, cluster.job_logs(job.job_id)[-3000:]
        time.sleep(0.5)
    cluster.add_node()  # capacity returns
    result = job.wait(420)
    assert result.ok, result.describe()
    # Each attempt says its size once (only rank 0 prints, and each node forwards only its own workers' lines).
    sizes = [int(n) for n in re.findall(r"(\d+) worker\(s\), global batch 8 \(\d+ per worker\)", result.logs)]
    assert sizes == [2, 1, 2], (f"expected 2 workers, then 1 after the loss, then 2 again once a node joined: "
                                f"{sizes}\n{result.logs[-3000:]}")
    # Resumed on the survivor from the newest checkpoint at the kill, then grown from the one the survivor wrote.
    resumes = [r[2] for r in _resumes(result.logs)]
    assert len(resumes) == 2 and resumes[1] == int(held[0]), (resumes, held)
    assert resumes[0] >= at_kill and resumes[0] % INTERVAL == 0 and resumes[1] > resumes[0], (resumes, at_kill)
    final = json.loads(next(x for x in result.logs.splitlines() if x.startswith('{"final"')))["final"]
    assert final["workers"] == 2 and final["global_batch"] == 8
    # Ray Train's default interval would grow it too, later: its controller (on the head, beside the driver)
    # names the interval in every look it skips, and only this run of the module is elastic with 5 s.
    controller = "".join(p.read_text() for p in sorted(
        Path(cluster.info.temp_dir, "session_latest", "logs", "train").glob("ray-train-sys-controller-*.log")))
    assert "ScalingConfig(elastic_resize_monitor_interval_s=5.00 seconds)" in controller, controller[-3000:]

    # The same run on one worker at the same global batch, never interrupted: the same losses.
    _same_losses(_metrics(out), _reference_losses(corpus, tmp_path / "reference", seed=3))

    # Resubmitting with another worker count: refused (one line, nothing written) unless the global batch stays,
    # then the run continues exactly on that rule. (--elastic-resize-seconds left out: a resume may change it.)
    base = [sys.executable, "-m", "job.train", "--corpus", corpus, "--output", out, "--config", config,
            "--run-name", "el", "--seed", "3", "--epochs", str(EPOCHS + 1), "--in-process", "--num-workers", "1"]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {out} already holds run 'el' (checkpoint at global step {final['global_step']}) made with other "
        "settings: global batch 8 -> 4 (pass --global-batch-size 8 to resume on another number of workers); "
        "resume with the same settings, or start a new run with another --output"]
    assert [m["epoch"] for m in _metrics(out)] == list(range(1, EPOCHS + 1))
    continued = subprocess.run([*base, "--global-batch-size", "8"], capture_output=True, text=True, timeout=300)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert f"resumed from checkpoint: epoch {EPOCHS}, step 0" in continued.stdout
    assert [m["epoch"] for m in _metrics(out)] == list(range(1, EPOCHS + 2))


def test_a_run_told_to_wait_for_capacity_waits_until_the_cluster_grows(cluster, inputs):
    """--capacity-wait-minutes: a run that does not fit waits (an autoscaler's own verdict is tested in
    tests/test_autoscaler_detection.py) and starts once a node joins."""
    corpus, config, out = inputs
    cluster.ensure_nodes(2)
    args = ["python", "-m", "job.train", "--corpus", corpus, "--output", out, "--config", config,
            "--num-workers", "3", "--epochs", "1", "--run-name", "grow", "--capacity-wait-minutes", "15"]
    job = cluster.start(args)
    deadline = time.monotonic() + 180
    while "waiting up to 15 min for the cluster to grow" not in cluster.job_logs(job.job_id):
        assert job.proc.poll() is None, job.wait(10).describe()
        assert time.monotonic() < deadline, cluster.job_logs(job.job_id)[-3000:]
        time.sleep(0.5)
    cluster.add_node()  # what an autoscaler would do
    result = job.wait(300)
    assert result.ok, result.describe()
    assert "the Ray cluster has 2 CPUs but 3 workers x 1 CPUs were asked for: waiting up to 15 min" in result.logs
    assert "the cluster has grown to 3 CPUs" in result.logs
    final = json.loads(next(x for x in result.logs.splitlines() if x.startswith('{"final"')))["final"]
    assert final["workers"] == 3 and final["epoch"] == 1


DRAINED = re.compile(r"a node of this run is being drained \(deadline in \d+ s\): checkpoint saved at global step "
                     r"(\d+); waiting for Ray Train to restart the run from it")


def test_a_drained_node_costs_no_step(cluster, inputs, tmp_path):
    corpus, config, out = inputs
    cluster.ensure_nodes(2)
    # No step checkpoints: whatever the resumed run starts from was written for the drain.
    args = [*_spread_run(inputs, "drain", "--num-workers", "1-2", "--seed", "4"), "--checkpoint-every-steps", "0"]
    before = {a["actor_id"] for a in cluster.train_actors()}
    job = cluster.start(args, env={**START_TIMEOUT, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"})
    deadline = time.monotonic() + 240
    while "2 worker(s), global batch 8" not in cluster.job_logs(job.job_id):
        assert job.proc.poll() is None, job.wait(10).describe()
        assert time.monotonic() < deadline, "training did not start within 240 s"
        time.sleep(0.5)
    time.sleep(2)  # a few steps in, mid-epoch
    placed = cluster.worker_nodes_of_run(before)
    assert len(placed) == 2, placed
    drained = next(n for n in cluster.alive_nodes() if n.node_id == placed[-1])
    subprocess.run([e2e_helpers.localstack.ray_executable(), "drain-node", "--address", cluster.info.gcs_address,
                    "--node-id", drained.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                    "spot reclaim (test)", "--deadline-remaining-seconds", "20"],
                   env=cluster.cli_env(), check=True, capture_output=True, timeout=60)
    while not (found := DRAINED.findall(cluster.job_logs(job.job_id))):
        assert job.proc.poll() is None, job.wait(10).describe()
        assert time.monotonic() < deadline, "no drain checkpoint"
        time.sleep(0.5)
    saved = int(found[0])
    while _newest_step(out, "drain") != saved:  # reported: in S3 now or in a moment (Ray may upload it after)
        assert time.monotonic() < deadline, (saved, _newest_step(out, "drain"))
        time.sleep(0.2)
    drained.kill()  # the cloud takes the node at (or before) the deadline
    left = len(cluster.alive_nodes())  # 1, or 2 where an earlier test grew the cluster to 3 nodes
    result = job.wait(420)
    assert result.ok, result.describe()
    assert [r[2] for r in _resumes(result.logs)] == [saved], result.logs[-3000:]
    # Restarted on the nodes left, at the same global batch.
    final = json.loads(next(x for x in result.logs.splitlines() if x.startswith('{"final"')))["final"]
    assert final["workers"] == min(2, left) and final["global_batch"] == 8, final
    _same_losses(_metrics(out), _reference_losses(corpus, tmp_path / "reference", seed=4))
