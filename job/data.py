"""Windows over the encoded corpus: epoch plans, worker shards, held-out windows, tf.data.

Every batching decision is made on plain numpy arrays of *window start offsets* (fast to test,
identical on every worker); TensorFlow only gathers the characters.

An epoch plan is an int array of shape (steps, global_batch). Worker `index` of `count` trains on
columns [index*B, (index+1)*B) of every row, so the workers' shards are disjoint, their union is the
whole plan, and a run with N workers sees exactly the global batches of a 1-worker run at batch N*B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from job.errors import UserError


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # Derived from (seed, epoch) alone so a resumed run replays the same order.
    return np.random.default_rng([int(seed), int(epoch), 0x5EED])


def sliding_plan(n_train: int, seq_len: int, global_batch: int, epoch: int, seed: int) -> np.ndarray:
    """Tutorial windows: every start s with ids[s:s+L] -> ids[s+L] inside the training text, shuffled.

    The last partial global batch is dropped (it changes every epoch, so nothing is skipped for good).
    """
    n_windows = n_train - seq_len
    steps = n_windows // global_batch
    if steps < 1:
        raise UserError(
            f"training text has {n_windows} windows of {seq_len} chars, fewer than one batch of "
            f"{global_batch}; use a longer corpus or a smaller --batch-size / --seq-len"
        )
    order = _rng(seed, epoch).permutation(n_windows)[: steps * global_batch]
    return order.reshape(steps, global_batch).astype(np.int64)


def stream_plan(n_train: int, seq_len: int, global_batch: int, epoch: int, seed: int) -> np.ndarray:
    """char-rnn layout for stateful training: the text is cut into `global_batch` contiguous streams,
    row k holds window k of every stream, so the LSTM state of row k-1 is the right context for row k.

    A random offset in [0, seq_len) each epoch moves the window boundaries.
    """
    offset = int(_rng(seed, epoch).integers(0, seq_len))
    usable = n_train - 1 - offset  # inputs ids[s:s+L], targets ids[s+1:s+L+1]
    steps = usable // (global_batch * seq_len)
    if steps < 1:
        raise UserError(
            f"training text ({n_train} chars) is shorter than one batch of {global_batch} windows of "
            f"{seq_len} chars; use a longer corpus or a smaller --batch-size / --seq-len"
        )
    stream_len = steps * seq_len
    streams = offset + np.arange(global_batch) * stream_len
    return (streams[None, :] + np.arange(steps)[:, None] * seq_len).astype(np.int64)


def shard(plan: np.ndarray, index: int, count: int) -> np.ndarray:
    """The columns of an epoch plan that worker `index` of `count` trains on."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside [0, {count})")
    if plan.shape[1] % count:
        raise ValueError(f"global batch {plan.shape[1]} is not divisible by {count} workers")
    per = plan.shape[1] // count
    return plan[:, index * per : (index + 1) * per]


@dataclass(frozen=True)
class HeldOut:
    """Held-out windows: inputs x (N, W), targets y (N, W) and a 0/1 mask of scored positions."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray

    @property
    def chars(self) -> int:
        return int(self.mask.sum())


def heldout_all_positions(ids: np.ndarray, split: int, context: int = 100, score: int = 100) -> HeldOut:
    """GUIDE §3 protocol for all-position models: windows of context+score chars, stride `score`,
    scoring the last `score` targets of each, so every target in ids[split:] is scored exactly once
    and has at least `context` characters before it (the last window is pulled back to end at the
    text's end and scores only what was not scored yet)."""
    n = len(ids)
    _check_heldout(n, split, context)
    width = min(context + score, n - 1)
    xs, ys, masks = [], [], []
    first = split  # first target index not yet scored
    while first < n:
        start = first - context - 1  # input ids[start:start+width] -> targets ids[start+1:...]
        start = min(start, n - 1 - width)
        end_target = min(start + width, n - 1)  # last target index in this window
        xs.append(ids[start : start + width])
        ys.append(ids[start + 1 : start + 1 + width])
        m = np.zeros(width, np.float32)
        lo = first - (start + 1)
        m[lo : end_target - start] = 1.0
        masks.append(m)
        first = end_target + 1
    return HeldOut(np.stack(xs).astype(np.int32), np.stack(ys).astype(np.int32), np.stack(masks))


def heldout_last_position(ids: np.ndarray, split: int, seq_len: int, max_windows: int | None = None) -> HeldOut:
    """Held-out windows for last-character models (the tutorial's): target t is predicted from
    ids[t-seq_len:t]. `max_windows` takes an evenly spaced subset (a quick per-epoch estimate)."""
    n = len(ids)
    _check_heldout(n, split, seq_len)
    targets = np.arange(split, n)
    if max_windows and len(targets) > max_windows:
        targets = targets[np.linspace(0, len(targets) - 1, max_windows).astype(np.int64)]
    x = np.stack([ids[t - seq_len : t] for t in targets]).astype(np.int32)
    y = ids[targets].astype(np.int32)[:, None]
    return HeldOut(x, y, np.ones_like(y, dtype=np.float32))


def _check_heldout(n: int, split: int, context: int) -> None:
    if split < context + 2 or n - split < 1:
        raise UserError(
            f"corpus too short: {n} chars leave {split} for training, which must exceed one window "
            f"of {context} chars plus the held-out part; use a longer corpus or a smaller --seq-len"
        )


def gather_batch(text, row, seq_len: int, all_positions: bool):
    """One batch (x, y) from window starts `row` (shape (B,)), in TensorFlow ops, for use inside the compiled
    training step: the text stays on the device and each epoch's plan is fed as plain start indices, so no
    per-epoch input pipeline is built (a new tf.data pipeline per epoch cost 15% of a 300 s run)."""
    import tensorflow as tf

    row = tf.cast(row, tf.int32)
    idx = row[:, None] + tf.range(seq_len, dtype=tf.int32)[None, :]
    x = tf.gather(text, idx)
    y = tf.gather(text, idx + 1) if all_positions else tf.gather(text, row + seq_len)[:, None]
    return x, y
