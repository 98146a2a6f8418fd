"""Batched, compiled text generation from a trained model (never `model.predict` per character).

- Embedding (default) models: prime the LSTM state with the prompt once, then advance all samples
  of the batch together one character per step, the whole loop inside one `tf.function`.
- Tutorial models were trained on a sliding window from a zero state, so they keep the sliding
  window (same distribution as the tutorial's loop), but every step is one compiled batched call.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from job import model as model_lib


def filter_logits(logits: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor) -> tf.Tensor:
    """Mask logits outside the top-k (k=0: off) and outside the nucleus of mass top_p (1.0: off)."""
    vocab = tf.shape(logits)[-1]
    neg_inf = tf.fill(tf.shape(logits), tf.constant(-np.inf, logits.dtype))
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    sorted_logits = tf.sort(logits, axis=-1, direction="DESCENDING")
    kth = tf.gather(sorted_logits, k - 1, axis=-1)[:, None]
    logits = tf.where(logits < kth, neg_inf, logits)
    # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p
    # (the token that crosses the threshold is kept).
    sorted_logits = tf.sort(logits, axis=-1, direction="DESCENDING")
    probs = tf.nn.softmax(sorted_logits, axis=-1)
    mass_before = tf.cumsum(probs, axis=-1, exclusive=True)
    keep = mass_before < top_p
    cutoff = tf.reduce_min(tf.where(keep, sorted_logits, tf.fill(tf.shape(sorted_logits), np.inf)), axis=-1)
    return tf.where(logits < cutoff[:, None], neg_inf, logits)


def choose(logits: tf.Tensor, temperature, top_k, top_p, seed: tf.Tensor) -> tf.Tensor:
    """Next ids (batch,) from logits (batch, vocab): greedy when temperature == 0."""
    logits = tf.cast(logits, tf.float32)

    def greedy():
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    def sampled():
        filtered = filter_logits(logits / temperature, top_k, top_p)
        return tf.random.stateless_categorical(filtered, 1, seed=seed, dtype=tf.int32)[:, 0]

    return tf.cond(temperature > 0, sampled, greedy)


class Sampler:
    """Generates continuations for a batch of equal-length prompts of character ids."""

    def __init__(self, model, input_mode: str, vocab_size: int, seq_len: int):
        self.model = model
        self.input_mode = input_mode
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self._fn = tf.function(
            self._generate_embedding if input_mode == "embedding" else self._generate_window,
            reduce_retracing=True,
        )

    def generate(self, prompts: np.ndarray, length: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: tuple[int, int] = (0, 0)) -> np.ndarray:
        """prompts: int32 (batch, P) with P >= 1 (the tutorial presets need P == seq_len)."""
        prompts = np.asarray(prompts, dtype=np.int32)
        if prompts.ndim != 2 or prompts.shape[1] < 1:
            raise ValueError(f"prompts must be (batch, length >= 1), got shape {prompts.shape}")
        out = self._fn(
            tf.constant(prompts), tf.constant(int(length)), tf.constant(float(temperature)),
            tf.constant(int(top_k)), tf.constant(float(top_p)), tf.constant(seed, dtype=tf.int64),
            prompts.shape[1] > 1,
        )
        return out.numpy()

    def _generate_embedding(self, prompts, length, temperature, top_k, top_p, seed, prime: bool):
        batch = tf.shape(prompts)[0]
        layers = model_lib.lstm_layers(self.model)
        embed = self.model.get_layer("embed")
        head = self.model.get_layer("logits")
        states = model_lib.zero_states(self.model, batch)
        if prime:  # once, with all prompt characters but the last; the loop feeds the last
            _, states = model_lib.run_stateful(self.model, prompts[:, :-1], states, training=False)
        states = [tf.cast(s, tf.float32) for s in states]

        def step(ids, states):
            x = embed(ids)
            new = []
            for i, layer in enumerate(layers):
                x, (h, c) = layer.cell(x, [states[2 * i], states[2 * i + 1]], training=False)
                new += [tf.cast(h, tf.float32), tf.cast(c, tf.float32)]
            return head(x), new

        def body(t, ids, states, out):
            logits, states = step(ids, states)
            nxt = choose(logits, temperature, top_k, top_p, tf.stack([seed[0], seed[1] + tf.cast(t, tf.int64)]))
            return t + 1, nxt, states, out.write(t, nxt)

        out = tf.TensorArray(tf.int32, size=length)
        _, _, _, out = tf.while_loop(
            lambda t, *_: t < length, body, (tf.constant(0), prompts[:, -1], states, out),
        )
        return tf.transpose(out.stack())

    def _generate_window(self, prompts, length, temperature, top_k, top_p, seed, prime: bool):
        window = prompts[:, -self.seq_len:]

        def body(t, window, out):
            probs = self.model(model_lib.scale_ids(window, self.vocab_size), training=False)
            logits = tf.math.log(tf.maximum(tf.cast(probs, tf.float32), 1e-30))
            nxt = choose(logits, temperature, top_k, top_p, tf.stack([seed[0], seed[1] + tf.cast(t, tf.int64)]))
            window = tf.concat([window[:, 1:], nxt[:, None]], axis=1)
            return t + 1, window, out.write(t, nxt)

        out = tf.TensorArray(tf.int32, size=length)
        _, _, out = tf.while_loop(lambda t, *_: t < length, body, (tf.constant(0), window, out))
        return tf.transpose(out.stack())
