"""Fine-tuning (`job.train --init-from`): the parent's vocabulary first with its ids unchanged, its weights carried
row for row, its settings the defaults, a shape-changing override refused, lineage in config.json, and a resumed
fine-tuning run continuing itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import textgen
import yaml
from logcheck import assert_user_error, run
from tiny import TINY

from job.data.corpus import UNKNOWN_CHAR, Vocab, extended_vocab
from job.model import finetune

# ----------------------------------------------------------------------------------------- plain data


def counts_of(text: str) -> np.ndarray:
    return np.bincount([ord(c) for c in text], minlength=128)


def test_the_parents_ids_stay_and_new_characters_are_appended():
    base = Vocab(tuple("\n abc"))
    vocab, added = extended_vocab(base, counts_of("abc xyz\n"), 1, new_to_unknown=False)
    assert vocab.chars == tuple("\n abcxyz") and added == ["x", "y", "z"] and not vocab.has_unknown
    with_unknown = Vocab((*"\n abc", UNKNOWN_CHAR), has_unknown=True)
    vocab, added = extended_vocab(with_unknown, counts_of("abd\n"), 1, new_to_unknown=False)
    assert vocab.chars == (*"\n abcd", UNKNOWN_CHAR) and vocab.unknown_id == 6 and added == ["d"]
    mapping = finetune.id_map(with_unknown, vocab)
    assert mapping.tolist() == [0, 1, 2, 3, 4, -1, 5]  # old ids kept; the unknown row moves to the end


def test_new_characters_can_map_to_the_unknown_id():
    base = Vocab(tuple("\n abc"))
    vocab, added = extended_vocab(base, counts_of("abc xyz\n"), 1, new_to_unknown=True)
    assert vocab.chars == (*"\n abc", UNKNOWN_CHAR) and vocab.has_unknown and added == []
    assert vocab.encode("ax").tolist() == [2, vocab.unknown_id]
    # rare new characters (below the count) share the unknown id too, frequent ones are added
    vocab, added = extended_vocab(base, counts_of("abc xxxy\n"), 2, new_to_unknown=False)
    assert vocab.chars == (*"\n abcx", UNKNOWN_CHAR) and added == ["x"]


def test_carried_rows_keep_old_rows_and_start_new_ones_at_the_mean():
    old = np.arange(12, dtype=np.float32).reshape(4, 3)
    mapping = np.array([0, 1, 2, 3, -1])
    rows = finetune.carried_rows(old, mapping, axis=0)
    np.testing.assert_array_equal(rows[:4], old)
    np.testing.assert_allclose(rows[4], old.mean(axis=0))
    columns = finetune.carried_rows(old.T, mapping, axis=1)
    np.testing.assert_array_equal(columns, rows.T)


# ---------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def parent(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """The parent: the session's finished tiny run; and other prose, with characters it never saw."""
    tmp = tmp_path_factory.mktemp("finetune")
    new_text = tmp / "new.txt"
    new_text.write_text(textgen.book(5000, seed=9).replace("e", "é").replace("y", "ÿ"))
    return {**tiny_run, "tmp": tmp, "new": new_text}


def fine_tune(parent: dict[str, Path], out: Path, *args: str, init: str | None = None, env: dict | None = None):
    return run("job.train", "--in-process", "--corpus", str(parent["new"]), "--output", str(out), "--init-from",
               init or str(parent["out"]), "--epochs", "1", *args, env=env, timeout=300)


