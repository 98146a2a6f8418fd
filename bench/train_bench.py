"""One equal-wall-clock training run, in its own process: `python -m bench.train_bench --preset P ...`.

Trains preset P through `job.training.worker.train_func` in-process (no Ray) for `--seconds`, then scores the
exported model with the full held-out protocol (`job.evaluate.evaluate`) and writes a JSON summary.
bench.run starts one such process per method so that the two runs share no TensorFlow state.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import common


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--workdir", required=True, help="Scratch output folder (wiped first: no resume).")
    p.add_argument("--json", required=True, help="Where to write the summary.")
    return p


def epoch_rates(history: list[dict[str, Any]]) -> dict[str, float]:
    """Predicted chars/s over the training steps only (the `chars_per_sec` fields, weighted by chars),
    and overall (train chars / elapsed, which also counts compilation and per-epoch eval/sample/export)."""
    chars = seconds = 0.0
    prev = 0
    for m in history:
        c = m["train_chars"] - prev
        prev = m["train_chars"]
        chars += c
        seconds += c / max(m["chars_per_sec"], 1e-12)
    last = history[-1] if history else {"train_chars": 0, "elapsed_sec": 0.0}
    return {
        "chars_per_sec_steps": chars / seconds if seconds else 0.0,
        "chars_per_sec_overall": last["train_chars"] / last["elapsed_sec"] if last["elapsed_sec"] else 0.0,
    }


def _score_exported(cfg, corpus_url: str, workdir: str) -> tuple[Any, dict[str, Any], int, float]:
    """The exported model (best epoch by the preset's select_by) scored with the full protocol; also the chars an
    epoch predicts and the seconds scoring took."""
    from job.core.config import TrainConfig
    from job.data import corpus as corpus_lib
    from job.data import windows as data
    from job.model import export
    from job.model.scoring import evaluate

    t1 = time.perf_counter()
    exported = export.load(workdir)
    ecfg = TrainConfig.from_dict(exported.config)
    text = corpus_lib.load(corpus_url, lowercase=exported.config.get("lowercase", True)).text
    heldout = evaluate(exported.model, ecfg, exported.vocab, text, cfg.val_fraction)
    eval_sec = time.perf_counter() - t1
    n_train = corpus_lib.split_point(len(text), cfg.val_fraction)
    plan = (data.stream_plan if cfg.stateful else data.sliding_plan)(n_train, cfg.seq_len, cfg.batch_size, 0, cfg.seed)
    return exported, heldout, plan.size * (cfg.seq_len if cfg.target == "all" else 1), eval_sec


def run(preset: str, corpus_url: str, seconds: float, workdir: str) -> dict[str, Any]:
    from job.core.config import PRESETS, TrainConfig
    from job.training.worker import train_func

    shutil.rmtree(workdir, ignore_errors=True)  # an old checkpoint there would be resumed
    cfg = TrainConfig(**{**PRESETS[preset], "preset": preset, "corpus": corpus_url, "output": workdir,
                         "in_process": True, "max_minutes": seconds / 60.0, "epochs": 100_000}).validate()
    t0 = time.perf_counter()
    final = train_func(cfg.to_dict())
    train_wall = time.perf_counter() - t0

    metrics_path = Path(workdir) / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not history:
        raise RuntimeError(f"{metrics_path} is empty: the run recorded no epoch")

    exported, heldout, chars_per_epoch, eval_sec = _score_exported(cfg, corpus_url, workdir)
    vocab = len(exported.vocab)
    last = history[-1]
    rates = epoch_rates(history)
    fwd = common.forward_flops_per_predicted_char(cfg, vocab)
    return {
        "preset": preset,
        "config": {k: getattr(cfg, k) for k in ("input_mode", "units", "embed_dim", "dropout", "target", "stateful",
                                                 "batch_size", "seq_len", "learning_rate", "clip_norm",
                                                 "select_by", "steps_per_call")},
        "vocab_size": vocab,
        "budget_sec": seconds,
        "train_wall_sec": train_wall,
        "elapsed_sec": last["elapsed_sec"],
        "epochs_recorded": len(history),
        "last_epoch_partial": bool(last.get("partial_epoch")),
        "stopped_early": bool(final.get("stopped_early")),
        "train_chars": last["train_chars"],
        "predicted_chars_per_epoch": chars_per_epoch,
        "epochs_seen": last["train_chars"] / chars_per_epoch,
        **rates,
        "curve": [{"elapsed_sec": m["elapsed_sec"], "val_loss": m["val_loss"], "train_loss": m["train_loss"],
                   "epoch": m["epoch"], "partial_epoch": m.get("partial_epoch", False),
                   "chars_per_sec": m["chars_per_sec"]} for m in history],
        "per_epoch_val_protocol": ("full held-out set (>= 100 chars of context each)" if cfg.target == "all"
                                   else f"evenly spaced subsample of {cfg.val_max_windows} held-out windows"),
        "exported_epoch": exported.config.get("epoch"),
        "heldout_loss_nats": heldout["loss_nats"],
        "heldout_bits_per_char": heldout["bits_per_char"],
        "heldout_chars": heldout["chars"],
        "eval_sec": eval_sec,
        "flops_forward_per_predicted_char": fwd,
        "flops_train_per_predicted_char": 3 * fwd,
        "train_flops_per_sec_steps": 3 * fwd * rates["chars_per_sec_steps"],
        "uniform_loss_nats": math.log(vocab),
    }


def main(argv: list[str] | None = None) -> int:
    from job.core.errors import run_cli

    args = parser().parse_args(argv)

    def go(_argv):
        result = run(args.preset, args.corpus, args.seconds, args.workdir)
        Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
