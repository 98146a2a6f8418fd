"""Every read and write by URL: local paths, file://, s3:// (s3fs) and read-only https:// (fsspec).

S3 endpoint and credentials come only from the standard AWS variables, read by botocore itself:
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (botocore >= 1.31 resolves both, the S3-specific one first),
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or ~/.aws, IRSA, instance roles),
AWS_DEFAULT_REGION (AWS_REGION is not read by botocore, so we pass it on when it is the only one set),
AWS_MAX_ATTEMPTS / AWS_RETRY_MODE. The same code therefore talks to AWS, MinIO or a local moto server.

Retries and timeouts are the library's (botocore `Config(retries=, connect_timeout=, read_timeout=)`),
bounded so that an unreachable endpoint fails in under ~30 s instead of hanging:
  AWS_MAX_ATTEMPTS (default 4 attempts in all), AWS_RETRY_MODE (default "standard"),
  CHARLSTM_S3_CONNECT_TIMEOUT (default 5 s), CHARLSTM_S3_READ_TIMEOUT (default 30 s).
Ray's checkpoint storage (pyarrow) gets the same attempts and timeouts through
`pyarrow.fs.AwsStandardS3RetryStrategy`, kept across Ray's pickling (see `pyarrow_filesystem`).

Writes are atomic for readers: a local file is written under a temporary name in the same directory and
renamed over the final name; an S3 object becomes visible only when its single PUT (or the completing call
of a multipart upload, which s3fs aborts on failure) succeeds, so a failed write leaves nothing behind.

Failures a user can fix (missing bucket, rejected credentials, unreachable endpoint, missing object) are
raised as one-line `UserError`s by `translate_errors`; no message ever contains a secret key.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from job.core.errors import UserError

# s3fs, pyarrow.fs, fsspec and botocore are imported inside the functions that use them, so a command that reads
# only local files (and the unit tests) never pays for them; fcntl (POSIX) only where a local folder lock is taken.

if TYPE_CHECKING:
    import pyarrow.fs
    import s3fs

DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_RETRY_MODE = "standard"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
# s3fs runs its own retry loop around each call, on top of botocore's. It is the only layer that retries a
# response body cut off mid-stream, so keep one extra try for that and leave everything else to botocore.
S3FS_RETRIES = 2
# Transfers move objects in parts of TRANSFER_PART bytes, TRANSFER_CONCURRENCY at a time, so a process holds at
# most their product per file in flight whatever the object's size. s3fs's defaults (50 MiB x 10) held 500 MB per
# upload or download, which is where an S3 -> S3 preparation's memory went.
TRANSFER_PART = 16 << 20
TRANSFER_CONCURRENCY = 6
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
FILES_AT_ONCE = 4  # files a many-file upload or download moves at once (each with its parts in flight)
UPLOAD_IN_FLIGHT = 48 << 20  # bytes of parts a streamed Upload has in flight (it runs beside other work)
READ_AHEAD = 8 << 20  # open_read on S3: each GET fetches the read asked for and this much beyond it

# Everything that changes which S3 (and how) a filesystem instance talks to: the cache key.
_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "CHARLSTM_S3_CONNECT_TIMEOUT", "CHARLSTM_S3_READ_TIMEOUT",
)
_S3_CACHE: dict[tuple, s3fs.S3FileSystem] = {}


# ---------------------------------------------------------------------------------------------- URLs


def _scheme(url: str) -> str:
    scheme = urlsplit(str(url)).scheme.lower()
    return "" if len(scheme) <= 1 else scheme  # "" for plain paths (and C:\ style drive letters)


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    return _scheme(url) in ("", "file")


def local_path(url: str) -> str:
    """The filesystem path of a local URL (file:///a/b -> /a/b, a/b -> a/b)."""
    url = os.fspath(url)
    if _scheme(url) == "file":
        parts = urlsplit(url)
        return (parts.netloc + parts.path) if parts.netloc not in ("", "localhost") else parts.path
    if _scheme(url):
        raise UserError(f"{url} is not a local path; give a path or a file:// URL")
    return url


def join(url: str, *parts: str) -> str:
    """Join path segments onto a path or URL: join("s3://b/runs", "a", "x.json") -> "s3://b/runs/a/x.json"."""
    url = os.fspath(url)
    parts = tuple(str(p).strip("/") for p in parts if str(p).strip("/"))
    if not parts:
        return url
    if _scheme(url) == "":
        return os.path.join(url, *parts)
    return url.rstrip("/") + "/" + "/".join(parts)


def _s3_path(url: str) -> str:
    """s3://bucket/key -> bucket/key"""
    path = url.split("://", 1)[1].strip("/")
    if not path:
        raise UserError(f"{url} names no bucket; use s3://BUCKET/PREFIX")
    return path


def _bucket(url: str) -> str:
    return _s3_path(url).split("/", 1)[0]


# ------------------------------------------------------------------------------------------------ S3


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{name}={raw!r} is not a positive number of seconds; fix or unset it")
    return value


def _max_attempts() -> int:
    raw = os.environ.get("AWS_MAX_ATTEMPTS")
    if raw in (None, ""):
        return DEFAULT_MAX_ATTEMPTS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"AWS_MAX_ATTEMPTS={raw!r} is not a positive integer; fix or unset it")
    return value


