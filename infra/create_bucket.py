"""Create (or bring into line) the S3 bucket that holds charlstm's corpora, runs and generations.

    python -m infra.create_bucket --bucket NAME [--region R] [--prefix P ...] [--kms-key-id KEY]
                                  [--noncurrent-days N] [--policy-out FILE]

What it sets, every time (so running it again on an existing bucket of yours is safe and repairs drift):
  * versioning on (an overwritten or deleted checkpoint can be recovered);
  * all four public-access blocks on;
  * default encryption: SSE-S3 (AES256), or SSE-KMS with --kms-key-id (bucket key enabled);
  * a lifecycle rule so versioning does not keep every deleted checkpoint forever: non-current versions
    expire after --noncurrent-days (default 30; 0 = keep them) and unfinished multipart uploads after 7 days.

--policy-out writes the least-privilege IAM policy for the job's role, scoped to --prefix (repeatable;
default: the layout the k8s manifests use, corpora/ runs/ generations/). infra/iam-policy.json is the same
policy for the bucket "charlstm-data".

Runs with the caller's AWS credentials (an admin / infrastructure identity: the job's own role needs none
of these permissions). Honours AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, so it also works against MinIO or
moto; there, settings the server does not implement are skipped with a warning instead of failing.
Errors are one line on stderr (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from typing import Any

from job.core import storage
from job.core.errors import UserError, run_cli

DEFAULT_PREFIXES = ("corpora/", "runs/", "generations/")
# Bucket name used in the checked-in infra/iam-policy.json and in k8s/settings/kustomization.yaml.
EXAMPLE_BUCKET = "charlstm-data"
LIFECYCLE_RULE_ID = "charlstm-expire-noncurrent-versions"
ABORT_MULTIPART_DAYS = 7

# Object-level actions the jobs need: read corpora/models, write checkpoints/models/samples (PutObject
# covers CreateMultipartUpload/UploadPart/CompleteMultipartUpload), delete old checkpoints and temporary
# files of atomic writes, clean up multipart uploads.
OBJECT_ACTIONS = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]

_NOT_IMPLEMENTED = {"NotImplemented", "XNotImplemented", "NotImplementedError"}


# ------------------------------------------------------------------------------------------------ policy


def normalise_prefix(prefix: str) -> str:
    """'runs' / '/runs/' -> 'runs/'; refuses the empty prefix (that would be the whole bucket)."""
    p = prefix.strip().lstrip("/")
    if not p or p == "/":
        raise UserError("--prefix must name a folder such as runs/ (the policy is scoped to prefixes)")
    if any(ch in p for ch in "*?$"):
        raise UserError(f"--prefix {prefix!r} must be a plain folder name, without wildcards or '$'")
    return p if p.endswith("/") else p + "/"


def build_policy(bucket: str, prefixes: tuple[str, ...] | list[str] = DEFAULT_PREFIXES,
                 kms_key_arn: str | None = None) -> dict[str, Any]:
    """The least-privilege IAM policy for the job's role: only objects under `prefixes` of `bucket`."""
    prefixes = [normalise_prefix(p) for p in prefixes]
    bucket_arn = f"arn:aws:s3:::{bucket}"
    statements: list[dict[str, Any]] = [
        {
            "Sid": "ListOnlyTheJobPrefixes",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": bucket_arn,
            "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in prefixes]}},
        },
        {
            # HeadBucket is authorised as s3:ListBucket and carries no prefix: pyarrow (Ray's checkpoint
            # writer) calls it before creating a directory (apache/arrow#49949).
            "Sid": "BucketExistenceCheck",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": bucket_arn,
            "Condition": {"Null": {"s3:prefix": "true"}},
        },
        {
            "Sid": "ReadWriteJobObjects",
            "Effect": "Allow",
            "Action": list(OBJECT_ACTIONS),
            "Resource": [f"{bucket_arn}/{p}*" for p in prefixes],
        },
    ]
    if kms_key_arn:
        statements.append({
            "Sid": "UseTheBucketKmsKey",
            "Effect": "Allow",
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": kms_key_arn,
        })
    return {"Version": "2012-10-17", "Statement": statements}


# ------------------------------------------------------------------------------------------------ checks

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", "--x-s3")


