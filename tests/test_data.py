"""Epoch plans, worker shards and held-out windows."""

import numpy as np
import pytest

from job import data
from job.errors import UserError


@pytest.mark.parametrize("plan_fn", [data.sliding_plan, data.stream_plan])
def test_shards_are_disjoint_and_complete(plan_fn):
    plan = plan_fn(5000, 20, 12, epoch=3, seed=7)
    for count in (1, 2, 3, 4):
        shards = [data.shard(plan, i, count) for i in range(count)]
        flat = np.concatenate([s.ravel() for s in shards])
        assert len(flat) == plan.size
        assert len(np.unique(flat)) == plan.size  # no window twice
        assert set(flat.tolist()) == set(plan.ravel().tolist())  # none missing


def test_sliding_plan_covers_all_windows_but_the_last_partial_batch():
    n, seq, gb = 1000, 10, 16
    plan = data.sliding_plan(n, seq, gb, epoch=0, seed=0)
    windows = n - seq
    assert plan.size == windows - windows % gb
    assert plan.min() >= 0 and plan.max() + seq < n  # target ids[s+L] inside the training text
    assert not np.array_equal(plan, data.sliding_plan(n, seq, gb, epoch=1, seed=0))
    assert np.array_equal(plan, data.sliding_plan(n, seq, gb, epoch=0, seed=0))


def test_stream_plan_rows_continue_each_stream():
    n, seq, gb = 10_000, 25, 8
    plan = data.stream_plan(n, seq, gb, epoch=2, seed=1)
    assert np.all(np.diff(plan, axis=0) == seq)  # row k+1 continues row k in every stream
    starts = np.sort(plan.ravel())
    assert np.all(np.diff(starts) == seq)  # contiguous tiling of the text, no gaps, no overlap
    assert plan.max() + seq + 1 <= n
    assert n - 1 - (plan.max() + seq) < gb * seq + seq  # only the last partial batch (+offset) unused


def test_two_workers_see_the_one_worker_global_batches():
    plan = data.stream_plan(10_000, 25, 8, epoch=0, seed=0)
    joined = np.concatenate([data.shard(plan, 0, 2), data.shard(plan, 1, 2)], axis=1)
    assert np.array_equal(joined, plan)


def test_shard_arguments_checked():
    plan = data.sliding_plan(1000, 10, 6, 0, 0)
    with pytest.raises(ValueError):
        data.shard(plan, 2, 2)
    with pytest.raises(ValueError):
        data.shard(plan, 0, 4)


def test_too_short_text_is_a_user_error():
    with pytest.raises(UserError, match="smaller --batch-size"):
        data.sliding_plan(50, 40, 32, 0, 0)
    with pytest.raises(UserError, match="smaller --batch-size"):
        data.stream_plan(500, 100, 32, 0, 0)


@pytest.mark.parametrize("n", [900, 1234, 1300])
def test_heldout_scores_every_target_once_with_context(n):
    ids = np.arange(n, dtype=np.int32)  # id == position, so targets name themselves
    split = int(n * 0.8)
    held = data.heldout_all_positions(ids, split, context=100, score=100)
    scored = held.y[held.mask > 0]
    assert sorted(scored.tolist()) == list(range(split, n))
    for x, y, m in zip(held.x, held.y, held.mask, strict=True):
        assert np.array_equal(y, x + 1)  # targets are the next characters
        first = np.argmax(m > 0)
        assert first + 1 >= 100  # at least 100 characters of context before the first scored target


def test_heldout_last_position():
    ids = np.arange(500, dtype=np.int32)
    held = data.heldout_last_position(ids, 400, seq_len=100)
    assert held.chars == 100 and np.array_equal(held.y[:, 0], np.arange(400, 500))
    assert np.array_equal(held.x[0], np.arange(300, 400))
    sub = data.heldout_last_position(ids, 400, seq_len=100, max_windows=10)
    assert sub.chars == 10 and sub.y[0, 0] == 400 and sub.y[-1, 0] == 499


def test_heldout_needs_enough_training_text():
    with pytest.raises(UserError, match="too short"):
        data.heldout_all_positions(np.arange(120, dtype=np.int32), 60)


def test_gather_batch_gathers_windows_and_targets():
    import tensorflow as tf

    text = tf.constant(np.arange(300, dtype=np.int32))
    starts = np.array([[0, 10], [20, 30]])
    x, y = (t.numpy() for t in data.gather_batch(text, starts[1], 5, all_positions=True))
    assert x.tolist() == [list(range(20, 25)), list(range(30, 35))]
    assert np.array_equal(y, x + 1)
    x, y = (t.numpy() for t in data.gather_batch(text, starts[0], 5, all_positions=False))
    assert x.tolist() == [list(range(0, 5)), list(range(10, 15))]
    assert y.tolist() == [[5], [15]]
