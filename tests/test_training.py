"""Each preset trains in-process on a tiny corpus; export -> load -> evaluate; exact resume; sampler."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import textgen
from tiny import TINY

from job.core.config import PRESETS, TrainConfig
from job.data import corpus
from job.model import export
from job.model.scoring import evaluate
from job.training.worker import train_func

TINY = {**TINY, "units": [24, 24]}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(textgen.book(4000))
    return str(path)


RESUMED = re.compile(r"^resumed from checkpoint: epoch (\d+), step (\d+) of the next epoch, global step (\d+)$", re.M)


@dataclass
class Watched:
    """What one train_func call did, as seen from outside: its final metrics, the checkpoint it says it resumed
    from ((epoch, step in epoch, global step) of its "resumed from checkpoint" line; None: a fresh start), the
    global step each of its compiled calls started from, how many optimizer steps it ran, and what it printed."""

    final: dict
    resumed_from: tuple[int, int, int] | None
    call_starts: list[int]
    steps: int
    log: str


@pytest.fixture
def watch(monkeypatch, capsys):
    """`watch(cfg)` runs train_func(cfg) and returns a Watched. Training is deterministic, so a run that restarted
    from scratch would often end exactly as a resumed one does: a resume test must also ask where it started."""
    from job.training import worker

    calls: list[tuple[int, int]] = []
    real = worker.Trainer._train_steps

    def counted(self, plan, count):
        calls.append((self.progress.global_step, count))
        return real(self, plan, count)

    monkeypatch.setattr(worker.Trainer, "_train_steps", counted)

    def run(cfg: TrainConfig) -> Watched:
        calls.clear()
        capsys.readouterr()
        final = train_func(cfg.to_dict())
        log = capsys.readouterr().out
        found = RESUMED.findall(log)
        assert len(found) <= 1, log
        return Watched(final, tuple(int(x) for x in found[0]) if found else None, [start for start, _ in calls],
                       sum(count for _, count in calls), log)

    return run


def _checkpoint_progress(directory: Path) -> dict:
    return json.loads((directory / "progress.json").read_text())["progress"]


def make_cfg(preset: str, corpus: str, output: Path, **over) -> TrainConfig:
    settings = {**PRESETS[preset], "preset": preset, "corpus": corpus, "output": str(output), **TINY,
                "epochs": 2, "in_process": True, **over}
    if preset != "default":
        settings["units"] = settings["units"][:1] if preset == "seed-small" else [16, 16]
        settings["batch_size"] = 32
    return TrainConfig(**settings).validate()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_trains_exports_and_evaluates(preset, tiny_corpus, tmp_path):
    cfg = make_cfg(preset, tiny_corpus, tmp_path / "out")
    final = train_func(cfg.to_dict())
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert m["val_loss"] > 0 and m["chars_per_sec"] > 0 and abs(m["val_bpc"] - m["val_loss"] / np.log(2)) < 1e-9
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "samples" / "epoch-002.txt").exists()
    loaded = export.load(str(out))
    assert loaded.config["preset"] == preset and loaded.config["corpus_sha256"]
    best = lines[loaded.config["epoch"] - 1]
    result = evaluate(loaded.model, TrainConfig.from_dict(loaded.config), loaded.vocab,
                      corpus.load(tiny_corpus).text, cfg.val_fraction)
    assert result["loss_nats"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert final["epoch"] == 2 and final["workers"] == 1


def test_default_export_maps_ids_to_logits(tiny_corpus, tmp_path):
    cfg = make_cfg("default", tiny_corpus, tmp_path / "out", epochs=1)
    train_func(cfg.to_dict())
    import keras

    import job  # noqa: F401

    model = keras.saving.load_model(str(tmp_path / "out" / "model" / "model.keras"), compile=False)
    vocab = export.load(str(tmp_path / "out")).vocab
    ids = np.zeros((3, 17), dtype=np.int32)
    logits = np.asarray(model(ids))
    assert logits.shape == (3, 17, len(vocab))
    assert not np.allclose(logits.sum(-1), 1.0)  # logits, not probabilities


def _latest_variables(out: Path) -> dict:
    ckpts = sorted((out / "checkpoints" / "run").glob("checkpoint_*"))
    arrays = np.load(ckpts[-1] / "variables.npz")
    return {k: arrays[k] for k in arrays.files}


def test_resume_ends_as_if_uninterrupted(tiny_corpus, tmp_path, watch):
    # No annealing here: it follows the planned end of the run, and a run planned for 1 epoch then extended
    # to 3 is meant to anneal differently from one planned for 3.
    straight = watch(make_cfg("default", tiny_corpus, tmp_path / "a", epochs=3, lr_anneal=0.0))
    first = watch(make_cfg("default", tiny_corpus, tmp_path / "b", epochs=1, lr_anneal=0.0))
    assert straight.resumed_from is None and first.resumed_from is None
    one_epoch, three_epochs = first.final["global_step"], straight.final["global_step"]
    assert straight.steps == three_epochs and first.steps == one_epoch
    resumed = watch(make_cfg("default", tiny_corpus, tmp_path / "b", epochs=3, lr_anneal=0.0))
    # It resumed from the end of epoch 1 and trained only epochs 2 and 3.
    assert resumed.resumed_from == (1, 0, one_epoch), resumed.log[-2000:]
    assert resumed.call_starts[0] == one_epoch and resumed.steps == three_epochs - one_epoch > 0
    assert resumed.final["epoch"] == 3 and resumed.final["global_step"] == three_epochs
    # Bit for bit: every weight and optimizer variable, and every loss of metrics.jsonl.
    a, b = _latest_variables(tmp_path / "a"), _latest_variables(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines_b) == 3
    for la, lb in zip(lines_a, lines_b, strict=True):
        assert (la["global_step"], la["train_loss"], la["val_loss"]) == (lb["global_step"], lb["train_loss"],
                                                                         lb["val_loss"])


def test_mid_epoch_resume_continues_every_stream_exactly(tiny_corpus, tmp_path, watch):
    """A resume from a step checkpoint inside an epoch carries the stateful preset's LSTM states (saved with
    the checkpoint): the run ends as if it had never stopped. (Zeroed states would change every later loss.)"""
    import shutil

    settings = dict(epochs=2, lr_anneal=0.0, checkpoint_every_steps=10, checkpoints_to_keep=100)
    straight = watch(make_cfg("default", tiny_corpus, tmp_path / "a", **settings))
    runs = tmp_path / "a" / "checkpoints" / "run"
    mid = [d for d in sorted(runs.glob("checkpoint_*")) if 0 < _checkpoint_progress(d)["step_in_epoch"]]
    assert mid and "states" in np.load(mid[0] / "variables.npz").files
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for later in (tmp_path / "b" / "checkpoints" / "run").glob("checkpoint_*"):
        if later.name > mid[0].name:
            shutil.rmtree(later)
    at = _checkpoint_progress(mid[0])
    resumed = watch(make_cfg("default", tiny_corpus, tmp_path / "b", **settings))
    assert resumed.resumed_from == (at["epoch"], at["step_in_epoch"], at["global_step"]), resumed.log[-2000:]
    assert resumed.call_starts[0] == at["global_step"]
    assert resumed.steps == straight.final["global_step"] - at["global_step"] > 0
    assert resumed.final["global_step"] == straight.final["global_step"]
    assert resumed.final["train_loss"] == straight.final["train_loss"]  # bit for bit
    assert resumed.final["val_loss"] == straight.final["val_loss"]
    a, b = _latest_variables(tmp_path / "a"), _latest_variables(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_weight_average_is_evaluated_and_exported_while_training_continues_from_the_trained_weights(
        momentum, tiny_corpus, tmp_path):
    """--weight-average: the exported model (and so every scored held-out loss) holds the average, which the
    checkpoint keeps among the optimizer's variables; the checkpoint's model variables are the trained weights,
    so a resume continues those. Off (0), the exported weights are the trained ones."""
    out = tmp_path / "out"
    train_func(make_cfg("default", tiny_corpus, out, epochs=1, weight_average=momentum).to_dict())
    saved = _latest_variables(out)
    model_keys = sorted((k for k in saved if k[0] == "m"), key=lambda k: int(k[1:]))
    trained = [saved[k] for k in model_keys if saved[k].dtype.kind == "f"]  # not the dropout layers' seeds
    optimizer = [saved[k] for k in saved if k[0] == "o"]
    exported = [np.asarray(w) for w in export.load(str(out)).model.get_weights()]
    assert len(exported) == len(trained)

    def holds(arrays, w):
        return any(a.shape == w.shape and np.array_equal(a, w) for a in arrays)

    for w, t in zip(exported, trained, strict=True):
        if momentum:
            assert holds(optimizer, w) and not np.array_equal(w, t)
        else:
            np.testing.assert_array_equal(w, t)
            assert not holds(optimizer, w)


def test_loss_plot_is_drawn_at_most_every_interval_and_at_the_last_evaluation(tiny_corpus, tmp_path, monkeypatch):
    from job.core import report
    from job.training import outputs

    drawn = []
    monkeypatch.setattr(outputs, "PLOT_EVERY_SECONDS", 3600.0)  # longer than the run on any machine
    monkeypatch.setattr(report, "loss_plot_png", lambda history, title: drawn.append(len(history)) or b"png")
    train_func(make_cfg("default", tiny_corpus, tmp_path / "out", epochs=4).to_dict())
    assert drawn == [1, 4]
    assert (tmp_path / "out" / "loss.png").read_bytes() == b"png"


def test_time_budget_stops_cleanly_and_keeps_the_model(tiny_corpus, tmp_path):
    cfg = make_cfg("default", tiny_corpus, tmp_path / "out", epochs=50, max_minutes=1e-6)
    final = train_func(cfg.to_dict())
    assert final["stopped_early"] and final["epoch"] == 1 and final["partial_epoch"]
    assert export.load(str(tmp_path / "out")).config["epoch"] == 1


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_and_exports(precision, tiny_corpus, tmp_path):
    import keras

    cfg = make_cfg("default", tiny_corpus, tmp_path / "out", epochs=1, precision=precision)
    try:
        final = train_func(cfg.to_dict())
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert np.isfinite(final["val_loss"]) and final["val_loss"] < 5
    assert export.load(str(tmp_path / "out")).config["precision"] == precision


def test_checkpoint_every_steps_and_mid_epoch_resume(tiny_corpus, tmp_path, watch):
    import shutil

    out = tmp_path / "out"
    cfg = make_cfg("default", tiny_corpus, out, epochs=1, checkpoint_every_steps=10, checkpoints_to_keep=3)
    final = watch(cfg).final
    names = sorted(p.name for p in (out / "checkpoints" / "run").glob("checkpoint_*"))
    steps = [int(n.split("_")[1]) for n in names]
    assert len(steps) == 3  # the newest three are kept
    assert steps[-1] == final["global_step"] and final["global_step"] % 10 != 0  # the epoch-end one
    assert [s % 10 for s in steps[:-1]] == [0, 0]  # and the step ones before it
    # Without the epoch-end checkpoint the next run resumes mid-epoch, from the last step checkpoint.
    shutil.rmtree(out / "checkpoints" / "run" / names[-1])
    resumed = watch(make_cfg("default", tiny_corpus, out, epochs=1, checkpoint_every_steps=10))
    assert resumed.resumed_from == (0, steps[-2], steps[-2]), resumed.log[-2000:]
    assert resumed.call_starts[0] == steps[-2] and resumed.steps == final["global_step"] - steps[-2]
    assert resumed.final["epoch"] == 1 and resumed.final["global_step"] == final["global_step"]


def test_regularisers_and_learning_rate_decay_on_plateau(tiny_corpus, tmp_path):
    cfg = make_cfg("default", tiny_corpus, tmp_path / "out", epochs=5, input_dropout=0.1, weight_decay=0.01,
                   lr_decay=0.5, lr_patience=1, learning_rate=0.3, lr_anneal=0.0,
                   weight_average=0.0)  # far too high: the loss stalls (an average of the weights would smooth it)
    train_func(cfg.to_dict())
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rates = [round(m["learning_rate"], 6) for m in lines]
    assert rates[0] in (0.3, 0.15) and min(rates) < 0.3 and rates == sorted(rates, reverse=True)
    for m, rate in zip(lines[1:], rates[1:], strict=True):  # a decay follows every non-improving epoch
        best_before = min(x["val_loss"] for x in lines[: m["epoch"] - 1])
        if m["val_loss"] >= best_before:
            assert rate < rates[m["epoch"] - 2]
    loaded = export.load(str(tmp_path / "out"))
    assert "dropout_in" in [layer.name for layer in loaded.model.layers]


def test_anneal_factor_is_flat_then_a_half_cosine_to_zero():
    from job.training.schedule import anneal_factor

    assert anneal_factor(0.9, 0.0) == 1.0
    assert anneal_factor(0.0, 0.3) == anneal_factor(0.7, 0.3) == 1.0
    assert anneal_factor(0.85, 0.3) == pytest.approx(0.5)
    assert anneal_factor(1.0, 0.3) == pytest.approx(0.0) and anneal_factor(1.5, 0.3) == pytest.approx(0.0)
    xs = [anneal_factor(i / 100, 1.0) for i in range(101)]
    assert xs == sorted(xs, reverse=True)


def test_learning_rate_anneals_to_zero_by_the_last_step(tiny_corpus, tmp_path):
    cfg = make_cfg("default", tiny_corpus, tmp_path / "out", epochs=4, lr_anneal=0.5, lr_decay=1.0,
                   learning_rate=0.01)
    train_func(cfg.to_dict())
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rates = [m["learning_rate"] for m in lines]  # the rate of each epoch's last step
    assert rates[0] == pytest.approx(0.01) and rates[1] == pytest.approx(0.01)  # first half: constant
    assert 0.001 < rates[2] < 0.01 and rates[3] < 0.001
    assert export.load(str(tmp_path / "out")).config["lr_anneal"] == 0.5


def test_a_larger_budget_continues_a_run_that_stopped_on_its_budget(tiny_corpus, tmp_path, watch):
    out = tmp_path / "out"
    first = watch(make_cfg("default", tiny_corpus, out, epochs=3, max_minutes=1e-6))
    assert first.final["stopped_early"] and first.final["epoch"] == 1 and first.resumed_from is None
    stopped = first.final["global_step"]  # inside epoch 1: the checkpoint holds epoch 0, step `stopped` of epoch 1
    assert first.steps == stopped > 0
    again = watch(make_cfg("default", tiny_corpus, out, epochs=3, max_minutes=1e-6))
    assert again.resumed_from == (0, stopped, stopped), again.log[-2000:]
    assert again.steps == 0 and "time budget already spent" in again.log  # budget spent: nothing more is trained
    assert again.final["global_step"] == stopped
    more = watch(make_cfg("default", tiny_corpus, out, epochs=3, max_minutes=60))
    assert more.resumed_from == (0, stopped, stopped), more.log[-2000:]
    assert more.call_starts[0] == stopped and more.steps == more.final["global_step"] - stopped > 0
    assert more.final["epoch"] == 3 and not more.final["stopped_early"]


def test_step_evaluations_progress_lines_and_capped_heldout(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = make_cfg("default", tiny_corpus, out, epochs=1, eval_every_steps=10, log_every_seconds=1e-6,
                   val_max_chars=100)
    final = train_func(cfg.to_dict())
    printed = capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if m["kind"] == "eval"]
    assert [m["global_step"] for m in evals] == list(range(10, final["global_step"], 10))
    assert [m["kind"] for m in lines] == ["eval"] * len(evals) + ["epoch"] and lines[-1]["epoch"] == 1
    assert all(0 < m["epoch_float"] < 1 for m in evals) and lines[-1]["epoch_float"] == 1
    for m in evals:
        assert (out / "samples" / f"step-{m['global_step']:09d}.txt").exists()
        assert f"eval at step {m['global_step']:,}" in printed
    assert "(100 scored per evaluation)" in printed  # one 100-char window of the 400-char held-out part
    progress = [x for x in printed.splitlines() if x.startswith("step ")]
    assert len(progress) >= final["global_step"] // cfg.steps_per_call - 1 and " chars/s " in progress[-1]
    # The exported model is the best evaluation's, mid-epoch ones included.
    best = min(lines, key=lambda m: m["val_loss"])
    assert export.load(str(out)).config["global_step"] == best["global_step"]


def test_rare_characters_map_to_one_unknown_id_that_generation_never_emits(tmp_path):
    from job.model.sample import Sampler

    text = textgen.story(6000, seed=5)
    rare = text[:1500] + "ǂ" + text[1500:3000] + "жж" + text[3000:]  # seen once and twice
    path = tmp_path / "rare.txt"
    path.write_text(rare)
    cfg = make_cfg("default", str(path), tmp_path / "out", epochs=1, min_char_count=3)
    train_func(cfg.to_dict())
    from collections import Counter

    counts = Counter(corpus.clean(rare))
    mapped = {c for c, n in counts.items() if n < 3}
    assert {"ǂ", "ж"} <= mapped
    meta = json.loads((tmp_path / "out" / "data" / "meta.json").read_text())
    assert meta["unknown_chars"]["distinct"] == len(mapped)
    assert meta["unknown_chars"]["occurrences"] == sum(counts[c] for c in mapped)
    loaded = export.load(str(tmp_path / "out"))
    vocab = loaded.vocab
    assert vocab.has_unknown and vocab.unknown_id == len(vocab) - 1
    assert set(vocab.chars[:-1]) == set(counts) - mapped
    prompts = np.tile(vocab.encode("the ")[None, :], (64, 1))
    out = Sampler(loaded.model, "embedding", len(vocab), 20, vocab.unknown_id).generate(prompts, 200,
                                                                                          temperature=3.0, seed=1)
    assert vocab.unknown_id not in set(out.ravel().tolist())
    assert len(set(out.ravel().tolist())) > len(vocab) // 2  # hot enough to reach rare ids
