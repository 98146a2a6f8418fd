"""Where a worker's progress goes: a Ray Train session, or the local process (one worker).

Both offer the same four things — rank, world size, the latest checkpoint, and report() — so the
training loop in job/training/worker.py is identical in and out of Ray.

Resume point: the newest *complete* checkpoint found in storage (highest global step whose
variables.npz and progress.json are both there), not only the one Ray's controller registered. A
worker that dies right after a report can leave its newest checkpoint uploaded but unregistered
(Ray alone would resume from the one before); scanning storage keeps lost work within one checkpoint interval.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from job.core import guard, schema, storage
from job.core.config import TrainConfig
from job.core.errors import UserError
from job.data import prepare
from job.model import finetune
from job.model.checkpoint import PROGRESS, VARIABLES

# Ray only inside RaySession: in-process runs and the driver's checks before the cluster never import it.


def checkpoint_root(cfg: TrainConfig) -> str:
    """<output>/checkpoints/<run name>: Ray's storage_path/name, and the in-process layout too."""
    return storage.join(cfg.output, "checkpoints", cfg.run)


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(global_step, url) of every complete checkpoint under `root`, oldest first."""
    if not storage.exists(root):
        return []
    files = storage.listdir(root)
    dirs: dict[str, set[str]] = {}
    for url in files:
        rel = url[len(root):].strip("/").split("/")
        if len(rel) == 2 and rel[0].startswith("checkpoint_"):
            dirs.setdefault(rel[0], set()).add(rel[1])
    found = []
    for name, names in dirs.items():
        if {PROGRESS, VARIABLES} <= names:
            url = storage.join(root, name)
            try:
                step = int(json.loads(storage.read_text(storage.join(url, PROGRESS)))["progress"]["global_step"])
            except (UserError, ValueError, KeyError, TypeError):
                continue  # unreadable, or pruned by Ray's checkpoint manager since the listing
            found.append((step, url))
    return sorted(found)


# Settings a run cannot change when it resumes (declared `fixed` on the setting): the model's shape and the data it
# sees in which order.
RESUME_KEYS = schema.fixed_settings(TrainConfig)


def resume_mismatches(saved: dict, cfg: TrainConfig) -> list[str]:
    """`key saved -> new` for every setting that differs between a checkpoint's config and this run's."""
    new = cfg.to_dict()
    diffs = [f"{k} {saved.get(k)!r} -> {new[k]!r}" for k in RESUME_KEYS if k in saved and saved.get(k) != new[k]]
    # The average lives among the optimizer's variables: a checkpoint made with it on (or off) restores only so.
    had = float(saved.get("weight_average") or 0.0)  # checkpoints from before the setting had none
    if (had > 0) != (cfg.weight_average > 0):
        diffs.append(f"weight_average {had:g} -> {cfg.weight_average:g} (pass --weight-average "
                     f"{had:g} to resume)")
    # Another worker count is fine (each worker takes global / workers windows of the same plan and its
    # streams' states); another global batch would change the data order.
    batch = int(saved.get("global_batch_size") or 0) or \
        int(saved.get("batch_size", 0)) * int(saved.get("num_workers", 1))
    if batch and batch != cfg.global_batch:
        diffs.append(f"global batch {batch} -> {cfg.global_batch} (pass --global-batch-size {batch} to resume "
                     "on another number of workers)")
    return diffs


def refuse_mixed_runs(cfg: TrainConfig) -> dict[str, Any] | None:
    """Before anything is written: --output holds one run. Another kind of output, another run name, or the same
    run with settings other than those it was started with (its output.json, or for outputs from before that
    record, its newest checkpoint) is refused, or continuing would silently mix two runs (another model shape,
    other data, another order). Returns the output's record (None for a new output)."""
    record = guard.require_kind(cfg.output, "training", "--output")
    if record and record.get("run") != cfg.run:
        raise UserError(
            f"{cfg.output} already holds run {record.get('run')!r}; a run {cfg.run!r} there would overwrite its "
            f"model/, metrics and samples: give the new run another --output (or --run-name {record.get('run')} "
            "to resume that one)")
    found = complete_checkpoints(checkpoint_root(cfg))
    if not (record or found):
        return None
    where = f"checkpoint at global step {found[-1][0]}" if found else f"started {record.get('created', '?')}"
    if record:
        saved = record.get("config", {})
    else:  # an output from before output.json: its newest checkpoint says how it was made
        saved = json.loads(storage.read_text(storage.join(found[-1][1], PROGRESS))).get("config", {})
    diffs = resume_mismatches(saved, cfg)
    if not diffs and _corpus_changed(cfg):
        diffs = [f"the files of corpus {cfg.corpus} changed (names, sizes or versions) since its dataset was prepared"]
    if diffs:
        raise UserError(
            f"{cfg.output} already holds run {cfg.run!r} ({where}) made with other settings: {'; '.join(diffs)}; "
            "resume with the same settings, or start a new run with another --output")
    return record


