"""What a run shows: the per-epoch console line, metrics.jsonl, loss.png and epoch samples.

Object stores cannot append, so metrics.jsonl is rewritten whole (atomically) each epoch from the
history kept in the checkpoint; a resumed run therefore never duplicates or loses a line.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import tempfile
from typing import Any

import job

# matplotlib and TensorFlow are imported inside the functions that draw or start them: every command imports this
# module for its console lines, and the driver must start without either.
from job.core import storage


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def epoch_line(m: dict[str, Any]) -> str:
    where = (f"epoch {m['epoch']:>3}/{m['epochs']}" if m.get("kind", "epoch") == "epoch"
             else f"eval at step {m['global_step']:,} (epoch {m['epoch_float']:.2f})")
    return (
        f"{where}  train {m['train_loss']:.4f}  "
        f"val {m['val_loss']:.4f} nats ({m['val_bpc']:.3f} bits/char)  "
        f"{m['chars_per_sec']:,.0f} chars/s  elapsed {format_seconds(m['elapsed_sec'])}  "
        f"eta {format_seconds(m['eta_sec'])}"
    )


def write_metrics(output: str, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(m, sort_keys=True) + "\n" for m in history)
    storage.write_text(storage.join(output, "metrics.jsonl"), text)


def write_sample(output: str, name: str, prompt: str, text: str) -> None:
    body = f"{prompt}\n---\n{text}\n"
    storage.write_text(storage.join(output, "samples", f"{name}.txt"), body)


def loss_plot_png(history: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m.get("epoch_float", m["epoch"]) for m in history]  # evaluations inside an epoch fall between
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [m["train_loss"] for m in history], marker="o", label="train")
    ax.plot(epochs, [m["val_loss"] for m in history], marker="o", label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_loss_plot(output: str, history: list[dict[str, Any]], title: str) -> None:
    storage.write_bytes(storage.join(output, "loss.png"), loss_plot_png(history, title))


def bits(nats: float) -> float:
    return nats / math.log(2)


def quiet_tensorflow(verbose: bool) -> None:
    """TensorFlow's C++ INFO and WARNING notices (oneDNN, CUDA probing) in this process and in every Ray worker it
    starts (they inherit the driver's environment or receive it through train_func's config). Must precede the
    first TensorFlow import; `import_tensorflow` does that import."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    elif job.QUIET_BY_US and "tensorflow" not in sys.modules:
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)  # --verbose: TensorFlow's own default level


# What `import tensorflow` prints before TensorFlow's own logging (and TF_CPP_MIN_LOG_LEVEL) is in force: absl's
# "All log messages before absl::InitializeLog() ..." banner and absl INFO/WARNING lines such as cudart_stub's
# "Could not find cuda drivers", twice per process (tensorflow/tensorflow#100442: no setting reaches them).
_PRE_INIT_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                             r"|[IW]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] )")


def drop_pre_init_noise(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not _PRE_INIT_NOISE.match(line))


def import_tensorflow(verbose: bool):
    """Import TensorFlow once per process, dropping only its pre-init INFO/WARNING notices unless --verbose.

    Everything else written to stderr meanwhile (by Python, by another thread, an E/F line from TensorFlow) is
    written back after the import, in order."""
    quiet_tensorflow(verbose)
    if verbose or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = drop_pre_init_noise(capture.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
    return tf
