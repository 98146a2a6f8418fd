"""Ctrl-C (SIGINT) or SIGTERM on the training driver: a clean stop (exit 130 / 143, one line, no traceback),
a usable last checkpoint, and a re-run that resumes from it; under Ray, no worker outlives the driver, and
`ray job stop` (which sends SIGTERM) aborts the run the same way.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group, so the tests start the driver in
its own session and signal that group (and nothing else).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import textgen
import yaml
from e2e_helpers import pid_alive
from logcheck import assert_no_traceback_from_our_code
from tiny import EXACT

from job.core import storage
from job.training import session

REPO = Path(__file__).resolve().parents[1]
RAY_WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=")
TINY = EXACT


def _inputs(tmp_path: Path) -> tuple[str, str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(textgen.book(4000).encode())
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return str(corpus), str(config)


class Driver:
    """`python -m job.train ...` in its own session, output to files (a full pipe can never block it)."""

    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.out_path, self.err_path = log_dir / "driver.out", log_dir / "driver.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "job.train", *args], cwd=REPO, env=env,
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def send(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _wait_for_checkpoint(driver: Driver, root: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not session.complete_checkpoints(root):
        assert driver.proc.poll() is None, f"the driver ended early:\n{driver.stdout[-2000:]}\n{driver.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint under {root} in {timeout:.0f}s:\n{driver.stderr[-3000:]}"
        time.sleep(0.2)


def _assert_clean_interrupt(driver: Driver, timeout: float = 120, line: str = "interrupted", rc: int = 130,
                            under_ray: bool = False) -> None:
    driver.proc.wait(timeout=timeout)
    err = driver.stderr
    assert driver.proc.returncode == rc, f"rc={driver.proc.returncode}\n{err[-3000:]}"
    if under_ray:  # Ray's own processes log here too, sometimes with their internal tracebacks
        assert_no_traceback_from_our_code(err)
    else:
        assert "Traceback" not in err, err[-3000:]
    # The driver's own last line; Ray may still stream worker lines ("(RayTrainWorker pid=...) ...") after it.
    own = [x for x in err.splitlines() if x.strip() and not RAY_WORKER_LINE.match(x)]
    assert own[-1] == line and own.count(line) == 1, err[-2000:]
    assert '{"final"' not in driver.stdout, "the run finished before it was interrupted"


def _resume_in_process(args: list[str], root: str, output: str) -> None:
    """The newest checkpoint is complete and loads: a re-run resumes from it and finishes one more epoch
    (in-process: the checkpoint layout is the same with or without Ray, and it is the cheaper re-run)."""
    step, newest = session.complete_checkpoints(root)[-1]
    progress = json.loads(storage.read_text(storage.join(newest, session.PROGRESS)))["progress"]
    assert progress["global_step"] == step > 0
    epochs = progress["epoch"] + 1
    again = subprocess.run([sys.executable, "-m", "job.train", *args, "--epochs", str(epochs), "--in-process"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"resumed from checkpoint: epoch {progress['epoch']}, step {progress['step_in_epoch']} of the next "
            f"epoch, global step {step}") in again.stdout, again.stdout[-2000:]
    final = json.loads(again.stdout.strip().splitlines()[-1])["final"]
    assert final["epoch"] == epochs and final["global_step"] > step
    metrics = [json.loads(x) for x in storage.read_text(storage.join(output, "metrics.jsonl")).splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))


@pytest.mark.timeout(420)
@pytest.mark.parametrize(("sig", "line", "rc"), [(signal.SIGINT, "interrupted", 130),
                                                 (signal.SIGTERM, "terminated", 143)], ids=["ctrl-c", "sigterm"])
def test_signal_in_process_stops_cleanly_and_rerun_resumes(tmp_path, sig, line, rc):
    corpus, config = _inputs(tmp_path)
    out = str(tmp_path / "run")
    args = ["--corpus", corpus, "--output", out, "--config", config, "--run-name", "ctrlc", "--seed", "1",
            "--checkpoint-every-steps", "10"]
    driver = Driver([*args, "--epochs", "500", "--in-process"], tmp_path)
    root = storage.join(out, "checkpoints", "ctrlc")
    try:
        _wait_for_checkpoint(driver, root)
        driver.send(sig)
        _assert_clean_interrupt(driver, line=line, rc=rc)
    finally:
        driver.kill()  # only if a failed assertion left it running
    assert not [p for p in Path(out).rglob("*.tmp")], "an interrupted write left a temporary file"
    _resume_in_process(args, root, out)


# ----------------------------------------------------------------------------------------------------- Ray


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_ctrl_c_on_ray_driver_stops_every_worker_and_rerun_resumes(ray_cluster, s3_prefix, tmp_path):
    corpus, config = _inputs(tmp_path)
    out = f"{s3_prefix}/run"
    args = ["--corpus", corpus, "--output", out, "--config", config, "--run-name", "ctrlc-ray", "--seed", "1",
            "--checkpoint-every-steps", "10"]
    env = ray_cluster.cli_env()
    env["RAY_ADDRESS"] = ray_cluster.info.gcs_address  # a driver joins through the GCS, not the job API
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # stay on 127.0.0.1, as the head does (infra/localstack.py)
    before = {a["actor_id"] for a in ray_cluster.train_actors()}
    driver = Driver([*args, "--epochs", "500", "--num-workers", "2"], tmp_path, env=env)
    root = f"{out}/checkpoints/ctrlc-ray"
    try:
        _wait_for_checkpoint(driver, root)
        ours = [a for a in ray_cluster.train_actors() if a["actor_id"] not in before]
        workers = [a for a in ours if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]
        assert len(workers) == 2 and all(pid_alive(a["pid"]) for a in workers), ours
        driver.ctrl_c()
        _assert_clean_interrupt(driver, under_ray=True)
    finally:
        driver.kill()  # only if a failed assertion left it running
    # Every actor of the run is gone, processes included (bounded wait: Ray reaps them asynchronously).
    ours = ray_cluster.wait_actors_gone(before)
    assert {a["class_name"] for a in ours} == {"RayTrainWorker", "TrainController"}
    # Same global batch (2 workers x 4) in one process, so the resumed epoch plan is the interrupted one.
    _resume_in_process([*args, "--batch-size", "8"], root, out)


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_ray_job_stop_aborts_the_run_cleanly_and_rerun_resumes(ray_cluster, s3_server, s3_prefix, tmp_path):
    """`ray job stop` sends the driver SIGTERM: it aborts the run like Ctrl-C (every worker stopped, the last
    checkpoint usable), says "terminated", and exits before Ray's SIGKILL deadline."""
    corpus, config = _inputs(tmp_path)
    base = s3_prefix.split("/", 3)[3]
    for name, path in (("corpus.txt", corpus), ("tiny.yaml", config)):  # the job reads its inputs from S3
        s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{base}/{name}", Body=Path(path).read_bytes())
    out = f"{s3_prefix}/run"
    args = ["--corpus", f"{s3_prefix}/corpus.txt", "--output", out, "--config", f"{s3_prefix}/tiny.yaml",
            "--run-name", "stop", "--seed", "1", "--checkpoint-every-steps", "10"]
    before = {a["actor_id"] for a in ray_cluster.train_actors()}
    # Ray SIGKILLs the entrypoint RAY_JOB_STOP_WAIT_TIME_S after the SIGTERM (default 3 s); give the abort
    # room on a loaded 2-core machine so that the test sees our clean path, not Ray's hard kill.
    job = ray_cluster.start(["python", "-m", "job.train", *args, "--epochs", "500", "--num-workers", "2"],
                            env={"RAY_JOB_STOP_WAIT_TIME_S": "60"})
    root = f"{out}/checkpoints/stop"
    deadline = time.monotonic() + 300
    while not session.complete_checkpoints(root):
        assert job.proc.poll() is None, job.wait(10).describe()
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.5)
    ray_cluster.stop_job(job.job_id, timeout=120)
    result = job.wait(60)
    assert result.status == "STOPPED", result.describe()
    own = [x for x in result.logs.splitlines() if x.strip() and not RAY_WORKER_LINE.match(x)]
    assert "terminated" in own, result.describe()
    assert '{"final"' not in result.logs
    ours = ray_cluster.wait_actors_gone(before)
    assert {a["class_name"] for a in ours} == {"RayTrainWorker", "TrainController"}
    _resume_in_process([*args, "--batch-size", "8"], root, out)


