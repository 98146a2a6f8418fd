"""The batch-generation job in-process: shards, manifest, resume, determinism, prompts, bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import textgen
from e2e_helpers import train_in_process
from tiny import TINY

REPO = Path(__file__).resolve().parents[1]
TINY = {**TINY, "units": [24], "sample_chars": 10, "epochs": 1, "steps_per_call": 4}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    corpus = root / "corpus.txt"
    corpus.write_text(textgen.book(4000))
    out = {}
    for preset in ("default", "seed-small"):
        batch = {"batch_size": 32} if preset == "seed-small" else {}
        train_in_process(str(corpus), root / preset, preset=preset, **{**TINY, **batch})
        out[preset] = str(root / preset)
    return out


def generate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job.generate", "--in-process", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    found = []
    for part in sorted((out / "samples").glob("part-*.jsonl.gz")):
        found += [json.loads(line) for line in gzip.decompress(part.read_bytes()).decode().splitlines()]
    return found


@pytest.mark.parametrize("preset", ["default", "seed-small"])
def test_shards_records_and_manifest(models, tmp_path, preset):
    out = tmp_path / "gen"
    proc = generate("--model", models[preset], "--output", str(out), "--num-samples", "25", "--length", "30",
                    "--shard-size", "10", "--batch-size", "4", "--temperature", "0.7", "--top-p", "0.9",
                    "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    recs = records(out)
    assert [r["id"] for r in recs] == list(range(25))
    for r in recs:
        assert len(r["text"]) == 30 and r["temperature"] == 0.7 and r["top_p"] == 0.9 and r["seed"] == 5
        assert r["top_k"] == 0 and r["model"].endswith("model")
        assert len(r["prompt"]) == (20 if preset == "seed-small" else 100)  # corpus seeds: window / 100 chars
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 25 and manifest["total_chars"] == 750 and len(manifest["shards"]) == 3
    import hashlib

    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert manifest["model"]["sha256"] and manifest["parameters"]["length"] == 30
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 25 and summary["chars"] == 750


def test_resume_skips_complete_shards_and_regenerates_identically(models, tmp_path):
    out = tmp_path / "gen"
    args = ("--model", models["default"], "--output", str(out), "--num-samples", "30", "--length", "20",
            "--shard-size", "10", "--seed", "3")
    assert generate(*args).returncode == 0
    first = {p.name: p.read_bytes() for p in (out / "samples").iterdir()}
    (out / "samples" / "part-00001.jsonl.gz").unlink()  # as if the job died before this shard
    (out / "manifest.json").unlink()
    proc = generate(*args)
    assert proc.returncode == 0, proc.stderr
    assert "resuming: 2 of 3 shards already complete" in proc.stdout
    assert {p.name: p.read_bytes() for p in (out / "samples").iterdir()} == first
    assert [r["id"] for r in records(out)] == list(range(30))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["generated_now"] == 10


def test_same_seed_same_bytes_whatever_the_batching(models, tmp_path):
    common = ("--model", models["default"], "--num-samples", "12", "--length", "25", "--shard-size", "6",
              "--seed", "11", "--temperature", "1.0")
    assert generate(*common, "--output", str(tmp_path / "a"), "--batch-size", "12").returncode == 0
    assert generate(*common, "--output", str(tmp_path / "b"), "--batch-size", "5").returncode == 0
    assert generate(*common, "--output", str(tmp_path / "x"), "--batch-size", "3", "--no-xla").returncode == 0
    for name in ("part-00000.jsonl.gz", "part-00001.jsonl.gz"):
        expected = (tmp_path / "a" / "samples" / name).read_bytes()
        for other in ("b", "x"):  # another batch (padded to 8: XLA), a plain graph instead of XLA
            assert (tmp_path / other / "samples" / name).read_bytes() == expected, other
    other = generate(*common[:-4], "--seed", "12", "--temperature", "1.0", "--output", str(tmp_path / "c"))
    assert other.returncode == 0 and records(tmp_path / "c") != records(tmp_path / "a")


def test_prompts_file_lines_and_jsonl_and_print(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('alice was\n{"prompt": "the queen"}\n"the cat"\n')
    out = tmp_path / "gen"
    proc = generate("--model", models["default"], "--output", str(out), "--num-samples", "4", "--length", "10",
                    "--prompts", str(prompts), "--temperature", "0", "--print")
    assert proc.returncode == 0, proc.stderr
    assert [r["prompt"] for r in records(out)] == ["alice was", "the queen", "the cat", "alice was"]
    texts = [r["text"] for r in records(out)]
    assert texts[0] == texts[3]  # greedy: same prompt, same continuation
    assert all(r["prompt"] + r["text"] in proc.stdout for r in records(out))


def test_tutorial_generation_is_one_command(models, tmp_path):
    proc = generate("--model", models["seed-small"], "--output", str(tmp_path / "g"), "--num-samples", "1",
                    "--length", "50", "--temperature", "0", "--print")
    assert proc.returncode == 0, proc.stderr
    rec = records(tmp_path / "g")[0]
    assert rec["prompt"] + rec["text"] in proc.stdout and len(rec["text"]) == 50


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--temperature", "inf"], "--temperature must be >= 0 and finite"),
        (["--temperature", "nan"], "--temperature must be >= 0 and finite"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "-2"], "--top-k must be >= 0"),
        (["--length", "0"], "--length must be >= 1"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--prompt", "alice \u00e9\u00e8 #"], "outside the model's vocabulary: '#', '\u00e8', '\u00e9'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path, flags, fragment):
    out = tmp_path / "gen"
    proc = generate("--model", models["default"], "--output", str(out), *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert fragment in proc.stderr and proc.stderr.strip().startswith("error:")
    assert not out.exists()


def test_unknown_chars_can_be_skipped(models, tmp_path):
    out = tmp_path / "gen"
    proc = generate("--model", models["default"], "--output", str(out), "--prompt", "alice#", "--length", "5",
                    "--unknown-chars", "skip")
    assert proc.returncode == 0, proc.stderr
    assert records(out)[0]["prompt"] == "alice"


def test_missing_model_and_foreign_vocab(models, tmp_path):
    proc = generate("--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "g"))
    assert proc.returncode == 2 and "no exported model" in proc.stderr
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["default"], broken)
    (broken / "model" / "vocab.json").write_text(json.dumps({"chars": list("abc")}))
    proc = generate("--model", str(broken), "--output", str(tmp_path / "g"))
    assert proc.returncode == 2 and "does not belong to this model" in proc.stderr
    assert not (tmp_path / "g").exists()


def test_other_settings_into_the_same_output_are_refused(models, tmp_path):
    out = tmp_path / "gen"
    base = ("--model", models["default"], "--output", str(out), "--num-samples", "3", "--length", "5")
    assert generate(*base, "--seed", "1").returncode == 0
    proc = generate(*base, "--seed", "2")
    assert proc.returncode == 2 and "other settings" in proc.stderr


def test_corpus_seeds_from_a_memory_mapped_dataset_match_the_text_ones(tmp_path):
    from job.data import prompts
    from job.data.corpus import Vocab

    text = textgen.story(3000, seed=9)
    vocab = Vocab.from_text(text)
    path = tmp_path / "train.bin"
    vocab.encode(text).astype(np.uint8).tofile(path)
    ids = np.memmap(path, dtype=np.uint8, mode="r")
    assert prompts.corpus_seed_ids(ids, vocab, 7, 100, seed=3) == prompts.corpus_seeds(text, 7, 100, seed=3)


def test_progress_line_without_a_terminal():
    from job.generate import progress_line

    line = progress_line(3000, 10000, 1_500_000, 30.0, fresh=2000)
    assert line == "generated 3,000/10,000 samples (30%)  50,000 chars/s  elapsed 0:30  eta 1:45"
