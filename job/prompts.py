"""Where generation prompts come from (no TensorFlow): one --prompt, a prompts file (one per line or
JSONL), or — the tutorial's way — random seeds cut from the training corpus."""

from __future__ import annotations

import json

import numpy as np

from job import storage
from job.corpus import Vocab
from job.errors import UserError


def from_file(url: str) -> list[str]:
    """One prompt per line; a line that is a JSON string or an object with "prompt" is decoded (JSONL)."""
    text = storage.read_text(url)
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        stripped = line.strip()
        if stripped[0] in "{\"":
            try:
                value = json.loads(stripped)
            except ValueError:
                value = line
            if isinstance(value, dict):
                if not isinstance(value.get("prompt"), str):
                    raise UserError(f"{url} line {number}: a JSON object needs a string \"prompt\" field")
                value = value["prompt"]
            line = value if isinstance(value, str) else line
        prompts.append(line)
    if not prompts:
        raise UserError(f"prompts file {url} has no prompts; put one per line")
    return prompts


def corpus_seeds(text: str, count: int, length: int, seed: int) -> list[str]:
    """`count` random windows of `length` characters from `text`, a pure function of `seed`."""
    if len(text) <= length:
        raise UserError(f"corpus has {len(text)} chars, too short for {length}-char seeds; give --prompt")
    starts = np.random.default_rng([int(seed), 0xC0FFEE]).integers(0, len(text) - length, count)
    return [text[s : s + length] for s in starts]


def corpus_seed_ids(ids: np.ndarray, vocab: Vocab, count: int, length: int, seed: int) -> list[str]:
    """corpus_seeds over encoded text (e.g. a memory-mapped train.bin): only the chosen windows are read."""
    if len(ids) <= length:
        raise UserError(f"corpus has {len(ids)} chars, too short for {length}-char seeds; give --prompt")
    starts = np.random.default_rng([int(seed), 0xC0FFEE]).integers(0, len(ids) - length, count)
    return [vocab.decode(ids[s : s + length]) for s in starts]


def encode_all(prompts: list[str], vocab: Vocab, skip_unknown: bool) -> list[np.ndarray]:
    """Encode every prompt, naming characters outside the vocabulary unless told to skip them."""
    missing = sorted({c for p in prompts for c in vocab.unknown(p)})
    if missing and not skip_unknown:
        shown = ", ".join(repr(c) for c in missing[:10])
        raise UserError(f"prompt has {len(missing)} character(s) outside the model's vocabulary: {shown}; "
                        "remove them or pass --unknown-chars skip")
    encoded = [vocab.encode(p, skip_unknown=True) for p in prompts]
    for p, ids in zip(prompts, encoded, strict=True):
        if len(ids) == 0:
            raise UserError(f"prompt {p!r} has no character the model knows; give a longer prompt")
    return encoded
