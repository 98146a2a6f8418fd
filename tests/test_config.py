"""Flags, presets and config files."""

import json
import re

import pytest

from job.core.config import PRESETS, TrainConfig
from job.core.errors import UserError
from job.train import load_train_config

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
        (["--num-workers", "1-2", "--elastic-resize-seconds", "0.5"], "--elastic-resize-seconds must be >= 1"),
    ],
)
def test_invalid_numbers(flags, message):
    with pytest.raises(UserError, match=message):
        load_train_config(BASE + flags)


def test_output_required():
    with pytest.raises(UserError, match="--output is required"):
        load_train_config(["--corpus", "x"])


@pytest.mark.parametrize(("text", "error"), [
    ("epochs: [1,\n", "not valid YAML/JSON"),
    ("epochz: 3\n", "unknown setting 'epochz'"),
    ("epochs: many\n", "epochs has an invalid value"),
    ("preset: huge\n", "unknown preset 'huge'"),
    # Every setting with choices, checked from its declaration (a flag's value argparse checks itself).
    ("select_by: best\n", r"unknown select_by 'best'; choose one of: val_loss, train_loss"),
    ("input_dropout_unit: word\n", "unknown input_dropout_unit 'word'; choose one of: char, feature"),
    ("placement_strategy: pack\n", "unknown placement_strategy 'pack'; choose one of: PACK, SPREAD"),
    ("precision: fp8\n", "unknown precision 'fp8'"),
])
def test_config_file_errors(tmp_path, text, error):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(UserError, match=error):
        load_train_config(BASE + ["--config", str(bad)])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="cannot read config file|no such|not found"):
        load_train_config(BASE + ["--config", str(tmp_path / "missing.yaml")])


def test_every_preset_validates():
    for name in PRESETS:
        assert load_train_config(BASE + ["--preset", name]).preset == name


@pytest.mark.parametrize(
    "flags, counts, global_batch",
    [
        (["--num-workers", "2", "--batch-size", "4"], [2], 8),
        (["--num-workers", "1-2", "--batch-size", "4"], [1, 2], 8),  # global = per-worker x the largest count
        (["--num-workers", "2-4", "--global-batch-size", "24"], [2, 3, 4], 24),
        (["--num-workers", "3-3", "--batch-size", "4"], [3], 12),  # a one-count range is a fixed group
    ],
)
def test_worker_ranges_and_the_global_batch(flags, counts, global_batch):
    cfg = load_train_config(BASE + flags)
    assert list(cfg.worker_counts) == counts and cfg.global_batch == global_batch
    assert cfg.elastic == (len(counts) > 1)


def test_elastic_range_from_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_workers: 1-4\nglobal_batch_size: 12\n")
    cfg = load_train_config(BASE + ["--config", str(path)])
    assert (cfg.min_workers, cfg.num_workers, cfg.global_batch) == (1, 4, 12)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-workers", "1-3", "--global-batch-size", "8"],
         r"global batch 8 cannot be split evenly over 3 workers \(--num-workers 1-3\).*\(e\.g\. 12\)"),
        (["--num-workers", "2-4", "--batch-size", "5"], r"global batch 20 cannot be split evenly over 3 workers"),
        (["--num-workers", "0-2"], r"needs 1 <= MIN <= MAX \(got 0-2\)"),
        (["--num-workers", "3-2"], r"needs 1 <= MIN <= MAX \(got 3-2\)"),
        (["--num-workers", "two"], r"takes N or MIN-MAX"),
        (["--placement-strategy", "RANDOM"], r"invalid choice"),
    ],
)
def test_worker_ranges_that_cannot_work_are_refused_with_one_line(flags, message, capsys):
    try:
        load_train_config(BASE + flags)
    except SystemExit:  # argparse's own refusal (choices)
        assert re.search(message, capsys.readouterr().err)
        return
    except UserError as exc:
        assert re.search(message, str(exc)) and "\n" not in str(exc)
        return
    raise AssertionError(f"{flags} was accepted")


