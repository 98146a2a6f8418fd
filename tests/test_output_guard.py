"""The user's data through the commands users run (tiny in-process trainings, real subprocesses): one writer per
--output, one run per --output, a dataset never re-prepared over by another corpus, outputs never read as corpus,
damaged datasets and checkpoints get a verdict, a generation never mixes two models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import textgen
import yaml
from logcheck import assert_user_error, run
from tiny import TINY

from job.core import guard

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """A corpus, the tiny settings, and one finished 2-epoch run (two checkpoints) to guard; copies go to tmp."""
    return {**tiny_run, "tmp": tmp_path_factory.mktemp("guard")}


def train(corpus: Path, out: Path | str, config: Path, *args: str,
          env: dict | None = None) -> subprocess.CompletedProcess:
    return run("job.train", "--in-process", "--corpus", str(corpus), "--output", str(out), "--config", str(config),
               *args, env=env, timeout=300)


def copy_run(base: dict[str, Path], name: str) -> Path:
    target = base["tmp"] / name
    shutil.copytree(base["out"], target)
    record = json.loads((target / guard.IDENTITY_FILE).read_text())
    record["config"]["output"] = str(target)
    (target / guard.IDENTITY_FILE).write_text(json.dumps(record))
    exported = json.loads((target / "model" / "config.json").read_text())
    exported["dataset"] = str(target / "data")  # the copy's own dataset, as a run there would have named it
    (target / "model" / "config.json").write_text(json.dumps(exported))
    return target


# ------------------------------------------------------------------------------------- one writer, one run


def _start(corpus: Path, out: Path | str, config: Path, seed: int, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "job.train", "--in-process", "--corpus", str(corpus), "--output",
                             str(out), "--config", str(config), "--epochs", "2", "--seed", str(seed)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _one_runs_the_other_is_refused(procs: list[subprocess.Popen]) -> None:
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _out, _err in outcomes)
    assert codes == [0, 2], [(rc, err[-2000:]) for rc, _, err in outcomes]
    refused = next(err for rc, _out, err in outcomes if rc == 2)
    errors = [line for line in refused.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is in use by training run 'run' on host" in errors[0], refused
    assert "Traceback" not in refused


def test_two_trainings_into_one_local_output_one_runs(base, tmp_path):
    out = tmp_path / "out"
    _one_runs_the_other_is_refused([_start(base["corpus"], out, base["config"], seed) for seed in (0, 7)])
    assert len(list((out / "tensorboard" / "run").iterdir())) == 1  # one run's events, not two
    assert not (out / guard.LEASE_FILE).exists()


@pytest.mark.e2e
def test_two_trainings_into_one_s3_output_one_runs(base, s3_server, s3_prefix):
    out = f"{s3_prefix}/out"
    _one_runs_the_other_is_refused([_start(base["corpus"], out, base["config"], seed, s3_server.env)
                                    for seed in (0, 7)])


def test_a_crashed_runs_lease_is_taken_over(base):
    out = copy_run(base, "crashed")
    (out / guard.LEASE_FILE).write_text(json.dumps({
        "owner": "x", "host": "gone-node", "pid": 4242, "command": "training run 'run'", "ttl": 60.0,
        "heartbeat": time.time() - 90}))
    proc = train(base["corpus"], out, base["config"], "--epochs", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over {out} from training run 'run' on host gone-node pid 4242" in proc.stdout
    assert "resumed from checkpoint: epoch 2" in proc.stdout


def test_run_names_are_one_name(base, tmp_path):
    for name in ("../../escape", "a/b", "..", ".hidden"):
        proc = train(base["corpus"], tmp_path / "o", base["config"], "--run-name", name)
        assert_user_error(proc, "--run-name must be one name of letters, digits")
    assert not (tmp_path / "o").exists() and not (tmp_path.parent / "escape").exists()


def test_training_into_a_dataset_or_generation_output_is_refused(base, tmp_path):
    dataset = base["out"] / "data"
    assert_user_error(train(base["corpus"], dataset, base["config"]), f"{dataset} is a prepared dataset; give this "
                      "training output its own --output")
    gen = tmp_path / "gen"
    guard.write_identity(str(gen), "generation", {"model": {}, "settings": {}})
    assert_user_error(train(base["corpus"], gen, base["config"]), f"{gen} is a generation output")


# ------------------------------------------------------------------------------ datasets and evaluation


def test_another_runs_dataset_is_never_prepared_over(base, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(textgen.book(5000, seed=11))
    before = snapshot(base["out"])
    proc = train(other, tmp_path / "B", base["config"], "--dataset", str(base["out"] / "data"))
    assert_user_error(proc, f"{base['out'] / 'data'} already holds another dataset: it was prepared from corpus "
                            f"{base['corpus']}, not {other}")
    assert snapshot(base["out"]) == before and not (tmp_path / "B").exists()


def test_evaluate_refuses_a_dataset_prepared_again_from_other_text(base, tmp_path):
    out = copy_run(base, "evaluated")
    ok = run("job.evaluate", "--model", str(out), timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stderr == "" and len(ok.stdout.splitlines()) == 1, ok  # its result line only: no TensorFlow notices
    other = tmp_path / "other.txt"
    other.write_text(textgen.book(5000, seed=12))
    forced = run("job.prepare", "--corpus", str(other), "--output", str(out / "data"), "--force")
    assert forced.returncode == 0, forced.stderr
    assert_user_error(run("job.evaluate", "--model", str(out), timeout=300),
                      f"the dataset {out / 'data'} no longer holds the text model {out / 'model'} was trained on")


def test_output_inside_the_corpus_folder_is_not_read_as_corpus(base, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    shutil.copy(base["corpus"], books / "a.txt")
    out = books / "run"
    first = train(books, out, base["config"], "--epochs", "1", "--skip-bad-files")
    assert first.returncode == 0, first.stderr[-3000:]
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert [f["name"] for f in meta["files"]] == ["a.txt"] and meta["skipped_files"] == []
    again = train(books, out, base["config"], "--epochs", "2", "--skip-bad-files")  # its own files are now there
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint" in again.stdout and "is current" in again.stdout


def test_in_process_training_prepares_its_dataset_once(base, tmp_path):
    code = (
        "import sys\n"
        "from job import train\n"
        "from job.core.errors import run_cli\n"
        "from job.data import prepare\n"
        "calls = []\n"
        "real = prepare.prepare\n"
        "prepare.prepare = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "real_ensure = prepare.ensure\n"
        "prepare.ensure = lambda *a, **k: calls.append(2) or real_ensure(*a, **k)\n"
        "rc = run_cli(train.main, sys.argv[1:])\n"
        "print('calls', calls)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "--in-process", "--corpus", str(base["corpus"]), "--output",
                           str(tmp_path / "o"), "--config", str(base["config"]), "--epochs", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calls [2, 1]" in proc.stdout  # one ensure (the driver's), one preparation


def test_a_damaged_dataset_stops_training_in_one_line(base):
    out = copy_run(base, "damaged-data")
    blob = bytearray((out / "data" / "train.bin").read_bytes())
    blob[5] = 250
    (out / "data" / "train.bin").write_bytes(bytes(blob))
    assert_user_error(train(base["corpus"], out, base["config"], "--epochs", "3"),
                      f"{out / 'data' / 'train.bin'} does not match the sha256 in its meta.json")


# ------------------------------------------------------------------------------------------ checkpoints


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints" / "run").glob("checkpoint_*"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(base):
    out = copy_run(base, "damaged-ckpt")
    older, newest = _checkpoints(out)
    step, newest_step = (json.loads((c / "progress.json").read_text())["progress"]["global_step"]
                         for c in (older, newest))
    variables = newest / "variables.npz"
    variables.write_bytes(variables.read_bytes()[: variables.stat().st_size // 2])
    proc = train(base["corpus"], out, base["config"], "--epochs", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"checkpoint at global step {newest_step} cannot be restored (variables.npz does not match its sha256); "
            "trying the one before it") in proc.stdout
    assert f"resumed from checkpoint: epoch 1, step 0 of the next epoch, global step {step}" in proc.stdout


def test_no_checkpoint_that_loads_is_one_line(base):
    out = copy_run(base, "all-damaged")
    for folder in _checkpoints(out):
        (folder / "variables.npz").write_bytes(b"PK\x03\x04 truncated")
    assert_user_error(train(base["corpus"], out, base["config"], "--epochs", "3"),
                      f"none of the 2 checkpoint(s) of run 'run' in {out} can be restored")


# ------------------------------------------------------------------------------------------- generation


def generate(model: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run("job.generate", "--in-process", "--model", str(model), "--output", str(out), "--num-samples", "4",
               "--length", "10", *args, timeout=300)


def test_a_generation_never_mixes_two_models_or_two_settings(base, tmp_path):
    model = copy_run(base, "retrained")
    gen = tmp_path / "gen"
    first = generate(model, gen, "--shard-size", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    (gen / "samples" / "part-00001.jsonl.gz").unlink()  # as if interrupted before the second shard
    assert_user_error(generate(model, gen, "--shard-size", "2", "--length", "12"),
                      f"{gen} holds samples made with other settings: length 10 -> 12")
    before = snapshot(gen)
    retrained = train(base["corpus"], model, base["config"], "--epochs", "3")  # same URL, new weights
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    assert_user_error(generate(model, gen, "--shard-size", "2"),
                      f"{gen} holds samples of the model at {model / 'model'} with sha256")
    assert snapshot(gen) == before
    assert_user_error(generate(model, model), f"{model} is a training output; give this generation output its own")


@pytest.mark.e2e
def test_an_s3_generation_never_mixes_two_models(base, s3_server, s3_prefix):
    model = copy_run(base, "retrained-s3")
    gen = f"{s3_prefix}/gen"
    first = run("job.generate", "--in-process", "--model", str(model), "--output", gen, "--num-samples", "2",
                "--length", "5", timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    # Retrained behind the same URL: other weights, so another model.keras and the checksum its config.json records.
    from job.model import export

    loaded = export.load(str(model))
    weights = loaded.model.get_weights()
    loaded.model.set_weights([weights[0] + 0.01, *weights[1:]])
    export.save(loaded.model, loaded.vocab, loaded.config, str(model / "model"))
    assert json.loads((model / "model" / "config.json").read_text())["model_sha256"] != loaded.config["model_sha256"]
    again = run("job.generate", "--in-process", "--model", str(model), "--output", gen, "--num-samples", "2",
                "--length", "5", timeout=300)
    assert_user_error(again, f"{gen} holds samples of the model at {model / 'model'} with sha256")


@pytest.mark.e2e
def test_a_damaged_dataset_found_by_a_ray_worker_is_one_line(ray_cluster, s3_server, s3_prefix, tmp_path):
    """The driver verifies a local dataset; a remote one is verified where a node downloads it. A worker's verdict
    reaches the user as the driver's own refusals do: one line, not Ray Train's wrapped traceback."""
    from logcheck import assert_one_line_error

    from job.data import prepare

    base = s3_prefix.split("/", 3)[3]
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{base}/corpus.txt",
                                  Body=textgen.book(6000, seed=2).encode())
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{base}/tiny.yaml", Body=yaml.safe_dump(TINY).encode())
    corpus, out = f"{s3_prefix}/corpus.txt", f"{s3_prefix}/run"
    prepare.ensure(corpus, f"{out}/data", log=lambda _l: None)
    key = f"{base}/run/data/val.bin"
    blob = bytearray(s3_server.get_bytes(key))
    blob[-1] ^= 1
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(blob))
    result = ray_cluster.submit(["python", "-m", "job.train", "--corpus", corpus, "--output", out, "--config",
                                 f"{s3_prefix}/tiny.yaml", "--max-failures", "0"],
                                env={"CHARLSTM_CACHE_DIR": str(tmp_path / "node-cache")}, timeout=300)
    assert not result.ok, result.describe()
    assert_one_line_error(result.logs, f"{out}/data/val.bin does not match the sha256 in its meta.json",
                          ray_logs=True)
