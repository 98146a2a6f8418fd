"""job.core.storage against local paths, file:// URLs, a local http server and a live moto S3 server (real HTTP
on 127.0.0.1, no in-process mocks). No network beyond 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import multiprocessing
import os
import socket
import threading
from pathlib import Path

import pytest

from job.core import storage
from job.core.errors import UserError

# ----------------------------------------------------------------------------------------- URL helpers


def test_join_paths_and_urls():
    assert storage.join("s3://b/runs", "a", "x.json") == "s3://b/runs/a/x.json"
    assert storage.join("s3://b/runs/", "/a/", "x.json") == "s3://b/runs/a/x.json"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("file:///tmp/r", "a/b") == "file:///tmp/r/a/b"
    assert storage.join("out/run", "ckpt", "m.keras") == os.path.join("out/run", "ckpt", "m.keras")
    assert storage.join("/abs", "x") == "/abs/x"
    assert storage.join("s3://b/p") == "s3://b/p"


def test_is_local_and_local_path():
    assert storage.is_local("out/x") and storage.is_local("/abs/x") and storage.is_local("file:///abs/x")
    assert not storage.is_local("s3://b/k") and not storage.is_local("https://example.org/x")
    assert storage.local_path("file:///abs/x") == "/abs/x"
    assert storage.local_path("rel/x") == "rel/x"
    with pytest.raises(UserError):
        storage.local_path("s3://b/k")


# ------------------------------------------------------------------------------------------ local files


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_local_round_trip(tmp_path, as_url):
    base = ("file://" + str(tmp_path)) if as_url else str(tmp_path)
    url = storage.join(base, "deep", "dir", "f.txt")
    assert not storage.exists(url)
    storage.write_text(url, "héllo\n")
    assert storage.exists(url)
    assert storage.read_text(url) == "héllo\n"
    assert (tmp_path / "deep" / "dir" / "f.txt").read_bytes() == "héllo\n".encode()
    storage.write_bytes(url, b"\x00\x01")
    assert storage.read_bytes(url) == b"\x00\x01"
    assert storage.listdir(base) == [url]
    storage.delete(url)
    assert not storage.exists(url)
    storage.delete(url)  # idempotent


def test_local_write_is_atomic(tmp_path, monkeypatch):
    """Readers see the old content or the complete new one, never a partial file under the final name."""
    target = tmp_path / "model.json"
    target.write_text("old")
    seen = {}
    real_replace = os.replace

    def spying_replace(src, dst):
        seen["final_during_write"] = Path(dst).read_text()
        seen["tmp_content"] = Path(src).read_text()
        seen["tmp_dir"] = Path(src).parent
        seen["tmp_name"] = Path(src).name
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    storage.write_text(str(target), "new content")
    assert seen["final_during_write"] == "old"
    assert seen["tmp_content"] == "new content"
    assert seen["tmp_dir"] == tmp_path  # same directory: the rename cannot cross filesystems
    assert seen["tmp_name"] != "model.json"
    assert target.read_text() == "new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's 0600


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "overwrite"])
def test_failed_local_write_leaves_nothing(tmp_path, monkeypatch, existing):
    target = tmp_path / "out.bin"
    if existing:
        target.write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes(str(target), b"x" * 100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out.bin"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old"


def test_local_missing_file_is_user_error(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="not found") as err:
        storage.read_text(missing)
    assert missing in str(err.value)


def _assert_usual_mode(path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)  # not mkstemp's 0600


def test_local_listdir_upload_download(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.bin").write_bytes(b"b")
    dst = tmp_path / "dst"
    written = storage.upload_dir(str(src), str(dst))
    assert written == [str(dst / "a.txt"), str(dst / "sub" / "b.bin")]
    assert storage.listdir(str(dst)) == written
    assert storage.listdir(str(tmp_path / "absent")) == []
    back = tmp_path / "back"
    storage.download_dir("file://" + str(dst), str(back))
    assert (back / "sub" / "b.bin").read_bytes() == b"b" and (back / "a.txt").read_text() == "a"
    _assert_usual_mode(back / "a.txt")
    storage.download_file(str(dst / "a.txt"), str(tmp_path / "one.txt"))
    _assert_usual_mode(tmp_path / "one.txt")
    storage.delete(str(dst), recursive=True)
    assert not dst.exists()


# ------------------------------------------------------------------------------------------------ https


@pytest.fixture
def http_dir(tmp_path):
    (tmp_path / "corpus.txt").write_text("alice\n")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_read_and_errors(http_dir):
    assert storage.read_text(http_dir + "/corpus.txt") == "alice\n"
    with pytest.raises(UserError, match="not found"):
        storage.read_text(http_dir + "/missing.txt")
    with pytest.raises(UserError, match="read-only"):
        storage.write_text(http_dir + "/x.txt", "x")


# -------------------------------------------------------------------------------------------------- S3


def test_s3_round_trip(s3_server, s3_prefix):
    url = storage.join(s3_prefix, "dir", "f.txt")
    assert not storage.exists(url)
    storage.write_text(url, "héllo")
    assert storage.exists(url)
    assert storage.exists(storage.join(s3_prefix, "dir"))  # a non-empty prefix
    assert storage.read_text(url) == "héllo"
    # the object really is in the server, under the expected key
    key = url.split("/", 3)[3]
    assert s3_server.get_bytes(key) == "héllo".encode()
    storage.write_bytes(url, b"v2")
    assert storage.read_bytes(url) == b"v2"
    storage.delete(url)
    assert not storage.exists(url)
    storage.delete(url)  # idempotent


def test_s3_listdir_upload_download(tmp_path, s3_prefix):
    src = tmp_path / "ckpt"
    (src / "assets").mkdir(parents=True)
    (src / "model.keras").write_bytes(os.urandom(3000))
    (src / "vocab.json").write_text(json.dumps(["a", "b"]))
    (src / "assets" / "x.txt").write_text("x")
    dest = storage.join(s3_prefix, "ckpt")
    written = storage.upload_dir(str(src), dest)
    expected = [storage.join(dest, "assets/x.txt"), storage.join(dest, "model.keras"),
                storage.join(dest, "vocab.json")]
    assert written == expected
    assert storage.listdir(dest) == expected
    assert storage.listdir(dest + "/") == expected
    assert storage.listdir(storage.join(s3_prefix, "nothing-here")) == []
    back = tmp_path / "back"
    local = storage.download_dir(dest, str(back))
    assert sorted(local) == sorted(str(back / p) for p in ("assets/x.txt", "model.keras", "vocab.json"))
    for rel in ("assets/x.txt", "model.keras", "vocab.json"):
        assert (back / rel).read_bytes() == (src / rel).read_bytes()
    assert not [p for p in back.rglob("*.tmp")]
    _assert_usual_mode(back / "model.keras")
    storage.download_file(storage.join(dest, "vocab.json"), str(tmp_path / "vocab.json"))
    assert (tmp_path / "vocab.json").read_bytes() == (src / "vocab.json").read_bytes()
    _assert_usual_mode(tmp_path / "vocab.json")
    storage.delete(dest, recursive=True)
    assert storage.listdir(dest) == []


def test_s3_transfers_hold_a_bounded_amount_in_memory(tmp_path, s3_server, s3_prefix, monkeypatch):
    """An upload or download of any size moves parts of TRANSFER_PART, TRANSFER_CONCURRENCY at a time: the
    Python memory it holds at its peak stays near their product, not the object's size (s3fs's own defaults
    read a file under 100 MB whole and held 50 MiB x 10 of a larger one)."""
    import tracemalloc

    part = 5 << 20  # S3's smallest part
    monkeypatch.setattr(storage, "TRANSFER_PART", part)
    monkeypatch.setattr(storage, "TRANSFER_CONCURRENCY", 2)
    storage._S3_CACHE.clear()  # a filesystem with these settings
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 60)  # 60 MiB: 12 parts
    url = storage.join(s3_prefix, "big.bin")
    storage.write_bytes(storage.join(s3_prefix, "warm"), b"x")  # the client's first use loads botocore's models
    storage.read_bytes(storage.join(s3_prefix, "warm"))
    peaks = []
    for move in (lambda: storage.upload_file(str(big), url),
                 lambda: storage.download_file(url, str(tmp_path / "back.bin"))):
        tracemalloc.start()
        try:
            move()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=url.split("/", 3)[3], PartNumber=1)
    assert head["PartsCount"] == 12 and head["ContentLength"] == part  # a multipart upload of TRANSFER_PART parts
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    # The parts in flight and transient copies of them; s3fs's defaults would hold >= 60 MiB (the file read whole
    # for one PUT; two 50 MiB ranges downloaded at once).
    bound = 6 * part
    assert max(peaks) < bound, f"peak Python memory {[p >> 20 for p in peaks]} MiB, bound {bound >> 20} MiB"
    storage._S3_CACHE.clear()


def test_s3_streamed_upload_is_invisible_until_commit_and_abort_leaves_nothing(s3_server, s3_prefix, monkeypatch):
    monkeypatch.setattr(storage, "TRANSFER_PART", 5 << 20)
    client = s3_server.client()
    key = lambda url: url.split("/", 3)[3]  # noqa: E731
    data = os.urandom(1 << 20) * 12  # three parts, the last one short
    url = storage.join(s3_prefix, "streamed.bin")
    upload = storage.Upload(url)
    for at in range(0, len(data), 3 << 20):
        upload.write(data[at: at + (3 << 20)])
    assert not storage.exists(url)  # parts are up, the object is not
    upload.commit()
    assert s3_server.get_bytes(key(url)) == data
    assert client.head_object(Bucket=s3_server.bucket, Key=key(url), PartNumber=1)["PartsCount"] == 3
    small = storage.join(s3_prefix, "small.bin")
    tiny = storage.Upload(small)
    tiny.write(b"abc")
    tiny.commit()  # under one part: one PUT
    assert s3_server.get_bytes(key(small)) == b"abc"
    dropped = storage.Upload(storage.join(s3_prefix, "dropped.bin"))
    dropped.write(data)
    dropped.abort()
    assert not storage.exists(storage.join(s3_prefix, "dropped.bin"))
    pending = client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=key(s3_prefix)).get("Uploads", [])
    assert pending == []


def test_upload_parts_grow_only_past_s3s_part_limit():
    assert storage.part_size(1 << 30) == storage.TRANSFER_PART
    assert storage.part_size(storage.TRANSFER_PART * storage.MAX_PARTS) == storage.TRANSFER_PART
    big = 500 << 30
    assert storage.part_size(big) * storage.MAX_PARTS >= big > (storage.part_size(big) - 1) * storage.MAX_PARTS


def test_s3_missing_key(s3_prefix):
    url = storage.join(s3_prefix, "missing.txt")
    with pytest.raises(UserError, match="not found") as err:
        storage.read_bytes(url)
    assert url in str(err.value)
    with pytest.raises(UserError, match="not found"):
        storage.download_dir(storage.join(s3_prefix, "no-dir"), "/tmp/never-written")


@pytest.mark.parametrize("op", ["read", "write", "listdir", "delete"])
def test_s3_missing_bucket(s3_server, op):
    url = "s3://no-such-bucket-4711/a/b.txt"
    calls = {
        "read": lambda: storage.read_text(url),
        "write": lambda: storage.write_text(url, "x"),
        "listdir": lambda: storage.listdir("s3://no-such-bucket-4711"),
        "delete": lambda: storage.delete(url),
    }
    with pytest.raises(UserError) as err:
        calls[op]()
    message = str(err.value)
    assert "no-such-bucket-4711" in message and "does not exist" in message and "create" in message
    assert s3_server.endpoint in message
    assert "\n" not in message


def test_aws_endpoint_url_s3_takes_precedence(s3_server, s3_prefix, monkeypatch):
    """botocore resolves AWS_ENDPOINT_URL_S3 before AWS_ENDPOINT_URL; we rely on that, not on our own code."""
    url = storage.join(s3_prefix, "precedence.txt")
    storage.write_text(url, "ok")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    assert storage.s3_endpoint() == s3_server.endpoint
    assert storage.read_text(url) == "ok"


def test_filesystem_cache_follows_environment(s3_server, monkeypatch):
    first = storage.s3_filesystem()
    assert storage.s3_filesystem() is first
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    second = storage.s3_filesystem()
    assert second is not first
    assert storage.s3_endpoint() == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert storage.s3_endpoint() == s3_server.endpoint


def _write_in_child(url: str, queue) -> None:
    try:
        storage.write_text(url, f"from {os.getpid()}")
        queue.put(("ok", storage.read_text(url)))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", repr(exc)))


@pytest.mark.timeout(120)
def test_s3_works_in_forked_child(s3_prefix):
    """A forked child must not reuse the parent's s3fs instance (its event loop thread is not forked)."""
    storage.write_text(storage.join(s3_prefix, "parent.txt"), "parent")  # parent has a live client now
    url = storage.join(s3_prefix, "child.txt")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_write_in_child, args=(url, queue))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("child process hung using S3 after fork")
    status, payload = queue.get(timeout=5)
    assert status == "ok", payload
    assert payload == f"from {child.pid}"
    assert storage.read_text(url) == payload


