"""Resuming into an --output whose run was made with other settings is refused before anything is written:
one line naming the differing settings and how to start fresh; the output stays byte-identical."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import TINY

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job.train", "--in-process", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ) -> tuple[Path, Path, Path]:
    import textgen

    tmp = tmp_path_factory.mktemp("mix")
    corpus, config, out = tmp / "corpus.txt", tmp / "tiny.yaml", tmp / "out"
    corpus.write_text(textgen.book(5000, seed=4))
    config.write_text(yaml.safe_dump(TINY))
    proc = _train("--corpus", str(corpus), "--output", str(out), "--config", str(config), "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return corpus, config, out


@pytest.mark.parametrize(("change", "named"), [
    (["--preset", "seed-small"], "preset 'default' -> 'seed-small'"),
    (["--seq-len", "30"], "seq_len 20 -> 30"),
    (["--batch-size", "8"], "global batch 4 -> 8"),
    (["--keep-case"], "keep_case False -> True"),
], ids=["preset", "seq-len", "global-batch", "case"])
def test_other_settings_are_refused_and_the_output_is_untouched(first_run, change, named):
    corpus, config, out = first_run
    before = _snapshot(out)
    proc = _train("--corpus", str(corpus), "--output", str(out), "--config", str(config), "--epochs", "2", *change)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert named in errors[0] and "already holds run 'run'" in errors[0] and "another --output" in errors[0]
    assert _snapshot(out) == before


def test_a_changed_corpus_is_refused(first_run, tmp_path):
    corpus, config, out = first_run
    before = _snapshot(out)
    original = corpus.read_bytes()
    try:
        corpus.write_bytes(original + b"\nOne more line that was not there.\n")
        proc = _train("--corpus", str(corpus), "--output", str(out), "--config", str(config), "--epochs", "2")
    finally:
        corpus.write_bytes(original)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the files of corpus {corpus} changed" in proc.stderr
    assert _snapshot(out) == before


def test_another_run_name_is_refused_and_a_new_output_starts_fresh(first_run, tmp_path):
    corpus, config, out = first_run
    before = _snapshot(out)
    other = _train("--corpus", str(corpus), "--output", str(out), "--config", str(config), "--epochs", "1",
                   "--preset", "seed-small", "--run-name", "other")
    assert other.returncode == 2, other.stderr[-3000:]
    assert f"{out} already holds run 'run'; a run 'other' there would overwrite" in other.stderr
    assert _snapshot(out) == before
    fresh = _train("--corpus", str(corpus), "--output", str(tmp_path / "new"), "--config", str(config), "--epochs",
                   "1", "--preset", "seed-small", "--run-name", "other")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resumed" not in fresh.stdout
