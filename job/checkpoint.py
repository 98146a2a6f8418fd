"""The checkpoint format: one folder with `variables.npz` (model and optimizer variables in order, plus the LSTM
states of every stream mid-epoch) and `progress.json` (where the run is, its settings, vocabulary and corpus
digest). Ray Train uploads the folder as it is; job.session finds the newest complete one in storage.

Arrays and JSON only, so a checkpoint loads without the code that wrote it and in any worker count.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

PROGRESS = "progress.json"
VARIABLES = "variables.npz"


def save(directory: str, model, optimizer, progress: dict[str, Any], config: dict[str, Any], vocab: tuple[str, ...],
         corpus_sha256: str, states: np.ndarray | None) -> None:
    """`states`: rows in stream order (all workers' streams, gathered), or None at an epoch boundary."""
    np.savez(
        os.path.join(directory, VARIABLES),
        **{f"m{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)},
        **{f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)},
        **({} if states is None else {"states": states}),
    )
    with open(os.path.join(directory, PROGRESS), "w") as f:
        json.dump({"progress": progress, "config": config, "vocab": list(vocab), "corpus_sha256": corpus_sha256}, f)


def restore(directory: str, model, optimizer, vocab: tuple[str, ...]) -> tuple[dict[str, Any], np.ndarray | None]:
    """Assign the saved variables; returns (the saved progress, the saved stream states or None)."""
    with open(os.path.join(directory, PROGRESS)) as f:
        saved = json.load(f)
    if tuple(saved["vocab"]) != vocab:
        raise RuntimeError("checkpoint vocabulary differs from this corpus's; use a new --run-name")
    arrays = np.load(os.path.join(directory, VARIABLES))
    for i, v in enumerate(model.variables):
        v.assign(arrays[f"m{i}"])
    for i, v in enumerate(optimizer.variables):
        v.assign(arrays[f"o{i}"])
    return saved["progress"], (arrays["states"] if "states" in arrays.files else None)
