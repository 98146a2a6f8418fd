"""Keras model builders for every preset, and the losses that go with them.

- Tutorial presets (`input_mode="scaled"`): input = char id / vocab size as one float per step,
  output = softmax over the next character after the window (exactly the tutorial's model).
- `default` (`input_mode="embedding"`): int32 ids (batch, time) -> logits (batch, time, vocab).
  Its LSTM layers are built with `return_state=True` so that the same layers serve three graphs:
  the exported ids->logits model (zero initial state), the stateful training graph, and the
  single-step sampler. All LSTM settings are the cuDNN-eligible defaults (else GPUs fall back to a slow kernel).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from job.core.config import TrainConfig


def lstm_name(i: int) -> str:
    return f"lstm_{i}"


def build(cfg: TrainConfig, vocab_size: int) -> keras.Model:
    """The model that is trained and exported."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.input_mode == "scaled":
        return _build_tutorial(cfg, vocab_size)
    return _build_embedding(cfg, vocab_size)


def _build_tutorial(cfg: TrainConfig, vocab_size: int) -> keras.Model:
    inputs = keras.Input(shape=(None, 1), dtype="float32", name="scaled_ids")
    x = inputs
    for i, units in enumerate(cfg.units):
        last = i == len(cfg.units) - 1
        x = keras.layers.LSTM(units, return_sequences=not last, name=lstm_name(i))(x)
        x = keras.layers.Dropout(cfg.dropout, seed=cfg.seed + i, name=f"dropout_{i}")(x)
    probs = keras.layers.Dense(vocab_size, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, probs, name=f"charlstm_{cfg.preset}")


def _build_embedding(cfg: TrainConfig, vocab_size: int) -> keras.Model:
    inputs = keras.Input(shape=(None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab_size, cfg.embed_dim, name="embed")(inputs)
    if cfg.input_dropout > 0:
        # "char": one draw per position drops the character's whole vector, a kind of input noise that kept the
        # model from over-fitting Alice where more output dropout only slowed learning (bench/README.md).
        noise_shape = (None, None, 1) if cfg.input_dropout_unit == "char" else None
        x = keras.layers.Dropout(cfg.input_dropout, noise_shape=noise_shape, seed=cfg.seed + 100,
                                 name="dropout_in")(x)
    for i, units in enumerate(cfg.units):
        x, _h, _c = keras.layers.LSTM(units, return_sequences=True, return_state=True, name=lstm_name(i))(x)
        x = keras.layers.Dropout(cfg.dropout, seed=cfg.seed + i, name=f"dropout_{i}")(x)
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=f"charlstm_{cfg.preset}")


def lstm_layers(model: keras.Model) -> list[keras.layers.LSTM]:
    out = []
    while True:
        try:
            out.append(model.get_layer(lstm_name(len(out))))
        except ValueError:
            return out


def zero_states(model: keras.Model, batch: int) -> list[tf.Tensor]:
    """Flat [h0, c0, h1, c1, ...] zeros for the embedding model's LSTM stack."""
    states = []
    for layer in lstm_layers(model):
        states += [tf.zeros((batch, layer.units)), tf.zeros((batch, layer.units))]
    return states


def run_stateful(model: keras.Model, ids: tf.Tensor, states: list[tf.Tensor], training: bool):
    """Embedding model forward pass from given LSTM states; returns (logits, new_states)."""
    x = model.get_layer("embed")(ids)
    if any(layer.name == "dropout_in" for layer in model.layers):
        x = model.get_layer("dropout_in")(x, training=training)
    new_states = []
    for i, layer in enumerate(lstm_layers(model)):
        x, h, c = layer(x, initial_state=[states[2 * i], states[2 * i + 1]], training=training)
        new_states += [h, c]
        x = model.get_layer(f"dropout_{i}")(x, training=training)
    return model.get_layer("logits")(x), new_states


def scale_ids(ids: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """The tutorial's input encoding: id / vocab size, one float feature per step."""
    return tf.cast(ids, tf.float32)[..., None] / float(vocab_size)


def per_example_loss(cfg: TrainConfig, outputs: tf.Tensor, y: tf.Tensor, mask: tf.Tensor | None = None):
    """Mean next-char cross-entropy (nats) per example; all positions or the last one."""
    if cfg.input_mode == "scaled":
        ce = keras.losses.sparse_categorical_crossentropy(y[:, -1], outputs)
        return ce if mask is None else ce * mask[:, -1]
    ce = keras.losses.sparse_categorical_crossentropy(y, outputs, from_logits=True)
    if mask is None:
        return tf.reduce_mean(ce, axis=-1)
    return tf.reduce_sum(ce * mask, axis=-1)


def forward(cfg: TrainConfig, model: keras.Model, x: tf.Tensor, vocab_size: int, training: bool):
    """Stateless forward pass from int ids (the evaluation and tutorial-training path)."""
    if cfg.input_mode == "scaled":
        return model(scale_ids(x, vocab_size), training=training)
    return model(x, training=training)
