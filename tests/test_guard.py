"""One writer per output location (job.core.guard's lease), and the plain-data guards that need no TensorFlow: outputs
never feed inputs, non-regular corpus files, abandoned work folders, damaged datasets, prompt files, messages.
Local paths here; the same lease over S3 (conditional PUTs against the local moto server) at the end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import textgen
from logcheck import assert_user_error, run

from job.core import guard, storage
from job.core.errors import UserError
from job.data import prepare, prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fast_lease(monkeypatch):
    monkeypatch.setenv("CHARLSTM_LEASE_SECONDS", "0.6")


def write_lease(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"owner": "someone", "host": "elsewhere", "pid": 1, "command": "training run 'run'",
              "heartbeat": time.time(), "ttl": 60.0, **fields}
    (folder / guard.LEASE_FILE).write_text(json.dumps(holder))


# ---------------------------------------------------------------------------------------------------- lease


def test_second_writer_is_refused_naming_the_holder_then_gets_it_after_release(tmp_path):
    out = tmp_path / "out"
    first = guard.Lease(str(out), "training run 'a'").acquire()
    with pytest.raises(UserError) as refused:
        guard.Lease(str(out), "generation").acquire()
    assert f"{out} is in use by training run 'a' on host {socket.gethostname()} pid {os.getpid()}" in str(refused.value)
    assert "another --output" in str(refused.value)
    first.release()
    assert not (out / guard.LEASE_FILE).exists()
    with guard.Lease(str(out), "generation"):
        assert json.loads((out / guard.LEASE_FILE).read_text())["command"] == "generation"


def test_a_refused_or_released_lease_leaves_no_folder_it_made(tmp_path):
    out = tmp_path / "a" / "b"
    with guard.Lease(str(out), "x"):
        assert out.is_dir()
    assert not (tmp_path / "a").exists()


def test_an_expired_lease_of_another_host_is_taken_over_with_one_line(tmp_path):
    out = tmp_path / "out"
    write_lease(out, heartbeat=time.time() - 120)
    lines: list[str] = []
    with guard.Lease(str(out), "generation", log=lines.append):
        pass
    assert len(lines) == 1 and lines[0].startswith(f"took over {out} from training run 'run' on host elsewhere")
    assert "its last heartbeat was 12" in lines[0]


def test_a_live_lease_of_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    write_lease(out, heartbeat=time.time() - 5)
    with pytest.raises(UserError, match="is in use by training run 'run' on host elsewhere pid 1"):
        guard.Lease(str(out), "generation").acquire()
    assert json.loads((out / guard.LEASE_FILE).read_text())["owner"] == "someone"


def test_a_dead_process_on_this_host_releases_its_lease_at_once(tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    write_lease(out, host=socket.gethostname(), pid=child.pid)
    lines: list[str] = []
    with guard.Lease(str(out), "generation", log=lines.append):
        pass
    assert "its process is gone" in lines[0]


def test_a_damaged_lease_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / guard.LEASE_FILE).write_text("{not json")
    lines: list[str] = []
    with guard.Lease(str(out), "generation", log=lines.append):
        pass
    assert lines == [f"took over {out} from a damaged lease: it was unreadable"]


def test_the_holder_renews_its_lease_while_it_works(tmp_path, fast_lease):
    out = tmp_path / "out"
    with guard.Lease(str(out), "training run 'run'"):
        first = json.loads((out / guard.LEASE_FILE).read_text())["heartbeat"]
        time.sleep(1.5)  # well past the 0.6 s lifetime: only renewals keep it
        renewed = json.loads((out / guard.LEASE_FILE).read_text())["heartbeat"]
        assert renewed > first
        with pytest.raises(UserError, match="is in use"):
            guard.Lease(str(out), "generation").acquire()


def test_a_holder_that_loses_its_lease_is_told(tmp_path, fast_lease):
    out = tmp_path / "out"
    lost: list[str] = []
    lease = guard.Lease(str(out), "training run 'run'", on_lost=lost.append).acquire()
    try:
        write_lease(out)  # someone took it over (as if this holder had been silent past its lifetime)
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost and lost[0].startswith(f"lost the lease on {out} to training run 'run' on host elsewhere")
    finally:
        lease.release()
    assert json.loads((out / guard.LEASE_FILE).read_text())["owner"] == "someone"  # not deleted by the loser


HOLD = textwrap.dedent("""
    import sys, time
    from job.core import guard
    from job.core.errors import UserError
    try:
        with guard.Lease(sys.argv[1], sys.argv[2]):
            print("got", flush=True)
            time.sleep(float(sys.argv[3]))
    except UserError as e:
        print("refused", e, flush=True)
