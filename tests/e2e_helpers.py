"""Shared harness for the end-to-end tests: a local S3 (moto) and a Ray head, via infra/localstack.py; and the
in-process one-worker run that distributed or faulty runs are compared with (train_in_process, reference_metrics,
assert_same_losses).

The `s3_server` and `ray_cluster` fixtures in conftest.py wrap these context managers; `make demo` drives
the same infra.localstack functions through its CLI, so the tests exercise what the demo runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from infra import localstack

REPO_ROOT = localstack.REPO_ROOT
DEFAULT_JOB_TIMEOUT = 300.0
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]  # AWS_* variables pointing at this server
    info: localstack.S3Info

    def client(self, **overrides):
        """A boto3 S3 client for this server (overrides: aws_access_key_id=..., etc.)."""
        return localstack.boto3_client(self.endpoint, **overrides)

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *(p.strip("/") for p in parts)])

    def get_bytes(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, url: str, relative: bool = False) -> list[str]:
        """Sorted keys of every object under `url` (s3://bucket/prefix): whole, or relative to the prefix."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/"
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        found = sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
        return [key[len(prefix):] for key in found] if relative else found


@dataclass
class JobResult:
    job_id: str
    returncode: int | None  # of `ray job submit` (1 when the job FAILED); None if it timed out
    status: str | None  # SUCCEEDED / FAILED / STOPPED / ... as the job API reports it
    logs: str  # the job's driver output, from the job API
    output: str  # everything `ray job submit` printed
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "SUCCEEDED"

    def describe(self) -> str:
        """For assertion messages."""
        return (f"job {self.job_id}: status={self.status} returncode={self.returncode} "
                f"timed_out={self.timed_out}\n--- job logs ---\n{self.logs[-6000:]}\n"
                f"--- ray job submit output ---\n{self.output[-3000:]}")


@dataclass
class RayCluster:
    address: str  # dashboard URL (RAY_ADDRESS for `ray job ...`)
    env: dict[str, str]  # client environment: RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, AWS_*
    info: localstack.RayInfo
    submitted: list[str] = field(default_factory=list)

    # -- job API over HTTP (token in the Authorization header), used for status and logs
    def _api(self, path: str, timeout: float = 10.0) -> dict:
        status, body = localstack._http_get(self.address + path, self.info.auth_headers, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def job_status(self, job_id: str) -> str | None:
        try:
            return self._api(f"/api/jobs/{job_id}")["status"]
        except (RuntimeError, OSError, KeyError, ValueError):
            return None

    def job_logs(self, job_id: str) -> str:
        try:
            return self._api(f"/api/jobs/{job_id}/logs").get("logs", "")
        except (RuntimeError, OSError, ValueError):
            return ""

    def cli_env(self) -> dict[str, str]:
        env = localstack.scrubbed_environ()
        env.update(self.env)
        return env

    def stop_job(self, job_id: str, timeout: float = 60.0) -> None:
        """`ray job stop`, then wait (bounded) until the job reaches a terminal state."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([localstack.ray_executable(), "job", "stop", "--address", self.address, job_id],
                           env=self.cli_env(), capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.job_status(job_id) not in TERMINAL_STATUSES:
            time.sleep(0.5)

    def submit(self, entrypoint: list[str], env: dict[str, str] | None = None,
               timeout: float = DEFAULT_JOB_TIMEOUT, working_dir: str | Path = REPO_ROOT,
               extra_args: list[str] | None = None) -> JobResult:
        """`ray job submit --working-dir <repo> --runtime-env-json {"env_vars": env} -- <entrypoint>`.

        Waits for the job to end (at most `timeout` seconds; then `ray job stop`s it).
        """
        return self.start(entrypoint, env, working_dir, extra_args).wait(timeout)

    def start(self, entrypoint: list[str], env: dict[str, str] | None = None,
              working_dir: str | Path = REPO_ROOT, extra_args: list[str] | None = None) -> Submission:
        """Like submit(), but returns at once: the test acts on the running job, then calls wait()."""
        job_id = f"e2e-{uuid.uuid4().hex[:12]}"
        cmd = [
            localstack.ray_executable(), "job", "submit",
            "--address", self.address,
            "--submission-id", job_id,
            "--working-dir", str(working_dir),
            "--runtime-env-json", json.dumps({"env_vars": dict(env or {})}),
            *(extra_args or []),
            "--", *entrypoint,
        ]
        self.submitted.append(job_id)
        proc = subprocess.Popen(cmd, env=self.cli_env(), cwd=str(REPO_ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return Submission(self, job_id, proc)

    def wait_for_status(self, job_id: str, wanted: tuple[str, ...], timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while (status := self.job_status(job_id)) not in wanted and time.monotonic() < deadline:
            time.sleep(0.5)
        return status

    def train_actors(self) -> list[dict]:
        """Ray Train's actors (controller and workers), dead ones included, as the state API lists them."""
        data = self._api("/api/v0/actors?detail=1&limit=10000", timeout=30)
        actors = data["data"]["result"]["result"]
        return [a for a in actors if a.get("class_name") in ("RayTrainWorker", "TrainController")]

    def wait_actors_gone(self, ignore: set[str], timeout: float = 60) -> list[dict]:
        """Wait (bounded) until every Ray Train actor not in `ignore` is DEAD and its process gone; return them."""
        deadline = time.monotonic() + timeout
        while True:
            ours = [a for a in self.train_actors() if a["actor_id"] not in ignore]
            left = [a for a in ours if a["state"] != "DEAD" or pid_alive(a["pid"])]
            if not left:
                return ours
            if time.monotonic() > deadline:
                raise AssertionError(f"actors outlived the run: {left}")
            time.sleep(0.5)

    def stop_running_jobs(self) -> None:
        for job_id in self.submitted:
            if self.job_status(job_id) not in (*TERMINAL_STATUSES, None):
                self.stop_job(job_id, timeout=20)


@dataclass
class Submission:
    """A `ray job submit` still running (it follows the job's logs until the job ends)."""

    cluster: RayCluster
    job_id: str
    proc: subprocess.Popen

    def wait(self, timeout: float = DEFAULT_JOB_TIMEOUT) -> JobResult:
        timed_out = False
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.cluster.stop_job(self.job_id)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            output, _ = self.proc.communicate()
        return JobResult(job_id=self.job_id, returncode=None if timed_out else self.proc.returncode,
                         status=self.cluster.job_status(self.job_id), logs=self.cluster.job_logs(self.job_id),
                         output=output or "", timed_out=timed_out)


def train_in_process(corpus: str, output: str | Path, *, preset: str = "default",
                     env: dict[str, str] | None = None, **settings) -> dict:
    """One worker in this process, as `job.train --in-process` runs it: the preset's settings with `settings` over
    them, checked as job.train checks them. `env` is set for this run only (e.g. CHARLSTM_HOOKS). Returns
    train_func's final metrics."""
    from job.core.config import PRESETS, TrainConfig
    from job.training.worker import train_func

    cfg = TrainConfig(**{**PRESETS[preset], **settings, "preset": preset, "corpus": corpus, "output": str(output),
                         "in_process": True}).validate()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        return train_func(cfg.to_dict())


def read_metrics(folder: str | Path) -> list[dict]:
    """The lines of a local run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def reference_metrics(corpus: str, output: Path, **settings) -> list[dict]:
    """The reference a distributed or interrupted run is compared with: the same run, uninterrupted, on one worker
    in this process (pass batch_size=<the other run's global batch>), written to the local folder `output`.
    Returns its metrics.jsonl lines."""
    train_in_process(corpus, output, **settings)
    return read_metrics(output)


def assert_same_losses(got: list[dict], want: list[dict], rel: float = 1e-4) -> None:
    """Line for line: the same metrics lines (kind, epoch, global step) with the same train and val losses."""
    def where(lines: list[dict]) -> list[tuple]:
        return [(m.get("kind", "epoch"), m["epoch"], m["global_step"]) for m in lines]

    assert where(got) == where(want), (where(got), where(want))
    for a, b in zip(got, want, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=rel), (a, b)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=rel), (a, b)


def processes_using(directory: str) -> list[psutil.Process]:
    """Live processes whose command line names `directory` (Ray passes its temp/session dir to each daemon)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(directory in a for a in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_until_gone(directory: str, seconds: float = 60) -> list[psutil.Process]:
    """Wait for every process naming `directory` to exit; returns those still alive after `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := processes_using(directory)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def s3_server(state_dir: Path, bucket: str = "charlstm-test",
              extra_env: dict[str, str] | None = None) -> Iterator[S3Server]:
    """A moto S3 server on a free 127.0.0.1 port with `bucket` created; stopped on exit."""
    info = localstack.start_s3(Path(state_dir), bucket, extra_env=extra_env)
    try:
        yield S3Server(endpoint=info.endpoint, bucket=bucket, env=info.env, info=info)
    finally:
        info.proc.stop()


@contextlib.contextmanager
def ray_cluster(state_dir: Path, s3: S3Server | None = None,
                num_cpus: int = localstack.DEFAULT_NUM_CPUS) -> Iterator[RayCluster]:
    """A Ray head (token auth, job API) whose jobs see `s3`'s AWS_* variables; stopped on exit."""
    s3_env = s3.env if s3 is not None else {}
    info = localstack.start_ray_head(Path(state_dir), num_cpus=num_cpus, extra_env=s3_env)
    cluster = RayCluster(address=info.address, env={**s3_env, **info.client_env()}, info=info)
    try:
        yield cluster
    finally:
        try:
            cluster.stop_running_jobs()
        finally:
            localstack.stop_ray_head(info)


@dataclass
class MultiNodeCluster(RayCluster):
    """A head that runs no work (--num-cpus 0) plus worker nodes, each its own process group on 127.0.0.1."""

    state_dir: Path = Path(".")
    node_env: dict[str, str] = field(default_factory=dict)
    nodes: list[localstack.RayNode] = field(default_factory=list)

    def add_node(self, num_cpus: int = 1) -> localstack.RayNode:
        node = localstack.start_ray_node(self.info, self.state_dir, f"w{len(self.nodes) + 1}", num_cpus=num_cpus,
                                         extra_env=self.node_env)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[localstack.RayNode]:
        alive = localstack.alive_node_ids(self.info)
        return [n for n in self.nodes if n.node_id in alive and n.proc.alive()]

    def ensure_nodes(self, count: int) -> list[localstack.RayNode]:
        """Top the cluster up to `count` live worker nodes (a test before this one may have killed some)."""
        while len(self.alive_nodes()) < count:
            self.add_node()
        return self.alive_nodes()

    def worker_nodes_of_run(self, ignore: set[str]) -> list[str]:
        """Node ids of the live Ray Train workers not in `ignore` (actor ids)."""
        return [a["node_id"] for a in self.train_actors() if a["actor_id"] not in ignore
                and a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]


@contextlib.contextmanager
def multinode_cluster(state_dir: Path, s3: S3Server, workers: int = 2) -> Iterator[MultiNodeCluster]:
    """A head (no CPUs: only the driver and Ray Train's controller live there) plus `workers` 1-CPU nodes.

    The head detects a dead node after ~3 s of missed health checks (Ray's default is ~15 s)."""
    fast = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    info = localstack.start_ray_head(Path(state_dir), num_cpus=0, extra_env={**s3.env, **fast}, multi_node=True)
    cluster = MultiNodeCluster(address=info.address, env={**s3.env, **info.client_env()}, info=info,
                               state_dir=Path(state_dir), node_env=dict(s3.env))
    try:
        cluster.ensure_nodes(workers)
        yield cluster
    finally:
        try:
            cluster.stop_running_jobs()
        finally:
            for node in cluster.nodes:
                node.stop()
            localstack.stop_ray_head(info)
