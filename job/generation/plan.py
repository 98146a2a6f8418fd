"""What a generation job will make (TensorFlow-free): the model it reads, its prompts (one per sample) and the
shards the samples are cut into, fixed by --num-samples and --shard-size alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from job.core import storage
from job.core.errors import UserError
from job.data import corpus as corpus_lib
from job.data import prepare
from job.data import prompts as prompt_lib
from job.data.corpus import Vocab
from job.generation.settings import GenerateConfig
from job.model import export

SAMPLES_DIR = "samples"


@dataclass
class Plan:
    cfg: GenerateConfig
    model_url: str
    model_config: dict[str, Any]
    vocab_chars: tuple[str, ...]
    prompts: list[str] = field(default_factory=list)  # one per sample

    @property
    def shards(self) -> list[tuple[int, int]]:
        """(first id, end id) of every shard; fixed by --num-samples and --shard-size alone."""
        n, size = self.cfg.num_samples, self.cfg.shard_size
        return [(start, min(n, start + size)) for start in range(0, n, size)]

    def shard_url(self, index: int) -> str:
        return storage.join(self.cfg.output, SAMPLES_DIR, f"part-{index:05d}.jsonl.gz")

    def record_params(self) -> dict[str, Any]:
        c = self.cfg
        return {"temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p, "seed": c.seed,
                "model": self.model_url}


def _corpus_seeds(model_config: dict[str, Any], vocab: Vocab, count: int, length: int, seed: int,
                  lowercase: bool) -> tuple[list[str], bool]:
    """(seeds, whether they are in `vocab` already) from the training text of the model's prepared dataset
    (memory-mapped: a gigabyte corpus is never read into memory); models trained before datasets existed read
    their corpus file."""
    url = model_config.get("dataset")
    if url and prepare.read_meta(url) is not None:
        ds = prepare.open_local(url)
        return prompt_lib.corpus_seed_ids(ds.train, ds.vocab, count, length, seed), ds.vocab == vocab
    text = corpus_lib.load(model_config["corpus"], lowercase=lowercase).text
    return prompt_lib.corpus_seeds(text, count, length, seed), False


def make_plan(cfg: GenerateConfig) -> Plan:
    folder = export.resolve(cfg.model)
    try:
        model_config = json.loads(storage.read_text(storage.join(folder, export.CONFIG_FILE)))
    except ValueError:
        raise UserError(f"{folder}/{export.CONFIG_FILE} is not valid JSON; re-export the model") from None
    vocab = Vocab.from_json(storage.read_text(storage.join(folder, export.VOCAB_FILE)))
    if model_config.get("vocab_size") not in (None, len(vocab)):
        raise UserError(f"{folder}/vocab.json has {len(vocab)} characters but the model was exported with "
                        f"{model_config['vocab_size']}; the vocab does not belong to this model")
    if not storage.exists(storage.join(folder, export.MODEL_FILE)):
        raise UserError(f"{folder} has no {export.MODEL_FILE}; give the training --output of a finished run")
    export.verify(folder, model_config)  # before --output gets an identity naming this model's checksum
    lowercase = model_config.get("lowercase", True)
    seq_len = int(model_config.get("seq_len", 100))
    if cfg.prompt is not None or cfg.prompts:
        base = [cfg.prompt] if cfg.prompt is not None else prompt_lib.from_file(cfg.prompts)
        if lowercase:
            base = [p.lower() for p in base]
        encoded = prompt_lib.encode_all(base, vocab, cfg.unknown_chars == "skip")
        cleaned = [vocab.decode(ids) for ids in encoded]
        prompts = [cleaned[i % len(cleaned)] for i in range(cfg.num_samples)]
    else:
        # The tutorial's 100-char seeds (its own models need exactly their window), one per sample, cut from the
        # encoded training text: already in the vocabulary, so a million of them need no encoding round trip.
        seed_len = seq_len if model_config.get("input_mode") == "scaled" else 100
        prompts, in_vocab = _corpus_seeds(model_config, vocab, cfg.num_samples, seed_len, cfg.seed, lowercase)
        if not in_vocab:
            prompts = [vocab.decode(ids) for ids in prompt_lib.encode_all(
                [p.lower() for p in prompts] if lowercase else prompts, vocab, cfg.unknown_chars == "skip")]
    return Plan(cfg=cfg, model_url=folder, model_config=model_config, vocab_chars=vocab.chars, prompts=prompts)
