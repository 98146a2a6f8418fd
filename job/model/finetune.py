"""Fine-tuning: a new run whose weights start from a trained model (`job.train --init-from URL`).

The parent is a training --output, its model/ folder, or one checkpoint folder. Its vocabulary comes first in
the new dataset (every old id unchanged); characters the new corpus adds are appended after them (the unknown
id, if any, stays last), or with --vocab-from-init they map to the unknown id. Its settings are the new run's
defaults (a flag may change what does not change a weight's shape), and its weights are copied row for row,
the rows of new characters starting at the mean of the old ones. (The extended vocabulary itself is built where
the dataset is prepared: job.data.corpus.extended_vocab.)

The plain-data half (reading the parent, the vocabulary, the settings) is TensorFlow-free; `transfer` is not.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from job.core import storage
from job.core.config import TrainConfig
from job.core.errors import UserError
from job.data.corpus import UNKNOWN_CHAR, Vocab
from job.model import checkpoint, export

# job.model.model (TensorFlow) only inside _parent_layers: the driver reads a parent's settings and vocabulary
# (job.train.load_train_config) without TensorFlow.

# Settings that decide a weight's shape (with the vocabulary): taken from the parent, never overridden.
SHAPE_SETTINGS = ("input_mode", "embed_dim", "units")
# Settings the parent passes on as the new run's defaults (a flag or --config file may change them).
INHERITED = (*SHAPE_SETTINGS, "preset", "target", "stateful", "seq_len", "keep_case", "val_fraction",
             "dropout", "input_dropout", "input_dropout_unit", "weight_decay", "clip_norm", "weight_average",
             "batch_size", "global_batch_size", "lr_decay", "lr_anneal", "select_by")
# A fine-tuning run starts from a trained model: a gentler learning rate than the parent's (on the benchmark's
# second corpus ÷2 ended best; ÷5 learned the new text too slowly, bench/README.md), and one epoch without
# improvement (not the preset's three) before it decays.
LEARNING_RATE_DIVISOR = 2.0
PATIENCE = 1


@dataclass(frozen=True)
class Parent:
    url: str  # the folder the weights come from (model/ or a checkpoint folder)
    kind: str  # "model" or "checkpoint"
    config: dict[str, Any]  # its training settings
    vocab: Vocab
    sha256: str  # of model.keras, or of the checkpoint's variables.npz


def find_parent(url: str) -> Parent:
    """The model or checkpoint at `url` (a training --output, its model/ folder, or a checkpoint folder)."""
    progress_url = storage.join(url, checkpoint.PROGRESS)
    if storage.exists(progress_url) and storage.exists(storage.join(url, checkpoint.VARIABLES)):
        try:
            saved = json.loads(storage.read_text(progress_url))
            vocab = saved["vocab"]
            config = saved["config"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--init-from {url}: its {checkpoint.PROGRESS} is damaged; give another checkpoint or the "
                            "run's model/") from None
        digest = saved.get("variables_sha256") or ""
        has_unknown = bool(vocab) and vocab[-1] == UNKNOWN_CHAR  # the unknown id is always last (job.data.corpus.Vocab)
        return Parent(url, "checkpoint", config, Vocab(tuple(vocab), has_unknown=has_unknown), digest)
    folder = export.resolve(url)
    try:
        config = json.loads(storage.read_text(storage.join(folder, export.CONFIG_FILE)))
    except ValueError:
        raise UserError(f"--init-from {url}: {export.CONFIG_FILE} is not valid JSON; re-export the model") from None
    vocab = Vocab.from_json(storage.read_text(storage.join(folder, export.VOCAB_FILE)))
    return Parent(folder, "model", config, vocab, str(config.get("model_sha256") or ""))


def inherited_settings(parent: Parent) -> dict[str, Any]:
    """The parent's settings that become the new run's defaults, with the fine-tuning learning rate."""
    found = {k: parent.config[k] for k in INHERITED if k in parent.config}
    if "lowercase" in parent.config and "keep_case" not in found:
        found["keep_case"] = not parent.config["lowercase"]
    base_rate = float(parent.config.get("learning_rate") or 1e-3)
    found.update(learning_rate=base_rate / LEARNING_RATE_DIVISOR, lr_patience=PATIENCE)
    return found


def shape_changes(parent: Parent, settings: dict[str, Any]) -> list[str]:
    """`setting parent -> asked` for every setting that would change a weight's shape."""
    return [f"{k} {parent.config[k]!r} -> {settings[k]!r}" for k in SHAPE_SETTINGS
            if k in parent.config and k in settings and _norm(parent.config[k]) != _norm(settings[k])]


def _norm(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, list | tuple) else value


