"""Flags, presets and config files."""

import json

import pytest

from job.config import PRESETS, load_train_config
from job.errors import UserError

BASE = ["--output", "/tmp/out", "--corpus", "x.txt"]


def test_presets_are_the_tutorial_models():
    small = load_train_config(BASE + ["--preset", "seed-small"])
    assert (small.units, small.dropout, small.batch_size, small.epochs, small.target) == ([256], 0.2, 128, 20, "last")
    assert small.input_mode == "scaled" and small.select_by == "train_loss"
    large = load_train_config(BASE + ["--preset", "seed-large"])
    assert (large.units, large.batch_size, large.epochs) == ([256, 256], 64, 50)
    default = load_train_config(BASE)
    assert default.preset == "default" and default.target == "all" and default.stateful
    assert default.clip_norm > 0 and default.input_mode == "embedding"


def test_precedence_preset_file_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("preset: seed-large\nbatch-size: 7\nepochs: 3\nseq_len: 40\n")
    cfg = load_train_config(BASE + ["--config", str(cfg_file), "--epochs", "5"])
    assert cfg.preset == "seed-large" and cfg.batch_size == 7 and cfg.seq_len == 40 and cfg.epochs == 5
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"units": [32, 16], "dropout": 0.1}))
    cfg = load_train_config(BASE + ["--config", str(json_file)])
    assert cfg.units == [32, 16] and cfg.dropout == 0.1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--val-fraction", "0"], "--val-fraction must be in"),
        (["--val-fraction", "0.6"], "--val-fraction must be in"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-minutes", "-1"], "--max-minutes"),
        (["--num-workers", "0"], "--num-workers"),
        (["--in-process", "--num-workers", "2"], "--in-process"),
    ],
)
def test_invalid_numbers(flags, message):
    with pytest.raises(UserError, match=message):
        load_train_config(BASE + flags)


def test_output_required():
    with pytest.raises(UserError, match="--output is required"):
        load_train_config(["--corpus", "x"])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(UserError, match="not valid YAML/JSON"):
        load_train_config(BASE + ["--config", str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochz: 3\n")
    with pytest.raises(UserError, match="unknown setting 'epochz'"):
        load_train_config(BASE + ["--config", str(unknown)])
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("epochs: many\n")
    with pytest.raises(UserError, match="epochs has an invalid value"):
        load_train_config(BASE + ["--config", str(wrong_type)])
    preset = tmp_path / "preset.yaml"
    preset.write_text("preset: huge\n")
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        load_train_config(BASE + ["--config", str(preset)])
    with pytest.raises(UserError, match="cannot read config file|no such|not found"):
        load_train_config(BASE + ["--config", str(tmp_path / "missing.yaml")])


def test_every_preset_validates():
    for name in PRESETS:
        assert load_train_config(BASE + ["--preset", name]).preset == name