def _botocore_config() -> dict:
    """Keyword arguments for botocore.client.Config (s3fs passes them through as `config_kwargs`)."""
    retries: dict = {}
    # botocore reads AWS_MAX_ATTEMPTS / AWS_RETRY_MODE itself for the keys we leave out of this dict.
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = DEFAULT_MAX_ATTEMPTS
    else:
        _max_attempts()  # validate, with a clear message
    if not os.environ.get("AWS_RETRY_MODE"):
        retries["mode"] = DEFAULT_RETRY_MODE
    return {
        "retries": retries,
        "connect_timeout": _env_float("CHARLSTM_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
        "read_timeout": _env_float("CHARLSTM_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
    }


def s3_filesystem() -> s3fs.S3FileSystem:
    """The s3fs filesystem for the current process and AWS environment (cached).

    The cache is keyed on the pid and on every AWS variable we depend on, so a forked child never reuses
    its parent's connections and a changed environment (tests point AWS_ENDPOINT_URL at a fresh server)
    gets a fresh client. fsspec's own instance cache is bypassed for the same reason.
    """
    key = (os.getpid(), tuple(os.environ.get(k) for k in _ENV_KEYS))
    fs = _S3_CACHE.get(key)
    if fs is None:
        import s3fs  # imported lazily: local-only users (and TF-free unit tests) never pay for it

        client_kwargs = {}
        if os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            client_kwargs["region_name"] = aws_region()
        fs = s3fs.S3FileSystem(
            skip_instance_cache=True,
            use_listings_cache=False,  # other processes (Ray workers) write concurrently: always ask S3
            config_kwargs=_botocore_config(),
            client_kwargs=client_kwargs,
            default_block_size=TRANSFER_PART,  # ranged reads of open() and downloads' parts
            max_concurrency=TRANSFER_CONCURRENCY,
        )
        fs.retries = S3FS_RETRIES
        _S3_CACHE.clear()  # drop instances of an old environment or of the parent process
        _S3_CACHE[key] = fs
    return fs


def s3_endpoint() -> str:
    """The S3 endpoint botocore resolved from the environment (no network traffic)."""
    return s3_filesystem().s3.meta.endpoint_url


def aws_region() -> str | None:
    """The region from the environment, in botocore's order (AWS_DEFAULT_REGION, then AWS_REGION, which botocore
    itself does not read); None leaves it to botocore's config files. infra/create_bucket uses this too."""
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None


def is_custom_endpoint(endpoint: str) -> bool:
    """True for MinIO and other S3-compatible stores; False for AWS (its host names end in amazonaws.com[.cn])."""
    host = (urlsplit(endpoint).hostname or "").lower()
    return not (host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn"))


def pyarrow_filesystem(url: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """(filesystem, path) for Ray's `RunConfig(storage_filesystem=..., storage_path=...)`.

    pyarrow does not read AWS_ENDPOINT_URL, so for s3:// we build an S3FileSystem from
    the endpoint and region botocore resolved plus the AWS_* credentials, and return the path without the
    scheme ("bucket/prefix"), as Ray requires when a filesystem is given. Local paths: (None, absolute path).

    Retries: `AwsStandardS3RetryStrategy(max_attempts=AWS_MAX_ATTEMPTS, default 4)`, with the same connect and
    request timeouts as botocore. Ray pickles this filesystem to its controller and workers, and pyarrow's
    own pickled form silently drops the retry strategy (the receiving process would fall back to pyarrow's
    default of 3 attempts); the returned instance pickles to a rebuild that keeps it, and that leaves the
    credentials out (each process takes them from its own AWS_* environment or credential chain).
    `allow_delayed_open`: a file that fits in one part is written with a single PUT (no multipart upload).
    """
    scheme = _scheme(url)
    if scheme in ("", "file"):
        return None, os.path.abspath(local_path(url))
    if scheme not in ("s3", "s3a"):
        return None, url  # e.g. gs://: let pyarrow resolve it from the URL
    client = s3_filesystem().s3
    endpoint, region = client.meta.endpoint_url, client.meta.region_name
    options: dict = {
        "region": region or "us-east-1",
        "connect_timeout": _env_float("CHARLSTM_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
        "request_timeout": _env_float("CHARLSTM_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
        "allow_delayed_open": True,
    }
    if is_custom_endpoint(endpoint):
        parts = urlsplit(endpoint)
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    return _rebuild_pyarrow_s3(options, _max_attempts()), _s3_path(url)


def _pyarrow_credentials() -> dict:
    """Fixed keys from the AWS_* variables; none means pyarrow's default AWS chain (profile files, IRSA,
    instance role), which, unlike fixed keys, refreshes temporary credentials."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        creds = {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
        if os.environ.get("AWS_SESSION_TOKEN"):
            creds["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        return creds
    return {}


def _rebuild_pyarrow_s3(options: dict, max_attempts: int) -> pyarrow.fs.S3FileSystem:
    """Build (or, on unpickling, rebuild) the pyarrow S3 filesystem; credentials from this process's env."""
    return _retrying_s3_class()(options, max_attempts)


@functools.cache
def _retrying_s3_class() -> type:
    import pyarrow.fs

    class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
        """pyarrow's S3FileSystem whose pickled form keeps the retry strategy and carries no credentials."""

        def __init__(self, options: dict, max_attempts: int):
            super().__init__(**options, **_pyarrow_credentials(),
                             retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts))
            self.charlstm_options, self.charlstm_max_attempts = dict(options), max_attempts

        def __reduce__(self):
            return _rebuild_pyarrow_s3, (self.charlstm_options, self.charlstm_max_attempts)

    return RetryingS3FileSystem


# ------------------------------------------------------------------------------------ error translation


def _client_error_code(exc: BaseException) -> str | None:
    """The S3 error code (NoSuchBucket, AccessDenied, ...) behind an s3fs/botocore exception, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        exc = exc.__cause__ or exc.__context__
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _bucket_missing(bucket: str) -> bool:
    try:
        s3_filesystem().call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return True
    except Exception:
        return False
    return False


def _probe_error_code(url: str) -> str | None:
    """The S3 error code a LIST on `url`'s bucket gets (used when a HEAD only said "403")."""
    path = _s3_path(url)
    bucket, _, key = path.partition("/")
    try:
        s3_filesystem().call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    except Exception as exc:
        return _client_error_code(exc)
    return None


_CREDENTIAL_HINTS = {
    "InvalidAccessKeyId": "the access key id is unknown to this endpoint",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "InvalidToken": "the session token is malformed",
    "ExpiredToken": "the session token has expired; refresh the credentials",
    "TokenRefreshRequired": "the session token has expired; refresh the credentials",
}


def _s3_user_error(url: str, exc: BaseException) -> UserError | None:
    from botocore import exceptions as bex

    for e in _chain(exc):
        if isinstance(e, bex.NoCredentialsError | bex.PartialCredentialsError):
            return UserError(
                f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or run with an IAM role)")
        if isinstance(e, bex.EndpointConnectionError | bex.ConnectTimeoutError):
            return UserError(
                f"cannot reach the S3 endpoint {_endpoint_label()} for {url}: start the server or fix "
                "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (unset them for AWS)")
        if isinstance(e, bex.ReadTimeoutError):
            return UserError(
                f"the S3 endpoint {_endpoint_label()} did not answer in time for {url}: check the server, "
                "or raise CHARLSTM_S3_READ_TIMEOUT")
    code = _client_error_code(exc)
    bucket = _bucket(url)
    if isinstance(exc, PermissionError) and code in (None, "403"):
        code = _probe_error_code(url) or code  # HEAD responses carry no error code; ask with a LIST
    if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError) and _bucket_missing(bucket)):
        return UserError(
            f"S3 bucket '{bucket}' does not exist at {_endpoint_label()}: create it "
            f"(e.g. `aws s3 mb s3://{bucket}`) or fix the URL {url}")
    if code in _CREDENTIAL_HINTS:
        return UserError(
            f"S3 rejected the credentials for {url} at {_endpoint_label()} "
            f"({code}: {_CREDENTIAL_HINTS[code]}): "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN")
    if isinstance(exc, PermissionError) or code in ("AccessDenied", "AllAccessDisabled", "AccountProblem"):
        return UserError(
            f"access denied to {url} at {_endpoint_label()} ({code or 'PermissionError'}): grant these "
            "credentials s3:GetObject/PutObject/ListBucket/DeleteObject on the bucket "
            "(see infra/iam-policy.json)")
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404"):
        return UserError(f"not found: {url}: check the URL (list the prefix with `aws s3 ls`)")
    if code == "InvalidBucketName":
        return UserError(f"invalid S3 bucket name in {url}: use 3-63 lowercase letters, digits, '.' or '-'")
    return None


def _endpoint_label() -> str:
    try:
        return s3_endpoint()
    except Exception:  # never let the error message itself fail
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _other_user_error(url: str, exc: BaseException) -> UserError | None:
    for e in _chain(exc):  # first: fsspec's http reports a refused connection as FileNotFoundError
        name = type(e).__name__
        if name in ("ClientConnectorError", "ClientConnectorDNSError", "ServerTimeoutError",
                    "ConnectionRefusedError", "gaierror"):
            return UserError(f"cannot reach {url} ({name}): check the URL, that the server is up, and the network")
    if isinstance(exc, FileNotFoundError):
        return UserError(f"not found: {url}: check the path or URL")
    if isinstance(exc, IsADirectoryError):
        return UserError(f"{url} is a directory, expected a file")
    if isinstance(exc, PermissionError):
        return UserError(f"permission denied: {url}: check the file permissions")
    return None


@contextlib.contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn storage failures a user can fix into one-line UserErrors naming `url` (never a secret)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        scheme = _scheme(url)
        user_error = _s3_user_error(url, exc) if scheme in ("s3", "s3a") else _other_user_error(url, exc)
        if user_error is None:
            raise
        raise user_error from exc


# ------------------------------------------------------------------------------------------ operations
# One code path: every operation goes through an fsspec filesystem (LocalFileSystem for paths and file://,
# s3fs, or whatever fsspec resolves). Only writes to local files differ, because fsspec's local writes are not
# atomic renames: they go through `_replacing`.


def _fs(url: str):
    """(filesystem, path) for any URL; a local path becomes absolute."""
    scheme = _scheme(url)
    import fsspec

    if scheme in ("", "file"):
        return fsspec.filesystem("file"), os.path.abspath(local_path(url))
    if scheme in ("s3", "s3a"):
        return s3_filesystem(), _s3_path(url)
    return fsspec.core.url_to_fs(url)


def _writable_fs(url: str):
    if _scheme(url) in ("http", "https"):
        raise UserError(f"cannot write to {url}: https URLs are read-only; write to s3:// or a path")
    return _fs(url)


def _url_of(url: str, item: str) -> str:
    """A path the filesystem of `url` returned, as a URL of the same form (a plain path stays a path)."""
    scheme = _scheme(url)
    item = item.split("://", 1)[-1]
    return item if scheme == "" else f"{scheme}://{item}"


def _files_below(url: str, fs, root: str, found: dict) -> list[tuple[str, str, dict]]:
    """(url, name relative to `root` with "/", details) of each file in an fsspec find/glob result. Folders
    and S3 "folder marker" objects (zero-size "dir/" keys that pyarrow, Ray's checkpoint writer, leaves) are
    not files."""
    out = []
    for item, details in found.items():
        item = item.split("://", 1)[-1]
        if details.get("type") == "directory" or item.endswith("/") or not item.startswith(root + "/"):
            continue
        name = item[len(root) + 1:]
        out.append((join(url, name), name, details))
    return out


def _check_bucket_of(url: str, path: str) -> None:
    """A bare s3://bucket that is missing is an error, not an empty listing."""
    if _scheme(url) in ("s3", "s3a") and "/" not in path.strip("/"):
        s3_filesystem().call_s3("head_bucket", Bucket=path.strip("/"))


def read_bytes(url: str) -> bytes:
    with translate_errors(url):
        fs, path = _fs(url)
        return fs.cat_file(path)


def read_text(url: str) -> str:
    """UTF-8 (strict: a UnicodeDecodeError is the caller's to report)."""
    return read_bytes(url).decode("utf-8")


@contextlib.contextmanager
def _replacing(dst: str) -> Iterator[str]:
    """A temporary path beside local file `dst`; when the block succeeds it replaces `dst` atomically (readers
    see the old file or the complete new one), otherwise it is removed. The file gets the permissions a plain
    `open(dst, "w")` would give it (mkstemp creates 0600)."""
    directory = os.path.dirname(os.path.abspath(dst))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dst)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically (readers never see a partial file or object)."""
    data = bytes(data)
    with translate_errors(url):
        fs, path = _writable_fs(url)
        if not is_local(url):
            # S3: one PUT (or a multipart upload that s3fs completes last, or aborts on failure); the object
            # appears only when that final call succeeds.
            fs.pipe_file(path, data)
            return
        with _replacing(path) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def upload_file(local_file: str, url: str) -> None:
    """Copy a local file to `url`, atomically for readers: local = temporary name + rename in the same folder;
    S3 = one PUT, or a multipart upload completed only after its last part (and aborted on failure)."""
    upload_files([(local_file, url)], url)


def upload_files(pairs: list[tuple[str, str]], url: str) -> None:
    """Copy (local file, destination URL) pairs below `url`, each atomically for readers (see upload_file); to
    object storage concurrently."""
    with translate_errors(url):
        fs, _ = _writable_fs(url)
        if not is_local(url):
            fs.put([src for src, _ in pairs], [_fs(dst)[1] for _, dst in pairs],
                   chunksize=part_size(max(os.path.getsize(src) for src, _ in pairs)), batch_size=FILES_AT_ONCE)
            return
        for src, dst in pairs:
            with _replacing(_fs(dst)[1]) as tmp:
                shutil.copyfile(src, tmp)


def part_size(nbytes: int) -> int:
    """The multipart upload part for an object of `nbytes`: TRANSFER_PART, larger only where S3's part limit
    needs it (objects over ~80 GB)."""
    return max(TRANSFER_PART, -(-nbytes // MAX_PARTS))


class Upload:
    """An S3 object written as a stream and shown to readers only by `commit()`: its parts go up from threads
    while the writer goes on, UPLOAD_IN_FLIGHT bytes of them at a time (a write blocks until one is done, so
    memory stays at about that plus one part); `commit()` completes the multipart
    upload (one PUT for an object under one part), `abort()` discards it. `expected_bytes`, an upper bound on
    the size, only raises the part size where S3's part limit needs it.

    A process killed mid-upload leaves parts no reader can see; a bucket lifecycle rule
    (AbortIncompleteMultipartUpload) removes them."""

    def __init__(self, url: str, expected_bytes: int = 0):
        self.url = url
        with translate_errors(url):
            self.fs, path = _writable_fs(url)
        self.bucket, self.key = path.split("/", 1)
        self.part = part_size(expected_bytes)
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[tuple[int, Future]] = []
        at_once = max(1, min(TRANSFER_CONCURRENCY, UPLOAD_IN_FLIGHT // self.part))
        self.slots = threading.Semaphore(at_once)
        self.pool = ThreadPoolExecutor(at_once, thread_name_prefix="charlstm-upload")
        self.closed = False

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= self.part:
            with memoryview(self.buffer) as view:
                part = bytes(view[: self.part])  # one copy (a bytearray slice would make two)
            del self.buffer[: self.part]
            self._send(part)

    def _send(self, data: bytes) -> None:
        for _, done in self.parts:
            if done.done() and done.exception() is not None:
                done.result()  # a failed part ends the upload now, not at commit
        with translate_errors(self.url):
            if self.upload_id is None:
                self.upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket,
                                                 Key=self.key)["UploadId"]
        self.slots.acquire()
        number = len(self.parts) + 1
        try:
            future = self.pool.submit(self._upload_part, number, data)
        except BaseException:
            self.slots.release()
            raise
        self.parts.append((number, future))

    def _upload_part(self, number: int, data: bytes) -> str:
        try:
            with translate_errors(self.url):
                return self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                       PartNumber=number, Body=data)["ETag"]
        finally:
            self.slots.release()

    def commit(self) -> None:
        """Make the object visible with everything written (atomically for readers); on failure, abort."""
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> None:
        with translate_errors(self.url):
            if self.upload_id is None:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
            else:
                if self.buffer:
                    self._send(bytes(self.buffer))
                parts = [{"PartNumber": n, "ETag": f.result()} for n, f in self.parts]
                self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self.upload_id, MultipartUpload={"Parts": parts})
        self.buffer = bytearray()
        self._close()

    def abort(self) -> None:
        """Discard everything written (best effort: an abort that fails leaves only invisible parts)."""
        for _, future in self.parts:
            future.cancel()
        self._close()
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self.upload_id)
            self.upload_id = None

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.shutdown(wait=True)
            self.fs.invalidate_cache(f"{self.bucket}/{self.key}")


def download_file(url: str, local_file: str) -> None:
    """Copy `url` to a local file, atomically: written under a temporary name in the same folder and renamed,
    so a reader (another worker on this node) sees no file or the whole file."""
    with translate_errors(url), _replacing(local_file) as tmp:
        fs, path = _fs(url)
        fs.get_file(path, tmp)


def check_bucket(url: str) -> None:
    """For s3:// URLs: the bucket exists and answers these credentials (one HEAD request), else a one-line
    UserError (missing bucket, rejected credentials, access denied, unreachable endpoint). Other URLs: no-op.
    (A listing or an exists() on a missing bucket only says "nothing there".)"""
    if _scheme(url) in ("s3", "s3a"):
        with translate_errors(url):
            s3_filesystem().call_s3("head_bucket", Bucket=_bucket(url))


def check_writable(url: str) -> None:
    """Refuse (UserError) an output URL that clearly cannot be written, before any work; writes nothing.

    s3://: the bucket must exist and answer these credentials (one HEAD request: a missing bucket, rejected
    credentials or an unreachable endpoint become one line). Local: the nearest existing folder on the path
    must be a folder in which a file can be created (probed with a temporary file, removed at once; a
    permission check alone would say yes to root on a read-only filesystem). https://: read-only.
    """
    scheme = _scheme(url)
    if scheme in ("http", "https"):
        raise UserError(f"cannot write to {url}: https URLs are read-only; write to s3:// or a path")
    if scheme in ("s3", "s3a"):
        check_bucket(url)
        return
    if not is_local(url):
        return  # another fsspec scheme: its first write reports any problem
    target = os.path.abspath(local_path(url))
    existing = target
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot write to {url}: {existing} is a file, not a folder; choose another --output")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".charlstm-probe-", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write to {url}: cannot create files in {existing} "
                        f"({exc.strerror or exc}); choose another --output or fix the permissions") from None
    os.close(fd)
    os.unlink(probe)


def remove_stale_temps(url: str) -> int:
    """Delete temporary files that an interrupted local write left in folder `url` (S3 leaves none).
    Only for folders no other process is writing to. Returns how many were removed."""
    if not is_local(url) or not os.path.isdir(local_path(url)):
        return 0
    removed = 0
    for name in os.listdir(local_path(url)):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(local_path(url), name))
                removed += 1
    return removed


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def exists(url: str) -> bool:
    """True if a file/object (or a non-empty prefix/directory) exists at `url`."""
    with translate_errors(url):
        fs, path = _fs(url)
        return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Every file/object under `url` (recursively), as URLs in the same form as `url`, sorted."""
    with translate_errors(url):
        fs, path = _fs(url)
        _check_bucket_of(url, path)
        found = fs.find(path, detail=True)
        root = path.rstrip("/")
        single = [url] if root in {item.split("://", 1)[-1] for item in found} else []  # `url` is a file
        return sorted(single + [u for u, _name, _details in _files_below(url, fs, root, found)])


def upload_dir(local_dir: str, url: str) -> list[str]:
    """Copy every file under `local_dir` to `url/<relative path>`; each file is written atomically
    (the directory as a whole is not). Returns the destination URLs."""
    src_root = local_path(local_dir)
    if not os.path.isdir(src_root):
        raise UserError(f"{local_dir} is not a directory; nothing to upload")
    pairs = sorted((os.path.join(src_root, name), join(url, name)) for name in _names_below(src_root))
    if pairs:
        upload_files(pairs, url)
    return [d for _, d in pairs]


def _names_below(root: str) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, fs in os.walk(root) for f in fs]


def download_dir(url: str, local_dir: str) -> list[str]:
    """Copy every file/object under `url` to `local_dir/<relative path>`, each file atomically.
    Returns the local paths written. A prefix with nothing under it is a UserError (not found)."""
    sources = listdir(url)
    if not sources:
        raise UserError(f"not found: nothing under {url}: check the URL")
    base = url.rstrip("/") + "/"
    dst_root = local_path(local_dir)
    pairs = [(src, os.path.join(dst_root, *(src[len(base):] if src.startswith(base)
                                            else posixpath.basename(src)).split("/")))
             for src in sources]
    with translate_errors(url), contextlib.ExitStack() as stack:
        fs, _ = _fs(url)
        tmps = [stack.enter_context(_replacing(dst)) for _, dst in pairs]
        fs.get([_fs(s)[1] for s, _ in pairs], tmps, batch_size=FILES_AT_ONCE)  # concurrent, into temporary names
    return [d for _, d in pairs]


def delete(url: str, recursive: bool = False) -> None:
    """Delete a file/object (or, with recursive=True, everything under a prefix/directory).
    Deleting something that does not exist is not an error (S3 semantics)."""
    with translate_errors(url):
        fs, path = _fs(url)
        if _scheme(url) in ("s3", "s3a") and "/" not in path:
            if not recursive:
                raise UserError(f"refusing to delete bucket {url}; give a key or prefix")
            _check_bucket_of(url, path)  # a missing bucket is an error here
        if not recursive:
            if _scheme(url) in ("s3", "s3a"):  # idempotent; a missing bucket raises
                bucket, key = path.split("/", 1)
                fs.call_s3("delete_object", Bucket=bucket, Key=key)
            else:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
            return
        if is_local(url):
            if fs.exists(path):
                fs.rm(path, recursive=True)
        elif keys := fs.find(path):
            fs.rm(keys)


# ------------------------------------------------------------------------- listings and streamed files
# Used by the prepare stage (job/data/prepare.py): a corpus may be one file, a folder/prefix or a glob, read as a
# stream (never whole into memory), and its listing (names, sizes, versions) decides whether a prepared dataset
# is still current without reading any file's contents.

_GLOB_CHARS = "*?["


def is_glob(url: str) -> bool:
    return any(c in str(url) for c in _GLOB_CHARS)


def _version(url: str, path: str, details: dict) -> str | None:
    """What changes when a file's contents change: the S3 ETag, a local file's mtime in ns (fsspec's float
    mtime is coarser), else whatever date the filesystem gives."""
    if is_local(url):
        return str(os.stat(path).st_mtime_ns)
    for key in ("ETag", "etag", "LastModified", "last_modified", "Last-Modified", "mtime", "created"):
        value = details.get(key)
        if value not in (None, ""):
            return str(value)
    return None


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def _entries(url: str, fs, root: str, found: dict) -> list[dict]:
    """walk_files/glob entries of the visible files in an fsspec find/glob result, sorted by name."""
    out = [{"url": u, "name": name, "size": details.get("size"),
            "version": _version(u, root + "/" + name, details), "regular": details.get("type", "file") == "file"}
           for u, name, details in _files_below(url, fs, root, found) if not _hidden(name)]
    return sorted(out, key=lambda e: e["name"])


def info(url: str) -> dict:
    """{"url", "type": "file" | "directory" | "other", "size", "version"} for one file/object or folder/prefix (one
    request on S3). A missing path is a one-line UserError."""
    with translate_errors(url):
        fs, path = _fs(url)
        details = fs.info(path)
        if details.get("type") == "directory":
            return {"url": url, "type": "directory", "size": 0, "version": None}
        # "other": a FIFO, device or socket (or a link to one), which would block or never end if read
        kind = "file" if details.get("type", "file") == "file" else "other"
        return {"url": url, "type": kind, "size": details.get("size"), "version": _version(url, path, details)}


def walk_files(url: str) -> list[dict]:
    """Every file under folder/prefix `url`, recursively, sorted by name: {"url", "name" (relative, with "/"),
    "size", "version"}. Names with a part starting with "." (.git, .DS_Store, our own temporary files) and S3
    "folder marker" objects are left out."""
    with translate_errors(url):
        fs, path = _fs(url)
        _check_bucket_of(url, path)
        if is_local(url) and not fs.isdir(path):
            raise FileNotFoundError(path)
        root = path.rstrip("/")
        return _entries(url, fs, root, fs.find(root, detail=True))


def glob(url: str) -> list[dict]:
    """Files matching the fsspec glob `url` (`*`, `?`, `[...]`, `**`), sorted by name, in walk_files' shape; a
    name is relative to the folder above the first wildcard. Hidden names are left out as in walk_files."""
    if _scheme(url) in ("http", "https"):
        raise UserError(f"cannot expand {url}: wildcards need a listing, which https does not give; "
                        "use a local path or s3:// URL")
    with translate_errors(url):
        fs, pattern = _fs(url)
        first = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
        root = pattern[:first].rsplit("/", 1)[0]
        return _entries(_url_of(url, root), fs, root, fs.glob(pattern, detail=True))


@contextlib.contextmanager
def open_read(url: str) -> Iterator:
    """A binary file object reading `url` as a stream (for S3, ranged GETs as the reader advances); failures,
    while opening or while reading inside the `with` block, become one-line UserErrors naming `url`."""
    with translate_errors(url):
        fs, path = _fs(url)
        with fs.open(path, "rb", **({"block_size": READ_AHEAD} if is_s3(url) else {})) as fh:
            yield fh


# -------------------------------------------------------------------------------------- conditional writes
# The primitive under job.core.guard's leases: "create only if absent" and "replace only if unchanged since I read it".
# S3 does both itself (PutObject with If-None-Match: * / If-Match: <ETag>, answered 412 when the condition fails);
# a local folder gets the same from an exclusive flock on the folder held across read, compare and rename.
# The version token is the ETag on S3 and the sha256 of the contents locally.

_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


@contextlib.contextmanager
def _folder_locked(path: str) -> Iterator[None]:
    """An exclusive flock on the folder holding `path` (created if missing), released on exit or process death."""
    import fcntl

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _local_version(path: str) -> tuple[bytes, str] | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def read_versioned(url: str) -> tuple[bytes, str] | None:
    """(contents, version token) of a file/object, or None when there is none."""
    with translate_errors(url):
        fs, path = _fs(url)
        if is_local(url):
            return _local_version(path)
        if not is_s3(url):
            return _other_version(fs, path)
        bucket, key = path.split("/", 1)
        try:
            response = fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return _read_body(fs, response["Body"]), str(response["ETag"])


def is_s3(url: str) -> bool:
    return _scheme(url) in ("s3", "s3a")


def _other_version(fs, path: str) -> tuple[bytes, str] | None:
    """Other fsspec filesystems (memory:// in tests, gs://...): contents and their sha256, with no atomic check."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def _read_body(fs, body) -> bytes:
    """An aiobotocore streaming body read to the end on s3fs's event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        try:
            return await body.read()
        finally:
            body.close()

    return sync(fs.loop, read)


def write_if(url: str, data: bytes, token: str | None) -> str | None:
    """Write `data` to `url` only if it is absent (token None) or still the version `token`; returns the new
    version token, or None when the condition failed (someone else wrote or removed it first)."""
    with translate_errors(url):
        fs, path = _fs(url)
        if is_local(url):
            with _folder_locked(path):
                current = _local_version(path)
                if (current is None) != (token is None) or (current is not None and current[1] != token):
                    return None
                with _replacing(path) as tmp, open(tmp, "wb") as fh:
                    fh.write(data)
                return _local_version(path)[1]
        if not is_s3(url):  # best effort: read, compare, write
            current = _other_version(fs, path)
            if (current is None) != (token is None) or (current is not None and current[1] != token):
                return None
            fs.pipe_file(path, data)
            return _other_version(fs, path)[1]
        bucket, key = path.split("/", 1)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except FileExistsError:
            return None
        except Exception as exc:
            vanished = token is not None and isinstance(exc, FileNotFoundError)  # If-Match on a deleted object
            if vanished or _client_error_code(exc) in _CONDITION_FAILED:
                return None
            raise
        return str(response["ETag"])


def delete_if(url: str, token: str) -> bool:
    """Delete `url` if it is still the version `token` (True), else leave it (False). Locally exact; on S3 the
    version is checked with a HEAD just before the DELETE (a writer that takes over a live lease does not exist:
    see job.core.guard)."""
    with translate_errors(url):
        fs, path = _fs(url)
        if is_local(url):
            with _folder_locked(path):
                current = _local_version(path)
                if current is None or current[1] != token:
                    return False
                os.unlink(path)
                return True
        if not is_s3(url):
            current = _other_version(fs, path)
            if current is None or current[1] != token:
                return False
            fs.rm_file(path)
            return True
        bucket, key = path.split("/", 1)
        try:
            head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        if str(head["ETag"]) != token:
            return False
        fs.call_s3("delete_object", Bucket=bucket, Key=key)
        return True