def id_map(old: Vocab, new: Vocab) -> np.ndarray:
    """For each new id, the old id whose row it continues (-1 for a character the old vocabulary lacks)."""
    index = old.index
    out = np.full(len(new), -1, np.int64)
    for i, c in enumerate(new.chars):
        if c in index:
            out[i] = index[c]
    if old.has_unknown and new.has_unknown:
        out[new.unknown_id] = old.unknown_id
    return out


def carried_rows(old: np.ndarray, mapping: np.ndarray, axis: int) -> np.ndarray:
    """`old` (rows or columns along `axis` indexed by old id) rearranged for the new ids: carried over where the
    character existed, the mean of the old ones where it is new (a neutral start the fine-tuning moves)."""
    old = np.asarray(old)
    moved = np.moveaxis(old, axis, 0)
    mean = moved.mean(axis=0, keepdims=True)
    rows = np.where((mapping >= 0).reshape(-1, *([1] * (moved.ndim - 1))), moved[np.maximum(mapping, 0)], mean)
    return np.moveaxis(rows, 0, axis).astype(old.dtype)


def check_vocabulary(parent: Parent, vocab: Vocab, input_mode: str) -> None:
    """Refuse, before the dataset is published, a vocabulary the parent's weights cannot carry."""
    if input_mode == "scaled" and vocab.chars != parent.vocab.chars:
        added = [c for c in vocab.chars if c not in set(parent.vocab.chars)]
        raise UserError(
            f"--init-from {parent.url}: a tutorial-preset model reads each character as id / vocabulary size, so "
            f"fine-tuning it needs exactly its {len(parent.vocab)} characters, and this corpus adds "
            f"{', '.join(repr(c) for c in added[:8]) or 'an unknown id'}; pass --vocab-from-init where the parent has "
            "an unknown id, or fine-tune a default-preset model")


def check_case(parent: Parent, keep_case: bool, new_to_unknown: bool) -> str | None:
    """A lowercase parent fine-tuned with --keep-case: the capitals become new characters (a line saying so), or,
    with --vocab-from-init, the unknown id (refused: the model could never write one)."""
    if not keep_case or not parent.config.get("lowercase", not parent.config.get("keep_case", False)):
        return None
    if new_to_unknown:
        raise UserError(f"--init-from {parent.url} was trained on lowercase text: with --keep-case and "
                        "--vocab-from-init every capital would become the unknown id; drop one of the two")
    return (f"{parent.url} was trained on lowercase text: --keep-case adds the capitals as new characters, which "
            "start from the mean of the known ones")


def _parent_layers(parent: Parent) -> dict[str, list[np.ndarray]]:
    """The parent's weights by layer name."""
    if parent.kind == "model":
        model = export.load(parent.url).model
    else:
        from job.model import model as model_lib

        model = model_lib.build(TrainConfig.from_dict(parent.config), len(parent.vocab))
        tmp = tempfile.mkdtemp(prefix="charlstm-parent-")
        try:
            storage.download_dir(parent.url, tmp)
            try:
                with np.load(f"{tmp}/{checkpoint.VARIABLES}") as npz:
                    arrays = [npz[f"m{i}"] for i in range(len(model.variables))]
            except (OSError, ValueError, KeyError, EOFError) as exc:
                raise UserError(f"--init-from {parent.url}: its {checkpoint.VARIABLES} cannot be read "
                                f"({type(exc).__name__}); give another checkpoint or the run's model/") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for variable, value in zip(model.variables, arrays, strict=True):
            variable.assign(value)
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def transfer(model, parent: Parent, vocab: Vocab) -> None:
    """Assign the parent's weights to `model` (built for `vocab`): every layer as it was, the embedding rows and
    output columns rearranged for the new ids (see carried_rows)."""
    source = _parent_layers(parent)
    mapping = id_map(parent.vocab, vocab)
    for layer in model.layers:
        if not layer.weights:
            continue
        arrays = source.get(layer.name)
        if arrays is None or len(arrays) != len(layer.weights):
            raise UserError(f"--init-from {parent.url}: its model has no layer {layer.name!r} like this run's; "
                            "fine-tune with the parent's preset and sizes")
        if layer.name == "embed":
            arrays = [carried_rows(arrays[0], mapping, 0)]
        elif layer.name in ("logits", "probs"):
            arrays = [carried_rows(arrays[0], mapping, 1), carried_rows(arrays[1], mapping, 0)]
        for variable, value in zip(layer.weights, arrays, strict=True):
            if tuple(variable.shape) != value.shape:
                raise UserError(f"--init-from {parent.url}: {variable.path} has shape {value.shape} there and "
                                f"{tuple(variable.shape)} here; fine-tune with the parent's sizes")
            variable.assign(value)
