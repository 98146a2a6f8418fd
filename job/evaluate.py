"""Held-out loss of an exported model (GUIDE §3): `python -m job.evaluate --model URL --corpus URL`.

Prints one JSON line: {"loss_nats": ..., "bits_per_char": ..., "chars": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from job import corpus as corpus_lib
from job import data
from job.config import TrainConfig
from job.errors import UserError, run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m job.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Training --output URL or its model/ folder.")
    p.add_argument("--corpus", required=True, help="Corpus URL (the one the model was trained on).")
    p.add_argument("--val-fraction", type=float, default=0.1, help="Held-out tail fraction (default 0.1).")
    p.add_argument("--batch-size", type=int, default=256, help="Windows scored per call (default 256).")
    return p


def heldout_windows(cfg: TrainConfig, ids: np.ndarray, split: int) -> data.HeldOut:
    if cfg.target == "all":
        return data.heldout_all_positions(ids, split)
    return data.heldout_last_position(ids, split, cfg.seq_len)


class HeldOutScorer:
    """Mean next-char cross-entropy (nats) of a model over held-out windows; compiled once."""

    def __init__(self, cfg: TrainConfig, model, vocab_size: int, batch_size: int = 256):
        import tensorflow as tf

        from job import model as model_lib

        self.batch_size = batch_size

        def batch_loss(x, y, mask):
            outputs = model_lib.forward(cfg, model, x, vocab_size, False)
            return tf.reduce_sum(model_lib.per_example_loss(cfg, outputs, y, mask))

        self._batch_loss = tf.function(batch_loss, reduce_retracing=True)

    def __call__(self, held: data.HeldOut) -> float:
        total, b = 0.0, self.batch_size
        for i in range(0, len(held.x), b):
            total += float(self._batch_loss(held.x[i : i + b], held.y[i : i + b], held.mask[i : i + b]))
        return total / held.chars


def evaluate(model, cfg: TrainConfig, vocab: corpus_lib.Vocab, text: str, val_fraction: float,
             batch_size: int = 256) -> dict:
    ids = vocab.encode(text)
    split = corpus_lib.split_point(len(ids), val_fraction)
    held = heldout_windows(cfg, ids, split)
    loss = HeldOutScorer(cfg, model, len(vocab), batch_size)(held)
    return {"loss_nats": loss, "bits_per_char": loss / np.log(2), "chars": held.chars}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0 < args.val_fraction <= 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5] (got {args.val_fraction})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    from job import export

    exported = export.load(args.model)
    cfg = TrainConfig.from_dict(exported.config)
    corpus = corpus_lib.load(args.corpus, lowercase=exported.config.get("lowercase", True))
    result = evaluate(exported.model, cfg, exported.vocab, corpus.text, args.val_fraction, args.batch_size)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
