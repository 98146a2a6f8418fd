"""Typed training configuration, presets, and the `python -m job.train` flag parser.

Precedence: preset defaults < config file (YAML or JSON) < command-line flags (merged by job.train.load_train_config,
which also reads a fine-tuning parent's settings).
TensorFlow-free so that parsing and validation test in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from job.core import schema, storage
from job.core.errors import UserError

# Project Gutenberg book 11, plain-text UTF-8 (the tutorial's corpus).
DEFAULT_CORPUS_URL = "https://www.gutenberg.org/cache/epub/11/pg11.txt"

PRESETS: dict[str, dict[str, Any]] = {
    # The tutorial's first model, exactly: scaled-integer input, one LSTM, last-character target.
    "seed-small": dict(
        input_mode="scaled", units=[256], dropout=0.2, target="last", stateful=False,
        batch_size=128, epochs=20, seq_len=100, learning_rate=1e-3, clip_norm=0.0,
        embed_dim=0, select_by="train_loss", weight_average=0.0,
    ),
    # The tutorial's second model: two stacked LSTMs with dropout after each.
    "seed-large": dict(
        input_mode="scaled", units=[256, 256], dropout=0.2, target="last", stateful=False,
        batch_size=64, epochs=50, seq_len=100, learning_rate=1e-3, clip_norm=0.0,
        embed_dim=0, select_by="train_loss", weight_average=0.0,
    ),
    # Ours: embedding input, stacked cuDNN-eligible LSTMs, loss on every position, stateful
    # truncated back-propagation over consecutive 50-char windows (char-rnn style: the state is carried
    # across windows, so it stays sound when generation carries it far beyond one window), dropout of whole
    # input characters and of LSTM outputs, AdamW, learning rate halved after 3 epochs without held-out improvement and
    # cosine-annealed over the last 30% of the run (by time budget or steps); evaluated and exported as an
    # exponential moving average of the weights (momentum 0.99 per step).
    # Sized for the 2-core benchmark (about 1/50 of the tutorial's FLOPs per predicted character, tuned
    # on Alice: see README); on GPUs pass bigger `units` in a --config file.
    "default": dict(
        input_mode="embedding", units=[192, 192], dropout=0.35, input_dropout=0.1, input_dropout_unit="char",
        target="all", stateful=True,
        batch_size=64, epochs=100, seq_len=50, learning_rate=6e-3, clip_norm=5.0, weight_decay=0.1,
        lr_decay=0.5, lr_patience=3, lr_anneal=0.3, embed_dim=64, select_by="val_loss", weight_average=0.99,
    ),
    # One modern data-centre GPU per worker (A100/H100 class): the default preset's recipe at the size the
    # README's on-paper sizing gives for a GPU (~12.8M parameters; 256 x 100-char windows = 25,600 predicted
    # characters per worker step keeps the cuDNN LSTM kernel busy). Meant for corpora of hundreds of MB and
    # more, hence less dropout. cuDNN-eligible (tests/test_model.py); --precision mixed_bfloat16 is optional.
    "gpu": dict(
        input_mode="embedding", units=[1024, 1024], dropout=0.2, input_dropout=0.0, input_dropout_unit="char",
        target="all", stateful=True,
        batch_size=256, epochs=20, seq_len=100, learning_rate=2e-3, clip_norm=5.0, weight_decay=0.1,
        lr_decay=0.5, lr_patience=2, lr_anneal=0.3, embed_dim=128, select_by="val_loss",
        eval_every_steps=2000, checkpoint_every_steps=500, weight_average=0.0,
    ),
}

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# A run name is one path segment: it names checkpoints/<name>/ and tensorboard/<name>/ inside --output.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


# The field defaults below are these values, written once here.
_DEFAULT = PRESETS["default"]

DATA, MODEL, TRAINING, JOB = "corpus and data", "model (the preset sets these)", "training", \
    "distributed job (Ray Train) and outputs"


def setting(default: Any, help: str, group: str = TRAINING, **kwargs: Any) -> Any:  # noqa: A002 - argparse's name
    """job.core.schema.setting, in the "training" group unless another is named."""
    return schema.setting(default, help, group, **kwargs)


@dataclass
class TrainConfig:
    """Everything one training run needs; passed unchanged to every Ray worker. The one schema of the settings:
    the flags of `python -m job.train`, their help and defaults, type coercion of config files and the export
    list all come from these fields. The defaults are the `default` preset's (read from PRESETS, written there once);
    a preset overrides some of them. `fixed` marks what a resumed run may not change."""

    corpus: str = setting(DEFAULT_CORPUS_URL, "UTF-8 text: a file, a folder / prefix (every file below it, "
                          "sorted) or a glob (s3://bucket/books/*.txt); s3://, https://, file:// or a local path. "
                          "Default: Alice in Wonderland on Project Gutenberg.", DATA, fixed=True)
    output: str = setting("", "Where results go: local folder or s3://bucket/prefix (required).", JOB)
    dataset: str | None = setting(None, "Prepared dataset URL (python -m job.prepare); default <output>/data. "
                                  "Prepared there from --corpus unless it already holds one for the same files "
                                  "and options.", DATA, fixed=True)
    min_char_count: int | None = setting(None, "Characters seen fewer times map to one unknown id that generation "
                                         "never emits (default: auto, 1 per 10M corpus chars: small corpora keep "
                                         "every char).", DATA, fixed=True)
    skip_bad_files: bool = setting(False, "Skip (and count) empty, binary or non-UTF-8 files of a many-file corpus "
                                   "instead of failing.", DATA, fixed=True)
    val_fraction: float = setting(0.1, "Held-out fraction: the last part of each cleaned file.", DATA, export=True,
                                  fixed=True)
    keep_case: bool = setting(False, "Keep upper case (default: lowercase, as the tutorial does).", DATA,
                              export=True, fixed=True)
    init_from: str | None = setting(None, "Fine-tune: start from this trained model (a training --output, its "
                                     "model/ folder, or one checkpoint folder; s3:// or local) in a new --output. Its "
                                     "vocabulary comes first (new characters are appended), its settings are the "
                                     "defaults, and the learning rate is its own / 2 with --lr-patience 1 unless "
                                     "given.", DATA, fixed=True)
    vocab_from_init: bool = setting(False, "With --init-from: characters the parent lacks map to the unknown id "
                                    "instead of being appended (the model's size stays the parent's).", DATA,
                                    fixed=True)
    preset: str = setting("default", "Model preset: seed-small / seed-large reproduce the tutorial's two models; "
                          "default is our stateful stacked LSTM, gpu the same sized for one GPU per worker "
                          "(default: default).", MODEL, choices=tuple(PRESETS), export=True, fixed=True)
    input_mode: str = setting(_DEFAULT["input_mode"], "Input: learned embedding of ids, or the tutorial's id / "
                              "vocab size.", MODEL, choices=("embedding", "scaled"), export=True, fixed=True)
    embed_dim: int = setting(_DEFAULT["embed_dim"], "Embedding width (input_mode embedding).", MODEL, export=True,
                             fixed=True)
    units: list[int] = setting(_DEFAULT["units"], "LSTM sizes, one per layer.", MODEL, export=True, fixed=True)
    dropout: float = setting(_DEFAULT["dropout"], "Dropout after each LSTM.", MODEL, export=True)
    input_dropout: float = setting(_DEFAULT["input_dropout"], "Dropout on the embeddings fed to the first LSTM "
                                   "(input_mode embedding).", MODEL, export=True)
    input_dropout_unit: str = setting(_DEFAULT["input_dropout_unit"], "What --input-dropout drops: whole input "
                                      "characters (the embedding vector of a position zeroed: the model must "
                                      "predict from context with characters missing) or single embedding "
                                      "features.", MODEL,
                                      choices=("char", "feature"), export=True)
    target: str = setting(_DEFAULT["target"], "Loss on every position of a window, or on its last character (the "
                          "tutorial).", MODEL, choices=("all", "last"), export=True, fixed=True)
    stateful: bool = setting(_DEFAULT["stateful"], "Carry LSTM states across consecutive windows (char-rnn's "
                             "layout; target all).", MODEL, export=True, fixed=True)
    seq_len: int = setting(_DEFAULT["seq_len"], "Window length in characters (the tutorial: 100).", MODEL,
                           export=True, fixed=True)
    batch_size: int = setting(_DEFAULT["batch_size"], "Per-worker batch size (global batch = this x workers, unless "
                              "--global-batch-size is given).", TRAINING, export=True)
    epochs: int = setting(_DEFAULT["epochs"], "Passes over the training text.")
    max_minutes: float | None = setting(None, "Wall-clock budget; stops cleanly after the step that crosses it, "
                                        "keeping the best model (default: none).")
    learning_rate: float = setting(_DEFAULT["learning_rate"], "Adam(W) learning rate.", export=True)
    clip_norm: float = setting(_DEFAULT["clip_norm"], "Clip the global gradient norm to this (0: off).", export=True)
    weight_decay: float = setting(_DEFAULT["weight_decay"], "Decoupled (AdamW) weight decay, biases excluded "
                                  "(0: Adam).", export=True)
    lr_decay: float = setting(_DEFAULT["lr_decay"], "Multiply the learning rate by this after --lr-patience epochs "
                              "without improvement (1: never).", export=True)
    lr_patience: int = setting(_DEFAULT["lr_patience"], "Epochs without improvement before --lr-decay.", export=True)
    lr_anneal: float = setting(_DEFAULT["lr_anneal"], "Fraction of the run (by --max-minutes or by steps, whichever "
                               "ends it first) over which the learning rate is cosine-annealed to zero (0: off).",
                               export=True)
    weight_average: float = setting(_DEFAULT["weight_average"], "Evaluate and export an exponential moving average "
                                    "of the weights with this momentum per optimizer step (0: off; e.g. 0.99 "
                                    "averages ~100 steps).",
                                    export=True)
    select_by: str = setting(_DEFAULT["select_by"], "Which loss picks the exported model.",
                             choices=("val_loss", "train_loss"))
    seed: int = setting(0, "Random seed for weights, shuffling and dropout.", export=True)
    precision: str = setting("float32", "float32, or mixed_float16 / mixed_bfloat16 on GPUs.", choices=PRECISIONS,
                             export=True)
    steps_per_call: int = setting(4, "Optimizer steps inside one compiled call (fewer Python round trips; speed "
                                  "only).")
    sample_chars: int = setting(300, "Characters of the sample written at each evaluation.", JOB)
    val_max_windows: int = setting(2000, "Held-out windows scored per evaluation for last-character presets "
                                   "(job.evaluate scores them all).", JOB)
    val_max_chars: int = setting(1_000_000, "Held-out characters scored per evaluation: an even, fixed subset "
                                 "(job.evaluate scores them all).", JOB)
    eval_every_steps: int = setting(0, "Also evaluate, write outputs and checkpoint every N optimizer steps "
                                    "(0: at epoch ends only).", JOB)
    log_every_seconds: float = setting(30.0, "Progress line (step, loss, chars/s, ETA) at most every N seconds "
                                       "(0: off).", JOB)
    # An elastic run (--num-workers MIN-MAX) trains on as many workers as the cluster has, between min_workers
    # and num_workers; min_workers 0 means a fixed num_workers.
    num_workers: int = setting(1, "Ray Train workers: N, or MIN-MAX for an elastic run that trains on what the "
                               "cluster has and grows back when nodes join.", JOB, type=str)
    min_workers: int = setting(0, "", JOB, flag=False)
    global_batch_size: int = setting(0, "Windows per optimizer step over all workers, fixed whatever the worker "
                                     "count (default: --batch-size x the largest worker count).", JOB)
    use_gpu: bool = setting(False, "One GPU per worker.", JOB)
    cpus_per_worker: float = setting(1.0, "CPUs reserved per worker (and its TensorFlow threads).", JOB)
    cpu_threads: int = setting(0, "TensorFlow compute threads per worker on CPU (0: auto: 1 where each LSTM "
                               "step is small, as in the default preset (measured faster on 2 cores), else the "
                               "CPUs reserved, or every core in-process).", JOB)
    placement_strategy: str = setting("PACK", "Where Ray puts the workers: PACK fills nodes, SPREAD one per node "
                                      "if it can.", JOB, choices=PLACEMENTS)
    capacity_wait_minutes: float | None = setting(None, "Minutes to wait for the cluster to grow to fit the "
                                                  "workers (default: 15 where Ray's autoscaler v2 runs, else 0: a "
                                                  "cluster that cannot fit them is refused at once).", JOB)
    elastic_resize_seconds: float = setting(60.0, "With --num-workers MIN-MAX: how often a run on fewer than MAX "
                                            "workers looks for more nodes to grow onto (each growth restarts the "
                                            "workers from the newest checkpoint).", JOB)
    run_name: str | None = setting(None, "Run name, one name of letters, digits, '-', '_', '.' (default: run): "
                                   "checkpoints go to <output>/checkpoints/<name>/; re-submitting the same name and "
                                   "--output resumes the run, with the same settings (an --output holds one run).",
                                   JOB)
    max_failures: int = setting(3, "Worker-group restarts allowed before failing.", JOB)
    checkpoint_every_steps: int = setting(0, "Also checkpoint every N optimizer steps (0: only at evaluations).",
                                          JOB)
    checkpoints_to_keep: int = setting(2, "Checkpoints kept in storage (Ray's num_to_keep, ranked by held-out "
                                       "loss).", JOB)
    in_process: bool = setting(False, "Train in this process without Ray (one worker only); same outputs and "
                               "resume.", JOB)
    verbose: bool = setting(False, "Also show TensorFlow's C++ notices and Ray Train's INFO lines (default: "
                            "quiet).", JOB)

    @property
    def run(self) -> str:
        """The run's name: Ray's RunConfig name and the checkpoints/<name>/ folder resume looks in."""
        return self.run_name or "run"

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers

    @property
    def worker_counts(self) -> range:
        """Every number of workers the run may train on."""
        return range(self.min_workers if self.elastic else self.num_workers, self.num_workers + 1)

    @property
    def workers_text(self) -> str:
        return f"{self.min_workers}-{self.num_workers}" if self.elastic else str(self.num_workers)

    @property
    def global_batch(self) -> int:
        return self.global_batch_size or self.batch_size * self.num_workers

    @property
    def data_url(self) -> str:
        """Where the prepared dataset lives: --dataset, or <output>/data."""
        return self.dataset or storage.join(self.output, "data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def validate(self) -> TrainConfig:
        """Raise UserError naming the first invalid setting and how to fix it (check_settings)."""
        check_settings(self)
        return self


def check_settings(cfg: TrainConfig) -> None:
    """Raise UserError naming the first invalid setting and how to fix it: choices from their declaration, then
    the ranges and the combinations no single setting can say."""
    schema.check_choices(cfg, UserError)
    if not cfg.output:
        raise UserError("--output is required: a local folder or an s3:// prefix for the results")
    _check(cfg.epochs >= 1, f"--epochs must be >= 1 (got {cfg.epochs})")
    _check(0.0 < cfg.val_fraction <= 0.5, f"--val-fraction must be in (0, 0.5] (got {cfg.val_fraction})")
    _check(cfg.seq_len >= 2, f"--seq-len must be >= 2 (got {cfg.seq_len})")
    _check(cfg.batch_size >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})")
    _check(cfg.max_minutes is None or cfg.max_minutes > 0,
           f"--max-minutes must be > 0 (got {cfg.max_minutes})")
    _check(cfg.num_workers >= 1, f"--num-workers must be >= 1 (got {cfg.num_workers})")
    _check(0 <= cfg.min_workers <= cfg.num_workers,
           f"--num-workers MIN-MAX needs 1 <= MIN <= MAX (got {cfg.workers_text})")
    _check(cfg.capacity_wait_minutes is None or cfg.capacity_wait_minutes >= 0,
           f"--capacity-wait-minutes must be >= 0 (got {cfg.capacity_wait_minutes})")
    _check(cfg.elastic_resize_seconds >= 1,
           f"--elastic-resize-seconds must be >= 1 (got {cfg.elastic_resize_seconds:g})")
    _check(cfg.global_batch_size >= 0, f"--global-batch-size must be >= 0 (got {cfg.global_batch_size})")
    uneven = [n for n in cfg.worker_counts if cfg.global_batch % n]
    _check(not uneven, f"global batch {cfg.global_batch} cannot be split evenly over {uneven[0] if uneven else 0} "
           f"workers (--num-workers {cfg.workers_text}); choose a --global-batch-size that every worker count "
           f"in the range divides (e.g. {_lcm_multiple(cfg.global_batch, cfg.worker_counts)})")
    _check(cfg.cpus_per_worker > 0, f"--cpus-per-worker must be > 0 (got {cfg.cpus_per_worker})")
    _check(cfg.cpu_threads >= 0, f"--cpu-threads must be >= 0, 0 for auto (got {cfg.cpu_threads})")
    _check(cfg.max_failures >= 0, f"--max-failures must be >= 0 (got {cfg.max_failures})")
    _check(cfg.checkpoint_every_steps >= 0,
           f"--checkpoint-every-steps must be >= 0 (got {cfg.checkpoint_every_steps})")
    _check(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1) (got {cfg.dropout})")
    _check(cfg.learning_rate > 0, f"learning_rate must be > 0 (got {cfg.learning_rate})")
    _check(bool(cfg.units) and all(int(u) >= 1 for u in cfg.units),
           f"units must be a non-empty list of positive sizes (got {cfg.units})")
    _check(not (cfg.stateful and cfg.target != "all"), "stateful training needs target=all")
    _check(0.0 <= cfg.input_dropout < 1.0, f"input_dropout must be in [0, 1) (got {cfg.input_dropout})")
    _check(cfg.weight_decay >= 0, f"weight_decay must be >= 0 (got {cfg.weight_decay})")
    _check(0.0 < cfg.lr_decay <= 1.0, f"lr_decay must be in (0, 1] (got {cfg.lr_decay})")
    _check(0.0 <= cfg.lr_anneal <= 1.0, f"lr_anneal must be in [0, 1] (got {cfg.lr_anneal})")
    _check(0.0 <= cfg.weight_average < 1.0, f"--weight-average must be in [0, 1) (got {cfg.weight_average})")
    _check(cfg.lr_patience >= 1, f"lr_patience must be >= 1 (got {cfg.lr_patience})")
    _check(cfg.steps_per_call >= 1, f"steps_per_call must be >= 1 (got {cfg.steps_per_call})")
    _check(cfg.checkpoints_to_keep >= 1, "checkpoints_to_keep must be >= 1")
    _check(cfg.eval_every_steps >= 0, f"--eval-every-steps must be >= 0 (got {cfg.eval_every_steps})")
    _check(cfg.log_every_seconds >= 0, f"--log-every-seconds must be >= 0 (got {cfg.log_every_seconds})")
    _check(cfg.val_max_chars >= 100, f"--val-max-chars must be >= 100 (got {cfg.val_max_chars})")
    _check(cfg.min_char_count is None or cfg.min_char_count >= 1,
           f"--min-char-count must be >= 1 (got {cfg.min_char_count})")
    _check(not (cfg.in_process and cfg.num_workers > 1),
           "--in-process trains one worker; drop it or use --num-workers 1")
    _check(not (cfg.vocab_from_init and not cfg.init_from), "--vocab-from-init needs --init-from")
    _check(cfg.run_name is None or bool(RUN_NAME.fullmatch(cfg.run_name)),
           f"--run-name must be one name of letters, digits, '-', '_' and '.', not starting with '.': it names "
           f"folders inside --output (got {cfg.run_name!r})")


def _lcm_multiple(value: int, counts: range) -> int:
    """The smallest multiple of lcm(counts) that is >= value: a global batch every count divides."""
    step = math.lcm(*counts)
    return max(step, -(-value // step) * step)


def parse_workers(value: Any) -> tuple[int, int]:
    """`N` -> (0, N): a fixed group; `MIN-MAX` -> (MIN, MAX): an elastic one."""
    text = str(value).strip()
    try:
        low, high = (int(x) for x in text.split("-", 1)) if "-" in text[1:] else (0, int(text))
    except ValueError:
        raise UserError(f"--num-workers takes N or MIN-MAX, e.g. 2 or 1-4 (got {value!r})") from None
    if "-" in text[1:] and not 1 <= low <= high:
        raise UserError(f"--num-workers MIN-MAX needs 1 <= MIN <= MAX (got {text})")
    return (low, high) if low < high else (0, high)


# What model/config.json records of the settings: what the model is and how it was trained (not where it ran).
EXPORTED_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("export"))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def train_parser(preset: str = "default") -> argparse.ArgumentParser:
    """The flags of `python -m job.train`, one per TrainConfig setting (job.schema); each help ends with the
    default that `preset` gives it."""
    p = argparse.ArgumentParser(
        prog="python -m job.train",
        description="Train a character-level LSTM on a text corpus with Ray Train "
        "(MultiWorkerMirroredStrategy); checkpoints and the exported model go to --output. "
        "Precedence: preset < --config file < flags.",
    )
    p.add_argument("--config", help="YAML or JSON file with any of these settings (flags win).")
    schema.add_flags(p, TrainConfig, (DATA, MODEL, TRAINING, JOB))
    defaults = {**TrainConfig().to_dict(), **PRESETS.get(preset, {})}
    schema.add_defaults_to_help(p, {k: v for k, v in defaults.items() if k != "preset"}, preset)
    return p
