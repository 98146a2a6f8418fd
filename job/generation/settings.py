"""The settings of a generation job: one declaration per flag of `python -m job.generate` (flags, help and checks
are made from it)."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass

from job.core import schema
from job.core.errors import UserError
from job.core.schema import setting

DESCRIPTION = "`python -m job.generate`: thousands of samples from a trained model, in shards, across Ray workers."
CPU_BATCH = 256


@dataclass
class GenerateConfig:
    """The settings of a generation job; the flags of `python -m job.generate` are made from these fields."""

    model: str = setting("", "Training --output URL or its model/ folder (s3:// or local).", required=True)
    output: str = setting("", "Where samples/ and manifest.json go (s3:// or local).", required=True)
    num_samples: int = setting(1, "How many samples.")
    length: int = setting(500, "Characters generated per sample.")
    temperature: float = setting(1.0, "Softmax temperature; 0 = greedy argmax, the tutorial's behaviour.")
    top_k: int = setting(0, "Sample among the k likeliest characters (0 = off).")
    top_p: float = setting(1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
    prompt: str | None = setting(None, "One prompt for every sample.")
    prompts: str | None = setting(None, "File/URL of prompts: one per line, or JSONL ({\"prompt\": ...}); sample i "
                                  "uses prompt i modulo their number. Default: random corpus seeds, as the tutorial.")
    seed: int = setting(0, "Seed: same seed, same samples, whatever the workers.")
    num_workers: int = setting(0, "Ray workers, each loading the model once (default 0: as many as the cluster's "
                               "free CPUs, or GPUs with --use-gpu, can run, at most one per shard).")
    use_gpu: bool = setting(False, "One GPU per worker.")
    cpus_per_worker: float = setting(1.0, "CPUs reserved per worker; also its TensorFlow thread count.")
    batch_size: int = setting(0, f"Samples advanced together per step (default 0: {CPU_BATCH} on CPU, a whole shard "
                              "on GPU).")
    xla: bool = setting(True, "Compile the sampling loop with XLA (--no-xla: a plain TensorFlow graph; same "
                        "output; XLA is faster but compiles once per batch shape).")
    shard_size: int = setting(1000, "Samples per output shard.")
    unknown_chars: str = setting("error", "Prompt characters outside the vocabulary: error, or skip them.",
                                 choices=("error", "skip"))
    print_samples: bool = setting(False, "Also print every sample to stdout.", name="print")
    in_process: bool = setting(False, "Generate in this process without Ray (the default when no cluster is given "
                               "(RAY_ADDRESS), --num-workers is left at 0 and there is no --use-gpu).")
    progress_seconds: float = setting(30.0, "Without a terminal (ray job submit, a RayJob, a log file): a progress "
                                      "line at most every N seconds, as shards complete (0: every shard). A "
                                      "terminal shows a progress bar.")

    def validate(self) -> GenerateConfig:
        checks = [
            (self.num_samples >= 1, f"--num-samples must be >= 1 (got {self.num_samples})"),
            (self.progress_seconds >= 0, f"--progress-seconds must be >= 0 (got {self.progress_seconds})"),
            (self.length >= 1, f"--length must be >= 1 (got {self.length})"),
            (0 <= self.temperature < math.inf, f"--temperature must be >= 0 and finite, 0 meaning greedy "
                                               f"(got {self.temperature})"),
            (self.top_k >= 0, f"--top-k must be >= 0, 0 meaning off (got {self.top_k})"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})"),  # False for nan too
            (self.num_workers >= 0, f"--num-workers must be >= 1, or 0 for auto (got {self.num_workers})"),
            (self.cpus_per_worker > 0, f"--cpus-per-worker must be > 0 (got {self.cpus_per_worker})"),
            (self.batch_size >= 0, f"--batch-size must be >= 1, or 0 for auto (got {self.batch_size})"),
            (self.shard_size >= 1, f"--shard-size must be >= 1 (got {self.shard_size})"),
            (not (self.prompt is not None and self.prompts), "give --prompt or --prompts, not both"),
            (self.prompt is None or self.prompt != "", "--prompt must not be empty"),
            (bool(self.model), "--model is required: the training --output URL or its model/ folder"),
            (bool(self.output), "--output is required: a local folder or s3:// prefix for the samples"),
            (not (self.in_process and self.num_workers > 1), "--in-process runs one worker; drop --num-workers"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    @property
    def runs_in_process(self) -> bool:
        """--in-process, or nothing asks for Ray: no cluster given (RAY_ADDRESS), the worker count left to us and no
        GPU. One process then does the work as Ray's actors would (one stream per core), without a local Ray's
        start, one TensorFlow import per actor and one compile per actor: seconds that dominate a job of a few
        thousand samples."""
        return self.in_process or not (os.environ.get("RAY_ADDRESS") or self.num_workers or self.use_gpu)

    @property
    def batch(self) -> int:
        """Samples advanced together. On a CPU, throughput is flat from about 256 rows (bench/README.md) and a
        smaller batch lets the last one of a shard waste less; a GPU wants every sample of the shard at once."""
        if self.batch_size:
            return self.batch_size
        return self.shard_size if self.use_gpu else min(CPU_BATCH, self.shard_size)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m job.generate", description=DESCRIPTION)
    schema.add_flags(p, GenerateConfig)
    schema.add_defaults_to_help(p, asdict(GenerateConfig()))
    return p


def load_generate_config(argv: list[str] | None = None) -> GenerateConfig:
    return GenerateConfig(**schema.given(parser().parse_args(argv), GenerateConfig)).validate()
