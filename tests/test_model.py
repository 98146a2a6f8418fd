"""Every LSTM of the presets meant for GPUs is one Keras runs with the cuDNN kernel."""

import pytest

from job.core.config import PRESETS, TrainConfig


def cudnn_refusals(layer) -> list[str]:
    """Why Keras 3 (TensorFlow backend) would not run `layer` with the cuDNN kernel on a GPU, as
    keras.layers.LSTM.inner_loop and the backend's cudnn_ok decide; [] when it would. (Our predicate: the presets'
    test below relies on it, and test_our_predicate_refuses_what_keras_refuses checks it against Keras itself.)"""
    import keras
    import tensorflow as tf

    reasons = []
    if layer.use_cudnn not in ("auto", True):
        reasons.append("use_cudnn")
    if layer.recurrent_dropout:
        reasons.append("recurrent_dropout")
    if layer.activation not in (keras.activations.tanh, keras.ops.tanh, tf.tanh):
        reasons.append("activation")
    if layer.recurrent_activation not in (keras.activations.sigmoid, keras.ops.sigmoid, tf.sigmoid):
        reasons.append("recurrent_activation")
    if layer.unroll:
        reasons.append("unroll")
    if not layer.use_bias:
        reasons.append("use_bias")
    return reasons


def keras_runs_cudnn(layer, width: int) -> bool:
    """What Keras itself does when `layer` runs (training) on a GPU. This machine has none: Keras is told it has
    one, and its cuDNN kernel is replaced by a probe that records the call and declines (NotImplementedError, upon
    which Keras falls back to its generic loop, as it does where cuDNN is missing)."""
    import importlib

    import numpy as np

    rnn = importlib.import_module("keras.src.backend.tensorflow.rnn")  # the module (the package exports a function)

    called = []

    def probe(*args, **kwargs):
        called.append(True)
        raise NotImplementedError

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rnn, "_is_gpu_available", lambda: True)
        mp.setattr(rnn, "_cudnn_lstm", probe)
        try:
            layer(np.zeros((2, 3, width), np.float32), training=True)
        except ValueError as exc:  # use_cudnn=True where Keras would not use cuDNN
            assert "use_cudnn=True was specified" in str(exc)
    return bool(called)


@pytest.mark.parametrize("preset", ["default", "gpu"])
def test_gpu_presets_build_cudnn_eligible_lstms(preset):
    import keras

    from job.model import model

    cfg = TrainConfig(**{**PRESETS[preset], "preset": preset, "output": "unused"}).validate()
    built = model.build(cfg, vocab_size=100)
    layers = model.lstm_layers(built)
    assert [layer.units for layer in layers] == cfg.units
    widths = [cfg.embed_dim, *cfg.units[:-1]]  # each LSTM's input width
    for layer, width in zip(layers, widths, strict=True):
        assert isinstance(layer, keras.layers.LSTM) and not layer.go_backwards, layer.name
        assert cudnn_refusals(layer) == [], layer.name
        assert keras_runs_cudnn(layer, width), layer.name
    if preset == "gpu":
        assert built.count_params() > 10_000_000 and cfg.batch_size * cfg.seq_len >= 25_600


@pytest.mark.parametrize(("settings", "reason"), [
    ({}, None),
    ({"recurrent_dropout": 0.1}, "recurrent_dropout"),
    ({"activation": "relu"}, "activation"),
    ({"recurrent_activation": "hard_sigmoid"}, "recurrent_activation"),
    ({"unroll": True}, "unroll"),
    ({"use_bias": False}, "use_bias"),
    ({"use_cudnn": False}, "use_cudnn"),
    ({"use_cudnn": True, "recurrent_dropout": 0.1}, "recurrent_dropout"),
], ids=["plain", "recurrent-dropout", "relu", "hard-sigmoid", "unroll", "no-bias", "cudnn-off",
        "cudnn-forced-recurrent-dropout"])
def test_our_predicate_refuses_what_keras_refuses(settings, reason):
    """The check above can fail: our predicate names each setting that keeps Keras off the cuDNN kernel, a
    recurrent dropout first of all (an LSTM with the other settings at their defaults is eligible), and Keras
    agrees, so the predicate is neither stricter nor laxer than what Keras does."""
    import keras

    layer = keras.layers.LSTM(8, **settings)
    assert cudnn_refusals(layer) == ([reason] if reason else [])
    assert keras_runs_cudnn(layer, 4) is (reason is None)


@pytest.mark.parametrize(("preset", "batch", "reserved", "threads"), [
    ("default", 64, 2, 1),  # small steps: one thread measured fastest
    ("default", 512, 2, 2),  # 151 M multiply-adds per step: every core
    ("gpu", 256, 8, 8),  # the gpu preset run on CPUs: 1.2 G multiply-adds per step
    ("seed-small", 128, 4, 4),  # the tutorial: 128 x 257 x 1024 = 34 M
])
def test_cpu_threads_auto(preset, batch, reserved, threads):
    from job.training.steps import compute_threads

    cfg = TrainConfig(**{**PRESETS[preset], "preset": preset, "output": "unused"})
    assert compute_threads(cfg, batch, reserved) == threads
    cfg.cpu_threads = 3
    assert compute_threads(cfg, batch, reserved) == 3


@pytest.mark.parametrize("unit", ["char", "feature"])
def test_input_dropout_drops_whole_characters_or_single_features(unit):
    """`char` zeroes a position's whole embedding vector (one draw per character); `feature` zeroes entries."""
    import numpy as np

    from job.model import model

    cfg = TrainConfig(**{**PRESETS["default"], "output": "unused", "input_dropout": 0.5,
                         "input_dropout_unit": unit}).validate()
    layer = model.build(cfg, vocab_size=10).get_layer("dropout_in")
    out = np.asarray(layer(np.ones((8, 50, cfg.embed_dim), np.float32), training=True))
    dropped = out == 0.0
    whole = dropped.all(axis=-1) | ~dropped.any(axis=-1)  # each position: all features dropped or none
    assert 0.3 < dropped.mean() < 0.7
    assert whole.all() if unit == "char" else not whole.all()
    assert np.allclose(out[~dropped], 2.0)  # kept values are scaled by 1 / (1 - rate)
