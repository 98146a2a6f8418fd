"""Generation speed: the tutorial's per-character `model.predict` loop against our batched, compiled
`job.sample.Sampler`. Weights are untrained (speed does not depend on them).

chars/s = batch * generated length / seconds of one `Sampler.generate` call (priming with the 100-char
prompt included), median of `repeats` calls after one warm-up call per batch size.
Achieved FLOP/s counts the priming steps (LSTM stack only) and every generated character
(LSTM stack + dense head); see bench/common.py for the formulas.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench import common, tutorial

PROMPT_LEN = 100


def tutorial_loop(vocab_size: int, n_chars: int, seed: int = 0) -> dict[str, Any]:
    from job.core.config import PRESETS, TrainConfig
    from job.model import model as model_lib

    cfg = TrainConfig(preset="seed-small", output="unused", **PRESETS["seed-small"])
    model = model_lib.build(cfg, vocab_size)
    pattern = np.random.default_rng(seed).integers(0, vocab_size, cfg.seq_len).tolist()
    model.predict(np.zeros((1, cfg.seq_len, 1), np.float32), verbose=0)  # warm-up, not timed
    _, seconds = tutorial.generate(model, pattern, vocab_size, n_chars)
    total = float(sum(seconds))
    flops_per_char = common.forward_flops_per_predicted_char(cfg, vocab_size)
    rate = n_chars / total
    return {
        "method": "tutorial: one model.predict per char on a (1, 100, 1) window, argmax",
        "model": "seed-small (LSTM 256, scaled-integer input)",
        "chars": n_chars,
        "seconds": total,
        "chars_per_sec": rate,
        "median_sec_per_char": common.median(seconds),
        "flops_per_char": flops_per_char,
        "flops_per_sec": rate * flops_per_char,
    }


def sampler_rates(vocab_size: int, units: list[int], batches: list[int], length: int, repeats: int,
                  temperature: float, seed: int = 0, xla: bool = True) -> dict[str, Any]:
    from job.core.config import PRESETS, TrainConfig
    from job.model import model as model_lib
    from job.model.sample import Sampler

    cfg = TrainConfig(**{**PRESETS["default"], "preset": "default", "output": "unused", "units": units})
    model = model_lib.build(cfg, vocab_size)
    sampler = Sampler(model, cfg.input_mode, vocab_size, cfg.seq_len, xla=xla)
    step = common.lstm_step_flops(cfg.embed_dim, cfg.units)
    head = common.head_flops(cfg.units, vocab_size)
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        prompts = rng.integers(0, vocab_size, (batch, PROMPT_LEN)).astype(np.int32)
        out = sampler.generate(prompts, length, temperature=temperature, seed=seed)  # warm-up (traces)
        assert out.shape == (batch, length), out.shape
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            sampler.generate(prompts, length, temperature=temperature, seed=seed + r + 1)
            times.append(time.perf_counter() - t0)
        sec = common.median(times)
        flops = batch * ((PROMPT_LEN - 1) * step + length * (step + head))
        rows.append({"batch": batch, "length": length, "seconds_median": sec, "seconds": times, "xla": xla,
                     "temperature": temperature,
                     "chars_per_sec": batch * length / sec, "flops_per_sec": flops / sec})
    return {
        "method": "job.sample.Sampler: prime once, then one compiled batched step per char (tf.while_loop)",
        "model": f"default-style: embedding {cfg.embed_dim} -> LSTM {'x'.join(map(str, units))} -> dense logits",
        "units": units,
        "temperature": temperature,
        "prompt_len": PROMPT_LEN,
        "flops_per_generated_char": step + head,
        "flops_per_priming_char": step,
        "rows": rows,
    }
