"""Sampler semantics: greedy equals a direct recomputation, top-k / top-p / temperature behave."""

import numpy as np
import pytest
import tensorflow as tf

from job.core.config import PRESETS, TrainConfig
from job.model import model as model_lib
from job.model.sample import GREEDY, SAMPLED, Sampler, choose, filter_logits, row_keys

V = 11


def build(preset: str, units):
    cfg = TrainConfig(**{**PRESETS[preset], "preset": preset, "output": "x", "units": units, "embed_dim": 6})
    return cfg, model_lib.build(cfg, V)


def test_stateful_greedy_equals_full_recomputation():
    cfg, model = build("default", [12, 10])
    prompt = np.random.default_rng(0).integers(0, V, (3, 7)).astype(np.int32)
    out = Sampler(model, "embedding", V, 100).generate(prompt, 15, temperature=0.0)
    seq = prompt.copy()
    for t in range(15):  # recompute the whole sequence from a zero state each step
        logits = np.asarray(model(seq, training=False))[:, -1]
        nxt = logits.argmax(-1).astype(np.int32)
        assert np.array_equal(out[:, t], nxt), f"step {t}"
        seq = np.concatenate([seq, nxt[:, None]], axis=1)


def test_window_greedy_equals_tutorial_loop():
    seq_len = 9
    cfg, model = build("seed-small", [8])
    prompt = np.random.default_rng(1).integers(0, V, (2, seq_len)).astype(np.int32)
    out = Sampler(model, "scaled", V, seq_len).generate(prompt, 12, temperature=0.0)
    for row in range(2):
        pattern = list(prompt[row])
        for t in range(12):  # the tutorial: predict on the scaled window, argmax, slide
            x = np.reshape(pattern, (1, seq_len, 1)) / float(V)
            nxt = int(np.argmax(np.asarray(model(x, training=False))))
            assert out[row, t] == nxt
            pattern = pattern[1:] + [nxt]


def test_top_k_and_top_p_filtering():
    logits = tf.math.log(tf.constant([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda f: np.isfinite(np.asarray(f)[0]).tolist()  # noqa: E731
    assert kept(filter_logits(logits, tf.constant(2), tf.constant(1.0))) == [True, True, False, False]
    assert kept(filter_logits(logits, tf.constant(0), tf.constant(1.0))) == [True] * 4
    assert kept(filter_logits(logits, tf.constant(0), tf.constant(0.5))) == [True, False, False, False]
    assert kept(filter_logits(logits, tf.constant(0), tf.constant(0.7))) == [True, True, False, False]
    assert kept(filter_logits(logits, tf.constant(0), tf.constant(0.81))) == [True, True, True, False]


def test_temperature_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.25, 0.1, 0.05])
    logits = tf.constant(np.log(np.tile(probs, (40000, 1))), tf.float32)
    keys = row_keys(3, tf.range(40000))
    draws = choose(logits, SAMPLED, tf.constant(1.0), tf.constant(0), tf.constant(1.0), keys, tf.constant(4))
    freq = np.bincount(np.asarray(draws), minlength=4) / 40000
    np.testing.assert_allclose(freq, probs, atol=0.01)
    greedy = choose(logits, GREEDY, tf.constant(0.0), tf.constant(0), tf.constant(1.0), keys, tf.constant(4))
    assert set(np.asarray(greedy).tolist()) == {0}


@pytest.mark.parametrize("preset,units", [("default", [12]), ("seed-small", [8])])
def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(preset, units):
    cfg, model = build(preset, units)
    sampler = Sampler(model, cfg.input_mode, V, 9)
    prompt = np.random.default_rng(2).integers(0, V, (4, 9)).astype(np.int32)
    a = sampler.generate(prompt, 30, temperature=1.5, seed=12)
    b = sampler.generate(prompt, 30, temperature=1.5, seed=12)
    c = sampler.generate(prompt, 30, temperature=1.5, seed=99)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    greedy = sampler.generate(prompt, 30, temperature=0.0)
    assert np.array_equal(sampler.generate(prompt, 30, temperature=1.5, top_k=1, seed=55), greedy)


def test_one_character_prompt():
    cfg, model = build("default", [12])
    out = Sampler(model, "embedding", V, 100).generate(np.array([[3], [4]], np.int32), 5, temperature=0.0)
    expected = np.asarray(model(np.array([[3], [4]], np.int32), training=False))[:, -1].argmax(-1)
    assert out.shape == (2, 5) and np.array_equal(out[:, 0], expected)


def test_samples_do_not_depend_on_batch_composition():
    cfg, model = build("default", [12])
    sampler = Sampler(model, "embedding", V, 100)
    prompts = np.random.default_rng(4).integers(0, V, (6, 5)).astype(np.int32)
    ids = np.arange(100, 106)
    whole = sampler.generate(prompts, 25, temperature=1.0, top_p=0.9, seed=7, sample_ids=ids)
    halves = np.concatenate([sampler.generate(prompts[i : i + 3], 25, temperature=1.0, top_p=0.9, seed=7,
                                              sample_ids=ids[i : i + 3]) for i in (0, 3)])
    assert np.array_equal(whole, halves)
    shuffled = sampler.generate(prompts[::-1], 25, temperature=1.0, top_p=0.9, seed=7, sample_ids=ids[::-1])
    assert np.array_equal(whole, shuffled[::-1])


@pytest.mark.parametrize("preset,units", [("default", [12, 10]), ("seed-small", [8])])
def test_xla_loop_gives_the_plain_graph_output_for_any_batch(preset, units):
    """XLA compiles the loop (padding each batch to a power of two); output is that of the plain graph, row by
    row, whatever the batch size, with top-k / top-p / temperature."""
    cfg, model = build(preset, units)
    compiled, plain = Sampler(model, cfg.input_mode, V, 9), Sampler(model, cfg.input_mode, V, 9, xla=False)
    prompts = np.random.default_rng(5).integers(0, V, (5, 9)).astype(np.int32)
    ids = np.arange(40, 45)
    for kwargs in ({"temperature": 0.8}, {"temperature": 1.2, "top_k": 4}, {"temperature": 1.0, "top_p": 0.7}):
        expected = plain.generate(prompts, 20, seed=3, sample_ids=ids, **kwargs)
        assert np.array_equal(compiled.generate(prompts, 20, seed=3, sample_ids=ids, **kwargs), expected)
        parts = [compiled.generate(prompts[i:j], 20, seed=3, sample_ids=ids[i:j], **kwargs)
                 for i, j in ((0, 1), (1, 4), (4, 5))]  # 1, 3 (padded to 4) and 1 rows
        assert np.array_equal(np.concatenate(parts), expected)


def test_padded_rows_are_powers_of_two():
    from job.model.sample import padded_rows

    assert [padded_rows(n) for n in (1, 2, 3, 4, 5, 255, 256, 257, 1000)] == [1, 2, 4, 4, 8, 256, 256, 512, 1024]
