"""Promises of docs/reliability.md that no other test held to: a resume may change none of the settings that shape the
model or its data (each one refused, by name), a checkpoint counts only once complete, and a model whose file does
not match its config.json checksum is refused in one line, before anything is written (library and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from job.core.config import PRESETS, TrainConfig
from job.core.errors import UserError
from job.data.corpus import Vocab
from job.model import export
from job.model.checkpoint import PROGRESS, VARIABLES
from job.training.session import RESUME_KEYS, complete_checkpoints, resume_mismatches

BASE = {**PRESETS["default"], "preset": "default", "corpus": "/data/books/", "output": "/runs/a"}
# Another value for each setting a resume may not change (the dataset URL has its own setting, --dataset).
OTHER = {"preset": "seed-small", "input_mode": "scaled", "embed_dim": 32, "units": [128], "target": "last",
         "stateful": False, "seq_len": 64, "keep_case": True, "val_fraction": 0.2, "min_char_count": 3,
         "skip_bad_files": True, "corpus": "/data/other/", "dataset": "/data/prepared", "init_from": "/runs/parent",
         "vocab_from_init": True}


def test_every_setting_a_resume_may_not_change_is_refused_by_name():
    assert set(OTHER) == set(RESUME_KEYS)
    saved = TrainConfig(**BASE).to_dict()
    for key, value in OTHER.items():
        cfg = TrainConfig(**{**BASE, key: value})
        diffs = resume_mismatches(saved, cfg)
        assert [d.split(" ", 1)[0] for d in diffs] == [key], (key, diffs)
        assert diffs[0] == f"{key} {saved[key]!r} -> {cfg.to_dict()[key]!r}"
    # What may change on resume: the length of the run, the budget, the worker count at the same global batch.
    free = TrainConfig(**{**BASE, "epochs": 7, "max_minutes": 5.0, "checkpoint_every_steps": 10})
    assert resume_mismatches(saved, free) == []


def _checkpoint(root: Path, step: int, files: tuple[str, ...]) -> None:
    folder = root / f"checkpoint_{step:09d}"
    folder.mkdir(parents=True)
    for name in files:
        content = json.dumps({"progress": {"global_step": step}}) if name == PROGRESS else "x"
        (folder / name).write_text(content)


def test_a_checkpoint_counts_only_once_complete(tmp_path):
    _checkpoint(tmp_path, 10, (VARIABLES, PROGRESS))
    _checkpoint(tmp_path, 20, (VARIABLES,))  # the upload stopped before progress.json
    _checkpoint(tmp_path, 30, (PROGRESS,))  # variables.npz never arrived
    (tmp_path / "checkpoint_000000040").mkdir()
    (tmp_path / "checkpoint_000000040" / PROGRESS).write_text("{not json")  # torn write
    (tmp_path / "checkpoint_000000040" / VARIABLES).write_text("x")
    assert [step for step, _ in complete_checkpoints(str(tmp_path))] == [10]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from job.model import model as model_lib

    cfg = TrainConfig(**{**BASE, "units": [8], "embed_dim": 4})
    vocab = Vocab(tuple("abc "), False)
    folder = tmp_path_factory.mktemp("model") / "model"
    export.save(model_lib.build(cfg, len(vocab)), vocab, {**cfg.to_dict(), "epoch": 1}, str(folder))
    return folder


def test_a_model_that_does_not_match_its_checksum_is_refused(exported, tmp_path):
    assert export.load(str(exported)).vocab.chars == tuple("abc ")
    damaged = tmp_path / "model"
    damaged.mkdir()
    for name in (export.MODEL_FILE, export.VOCAB_FILE, export.CONFIG_FILE):
        (damaged / name).write_bytes((exported / name).read_bytes())
    blob = bytearray((damaged / export.MODEL_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (damaged / export.MODEL_FILE).write_bytes(bytes(blob))
    with pytest.raises(UserError, match=r"model.keras does not match its config.json checksum"):
        export.load(str(damaged))
    # The CLI: one line, exit 2, nothing written.
    out = tmp_path / "gen"
    run = subprocess.run([sys.executable, "-m", "job.generate", "--model", str(damaged), "--output", str(out),
                          "--num-samples", "2", "--length", "5", "--prompt", "ab"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not match its config.json checksum" in lines[0], run.stderr[-2000:]
    # Nothing written: an output.json naming the damaged file's checksum would refuse the repaired model later.
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
