"""Many-file corpora end to end: a prefix or a glob on the local S3 server, prepared once into <output>/data by
the driver, trained by 2 Ray workers through `ray job submit`, reused (not read again) on resubmission.

That same job is the training job's end-to-end run (its outputs on the S3 server) and its synchronisation proof:
the 2 workers hold identical weights and follow the 1-worker run at the same global batch. (tests/test_train_ray.py
has the fault paths.)

The raw files are never read again once the dataset exists: the S3 server's own request log (moto's HTTP log)
must show no GET of a corpus file after the first submission.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import textgen
import yaml
from e2e_helpers import assert_same_losses, reference_metrics
from tiny import EXACT

pytestmark = pytest.mark.e2e

# Tiny and dropout-free, so that 1- and 2-worker runs are comparable step by step.
TINY = EXACT
# The tests' weight dumps (tests/train_hooks.py), loaded by every worker.
HOOKS = {"CHARLSTM_HOOKS": "tests.train_hooks"}


def _key(url: str) -> str:
    return url.split("/", 3)[3]


def _put(s3_server, url: str, body: bytes) -> None:
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=_key(url), Body=body)


def _raw_gets(s3_server, books_url: str) -> int:
    """GET requests for objects under the corpus prefix, as the S3 server logged them."""
    log = Path(s3_server.info.proc.log).read_text(errors="replace")
    # werkzeug colours some lines (206 partial content): '"\x1b[35m\x1b[1mGET /bucket/key HTTP/1.1\x1b[0m" 206'
    return len(re.findall(rf'"(?:\x1b\[[0-9;]*m)*GET /{s3_server.bucket}/{re.escape(_key(books_url))}/[^ ?"]+', log))


def _metrics(s3_server, out: str) -> list[dict]:
    return [json.loads(x) for x in s3_server.get_bytes(f"{_key(out)}/metrics.jsonl").decode().splitlines()]


@pytest.fixture
def books(s3_server, s3_prefix):
    """Three synthetic books (one with CRLF and a BOM), a hidden file and a folder marker under one prefix."""
    url = f"{s3_prefix}/books"
    _put(s3_server, f"{url}/a.txt", textgen.gutenberg(textgen.story(3500, seed=1), style="new").encode())
    _put(s3_server, f"{url}/b.txt",
         textgen.gutenberg(textgen.story(2500, seed=2), style="old", crlf=True, bom=True).encode())
    _put(s3_server, f"{url}/c.txt", textgen.story(3000, seed=3).encode())
    _put(s3_server, f"{url}/.DS_Store", b"\x00\x01junk")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=_key(url) + "/empty-folder/", Body=b"")
    return url


def test_glob_corpus_via_ray_job_submit_two_workers_in_sync_match_one_and_resubmission_reuses_the_dataset(
        ray_cluster, s3_server, s3_prefix, books, tmp_path):
    """One 2-worker training job through `ray job submit` on a glob of several files, then its resubmission:

    - the driver prepares the dataset once (every file, the held-out tail of each), the run writes every output
      (model, metrics with evaluations every 10 steps, loss plot, samples, checkpoints) and logs each line once;
    - synchronisation: both workers end with identical weights, and the run follows a 1-worker in-process run at
      the same global batch (losses line for line, weights);
    - the resubmission with one more epoch resumes from the checkpoint on the prepared dataset: the raw files are
      not read again."""
    config = f"{s3_prefix}/tiny.yaml"
    _put(s3_server, config, yaml.safe_dump(TINY).encode())
    out = f"{s3_prefix}/run"
    corpus = f"{books}/*.txt"
    dumps = tmp_path / "weights"
    args = ["python", "-m", "job.train", "--corpus", corpus, "--output", out, "--config", config,
            "--num-workers", "2", "--run-name", "e2e", "--seed", "3", "--eval-every-steps", "10"]
    result = ray_cluster.submit([*args, "--epochs", "2"], env={**HOOKS, "CHARLSTM_TEST_DUMP_WEIGHTS": str(dumps)},
                                timeout=420)
    assert result.ok, result.describe()
    assert "preparing dataset" in result.logs and "global batch 8 (4 per worker)" in result.logs
    # One line per epoch in the job log (Ray Train's patched print once doubled every line).
    assert sum("epoch   1/2" in line for line in result.logs.splitlines()) == 1, result.logs[-3000:]
    meta = json.loads(s3_server.get_bytes(f"{_key(out)}/data/meta.json"))
    assert [f["name"] for f in meta["files"]] == ["a.txt", "b.txt", "c.txt"]
    assert len(meta["val_segments"]) == 3  # the held-out part is the tail of every file
    assert meta["dtype"] == "uint8" and meta["vocab"]["unknown"] is False

    keys = s3_server.keys(out, relative=True)
    for required in ("model/model.keras", "model/vocab.json", "model/config.json", "metrics.jsonl", "loss.png",
                     "samples/epoch-001.txt", "samples/epoch-002.txt"):
        assert required in keys, keys
    assert any(k.startswith("checkpoints/e2e/checkpoint_") and k.endswith("variables.npz") for k in keys), keys
    lines = _metrics(s3_server, out)
    evals = [m for m in lines if m["kind"] == "eval"]
    assert evals and all(m["global_step"] % 10 == 0 for m in evals)
    assert [m["epoch"] for m in lines if m["kind"] == "epoch"] == [1, 2]
    final = json.loads(next(line for line in result.logs.splitlines() if line.startswith('{"final"')))["final"]
    assert final["workers"] == 2 and final["global_batch"] == 8 and final["epoch"] == 2

    # Synchronisation: both workers hold the same weights...
    rank0, rank1 = np.load(dumps / "rank-0.npz"), np.load(dumps / "rank-1.npz")
    assert rank0.files == rank1.files
    for key in rank0.files:
        np.testing.assert_array_equal(rank0[key], rank1[key])
    # ...and the run follows one worker at twice the batch, in this process, on the same glob: the same losses,
    # line for line, and the same weights.
    single_dump = tmp_path / "single-weights"
    single = reference_metrics(corpus, tmp_path / "single", **{**TINY, "batch_size": 8}, epochs=2, seed=3,
                               eval_every_steps=10, env={**HOOKS, "CHARLSTM_TEST_DUMP_WEIGHTS": str(single_dump)})
    assert_same_losses(lines, single)
    ref = np.load(single_dump / "rank-0.npz")
    assert ref.files == rank0.files
    for key in ref.files:
        np.testing.assert_allclose(rank0[key], ref[key], atol=2e-4)

    # Resubmission continues the run from the prepared dataset: the raw files are not read again.
    reads_before = _raw_gets(s3_server, books)
    assert reads_before >= 3, "the S3 server's log shows no read of the corpus at all: the check would be blind"
    again = ray_cluster.submit([*args, "--epochs", "3"], timeout=420)
    assert again.ok, again.describe()
    assert "reusing it" in again.logs and "preparing dataset" not in again.logs
    assert "resumed from checkpoint: epoch 2" in again.logs
    assert _raw_gets(s3_server, books) == reads_before
    assert [m["epoch"] for m in _metrics(s3_server, out) if m["kind"] == "epoch"] == [1, 2, 3]


def test_a_bad_file_among_good_ones_is_named_or_skipped(ray_cluster, s3_server, s3_prefix, books):
    _put(s3_server, f"{books}/notes/scan.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    config = f"{s3_prefix}/tiny.yaml"
    _put(s3_server, config, yaml.safe_dump(TINY).encode())
    out = f"{s3_prefix}/run"
    args = ["python", "-m", "job.train", "--corpus", f"{books}/", "--output", out, "--config", config,
            "--epochs", "1"]
    refused = ray_cluster.submit(args, timeout=300)
    assert refused.status == "FAILED", refused.describe()
    errors = [x for x in refused.logs.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and f"{books}/notes/scan.txt" in errors[0] and "--skip-bad-files" in errors[0], errors
    assert s3_server.keys(out) == []  # nothing half-written

    skipped = ray_cluster.submit([*args, "--skip-bad-files"], timeout=300)
    assert skipped.ok, skipped.describe()
    meta = json.loads(s3_server.get_bytes(f"{_key(out)}/data/meta.json"))
    assert [f["name"] for f in meta["files"]] == ["a.txt", "b.txt", "c.txt"]
    assert [f["name"] for f in meta["skipped_files"]] == ["notes/scan.txt"]
    assert "skipped 1 bad file(s): notes/scan.txt" in skipped.logs, skipped.logs[-2000:]
