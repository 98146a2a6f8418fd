"""Windows over the encoded corpus: epoch plans, worker shards, held-out windows, the gathered batches.

Every batching decision is made on plain numpy arrays of *window start offsets* (fast to test,
identical on every worker), and the characters of a step's windows are gathered with numpy too: the compiled
training step (job.training.worker) and the held-out scorer (job.model.scoring) receive them as arrays.

An epoch plan is an int array of shape (steps, global_batch). Worker `index` of `count` trains on
columns [index*B, (index+1)*B) of every row, so the workers' shards are disjoint, their union is the
whole plan, and a run with N workers sees exactly the global batches of a 1-worker run at batch N*B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from job.core.errors import UserError


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # Derived from (seed, epoch) alone so a resumed run replays the same order.
    return np.random.default_rng([int(seed), int(epoch), 0x5EED])


class EpochPlan:
    """One epoch's window starts, shape (steps, global_batch); rows are made when asked for.

    A plan over a gigabyte corpus has hundreds of thousands of rows: as an array it would cost every worker
    memory in proportion to the corpus (and be rebuilt each epoch), so a plan hands out the rows of each call."""

    def __init__(self, steps: int, global_batch: int):
        self.steps, self.global_batch = steps, global_batch

    def __len__(self) -> int:
        return self.steps

    @property
    def shape(self) -> tuple[int, int]:
        return self.steps, self.global_batch

    @property
    def size(self) -> int:
        return self.steps * self.global_batch

    def rows(self, start: int = 0, stop: int | None = None, columns: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self.rows()
        return rows if dtype is None else rows.astype(dtype)


class ArrayPlan(EpochPlan):
    """A plan held as an array (shuffled sliding windows: there is no formula for a random order)."""

    def __init__(self, starts: np.ndarray):
        super().__init__(*starts.shape)
        self.starts = starts

    def rows(self, start: int = 0, stop: int | None = None, columns: np.ndarray | None = None) -> np.ndarray:
        rows = self.starts[start:stop]
        return rows if columns is None else rows[:, columns]


class StreamPlan(EpochPlan):
    """Row k, column j starts at offset + j * stream_len + k * seq_len (see stream_plan)."""

    def __init__(self, offset: int, stream_len: int, steps: int, global_batch: int, seq_len: int):
        super().__init__(steps, global_batch)
        self.offset, self.stream_len, self.seq_len = offset, stream_len, seq_len

    def rows(self, start: int = 0, stop: int | None = None, columns: np.ndarray | None = None) -> np.ndarray:
        k = np.arange(start, self.steps if stop is None else min(stop, self.steps), dtype=np.int64)
        j = np.arange(self.global_batch, dtype=np.int64) if columns is None else np.asarray(columns, np.int64)
        return self.offset + j[None, :] * self.stream_len + k[:, None] * self.seq_len


def sliding_plan(n_train: int, seq_len: int, global_batch: int, epoch: int, seed: int) -> ArrayPlan:
    """Tutorial windows: every start s with ids[s:s+L] -> ids[s+L] inside the training text, shuffled.

    The last partial global batch is dropped (it changes every epoch, so nothing is skipped for good). The
    shuffled order is an array of every window start (8 bytes per corpus character): the tutorial presets are
    for book-sized corpora.
    """
    n_windows = n_train - seq_len
    steps = n_windows // global_batch
    if steps < 1:
        raise UserError(
            f"training text has {n_windows} windows of {seq_len} chars, fewer than one batch of "
            f"{global_batch}; use a longer corpus or a smaller --batch-size / --seq-len"
        )
    order = _rng(seed, epoch).permutation(n_windows)[: steps * global_batch]
    return ArrayPlan(order.reshape(steps, global_batch).astype(np.int64))


def stream_plan(n_train: int, seq_len: int, global_batch: int, epoch: int, seed: int) -> StreamPlan:
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
    return StreamPlan(offset, steps * seq_len, steps, global_batch, seq_len)


def shard(plan: EpochPlan | np.ndarray, index: int, count: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of the columns of an epoch plan that worker `index` of `count` trains on."""
    if isinstance(plan, np.ndarray):
        plan = ArrayPlan(plan)
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside [0, {count})")
    if plan.global_batch % count:
        raise ValueError(f"global batch {plan.global_batch} is not divisible by {count} workers")
    per = plan.global_batch // count
    return plan.rows(start, stop, np.arange(index * per, (index + 1) * per))


