"""The local stack itself (infra/localstack.py): a Ray head that accepts `ray job submit --working-dir .`
with token auth, whose jobs reach the local S3 through job.core.storage. This proves the harness every
end-to-end test (and `make demo`) relies on, independently of the training job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from infra import localstack

pytestmark = pytest.mark.e2e

SMOKE = textwrap.dedent("""
    import json, os, sys
    from job.core import storage
    report = {
        "python": sys.executable,
        "cwd": os.getcwd(),
        "venv_uploaded": os.path.exists(os.path.join(os.getcwd(), ".venv")),
        "job_package": __import__("job").__file__,
        "smoke_env": os.environ.get("CHARLSTM_SMOKE"),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    }
    storage.write_text(sys.argv[1], json.dumps(report))
    print("wrote", sys.argv[1])
""")


def test_job_submit_writes_to_local_s3(ray_cluster, s3_server):
    key = f"smoke/{uuid.uuid4().hex[:8]}/report.json"
    marker = uuid.uuid4().hex
    result = ray_cluster.submit(["python", "-c", SMOKE, s3_server.url(key)], env={"CHARLSTM_SMOKE": marker},
                                timeout=180)
    assert result.ok, result.describe()
    assert "wrote s3://" in result.logs
    report = json.loads(s3_server.get_bytes(key))  # read back with boto3, not with job.core.storage
    assert report["smoke_env"] == marker  # --runtime-env-json env_vars reach the job
    assert report["auth_mode"] == "token"
    assert not report["venv_uploaded"]  # .gitignore keeps .venv out of the working-dir upload
    assert report["job_package"].startswith(report["cwd"])  # the uploaded copy of the repo is used
    assert os.path.dirname(report["python"]) == os.path.dirname(sys.executable)  # the venv's python


def test_failing_job_is_reported(ray_cluster):
    result = ray_cluster.submit(["python", "-c", "import sys; print('boom'); sys.exit(3)"], timeout=120)
    assert result.status == "FAILED", result.describe()
    assert result.returncode != 0
    assert "boom" in result.logs


def test_submit_timeout_stops_the_job(ray_cluster):
    sleeper = "import time; print('sleeping', flush=True); time.sleep(600)"
    result = ray_cluster.submit(["python", "-c", sleeper], timeout=12)
    assert result.timed_out, result.describe()
    assert result.status == "STOPPED", result.describe()


def test_job_api_requires_the_token(ray_cluster):
    status, _ = localstack._http_get(ray_cluster.address + "/api/jobs/")
    assert status == 401  # token auth is on: a client without RAY_AUTH_MODE=token would get exactly this
    status, _ = localstack._http_get(ray_cluster.address + "/api/jobs/", ray_cluster.info.auth_headers)
    assert status == 200
    mode = json.loads(localstack._http_get(ray_cluster.address + "/api/authentication_mode")[1])
    assert mode["authentication_mode"] == "token"


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.localstack", *args], cwd=localstack.REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("worker_nodes", [0, 1])
def test_cli_start_env_status_stop(tmp_path, worker_nodes):
    """The CLI `make demo` uses: start, env (shell exports), status, stop (exactly ours; idempotent); as one
    Ray node, or as a head with no CPUs plus worker nodes (what the demo starts)."""
    state = str(tmp_path / "stack")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("alice was beginning\n")
    started = _cli("start", "--state-dir", state, "--bucket", "demo-bucket", "--num-cpus", "1",
                   "--upload", str(corpus), "corpus/alice.txt", "--worker-nodes", str(worker_nodes))
    try:
        assert started.returncode == 0, started.stderr
        stack = localstack.Stack.load(state)
        assert stack is not None and all(stack.alive().values())
        assert len(stack.nodes) == worker_nodes
        assert {n.node_id for n in stack.nodes} <= localstack.alive_node_ids(stack.ray)
        assert len(localstack.alive_node_ids(stack.ray)) == 1 + worker_nodes
        env = _cli("env", "--state-dir", state)
        assert env.returncode == 0
        exports = dict(line.removeprefix("export ").split("=", 1) for line in env.stdout.splitlines())
        assert exports["RAY_ADDRESS"] == stack.ray.address
        assert exports["RAY_AUTH_MODE"] == "token"
        assert exports["AWS_ENDPOINT_URL"] == stack.s3.endpoint
        assert localstack.FAKE_SECRET_KEY == exports["AWS_SECRET_ACCESS_KEY"]  # fake, local-only
        assert os.stat(exports["RAY_AUTH_TOKEN_PATH"]).st_mode & 0o077 == 0  # token file is private
        s3 = localstack.boto3_client(stack.s3.endpoint)
        body = s3.get_object(Bucket="demo-bucket", Key="corpus/alice.txt")["Body"].read()
        assert body == corpus.read_bytes()
        again = _cli("start", "--state-dir", state)
        assert again.returncode != 0 and "already running" in again.stderr
        assert _cli("status", "--state-dir", state).returncode == 0
        members = {**stack.s3.proc.members(), **stack.ray.proc.members()}
        for node in stack.nodes:
            members.update(node.proc.members())
        assert len(members) > 3
    finally:
        stopped = _cli("stop", "--state-dir", state)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not stack.s3.proc.members() and not stack.ray.proc.members()
    assert not any(node.proc.members() for node in stack.nodes)
    assert not any(localstack.running(pid, t) for pid, t in members.items())
    assert not os.path.exists(stack.ray.temp_dir)
    assert _cli("stop", "--state-dir", state).stdout.strip() == "nothing to stop"
    assert _cli("status", "--state-dir", state).returncode != 0


def test_head_that_is_not_ready_in_time_is_stopped(tmp_path):
    with pytest.raises(localstack.StackError, match="not ready") as err:
        localstack.start_ray_head(tmp_path, num_cpus=1, timeout=0.5)
    proc = err.value.proc
    assert proc.pid > 0 and not proc.members()
