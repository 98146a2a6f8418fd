"""Held-out loss of an exported model over the whole held-out part: `python -m job.evaluate --model URL`.

The held-out part is the prepared dataset's (job.prepare: the tail of every file, each scored character with
at least 100 characters of context), read from a memory map in batches, so memory does not grow with it.
Prints one JSON line: {"loss_nats": ..., "bits_per_char": ..., "chars": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np

from job.core import report
from job.core.config import TrainConfig
from job.core.errors import UserError, run_cli
from job.data import corpus as corpus_lib
from job.data import prepare, windows
from job.model import export

# TensorFlow (and job.model.model, which imports it) only inside HeldOutScorer: the driver imports this module through
# job.training.worker and must start without TensorFlow.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m job.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Training --output URL or its model/ folder.")
    p.add_argument("--dataset", help="Prepared dataset URL (default: the one the model was trained on).")
    p.add_argument("--corpus", help="Score this corpus instead (a file, folder or glob, prepared into a temporary "
                   "folder with the model's cleaning options).")
    p.add_argument("--val-fraction", type=float, help="With --corpus: held-out fraction (default: the model's).")
    p.add_argument("--batch-size", type=int, default=256, help="Windows scored per call (default 256).")
    p.add_argument("--verbose", action="store_true", help="Also show TensorFlow's start-up notices.")
    return p


def heldout_windows(cfg: TrainConfig, ids: np.ndarray, split: int) -> windows.HeldOut:
    if cfg.target == "all":
        return windows.heldout_all_positions(ids, split)
    return windows.heldout_last_position(ids, split, cfg.seq_len)


class HeldOutScorer:
    """Mean next-char cross-entropy (nats) of a model over held-out windows; compiled once."""

    def __init__(self, cfg: TrainConfig, model, vocab_size: int, batch_size: int = 256):
        import tensorflow as tf

        from job.model import model as model_lib

        self.batch_size = batch_size

        def batch_loss(x, y, mask):
            outputs = model_lib.forward(cfg, model, x, vocab_size, False)
            return tf.reduce_sum(model_lib.per_example_loss(cfg, outputs, y, mask))

        self._batch_loss = tf.function(batch_loss, reduce_retracing=True)

    def __call__(self, held: windows.HeldOut) -> float:
        total, chars = 0.0, 0.0
        for x, y, mask in held.batches(self.batch_size):  # bounded memory, whatever the held-out size
            total += float(self._batch_loss(x, y, mask))
            chars += float(mask.sum())
        return total / chars


class _Mapped:
    """Dataset ids seen through the model's vocabulary (a dataset prepared on its own has its own ids)."""

    def __init__(self, ids: np.ndarray, table: np.ndarray):
        self.ids, self.table = ids, table

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        return self.table[np.asarray(self.ids[index], dtype=np.int64)]


def id_table(source: corpus_lib.Vocab, target: corpus_lib.Vocab) -> np.ndarray | None:
    """Map ids of `source` to ids of `target` (None when they are the same vocabulary)."""
    if source == target:
        return None
    index, unknown = target.index, target.unknown_id
    missing = [c for c in source.chars if c not in index and not (source.has_unknown and c == source.chars[-1])]
    if missing and unknown is None:
        shown = ", ".join(repr(c) for c in missing[:10])
        raise UserError(f"the held-out text has {len(missing)} character(s) the model never saw: {shown}; "
                        "score it with a model trained on it")
    return np.array([index.get(c, unknown if unknown is not None else -1) for c in source.chars], np.int32)


def score_dataset(model, cfg: TrainConfig, vocab: corpus_lib.Vocab, ds, batch_size: int = 256) -> dict:
    table = id_table(ds.vocab, vocab)
    val = ds.val if table is None else _Mapped(ds.val, table)
    held = windows.heldout(val, ds.val_segments, cfg.target, cfg.seq_len)
    loss = HeldOutScorer(cfg, model, len(vocab), batch_size)(held)
    return {"loss_nats": loss, "bits_per_char": loss / np.log(2), "chars": held.chars}


def evaluate(model, cfg: TrainConfig, vocab: corpus_lib.Vocab, text: str, val_fraction: float,
             batch_size: int = 256) -> dict:
    """The same protocol over one cleaned text held in memory (small corpora: tests, benchmarks)."""
    ids = vocab.encode(text)
    split = corpus_lib.split_point(len(ids), val_fraction)
    held = heldout_windows(cfg, ids, split)
    loss = HeldOutScorer(cfg, model, len(vocab), batch_size)(held)
    return {"loss_nats": loss, "bits_per_char": loss / np.log(2), "chars": held.chars}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.val_fraction is not None and not 0 < args.val_fraction <= 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5] (got {args.val_fraction})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.dataset and args.corpus:
        raise UserError("give --dataset or --corpus, not both")

    report.import_tensorflow(args.verbose)  # before Keras: TensorFlow's start-up notices dropped unless --verbose
    exported = export.load(args.model)
    cfg = TrainConfig.from_dict(exported.config)
    with tempfile.TemporaryDirectory(prefix="charlstm-eval-") as tmp:
        if args.corpus:
            val_fraction = args.val_fraction or float(exported.config.get("val_fraction", 0.1))
            prepare.prepare(args.corpus, tmp, lowercase=exported.config.get("lowercase", True),
                            val_fraction=val_fraction, min_char_count=1, log=lambda _line: None)
            url = tmp
        else:
            url = args.dataset or exported.config.get("dataset")
            if not url:
                raise UserError("the model does not name its dataset (trained before job.prepare existed); "
                                "give --corpus URL or --dataset URL")
        dataset = prepare.open_local(url, verify_local=True)
        trained_on = exported.config.get("corpus_sha256")
        if not (args.corpus or args.dataset) and trained_on and dataset.meta.get("corpus_sha256") != trained_on:
            raise UserError(f"the dataset {url} no longer holds the text model {exported.url} was trained on (corpus "
                            f"sha256 {trained_on[:12]}…, dataset {str(dataset.meta.get('corpus_sha256'))[:12]}…: "
                            "prepared again from other files); score it with --corpus or --dataset")
        result = score_dataset(exported.model, cfg, exported.vocab, dataset, args.batch_size)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