def validate_bucket_name(name: str) -> None:
    """S3's naming rules (general purpose buckets), checked before any request is made."""
    problem = None
    if not 3 <= len(name) <= 63:
        problem = "must be 3-63 characters long"
    elif not _BUCKET_RE.match(name):
        problem = ("may contain only lowercase letters, digits, '-' and '.', and must start and end "
                   "with a letter or digit")
    elif ".." in name or ".-" in name or "-." in name:
        problem = "must not contain '..', '.-' or '-.'"
    elif name.startswith(_RESERVED_PREFIXES) or name.endswith(_RESERVED_SUFFIXES):
        problem = "uses a prefix or suffix that S3 reserves"
    else:
        try:
            ipaddress.IPv4Address(name)
            problem = "must not look like an IP address"
        except ValueError:
            pass
    if problem:
        raise UserError(f"invalid bucket name {name!r}: it {problem}")


# ------------------------------------------------------------------------------------------------ S3


def default_region() -> str:
    return storage.aws_region() or "us-east-1"  # the job's own reading of the environment


def s3_client(region: str):
    """A boto3 S3 client; boto3 itself honours AWS_ENDPOINT_URL(_S3). Path-style URLs for custom endpoints."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(s3={"addressing_style": "path"}) if endpoint else None
    return boto3.client("s3", region_name=region, config=config)


def is_custom_endpoint(s3) -> bool:
    return storage.is_custom_endpoint(s3.meta.endpoint_url or "")


def _error_code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def ensure_bucket(s3, bucket: str, region: str) -> str:
    """Create the bucket unless it already exists and is accessible to us. Returns a status line."""
    from botocore.exceptions import ClientError

    try:
        head = s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = _error_code(exc)
        if code in ("403", "Forbidden", "AccessDenied"):
            raise UserError(f"bucket {bucket} exists but belongs to someone else (or you may not access it); "
                            "bucket names are global, choose another --bucket") from None
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
    else:
        actual = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        note = f" (in {actual}, not {region}; keeping it there)" if actual and actual != region else ""
        return f"bucket {bucket}: already exists and is yours{note}"

    params: dict[str, Any] = {"Bucket": bucket}
    # us-east-1 is the default location and S3 rejects it as an explicit LocationConstraint.
    if region != "us-east-1":
        params["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**params)
    except ClientError as exc:
        code = _error_code(exc)
        if code == "BucketAlreadyOwnedByYou":  # created meanwhile, by us
            return f"bucket {bucket}: already exists and is yours"
        if code == "BucketAlreadyExists":
            raise UserError(f"bucket name {bucket} is taken by another account (names are global); "
                            "choose another --bucket") from None
        raise
    return f"bucket {bucket}: created in {region}"


def _optional(s3, what: str, call, *args, **kwargs) -> str | None:
    """Run one configuration call; on a non-AWS endpoint that lacks the API, warn instead of failing."""
    from botocore.exceptions import ClientError

    try:
        call(*args, **kwargs)
        return None
    except ClientError as exc:
        if is_custom_endpoint(s3) and (_error_code(exc) in _NOT_IMPLEMENTED or _status(exc) == 501):
            return f"warning: {what} skipped: not supported by the S3 endpoint {s3.meta.endpoint_url}"
        raise


def configure_bucket(s3, bucket: str, kms_key_id: str | None = None, noncurrent_days: int = 30) -> list[str]:
    """Versioning, public-access block, default encryption, lifecycle. Returns status lines."""
    lines = []

    warn = _optional(s3, "versioning", s3.put_bucket_versioning, Bucket=bucket,
                     VersioningConfiguration={"Status": "Enabled"})
    lines.append(warn or "versioning: enabled")

    warn = _optional(s3, "public access block", s3.put_public_access_block, Bucket=bucket,
                     PublicAccessBlockConfiguration={
                         "BlockPublicAcls": True,
                         "IgnorePublicAcls": True,
                         "BlockPublicPolicy": True,
                         "RestrictPublicBuckets": True,
                     })
    lines.append(warn or "public access: all blocked")

    if kms_key_id:
        default = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key_id}
        label = f"SSE-KMS with key {kms_key_id}"
    else:
        default = {"SSEAlgorithm": "AES256"}
        label = "SSE-S3 (AES256)"
    rule: dict[str, Any] = {"ApplyServerSideEncryptionByDefault": default}
    if kms_key_id:
        rule["BucketKeyEnabled"] = True  # fewer KMS calls (and costs) per object
    warn = _optional(s3, "default encryption", s3.put_bucket_encryption, Bucket=bucket,
                     ServerSideEncryptionConfiguration={"Rules": [rule]})
    lines.append(warn or f"default encryption: {label}")

    if noncurrent_days > 0:
        warn = _optional(s3, "lifecycle rule", _put_lifecycle_rule, s3, bucket, noncurrent_days)
        lines.append(warn or f"old versions: deleted {noncurrent_days} days after being replaced; "
                     f"unfinished uploads aborted after {ABORT_MULTIPART_DAYS} days")
    return lines


def _put_lifecycle_rule(s3, bucket: str, noncurrent_days: int) -> None:
    """Add or update our rule, keeping any other lifecycle rules the bucket already has."""
    from botocore.exceptions import ClientError

    try:
        rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])
    except ClientError as exc:
        if _error_code(exc) != "NoSuchLifecycleConfiguration":
            raise
        rules = []
    ours = {
        "ID": LIFECYCLE_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "NoncurrentVersionExpiration": {"NoncurrentDays": noncurrent_days},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_MULTIPART_DAYS},
    }
    rules = [r for r in rules if r.get("ID") != LIFECYCLE_RULE_ID] + [ours]
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})


# ------------------------------------------------------------------------------------------------ CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m infra.create_bucket",
        description="Create the S3 bucket for charlstm (versioned, private, encrypted); safe to re-run.",
    )
    p.add_argument("--bucket", required=True, help="Bucket name (global on AWS).")
    p.add_argument("--region", help="AWS region (default: AWS_DEFAULT_REGION / AWS_REGION, else us-east-1).")
    p.add_argument("--prefix", action="append", dest="prefixes", metavar="PREFIX",
                   help="A key prefix the job may use, for --policy-out (repeatable; "
                   f"default: {' '.join(DEFAULT_PREFIXES)}).")
    p.add_argument("--kms-key-id", help="Encrypt with this KMS key (id, alias or ARN) instead of SSE-S3.")
    p.add_argument("--noncurrent-days", type=int, default=30,
                   help="Delete replaced/deleted object versions after this many days "
                   "(default 30; 0 keeps them).")
    p.add_argument("--policy-out", metavar="FILE",
                   help="Write the job role's least-privilege IAM policy (JSON) for this bucket to FILE.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    validate_bucket_name(args.bucket)
    if args.noncurrent_days < 0:
        raise UserError(f"--noncurrent-days must be >= 0 (got {args.noncurrent_days})")
    prefixes = [normalise_prefix(p) for p in (args.prefixes or DEFAULT_PREFIXES)]
    region = args.region or default_region()

    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    s3 = s3_client(region)
    try:
        lines = [ensure_bucket(s3, args.bucket, region)]
        lines += configure_bucket(s3, args.bucket, args.kms_key_id, args.noncurrent_days)
    except NoCredentialsError:
        raise UserError("no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                        "AWS_SECRET_ACCESS_KEY, or run where a role is available") from None
    except EndpointConnectionError as exc:
        raise UserError(f"cannot reach the S3 endpoint ({exc}); "
                        "check AWS_ENDPOINT_URL and the network") from None
    except ClientError as exc:
        code, message = _error_code(exc), exc.response.get("Error", {}).get("Message", "")
        hint = ""
        if code in ("AccessDenied", "403", "Forbidden"):
            hint = "; this needs an identity allowed to create and configure buckets (not the job's role)"
        elif "KMS" in code or "KMS" in message:
            hint = "; check --kms-key-id (key exists, same region, usable by you)"
        raise UserError(f"{exc.operation_name} on bucket {args.bucket} failed: {code} {message}".rstrip()
                        + hint) from None
    except BotoCoreError as exc:
        raise UserError(f"S3 request failed: {exc}") from None

    for line in lines:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)

    kms_arn = args.kms_key_id if (args.kms_key_id or "").startswith("arn:") else None
    if args.policy_out:
        policy = build_policy(args.bucket, prefixes, kms_arn)
        try:
            with open(args.policy_out, "w", encoding="utf-8") as fh:
                json.dump(policy, fh, indent=2)
                fh.write("\n")
        except OSError as exc:
            raise UserError(f"cannot write --policy-out {args.policy_out}: {exc.strerror}") from None
        print(f"IAM policy for the job's role ({', '.join(prefixes)}): {args.policy_out}")
        if args.kms_key_id and not kms_arn:
            print("note: give --kms-key-id as a key ARN to have kms:Decrypt/GenerateDataKey added "
                  "to the policy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
