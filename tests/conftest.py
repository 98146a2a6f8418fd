"""Shared fixtures: a live local S3 (moto server over HTTP) and a Ray head with the job API.

Both come from infra/localstack.py (through tests/e2e_helpers.py), the same code `make demo` runs, and both
stop exactly the processes they started when the session ends, whether tests passed or failed.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `infra` is not an installed package; tests import it from the repo
    sys.path.insert(0, str(REPO_ROOT))

import e2e_helpers  # noqa: E402  (tests/ is on sys.path: pytest adds the conftest directory)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket `charlstm-test`; AWS_* point at it for the whole session
    (os.environ too, so in-process code such as job.storage talks to it)."""
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
