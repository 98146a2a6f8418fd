"""Bad storage and cluster input: one clear line on stderr (or in the job logs), exit code 2, no traceback,
nothing written to --output, and all of it before any training or generation starts.

Missing buckets, rejected credentials, an unreachable endpoint, an --output that cannot be written, a model
URL with nothing there, and Ray jobs that ask for more workers or GPUs than the cluster has.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
from logcheck import assert_one_line_error, assert_user_error, run

MISSING_BUCKET = "charlstm-no-such-bucket"
# What a job prints on stdout once it gets going, in this order: training's dataset ("preparing dataset ..." or
# "dataset ... is current", then "dataset <url>: N file(s), ..."), "training <preset>: ..." just before its first
# step, "step ..." progress, "epoch ..." lines and the closing {"final": ...}; generation's "resuming: ...",
# "generated ..." progress and closing {"samples": ...}. A job refused "before any work" printed none of them.
STARTED = re.compile(r'^(preparing dataset |dataset |training |step |epoch |resuming: |generated |\{")', re.M)


def assert_nothing_started(proc) -> None:
    started = [m.group(0) for m in STARTED.finditer(proc.stdout)]
    assert not started, f"the job got going ({started}) before it was refused:\n{proc.stdout[-2000:]}"


@pytest.fixture
def corpus(corpus_file) -> str:
    """Long enough for the default preset: preflight accepts it, so only the storage problem remains.
    (A synthetic book the size of a short novel; it lies in tmp_path, beside the outputs some tests list.)"""
    return str(corpus_file(145_000, name="corpus.txt"))


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


# ------------------------------------------------------------------------------------------ missing bucket


@pytest.mark.e2e
def test_missing_corpus_bucket(s3_server, tmp_path):
    out = tmp_path / "out"
    proc = run("job.train", "--corpus", f"s3://{MISSING_BUCKET}/corpus.txt", "--output", str(out), "--in-process")
    assert_user_error(proc, f"S3 bucket '{MISSING_BUCKET}' does not exist")
    assert not out.exists()


@pytest.mark.e2e
def test_missing_output_bucket_is_refused_before_training(s3_server, corpus):
    proc = run("job.train", "--corpus", corpus, "--output", f"s3://{MISSING_BUCKET}/runs/a", "--in-process")
    assert_user_error(proc, f"S3 bucket '{MISSING_BUCKET}' does not exist")
    assert_nothing_started(proc)  # refused before the dataset and training, not at the first checkpoint


@pytest.mark.e2e
@pytest.mark.parametrize("which", ["model", "output"])
def test_generate_missing_bucket(s3_server, s3_prefix, tmp_path, which):
    model = f"s3://{MISSING_BUCKET}/runs/a" if which == "model" else f"{s3_prefix}/no-model"
    out = f"s3://{MISSING_BUCKET}/gen" if which == "output" else str(tmp_path / "gen")
    proc = run("job.generate", "--model", model, "--output", out, "--in-process")
    assert_user_error(proc, f"S3 bucket '{MISSING_BUCKET}' does not exist")
    assert not (tmp_path / "gen").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["job.generate", "job.evaluate"])
def test_model_url_with_no_model(s3_server, s3_prefix, tmp_path, corpus, command):
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{s3_prefix.split('/', 3)[3]}/runs/x/notes.txt",
                                  Body=b"not a model")
    model = f"{s3_prefix}/runs/x"
    extra = ["--output", str(tmp_path / "gen"), "--in-process"] if command == "job.generate" else ["--corpus", corpus]
    proc = run(command, "--model", model, *extra)
    assert_user_error(proc, f"no exported model at {model}")
    assert not (tmp_path / "gen").exists()


# ------------------------------------------------------------------------------------ rejected credentials


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["corpus", "output", "generate"])
def test_wrong_credentials(iam_s3, tmp_path, corpus, where):
    """moto with IAM authentication on; the access key exists but the secret is wrong."""
    wrong = "charlstm-WRONG-secret-0123456789"
    env = {"AWS_ENDPOINT_URL": iam_s3["endpoint"], "AWS_ACCESS_KEY_ID": iam_s3["writer"]["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": wrong}
    out = tmp_path / "out"
    if where == "corpus":
        proc = run("job.train", "--corpus", "s3://locked/k.txt", "--output", str(out), "--in-process", env=env)
    elif where == "output":
        proc = run("job.train", "--corpus", corpus, "--output", "s3://locked/runs/a", "--in-process", env=env)
    else:
        proc = run("job.generate", "--model", str(tmp_path), "--output", "s3://locked/gen", "--in-process", env=env)
    line = assert_user_error(proc, "rejected the credentials")
    assert "SignatureDoesNotMatch" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert wrong not in proc.stderr + proc.stdout and iam_s3["writer"]["SecretAccessKey"] not in line
    assert not out.exists()
    import boto3

    writer = boto3.client("s3", endpoint_url=iam_s3["endpoint"], region_name="us-east-1",
                          aws_access_key_id=iam_s3["writer"]["AccessKeyId"],
                          aws_secret_access_key=iam_s3["writer"]["SecretAccessKey"])
    assert s3_keys(writer, "locked", "runs/") == [] and s3_keys(writer, "locked", "gen/") == []


# ----------------------------------------------------------------------------------- unreachable endpoint


def test_unreachable_endpoint_fails_in_bounded_time(tmp_path, corpus):
    """Nothing listens on the endpoint of --output: preflight fails after botocore's bounded retries (default
    settings), with one line. The subprocess timeout is the bound: a hang fails the test, never the suite.
    (Reads from an unreachable endpoint: tests/test_storage.py::test_unreachable_endpoint_is_user_error.)"""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    proc = run("job.train", "--corpus", corpus, "--output", "s3://bucket/runs/a", "--in-process", env=env,
               timeout=90)
    assert_user_error(proc, f"cannot reach the S3 endpoint {endpoint}")
    assert_nothing_started(proc)


# ------------------------------------------------------------------------------------ unwritable --output


def _unwritable_outputs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Tests run as root, where chmod does not stop writes: use a path under a regular file, and /proc."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    return {"under-a-file": (str(blocker / "runs" / "out"), "is a file, not a folder"),
            "proc": ("/proc/charlstm-test-output/run", "cannot create files in /proc")}


@pytest.mark.parametrize("case", ["under-a-file", "proc"])
@pytest.mark.parametrize("command", ["job.train", "job.generate"])
def test_unwritable_output_is_refused_before_any_work(tmp_path, corpus, case, command):
    out, fragment = _unwritable_outputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    if command == "job.train":
        proc = run("job.train", "--corpus", corpus, "--output", out, "--in-process")
    else:
        proc = run("job.generate", "--model", str(tmp_path / "nothing"), "--output", out, "--in-process")
    assert_user_error(proc, f"cannot write to {out}: ")
    assert_nothing_started(proc)
    assert fragment in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the probe left nothing behind
    assert not os.path.exists(out)


# ------------------------------------------------------------------------------------ cluster capacity


@pytest.fixture
def fake_model(s3_server, s3_prefix) -> str:
    """Enough of an exported model for generate's plan (config, vocab, a model.keras that is never loaded)."""
    client, base = s3_server.client(), s3_prefix.split("/", 3)[3]
    files = {"config.json": json.dumps({"seq_len": 20, "lowercase": True, "vocab_size": 3}),
             "vocab.json": json.dumps({"chars": [" ", "a", "b"]}), "model.keras": "never loaded"}
    for name, body in files.items():
        client.put_object(Bucket=s3_server.bucket, Key=f"{base}/model/{name}", Body=body.encode())
    return s3_prefix


