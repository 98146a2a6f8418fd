"""`python -m job.generate`: thousands of samples from a trained model, in shards, across Ray workers.

Samples are cut into fixed shards (`--shard-size`); each Ray worker loads the model once and generates
whole shards, batching all samples of a batch into one compiled call per character. Every shard is
written atomically to <output>/samples/part-NNNNN.jsonl.gz; <output>/manifest.json is written last.
Re-running the same command skips complete shards (resume, no duplicates). A sample's randomness
depends only on (--seed, sample id), and shard composition never depends on the number of workers,
so the same --seed gives byte-identical output with 1 or N workers.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from job.cluster import capacity
from job.core import guard, report, schema, storage
from job.core.errors import UserError, check_interrupt, deferred_interrupts, run_cli
from job.core.report import format_seconds
from job.core.schema import setting
from job.data import corpus as corpus_lib
from job.data import prepare
from job.data import prompts as prompt_lib
from job.data.corpus import Vocab
from job.model import export

# Ray and job.model.sample (TensorFlow) only where shards are generated: planning, refusals and --help never import
# them.

SAMPLES_DIR = "samples"
CPU_BATCH = 256
MANIFEST = "manifest.json"


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
    p = argparse.ArgumentParser(prog="python -m job.generate", description=__doc__.splitlines()[0])
    schema.add_flags(p, GenerateConfig)
    schema.add_defaults_to_help(p, asdict(GenerateConfig()))
    return p


def load_generate_config(argv: list[str] | None = None) -> GenerateConfig:
    return GenerateConfig(**schema.given(parser().parse_args(argv), GenerateConfig)).validate()


# ---------------------------------------------------------------- the plan (TensorFlow-free)
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


def shard_bytes(records: list[dict[str, Any]]) -> bytes:
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()
    return gzip.compress(body, mtime=0)  # mtime=0: byte-identical reruns


def parse_shard(blob: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(blob).decode().splitlines()]


def read_shard(url: str) -> list[dict[str, Any]]:
    return parse_shard(storage.read_bytes(url))


def existing_shard(plan: Plan, index: int) -> dict[str, Any] | None:
    """Summary of a complete shard already in --output (resume), None if absent.

    A shard written with other settings is refused rather than silently mixed in."""
    url = plan.shard_url(index)
    if not storage.exists(url):
        return None
    blob = storage.read_bytes(url)
    try:
        records = parse_shard(blob)
    except (OSError, EOFError, ValueError):
        return None  # unreadable (not ours): regenerate over it
    start, end = plan.shards[index]
    params = plan.record_params()
    if [r.get("id") for r in records] != list(range(start, end)) or any(
        {k: r.get(k) for k in params} != params or r.get("prompt") != plan.prompts[r["id"]] for r in records
    ):
        raise UserError(f"{url} holds samples made with other settings; use a new --output or the same flags")
    return summary(plan, index, records, blob)


def summary(plan: Plan, index: int, records: list[dict[str, Any]], blob: bytes) -> dict[str, Any]:
    return {"index": index, "file": f"{SAMPLES_DIR}/part-{index:05d}.jsonl.gz", "first_id": plan.shards[index][0],
            "samples": len(records), "chars": sum(len(r["text"]) for r in records),
            "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}


# ---------------------------------------------------------------- the work (TensorFlow)
class ShardGenerator:
    """Loads the model once; generates and writes whole shards.

    Per stream, two shards can be in hand at once (a Ray actor with max_concurrency=2, or threads in-process): one
    is generated (TensorFlow, `parallel` at a time) while the other is encoded, compressed and uploaded, so the
    device never waits for storage. Each call returns only once its shard is written."""

    def __init__(self, plan: Plan, threads: int | None = None, parallel: int = 1):
        tf = report.import_tensorflow(False)  # first in this process (driver or Ray actor): no start-up notices
        if threads:  # as many TensorFlow threads per stream as CPUs reserved, not one per core of the node
            with contextlib.suppress(RuntimeError):  # a process that has run TensorFlow keeps its threads
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                # Concurrent calls each take an inter-op thread: `parallel` streams run side by side.
                tf.config.threading.set_inter_op_parallelism_threads(max(threads, parallel))
        from job.model.sample import Sampler

        self.plan = plan
        self._device = threading.BoundedSemaphore(parallel)
        exported = export.load(plan.model_url)
        self.vocab = exported.vocab
        cfg = exported.config
        self.seq_len = int(cfg.get("seq_len", 100))
        self.input_mode = cfg.get("input_mode", "embedding")
        self.sampler = Sampler(exported.model, self.input_mode, len(self.vocab), self.seq_len,
                               self.vocab.unknown_id, xla=plan.cfg.xla)

    def _prompt_ids(self, text: str) -> np.ndarray:
        ids = self.vocab.encode(text)
        if self.input_mode == "scaled":  # the tutorial's fixed window: last seq_len chars, left-padded
            pad = self.vocab.index.get(" ", 0)
            ids = np.concatenate([np.full(max(0, self.seq_len - len(ids)), pad, np.int32), ids])[-self.seq_len:]
        return ids

    def _generate(self, start: int, end: int) -> dict[int, np.ndarray]:
        plan, cfg = self.plan, self.plan.cfg
        rows: dict[int, np.ndarray] = {}
        encoded = {i: self._prompt_ids(plan.prompts[i]) for i in range(start, end)}
        # Batches hold prompts of one length (the LSTM is primed in one call); order is fixed by ids.
        by_length: dict[int, list[int]] = {}
        for i, ids in encoded.items():
            by_length.setdefault(len(ids), []).append(i)
        for _length, ids in sorted(by_length.items()):
            for b in range(0, len(ids), cfg.batch):
                batch = ids[b : b + cfg.batch]
                prompts = np.stack([encoded[i] for i in batch])
                out = self.sampler.generate(prompts, cfg.length, cfg.temperature, cfg.top_k, cfg.top_p,
                                            seed=cfg.seed, sample_ids=np.asarray(batch))
                rows.update(zip(batch, out, strict=True))
        return rows

    def run(self, index: int) -> dict[str, Any]:
        plan = self.plan
        start, end = plan.shards[index]
        with self._device:
            rows = self._generate(start, end)
        params = plan.record_params()
        records = [{"id": i, "prompt": plan.prompts[i], "text": self.vocab.decode(rows[i]), **params}
                   for i in range(start, end)]
        blob = shard_bytes(records)
        storage.write_bytes(plan.shard_url(index), blob)  # atomic: never a partial shard under samples/
        return summary(plan, index, records, blob)


def _run_in_process(plan: Plan, todo: list[int], progress, ready) -> list[dict[str, Any]]:
    done = []
    ready()
    cfg = plan.cfg
    # As Ray would place actors of --cpus-per-worker CPUs: one stream per that many cores, each stream's steps on
    # its own threads. On the 2-core benchmark machine two single-threaded streams generated 1.6x as fast as one
    # stream spread over both cores (the default preset's matmuls are too small to split well); a GPU takes one.
    threads = max(1, round(cfg.cpus_per_worker))
    streams = 1 if cfg.use_gpu else max(1, min(len(todo), _cores() // threads))
    with deferred_interrupts():  # Ctrl-C / SIGTERM stop between shards, never inside TensorFlow
        generator = ShardGenerator(plan, None if cfg.use_gpu else threads, streams)
        with ThreadPoolExecutor(2 * streams) as pool:  # per stream, shard i+1 generates while shard i is written
            results = pool.map(generator.run, todo)
            try:
                for result in results:
                    done.append(result)
                    progress(result)
                    check_interrupt()
            finally:
                results.close()  # interrupted: cancels the shards not started; the running ones finish whole
    return done


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(cfg: GenerateConfig, shards: int) -> int:
    """--num-workers 0: one per free CPU share (or GPU), never more than there are shards, at least one."""
    import ray

    if cfg.num_workers:
        return cfg.num_workers
    free = ray.available_resources()
    fits = free.get("GPU", 0.0) if cfg.use_gpu else free.get("CPU", 0.0) / cfg.cpus_per_worker
    return max(1, min(shards, int(fits + 1e-9)))


def _run_on_ray(plan: Plan, todo: list[int], progress, ready) -> list[dict[str, Any]]:
    import ray

    cfg = plan.cfg
    capacity.connect(cfg.num_workers or 1, cfg.cpus_per_worker, dashboard=False)
    count = auto_workers(cfg, len(todo))
    capacity.wait_for_capacity(count, cfg.cpus_per_worker, cfg.use_gpu,
                              capacity.check_capacity(count, cfg.cpus_per_worker, cfg.use_gpu),
                              log=lambda line: print(line, flush=True))
    ready()
    actor_cls = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0,
                           max_concurrency=2)(ShardGenerator)
    threads = max(1, round(cfg.cpus_per_worker))
    workers = [actor_cls.remote(plan, threads) for _ in range(min(count, len(todo)))]
    try:
        # Each actor listed twice: two shards in hand per actor, one generating while the other is written.
        pool = ray.util.ActorPool([w for w in workers for _ in range(2)])
        done = []
        for result in pool.map_unordered(lambda w, i: w.run.remote(i), todo):
            done.append(result)
            progress(result)
        return done
    finally:
        # Ended here, deliberately: an actor left to die with the driver's process aborted in its core worker's
        # destructor and printed a crash trace after the job's summary line.
        for worker in workers:
            ray.kill(worker, no_restart=True)
        ray.shutdown()


def write_manifest(plan: Plan, shards: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    cfg = plan.cfg
    params = {k: v for k, v in asdict(cfg).items() if k not in ("print_samples", "in_process", "model", "output")}
    params["batch_size"] = cfg.batch  # resolved (0 means "by device" on the command line)
    manifest = {
        "num_samples": sum(s["samples"] for s in shards),
        "total_chars": sum(s["chars"] for s in shards),
        "shards": sorted(shards, key=lambda s: s["index"]),
        "parameters": params,
        "model": {"url": plan.model_url, "sha256": plan.model_config.get("model_sha256"),
                  "config": plan.model_config},
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_text(storage.join(cfg.output, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def progress_line(samples: int, total: int, chars: int, seconds: float, fresh: int) -> str:
    """`fresh` of the `samples` done were generated by this run (the rest were complete shards it found)."""
    rate = fresh / max(seconds, 1e-9)
    eta = (total - samples) / rate if rate > 0 else 0.0
    return (f"generated {samples:,}/{total:,} samples ({100 * samples / total:.0f}%)  "
            f"{chars / max(seconds, 1e-9):,.0f} chars/s  elapsed {format_seconds(seconds)}  eta {format_seconds(eta)}")


# What a generation output is made of: a shard reused on resume must come from the same model and settings.
IDENTITY_SETTINGS = ("length", "temperature", "top_k", "top_p", "seed", "shard_size", "prompt", "prompts",
                     "unknown_chars")


def identity(plan: Plan) -> dict[str, Any]:
    settings = asdict(plan.cfg)
    return {"model": {"url": plan.model_url, "sha256": plan.model_config.get("model_sha256")},
            "settings": {k: settings[k] for k in IDENTITY_SETTINGS}}


def refuse_mixed_samples(plan: Plan) -> dict[str, Any] | None:
    """--output holds the samples of one model with one set of sampling settings: a resume with another model
    (the same URL retrained counts: its sha256 is compared) or other settings is refused in one line."""
    record = guard.require_kind(plan.cfg.output, "generation", "--output")
    if record is None:
        return None
    now = identity(plan)
    then_sha, now_sha = record.get("model", {}).get("sha256"), now["model"]["sha256"]
    if then_sha != now_sha:
        raise UserError(
            f"{plan.cfg.output} holds samples of the model at {record.get('model', {}).get('url')} with sha256 "
            f"{str(then_sha)[:12]}…; the model at {plan.model_url} is {str(now_sha)[:12]}… (retrained or another "
            "model): give its samples another --output")
    diffs = guard.differences(record.get("settings", {}), now["settings"], IDENTITY_SETTINGS)
    if diffs:
        raise UserError(f"{plan.cfg.output} holds samples made with other settings: {'; '.join(diffs)}; resume with "
                        "the same flags, or give these samples another --output")
    return record


def main(argv: list[str] | None = None) -> int:
    cfg = load_generate_config(argv)
    storage.check_writable(cfg.output)  # before reading the model: a bad --output fails at once
    with guard.Lease(cfg.output, "generation", log=lambda line: print(line, flush=True), flag="--output"):
        return _generate(cfg)


def _generate(cfg: GenerateConfig) -> int:
    plan = make_plan(cfg)
    new_output = refuse_mixed_samples(plan) is None

    def ready() -> None:
        """The job will run (the cluster fits it): --output gets its identity before the first shard."""
        if new_output:
            guard.write_identity(cfg.output, "generation", identity(plan))

    started = time.monotonic()
    storage.remove_stale_temps(storage.join(cfg.output, SAMPLES_DIR))  # left by an interrupted run
    existing = {i: s for i in range(len(plan.shards)) if (s := existing_shard(plan, i)) is not None}
    todo = [i for i in range(len(plan.shards)) if i not in existing]
    if existing:
        print(f"resuming: {len(existing)} of {len(plan.shards)} shards already complete", flush=True)

    done_before = sum(s["samples"] for s in existing.values())
    bar = tqdm(total=cfg.num_samples, initial=done_before, unit="sample", file=sys.stderr, mininterval=1.0,
               disable=None)  # None: off without a terminal, where the lines below take over
    chars, samples, last_line = [0], [done_before], [started]

    def progress(result: dict[str, Any]) -> None:
        chars[0] += result["chars"]
        samples[0] += result["samples"]
        bar.update(result["samples"])
        now = time.monotonic()
        rate = chars[0] / max(now - started, 1e-9)
        bar.set_postfix(chars_per_s=f"{rate:,.0f}")
        if bar.disable and (now - last_line[0] >= cfg.progress_seconds or samples[0] == cfg.num_samples):
            last_line[0] = now
            print(progress_line(samples[0], cfg.num_samples, chars[0], now - started, samples[0] - done_before),
                  flush=True)

    runner = _run_in_process if cfg.runs_in_process else _run_on_ray
    fresh = runner(plan, todo, progress, ready) if todo else ready() or []
    bar.close()
    seconds = time.monotonic() - started
    manifest = write_manifest(plan, [*existing.values(), *fresh], seconds)
    if cfg.print_samples:
        for shard in manifest["shards"]:
            for record in read_shard(storage.join(cfg.output, shard["file"])):
                print(record["prompt"] + record["text"], flush=True)
    new_chars = sum(s["chars"] for s in fresh)
    print(json.dumps({"samples": manifest["num_samples"], "chars": manifest["total_chars"],
                      "generated_now": sum(s["samples"] for s in fresh), "seconds": round(seconds, 3),
                      "chars_per_sec": round(new_chars / max(seconds, 1e-9), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
