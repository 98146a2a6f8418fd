"""The per-worker training function: the same code runs in-process (one worker) and on every Ray Train worker
under MultiWorkerMirroredStrategy (the strategy, model and compiled step are in job/training/steps.py).

`Trainer.run` is the loop: compiled calls of several steps, and between them the progress line, the time budget,
evaluations, checkpoints and drains, each decided from values every worker agrees on so no worker is left
waiting in a collective.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from job.core import report
from job.core.config import TrainConfig
from job.core.errors import UserError, check_interrupt, deferred_interrupts
from job.data import prepare
from job.data import windows as data
from job.data.corpus import Vocab
from job.model import checkpoint, finetune
from job.training.outputs import Outputs, export_config
from job.training.schedule import (
    ProgressTicker,
    budget_action,
    eta_seconds,
    evaluation_metrics,
    learning_rate,
    progress_line,
    record_evaluation,
    run_fraction,
    step_event,
    steps_in_next_call,
)
from job.training.session import RunAborted, Session, detect_session
from job.training.steps import Compiled, make_strategy, worker_threads
from job.training.tensorboard import Board

# How often a worker waiting out a drain looks for Ctrl-C / SIGTERM.
WAIT_POLL_SECONDS = 0.5


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the current epoch already applied
    global_step: int = 0
    elapsed_sec: float = 0.0
    train_chars: int = 0
    best_score: float = math.inf
    best_epoch: int = 0
    epoch_loss_sum: float = 0.0
    learning_rate: float = 0.0  # the base rate once a plateau has decayed it (0: never, --learning-rate holds)
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    def advance(self, steps: int, loss_sum: float, chars: int, elapsed_sec: float) -> None:
        """`steps` optimizer steps were applied."""
        self.step_in_epoch += steps
        self.global_step += steps
        self.epoch_loss_sum += loss_sum
        self.train_chars += chars
        self.elapsed_sec = elapsed_sec

    def end_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.epoch_loss_sum = self.epoch + 1, 0, 0.0


@dataclass
class WorkerData:
    """The prepared dataset as memory maps (the driver prepared it, job.prepare): no worker holds the corpus as a
    string or a tensor, and only the pages a step touches become resident."""

    meta: dict[str, Any]
    vocab: Vocab
    train_ids: np.ndarray
    heldout: data.HeldOut  # the windows scored per evaluation
    heldout_chars: int  # held-out chars in all
    plan: Callable  # (train chars, seq_len, global batch, epoch, seed) -> the epoch's window starts
    steps_per_epoch: int  # of epoch 0 (epoch plans differ by at most a step)
    sample_prompt: np.ndarray  # the last seq_len training chars: the prompt of each evaluation's sample

    @classmethod
    def open(cls, cfg: TrainConfig) -> WorkerData:
        ds = prepare.open_local(cfg.data_url)
        full = data.heldout(ds.val, ds.val_segments, cfg.target, cfg.seq_len)
        plan = data.stream_plan if cfg.stateful else data.sliding_plan
        steps = len(plan(len(ds.train), cfg.seq_len, cfg.global_batch, 0, cfg.seed))  # fails early if too short
        return cls(ds.meta, ds.vocab, ds.train, full.subset(cfg.val_max_chars if cfg.target == "all"
                                                            else cfg.val_max_windows),
                   full.chars, plan, steps, np.asarray(ds.train[-cfg.seq_len:], dtype=np.int32))

    def epoch_plan(self, cfg: TrainConfig, epoch: int) -> np.ndarray:
        return self.plan(len(self.train_ids), cfg.seq_len, cfg.global_batch, epoch, cfg.seed)


def ensure_dataset(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """The prepared dataset for this corpus and these options: reused when <dataset> holds it, else made there
    (job.prepare; streams the raw files once). Returns its meta. A dataset too short for one global batch or
    for the held-out protocol is refused before anything is written."""
    parent = finetune.find_parent(cfg.init_from) if cfg.init_from else None
    if parent is not None and (note := finetune.check_case(parent, cfg.keep_case, cfg.vocab_from_init)):
        log(note)

    def usable(meta: dict[str, Any]) -> None:
        plan = data.stream_plan if cfg.stateful else data.sliding_plan
        plan(meta["train_chars"], cfg.seq_len, cfg.global_batch, 0, cfg.seed)
        data.heldout(np.zeros(0, np.uint8), meta["val_segments"], cfg.target, cfg.seq_len)
        if parent is not None:
            finetune.check_vocabulary(parent, Vocab(tuple(meta["vocab"]["chars"]), bool(meta["vocab"]["unknown"])),
                                      cfg.input_mode)

    return prepare.ensure(cfg.corpus, cfg.data_url, lowercase=not cfg.keep_case, val_fraction=cfg.val_fraction,
                          min_char_count=cfg.min_char_count, skip_bad_files=cfg.skip_bad_files, log=log,
                          validate=usable, exclude=(cfg.output,), owner=f"training run {cfg.run!r}",
                          base_vocab=parent.vocab if parent else None, new_to_unknown=cfg.vocab_from_init,
                          log_every=cfg.log_every_seconds)


def load_hooks() -> Any:
    """The module named by CHARLSTM_HOOKS (importable on every worker, e.g. from the --working-dir), whose
    `after_step(trainer)` / `at_end(trainer)` run in the loop; None without it. The tests' fault injection
    lives there (tests/train_hooks.py), not in the training code."""
    name = os.environ.get("CHARLSTM_HOOKS")
    return importlib.import_module(name) if name else None


def train_func(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point for one worker. Returns the final metrics (also written to metrics.jsonl).

    Under Ray the driver has prepared the dataset (job.train.preflight); called on its own (in-process, a
    notebook) the single worker makes sure of it itself."""
    cfg = TrainConfig.from_dict(config)
    report.import_tensorflow(cfg.verbose)  # a Ray worker of `ray job submit` has not inherited the driver's setting
    in_ray = bool(config.get("_in_ray"))
    if not (in_ray or config.get("_dataset_ready")):  # the driver (job.train) prepares it once per run
        ensure_dataset(cfg, log=lambda _line: None)
    session = detect_session(cfg, in_ray=in_ray)
    with deferred_interrupts():  # Ctrl-C / SIGTERM stop the run after the current step, never inside TensorFlow
        try:
            return Trainer(cfg, session, load_hooks()).run()
        except RunAborted as e:
            print(f"worker {session.rank}: stopping: {e}", flush=True)
            return {}
        except UserError:
            if in_ray:
                _QuietUserErrorTrace.install()
            raise


