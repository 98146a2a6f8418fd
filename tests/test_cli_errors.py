"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written to --output."""

from pathlib import Path

import pytest
from logcheck import assert_user_error, run


def corpus_file(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is empty"),
        (b"   \n\n\t  \n", "is empty"),
        (b"short text\n" * 3, "shorter than one batch"),
        (b"caf\xe9 au lait\n" * 500, "is not UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 100, "looks binary"),
    ],
    ids=["empty", "whitespace", "too-short", "latin1", "binary"],
)
def test_bad_corpus(tmp_path, content, fragment):
    out = tmp_path / "out"
    proc = run("job.train", "--corpus", corpus_file(tmp_path, content), "--output", str(out), "--in-process")
    assert_user_error(proc, fragment)
    assert not out.exists()


def test_missing_corpus(tmp_path):
    out = tmp_path / "out"
    proc = run("job.train", "--corpus", str(tmp_path / "nope.txt"), "--output", str(out), "--in-process")
    assert_user_error(proc, "nope.txt")
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--val-fraction", "0.9"], "--val-fraction must be in (0, 0.5]"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--preset", "giant"], "invalid choice: 'giant'"),
    ],
)
def test_bad_numbers_and_names(tmp_path, flags, fragment):
    out = tmp_path / "out"
    proc = run("job.train", "--corpus", corpus_file(tmp_path, b"hello world\n" * 500), "--output", str(out),
               "--in-process", *flags)
    assert_user_error(proc, fragment)
    assert not out.exists()


def test_malformed_config_file(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: [3\n")
    out = tmp_path / "out"
    proc = run("job.train", "--corpus", corpus_file(tmp_path, b"hello world\n" * 500), "--output", str(out),
               "--config", str(cfg))
    assert_user_error(proc, "not valid YAML/JSON")
    assert not out.exists()


def test_evaluate_without_model(tmp_path):
    proc = run("job.evaluate", "--model", str(tmp_path), "--corpus", corpus_file(tmp_path, b"abc\n" * 100))
    assert_user_error(proc, "no exported model")


def test_help_explains_every_flag():
    proc = run("job.train", "--help")
    assert proc.returncode == 0
    for flag in ("--corpus", "--output", "--preset", "--epochs", "--max-minutes", "--seq-len", "--batch-size",
                 "--val-fraction", "--keep-case", "--seed", "--config", "--num-workers", "--use-gpu",
                 "--cpus-per-worker", "--run-name", "--max-failures", "--checkpoint-every-steps", "--precision"):
        assert flag in proc.stdout