def test_a_resume_may_change_the_worker_count_but_not_the_global_batch():
    from job.training.session import resume_mismatches

    saved = load_train_config(BASE + ["--num-workers", "2", "--batch-size", "4"]).to_dict()
    same = load_train_config(BASE + ["--num-workers", "1", "--global-batch-size", "8"])
    assert resume_mismatches(saved, same) == []
    elastic = load_train_config(BASE + ["--num-workers", "1-2", "--global-batch-size", "8"])
    assert resume_mismatches(saved, elastic) == []
    other = load_train_config(BASE + ["--num-workers", "1", "--batch-size", "4"])
    assert resume_mismatches(saved, other) == ["global batch 8 -> 4 (pass --global-batch-size 8 to resume on "
                                               "another number of workers)"]
    # Checkpoints written before --global-batch-size existed carry batch_size x num_workers only.
    old = {k: v for k, v in saved.items() if k not in ("global_batch_size", "min_workers")}
    assert resume_mismatches(old, same) == []


def test_a_resume_keeps_the_weight_average_on_or_off_but_may_change_its_momentum():
    from job.training.session import resume_mismatches

    saved = load_train_config(BASE).to_dict()  # the default preset: average on (0.99)
    assert resume_mismatches(saved, load_train_config(BASE + ["--weight-average", "0.995"])) == []
    assert resume_mismatches(saved, load_train_config(BASE + ["--weight-average", "0"])) == [
        "weight_average 0.99 -> 0 (pass --weight-average 0.99 to resume)"]
    before = {k: v for k, v in saved.items() if k != "weight_average"}  # a checkpoint from before the setting
    assert resume_mismatches(before, load_train_config(BASE)) == [
        "weight_average 0 -> 0.99 (pass --weight-average 0 to resume)"]


def test_the_dataclass_defaults_are_the_default_preset():
    """One truth: a TrainConfig built without a preset is the `default` preset."""
    from dataclasses import fields


    plain = TrainConfig()
    assert {k: getattr(plain, k) for k in PRESETS["default"]} == PRESETS["default"]
    assert load_train_config(BASE).to_dict() == {**TrainConfig(output="/tmp/out", corpus="x.txt").to_dict()}
    assert {f.name for f in fields(TrainConfig)} >= set().union(*PRESETS.values())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_help_shows_the_default_each_preset_gives(preset, capsys):
    with pytest.raises(SystemExit):
        load_train_config(["--preset", preset, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    values = {**TrainConfig().to_dict(), **PRESETS[preset]}
    assert f"--seq-len SEQ_LEN Window length in characters (the tutorial: 100). [{preset}: {values['seq_len']}]" in text
    assert f"[{preset}: {values['batch_size']}]" in text and f"[{preset}: {values['epochs']}]" in text


def test_every_setting_is_a_flag_generated_from_the_schema():
    """One schema: each TrainConfig field is a flag (min_workers comes from --num-workers MIN-MAX), typed as the
    field, and a flag given wins over the preset."""
    from dataclasses import fields

    from job.core.config import train_parser

    flags = {a.dest for a in train_parser()._actions}
    assert {f.name for f in fields(TrainConfig)} - flags == {"min_workers"}
    cfg = load_train_config(BASE + ["--units", "32", "16", "--no-stateful", "--target", "last", "--dropout", "0.1",
                                    "--learning-rate", "0.01", "--preset", "gpu", "--steps-per-call", "2"])
    assert cfg.units == [32, 16] and cfg.stateful is False and cfg.target == "last" and cfg.dropout == 0.1
    assert cfg.learning_rate == 0.01 and cfg.embed_dim == PRESETS["gpu"]["embed_dim"] and cfg.steps_per_call == 2
    with pytest.raises(SystemExit):
        load_train_config(BASE + ["--units", "many"])


def test_generation_flags_come_from_its_schema_too(capsys):
    from dataclasses import fields

    from job.generation.settings import GenerateConfig, load_generate_config, parser

    assert {f.name for f in fields(GenerateConfig)} <= {a.dest for a in parser()._actions}
    cfg = load_generate_config(["--model", "m", "--output", "o", "--no-xla", "--print", "--top-k", "5"])
    assert (cfg.xla, cfg.print_samples, cfg.top_k, cfg.length) == (False, True, 5, GenerateConfig().length)
    with pytest.raises(UserError, match="give --prompt or --prompts, not both"):
        load_generate_config(["--model", "m", "--output", "o", "--prompt", "a", "--prompts", "p.txt"])
    with pytest.raises(SystemExit):
        load_generate_config(["--output", "o"])  # --model is required
    assert "--model" in capsys.readouterr().err