""")


def _race(url: str, env: dict | None = None) -> list[str]:
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, url, f"writer {i}", "2"], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
             for i in range(4)]
    return [p.communicate(timeout=120)[0].strip() for p in procs]


def test_of_writers_started_together_exactly_one_gets_a_local_lease(tmp_path):
    outcomes = _race(str(tmp_path / "out"))
    assert sorted(o.split()[0] for o in outcomes) == ["got", "refused", "refused", "refused"], outcomes


@pytest.mark.e2e
def test_of_writers_started_together_exactly_one_gets_an_s3_lease(s3_server, s3_prefix):
    outcomes = _race(f"{s3_prefix}/out", s3_server.env)
    assert sorted(o.split()[0] for o in outcomes) == ["got", "refused", "refused", "refused"], outcomes
    assert storage.read_versioned(f"{s3_prefix}/out/{guard.LEASE_FILE}") is None  # released


@pytest.mark.e2e
def test_an_expired_s3_lease_is_taken_over_and_a_live_one_refused(s3_server, s3_prefix):
    url = f"{s3_prefix}/out"
    holder = {"owner": "someone", "host": "elsewhere", "pid": 1, "command": "generation", "ttl": 60.0}
    storage.write_text(f"{url}/{guard.LEASE_FILE}", json.dumps({**holder, "heartbeat": time.time()}))
    with pytest.raises(UserError, match="is in use by generation on host elsewhere"):
        guard.Lease(url, "training run 'run'").acquire()
    storage.write_text(f"{url}/{guard.LEASE_FILE}", json.dumps({**holder, "heartbeat": time.time() - 61}))
    lines: list[str] = []
    with guard.Lease(url, "training run 'run'", log=lines.append):
        assert json.loads(storage.read_text(f"{url}/{guard.LEASE_FILE}"))["command"] == "training run 'run'"
    assert lines[0].startswith(f"took over {url} from generation on host elsewhere")


# ----------------------------------------------------------------------------------------- identity records


def test_identity_of_another_kind_is_refused(tmp_path):
    out = tmp_path / "out"
    guard.write_identity(str(out), "generation", {"model": {}})
    with pytest.raises(UserError, match=f"{out} is a generation output; give this training output its own --output"):
        guard.require_kind(str(out), "training", "--output")
    (out / guard.IDENTITY_FILE).write_text("garbage")
    with pytest.raises(UserError, match="is not a charlstm output record"):
        guard.require_kind(str(out), "training", "--output")


# ------------------------------------------------------------------------------------ outputs never feed inputs


def test_charlstm_outputs_inside_a_corpus_folder_are_left_out(tmp_path):
    corpus = tmp_path / "books"
    (corpus / "a.txt").parent.mkdir()
    (corpus / "a.txt").write_text(textgen.book(3000, 1))
    (corpus / "b.txt").write_text(textgen.book(3000, 2))
    prepare.prepare(str(corpus), str(corpus / "old" / "data"), log=lambda _l: None)  # an earlier run's dataset
    guard.write_identity(str(corpus / "old"), "training", {"run": "run", "config": {}})
    (corpus / "old" / "metrics.jsonl").write_text("{}\n")
    (corpus / "mine").mkdir()
    (corpus / "mine" / "notes.txt").write_text("the output of this run, given explicitly\n")
    (corpus / "json").mkdir()
    (corpus / "json" / "output.json").write_text('{"a user file": true}\n')  # not ours: stays corpus
    names = [s.name for s in prepare.list_sources(str(corpus), exclude=[str(corpus / "mine")])]
    assert names == ["a.txt", "b.txt", "json/output.json"]
    lines: list[str] = []
    meta = prepare.prepare(str(corpus), str(corpus / "mine" / "data"), log=lines.append, skip_bad_files=True,
                           exclude=[str(corpus / "mine")])
    assert [f["name"] for f in meta["files"]] == ["a.txt", "b.txt", "json/output.json"]
    assert any("left out 6 file(s) of charlstm outputs or datasets inside the corpus" in x for x in lines), lines


def test_fifo_in_a_corpus_folder_is_skipped_and_a_fifo_corpus_refused(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text(textgen.book(5000, 1))
    os.mkfifo(corpus / "pipe.txt")
    os.symlink("/dev/zero", corpus / "zeros.txt")
    for extra in ([], ["--skip-bad-files"]):
        proc = run("job.prepare", "--corpus", str(corpus), "--output", str(tmp_path / f"ds{len(extra)}"), *extra,
                   timeout=60)
        assert proc.returncode == 0, proc.stderr
        skipped = "skipped 2 file(s) that are not regular files (FIFO, device or socket): pipe.txt, zeros.txt"
        assert skipped in proc.stdout
    proc = run("job.prepare", "--corpus", str(corpus / "pipe.txt"), "--output", str(tmp_path / "ds"), timeout=60)
    assert_user_error(proc, "is not a regular file (a FIFO, device or socket)")


def test_a_corpus_path_with_brackets_is_read_literally(tmp_path):
    path = tmp_path / "book [1].txt"
    path.write_text(textgen.book(5000, 1))
    meta = prepare.prepare(str(path), str(tmp_path / "ds"), log=lambda _l: None)
    assert [f["name"] for f in meta["files"]] == ["book [1].txt"]


def test_many_files_too_short_name_the_file_length(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i:02d}.txt").write_text(textgen.book(220, i))
    with pytest.raises(UserError, match=r"each of its 30 files needs more than 1026 training chars .* the longest has"):
        prepare.prepare(str(corpus), str(tmp_path / "ds"), log=lambda _l: None)


def test_a_refused_https_connection_is_not_called_not_found(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run("job.prepare", "--corpus", f"http://127.0.0.1:{port}/book.txt", "--output", str(tmp_path / "ds"))
    line = assert_user_error(proc, f"cannot reach http://127.0.0.1:{port}/book.txt")
    assert "not found" not in line


# ------------------------------------------------------------------------------------------ datasets


def _dataset(tmp_path: Path, seed: int = 1, name: str = "ds") -> tuple[Path, Path, dict]:
    corpus = tmp_path / f"corpus{seed}.txt"
    corpus.write_text(textgen.book(6000, seed))
    out = tmp_path / name
    return corpus, out, prepare.ensure(str(corpus), str(out), log=lambda _l: None)


def test_a_dataset_of_another_corpus_is_refused_until_forced(tmp_path):
    corpus, out, meta = _dataset(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text(textgen.book(6000, 9))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run("job.prepare", "--corpus", str(other), "--output", str(out))
    line = assert_user_error(proc, f"{out} already holds another dataset: it was prepared from corpus {corpus}")
    assert "--force" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # same corpus, one file edited: named
    corpus.write_text(corpus.read_text() + "one more line\n")
    proc = run("job.prepare", "--corpus", str(corpus), "--output", str(out))
    assert_user_error(proc, f"the corpus files changed since (changed {corpus.name})")
    proc = run("job.prepare", "--corpus", str(other), "--output", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "meta.json").read_text())["corpus_url"] == str(other)


def test_a_damaged_dataset_is_refused_in_one_line(tmp_path):
    corpus, out, meta = _dataset(tmp_path)
    args = ("job.prepare", "--corpus", str(corpus), "--output", str(out))
    data = bytearray((out / "train.bin").read_bytes())
    data[10] = 255  # an id past the vocabulary
    (out / "train.bin").write_bytes(bytes(data))
    assert_user_error(run(*args), f"{out}/train.bin does not match the sha256 in its meta.json")
    (out / "train.bin").write_bytes(bytes(data[:-1]))  # truncated: prepared again (same corpus)
    proc = run(*args)
    assert proc.returncode == 0 and "is incomplete" in proc.stdout, proc.stdout + proc.stderr
    edited = json.loads((out / "meta.json").read_text())
    edited["vocab"]["chars"][3] = "#"
    (out / "meta.json").write_text(json.dumps(edited))
    assert_user_error(run(*args), f"{out}/meta.json was edited after the dataset was prepared")
    (out / "meta.json").write_text("{")
    assert_user_error(run(*args), "is not a charlstm dataset's meta.json")


def test_work_folders_of_a_killed_preparation_are_removed(tmp_path):
    import tempfile

    corpus, out, meta = _dataset(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    local = out / f".prepare-{dead.pid}-abc"
    legacy = out / ".prepare-xyz"
    system = Path(tempfile.gettempdir()) / f"charlstm-prepare-{dead.pid}-abc"
    alive = Path(tempfile.gettempdir()) / f"charlstm-prepare-{os.getpid()}-abc"
    for folder in (local, legacy, system, alive):
        folder.mkdir()
        (folder / "cleaned.txt").write_text("x" * 1000)
    try:
        proc = run("job.prepare", "--corpus", str(corpus), "--output", str(out))
        assert proc.returncode == 0, proc.stderr
        assert "removed 3 work folder(s) left by an interrupted preparation" in proc.stdout
        assert not local.exists() and not legacy.exists() and not system.exists() and alive.exists()
    finally:
        for folder in (system, alive):
            if folder.exists():
                (folder / "cleaned.txt").unlink()
                folder.rmdir()


@pytest.mark.e2e
def test_a_damaged_remote_dataset_is_refused_when_downloaded(s3_server, s3_prefix, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(textgen.book(6000, 1))
    url = f"{s3_prefix}/ds"
    meta = prepare.ensure(str(corpus), url, log=lambda _l: None)
    key = url.split("/", 3)[3] + "/val.bin"
    blob = bytearray(s3_server.get_bytes(key))
    blob[0] ^= 1
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(blob))
    with pytest.raises(UserError, match=f"{url}/val.bin does not match the sha256 in its meta.json"):
        prepare.open_local(url, meta, cache_dir=str(tmp_path / "cache"))
    assert not (Path(prepare.cache_folder(meta, str(tmp_path / "cache"))) / "val.bin").exists()


# -------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(("content", "name", "fragment"), [
    ("alice\ncaf\xe9\n".encode("latin-1"), "p.txt", "is not UTF-8 (byte 0xe9 on line 2)"),
    (b'{"prompt": "alice"}\n{"prompt": "alice said"\n', "p.txt", "line 2: not valid JSONL"),
    (b'{"prompt": "alice"}\n{"text": "alice"}\n', "p.txt", "line 2: not valid JSONL"),
    (b'"alice"\nthe queen\n', "p.jsonl", "line 2: not valid JSONL"),
])
def test_bad_prompt_files_are_refused_naming_the_line(tmp_path, content, name, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as refused:
        prompts.from_file(str(path))
    assert str(path) in str(refused.value) and fragment in str(refused.value)


def test_plain_prompt_lines_may_start_with_a_quote(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('"Hello," said Alice\n"the cat"\n')
    assert prompts.from_file(str(path)) == ['"Hello," said Alice', "the cat"]


@pytest.mark.e2e
def test_an_s3_dataset_of_another_corpus_is_refused_and_an_edited_meta_too(s3_server, s3_prefix, tmp_path):
    first, other = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(textgen.book(6000, 1))
    other.write_text(textgen.book(6000, 2))
    url = f"{s3_prefix}/ds"
    prepare.ensure(str(first), url, log=lambda _l: None)
    with pytest.raises(UserError, match=f"{url} already holds another dataset: it was prepared from corpus {first}"):
        prepare.ensure(str(other), url, log=lambda _l: None)
    meta = json.loads(storage.read_text(f"{url}/meta.json"))
    meta["train_chars"] -= 1
    storage.write_text(f"{url}/meta.json", json.dumps(meta))
    with pytest.raises(UserError, match="meta.json was edited after the dataset was prepared"):
        prepare.ensure(str(first), url, log=lambda _l: None)


@pytest.mark.e2e
def test_outputs_inside_an_s3_corpus_prefix_are_left_out(s3_server, s3_prefix):
    books = f"{s3_prefix}/books"
    storage.write_text(f"{books}/a.txt", textgen.book(5000, 1))
    prepare.prepare(books + "/", f"{books}/run/data", log=lambda _l: None, exclude=[f"{books}/run"])
    guard.write_identity(f"{books}/run", "training", {"run": "run", "config": {}})
    storage.write_text(f"{books}/run/metrics.jsonl", "{}\n")
    assert [s.name for s in prepare.list_sources(books + "/")] == ["a.txt"]  # found by its records alone
    assert [s.name for s in prepare.list_sources(books + "/", exclude=[f"{books}/run"])] == ["a.txt"]