@dataclass(frozen=True)
class HeldOut:
    """Held-out windows over `ids` (the held-out ids with their context, e.g. a memory-mapped val.bin), kept as
    arithmetic rather than arrays: window `k` is computed when a batch needs it, so a 100 MB held-out part
    costs a few small arrays, and a capped evaluation is an evenly spread subset of window numbers.

    `segments` rows are (offset, context, scored): ids[offset : offset+context] only precede the scored
    ids[offset+context : offset+context+scored] (a row per file of a prepared corpus; held-out protocol: docs/data.md).
    target "all": windows of `context_chars + score` inputs, stride `score`, scoring each target once with at
    least `context_chars` characters before it. target "last": one window of `width` chars per scored target.
    """

    ids: np.ndarray
    segments: np.ndarray  # (S, 3) int64
    target: str
    width: int
    context_chars: int
    score: int
    chosen: np.ndarray | None = None  # window numbers of a subset (None: all)

    @property
    def counts(self) -> np.ndarray:
        scored = self.segments[:, 2]
        if self.target == "all":
            return -(-scored // self.score)
        first = self.segments[:, 0] + np.maximum(self.segments[:, 1], self.width)  # targets with full context
        return np.maximum(0, self.segments[:, 0] + self.segments[:, 1] + scored - first)

    @property
    def windows(self) -> int:
        return int(self.counts.sum()) if self.chosen is None else len(self.chosen)

    @property
    def chars(self) -> int:
        lo, hi = self._spans(self._all_or_chosen())[1:3]
        return int((hi - lo).sum())

    def subset(self, max_chars: int) -> HeldOut:
        """An evenly spread, fixed subset of windows scoring about `max_chars` characters (all if fewer)."""
        per = self.score if self.target == "all" else 1
        total = int(self.counts.sum())
        wanted = max(1, max_chars // per)
        if total <= wanted:
            return self
        chosen = np.unique(np.linspace(0, total - 1, wanted).round().astype(np.int64))
        return HeldOut(self.ids, self.segments, self.target, self.width, self.context_chars, self.score, chosen)

    def _all_or_chosen(self) -> np.ndarray:
        return np.arange(int(self.counts.sum()), dtype=np.int64) if self.chosen is None else self.chosen

    def _spans(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input start in ids, first scored position, one past the last) of each window number."""
        counts = self.counts
        seg = np.searchsorted(np.cumsum(counts), windows, side="right")
        k = windows - (np.cumsum(counts) - counts)[seg]
        offset, context, scored = (self.segments[seg, i] for i in range(3))
        if self.target == "last":
            target = offset + np.maximum(context, self.width) + k
            start = target - self.width
            return start, np.full_like(start, self.width - 1), np.full_like(start, self.width)
        # heldout_all_positions' loop in closed form: window k scores from split + k*score; the last one is
        # pulled back to end at the segment's end and scores only what is left.
        length = context + scored  # ids in the segment
        width = np.minimum(self.width, length - 1)
        first = context + k * self.score
        start = np.minimum(first - self.context_chars - 1, length - 1 - width)
        end = np.minimum(start + width, length - 1)  # last target index
        return offset + start, first - start - 1, end - start

    def batches(self, size: int):
        """Yield (x, y, mask) numpy batches: x int32 (b, width); y (b, width) or (b, 1); mask float32."""
        windows = self._all_or_chosen()
        cols = np.arange(self.width, dtype=np.int64)
        n = len(self.ids)
        for i in range(0, len(windows), size):
            start, lo, hi = self._spans(windows[i : i + size])
            idx = start[:, None] + cols[None, :]
            # Short segments give short windows: pad on the right (never scored, and a causal LSTM's earlier
            # outputs do not depend on later inputs).
            x = np.asarray(self.ids[np.minimum(idx, n - 1)], dtype=np.int32)
            if self.target == "last":
                y = np.asarray(self.ids[start + self.width], dtype=np.int32)[:, None]
                yield x, y, np.ones_like(y, dtype=np.float32)
                continue
            y = np.asarray(self.ids[np.minimum(idx + 1, n - 1)], dtype=np.int32)
            mask = ((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])).astype(np.float32)
            yield x, y, mask

    def dense(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All windows at once (tests and small corpora)."""
        parts = list(self.batches(max(1, self.windows)))
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def heldout(ids: np.ndarray, segments, target: str, seq_len: int, context: int = 100, score: int = 100) -> HeldOut:
    """Held-out windows over prepared held-out ids (see HeldOut); refuses segments without enough context."""
    segments = np.asarray(segments, dtype=np.int64).reshape(-1, 3)
    need = context if target == "all" else seq_len
    if not len(segments) or (target == "all" and segments[:, 1].min() < need + 2):
        bad = segments[np.argmin(segments[:, 1])] if len(segments) else np.zeros(3, np.int64)
        _check_heldout(int(bad[1] + bad[2]), int(bad[1]), need)
    held = (HeldOut(ids, segments, "all", context + score, context, score) if target == "all"
            else HeldOut(ids, segments, "last", seq_len, seq_len, 1))
    if held.windows < 1:
        _check_heldout(int(segments[:, 1:].sum()), int(segments[:, 1].max()), need)
    return held


def heldout_all_positions(ids: np.ndarray, split: int, context: int = 100, score: int = 100) -> HeldOut:
    """The held-out protocol for all-position models over one text split at `split`: windows of context+score
    chars, stride `score`, scoring the last `score` targets of each, so every target in ids[split:] is scored
    exactly once and has at least `context` characters before it (the last window is pulled back to end at the
    text's end and scores only what was not scored yet)."""
    n = len(ids)
    _check_heldout(n, split, context)
    return heldout(ids, [[0, split, n - split]], "all", 0, context, score)


def heldout_last_position(ids: np.ndarray, split: int, seq_len: int, max_windows: int | None = None) -> HeldOut:
    """Held-out windows for last-character models (the tutorial's): target t is predicted from
    ids[t-seq_len:t]. `max_windows` takes an evenly spaced subset (a quick per-epoch estimate)."""
    n = len(ids)
    _check_heldout(n, split, seq_len)
    held = heldout(ids, [[0, split, n - split]], "last", seq_len)
    return held.subset(max_windows) if max_windows else held


def _check_heldout(n: int, split: int, context: int) -> None:
    if split < context + 2 or n - split < 1:
        raise UserError(
            f"corpus too short: {n} chars leave {split} for training, which must exceed one window "
            f"of {context} chars plus the held-out part; use a longer corpus or a smaller --seq-len"
        )


def gather_windows(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """ids[s : s + seq_len + 1] for every window start (any shape), as int32 (..., seq_len + 1): inputs are
    [..., :-1], next-character targets [..., 1:], the last-character target [..., -1:]. Reads only those
    windows from `ids` (a memory map): each step's batch is fed to the compiled step as an argument."""
    starts = np.asarray(starts, dtype=np.int64)
    return np.asarray(ids[starts[..., None] + np.arange(seq_len + 1)], dtype=np.int32)