def test_pyarrow_filesystem_reads_what_s3fs_wrote(s3_server, s3_prefix):
    import pyarrow.fs

    storage.write_text(storage.join(s3_prefix, "run", "a.txt"), "written by s3fs")
    fs, path = storage.pyarrow_filesystem(storage.join(s3_prefix, "run"))
    assert isinstance(fs, pyarrow.fs.S3FileSystem)
    assert path == storage.join(s3_prefix, "run")[len("s3://"):]  # bucket/prefix, no scheme (pitfall 3)
    with fs.open_input_stream(path + "/a.txt") as fh:
        assert fh.read() == b"written by s3fs"
    with fs.open_output_stream(path + "/b.txt") as fh:
        fh.write(b"written by pyarrow")
    assert storage.read_text(storage.join(s3_prefix, "run", "b.txt")) == "written by pyarrow"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    assert sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.File) == [path + "/a.txt",
                                                                                  path + "/b.txt"]


def test_pyarrow_filesystem_local(tmp_path):
    assert storage.pyarrow_filesystem(str(tmp_path / "r")) == (None, str(tmp_path / "r"))
    assert storage.pyarrow_filesystem("file://" + str(tmp_path)) == (None, str(tmp_path))
    fs, path = storage.pyarrow_filesystem("relative/dir")
    assert fs is None and path == os.path.abspath("relative/dir")


