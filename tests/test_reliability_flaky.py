"""Reliability against a flaky object store, and what a job leaves behind (secrets, ACLs).

One small Ray training job and one in-process generation job run with AWS_ENDPOINT_URL pointing at
tests/faulty_proxy.py, which answers a share of all S3 requests with 503 SlowDown / 500 InternalError or drops
the connection. Both must end exactly as fault-free runs do, through the libraries' own retries (botocore for
boto3/s3fs, pyarrow's retry strategy for Ray's checkpoint storage). The same two jobs carry a recognisable
secret key, which must then appear in no log and no output, and their outputs must carry no public ACL.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import textgen
import yaml
from e2e_helpers import assert_same_losses, read_metrics, train_in_process
from faulty_proxy import FaultyProxy
from logcheck import assert_no_traceback_from_our_code
from tiny import EXACT

REPO = Path(__file__).resolve().parents[1]
TINY = EXACT
CANARY_SECRET = f"charlstm-SECRET-canary-{uuid.uuid4().hex}"
CANARY_KEY_ID = "CHARLSTMCANARYKEY"
TRAIN_FLAGS = ["--num-workers", "1", "--epochs", "2", "--run-name", "flaky", "--seed", "5",
               "--checkpoint-every-steps", "20"]
GEN_FLAGS = ["--num-samples", "12", "--length", "24", "--shard-size", "4", "--seed", "2", "--temperature", "0.8"]


def _key(url: str) -> str:
    return url.split("/", 3)[3]


@dataclass
class Runs:
    proxy: FaultyProxy
    train_out: str
    train_logs: str  # the job's logs and what `ray job submit` printed (which repeats them)
    train_job_logs: str  # the job's logs alone: each line once
    train_faults: dict
    reference_train: Path
    gen_out: str
    gen_proc: subprocess.CompletedProcess
    gen_faults: dict
    reference_gen: Path
    ray_log_dir: Path


@pytest.fixture(scope="module")
def flaky(s3_server, ray_cluster, tmp_path_factory):
    """The flaky-store runs (and their fault-free references), done once for the tests of this module."""
    tmp = tmp_path_factory.mktemp("flaky")
    base = f"flaky-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key=f"{base}/corpus.txt",
                      Body=textgen.book(4000).encode())
    client.put_object(Bucket=s3_server.bucket, Key=f"{base}/tiny.yaml", Body=yaml.safe_dump(TINY).encode())
    corpus, config = s3_server.url(base, "corpus.txt"), s3_server.url(base, "tiny.yaml")
    train_out, gen_out = s3_server.url(base, "run"), s3_server.url(base, "gen")
    canary_env = {"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET}

    with FaultyProxy(s3_server.endpoint, fault_rate=0.15, seed=11, max_consecutive=2) as proxy:
        job_env = {"AWS_ENDPOINT_URL": proxy.endpoint, **canary_env}
        result = ray_cluster.submit(["python", "-m", "job.train", "--corpus", corpus, "--output", train_out,
                                     "--config", config, *TRAIN_FLAGS], env=job_env, timeout=420)
        assert result.ok, result.describe() + "\n" + proxy.summary()
        train_faults = dict(proxy.injected_by_family())

        env = {**os.environ, **job_env}
        gen_proc = subprocess.run([sys.executable, "-m", "job.generate", "--model", train_out, "--output", gen_out,
                                   *GEN_FLAGS, "--in-process"], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=300)
        assert gen_proc.returncode == 0, gen_proc.stderr[-3000:] + "\n" + proxy.summary()
        gen_faults = {k: v - train_faults.get(k, 0) for k, v in proxy.injected_by_family().items()}

    # Fault-free references, reading straight from the S3 server and writing locally: the same training
    # in-process (one worker, same global batch), and the same generation from the model the flaky run exported.
    reference_train = tmp / "reference-train"
    train_in_process(corpus, reference_train, **TINY, epochs=2, seed=5, run_name="flaky", checkpoint_every_steps=20)
    reference_gen = tmp / "reference-gen"
    from job import generate

    assert generate.main(["--model", train_out, "--output", str(reference_gen), *GEN_FLAGS, "--in-process"]) == 0
    return Runs(proxy=proxy, train_out=train_out, train_logs=result.logs + result.output, train_job_logs=result.logs,
                train_faults=train_faults, reference_train=reference_train, gen_out=gen_out, gen_proc=gen_proc,
                gen_faults=gen_faults, reference_gen=reference_gen,
                ray_log_dir=Path(ray_cluster.info.temp_dir) / "session_latest" / "logs")


# ------------------------------------------------------------------------------------------- the proxy


def test_proxy_faults_are_deterministic_and_bounded():
    """The same request sees the same faults in every run; never more than max_consecutive in a row."""
    a = FaultyProxy("http://127.0.0.1:1", fault_rate=0.5, seed=3, max_consecutive=2)
    b = FaultyProxy("http://127.0.0.1:1", fault_rate=0.5, seed=3, max_consecutive=2)
    keys = [FaultyProxy.request_key("PUT", f"/bkt/k{i}?partNumber=1&uploadId={uuid.uuid4().hex}") for i in range(50)]
    assert keys[0] == "PUT /bkt/k0?partNumber=1"  # the random upload id does not change the key
    first = [[a.decide(k, "botocore") for _ in range(6)] for k in keys]
    second = [[b.decide(k, "botocore") for _ in range(6)] for k in reversed(keys)][::-1]
    assert first == second
    runs = ["".join("x" if f else "." for f in seq) for seq in first]
    assert all("xxx" not in r for r in runs), runs
    assert {f for seq in first for f in seq} == {None, "503", "500", "drop"}


# ----------------------------------------------------------------------------- retry settings, per library


@pytest.mark.e2e
@pytest.mark.timeout(180)
@pytest.mark.parametrize("attempts, ok", [("4", True), ("3", False)])
def test_pyarrow_retry_strategy_survives_pickling(s3_server, s3_prefix, monkeypatch, attempts, ok):
    """Ray pickles the storage filesystem to its controller and workers; pyarrow's own pickling drops the
    retry strategy (3 attempts on the other side). Every request here fails 3 times before it gets through:
    with AWS_MAX_ATTEMPTS=4 the unpickled filesystem must succeed, with 3 it must give up."""
    from ray import cloudpickle

    from job.core import storage

    with FaultyProxy(s3_server.endpoint, fault_rate=1.0, max_consecutive=3, faults=("503",)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", attempts)
        fs, path = storage.pyarrow_filesystem(f"{s3_prefix}/ckpt")
        shipped = cloudpickle.loads(cloudpickle.dumps(fs))
        assert b"testing" not in cloudpickle.dumps(fs), "credentials must not travel in the pickle"
        assert pickle.loads(pickle.dumps(fs)).charlstm_max_attempts == int(attempts)
        if ok:
            with shipped.open_output_stream(f"{path}/a.bin") as out:
                out.write(b"payload")
            assert s3_server.get_bytes(f"{_key(s3_prefix)}/ckpt/a.bin") == b"payload"
            assert proxy.injected[("pyarrow", "503")] == 3  # a small file is one PUT (allow_delayed_open)
        else:
            with pytest.raises(OSError, match="SLOW_DOWN"):
                with shipped.open_output_stream(f"{path}/a.bin") as out:
                    out.write(b"payload")


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_botocore_retries_as_configured(s3_server, s3_prefix, monkeypatch):
    """s3fs/boto3 use botocore's retries (standard mode, AWS_MAX_ATTEMPTS): 3 faults per request pass with 4."""
    from job.core import storage

    with FaultyProxy(s3_server.endpoint, fault_rate=1.0, max_consecutive=3, faults=("500", "drop")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
        assert storage._botocore_config()["retries"] == {"mode": "standard"}  # max_attempts: from the env
        storage.write_text(f"{s3_prefix}/b.txt", "hello")
        assert storage.read_text(f"{s3_prefix}/b.txt") == "hello"
        assert sum(proxy.injected.values()) >= 6, proxy.summary()


# ------------------------------------------------------------------------------------ the flaky-store jobs


@pytest.mark.e2e
def test_training_through_flaky_store_matches_fault_free_run(flaky, s3_server):
    assert flaky.train_faults.get("botocore", 0) > 0 and flaky.train_faults.get("pyarrow", 0) > 0, \
        f"faults must hit both s3fs and Ray's checkpoint writer: {flaky.proxy.summary()}"
    # A retried fault must not restart the workers: the training loop started once, fresh. Rank 0 prints its
    # "training <preset>: ..." line at every start of the worker group (and "resumed from checkpoint" at a restart),
    # and every start writes its own TensorBoard event file.
    starts = [line for line in flaky.train_job_logs.splitlines() if "training default: " in line]
    assert len(starts) == 1, starts or flaky.train_job_logs[-3000:]
    assert "resumed from checkpoint" not in flaky.train_job_logs
    events = [k for k in s3_server.keys(flaky.train_out) if "/tensorboard/flaky/events.out.tfevents." in k]
    assert len(events) == 1, events
    assert_no_traceback_from_our_code(flaky.train_logs)  # job logs + `ray job submit` output: Ray's too
    lines = [json.loads(x) for x in s3_server.get_bytes(f"{_key(flaky.train_out)}/metrics.jsonl").splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert_same_losses(lines, read_metrics(flaky.reference_train), rel=1e-5)
    from job.model import export

    got, want = export.load(flaky.train_out), export.load(str(flaky.reference_train))
    assert got.config["epoch"] == want.config["epoch"] == 2
    for a, b in zip(got.model.get_weights(), want.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    keys = s3_server.keys(flaky.train_out)
    assert any(k.endswith("/progress.json") and "/checkpoints/flaky/checkpoint_" in k for k in keys), keys


@pytest.mark.e2e
def test_generation_through_flaky_store_is_byte_identical(flaky, s3_server):
    assert flaky.gen_faults.get("botocore", 0) > 0, flaky.proxy.summary()
    assert "Traceback" not in flaky.gen_proc.stderr  # in-process: no Ray, any traceback is ours
    manifest = json.loads(s3_server.get_bytes(f"{_key(flaky.gen_out)}/manifest.json"))
    reference = json.loads((flaky.reference_gen / "manifest.json").read_text())
    assert manifest["num_samples"] == 12 and len(manifest["shards"]) == 3
    assert manifest["shards"] == reference["shards"]  # names, counts, sha256
    for shard in manifest["shards"]:
        blob = s3_server.get_bytes(f"{_key(flaky.gen_out)}/{shard['file']}")
        assert blob == (flaky.reference_gen / shard["file"]).read_bytes(), shard["file"]
        assert len(gzip.decompress(blob).decode().splitlines()) == shard["samples"]


# ------------------------------------------------------------------------------------------------ security


@pytest.mark.e2e
def test_secret_key_appears_in_no_log_and_no_output(flaky, s3_server):
    # The canary credentials really were the ones in use, by both libraries (else this test proves nothing).
    assert {("botocore", CANARY_KEY_ID), ("pyarrow", CANARY_KEY_ID)} <= flaky.proxy.access_keys, \
        flaky.proxy.access_keys
    secret = CANARY_SECRET.encode()
    texts = {"train job logs": flaky.train_logs, "generate stdout": flaky.gen_proc.stdout,
             "generate stderr": flaky.gen_proc.stderr}
    for name, text in texts.items():
        assert CANARY_SECRET not in text, name
    # Every log file of the Ray job's own processes: the driver and the workers (stdout and stderr).
    ours = [p for p in flaky.ray_log_dir.glob("*") if re.match(r"(job-driver-|worker-|python-core-worker-)", p.name)]
    assert any(p.name.startswith("job-driver-") for p in ours), sorted(p.name for p in flaky.ray_log_dir.glob("*"))
    for path in ours:
        assert secret not in path.read_bytes(), path
    # Every object both jobs wrote: metrics.jsonl, model/config.json, checkpoints (progress.json, ...),
    # samples, manifest.json.
    keys = s3_server.keys(flaky.train_out) + s3_server.keys(flaky.gen_out)
    for required in ("metrics.jsonl", "model/config.json", "/progress.json", "manifest.json"):
        assert any(k.endswith(required) for k in keys), (required, keys)
    for key in keys:
        body = s3_server.get_bytes(key)
        assert secret not in body, key
        if key.endswith(".gz"):
            assert secret not in gzip.decompress(body), key


@pytest.mark.e2e
def test_outputs_carry_no_public_acl(flaky, s3_server):
    client = s3_server.client()
    keys = s3_server.keys(flaky.train_out) + s3_server.keys(flaky.gen_out)
    assert len(keys) > 10
    public = ("http://acs.amazonaws.com/groups/global/AllUsers",
              "http://acs.amazonaws.com/groups/global/AuthenticatedUsers")
    for key in keys:
        acl = client.get_object_acl(Bucket=s3_server.bucket, Key=key)
        for grant in acl["Grants"]:
            assert grant["Grantee"].get("URI") not in public, (key, grant)
            assert grant["Grantee"]["Type"] == "CanonicalUser", (key, grant)


def test_job_code_never_sets_an_acl():
    """Objects get the bucket's default (private, or bucket-owner-enforced): no code path asks for an ACL."""
    pattern = re.compile(r"(?i)(?<![a-z])acl(?![a-z])|public-read|authenticated-read|x-amz-grant"
                         r"|Grant(Read|Write|Full)")
    hits = [f"{path.name}:{n}: {line.strip()}" for path in sorted((REPO / "job").glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
    from job.core import storage

    fs = storage.s3_filesystem()
    assert not any("acl" in k.lower() for k in fs.s3_additional_kwargs), fs.s3_additional_kwargs
