"""The checkpoint format: one folder with `variables.npz` (model and optimizer variables in order, plus the LSTM
states of every stream mid-epoch) and `progress.json` (where the run is, its settings, vocabulary and corpus
digest). Ray Train uploads the folder as it is; job.training.session finds the newest complete one in storage.

Arrays and JSON only, so a checkpoint loads without the code that wrote it and in any worker count.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any

import numpy as np

PROGRESS = "progress.json"
VARIABLES = "variables.npz"


class Damaged(Exception):
    """A checkpoint that cannot be restored (truncated, altered, or of another model shape); the caller falls back
    to the one before it."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def save(directory: str, model, optimizer, progress: dict[str, Any], config: dict[str, Any], vocab: tuple[str, ...],
         corpus_sha256: str, states: np.ndarray | None) -> None:
    """`states`: rows in stream order (all workers' streams, gathered), or None at an epoch boundary."""
    variables = os.path.join(directory, VARIABLES)
    np.savez(
        variables,
        **{f"m{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)},
        **{f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)},
        **({} if states is None else {"states": states}),
    )
    with open(os.path.join(directory, PROGRESS), "w") as f:
        json.dump({"progress": progress, "config": config, "vocab": list(vocab), "corpus_sha256": corpus_sha256,
                   "variables_sha256": _sha256(variables)}, f)


def _read(directory: str, model, optimizer) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """progress.json and every array, read whole and checked against its sha256 and the variables' shapes before
    anything is assigned (a damaged checkpoint must leave the model as it was)."""
    try:
        with open(os.path.join(directory, PROGRESS)) as f:
            saved = json.load(f)
        digest = saved.get("variables_sha256")
        if digest and _sha256(os.path.join(directory, VARIABLES)) != digest:
            raise Damaged(f"{VARIABLES} does not match its sha256")
        with np.load(os.path.join(directory, VARIABLES)) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Damaged:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise Damaged(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}") from None
    for prefix, variables in (("m", model.variables), ("o", optimizer.variables)):
        count = sum(1 for name in arrays if name[0] == prefix and name[1:].isdigit())
        if count != len(variables):
            raise Damaged(f"it holds {count} {'model' if prefix == 'm' else 'optimizer'} variables, this model "
                          f"{len(variables)}")
        for i, v in enumerate(variables):
            found = tuple(arrays[f"{prefix}{i}"].shape)
            if found != tuple(v.shape):
                raise Damaged(f"variable {v.path} has shape {found}, this model {tuple(v.shape)}")
    return saved, arrays


def restore(directory: str, model, optimizer, vocab: tuple[str, ...]) -> tuple[dict[str, Any], np.ndarray | None]:
    """Assign the saved variables; returns (the saved progress, the saved stream states or None). Raises Damaged,
    having changed nothing, when the checkpoint cannot be used."""
    saved, arrays = _read(directory, model, optimizer)
    if tuple(saved["vocab"]) != vocab:
        raise RuntimeError("checkpoint vocabulary differs from this corpus's; use a new --output")
    for i, v in enumerate(model.variables):
        v.assign(arrays[f"m{i}"])
    for i, v in enumerate(optimizer.variables):
        v.assign(arrays[f"o{i}"])
    return saved["progress"], arrays.get("states")
