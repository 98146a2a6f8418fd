"""The training job's fault paths end to end: `ray job submit` to a live Ray head, corpus and outputs on a local S3
server; a worker dies hard mid-epoch, by its own hand or SIGKILLed by the test; Ray restarts the group and the run
resumes from the newest complete checkpoint.

The fault-free 2-worker run (its outputs, and the synchronisation proof: 2 workers hold identical weights and follow
the 1-worker run at the same global batch) shares its job with the many-file corpus test in
tests/test_corpus_scale_ray.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import textgen
import yaml
from tiny import EXACT

from job.core.config import PRESETS, TrainConfig

pytestmark = pytest.mark.e2e

# The tests' fault injection (tests/train_hooks.py), loaded by every worker.
HOOKS = {"CHARLSTM_HOOKS": "tests.train_hooks"}
# Tiny and dropout-free (tests/tiny.py).
TINY = EXACT


def upload(s3_server, key: str, body: bytes) -> str:
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key, Body=body)
    return s3_server.url(key)


def metrics_lines(s3_server, out_url: str) -> list[dict]:
    key = out_url.split("/", 3)[3] + "/metrics.jsonl"
    return [json.loads(line) for line in s3_server.get_bytes(key).decode().splitlines()]


@pytest.fixture
def job_inputs(s3_server, s3_prefix):
    base = s3_prefix.split("/", 3)[3]
    corpus = upload(s3_server, f"{base}/corpus.txt", textgen.book(6000).encode())
    config = upload(s3_server, f"{base}/tiny.yaml", yaml.safe_dump(TINY).encode())
    return corpus, config, f"{s3_prefix}/run"


def _steps_in_first_epoch(corpus_url: str, global_batch: int) -> int:
    """Steps of epoch 1 of a default-preset run on TINY settings (default seed), from the job's own code."""
    from job.data import corpus as corpus_lib
    from job.data import windows as data

    cfg = TrainConfig(**{**PRESETS["default"], **TINY, "output": "unused"})
    split = corpus_lib.split_point(len(corpus_lib.load(corpus_url).text), cfg.val_fraction)
    return len(data.stream_plan(split, cfg.seq_len, global_batch, 0, cfg.seed))


def test_worker_crash_resumes_from_checkpoint(ray_cluster, s3_server, job_inputs, tmp_path):
    corpus, config, out = job_inputs
    marker = tmp_path / "crashed"
    # The second worker dies hard just after the epoch-1 checkpoint was reported, before Ray's controller
    # may have registered it. The resume must still start from that checkpoint: lost
    # work stays under one checkpoint interval.
    steps = _steps_in_first_epoch(corpus, global_batch=8)
    assert 25 <= steps <= 40, steps  # about 6000 chars at 8 x 20 chars per step
    env = {**HOOKS, "CHARLSTM_TEST_CRASH_AT_STEP": str(steps + 1), "CHARLSTM_TEST_CRASH_MARKER": str(marker)}
    args = ["python", "-m", "job.train", "--corpus", corpus, "--output", out, "--config", config,
            "--num-workers", "2", "--epochs", "2", "--run-name", "crash", "--max-failures", "2"]
    result = ray_cluster.submit(args, env=env, timeout=480)
    assert result.ok, result.describe()
    assert marker.exists(), "the fault was never injected"
    assert "test fault injection" in result.logs
    assert f"resumed from checkpoint: epoch 1, step 0 of the next epoch, global step {steps}" in result.logs, \
        result.logs[-3000:]
    assert [m["epoch"] for m in metrics_lines(s3_server, out)] == [1, 2]
    from job.model import export

    loaded = export.load(out)
    assert loaded.config["epoch"] >= 1 and loaded.config["workers"] == 2


def _newest_checkpoint(out: str, run: str) -> dict | None:
    """The progress record of the newest complete checkpoint of `run` under `out`, or None."""
    from job.core import storage
    from job.training import session

    found = session.complete_checkpoints(f"{out}/checkpoints/{run}")
    if not found:
        return None
    return json.loads(storage.read_text(storage.join(found[-1][1], session.PROGRESS)))["progress"]


def test_worker_sigkilled_mid_epoch_resumes_from_latest_checkpoint(ray_cluster, s3_server, s3_prefix, tmp_path):
    """The test itself SIGKILLs one Ray Train worker process (pid from Ray's state API) between two step
    checkpoints in the middle of an epoch: Ray restarts the worker group, the run resumes from the newest
    complete checkpoint (so at most one checkpoint interval of work is redone), finishes its epochs, and the
    exported model loads."""
    from e2e_helpers import pid_alive

    base = s3_prefix.split("/", 3)[3]
    # ~14k chars: about 80 steps per epoch at global batch 8, so an epoch spans many 10-step checkpoints.
    corpus = upload(s3_server, f"{base}/corpus.txt", textgen.book(14000).encode())
    config = upload(s3_server, f"{base}/tiny.yaml", yaml.safe_dump(TINY).encode())
    out, interval, epochs = f"{s3_prefix}/run", 10, 2
    args = ["python", "-m", "job.train", "--corpus", corpus, "--output", out, "--config", config,
            "--num-workers", "2", "--epochs", str(epochs), "--run-name", "kill", "--max-failures", "2",
            "--checkpoint-every-steps", str(interval)]
    before = {a["actor_id"] for a in ray_cluster.train_actors()}
    job = ray_cluster.start(args)
    try:
        # Wait for a mid-epoch checkpoint (not an epoch end) inside epoch 1 or later.
        deadline = time.monotonic() + 300
        while True:
            assert job.proc.poll() is None, job.wait(10).describe()
            assert time.monotonic() < deadline, "no mid-epoch checkpoint in 300 s"
            newest = _newest_checkpoint(out, "kill")
            if newest and newest["epoch"] >= 1 and newest["step_in_epoch"] > 0:
                break
            time.sleep(0.2)
        workers = sorted((a for a in ray_cluster.train_actors()
                          if a["actor_id"] not in before and a["class_name"] == "RayTrainWorker"
                          and a["state"] == "ALIVE"), key=lambda a: a["pid"])
        assert len(workers) == 2, workers
        victim = workers[-1]["pid"]
        assert pid_alive(victim)
        at_kill = _newest_checkpoint(out, "kill")
        os.kill(victim, signal.SIGKILL)
    finally:
        result = job.wait(480)
    assert result.ok, result.describe()
    resumed = re.findall(r"resumed from checkpoint: epoch (\d+), step (\d+) of the next epoch, global step (\d+)",
                         result.logs)
    assert resumed, result.logs[-3000:]
    epoch, step_in_epoch, step = (int(x) for x in resumed[0])
    # The newest checkpoint complete when the worker died (or one written in the instant before): lost work
    # is under one checkpoint interval, and the resume lands inside the epoch, not at its start.
    assert step >= at_kill["global_step"] and step % interval == 0, (resumed, at_kill)
    if step == at_kill["global_step"]:
        assert (epoch, step_in_epoch) == (at_kill["epoch"], at_kill["step_in_epoch"]), (resumed, at_kill)
    lines = metrics_lines(s3_server, out)
    assert [m["epoch"] for m in lines] == list(range(1, epochs + 1))
    from job.model import export

    loaded = export.load(out)
    assert loaded.config["workers"] == 2 and loaded.config["epoch"] >= 1
