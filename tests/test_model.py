"""Every LSTM of the presets meant for GPUs is one Keras runs with the cuDNN kernel."""

import pytest

from job.config import PRESETS, TrainConfig


@pytest.mark.parametrize("preset", ["default", "gpu"])
def test_gpu_presets_build_cudnn_eligible_lstms(preset):
    import keras
    from keras.src.backend.tensorflow.rnn import _do_lstm_arguments_support_cudnn

    from job import model

    cfg = TrainConfig(**{**PRESETS[preset], "preset": preset, "output": "unused"}).validate()
    built = model.build(cfg, vocab_size=100)
    layers = model.lstm_layers(built)
    assert [layer.units for layer in layers] == cfg.units
    for layer in layers:
        # What keras.layers.LSTM.inner_loop checks before it calls the cuDNN kernel (Keras 3, TF backend).
        assert layer.use_cudnn in ("auto", True) and layer.recurrent_dropout == 0.0, layer.name
        assert _do_lstm_arguments_support_cudnn(layer.activation, layer.recurrent_activation, layer.unroll,
                                                layer.use_bias), layer.name
        assert isinstance(layer, keras.layers.LSTM) and not layer.go_backwards
    if preset == "gpu":
        assert built.count_params() > 10_000_000 and cfg.batch_size * cfg.seq_len >= 25_600


def test_a_recurrent_dropout_would_fail_the_check():
    """The check above can fail: an LSTM with recurrent dropout or another activation is not cuDNN's."""
    import keras
    from keras.src.backend.tensorflow.rnn import _do_lstm_arguments_support_cudnn

    relu = keras.layers.LSTM(8, activation="relu")
    assert not _do_lstm_arguments_support_cudnn(relu.activation, relu.recurrent_activation, relu.unroll,
                                                relu.use_bias)
    assert keras.layers.LSTM(8, recurrent_dropout=0.1).recurrent_dropout != 0.0


@pytest.mark.parametrize(("preset", "batch", "reserved", "threads"), [
    ("default", 64, 2, 1),  # small steps: one thread measured fastest
    ("default", 512, 2, 2),  # 151 M multiply-adds per step: every core
    ("gpu", 256, 8, 8),  # the gpu preset run on CPUs: 1.2 G multiply-adds per step
    ("seed-small", 128, 4, 4),  # the tutorial: 128 x 257 x 1024 = 34 M
])
def test_cpu_threads_auto(preset, batch, reserved, threads):
    from job.worker import compute_threads

    cfg = TrainConfig(**{**PRESETS[preset], "preset": preset, "output": "unused"})
    assert compute_threads(cfg, batch, reserved) == threads
    cfg.cpu_threads = 3
    assert compute_threads(cfg, batch, reserved) == 3


@pytest.mark.parametrize("unit", ["char", "feature"])
def test_input_dropout_drops_whole_characters_or_single_features(unit):
    """`char` zeroes a position's whole embedding vector (one draw per character); `feature` zeroes entries."""
    import numpy as np

    from job import model

    cfg = TrainConfig(**{**PRESETS["default"], "output": "unused", "input_dropout": 0.5,
                         "input_dropout_unit": unit}).validate()
    layer = model.build(cfg, vocab_size=10).get_layer("dropout_in")
    out = np.asarray(layer(np.ones((8, 50, cfg.embed_dim), np.float32), training=True))
    dropped = out == 0.0
    whole = dropped.all(axis=-1) | ~dropped.any(axis=-1)  # each position: all features dropped or none
    assert 0.3 < dropped.mean() < 0.7
    assert whole.all() if unit == "char" else not whole.all()
    assert np.allclose(out[~dropped], 2.0)  # kept values are scaled by 1 / (1 - rate)