@pytest.mark.e2e
@pytest.mark.parametrize("command, flags, fragment", [
    ("job.train", ["--num-workers", "8"], "the Ray cluster has 4 CPUs but 8 workers x 1 CPUs were asked for"),
    ("job.train", ["--use-gpu"], "the Ray cluster has 0 GPUs but --use-gpu with 1 workers needs one each"),
    ("job.generate", ["--use-gpu"], "the Ray cluster has 0 GPUs but --use-gpu with 1 workers needs one each"),
    # Told to wait for nodes that never come: one line when the wait ends.
    ("job.train", ["--num-workers", "8", "--capacity-wait-minutes", "0.05"],
     "the Ray cluster has 4 CPUs but 8 workers x 1 CPUs were asked for after waiting 0.05 min for more nodes"),
], ids=["train-workers", "train-gpu", "generate-gpu", "train-wait-expires"])
def test_more_than_the_cluster_has_fails_the_job_at_once(ray_cluster, s3_server, fake_model, corpus, command,
                                                         flags, fragment):
    base = fake_model.split("/", 3)[3]
    s3_server.client().upload_file(corpus, s3_server.bucket, f"{base}/corpus.txt")
    if command == "job.train":
        args = ["--corpus", f"{fake_model}/corpus.txt", "--output", f"{fake_model}/out", *flags]
    else:
        args = ["--model", fake_model, "--output", f"{fake_model}/out", "--prompt", "ab", *flags]
    result = ray_cluster.submit(["python", "-m", command, *args], timeout=180)
    assert not result.timed_out, result.describe()
    assert result.status == "FAILED" and result.returncode != 0, result.describe()
    assert_one_line_error(result.logs, fragment, ray_logs=True)
    left = s3_keys(s3_server.client(), s3_server.bucket, f"{base}/out")
    if "--capacity-wait-minutes" in flags:
        # The dataset was prepared while waiting (the next attempt reuses it); the run itself was never recorded,
        # so that attempt may ask for another number of workers.
        assert left and all(key.startswith(f"{base}/out/data/") for key in left), left
    else:
        assert left == []


# ------------------------------------------------------------------------------- refused before Ray starts


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["missing corpus", "missing corpus bucket", "unreachable endpoint"])
def test_bad_input_is_refused_before_any_ray_starts(s3_server, tmp_path, ray_tmp, corpus, case):
    """Without --in-process the job would start a local Ray; what can be checked without one is checked first,
    so a typo costs no cluster start: no Ray process, no Ray session folder, no Ray line."""
    env = {"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    output = str(tmp_path / "out")
    if case == "missing corpus":
        args, fragment = ["--corpus", str(tmp_path / "nope.txt")], "not found"
    elif case == "missing corpus bucket":
        args, fragment = ["--corpus", f"s3://{MISSING_BUCKET}/c.txt"], f"S3 bucket '{MISSING_BUCKET}' does not exist"
    else:
        endpoint = f"http://127.0.0.1:{_closed_port()}"
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_MAX_ATTEMPTS="1")
        args, fragment = ["--corpus", "s3://bucket/c.txt"], f"cannot reach the S3 endpoint {endpoint}"
    proc = run("job.train", *args, "--output", output, env=env, timeout=120)
    assert_user_error(proc, fragment)
    assert "Ray" not in proc.stdout + proc.stderr
    assert list(ray_tmp.iterdir()) == [] and not Path(output).exists()
