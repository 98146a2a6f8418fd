"""What an evaluation leaves in --output (rank 0 writes it): metrics.jsonl, loss.png, a text sample (also in
TensorBoard) and, when the score is the best so far, the exported model with its settings."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from job.core import report, storage
from job.core.config import EXPORTED_SETTINGS, TrainConfig
from job.data.corpus import Vocab
from job.model import export
from job.training.tensorboard import Board

# loss.png is redrawn at most this often (and at the run's last evaluation): drawing it takes ~0.13 s, 3% of an
# epoch of Alice, and metrics.jsonl has every evaluation anyway.
PLOT_EVERY_SECONDS = 30.0


def export_config(cfg: TrainConfig, progress: Any, corpus_sha256: str, workers: int, parent: Any) -> dict[str, Any]:
    """The settings and scores saved beside the model: what generation and evaluation need to use it, and where
    it came from (corpus, dataset, the model it was fine-tuned from)."""
    last = progress.history[-1]
    return {
        **{k: getattr(cfg, k) for k in EXPORTED_SETTINGS},
        "corpus": cfg.corpus, "dataset": cfg.data_url, "corpus_sha256": corpus_sha256,
        "epoch": last["epoch"],
        "global_step": progress.global_step, "val_loss": last["val_loss"], "val_bpc": last["val_bpc"],
        "train_loss": last["train_loss"], "workers": workers, "global_batch": cfg.global_batch,
        "lowercase": not cfg.keep_case,
        **({"parent": {"url": parent.url, "kind": parent.kind, "sha256": parent.sha256}} if parent else {}),
    }


class Outputs:
    """Writes one evaluation's files; holds the sampler (built once: a new one would retrace every evaluation)
    and when loss.png was last drawn."""

    def __init__(self, cfg: TrainConfig, vocab: Vocab, sample_prompt: np.ndarray, board: Board, model):
        self.cfg, self.vocab, self.sample_prompt, self.board, self.model = cfg, vocab, sample_prompt, board, model
        self.sampler = None
        self.plotted = -math.inf

    def write(self, progress: Any, metrics: dict[str, Any], exported: dict[str, Any] | None) -> None:
        """After an evaluation (`metrics`, the last line of progress.history); the model with `exported` (its
        export_config) when it is the best so far, else None."""
        cfg, out = self.cfg, self.cfg.output
        self.board.scalars(progress.global_step, {"heldout/loss_nats": metrics["val_loss"],
                                                  "heldout/bits_per_char": metrics["val_bpc"]})
        report.write_metrics(out, progress.history)
        now, last = time.monotonic(), progress.history[-1]
        final = progress.stopped_early or (last["kind"] == "epoch" and last["epoch"] >= cfg.epochs)
        if final or now - self.plotted >= PLOT_EVERY_SECONDS:
            self.plotted = now
            report.write_loss_plot(out, progress.history, f"charlstm {cfg.preset}")
        prompt, sample = self.vocab.decode(self.sample_prompt), self._sample_text(progress.epoch)
        name = f"epoch-{metrics['epoch']:03d}" if metrics["kind"] == "epoch" else f"step-{progress.global_step:09d}"
        report.write_sample(out, name, prompt, sample)
        self.board.text(progress.global_step, "sample", f"{prompt}\n---\n{sample}")
        if exported is not None:
            export.save(self.model, self.vocab, exported, storage.join(out, "model"))

    def _sample_text(self, epoch: int) -> str:
        from job.model.sample import Sampler

        if self.sampler is None:  # one short sample per evaluation: not worth an XLA compile
            self.sampler = Sampler(self.model, self.cfg.input_mode, len(self.vocab), self.cfg.seq_len,
                                   self.vocab.unknown_id, xla=False)
        out = self.sampler.generate(self.sample_prompt[None, :], self.cfg.sample_chars, temperature=0.8,
                                    seed=self.cfg.seed * 1000 + epoch)
        return self.vocab.decode(out[0])
