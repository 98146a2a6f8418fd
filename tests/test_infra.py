"""infra/create_bucket.py against moto (in-process, and once over HTTP via AWS_ENDPOINT_URL) and the
least-privilege IAM policy in infra/iam-policy.json. No network: moto runs in this process / on 127.0.0.1.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.config import Config
from botocore.stub import Stubber
from moto import mock_aws

from infra import create_bucket as cb
from job.core.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
POLICY_FILE = REPO / "infra" / "iam-policy.json"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Fake credentials, no profile/config files, no endpoint override, no instance metadata lookups.

    Autouse: a session fixture elsewhere may point AWS_ENDPOINT_URL at a local S3 server."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def client(region: str = "us-east-1", endpoint: str | None = None):
    return boto3.client("s3", region_name=region, endpoint_url=endpoint,
                        config=Config(s3={"addressing_style": "path"}))


def assert_locked_down(s3, bucket: str, kms_key: str | None = None) -> None:
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert block == {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                     "RestrictPublicBuckets": True}
    (rule,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    default = rule["ApplyServerSideEncryptionByDefault"]
    if kms_key:
        assert default == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key}
        assert rule["BucketKeyEnabled"] is True
    else:
        assert default == {"SSEAlgorithm": "AES256"}
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    ours = rules[cb.LIFECYCLE_RULE_ID]
    assert ours["Status"] == "Enabled"
    assert ours["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30
    assert ours["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == cb.ABORT_MULTIPART_DAYS


# --------------------------------------------------------------------------------------------- bucket


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_creates_a_locked_down_bucket(aws_env, capsys, region):
    with mock_aws():
        assert cb.main(["--bucket", "charlstm-test", "--region", region]) == 0
        s3 = client(region)
        # us-east-1 is the one region S3 refuses as an explicit LocationConstraint (reported as None).
        expected = None if region == "us-east-1" else region
        assert s3.get_bucket_location(Bucket="charlstm-test")["LocationConstraint"] == expected
        assert_locked_down(s3, "charlstm-test")
    assert f"bucket charlstm-test: created in {region}" in capsys.readouterr().out


def test_region_defaults_to_the_aws_environment(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    with mock_aws():
        assert cb.main(["--bucket", "charlstm-test"]) == 0
        loc = client().get_bucket_location(Bucket="charlstm-test")["LocationConstraint"]
        assert loc == "ap-southeast-2"


def test_sse_kms(aws_env):
    with mock_aws():
        key = boto3.client("kms", region_name="us-east-1").create_key()["KeyMetadata"]["Arn"]
        assert cb.main(["--bucket", "charlstm-test", "--kms-key-id", key]) == 0
        assert_locked_down(client(), "charlstm-test", kms_key=key)


def test_is_idempotent_and_repairs_an_existing_bucket(aws_env, capsys):
    with mock_aws():
        s3 = client()
        s3.create_bucket(Bucket="charlstm-test")  # created by hand: no settings at all
        s3.put_bucket_lifecycle_configuration(Bucket="charlstm-test", LifecycleConfiguration={"Rules": [
            {"ID": "someone-elses-rule", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
             "Expiration": {"Days": 3}}]})
        s3.put_object(Bucket="charlstm-test", Key="runs/alice/keep.txt", Body=b"x")
        for _ in range(2):
            assert cb.main(["--bucket", "charlstm-test"]) == 0
            assert_locked_down(s3, "charlstm-test")
        rules = s3.get_bucket_lifecycle_configuration(Bucket="charlstm-test")["Rules"]
        assert sorted(r["ID"] for r in rules) == sorted(["someone-elses-rule", cb.LIFECYCLE_RULE_ID])
        assert s3.get_object(Bucket="charlstm-test", Key="runs/alice/keep.txt")["Body"].read() == b"x"
    out = capsys.readouterr().out
    assert out.count("bucket charlstm-test: already exists and is yours") == 2
    assert "created" not in out


def test_existing_bucket_in_another_region_is_kept_and_reported(aws_env, capsys):
    with mock_aws():
        client("eu-west-1").create_bucket(Bucket="charlstm-test",
                                          CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        assert cb.main(["--bucket", "charlstm-test", "--region", "us-east-1"]) == 0
        assert_locked_down(client("eu-west-1"), "charlstm-test")
    assert "in eu-west-1, not us-east-1" in capsys.readouterr().out


def test_noncurrent_days_zero_adds_no_lifecycle_rule(aws_env):
    with mock_aws():
        assert cb.main(["--bucket", "charlstm-test", "--noncurrent-days", "0"]) == 0
        with pytest.raises(client().exceptions.ClientError, match="NoSuchLifecycleConfiguration"):
            client().get_bucket_lifecycle_configuration(Bucket="charlstm-test")


def _stubbed(endpoint: str | None = None):
    s3 = client(endpoint=endpoint)
    return s3, Stubber(s3)


def test_a_bucket_owned_by_someone_else_is_a_clear_error():
    s3, stub = _stubbed()
    stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
    with stub, pytest.raises(UserError, match="belongs to someone else"):
        cb.ensure_bucket(s3, "taken-name", "us-east-1")


def test_a_name_taken_meanwhile_is_a_clear_error():
    s3, stub = _stubbed()
    stub.add_client_error("head_bucket", service_error_code="404", http_status_code=404)
    stub.add_client_error("create_bucket", service_error_code="BucketAlreadyExists", http_status_code=409)
    with stub, pytest.raises(UserError, match="taken by another account"):
        cb.ensure_bucket(s3, "taken-name", "us-east-1")


def test_create_sends_location_constraint_except_in_us_east_1():
    eu = {"Bucket": "b-1", "CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"}}
    for region, expected in [("us-east-1", {"Bucket": "b-1"}), ("eu-west-1", eu)]:
        s3, stub = _stubbed()
        stub.add_client_error("head_bucket", service_error_code="404", http_status_code=404)
        stub.add_response("create_bucket", {}, expected)
        with stub:
            assert cb.ensure_bucket(s3, "b-1", region) == f"bucket b-1: created in {region}"
        stub.assert_no_pending_responses()


def test_unimplemented_settings_are_warnings_only_on_non_aws_endpoints():
    def run(endpoint):
        s3, stub = _stubbed(endpoint)
        stub.add_response("put_bucket_versioning", {})
        stub.add_client_error("put_public_access_block", service_error_code="NotImplemented",
                              http_status_code=501)
        stub.add_response("put_bucket_encryption", {})
        with stub:
            return cb.configure_bucket(s3, "b-1", noncurrent_days=0)

    lines = run("http://minio.example:9000")
    assert lines[0] == "versioning: enabled" and lines[2].startswith("default encryption")
    assert lines[1].startswith("warning: public access block skipped")
    with pytest.raises(Exception, match="NotImplemented"):
        run(None)  # real AWS: every setting is required


def test_honours_aws_endpoint_url(aws_env, monkeypatch):
    """Over HTTP to a moto server, as with MinIO: success proves the request went to AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        assert cb.main(["--bucket", "charlstm-test", "--region", "us-east-1"]) == 0
        assert_locked_down(client(endpoint=endpoint), "charlstm-test")
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name,why", [
    ("Charlstm", "lowercase"), ("ab", "3-63"), ("a" * 64, "3-63"), ("-charlstm", "start and end"),
    ("char..lstm", "'..'"), ("192.168.1.2", "IP address"), ("charlstm_data", "lowercase"),
    ("xn--charlstm", "reserves"),
])
def test_invalid_bucket_names_are_rejected_before_any_request(name, why, capsys):
    assert run_cli(cb.main, [f"--bucket={name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid bucket name") and why in err and err.count("\n") == 1


def test_valid_bucket_names_pass():
    for name in ("charlstm-data", "my.bucket.2026", "abc"):
        assert cb.validate_bucket_name(name) is None  # raises UserError on a bad name


def _run_module(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.create_bucket", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    proc = _run_module(["--bucket", "Not_Valid"], _clean_env(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid bucket name") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_cli_without_credentials_says_so(tmp_path):
    # Credentials are resolved before anything is sent, so this makes no network request.
    proc = _run_module(["--bucket", "charlstm-test", "--region", "us-east-1"], _clean_env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: no AWS credentials found") and proc.stderr.count("\n") == 1


def test_access_denied_is_one_line(aws_env, capsys, monkeypatch):
    from botocore.exceptions import ClientError

    def denied(*args, **kwargs):
        error = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
        raise ClientError(error, "PutBucketVersioning")

    with mock_aws():
        monkeypatch.setattr(cb, "configure_bucket", denied)
        assert run_cli(cb.main, ["--bucket", "charlstm-test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PutBucketVersioning on bucket charlstm-test failed: AccessDenied")
    assert "not the job's role" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------- policy


def allowed(policy: dict, action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """A small IAM evaluator: Allow statements with StringLike / Null conditions (enough for this policy)."""
    context = context or {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if not any(fnmatch.fnmatchcase(action, a) for a in actions):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in resources):
            continue
        ok = True
        for operator, conditions in st.get("Condition", {}).items():
            for key, values in conditions.items():
                values = values if isinstance(values, list) else [values]
                if operator == "StringLike":
                    ok &= key in context and any(fnmatch.fnmatchcase(context[key], v) for v in values)
                elif operator == "Null":
                    ok &= (key not in context) == (values == ["true"])
                else:
                    raise AssertionError(f"unexpected condition operator {operator}")
        if ok:
            return True
    return False


def test_checked_in_policy_is_the_generated_one():
    assert json.loads(POLICY_FILE.read_text()) == cb.build_policy(cb.EXAMPLE_BUCKET)


def test_policy_grants_only_on_the_job_prefixes():
    policy = json.loads(POLICY_FILE.read_text())
    bucket = f"arn:aws:s3:::{cb.EXAMPLE_BUCKET}"
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert allowed(policy, action, f"{bucket}/runs/alice/checkpoint_000001/model.keras")
        assert allowed(policy, action, f"{bucket}/generations/alice/shard-00000.jsonl.gz")
        assert not allowed(policy, action, f"{bucket}/other/file")
        assert not allowed(policy, action, f"{bucket}/runsX/file")
        assert not allowed(policy, action, "arn:aws:s3:::some-other-bucket/runs/alice/x")
    assert allowed(policy, "s3:GetObject", f"{bucket}/corpora/wonderland.txt")
    assert allowed(policy, "s3:ListBucket", bucket, {"s3:prefix": "runs/alice/"})
    assert not allowed(policy, "s3:ListBucket", bucket, {"s3:prefix": "private/"})
    assert not allowed(policy, "s3:ListBucket", bucket, {"s3:prefix": ""})
    assert allowed(policy, "s3:ListBucket", bucket)  # HeadBucket (no prefix): pyarrow's existence check
    for action in ("s3:DeleteBucket", "s3:PutBucketPolicy", "s3:PutBucketAcl", "s3:PutObjectAcl",
                   "s3:GetObjectVersion", "s3:DeleteObjectVersion", "s3:PutLifecycleConfiguration",
                   "s3:CreateBucket", "iam:PassRole"):
        assert not allowed(policy, action, bucket) and not allowed(policy, action, f"{bucket}/runs/x")
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert not any("*" in a for a in actions), st
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert all(r in (bucket,) or r.startswith(f"{bucket}/") and r.count("/") == 2 for r in resources), st
        if "s3:ListBucket" in actions:
            assert st.get("Condition"), "s3:ListBucket must be limited by a condition"


def test_policy_covers_every_s3_url_the_k8s_jobs_use():
    policy = json.loads(POLICY_FILE.read_text())
    settings = yaml.safe_load((REPO / "k8s" / "settings" / "kustomization.yaml").read_text())["configMapGenerator"][0]
    assert f"bucket={cb.EXAMPLE_BUCKET}" in settings["literals"]
    jobs = sorted((REPO / "k8s").rglob("rayjob-*.yaml"))
    assert {p.name for p in jobs} == {"rayjob-train.yaml", "rayjob-generate.yaml"}, jobs
    for path in jobs:
        entry = yaml.safe_load(path.read_text())["spec"]["entrypoint"]
        urls = [a for a in shlex.split(entry) if a.startswith("s3://")]
        assert urls
        for url in urls:
            bucket, _, key = url[len("s3://"):].partition("/")
            assert bucket == cb.EXAMPLE_BUCKET
            for action in ("s3:GetObject", "s3:PutObject"):
                assert allowed(policy, action, f"arn:aws:s3:::{bucket}/{key}/x"), (url, action)
            assert allowed(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": key + "/"})


def test_policy_out_is_scoped_to_the_given_bucket_and_prefix(aws_env, tmp_path, capsys):
    out = tmp_path / "policy.json"
    with mock_aws():
        assert cb.main(["--bucket", "my-bucket", "--prefix", "charlstm/", "--policy-out", str(out)]) == 0
    policy = json.loads(out.read_text())
    assert allowed(policy, "s3:PutObject", "arn:aws:s3:::my-bucket/charlstm/runs/x")
    assert not allowed(policy, "s3:PutObject", "arn:aws:s3:::my-bucket/runs/x")
    assert not allowed(policy, "s3:PutObject", f"arn:aws:s3:::{cb.EXAMPLE_BUCKET}/charlstm/x")
    assert str(out) in capsys.readouterr().out


def test_policy_with_a_kms_key_arn_allows_that_key_only():
    arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    policy = cb.build_policy("b-1", ["runs/"], kms_key_arn=arn)
    assert allowed(policy, "kms:GenerateDataKey", arn) and allowed(policy, "kms:Decrypt", arn)
    assert not allowed(policy, "kms:Decrypt", arn.replace("1234abcd", "99999999"))


@pytest.mark.parametrize("prefix,expected", [("runs", "runs/"), ("/runs/", "runs/"), ("a/b", "a/b/")])
def test_prefixes_are_normalised(prefix, expected):
    assert cb.normalise_prefix(prefix) == expected


@pytest.mark.parametrize("prefix", ["", "/", "runs/*", "a?"])
def test_whole_bucket_or_wildcard_prefixes_are_refused(prefix):
    with pytest.raises(UserError):
        cb.normalise_prefix(prefix)


def test_bucket_setup_reads_region_and_endpoint_as_the_job_does(monkeypatch):
    """One reading of the environment for the job and the bucket tool: botocore's region order, AWS host names."""
    from job.core import storage

    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    assert cb.default_region() == storage.aws_region() == "ap-southeast-2"  # botocore reads AWS_DEFAULT_REGION
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert cb.default_region() == "eu-west-3"
    monkeypatch.delenv("AWS_REGION")
    assert cb.default_region() == "us-east-1" and storage.aws_region() is None
    for url, custom in [("https://s3.eu-west-1.amazonaws.com", False), ("https://s3.cn-north-1.amazonaws.com.cn",
                        False), ("http://minio:9000", True), ("https://amazonaws.com.evil.example", True)]:
        assert storage.is_custom_endpoint(url) is custom, url


def test_the_demo_runs_offline_on_invented_prose(tmp_path):
    """`make demo` on a machine without internet: one line saying so, then a corpus the project writes itself
    (the demo's URL here is a closed port on loopback: nothing is downloaded in a test)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = tmp_path / "pg11.txt"
    proc = subprocess.run([sys.executable, "-m", "infra.demo_corpus", str(target), f"http://127.0.0.1:{port}/pg11.txt"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{target}.generated" and not target.exists()
    assert proc.stderr.startswith("== cannot download the corpus (") and len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr
    text = Path(proc.stdout.strip()).read_text()
    assert len(text) == 160_000 and "START OF" in text  # a whole synthetic book, Gutenberg wrapping included
