"""Epoch plans, worker shards and held-out windows."""

import numpy as np
import pytest

from job.core.errors import UserError
from job.data import windows as data


@pytest.mark.parametrize("plan_fn", [data.sliding_plan, data.stream_plan])
def test_shards_are_disjoint_and_complete(plan_fn):
    plan = plan_fn(5000, 20, 12, epoch=3, seed=7)
    assert data.shard(plan, 1, 3, 2, 5).tolist() == np.asarray(plan)[2:5, 4:8].tolist()  # rows of one call
    plan = np.asarray(plan)
    for count in (1, 2, 3, 4):
        shards = [data.shard(plan, i, count) for i in range(count)]
        flat = np.concatenate([s.ravel() for s in shards])
        assert len(flat) == plan.size
        assert len(np.unique(flat)) == plan.size  # no window twice
        assert set(flat.tolist()) == set(plan.ravel().tolist())  # none missing


def test_sliding_plan_covers_all_windows_but_the_last_partial_batch():
    n, seq, gb = 1000, 10, 16
    plan = np.asarray(data.sliding_plan(n, seq, gb, epoch=0, seed=0))
    windows = n - seq
    assert plan.size == windows - windows % gb
    assert plan.min() >= 0 and plan.max() + seq < n  # target ids[s+L] inside the training text
    assert not np.array_equal(plan, data.sliding_plan(n, seq, gb, epoch=1, seed=0))
    assert np.array_equal(plan, data.sliding_plan(n, seq, gb, epoch=0, seed=0))


def test_stream_plan_rows_continue_each_stream():
    n, seq, gb = 10_000, 25, 8
    lazy = data.stream_plan(n, seq, gb, epoch=2, seed=1)
    plan = np.asarray(lazy)
    assert plan.shape == lazy.shape and len(lazy) == lazy.steps
    assert np.all(np.diff(plan, axis=0) == seq)  # row k+1 continues row k in every stream
    starts = np.sort(plan.ravel())
    assert np.all(np.diff(starts) == seq)  # contiguous tiling of the text, no gaps, no overlap
    assert plan.max() + seq + 1 <= n
    assert n - 1 - (plan.max() + seq) < gb * seq + seq  # only the last partial batch (+offset) unused


def test_two_workers_see_the_one_worker_global_batches():
    plan = data.stream_plan(10_000, 25, 8, epoch=0, seed=0)
    joined = np.concatenate([data.shard(plan, 0, 2), data.shard(plan, 1, 2)], axis=1)
    assert np.array_equal(joined, np.asarray(plan))


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
    xs, ys, masks = held.dense()
    scored = ys[masks > 0]
    assert sorted(scored.tolist()) == list(range(split, n)) and held.chars == n - split
    for x, y, m in zip(xs, ys, masks, strict=True):
        assert np.array_equal(y, x + 1)  # targets are the next characters
        first = np.argmax(m > 0)
        assert first + 1 >= 100  # at least 100 characters of context before the first scored target


def test_heldout_last_position():
    ids = np.arange(500, dtype=np.int32)
    held = data.heldout_last_position(ids, 400, seq_len=100)
    x, y, _ = held.dense()
    assert held.chars == 100 and np.array_equal(y[:, 0], np.arange(400, 500))
    assert np.array_equal(x[0], np.arange(300, 400))
    sub = data.heldout_last_position(ids, 400, seq_len=100, max_windows=10)
    _, y, _ = sub.dense()
    assert sub.chars == 10 and y[0, 0] == 400 and y[-1, 0] == 499


def test_heldout_needs_enough_training_text():
    with pytest.raises(UserError, match="too short"):
        data.heldout_all_positions(np.arange(120, dtype=np.int32), 60)


def test_gather_windows_reads_inputs_and_targets_from_a_memory_map(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(300, dtype=np.uint16).tofile(path)
    ids = np.memmap(path, dtype=np.uint16, mode="r")
    starts = np.array([[0, 10], [20, 30]])
    w = data.gather_windows(ids, starts, 5)
    assert w.shape == (2, 2, 6) and w.dtype == np.int32
    assert w[1, :, :-1].tolist() == [list(range(20, 25)), list(range(30, 35))]  # inputs
    assert np.array_equal(w[1, :, 1:], w[1, :, :-1] + 1)  # next-character targets
    assert w[0, :, -1].tolist() == [5, 15]  # last-character targets


def _loop_windows(ids: np.ndarray, split: int, context: int = 100, score: int = 100):
    """The protocol as a plain loop (the closed form in data.HeldOut must give exactly these windows)."""
    n = len(ids)
    width = min(context + score, n - 1)
    xs, ys, masks, first = [], [], [], split
    while first < n:
        start = min(first - context - 1, n - 1 - width)
        end = min(start + width, n - 1)
        m = np.zeros(width, np.float32)
        m[first - (start + 1) : end - start] = 1.0
        xs.append(ids[start : start + width])
        ys.append(ids[start + 1 : start + 1 + width])
        masks.append(m)
        first = end + 1
    return np.stack(xs), np.stack(ys), np.stack(masks)


@pytest.mark.parametrize(("n", "split"), [(900, 720), (1234, 987), (1300, 1040), (150, 110), (5000, 102)])
def test_heldout_closed_form_matches_the_protocol_loop(n, split):
    ids = np.random.default_rng(n).integers(0, 50, n).astype(np.int32)
    want = _loop_windows(ids, split)
    got = data.heldout_all_positions(ids, split).dense()
    width = want[0].shape[1]
    for g, w in zip(got, want, strict=True):
        assert g.shape[0] == w.shape[0]
        np.testing.assert_array_equal(g[:, :width], w)
    assert not got[2][:, width:].any()  # padding past a short segment is never scored


def test_heldout_segments_score_each_file_tail_with_its_own_context():
    # Two files' held-out parts, each after its own context: [ctx 300 | 250 scored] [ctx 150 | 99 scored].
    ids = np.arange(799, dtype=np.int32)
    held = data.heldout(ids, [[0, 300, 250], [550, 150, 99]], "all", seq_len=50)
    x, y, m = held.dense()
    scored = sorted(y[m > 0].tolist())
    assert scored == list(range(300, 550)) + list(range(700, 799))
    for xi, mi in zip(x, m, strict=True):
        first = int(np.argmax(mi > 0))
        seg_start = 0 if xi[0] < 550 else 550
        assert xi[first] - seg_start >= 100 - 1 and xi[-1] < (550 if seg_start == 0 else 799)  # never crosses files
    last = data.heldout(ids, [[0, 300, 250], [550, 150, 99]], "last", seq_len=100)
    x, y, _ = last.dense()
    assert y[:, 0].tolist() == list(range(300, 550)) + list(range(700, 799))
    assert (x[:, -1] + 1 == y[:, 0]).all() and x.shape[1] == 100


def test_heldout_subset_is_even_fixed_and_capped():
    ids = np.arange(100_000, dtype=np.int32)
    held = data.heldout_all_positions(ids, 10_000)
    sub = held.subset(5_000)
    assert held.chars == 90_000 and 4_900 <= sub.chars <= 5_000 and sub.windows == 50
    x, _, _ = sub.dense()
    assert x[0, 0] < 10_000 and x[-1, -1] >= 99_000  # spread over the whole held-out part
    np.testing.assert_array_equal(sub.dense()[0], held.subset(5_000).dense()[0])  # the same subset every time
    assert held.subset(10**9) is held