def test_a_report_to_a_controller_that_is_gone_stops_the_worker_without_a_traceback(monkeypatch, capsys):
    """The race behind a Ctrl-C under Ray: the driver's abort kills the controller while a worker is inside
    `ray.train.report`, whose checkpoint-name sync then raises ActorDiedError. Ray logs whatever train_func
    raises as "Error in training function" with a traceback through our loop; the worker must stop quietly."""
    import ray.exceptions
    import ray.train

    from job.core.config import TrainConfig
    from job.training import worker

    def dead_controller(*_args, **_kwargs):
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(ray.train, "report", dead_controller)
    ray_session = session.RaySession.__new__(session.RaySession)  # no Ray Train context outside a worker
    with pytest.raises(session.RunAborted, match="controller is gone"):
        ray_session.report({"global_step": 3, "val_loss": 1.0}, None)

    ray_session.rank = 1

    class Reporting:
        def __init__(self, *_args):
            pass

        def run(self):
            ray_session.report({"global_step": 3}, None)

    monkeypatch.setattr(worker, "detect_session", lambda cfg, in_ray: ray_session)
    monkeypatch.setattr(worker, "Trainer", Reporting)
    assert worker.train_func({**TrainConfig().to_dict(), "_in_ray": True}) == {}
    assert capsys.readouterr().out.strip() == ("worker 1: stopping: the run's Ray Train controller is gone "
                                               "(the driver stopped or failed)")
