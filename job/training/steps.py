"""The compiled pieces of one worker's run: the distribution strategy, the model and its optimizer, the
step function (several optimizer steps per compiled call), the held-out scorer and the collectives the loop uses.

Keras 3 `model.fit` breaks under MultiWorkerMirroredStrategy with >= 2 workers, so the step is our own:
gradients are all-reduced here (then clipped on the *global* gradient, which Keras' own per-replica clipping
would not do), and every stop decision travels in an all-reduced signal so no worker is left waiting in a
collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from job.core.config import TrainConfig
from job.model.scoring import HeldOutScorer

# TensorFlow and Keras only inside the functions that run them: the driver imports job.training.worker (and so
# this module) for train_func and must start without TensorFlow.


def make_optimizer(cfg: TrainConfig):
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


def worker_threads(cfg: TrainConfig, in_ray: bool, per_worker_batch: int) -> int | None:
    """Intra-op threads for this worker (None: TensorFlow's default). A Ray worker keeps to the CPUs it reserved."""
    reserved = round(cfg.cpus_per_worker) if in_ray else os.cpu_count() or 1
    if cfg.use_gpu:  # the GPU computes
        return reserved if in_ray else None
    return compute_threads(cfg, per_worker_batch, reserved)


def make_strategy(cpu_threads: int | None = None):
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


@dataclass
class Compiled:
    """The model, its optimizer and the compiled functions over them, built once per worker under `strategy`."""

    strategy: Any
    model: Any
    optimizer: Any
    steps: Callable  # steps(windows, states, signal, count) -> (loss sum, states, all-reduced signal)
    score: HeldOutScorer
    sum: Callable  # all-reduce over every worker
    gather: Callable  # all-gather along axis 0, in rank order

    @classmethod
    def build(cls, cfg: TrainConfig, strategy, vocab_size: int, global_batch: int) -> Compiled:
        import keras

        from job.model import model as model_lib

        if cfg.precision != "float32":
            keras.mixed_precision.set_dtype_policy(cfg.precision)
        with strategy.scope():
            model = model_lib.build(cfg, vocab_size)
            optimizer = make_optimizer(cfg)
            optimizer.build(model.trainable_variables)
        return cls(strategy, model, optimizer, compile_steps(cfg, model, optimizer, strategy, vocab_size, global_batch),
                   HeldOutScorer(cfg, model, vocab_size), collective(strategy, "sum"), collective(strategy, "gather"))

    def check_same_step(self, step: int, world: int) -> None:
        """Every worker must start from the same step, or the collectives would pair different steps."""
        import tensorflow as tf

        summed = float(self.sum(tf.constant(float(step)))) if world > 1 else float(step)
        if abs(summed - step * world) > 0.5:
            raise RuntimeError(f"workers resumed from different checkpoints (step {step} here, sum {summed:.0f} "
                               f"over {world}); the group will be restarted")

    # ---------------------------------------------------------------- learning rate
    def _inner_optimizer(self):
        return getattr(self.optimizer, "inner_optimizer", self.optimizer)

    @property
    def learning_rate(self) -> float:
        return float(np.asarray(self._inner_optimizer().learning_rate))

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self._inner_optimizer().learning_rate = value  # assigns the (mirrored) learning-rate variable

    # ---------------------------------------------------------------- weight averaging
    @contextlib.contextmanager
    def averaged_weights(self, on: bool) -> Iterator[None]:
        """With `on` (--weight-average), the model holds the averaged weights inside the block (scoring, sample,
        export) and the trained ones again after it, bit for bit (checkpoints save those, so resume is exact).
        Swapping in place keeps one copy of each and serves the compiled scorer and sampler unchanged."""
        if not on:
            yield
            return
        # Keras keeps the averages in this list, one per trainable variable in build order, and has no public
        # accessor (only finalize_variable_values, which overwrites the trained weights for good).
        pairs = list(zip(self.model.trainable_variables,
                         self._inner_optimizer()._model_variables_moving_average, strict=True))
        _swap(pairs)
        try:
            yield
        finally:
            _swap(pairs)

    # ---------------------------------------------------------------- LSTM states (stateful presets)
    def zero_states(self, cfg: TrainConfig, per_worker: int) -> list:
        from job.model import model as model_lib

        return model_lib.zero_states(self.model, per_worker) if cfg.stateful else []

    def split_states(self, rows: np.ndarray, cfg: TrainConfig, per_worker: int) -> list:
        """[h0, c0, h1, c1, ...] from this worker's rows of the concatenated states."""
        import tensorflow as tf

        sizes = [int(s.shape[1]) for s in self.zero_states(cfg, per_worker)]
        return [tf.constant(part) for part in np.split(rows, np.cumsum(sizes)[:-1], axis=1)]

    def gather_states(self, states: list) -> np.ndarray:
        """Every worker's states, concatenated per stream and gathered in rank order (a collective: all workers
        call it at the same step)."""
        import tensorflow as tf

        return self.gather(tf.concat(states, axis=1)).numpy()


def _swap(pairs) -> None:
    import tensorflow as tf

    for var, average in pairs:
        held = tf.identity(var.value)
        var.assign(average.value)
        average.assign(held)
