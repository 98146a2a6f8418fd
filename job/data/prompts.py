"""Where generation prompts come from (no TensorFlow): one --prompt, a prompts file (one per line or
JSONL), or — the tutorial's way — random seeds cut from the training corpus."""

from __future__ import annotations

import json

import numpy as np

from job.core import storage
from job.core.errors import UserError
from job.data.corpus import Vocab

SEED_BLOCK = 65536  # seeds decoded at a time


def from_file(url: str) -> list[str]:
    """One prompt per line; a line that is a JSON string or an object with a string "prompt" is decoded (JSONL).
    Refused in one line naming the line: bytes that are not UTF-8, a line starting with "{" that is not such an
    object, and in a .jsonl / .json file any line that is not JSON (a malformed line is never taken as text)."""
    raw = storage.read_bytes(url)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"prompts file {url} is not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); convert it, "
                        "e.g. iconv -f latin1 -t utf-8") from None
    jsonl = url.split("?", 1)[0].lower().endswith((".jsonl", ".json"))
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        value = _json_prompt(stripped)
        if value is None and (stripped[0] == "{" or jsonl):
            raise UserError(f"prompts file {url} line {number}: not valid JSONL (a JSON string or an object with a "
                            "string \"prompt\"); fix that line")
        prompts.append(line if value is None else value)
    if not prompts:
        raise UserError(f"prompts file {url} has no prompts; put one per line")
    return prompts


def _json_prompt(stripped: str) -> str | None:
    """The prompt a JSONL line holds (a JSON string, or an object's string "prompt"), else None."""
    if stripped[0] not in "{\"":
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = value.get("prompt")
    return value if isinstance(value, str) else None


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
    offsets = np.arange(length)
    out: list[str] = []
    for i in range(0, count, SEED_BLOCK):  # bounded memory for millions of seeds
        out += vocab.decode_rows(ids[starts[i:i + SEED_BLOCK, None] + offsets])
    return out


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
