"""The per-worker training function: the same code runs in-process (one worker) and on every
Ray Train worker under MultiWorkerMirroredStrategy.

Keras 3 `model.fit` breaks under MultiWorkerMirroredStrategy with >= 2 workers,
so this is a custom distributed loop: gradients are all-reduced here (then clipped on the *global*
gradient, which Keras' own per-replica clipping would not do), several steps run per compiled call,
and every stop decision is all-reduced so no worker is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from job.core import report, storage
from job.core.config import EXPORTED_SETTINGS, TrainConfig
from job.core.errors import UserError, check_interrupt, deferred_interrupts
from job.data import prepare
from job.data import windows as data
from job.data.corpus import Vocab
from job.model import checkpoint, export, finetune
from job.model.scoring import HeldOutScorer
from job.training.schedule import (
    ProgressTicker,
    anneal_factor,
    budget_action,
    eta_seconds,
    progress_line,
    record_evaluation,
    step_event,
    steps_in_next_call,
)
from job.training.session import RunAborted, Session, detect_session
from job.training.tensorboard import Board

# TensorFlow, Keras and job.model.model / job.model.sample (which import them) only inside the functions that run
# them: the driver imports this module (ensure_dataset; train_func for Ray) and must start without TensorFlow.


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
    learning_rate: float = 0.0  # base rate after plateau decays (before annealing); 0 = not set yet
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def _make_optimizer(cfg: TrainConfig):
    import keras

    base = keras.optimizers.AdamW if cfg.weight_decay > 0 else keras.optimizers.Adam

    class PreReduced(base):
        """Adam(W) that trusts the caller to have all-reduced (and clipped) the gradients already."""

        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)

    # Keras keeps the average in the optimizer's variables, so checkpoints carry it and resume stays exact.
    ema = dict(use_ema=True, ema_momentum=cfg.weight_average) if cfg.weight_average > 0 else {}
    if cfg.weight_decay > 0:
        opt = PreReduced(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, **ema)
        opt.exclude_from_weight_decay(var_names=["bias"])
    else:
        opt = PreReduced(learning_rate=cfg.learning_rate, **ema)
    if cfg.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


# Measured on the 2-core benchmark machine (forward + backward + AdamW of two stacked LSTMs, chars/s, one vs two
# intra-op threads): 192 units x batch 64 (19 M multiply-adds per layer and time step) 26.2k vs 23.9k;
# 192 x 128 (38 M) 30.1k vs 30.1k; 256 x 64 (34 M) 7.0k vs 9.2k; 512 x 64 (134 M) 1.8k vs 2.2k. Below this size
# splitting each step's matmul over threads costs more than it saves (XLA-compiling the step was slower still:
# 9.4k / 13.1k for 192 x 64).
SMALL_STEP_MACS = 32_000_000
# loss.png is redrawn at most this often (and at the run's last evaluation): drawing it takes ~0.13 s, 3% of an
# epoch of Alice, and metrics.jsonl has every evaluation anyway.
PLOT_EVERY_SECONDS = 30.0
# How often a worker waiting out a drain looks for Ctrl-C / SIGTERM.
WAIT_POLL_SECONDS = 0.5


def compute_threads(cfg: TrainConfig, per_worker_batch: int, reserved: int) -> int:
    """TensorFlow intra-op threads for one CPU worker: --cpu-threads, else 1 for small LSTM steps, else the
    CPUs the worker has (`reserved`)."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    width = cfg.embed_dim if cfg.input_mode == "embedding" else 1
    macs = 0
    for units in cfg.units:
        macs, width = max(macs, per_worker_batch * (width + units) * 4 * units), units
    return 1 if macs <= SMALL_STEP_MACS else max(1, reserved)


def _make_strategy(cpu_threads: int | None = None):
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # MWMS logs every collective at INFO
    if cpu_threads and tf.config.threading.get_intra_op_parallelism_threads() != cpu_threads:
        # A Ray worker that reserved N CPUs uses N compute threads: by default TensorFlow sizes its pool to
        # every core of the node, so workers sharing a node would oversubscribe it. Must precede any op: a
        # process that has run TensorFlow already (a notebook, the tests) keeps the threads it has.
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(cpu_threads)

    # Under Ray, job.cluster.backend sets TF_CONFIG; in-process runs use the default strategy.
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


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


