"""Generation end to end: `ray job submit` with 2 workers writing to the local S3 server, byte-identical to
a 1-worker in-process run; and an interrupted run that is resumed."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import textgen
from e2e_helpers import train_in_process
from tiny import TINY

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TINY = {**TINY, "units": [24], "sample_chars": 10, "epochs": 1, "steps_per_call": 4}


@pytest.fixture(scope="module")
def s3_model(s3_server, tmp_path_factory) -> str:
    """A tiny default model trained in-process straight to the local S3."""
    corpus = tmp_path_factory.mktemp("c") / "corpus.txt"
    corpus.write_text(textgen.book(4000))
    out = s3_server.url("gen-model")
    train_in_process(str(corpus), out, **TINY)
    return out


def test_two_ray_workers_match_one_worker_byte_for_byte(ray_cluster, s3_server, s3_model, s3_prefix, tmp_path):
    flags = ["--model", s3_model, "--num-samples", "40", "--length", "30", "--shard-size", "10", "--seed", "4",
             "--temperature", "0.9", "--top-k", "10"]
    out = f"{s3_prefix}/gen"
    result = ray_cluster.submit(["python", "-m", "job.generate", *flags, "--output", out, "--num-workers", "2"],
                                timeout=300)
    assert result.ok, result.describe()
    local = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "job.generate", *flags, "--output", str(local), "--in-process"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    prefix = out.split("/", 3)[3]
    manifest = json.loads(s3_server.get_bytes(f"{prefix}/manifest.json"))
    assert manifest["num_samples"] == 40 and len(manifest["shards"]) == 4
    for shard in manifest["shards"]:
        remote = s3_server.get_bytes(f"{prefix}/{shard['file']}")
        assert remote == (local / shard["file"]).read_bytes(), shard["file"]
    ids = [json.loads(line)["id"] for shard in manifest["shards"]
           for line in gzip.decompress(s3_server.get_bytes(f"{prefix}/{shard['file']}")).decode().splitlines()]
    assert sorted(ids) == list(range(40))


# `python -c KILL_AT_SHARD <job.generate flags>`: job.generate, SIGKILLed by itself at a known point: as it is about
# to publish (rename into place) its Nth shard, whose samples then lie whole in a hidden temporary file. No polling,
# no race with the last shards: every run is cut at the same point, and the kill cannot come too late.
KILL_AT_SHARD = """
import os, signal, sys, threading
from job import generate
from job.core.errors import run_cli

kill_at, published, lock, real_replace = int(os.environ["KILL_AT_SHARD"]), [], threading.Lock(), os.replace


def replace(src, dst, *args, **kwargs):
    if "/samples/part-" not in str(dst):
        return real_replace(src, dst, *args, **kwargs)
    with lock:
        if len(published) + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *args, **kwargs)
        published.append(dst)


os.replace = replace
sys.exit(run_cli(generate.main))
"""


def test_killed_generation_resumes_without_duplicates_or_partial_shards(s3_model, tmp_path):
    out = tmp_path / "gen"
    flags = ["--model", s3_model, "--output", str(out), "--num-samples", "80", "--length", "100", "--shard-size", "8",
             "--batch-size", "8", "--seed", "9", "--in-process"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SHARD, *flags], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "KILL_AT_SHARD": "3"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    # Only complete shards carry a shard name; the interrupted write is a hidden .tmp file.
    names = sorted(p.name for p in (out / "samples").iterdir())
    done_before = [n for n in names if not n.endswith(".tmp")]
    assert len(done_before) == 2 and all(n.startswith("part-") and n.endswith(".jsonl.gz") for n in done_before), names
    assert [n for n in names if n.startswith(".part-") and n.endswith(".tmp")], names  # the 3rd, never published
    for name in done_before:
        assert len(gzip.decompress((out / "samples" / name).read_bytes()).decode().splitlines()) == 8
    again = subprocess.run([sys.executable, "-m", "job.generate", *flags], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming: 2 of 10 shards already complete" in again.stdout
    ids = [json.loads(line)["id"] for part in sorted((out / "samples").iterdir())
           for line in gzip.decompress(part.read_bytes()).decode().splitlines()]
    assert ids == list(range(80))
    assert all(not p.name.endswith(".tmp") for p in (out / "samples").iterdir())  # leftovers cleaned
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 80
