"""TensorBoard event files: what a run logs, and a resume that shows every step exactly once."""

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import textgen
from tiny import TINY

from job.core import storage
from job.core.config import PRESETS, TrainConfig
from job.model import checkpoint
from job.training.tensorboard import EVENT_PREFIX, Board
from job.training.worker import train_func

SCALARS = {"train/loss", "train/chars_per_sec", "train/learning_rate", "heldout/loss_nats", "heldout/bits_per_char"}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(textgen.book(4000))
    return str(path)


def make_cfg(corpus: str, output: Path, **over) -> TrainConfig:
    settings = {**PRESETS["default"], "preset": "default", "corpus": corpus, "output": str(output), **TINY,
                "epochs": 2, "in_process": True, "log_every_seconds": 1e-6, **over}
    return TrainConfig(**settings).validate()


def read_events(folder: Path) -> dict[str, list[tuple[int, str, str, object]]]:
    """Event file name -> (step, tag, plugin, value) of every summary value, in file order. Read with
    TensorFlow's own event-file iterator, not with job.training.tensorboard's code."""
    import tensorflow as tf

    out = {}
    for path in sorted(folder.glob(EVENT_PREFIX + "*")):
        rows = []
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                value = tf.make_ndarray(v.tensor).item()
                rows.append((event.step, v.tag, v.metadata.plugin_data.plugin_name,
                             value.decode() if isinstance(value, bytes) else value))
        out[path.name] = rows
    return out


def series(rows, tag: str) -> list[tuple[int, object]]:
    return [(step, value) for step, t, _plugin, value in rows if t == tag]


def unfence(text: str) -> str:
    lines = text.split("\n")
    assert set(lines[0]) == {"`"} and lines[-1] == lines[0] and len(lines[0]) >= 3, text
    return "\n".join(lines[1:-1])


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def sample_file(out: Path, m: dict) -> Path:
    name = f"epoch-{m['epoch']:03d}" if m["kind"] == "epoch" else f"step-{m['global_step']:09d}"
    return out / "samples" / f"{name}.txt"


