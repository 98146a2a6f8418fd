"""Shared fixtures: a live local S3 (moto server over HTTP), a Ray head with the job API, and synthetic corpora.

Both come from infra/localstack.py (through tests/e2e_helpers.py), the same code `make demo` runs, and both
stop exactly the processes they started when the session ends, whether tests passed or failed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `infra` is not an installed package; tests import it from the repo
    sys.path.insert(0, str(REPO_ROOT))

pytest.register_assert_rewrite("e2e_helpers")  # its shared checks (assert_same_losses) report like a test's own
import e2e_helpers  # noqa: E402  (tests/ is on sys.path: pytest adds the conftest directory)
import textgen  # noqa: E402

# A test that starts an S3 server or a Ray cluster is end-to-end, whatever its module says: `make test-fast`
# (-m "not e2e") must start no server.
_SERVER_FIXTURES = {"s3_server", "s3_prefix", "ray_cluster", "iam_s3", "flaky", "cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        if _SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def corpus_file(tmp_path):
    """`corpus_file(chars, seed=0, name="corpus.txt")` writes the first `chars` characters (= bytes) of a
    synthetic Project Gutenberg book (tests/textgen.py) under tmp_path and returns its path. No real book is
    needed: the suite runs in a fresh clone with nothing beside it."""

    def write(chars: int, seed: int = 0, name: str = "corpus.txt") -> Path:
        path = tmp_path / name
        path.write_text(textgen.book(chars, seed), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A corpus, the tiny settings (tests/tiny.py) and one finished 2-epoch run of them (two checkpoints, an exported
    model), trained once per session through the CLI (`job.train --in-process`). Read-only: a test that changes a
    run copies it first."""
    import yaml
    from logcheck import run
    from tiny import TINY

    tmp = tmp_path_factory.mktemp("tiny-run")
    corpus, config = tmp / "corpus.txt", tmp / "tiny.yaml"
    corpus.write_text(textgen.book(5000, seed=4))
    config.write_text(yaml.safe_dump(TINY))
    out = tmp / "run"
    proc = run("job.train", "--in-process", "--corpus", str(corpus), "--output", str(out), "--config", str(config),
               "--epochs", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "corpus": corpus, "config": config, "out": out}


@pytest.fixture
def ray_tmp():
    """A private temp dir for a Ray the test's command starts itself (RAY_TMPDIR): its processes all name it,
    so the test can tell they are gone. Short: Ray's unix socket paths under it must stay below 108 bytes
    (pytest's tmp_path is too deep)."""
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket `charlstm-test`; AWS_* point at it for the whole session
    (os.environ too, so in-process code such as job.core.storage talks to it)."""
    with e2e_helpers.s3_server(tmp_path_factory.mktemp("s3")) as server, pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("AWS_"):
                mp.delenv(key)
        for key, value in server.env.items():
            mp.setenv(key, value)
        yield server


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh s3://charlstm-test/t-<random> prefix for one test."""
    return s3_server.url(f"t-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """A Ray head on 127.0.0.1 (token auth, job API, 4 virtual CPUs) whose jobs see the local S3.

    `ray_cluster.submit(["python", "-m", ...], env={...}, timeout=...)` runs `ray job submit --working-dir
    <repo>` and returns a JobResult (returncode, status, logs, job_id)."""
    with e2e_helpers.ray_cluster(tmp_path_factory.mktemp("ray"), s3_server, num_cpus=4) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def iam_s3(tmp_path_factory):
    """A second moto server whose IAM authentication switches on after its first 7 requests (moto's
    INITIAL_NO_AUTH_ACTION_COUNT), which create a bucket, a user with s3:* and a user without any policy.
    From then on moto checks each request's access key id, signature and policy, as AWS does.
    (By default moto accepts any credentials at all.)"""
    import json

    import boto3

    state_dir = tmp_path_factory.mktemp("iam-s3")
    auth_after_7 = {"INITIAL_NO_AUTH_ACTION_COUNT": "7"}
    with e2e_helpers.s3_server(state_dir, bucket="locked", extra_env=auth_after_7) as srv:
        iam = boto3.client("iam", endpoint_url=srv.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        # request 1 was the create_bucket of the fixture
        iam.create_user(UserName="writer")  # 2
        writer = iam.create_access_key(UserName="writer")["AccessKey"]  # 3
        iam.put_user_policy(UserName="writer", PolicyName="s3-all", PolicyDocument=json.dumps({  # 4
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        iam.create_user(UserName="nobody")  # 5
        nobody = iam.create_access_key(UserName="nobody")["AccessKey"]  # 6
        srv.client().put_object(Bucket="locked", Key="k.txt", Body=b"secret data")  # 7
        # the 8th request is authenticated: the fake default keys no longer work
        with pytest.raises(Exception, match="InvalidAccessKeyId"):
            srv.client().list_objects_v2(Bucket="locked")
        yield {"endpoint": srv.endpoint, "writer": writer, "nobody": nobody}