def _replica_step(cfg: TrainConfig, model, opt, vocab_size: int, global_batch: int):
    """One optimizer step on one replica: gradients all-reduced, then clipped on the *global* gradient."""
    import tensorflow as tf

    from job.model import model as model_lib

    fp16 = cfg.precision == "mixed_float16"

    def step(batch, states, signal):
        x, y = batch
        with tf.GradientTape() as tape:
            if cfg.stateful:
                outputs, new_states = model_lib.run_stateful(model, x, states, training=True)
            else:
                outputs, new_states = model_lib.forward(cfg, model, x, vocab_size, True), states
            per_example = model_lib.per_example_loss(cfg, outputs, y)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = opt.scale_loss(loss) if fp16 else loss
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, model.trainable_variables)]
        ctx = tf.distribute.get_replica_context()
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if cfg.clip_norm > 0:
            # With float16 loss scaling the gradients are still scaled here: clip at the scaled norm.
            limit = cfg.clip_norm * tf.cast(opt.dynamic_scale, tf.float32) if fp16 else cfg.clip_norm
            grads, _ = tf.clip_by_global_norm(grads, limit)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        # tf.identity places the flag on this replica; an argument passed straight through has no device and
        # MultiWorkerMirroredStrategy refuses to reduce it ("destinations can not be empty").
        # signal = [over budget?, seconds elapsed, node being drained?]: summed over workers, so every worker
        # stops (or checkpoints for a drain) after the same step and anneals from the same clock.
        signal = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(signal))
        return loss, [tf.stop_gradient(s) for s in new_states], signal

    return step


def compile_steps(cfg: TrainConfig, model, opt, strategy, vocab_size: int, global_batch: int):
    """`steps(windows, states, signal, count)`: `count` optimizer steps in one compiled call."""
    import tensorflow as tf

    replica_step = _replica_step(cfg, model, opt, vocab_size, global_batch)
    all_positions = cfg.target == "all"

    def steps(windows, states, signal, count: int):
        # windows: (count, per-worker batch, seq_len + 1) ids, gathered from the memory map by the caller
        # (a corpus captured as a constant would be held whole by every worker).
        total = tf.constant(0.0)
        summed = tf.zeros([3])
        for i in range(count):
            w = windows[i]
            batch = (w[:, :-1], w[:, 1:] if all_positions else w[:, -1:])
            loss, states, summed = strategy.run(replica_step, args=(batch, states, signal))
            total += strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        # Each replica holds the same all-reduced vector; take one copy rather than summing again.
        return total, states, strategy.experimental_local_results(summed)[0]

    return tf.function(steps, reduce_retracing=True)


def collective(strategy, op: str):
    """A compiled all-reduce ("sum") or all-gather along axis 0 ("gather") over every worker, in rank order."""
    import tensorflow as tf

    @tf.function
    def run(x):
        def replica(v):
            ctx = tf.distribute.get_replica_context()
            v = tf.identity(v)  # placed on this replica (see _replica_step)
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, v) if op == "sum" else ctx.all_gather(v, axis=0)

        return strategy.experimental_local_results(strategy.run(replica, (x,)))[0]

    return run


