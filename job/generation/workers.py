"""The work (TensorFlow): a ShardGenerator loads the model once and writes whole shards; in this process (one
stream per core) or as Ray actors."""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from job.cluster import capacity
from job.core import report, storage
from job.core.errors import check_interrupt, deferred_interrupts
from job.generation.plan import Plan
from job.generation.settings import GenerateConfig
from job.generation.shards import shard_bytes, summary
from job.model import export

# Ray and job.model.sample (TensorFlow) only where shards are generated: planning, refusals and --help never import
# them.


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


def run_in_process(plan: Plan, todo: list[int], progress, ready) -> list[dict[str, Any]]:
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


def run_on_ray(plan: Plan, todo: list[int], progress, ready) -> list[dict[str, Any]]:
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
