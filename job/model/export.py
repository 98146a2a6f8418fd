"""The exported model folder: model.keras + vocab.json + config.json (written last, as the commit).

config.json records the sha256 of model.keras, so a reader never pairs a model with the wrong
metadata even if a later export was interrupted half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from job.core import storage
from job.core.errors import UserError

# Keras only inside load(): readers of config.json and vocab.json (the driver, fine-tuning's parent) start without
# TensorFlow.
from job.data.corpus import Vocab

MODEL_FILE = "model.keras"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"


def save(model, vocab: Vocab, config: dict[str, Any], url: str) -> dict[str, Any]:
    """Write the model folder at `url`; returns the config as written."""
    with tempfile.TemporaryDirectory(prefix="charlstm-export-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        model.save(path)
        with open(path, "rb") as f:
            blob = f.read()
    config = {**config, "model_sha256": hashlib.sha256(blob).hexdigest(), "vocab_size": len(vocab)}
    storage.write_bytes(storage.join(url, MODEL_FILE), blob)
    storage.write_text(storage.join(url, VOCAB_FILE), vocab.to_json())
    storage.write_text(storage.join(url, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))
    return config


@dataclass
class Exported:
    model: Any
    vocab: Vocab
    config: dict[str, Any]
    url: str


def resolve(url: str) -> str:
    """Accept a training --output URL or its model/ folder."""
    for candidate in (storage.join(url, "model"), url):
        if storage.exists(storage.join(candidate, CONFIG_FILE)):
            return candidate
    storage.check_bucket(url)  # "the bucket does not exist" says more than "no model there"
    raise UserError(
        f"no exported model at {url} (expected {CONFIG_FILE}, {MODEL_FILE} and {VOCAB_FILE} there or in "
        "its model/ folder); give the training --output URL"
    )


def _check_checksum(folder: str, config: dict[str, Any], actual: str) -> None:
    if config.get("model_sha256") and actual != config["model_sha256"]:
        raise UserError(f"{folder}/{MODEL_FILE} does not match its config.json checksum (interrupted export?); "
                        "re-run the export or training")


def verify(folder: str, config: dict[str, Any]) -> None:
    """Refuse a model.keras that is not the file its config.json was written with (damaged, or an export
    interrupted between the two), streaming it: a command checks this before it writes anything of its own."""
    digest = hashlib.sha256()
    with storage.open_read(storage.join(folder, MODEL_FILE)) as f:
        while block := f.read(8 << 20):
            digest.update(block)
    _check_checksum(folder, config, digest.hexdigest())


def load(url: str) -> Exported:
    import keras

    import job  # noqa: F401  (registers nothing today, kept so loaders always import the package)

    folder = resolve(url)
    try:
        config = json.loads(storage.read_text(storage.join(folder, CONFIG_FILE)))
    except ValueError:
        raise UserError(f"{storage.join(folder, CONFIG_FILE)} is not valid JSON; re-export the model") from None
    vocab = Vocab.from_json(storage.read_text(storage.join(folder, VOCAB_FILE)))
    blob = storage.read_bytes(storage.join(folder, MODEL_FILE))
    _check_checksum(folder, config, hashlib.sha256(blob).hexdigest())
    with tempfile.TemporaryDirectory(prefix="charlstm-load-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        with open(path, "wb") as f:
            f.write(blob)
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a user-facing problem
            raise UserError(f"cannot load {folder}/{MODEL_FILE}: {str(exc).splitlines()[0]}") from None
    out_dim = int(model.outputs[0].shape[-1])
    if out_dim != len(vocab):
        raise UserError(
            f"vocab.json has {len(vocab)} characters but the model predicts {out_dim}; "
            "the vocab does not belong to this model"
        )
    return Exported(model=model, vocab=vocab, config=config, url=folder)