def test_fine_tuning_carries_the_vocabulary_and_records_its_parent(parent, tmp_path):
    out = tmp_path / "ft"
    proc = fine_tune(parent, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = json.loads((parent["out"] / "model" / "vocab.json").read_text())["chars"]
    new = json.loads((out / "model" / "vocab.json").read_text())["chars"]
    assert new[: len(old)] == old and {"é", "ÿ"} <= set(new[len(old):]) and not set(new[len(old):]) & set(old)
    assert f"initialised from {parent['out'] / 'model'} (model, sha256 " in proc.stdout
    parent_config = json.loads((parent["out"] / "model" / "config.json").read_text())
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["parent"] == {"url": str(parent["out"] / "model"), "kind": "model",
                                "sha256": parent_config["model_sha256"]}
    assert config["units"] == TINY["units"] and config["embed_dim"] == TINY["embed_dim"]  # the parent's shape
    assert config["learning_rate"] == pytest.approx(parent_config["learning_rate"] / finetune.LEARNING_RATE_DIVISOR)
    gen = run("job.generate", "--in-process", "--model", str(out), "--output", str(tmp_path / "gen"),
              "--num-samples", "2", "--length", "20", "--prompt", "é", timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    # Resumed, the fine-tuning run continues from its own checkpoint, not from the parent again.
    again = fine_tune(parent, out, "--epochs", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint: epoch 1" in again.stdout and "initialised from" not in again.stdout


def test_a_shape_changing_override_is_refused(parent, tmp_path):
    proc = fine_tune(parent, tmp_path / "ft", "--units", "32")
    assert_user_error(proc, "cannot start a model of another shape: units [16] -> [32]")
    proc = fine_tune(parent, tmp_path / "ft", "--preset", "seed-small")
    assert_user_error(proc, "input_mode 'embedding' -> 'scaled'")
    assert not (tmp_path / "ft").exists()


def test_keep_case_with_vocab_from_init_is_refused(parent, tmp_path):
    proc = fine_tune(parent, tmp_path / "ft", "--keep-case", "--vocab-from-init")
    assert_user_error(proc, "was trained on lowercase text: with --keep-case and --vocab-from-init")


def test_fine_tuning_from_a_checkpoint(parent, tmp_path):
    newest = sorted((parent["out"] / "checkpoints" / "run").glob("checkpoint_*"))[-1]
    proc = fine_tune(parent, tmp_path / "ft", "--vocab-from-init", init=str(newest))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from {newest} (checkpoint" in proc.stdout
    vocab = json.loads((tmp_path / "ft" / "model" / "vocab.json").read_text())
    old = json.loads((parent["out"] / "model" / "vocab.json").read_text())["chars"]
    assert vocab["chars"] == [*old, UNKNOWN_CHAR] and vocab["unknown"]  # é and ÿ share the new unknown id


@pytest.mark.e2e
def test_fine_tuning_from_a_model_on_s3(parent, s3_server, s3_prefix, tmp_path):
    from job.core import storage

    storage.upload_dir(str(parent["out"] / "model"), f"{s3_prefix}/parent/model")
    proc = fine_tune(parent, tmp_path / "ft", init=f"{s3_prefix}/parent", env=s3_server.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from {s3_prefix}/parent/model (model" in proc.stdout


def test_the_parents_weights_are_carried_row_for_row(parent):
    """In-process: the new model holds the parent's layers, with the old ids' embedding rows and output columns
    unchanged and the new ones at their mean."""
    from job.core.config import TrainConfig
    from job.model import export
    from job.model import model as model_lib

    found = finetune.find_parent(str(parent["out"]))
    vocab = Vocab((*found.vocab.chars, "é", "ÿ"))
    cfg = TrainConfig.from_dict({**found.config, "output": "unused"})
    model = model_lib.build(cfg, len(vocab))
    finetune.transfer(model, found, vocab)
    source = export.load(str(parent["out"])).model
    n = len(found.vocab)
    embed, old_embed = model.get_layer("embed").get_weights()[0], source.get_layer("embed").get_weights()[0]
    np.testing.assert_array_equal(embed[:n], old_embed)
    np.testing.assert_allclose(embed[n:], np.repeat(old_embed.mean(axis=0, keepdims=True), 2, axis=0), rtol=1e-6)
    kernel, bias = model.get_layer("logits").get_weights()
    old_kernel, old_bias = source.get_layer("logits").get_weights()
    np.testing.assert_array_equal(kernel[:, :n], old_kernel)
    np.testing.assert_array_equal(bias[:n], old_bias)
    for name in ("lstm_0",):
        for a, b in zip(model.get_layer(name).get_weights(), source.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_tutorial_model_refuses_new_characters():
    """The tutorial presets read a character as id / vocabulary size: only the parent's exact vocabulary fits
    (checked on the prepared vocabulary, before the dataset is published)."""
    from job.core.errors import UserError

    parent = finetune.Parent("runs/tutorial/model", "model", {"input_mode": "scaled"}, Vocab(tuple("\n abc")), "0")
    finetune.check_vocabulary(parent, Vocab(tuple("\n abc")), "scaled")
    finetune.check_vocabulary(parent, Vocab(tuple("\n abcd")), "embedding")  # an embedding model grows instead
    with pytest.raises(UserError, match="a tutorial-preset model reads each character as id / vocabulary size.*'d'"):
        finetune.check_vocabulary(parent, Vocab(tuple("\n abcd")), "scaled")


def test_the_cli_refuses_new_characters_for_a_tutorial_parent_before_publishing(parent, tmp_path):
    """Through job.train: the refusal comes from the dataset's validation, so nothing is published (no TensorFlow
    needed: a parent's config.json and vocab.json are all the driver reads before training)."""
    from job.core.config import PRESETS

    tutorial = tmp_path / "tutorial" / "model"
    tutorial.mkdir(parents=True)
    (tutorial / "config.json").write_text(json.dumps({**PRESETS["seed-small"], "preset": "seed-small",
                                                      "learning_rate": 1e-3, "lowercase": True}))
    (tutorial / "vocab.json").write_text(Vocab(tuple("\n abcdefghijklmnopqrstuvwxyz")).to_json())
    refused = fine_tune(parent, tmp_path / "ft", "--batch-size", "8", init=str(tutorial.parent))
    assert_user_error(refused, "a tutorial-preset model reads each character as id / vocabulary size")
    assert not (tmp_path / "ft" / "data" / "meta.json").exists()


@pytest.mark.e2e
def test_two_ray_workers_fine_tune_as_one(parent, ray_cluster, s3_server, s3_prefix, tmp_path):
    """`ray job submit`, 2 workers, --init-from a parent on S3: both workers start from the parent and end with the
    same weights, and the run follows a 1-worker in-process fine-tuning at the same global batch."""
    from tiny import EXACT

    from job.core import storage

    base = s3_prefix.split("/", 3)[3]
    storage.upload_dir(str(parent["out"] / "model"), f"{s3_prefix}/parent/model")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{base}/new.txt", Body=parent["new"].read_bytes())
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{base}/exact.yaml",
                                  Body=yaml.safe_dump({k: v for k, v in EXACT.items() if k != "units"}).encode())
    common = ["--corpus", f"{s3_prefix}/new.txt", "--init-from", f"{s3_prefix}/parent", "--epochs", "1",
              "--seed", "3", "--global-batch-size", "8"]
    dumps = tmp_path / "weights"
    result = ray_cluster.submit(["python", "-m", "job.train", *common, "--config", f"{s3_prefix}/exact.yaml",
                                 "--output", f"{s3_prefix}/ft", "--num-workers", "2"],
                                env={"CHARLSTM_HOOKS": "tests.train_hooks", "CHARLSTM_TEST_DUMP_WEIGHTS": str(dumps)},
                                timeout=420)
    assert result.ok, result.describe()
    assert result.logs.count("initialised from ") == 1 and "global batch 8 (4 per worker)" in result.logs
    rank0, rank1 = np.load(dumps / "rank-0.npz"), np.load(dumps / "rank-1.npz")
    for key in rank0.files:
        np.testing.assert_array_equal(rank0[key], rank1[key])
    config = tmp_path / "exact.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in EXACT.items() if k != "units"}))
    single = run("job.train", "--in-process", *common, "--config", str(config), "--output", str(tmp_path / "one"),
                 env={**s3_server.env, "CHARLSTM_HOOKS": "tests.train_hooks",
                      "CHARLSTM_TEST_DUMP_WEIGHTS": str(tmp_path / "one-weights")}, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = np.load(tmp_path / "one-weights" / "rank-0.npz")
    for key in ref.files:
        np.testing.assert_allclose(rank0[key], ref[key], atol=2e-4)