def test_a_run_logs_losses_rates_samples_and_its_config(tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    folder = out / "tensorboard" / "run"
    cfg = make_cfg(tiny_corpus, out, eval_every_steps=10)
    at_checkpoints, save = [], checkpoint.save

    def spy(directory, model, optimizer, progress, *rest):
        logged = [step for rows in read_events(folder).values() for step, *_ in rows]
        at_checkpoints.append((progress["global_step"], max(logged)))
        save(directory, model, optimizer, progress, *rest)

    monkeypatch.setattr(checkpoint, "save", spy)
    final = train_func(cfg.to_dict())
    # Every checkpoint finds the events up to its step already in the output: a resume from it misses none.
    assert len(at_checkpoints) == len(metrics(out)) and all(a == b for a, b in at_checkpoints)
    files = read_events(folder)
    assert len(files) == 1
    (rows,) = files.values()
    assert all(n == 1 for n in Counter((step, tag) for step, tag, _, _ in rows).values())
    assert {(tag, plugin) for _, tag, plugin, _ in rows} == {(t, "scalars") for t in SCALARS} | {
        ("sample", "text"), ("config", "text")}

    loss = series(rows, "train/loss")
    steps = [s for s, _ in loss]
    assert steps == sorted(set(steps)) and steps[-1] == final["global_step"]
    assert len(steps) >= final["global_step"] // cfg.steps_per_call - 1  # one point per compiled call
    assert all(0 < v < 10 for _, v in loss)
    assert [s for s, _ in series(rows, "train/chars_per_sec")] == steps
    assert all(v > 0 for _, v in series(rows, "train/chars_per_sec"))
    rates = series(rows, "train/learning_rate")
    assert [s for s, _ in rates] == steps and rates[0][1] == pytest.approx(cfg.learning_rate)

    lines = metrics(out)
    assert len(lines) >= 4  # step evaluations and two epoch ends
    heldout, bpc = series(rows, "heldout/loss_nats"), series(rows, "heldout/bits_per_char")
    assert [s for s, _ in heldout] == [s for s, _ in bpc] == [m["global_step"] for m in lines]
    for m, (_, nats), (_, bits) in zip(lines, heldout, bpc, strict=True):
        assert nats == pytest.approx(m["val_loss"], rel=1e-6) and bits == pytest.approx(nats / math.log(2))

    samples = series(rows, "sample")
    assert [s for s, _ in samples] == [m["global_step"] for m in lines]
    for m, (_, text) in zip(lines, samples, strict=True):
        assert unfence(text) + "\n" == sample_file(out, m).read_text()

    (config,) = series(rows, "config")
    assert config[0] == 0 and json.loads(unfence(config[1])) == json.loads(json.dumps(cfg.to_dict()))


def test_a_resumed_run_shows_every_step_once(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    board = out / "tensorboard" / "run"
    first = train_func(make_cfg(tiny_corpus, out, epochs=1, checkpoint_every_steps=10,
                                checkpoints_to_keep=3).to_dict())
    (name,) = read_events(board)
    # Without the epoch-end checkpoint the run resumes at the last step checkpoint, behind the logged events.
    checkpoints = sorted((out / "checkpoints" / "run").glob("checkpoint_*"))
    shutil.rmtree(checkpoints[-1])
    resume_step = int(checkpoints[-2].name.split("_")[1])
    assert max(step for step, *_ in read_events(board)[name]) == first["global_step"] > resume_step

    final = train_func(make_cfg(tiny_corpus, out, checkpoint_every_steps=10).to_dict())
    files = read_events(board)
    assert len(files) == 2 and name in files
    old, new = files.pop(name), next(iter(files.values()))
    assert max(step for step, *_ in old) == resume_step  # the first attempt's events after it are gone
    assert min(step for step, *_ in new) == resume_step  # the config of the second attempt
    rows = old + new
    assert all(n == 1 for n in Counter((step, tag) for step, tag, _, _ in rows).values())

    steps = sorted(s for s, _ in series(rows, "train/loss"))
    assert 0 < steps[0] <= TINY["steps_per_call"] and steps[-1] == final["global_step"]
    assert all(0 < b - a <= TINY["steps_per_call"] for a, b in zip(steps, steps[1:], strict=False))
    assert resume_step in steps
    evaluations = [m["global_step"] for m in metrics(out)]
    assert len(evaluations) == 2 and evaluations[-1] == final["global_step"]
    assert sorted(s for s, _ in series(rows, "heldout/loss_nats")) == evaluations
    assert sorted(s for s, _ in series(rows, "sample")) == evaluations
    assert sorted(s for s, _ in series(rows, "config")) == [0, resume_step]


def test_ctrl_c_still_puts_the_events_in_the_output(tiny_corpus, tmp_path, monkeypatch):
    calls = Counter()

    def interrupt_at_the_fifth_call():
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr("job.training.worker.check_interrupt", interrupt_at_the_fifth_call)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train_func(make_cfg(tiny_corpus, out).to_dict())
    assert not (out / "checkpoints").exists()  # so no upload came from a checkpoint
    (rows,) = read_events(out / "tensorboard" / "run").values()
    assert [s for s, _ in series(rows, "train/loss")] == [2, 4, 6, 8]


def board_cfg(output) -> TrainConfig:
    return TrainConfig(output=str(output), run_name="r")


def test_resuming_twice_at_one_step_keeps_one_config(tmp_path):
    cfg = board_cfg(tmp_path / "out")
    folder = tmp_path / "out" / "tensorboard" / "r"
    attempt = Board(cfg, 0, None)
    attempt.config(0, {"epochs": 1})
    for step in range(1, 7):
        attempt.scalars(step, {"train/loss": float(step)})
    attempt.close()
    (first,) = read_events(folder)
    for _ in range(2):  # a resumed attempt that logs two steps and dies before its next checkpoint, then another
        attempt = Board(cfg, 0, 4)
        attempt.config(4, {"epochs": 2})
        attempt.scalars(5, {"train/loss": 50.0})
        attempt.scalars(6, {"train/loss": 60.0})
        attempt.close()
    files = read_events(folder)
    assert len(files) == 3 and first in files
    assert [s for s, _ in series(files[first], "train/loss")] == [1, 2, 3, 4]
    assert sorted(len(rows) for rows in files.values())[0] == 0  # the second attempt's: everything dropped
    rows = [row for rows in files.values() for row in rows]
    assert sorted(series(rows, "train/loss")) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]
    assert [(s, json.loads(unfence(v))) for s, v in sorted(series(rows, "config"))] == [
        (0, {"epochs": 1}), (4, {"epochs": 2})]


def test_an_event_file_cut_short_keeps_its_whole_records(tmp_path):
    cfg = board_cfg(tmp_path / "out")
    folder = tmp_path / "out" / "tensorboard" / "r"
    attempt = Board(cfg, 0, None)
    attempt.scalars(1, {"train/loss": 1.0})
    attempt.scalars(2, {"train/loss": 2.0})
    attempt.close()
    (path,) = folder.iterdir()
    path.write_bytes(path.read_bytes()[:-5])
    Board(cfg, 0, 10).close()
    assert series(read_events(folder)[path.name], "train/loss") == [(1, 1.0)]


def test_only_rank_0_writes(tmp_path):
    board = Board(board_cfg(tmp_path / "out"), 1, None)
    board.config(0, {"a": 1})
    board.scalars(1, {"train/loss": 1.0})
    board.text(1, "sample", "x")
    board.sync()
    board.close()
    assert not (tmp_path / "out").exists()


def test_events_reach_s3_and_are_cut_there_on_resume(s3_prefix, tmp_path):
    cfg = board_cfg(s3_prefix)
    attempt = Board(cfg, 0, None)
    attempt.config(0, {"epochs": 1})
    attempt.scalars(1, {"train/loss": 1.0})
    attempt.sync()
    url = storage.join(s3_prefix, "tensorboard", "r")
    (entry,) = storage.walk_files(url)
    attempt.scalars(2, {"train/loss": 2.0})
    attempt.close()

    def download() -> dict:
        local = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        storage.download_dir(url, str(local))
        return read_events(local)

    assert series(download()[entry["name"]], "train/loss") == [(1, 1.0), (2, 2.0)]
    resumed = Board(cfg, 0, 1)
    resumed.scalars(2, {"train/loss": 20.0})
    resumed.close()
    files = download()
    assert len(files) == 2 and series(files[entry["name"]], "train/loss") == [(1, 1.0)]
    assert sorted(series([r for rows in files.values() for r in rows], "train/loss")) == [(1, 1.0), (2, 20.0)]


def test_tensorboard_itself_reads_the_scalars_and_text(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    board = Board(board_cfg(tmp_path / "out"), 0, None)
    board.scalars(3, {"heldout/loss_nats": 1.5})
    board.text(3, "sample", "the *queen* said")
    board.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "out" / "tensorboard" / "r"), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {"heldout/loss_nats", "sample"}
    from tensorboard.util import tensor_util

    ((scalar,), (text,)) = acc.Tensors("heldout/loss_nats"), acc.Tensors("sample")
    assert (scalar.step, tensor_util.make_ndarray(scalar.tensor_proto).item()) == (3, 1.5)
    assert (text.step, unfence(tensor_util.make_ndarray(text.tensor_proto).item().decode())) == (3, "the *queen* said")
    assert acc.SummaryMetadata("heldout/loss_nats").plugin_data.plugin_name == "scalars"
    assert acc.SummaryMetadata("sample").plugin_data.plugin_name == "text"