class _QuietUserErrorTrace(logging.Filter):
    """Drops the traceback Ray Train logs for a worker's UserError (damaged data, no checkpoint that loads): the
    driver reports it in one line (job.train), and a trace through our code would read as a crash. Installed only
    as such an error leaves train_func, so any other failure keeps its trace."""

    LOGGER = "ray.train.v2._internal.util"  # where Ray logs "Error in training function: <traceback>"

    @classmethod
    def install(cls) -> None:
        logger = logging.getLogger(cls.LOGGER)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Error in training function"):
            logging.getLogger(self.LOGGER).removeFilter(self)  # this one error only
            return False
        return True


def resume(cfg: TrainConfig, session: Session, net: Compiled, vocab: Vocab, first_row: int,
           rows: int) -> tuple[Progress, list] | None:
    """Restore the newest checkpoint that loads into `net` (a damaged one is passed over with one line); its
    progress and this worker's rows of the LSTM states saved with it. None: the run has no checkpoint yet."""
    tried = 0
    for step, directory in session.checkpoints():
        tried += 1
        try:
            saved, states = checkpoint.restore(directory, net.model, net.optimizer, vocab.chars)
        except checkpoint.Damaged as exc:
            session.log(f"checkpoint at global step {step} cannot be restored ({exc}); trying the one before it")
            continue
        p = Progress(**saved)
        session.log(f"resumed from checkpoint: epoch {p.epoch}, step {p.step_in_epoch} of the next epoch, "
                    f"global step {p.global_step}")
        mine = states[first_row:][:rows] if states is not None and p.step_in_epoch else None
        return p, [] if mine is None else net.split_states(mine, cfg, rows)
    if tried:
        raise UserError(f"none of the {tried} checkpoint(s) of run {cfg.run!r} in {cfg.output} can be restored (see "
                        "the lines above); start the run again in another --output")
    return None


