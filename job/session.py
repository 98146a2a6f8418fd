"""Where a worker's progress goes: a Ray Train session, or the local process (one worker).

Both offer the same four things — rank, world size, the latest checkpoint, and report() — so the
training loop in job/worker.py is identical in and out of Ray.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from job import storage
from job.config import TrainConfig


class Session:
    rank = 0
    world_size = 1

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str] | None:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def log(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)


_CKPT = re.compile(r"checkpoint_(\d{9})/?$")


class LocalSession(Session):
    """In-process run: checkpoints under <output>/checkpoints/local/checkpoint_<step>, the newest
    `checkpoints_to_keep` kept (the exported best model lives in <output>/model)."""

    def __init__(self, cfg: TrainConfig):
        self.root = storage.join(cfg.output, "checkpoints", "local")
        self.keep = cfg.checkpoints_to_keep

    def _existing(self) -> list[str]:
        if not storage.exists(self.root):
            return []
        found = set()
        for url in storage.listdir(self.root):
            rel = url[len(self.root):].lstrip("/").split("/")[0]
            if _CKPT.match(rel) and url.endswith("progress.json"):
                found.add(rel)
        return sorted(found)

    def latest_checkpoint(self):
        names = self._existing()
        if not names:
            return None

        @contextlib.contextmanager
        def fetch() -> Iterator[str]:
            tmp = tempfile.mkdtemp(prefix="charlstm-restore-")
            try:
                storage.download_dir(storage.join(self.root, names[-1]), tmp)
                yield tmp
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return fetch()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        name = f"checkpoint_{int(metrics.get('global_step', 0)):09d}"
        # progress.json is uploaded last: a checkpoint only counts once it is there.
        target = storage.join(self.root, name)
        for fname in sorted(os.listdir(checkpoint_dir), key=lambda n: n == "progress.json"):
            with open(os.path.join(checkpoint_dir, fname), "rb") as f:
                storage.write_bytes(storage.join(target, fname), f.read())
        for old in self._existing()[: -self.keep]:
            storage.delete(storage.join(self.root, old), recursive=True)


class RaySession(Session):
    """Inside a Ray Train worker (TensorflowTrainer)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    def latest_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        clean = {k: (1e9 if isinstance(v, float) and v != v or v in (float("inf"),) else v)
                 for k, v in metrics.items()}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(clean, checkpoint=checkpoint)


def detect_session(cfg: TrainConfig, in_ray: bool) -> Session:
    return RaySession() if in_ray else LocalSession(cfg)
