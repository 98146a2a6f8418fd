"""TensorBoard event files of a training run, in <output>/tensorboard/<run name>/.

TensorFlow has no s3:// filesystem, so rank 0 writes its events to a local temporary folder and copies the
file to the output (atomically, storage.write_bytes) before every checkpoint and at the end of the run: never
once per scalar. Each process writes its own file (TensorBoard reads every events.out.tfevents.* of a folder).

Because the upload precedes the checkpoint, the output always holds every event up to the newest checkpoint,
and sometimes a few after it. A run resumed at global step S therefore first rewrites the run's event files
keeping only events up to S, and then logs S+1 onwards in a new file: no step is shown twice, none is missing.

Scalars and text go through tf.summary.write with the plugin metadata TensorBoard's dashboards read:
tf.summary.scalar and tf.summary.text are tensorboard's code, and TensorFlow 2.21 no longer installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any

from job.core import storage
from job.core.config import TrainConfig

# TensorFlow only inside the functions that write or rewrite events: the driver imports this module through
# job.training.worker and must start without TensorFlow.

EVENT_PREFIX = "events.out.tfevents."
CONFIG_TAG = "config"


def folder(cfg: TrainConfig) -> str:
    return storage.join(cfg.output, "tensorboard", cfg.run)


def _metadata(plugin: str):
    import tensorflow as tf

    return tf.compat.v1.SummaryMetadata(plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name=plugin))


def _code_block(text: str) -> str:
    # The text dashboard renders Markdown; a fence longer than any backtick run in the text shows it verbatim.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def _kept(event, step: int) -> bool:
    """Whether an event stays when resuming at `step`. The resumed attempt logs its config at `step` itself,
    so an earlier attempt's config at that same step goes (a run resumed twice at S would show two)."""
    if event.step < step:
        return True
    return event.step == step and not any(v.tag == CONFIG_TAG for v in event.summary.value)


def _read(path: str) -> bytes:
    # Whole, through storage.write_bytes: event files are small, and its local copies get the usual permissions
    # (storage.upload_file's are private to the writer, which a TensorBoard run by someone else cannot read).
    with open(path, "rb") as f:
        return f.read()


def truncate_after(url: str, step: int, workdir: str) -> list[str]:
    """Rewrite every event file directly in `url` to hold only the events of steps <= `step` (see _kept).
    Returns the names of the files rewritten. A file left with no summary stays, smaller: a copy kept in step
    by `aws s3 sync`, which never deletes, then loses its events too."""
    import tensorflow as tf

    if not storage.exists(url):
        return []
    changed = []
    for entry in storage.walk_files(url):
        name = entry["name"]
        if "/" in name or not name.startswith(EVENT_PREFIX):
            continue
        src, dst = os.path.join(workdir, name), os.path.join(workdir, name + ".kept")
        storage.download_file(entry["url"], src)
        kept, dropped = [], False
        try:
            for record in tf.data.TFRecordDataset(src):
                record = record.numpy()
                if _kept(tf.compat.v1.Event.FromString(record), step):
                    kept.append(record)
                else:
                    dropped = True
        except tf.errors.DataLossError:
            dropped = True  # a last record cut short (a file copied while it was written): drop it
        if dropped:
            with tf.io.TFRecordWriter(dst) as writer:
                for record in kept:
                    writer.write(record)
            storage.write_bytes(entry["url"], _read(dst))
            changed.append(name)
    return changed


class Board:
    """Rank 0's TensorBoard writer; on every other rank each method does nothing."""

    def __init__(self, cfg: TrainConfig, rank: int, resume_step: int | None):
        self._writer = None
        if rank != 0:
            return
        import tensorflow as tf

        self.url = folder(cfg)
        self._dir = tempfile.mkdtemp(prefix="charlstm-tb-")
        try:
            if resume_step is not None:
                truncate_after(self.url, resume_step, self._dir)
            logdir = os.path.join(self._dir, "new")
            # The writer's name has a timestamp, host and pid; the random tail keeps two containers that
            # share a host name and pid (restarted pods) from overwriting each other's file.
            self._writer = tf.summary.create_file_writer(logdir, filename_suffix=f".{uuid.uuid4().hex[:8]}")
            (name,) = os.listdir(logdir)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._file, self._target = os.path.join(logdir, name), storage.join(self.url, name)
        self._uploaded_size = -1
        self._scalar, self._text = _metadata("scalars"), _metadata("text")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        import tensorflow as tf

        with self._writer.as_default():
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step, metadata=self._scalar)

    def text(self, step: int, tag: str, text: str) -> None:
        """`text` is shown verbatim (a Markdown code block)."""
        if self._writer is None:
            return
        import tensorflow as tf

        with self._writer.as_default():
            tf.summary.write(tag, tf.constant(_code_block(text)), step=step, metadata=self._text)

    def config(self, step: int, cfg_dict: dict[str, Any]) -> None:
        self.text(step, CONFIG_TAG, json.dumps(cfg_dict, indent=2, sort_keys=True))

    def sync(self) -> None:
        """Flush and copy the event file to the output (when it grew since the last copy)."""
        if self._writer is None:
            return
        self._writer.flush()
        size = os.path.getsize(self._file)
        if size != self._uploaded_size:
            storage.write_bytes(self._target, _read(self._file))
            self._uploaded_size = size

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self.sync()
        finally:
            self._writer.close()
            self._writer = None
            shutil.rmtree(self._dir, ignore_errors=True)