def start_from_parent(cfg: TrainConfig, session: Session, net: Compiled, vocab: Vocab, resumed: bool) -> Any:
    """The model --init-from names (None without it); its weights are copied into `net` unless the run resumed
    from a checkpoint of its own."""
    parent = finetune.find_parent(cfg.init_from) if cfg.init_from else None
    if parent and not resumed:
        finetune.transfer(net.model, parent, vocab)
        session.log(f"initialised from {parent.url} ({parent.kind}, sha256 {parent.sha256[:12]}): "
                    f"{len(parent.vocab)} characters carried over, {len(vocab) - len(parent.vocab)} new")
    return parent


class Trainer:
    """One worker's run. __init__ sets it up (data, model, the checkpoint to resume from); run() trains."""

    def __init__(self, cfg: TrainConfig, session: Session, hooks: Any = None):
        self.cfg, self.session, self.hooks = cfg, session, hooks
        self.rank, self.world = session.rank, session.world_size
        # Fixed for the run; the worker count may change between resumes (elastic runs), the global batch not.
        if cfg.global_batch % self.world:
            raise RuntimeError(f"global batch {cfg.global_batch} does not split over {self.world} workers")
        self.per_worker = cfg.global_batch // self.world
        self.chars_per_step = cfg.global_batch * (cfg.seq_len if cfg.target == "all" else 1)
        self.budget_sec = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        strategy = make_strategy(worker_threads(cfg, session.in_ray, self.per_worker))  # before any other TensorFlow op
        self.data = WorkerData.open(cfg)
        self.net = Compiled.build(cfg, strategy, len(self.data.vocab), cfg.global_batch)
        resumed = resume(cfg, session, self.net, self.data.vocab, self.rank * self.per_worker, self.per_worker)
        self.progress, self.states = resumed or (Progress(), [])  # states: the LSTM streams' (stateful presets)
        self.parent = start_from_parent(cfg, session, self.net, self.data.vocab, resumed=bool(resumed))
        p = self.progress
        self.net.check_same_step(p.global_step, self.world)
        # The run's planned length, for annealing by steps: fixed here so the schedule never jumps.
        self.planned_steps = cfg.epochs * self.data.steps_per_epoch
        self.over_budget = False  # this worker's clock passed the budget (the others learn it with the next call)
        self.draining = False  # every worker has learnt that a node of this run is being drained (preemption)
        self.agreed_elapsed = p.elapsed_sec  # the workers' mean clock, as of the last all-reduce
        self.epoch_started, self.epoch_chars = time.monotonic(), 0  # for an evaluation's chars/s
        self.ticker = ProgressTicker(cfg.log_every_seconds, time.monotonic())
        self.board = Board(cfg, self.rank, p.global_step if resumed else None)
        self.outputs = Outputs(cfg, self.data.vocab, self.data.sample_prompt, self.board, self.net.model)
        self.board.config(p.global_step, cfg.to_dict())
        d = self.data
        session.log(f"training {cfg.preset}: {len(d.train_ids):,} train chars, {d.heldout_chars:,} held-out chars "
                    f"({d.heldout.chars:,} scored per evaluation), vocab {len(d.vocab)}, {self.world} worker(s), "
                    f"global batch {cfg.global_batch} ({self.per_worker} per worker), "
                    f"{self.net.model.count_params():,} parameters")
        # The budget is for the whole run, resumes included; a larger --max-minutes continues a run that had
        # stopped on its budget.
        p.stopped_early = p.elapsed_sec >= self.budget_sec
        if p.stopped_early:
            session.log(f"time budget already spent ({p.elapsed_sec / 60:.1f} of {cfg.max_minutes:g} min); "
                        "raise --max-minutes to train further")
        self.start_clock = time.monotonic() - p.elapsed_sec

    @property
    def model(self):
        """The Keras model (what hooks such as tests/train_hooks.py read)."""
        return self.net.model

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        cfg, p = self.cfg, self.progress
        try:
            while p.epoch < cfg.epochs and not p.stopped_early:
                plan = self.data.epoch_plan(cfg, p.epoch)
                self._start_epoch()
                while p.step_in_epoch < len(plan):
                    # From agreed values only: every collective of a call pairs with the same one on the other
                    # workers, so a worker whose clock alone passed the budget still runs the call the others run.
                    count = steps_in_next_call(cfg.steps_per_call, len(plan) - p.step_in_epoch, p.global_step,
                                               (cfg.checkpoint_every_steps, cfg.eval_every_steps))
                    all_stop, loss_sum = self._train_steps(plan, count)
                    if self.hooks:
                        self.hooks.after_step(self)
                    check_interrupt()
                    self._log_progress(len(plan), count, loss_sum)
                    verdict = budget_action(all_stop, p.elapsed_sec, self.budget_sec, self.world)
                    if verdict == "stop":
                        p.stopped_early = True
                        break
                    self.over_budget = self.over_budget or verdict == "signal"
                    mid_epoch = p.step_in_epoch < len(plan)
                    event = step_event(p.global_step, mid_epoch, cfg.eval_every_steps, cfg.checkpoint_every_steps)
                    if event == "evaluate":
                        self.evaluate("eval", len(plan))
                    elif event == "checkpoint" or (self.draining and mid_epoch):
                        self.save_checkpoint("step" if event else "preemption")
                    if self.draining and mid_epoch:
                        self._wait_for_restart()
                if not p.step_in_epoch:
                    break  # no step of this epoch ran
                self.evaluate("epoch", len(plan))  # also an epoch the budget cut short (recorded as partial)
                if self.draining and p.epoch < cfg.epochs:
                    self._wait_for_restart()  # the epoch's end was checkpointed as the drain became known
            if self.hooks:
                self.hooks.at_end(self)
            return {**(p.history[-1] if p.history else {}), "best_epoch": p.best_epoch, "best_score": p.best_score,
                    "select_by": cfg.select_by, "stopped_early": p.stopped_early,
                    "global_batch": cfg.global_batch, "workers": self.world}
        finally:  # also on a time-budget stop, Ctrl-C or a crash: the events so far reach the output
            self.board.close()

    def _start_epoch(self) -> None:
        if not (self.progress.step_in_epoch and self.states):  # a resume mid-epoch restored the streams' states
            self.states = self.net.zero_states(self.cfg, self.per_worker)
        self.epoch_started, self.epoch_chars = time.monotonic(), 0

    def _train_steps(self, plan: np.ndarray, count: int) -> tuple[bool, float]:
        """`count` steps in one compiled call; returns (every worker must stop now, the summed loss)."""
        import tensorflow as tf

        cfg, p = self.cfg, self.progress
        self._apply_learning_rate(self.agreed_elapsed)
        notice = bool(self.session.preemption_notice())
        signal = tf.constant([float(self.over_budget), p.elapsed_sec, float(notice)], dtype=tf.float32)
        starts = data.shard(plan, self.rank, self.world, p.step_in_epoch, p.step_in_epoch + count)
        windows = data.gather_windows(self.data.train_ids, starts, cfg.seq_len)
        loss_sum, self.states, summed = self.net.steps(windows, self.states, signal, count)
        stop, elapsed_sum, drained = (float(x) for x in summed.numpy())
        self.agreed_elapsed = elapsed_sum / self.world
        self.draining = self.draining or drained > 0
        p.advance(count, float(loss_sum), count * self.chars_per_step, time.monotonic() - self.start_clock)
        self.epoch_chars += count * self.chars_per_step
        return stop > 0, float(loss_sum)

    def _log_progress(self, steps_in_epoch: int, count: int, loss_sum: float) -> None:
        line = self.ticker.tick(time.monotonic(), count, loss_sum, count * self.chars_per_step)
        if self.rank == 0 and line:
            p = self.progress
            self.session.log(progress_line(p, self.cfg.epochs, steps_in_epoch, self.planned_steps, line,
                                           self.budget_sec))
            self.board.scalars(p.global_step, {"train/loss": line.loss, "train/chars_per_sec": line.chars_per_sec,
                                               "train/learning_rate": self.net.learning_rate})

    def _apply_learning_rate(self, elapsed: float) -> None:
        p = self.progress
        done = run_fraction(p.global_step, self.planned_steps, elapsed, self.budget_sec)
        self.net.learning_rate = learning_rate(self.cfg, p.learning_rate, done)

    # ---------------------------------------------------------------- evaluations
    def evaluate(self, kind: str, steps_in_epoch: int) -> None:
        """Held-out loss, metrics line, outputs and checkpoint, at an epoch's end (kind "epoch") or every
        --eval-every-steps ("eval"). An epoch cut short by the time budget is recorded too (partial_epoch) but
        stays open: a resumed run finishes it and replaces its line."""
        cfg, p = self.cfg, self.progress
        chars_per_sec = self.epoch_chars / max(time.monotonic() - self.epoch_started, 1e-9)
        with self.net.averaged_weights(bool(cfg.weight_average)):
            val = self.net.score(self.data.heldout)
            eta = 0.0 if p.stopped_early else eta_seconds(p, self.planned_steps, self.budget_sec)
            metrics = evaluation_metrics(p, cfg.epochs, kind, steps_in_epoch, val, chars_per_sec, eta)
            record_evaluation(p.history, metrics)
            complete = not metrics["partial_epoch"]
            score = metrics["train_loss"] if cfg.select_by == "train_loss" else val
            improved = self._track_best(score, metrics["epoch"], complete)
            metrics["learning_rate"] = self.net.learning_rate
            if kind == "epoch" and complete:
                p.end_epoch()
            if self.rank == 0:
                self.session.log(report.epoch_line(metrics))
                exported = export_config(cfg, p, self.data.meta["corpus_sha256"], self.world, self.parent) \
                    if improved else None
                self.outputs.write(p, metrics, exported)
        self._save(metrics)

    def _track_best(self, score: float, number: int, complete: bool) -> bool:
        """Record a new best score; after --lr-patience complete evaluations without one, decay the base rate."""
        cfg, p = self.cfg, self.progress
        if score < p.best_score:
            p.best_score, p.best_epoch, p.epochs_without_improvement = score, number, 0
            return True
        if complete:
            p.epochs_without_improvement += 1
            if cfg.lr_decay < 1.0 and p.epochs_without_improvement >= cfg.lr_patience:
                p.learning_rate = (p.learning_rate or cfg.learning_rate) * cfg.lr_decay
                p.epochs_without_improvement = 0
                self._apply_learning_rate(p.elapsed_sec)  # the metrics line reports the rate the next step uses
        return False

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, kind: str) -> None:
        """A checkpoint between evaluations: every --checkpoint-every-steps ("step"), or as a node of the run is
        being drained ("preemption")."""
        p = self.progress
        self._save({"epoch": p.epoch, "global_step": p.global_step,
                    "val_loss": p.history[-1]["val_loss"] if p.history else math.inf,
                    "train_loss": p.epoch_loss_sum / p.step_in_epoch, "kind": kind})

    def _save(self, metrics: dict[str, Any]) -> None:
        # Events go up before the checkpoint: those past it are dropped on resume, but none up to it are missing.
        self.board.sync()
        carried = self.cfg.stateful and self.states and self.progress.step_in_epoch  # none at an epoch's start
        states = self.net.gather_states(self.states) if carried else None  # a collective: every worker calls it
        with tempfile.TemporaryDirectory(prefix="charlstm-ckpt-") as tmp:
            if self.rank == 0:
                checkpoint.save(tmp, self.net.model, self.net.optimizer, asdict(self.progress), self.cfg.to_dict(),
                                self.data.vocab.chars, self.data.meta["corpus_sha256"], states)
            self.session.report(metrics, tmp if self.rank == 0 else None)

    def _wait_for_restart(self) -> None:
        """A node of this run is being drained (a preemption announced to Ray: `ray drain-node`, the pods'
        preStop hook, an autoscaler) and this step is checkpointed. A step trained from here would die with
        the node, so none is: every worker waits until Ray Train stops the group (when the node goes or the
        drain's deadline passes) and restarts the run from this checkpoint, on the nodes left (elastic) or once
        capacity returns. Ctrl-C / `ray job stop` still end it."""
        deadline = getattr(self.session.preemption_notice(), "deadline_ms", None)
        when = f"deadline in {max(0.0, deadline / 1000 - time.time()):.0f} s" if deadline else "no deadline given"
        self.session.log(f"a node of this run is being drained ({when}): checkpoint saved at global step "
                         f"{self.progress.global_step}; waiting for Ray Train to restart the run from it")
        while True:
            check_interrupt()
            time.sleep(WAIT_POLL_SECONDS)