def record_run(cfg: TrainConfig) -> None:
    """Write --output's identity (output.json) once its run is about to write anything else."""
    guard.write_identity(cfg.output, "training", {"run": cfg.run, "config": cfg.to_dict()})


def _corpus_changed(cfg: TrainConfig) -> bool:
    """The run's prepared dataset no longer describes the corpus listing (read-only: listing and meta.json)."""
    if prepare.read_meta(cfg.data_url) is None:
        return False  # nothing to compare with: the dataset is prepared anew and the vocabulary checked on restore

    base = finetune.find_parent(cfg.init_from).vocab if cfg.init_from else None
    options = prepare.make_options(not cfg.keep_case, cfg.val_fraction, cfg.min_char_count, cfg.skip_bad_files,
                                   base, cfg.vocab_from_init)
    return prepare.find_cached(cfg.data_url, cfg.corpus, options, (cfg.output,)) is None


def _downloaded_newest_first(found: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """(step, local folder) of each listed checkpoint, newest first, each downloaded in turn into a temporary folder
    that lasts until the next one is asked for. One that vanished since the listing (pruned) is passed over."""
    for step, url in reversed(found):
        tmp = tempfile.mkdtemp(prefix="charlstm-restore-")
        try:
            try:
                storage.download_dir(url, tmp)
            except UserError:
                continue
            yield step, tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class Session:
    rank = 0
    world_size = 1
    in_ray = False

    def __init__(self, cfg: TrainConfig):
        self.root = checkpoint_root(cfg)

    def checkpoints(self) -> Iterator[tuple[int, str]]:
        """(global step, local folder) of the complete checkpoints in storage, newest first (see
        _downloaded_newest_first): the caller restores the first that loads."""
        return _downloaded_newest_first(complete_checkpoints(self.root))

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def preemption_notice(self) -> Any:
        """What Ray Train knows of a drain of a node of this run (its PreemptionInfo: nodes, ranks, deadline),
        or None. A local read, cheap enough for every step: the loop all-reduces it so every worker acts on it
        after the same step. A run outside Ray is never told of one."""
        return None

    def log(self, line: str) -> None:
        if self.rank == 0:
            # Not print(): inside a Ray Train worker, print is patched to go both to Ray Train's logger and to
            # the (wrapped) stdout, so every line reached the job log twice.
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


class LocalSession(Session):
    """In-process run: checkpoints under <output>/checkpoints/<run>/checkpoint_<step>, newest kept."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.keep = cfg.checkpoints_to_keep

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        target = storage.join(self.root, f"checkpoint_{int(metrics.get('global_step', 0)):09d}")
        # progress.json goes last: a checkpoint only counts once it is there.
        for name in sorted(os.listdir(checkpoint_dir), key=lambda n: n == PROGRESS):
            with open(os.path.join(checkpoint_dir, name), "rb") as f:
                storage.write_bytes(storage.join(target, name), f.read())
        for _step, old in complete_checkpoints(self.root)[: -self.keep]:
            storage.delete(old, recursive=True)


class RunAborted(Exception):
    """The run was stopped from outside this worker; the worker ends without a traceback."""


class RaySession(Session):
    """Inside a Ray Train worker; Ray uploads, registers and prunes checkpoints."""

    in_ray = True

    def __init__(self, cfg: TrainConfig):
        import ray.train

        super().__init__(cfg)
        if not cfg.verbose:
            # Ray Train logs every report ("Reporting training result N: TrainingReport(...)") at INFO, from a
            # logger named after its source file, outside the `ray.train` logger that RunConfig's LoggingConfig
            # sets; our one line per evaluation says it better.
            try:
                from ray.train.v2._internal.execution import context as train_context

                logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
            except ImportError:  # another Ray layout: its lines stay
                pass
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        # Ray Train's PreemptionWatcher writes a drain of any of the run's nodes into every worker's context.
        # The public ray.train.get_preemption_info() reads the same value but is a barrier through the
        # controller: too slow for every step, while our own all-reduce carries it for free.
        from ray.train.v2._internal.execution.context import get_train_context

        self._preemption = get_train_context().preemption_context

    def preemption_notice(self) -> Any:
        return self._preemption.preemption_info

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.exceptions
        import ray.train

        # Ray orders checkpoints by val_loss; JSON has no infinity.
        clean = {k: (1e9 if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            ray.train.report(clean, checkpoint=checkpoint)
        except ray.exceptions.RayActorError as e:
            # The controller (and the actor that syncs checkpoint names, which it owns) is gone: the driver was
            # stopped (Ctrl-C, `ray job stop`) or failed while this worker was reporting. Ray is tearing the
            # worker down; a traceback of our loop would only say the same thing louder.
            raise RunAborted("the run's Ray Train controller is gone (the driver stopped or failed)") from e


def detect_session(cfg: TrainConfig, in_ray: bool) -> Session:
    return RaySession(cfg) if in_ray else LocalSession(cfg)
