"""When things happen in a training run: pure decisions on step counts and clocks (no TensorFlow), so the loop in
job/training/worker.py stays flat and each rule tests in microseconds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from job.core.config import TrainConfig
from job.core.report import bits, format_seconds


def anneal_factor(done: float, anneal: float) -> float:
    """Learning-rate multiplier when a fraction `done` of the run is over: 1 until the last `anneal` of
    the run, then a half cosine down to 0 at its end. A time budget is only used well if the rate has come
    down by the time it runs out; a constant rate leaves the last epochs noisy."""
    if anneal <= 0:
        return 1.0
    start = 1.0 - anneal
    if done <= start:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (done - start) / anneal)))


def run_fraction(global_step: int, planned_steps: int, elapsed: float, budget_sec: float) -> float:
    """How much of the run is over: by steps or by the time budget, whichever is further."""
    return max(global_step / max(1, planned_steps), elapsed / budget_sec)


def learning_rate(cfg: TrainConfig, decayed: float, done: float) -> float:
    """The rate of the next step: the base rate (--learning-rate, or `decayed` once plateaus have decayed it; 0:
    none has) times the anneal factor at `done` (run_fraction)."""
    return (decayed or cfg.learning_rate) * anneal_factor(done, cfg.lr_anneal)


def due(global_step: int, every: int) -> bool:
    """True when an every-N-steps event (checkpoint, evaluation) falls on this step; every=0: never."""
    return every > 0 and global_step > 0 and global_step % every == 0


def steps_in_next_call(steps_per_call: int, left_in_epoch: int, global_step: int, intervals: tuple[int, ...]) -> int:
    """Steps the next compiled call runs: at most `steps_per_call`, never past the epoch's end, and ending
    exactly on the next multiple of each non-zero interval, so step events happen at their step."""
    count = min(steps_per_call, left_in_epoch)
    for every in intervals:
        if every > 0:
            count = min(count, every - global_step % every)
    return max(1, count)


def eta_seconds(progress: Any, total_steps: int, budget_sec: float) -> float:
    """Time left: the remaining planned steps at the run's average pace, capped by what is left of the budget."""
    done = max(1, progress.global_step)
    left = max(0, total_steps - progress.global_step) * progress.elapsed_sec / done
    return max(0.0, min(left, budget_sec - progress.elapsed_sec))


@dataclass
class Interval:
    """What happened since the last progress line."""

    steps: int
    loss: float  # mean training loss over those steps
    chars_per_sec: float


class ProgressTicker:
    """Accumulates steps and loss; hands out an Interval at most every `every` seconds (0: never)."""

    def __init__(self, every: float, now: float):
        self.every, self.since = every, now
        self.steps, self.loss_sum, self.chars = 0, 0.0, 0

    def tick(self, now: float, steps: int, loss_sum: float, chars: int) -> Interval | None:
        self.steps += steps
        self.loss_sum += loss_sum
        self.chars += chars
        if self.every <= 0 or now - self.since < self.every:
            return None
        out = Interval(self.steps, self.loss_sum / self.steps, self.chars / max(now - self.since, 1e-9))
        self.since, self.steps, self.loss_sum, self.chars = now, 0, 0.0, 0
        return out


def progress_line(progress: Any, epochs: int, steps_in_epoch: int, total_steps: int, interval: Interval,
                  budget_sec: float) -> str:
    p = progress
    return (f"step {p.global_step:,}  epoch {p.epoch + 1}/{epochs} ({100 * p.step_in_epoch / steps_in_epoch:.0f}%)  "
            f"loss {interval.loss:.4f}  {interval.chars_per_sec:,.0f} chars/s  "
            f"elapsed {format_seconds(p.elapsed_sec)}  eta {format_seconds(eta_seconds(p, total_steps, budget_sec))}")


def evaluation_metrics(progress: Any, epochs: int, kind: str, steps_in_epoch: int, val_loss: float,
                       chars_per_sec: float, eta_sec: float) -> dict[str, Any]:
    """An evaluation's metrics line: at an epoch's end (kind "epoch"; partial when the time budget cut the epoch
    short) or every --eval-every-steps ("eval")."""
    p = progress
    return {
        "epoch": p.epoch + 1, "epochs": epochs, "epoch_float": p.epoch + p.step_in_epoch / steps_in_epoch,
        "global_step": p.global_step, "train_loss": p.epoch_loss_sum / max(1, p.step_in_epoch),
        "val_loss": val_loss, "val_bpc": bits(val_loss), "chars_per_sec": chars_per_sec, "elapsed_sec": p.elapsed_sec,
        "eta_sec": eta_sec, "train_chars": p.train_chars,
        "partial_epoch": kind == "epoch" and p.step_in_epoch < steps_in_epoch, "kind": kind,
    }


def record_evaluation(history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """Append an evaluation to the run's history. An epoch line replaces the line of the same epoch that a
    time-budget stop recorded as partial (a resumed run finished that epoch), wherever it stands."""
    if metrics["kind"] == "epoch":
        for i in range(len(history) - 1, -1, -1):
            old = history[i]
            if old.get("kind", "epoch") == "epoch":
                if old["epoch"] == metrics["epoch"] and old.get("partial_epoch"):
                    del history[i]
                break
    history.append(metrics)


def budget_action(stop: bool, elapsed: float, budget: float, world: int) -> str | None:
    """After a compiled call: "stop" when every worker stops now (a worker's budget flag came back all-reduced,
    or a lone worker's clock passed the budget); "signal" when this worker's clock passed it and the others
    must learn so through the next call's all-reduce (so all stop after the same step); else None."""
    if stop or (elapsed >= budget and world == 1):
        return "stop"
    return "signal" if elapsed >= budget else None


def step_event(global_step: int, mid_epoch: bool, eval_every: int, checkpoint_every: int) -> str | None:
    """"evaluate" or "checkpoint" when one falls on this step inside an epoch (the epoch's end has its own)."""
    if not mid_epoch:
        return None
    if due(global_step, eval_every):
        return "evaluate"
    return "checkpoint" if due(global_step, checkpoint_every) else None