# --------------------------------------------------------------------------------- unreachable endpoint


@pytest.fixture
def fake_credentials(monkeypatch):
    """Keys botocore signs with, so that a request is made at all (not a "no credentials" refusal)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when we return: nothing listens there


@pytest.mark.timeout(90)
def test_unreachable_endpoint_is_user_error(monkeypatch, fake_credentials):
    """Default retry settings: connection refused, retried by botocore with backoff, then one clear line."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(UserError, match="cannot reach") as err:
        storage.read_text("s3://bucket/key.txt")
    assert endpoint in str(err.value)


@pytest.mark.timeout(90)
def test_silent_endpoint_times_out_as_configured(monkeypatch, fake_credentials):
    """A server that accepts connections but never answers: the read timeout and attempt count are the
    library's (botocore Config), taken from CHARLSTM_S3_READ_TIMEOUT / AWS_MAX_ATTEMPTS."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("CHARLSTM_S3_READ_TIMEOUT", "1")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        assert storage._botocore_config()["read_timeout"] == 1.0
        with pytest.raises(UserError, match="did not answer") as err:
            storage.read_text("s3://bucket/key.txt")
        assert endpoint in str(err.value)


def test_bad_settings_are_user_errors(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(UserError, match="AWS_MAX_ATTEMPTS"):
        storage.s3_filesystem()
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    monkeypatch.setenv("CHARLSTM_S3_CONNECT_TIMEOUT", "-3")
    with pytest.raises(UserError, match="CHARLSTM_S3_CONNECT_TIMEOUT"):
        storage.s3_filesystem()


# ------------------------------------------------------------------------------------------ credentials


# `iam_s3` (a moto server with IAM authentication on) is a session fixture in conftest.py.


def _use_keys(monkeypatch, endpoint, key_id, secret):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def test_iam_server_accepts_valid_credentials(iam_s3, monkeypatch):
    w = iam_s3["writer"]
    _use_keys(monkeypatch, iam_s3["endpoint"], w["AccessKeyId"], w["SecretAccessKey"])
    assert storage.read_text("s3://locked/k.txt") == "secret data"
    storage.write_text("s3://locked/new.txt", "ok")
    assert storage.listdir("s3://locked") == ["s3://locked/k.txt", "s3://locked/new.txt"]


@pytest.mark.parametrize("case", ["unknown-key-id", "wrong-secret"])
@pytest.mark.parametrize("op", ["read", "write", "listdir"])
def test_rejected_credentials_are_user_errors(iam_s3, monkeypatch, case, op):
    w = iam_s3["writer"]
    key_id, secret = (("AKIAUNKNOWNUNKNOWN00", "S3cr3t-not-known") if case == "unknown-key-id"
                      else (w["AccessKeyId"], "Wr0ngSecretWr0ngSecret"))
    _use_keys(monkeypatch, iam_s3["endpoint"], key_id, secret)
    calls = {"read": lambda: storage.read_text("s3://locked/k.txt"),
             "write": lambda: storage.write_text("s3://locked/x.txt", "x"),
             "listdir": lambda: storage.listdir("s3://locked")}
    with pytest.raises(UserError) as err:
        calls[op]()
    message = str(err.value)
    expected_code = "InvalidAccessKeyId" if case == "unknown-key-id" else "SignatureDoesNotMatch"
    assert "rejected the credentials" in message and expected_code in message, message
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert secret not in message and w["SecretAccessKey"] not in message


def test_access_denied_is_user_error(iam_s3, monkeypatch):
    n = iam_s3["nobody"]
    _use_keys(monkeypatch, iam_s3["endpoint"], n["AccessKeyId"], n["SecretAccessKey"])
    with pytest.raises(UserError, match="access denied") as err:
        storage.write_text("s3://locked/x.txt", "x")
    assert "s3://locked/x.txt" in str(err.value)
    assert n["SecretAccessKey"] not in str(err.value)
    with pytest.raises(UserError, match="access denied"):
        storage.read_text("s3://locked/k.txt")



def test_directory_markers_are_not_files(s3_server, s3_prefix):
    """pyarrow (Ray's checkpoint writer) creates `dir/` marker objects; listings must skip them."""
    from job.core import storage

    bucket, key = s3_prefix[len("s3://"):].split("/", 1)
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key=f"{key}/ckpt/", Body=b"")
    client.put_object(Bucket=bucket, Key=f"{key}/ckpt/a.txt", Body=b"a")
    assert storage.listdir(f"{s3_prefix}/ckpt") == [f"{s3_prefix}/ckpt/a.txt"]
