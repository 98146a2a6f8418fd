"""The Keras tutorial's method ("Text Generation With LSTM Recurrent Neural Networks in Python with Keras"),
as the baseline of the side-by-side benchmark.

Training: the tutorial is our `seed-small` preset (scaled-integer windows of 100 -> one LSTM(256) ->
Dropout(0.2) -> Dense softmax on the next character after the window, Adam 1e-3, batch 128, best model
kept by training loss). `check_seed_small()` verifies that, so the benchmark can train it through the same
`job.training.worker.train_func` path as ours. Generation: `generate()` is the tutorial's loop verbatim, one
`model.predict` per character on a (1, 100, 1) window, argmax, slide the window.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

# The tutorial's settings (its first, "small" model).
TUTORIAL = {
    "input_mode": "scaled",  # X = ids / n_vocab, shape (N, 100, 1)
    "seq_len": 100,
    "units": [256],
    "dropout": 0.2,
    "target": "last",  # y = one-hot of the character after the window
    "stateful": False,
    "batch_size": 128,
    "learning_rate": 1e-3,  # Keras Adam default
    "clip_norm": 0.0,
    "select_by": "train_loss",  # ModelCheckpoint(monitor="loss", save_best_only=True)
}

# Known, deliberate differences of seed-small from the tutorial script (none changes the method).
KNOWN_DIFFERENCES = [
    "trains on the first 90% of the cleaned text; the last 10% is held out (the tutorial trains on all of it)",
    "sparse categorical cross-entropy on ids instead of categorical on one-hot vectors (same value)",
    "the last partial batch of each shuffled epoch is dropped (at most 127 of ~130k windows)",
    "custom training loop instead of model.fit (same Adam update; Keras 3 fit breaks under MWMS)",
]


def check_seed_small(vocab_size: int = 40) -> dict[str, Any]:
    """Compare the seed-small preset and its built model with the tutorial's; return what differs."""
    import keras

    from job.core.config import PRESETS, TrainConfig
    from job.model import model as model_lib
    from job.training.steps import make_optimizer as _make_optimizer

    preset = PRESETS["seed-small"]
    diffs = [f"{k}: preset {preset.get(k)!r} != tutorial {v!r}" for k, v in TUTORIAL.items() if preset.get(k) != v]
    cfg = TrainConfig(preset="seed-small", output="unused", **preset)
    model = model_lib.build(cfg, vocab_size)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    kinds = [type(layer).__name__ for layer in layers]
    if kinds != ["LSTM", "Dropout", "Dense"]:
        diffs.append(f"layers {kinds} != ['LSTM', 'Dropout', 'Dense']")
    else:
        lstm, drop, dense = layers
        if lstm.units != 256 or lstm.return_sequences:
            diffs.append(f"LSTM units={lstm.units} return_sequences={lstm.return_sequences}")
        if abs(drop.rate - 0.2) > 1e-12:
            diffs.append(f"dropout rate {drop.rate}")
        if dense.units != vocab_size or keras.activations.serialize(dense.activation) != "softmax":
            diffs.append(f"dense head units={dense.units} activation={dense.activation}")
    if tuple(model.inputs[0].shape[1:]) not in ((None, 1), (100, 1)):
        diffs.append(f"input shape {model.inputs[0].shape} is not (batch, 100, 1)")
    opt = _make_optimizer(cfg)
    if not isinstance(opt, keras.optimizers.Adam) or abs(float(opt.learning_rate) - 1e-3) > 1e-9:
        diffs.append(f"optimizer {type(opt).__name__} lr={float(opt.learning_rate)}")
    return {"matches": not diffs, "differences": diffs, "known_differences": KNOWN_DIFFERENCES,
            "parameters": int(model.count_params())}


def generate(model, pattern: list[int], n_vocab: int, n_chars: int) -> tuple[list[int], list[float]]:
    """The tutorial's generation loop; returns the generated ids and the seconds each character took."""
    pattern = list(pattern)
    out, seconds = [], []
    for _ in range(n_chars):
        t0 = time.perf_counter()
        x = np.reshape(pattern, (1, len(pattern), 1))
        x = x / float(n_vocab)
        prediction = model.predict(x, verbose=0)
        index = int(np.argmax(prediction))
        seconds.append(time.perf_counter() - t0)
        out.append(index)
        pattern.append(index)
        pattern = pattern[1 : len(pattern)]
    return out, seconds