class Trainer:
    """One worker's run: set up, then epochs of compiled steps with evaluations and checkpoints in between."""

    def __init__(self, cfg: TrainConfig, session: Session, hooks: Any = None):
        self.cfg, self.session, self.hooks = cfg, session, hooks
        self.rank, self.world = session.rank, session.world_size
        # Fixed for the run; the worker count may change between resumes (elastic runs), the global batch not.
        self.global_batch = cfg.global_batch
        if self.global_batch % self.world:
            raise RuntimeError(f"global batch {self.global_batch} does not split over {self.world} workers")
        self.per_worker = self.global_batch // self.world
        self.chars_per_step = self.global_batch * (cfg.seq_len if cfg.target == "all" else 1)
        self.budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        self.progress = Progress()
        self.board: Board | None = None
        self.states: list = []  # this worker's LSTM states (stateful presets), carried across steps
        self.sampler = None  # built on first use: a new Sampler would retrace every epoch
        self.over = 0.0  # becomes 1.0 once this worker's clock passes the budget (all-reduced with the next step)
        self.draining = False  # every worker has learnt that a node of this run is being drained (preemption)
        self.agreed_elapsed = 0.0  # the workers' mean clock, as of the last all-reduce
        self.plotted = -math.inf  # when loss.png was last drawn
        self.parent = None  # the model a fine-tuning run started from (--init-from)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        try:
            self._setup()
            p = self.progress
            while p.epoch < self.cfg.epochs and not p.stopped_early:
                if not self._train_epoch():
                    break  # the budget ran out exactly at an epoch boundary
                if self.draining and p.epoch < self.cfg.epochs:
                    self._wait_for_restart()  # the epoch's end was checkpointed as the drain became known
            if self.hooks:
                self.hooks.at_end(self)
            final = dict(p.history[-1]) if p.history else {}
            final.update(best_epoch=p.best_epoch, best_score=p.best_score, select_by=self.cfg.select_by,
                         stopped_early=p.stopped_early, global_batch=self.global_batch, workers=self.world)
            return final
        finally:
            if self.board:  # also on a time-budget stop, Ctrl-C or a crash: the events so far reach the output
                self.board.close()

    def _train_epoch(self) -> bool:
        """The rest of the current epoch, then its evaluation; False when no step of it ran."""
        cfg, p = self.cfg, self.progress
        plan = self.plan_fn(len(self.train_ids), cfg.seq_len, self.global_batch, p.epoch, cfg.seed)
        steps_total = len(plan)
        if not (p.step_in_epoch and self.states):  # a resume mid-epoch restored the streams' states
            self.states = self._zero_states()
        started, chars = time.monotonic(), 0
        while p.step_in_epoch < steps_total:
            # From agreed values only: every collective of a call pairs with the same one on the other workers,
            # so a worker whose clock alone passed the budget still runs the call the others run.
            count = steps_in_next_call(cfg.steps_per_call, steps_total - p.step_in_epoch, p.global_step,
                                       (cfg.checkpoint_every_steps, cfg.eval_every_steps))
            stop, loss_sum = self._train_steps(plan, count)
            chars += count * self.chars_per_step
            if self.hooks:
                self.hooks.after_step(self)
            check_interrupt()
            self._log_progress(steps_total, count, loss_sum)
            budget = budget_action(stop, p.elapsed_sec, self.budget, self.world)
            if budget == "stop":
                p.stopped_early = True
                break
            if budget == "signal":
                self.over = 1.0
            event = step_event(p.global_step, p.step_in_epoch < steps_total, cfg.eval_every_steps,
                               cfg.checkpoint_every_steps)
            if event == "evaluate":
                self._evaluate("eval", steps_total, chars, time.monotonic() - started)
            elif event == "checkpoint":
                self._save_step_checkpoint("step")
            if self.draining and p.step_in_epoch < steps_total:
                if event is None:
                    self._save_step_checkpoint("preemption")
                self._wait_for_restart()
        if p.step_in_epoch == 0:
            return False
        self._evaluate("epoch", steps_total, chars, time.monotonic() - started)
        return True

    def _train_steps(self, plan, count: int) -> tuple[bool, float]:
        """`count` steps in one compiled call; returns (every worker must stop now, the summed loss)."""
        import tensorflow as tf

        cfg, p = self.cfg, self.progress
        self._apply_learning_rate(self.agreed_elapsed)
        notice = 1.0 if self.session.preemption_notice() else 0.0
        signal = tf.constant([self.over, p.elapsed_sec, notice], dtype=tf.float32)
        starts = data.shard(plan, self.rank, self.world, p.step_in_epoch, p.step_in_epoch + count)
        windows = data.gather_windows(self.train_ids, starts, cfg.seq_len)
        loss_sum, self.states, summed = self._steps(windows, self.states, signal, count)
        stop, elapsed_sum, drained = (float(x) for x in summed.numpy())
        self.agreed_elapsed = elapsed_sum / self.world
        self.draining = self.draining or drained > 0
        p.step_in_epoch += count
        p.global_step += count
        p.epoch_loss_sum += float(loss_sum)
        p.train_chars += count * self.chars_per_step
        p.elapsed_sec = time.monotonic() - self.start_clock
        return stop > 0, float(loss_sum)

    def _log_progress(self, steps_total: int, count: int, loss_sum: float) -> None:
        line = self.ticker.tick(time.monotonic(), count, loss_sum, count * self.chars_per_step)
        if self.rank == 0 and line:
            self.session.log(progress_line(self.progress, self.cfg.epochs, steps_total, self.total_steps, line,
                                           self.budget))
            self.board.scalars(self.progress.global_step, {"train/loss": line.loss,
                                                           "train/chars_per_sec": line.chars_per_sec,
                                                           "train/learning_rate": self._learning_rate()})

    # ---------------------------------------------------------------- set-up
    def _setup(self) -> None:
        cfg = self.cfg
        reserved = round(cfg.cpus_per_worker) if self.session.in_ray else os.cpu_count() or 1
        if cfg.use_gpu:  # the GPU computes; a Ray worker still keeps to the CPUs it reserved
            threads = reserved if self.session.in_ray else None
        else:
            threads = compute_threads(cfg, self.per_worker, reserved)
        self.strategy = _make_strategy(threads)  # must exist before any other TensorFlow op
        self._prepare_data()
        self._build()
        resumed = self._resume()
        if cfg.init_from:
            self.parent = finetune.find_parent(cfg.init_from)
            if not resumed:  # a resumed fine-tuning run continues from its own checkpoint
                finetune.transfer(self.model, self.parent, self.vocab)
                self.session.log(f"initialised from {self.parent.url} ({self.parent.kind}, sha256 "
                                 f"{self.parent.sha256[:12]}): {len(self.parent.vocab)} characters carried over, "
                                 f"{len(self.vocab) - len(self.parent.vocab)} new")
        p = self.progress
        if resumed:
            self.session.log(f"resumed from checkpoint: epoch {p.epoch}, step {p.step_in_epoch} of the next "
                             f"epoch, global step {p.global_step}")
        self._steps = compile_steps(cfg, self.model, self.optimizer, self.strategy, len(self.vocab),
                                    self.global_batch)
        self._score = HeldOutScorer(cfg, self.model, len(self.vocab))
        self._sum, self._gather = collective(self.strategy, "sum"), collective(self.strategy, "gather")
        self._check_workers_agree()
        self.board = Board(cfg, self.rank, p.global_step if resumed else None)
        self.board.config(p.global_step, cfg.to_dict())
        self.session.log(
            f"training {cfg.preset}: {len(self.train_ids):,} train chars, {self.heldout_chars:,} held-out "
            f"chars ({self.heldout.chars:,} scored per evaluation), vocab {len(self.vocab)}, {self.world} "
            f"worker(s), global batch {self.global_batch} ({self.per_worker} per worker), "
            f"{self.model.count_params():,} parameters")
        # The budget is for the whole run, resumes included; a larger --max-minutes continues a run that had
        # stopped on its budget.
        p.stopped_early = p.elapsed_sec >= self.budget
        if p.stopped_early:
            self.session.log(f"time budget already spent ({p.elapsed_sec / 60:.1f} of {cfg.max_minutes:g} min); "
                             "raise --max-minutes to train further")
        self.start_clock = time.monotonic() - p.elapsed_sec
        self.agreed_elapsed = p.elapsed_sec
        # The run's planned length, for annealing by steps (epoch plans differ by at most a step: fixed here so
        # the schedule never jumps).
        self.total_steps = cfg.epochs * len(self.plan_fn(len(self.train_ids), cfg.seq_len, self.global_batch, 0,
                                                         cfg.seed))
        self.ticker = ProgressTicker(cfg.log_every_seconds, time.monotonic())

    def _prepare_data(self) -> None:
        """Memory-map the prepared dataset (the driver prepared it, job.prepare): no worker holds the corpus as
        a string or a tensor, and only the pages a step touches become resident."""
        cfg = self.cfg
        ds = prepare.open_local(cfg.data_url)
        self.dataset, self.vocab, self.train_ids = ds, ds.vocab, ds.train
        full = data.heldout(ds.val, ds.val_segments, cfg.target, cfg.seq_len)
        self.heldout_chars = full.chars
        self.heldout = full.subset(cfg.val_max_chars if cfg.target == "all" else cfg.val_max_windows)
        self.plan_fn = data.stream_plan if cfg.stateful else data.sliding_plan
        self.plan_fn(len(self.train_ids), cfg.seq_len, self.global_batch, 0, cfg.seed)  # fail early if too short
        self.sample_prompt = np.asarray(self.train_ids[-cfg.seq_len:], dtype=np.int32)

    def _build(self) -> None:
        import keras

        from job.model import model as model_lib

        cfg = self.cfg
        if cfg.precision != "float32":
            keras.mixed_precision.set_dtype_policy(cfg.precision)
        with self.strategy.scope():
            self.model = model_lib.build(cfg, len(self.vocab))
            self.optimizer = _make_optimizer(cfg)
            self.optimizer.build(self.model.trainable_variables)

    def _check_workers_agree(self) -> None:
        """Every worker must start from the same step, or the collectives would pair different steps."""
        import tensorflow as tf

        step = float(self.progress.global_step)
        summed = float(self._sum(tf.constant(step))) if self.world > 1 else step
        if abs(summed - step * self.world) > 0.5:
            raise RuntimeError(f"workers resumed from different checkpoints (step {step:.0f} here, "
                               f"sum {summed:.0f} over {self.world}); the group will be restarted")

    # ---------------------------------------------------------------- checkpoints and LSTM states
    def _resume(self) -> bool:
        """Restore the newest checkpoint that loads; a damaged one is passed over with one line. False: none."""
        tried = 0
        for step, directory in self.session.checkpoints():
            tried += 1
            try:
                self._restore_checkpoint(directory)
                return True
            except checkpoint.Damaged as exc:
                self.session.log(f"checkpoint at global step {step} cannot be restored ({exc}); "
                                 "trying the one before it")
        if tried:
            raise UserError(f"none of the {tried} checkpoint(s) of run {self.cfg.run!r} in {self.cfg.output} can be "
                            "restored (see the lines above); start the run again in another --output")
        return False

    def _restore_checkpoint(self, directory: str) -> None:
        progress, states = checkpoint.restore(directory, self.model, self.optimizer, self.vocab.chars)
        self.progress = Progress(**progress)
        if states is not None and self.progress.step_in_epoch:
            self.states = self._split_states(states[self.rank * self.per_worker:][:self.per_worker])
        if self.progress.learning_rate:
            self._set_learning_rate(self.progress.learning_rate)

    def _zero_states(self) -> list:
        from job.model import model as model_lib

        return model_lib.zero_states(self.model, self.per_worker) if self.cfg.stateful else []

    def _split_states(self, rows: np.ndarray) -> list:
        """[h0, c0, h1, c1, ...] from this worker's rows of the concatenated states."""
        import tensorflow as tf

        sizes = [int(s.shape[1]) for s in self._zero_states()]
        return [tf.constant(part) for part in np.split(rows, np.cumsum(sizes)[:-1], axis=1)]

    def _gathered_states(self) -> np.ndarray | None:
        """Every worker's states, concatenated per stream and gathered in rank order (a collective: all workers
        call it at the same step). None where there is nothing to carry (epoch start, stateless presets)."""
        import tensorflow as tf

        if not (self.cfg.stateful and self.states and self.progress.step_in_epoch):
            return None
        return self._gather(tf.concat(self.states, axis=1)).numpy()

    def _save_step_checkpoint(self, kind: str) -> None:
        """A checkpoint between evaluations: every --checkpoint-every-steps ("step"), or as a node of the run is
        being drained ("preemption")."""
        p = self.progress
        last_val = p.history[-1]["val_loss"] if p.history else math.inf
        self._report({"epoch": p.epoch, "global_step": p.global_step, "val_loss": last_val,
                      "train_loss": p.epoch_loss_sum / p.step_in_epoch, "kind": kind})

    def _wait_for_restart(self) -> None:
        """A node of this run is being drained (a preemption announced to Ray: `ray drain-node`, the pods'
        preStop hook, an autoscaler) and this step is checkpointed. A step trained from here would die with
        the node, so none is: every worker waits until Ray Train stops the group (when the node goes or the
        drain's deadline passes) and restarts the run from this checkpoint, on the nodes left (elastic) or once
        capacity returns. Ctrl-C / `ray job stop` still end it."""
        notice = self.session.preemption_notice()
        deadline = getattr(notice, "deadline_ms", None)
        when = f"deadline in {max(0.0, deadline / 1000 - time.time()):.0f} s" if deadline else "no deadline given"
        self.session.log(f"a node of this run is being drained ({when}): checkpoint saved at global step "
                         f"{self.progress.global_step}; waiting for Ray Train to restart the run from it")
        while True:
            check_interrupt()
            time.sleep(WAIT_POLL_SECONDS)

    def _report(self, metrics: dict[str, Any]) -> None:
        # Events go up before the checkpoint: those past it are dropped on resume, but none up to it are missing.
        self.board.sync()
        states = self._gathered_states()
        with tempfile.TemporaryDirectory(prefix="charlstm-ckpt-") as tmp:
            if self.rank == 0:
                checkpoint.save(tmp, self.model, self.optimizer, asdict(self.progress), self.cfg.to_dict(),
                                self.vocab.chars, self.dataset.meta["corpus_sha256"], states)
            self.session.report(metrics, tmp if self.rank == 0 else None)

    # ---------------------------------------------------------------- learning rate
    def _inner_optimizer(self):
        return getattr(self.optimizer, "inner_optimizer", self.optimizer)

    def _learning_rate(self) -> float:
        return float(np.asarray(self._inner_optimizer().learning_rate))

    def _set_learning_rate(self, value: float) -> None:
        """Set the base rate (what plateau decays change); annealing scales it at every call."""
        self.progress.learning_rate = value
        self._inner_optimizer().learning_rate = value  # assigns the (mirrored) learning-rate variable

    def _apply_learning_rate(self, elapsed: float) -> None:
        if self.cfg.lr_anneal <= 0:
            return
        p = self.progress
        done = max(p.global_step / max(1, self.total_steps), elapsed / self.budget)
        self._inner_optimizer().learning_rate = (p.learning_rate or self.cfg.learning_rate) * anneal_factor(
            done, self.cfg.lr_anneal)

    # ---------------------------------------------------------------- evaluations and outputs
    def heldout_loss(self) -> float:
        return self._score(self.heldout)

    def _evaluate(self, kind: str, steps_total: int, chars: int, seconds: float) -> None:
        """Held-out loss, metrics line, outputs and checkpoint, at an epoch's end (kind "epoch") or every
        --eval-every-steps (kind "eval"). An epoch cut short by the time budget is recorded too (partial_epoch)
        but stays open: a resumed run finishes it and replaces its line."""
        with self._averaged_weights():
            val = self._score(self.heldout)
            metrics = self._record_evaluation(kind, steps_total, chars, seconds, val)
        self._report(metrics)

    def _record_evaluation(self, kind: str, steps_total: int, chars: int, seconds: float, val: float) -> dict:
        cfg, p = self.cfg, self.progress
        partial = kind == "epoch" and p.step_in_epoch < steps_total
        number = p.epoch + 1
        train_loss = p.epoch_loss_sum / max(1, p.step_in_epoch)
        metrics = {
            "epoch": number, "epochs": cfg.epochs, "epoch_float": p.epoch + p.step_in_epoch / steps_total,
            "global_step": p.global_step, "train_loss": train_loss, "val_loss": val, "val_bpc": report.bits(val),
            "chars_per_sec": chars / max(seconds, 1e-9), "elapsed_sec": p.elapsed_sec,
            "eta_sec": 0.0 if p.stopped_early else eta_seconds(p, self.total_steps, self.budget),
            "train_chars": p.train_chars, "partial_epoch": partial, "kind": kind,
        }
        record_evaluation(p.history, metrics)
        improved = self._track_best(train_loss if cfg.select_by == "train_loss" else val, number, partial)
        metrics["learning_rate"] = self._learning_rate()
        if kind == "epoch" and not partial:
            p.epoch, p.step_in_epoch, p.epoch_loss_sum = number, 0, 0.0
        if self.rank == 0:
            self.session.log(report.epoch_line(metrics))
            self.board.scalars(p.global_step, {"heldout/loss_nats": val, "heldout/bits_per_char": metrics["val_bpc"]})
            self._write_outputs(improved, f"epoch-{number:03d}" if kind == "epoch" else f"step-{p.global_step:09d}")
        return metrics

    @contextlib.contextmanager
    def _averaged_weights(self):
        """With --weight-average, the model holds the averaged weights inside the block (scoring, sample,
        export) and the trained ones again after it, bit for bit (checkpoints save those, so resume is exact).
        Swapping in place keeps one copy of each and serves the compiled scorer and sampler unchanged."""
        if not self.cfg.weight_average:
            yield
            return
        # Keras keeps the averages in this list, one per trainable variable in build order, and has no public
        # accessor (only finalize_variable_values, which overwrites the trained weights for good).
        pairs = list(zip(self.model.trainable_variables,
                         self._inner_optimizer()._model_variables_moving_average, strict=True))
        self._swap(pairs)
        try:
            yield
        finally:
            self._swap(pairs)

    @staticmethod
    def _swap(pairs) -> None:
        import tensorflow as tf

        for var, average in pairs:
            held = tf.identity(var.value)
            var.assign(average.value)
            average.assign(held)

    def _track_best(self, score: float, number: int, partial: bool) -> bool:
        """Record a new best score; after `lr_patience` complete epochs without one, decay the learning rate."""
        cfg, p = self.cfg, self.progress
        if score < p.best_score:
            p.best_score, p.best_epoch = score, number
            p.epochs_without_improvement = 0
            return True
        if not partial:
            p.epochs_without_improvement += 1
            if cfg.lr_decay < 1.0 and p.epochs_without_improvement >= cfg.lr_patience:
                self._set_learning_rate((p.learning_rate or cfg.learning_rate) * cfg.lr_decay)
                self._apply_learning_rate(p.elapsed_sec)  # report the rate the next step will use
                p.epochs_without_improvement = 0
        return False

    def _sample_text(self) -> str:
        from job.model.sample import Sampler

        if self.sampler is None:  # one short sample per evaluation: not worth an XLA compile
            self.sampler = Sampler(self.model, self.cfg.input_mode, len(self.vocab), self.cfg.seq_len,
                                   self.vocab.unknown_id, xla=False)
        out = self.sampler.generate(self.sample_prompt[None, :], self.cfg.sample_chars, temperature=0.8,
                                    seed=self.cfg.seed * 1000 + self.progress.epoch)
        return self.vocab.decode(out[0])

    def _write_outputs(self, improved: bool, sample_name: str) -> None:
        cfg, p, out = self.cfg, self.progress, self.cfg.output
        report.write_metrics(out, p.history)
        now, last = time.monotonic(), p.history[-1]
        final = p.stopped_early or (last["kind"] == "epoch" and last["epoch"] >= cfg.epochs)
        if final or now - self.plotted >= PLOT_EVERY_SECONDS:
            self.plotted = now
            report.write_loss_plot(out, p.history, f"charlstm {cfg.preset}")
        prompt, sample = self.vocab.decode(self.sample_prompt), self._sample_text()
        report.write_sample(out, sample_name, prompt, sample)
        self.board.text(p.global_step, "sample", f"{prompt}\n---\n{sample}")
        if improved:
            export.save(self.model, self.vocab, self.export_config(), storage.join(self.cfg.output, "model"))

    def export_config(self) -> dict[str, Any]:
        cfg, p = self.cfg, self.progress
        last = p.history[-1]
        return {
            **{k: getattr(cfg, k) for k in EXPORTED_SETTINGS},
            "corpus": cfg.corpus, "dataset": cfg.data_url, "corpus_sha256": self.dataset.meta["corpus_sha256"],
            "epoch": last["epoch"],
            "global_step": p.global_step, "val_loss": last["val_loss"], "val_bpc": last["val_bpc"],
            "train_loss": last["train_loss"], "workers": self.world, "global_batch": self.global_batch,
            "lowercase": not cfg.keep_case,
            **({"parent": {"url": self.parent.url, "kind": self.parent.kind, "sha256": self.parent.sha256}}
               if self.parent else {}),
        }
