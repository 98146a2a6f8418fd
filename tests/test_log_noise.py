"""What a user sees: a short local training run and a short generation run print our lines plus a handful of
Ray's, not TensorFlow's start-up notices from every process or Ray Train's per-report chatter.

Run as a user runs them: `python -m job.train` and `python -m job.generate` with no RAY_ADDRESS (each starts a
local Ray), default flags. Ray's temp dir is private, so the test can tell every process it started is gone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e_helpers import wait_until_gone
from logcheck import assert_no_traceback_from_our_code
from textgen import story
from tiny import TINY

from job.core import report

REPO = Path(__file__).resolve().parents[1]
TINY = {**TINY, "epochs": 2}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((\w+) pid=\d+(?:, ip=[\d.]+)?\) ")
# Our lines: set-up, dataset, per-interval and per-evaluation lines, generation progress, the final JSON.
OURS = re.compile(r"^(preparing dataset |dataset \S+: |training \S+: |step [\d,]+  epoch |epoch +\d+/\d+  "
                  r"|eval at step |generated \d+/\d+ samples |\{\"final\": |\{\"samples\": )")
NEVER = ("absl::InitializeLog", "cudart_stub", "oneDNN", "cuda drivers", "Reporting training result",
         "TrainingReport(", "PlacementGroupCleaner")
LIMIT = 15  # lines that are not ours, per run


def not_ours(text: str) -> list[str]:
    """Lines that are not ours. A traceback counts as one message (Ray logs one with some of its warnings, e.g.
    a controller request that timed out on a loaded machine); tracebacks through our code fail separately."""
    found: list[str] = []
    in_traceback = False
    for raw in text.splitlines():
        line = RAY_PREFIX.sub("", ANSI.sub("", raw)).rstrip()
        if in_traceback:
            in_traceback = not line or line[0].isspace()
            continue
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
            found.append(line)
        elif line.strip() and not OURS.match(line.strip()):
            found.append(line.strip())
    return found


def test_not_ours_strips_ray_prefixes_and_colours():
    text = ("\x1b[36m(RayTrainWorker pid=12)\x1b[0m epoch   1/2  train 3.2\n(TrainController pid=7) something\n"
            "generated 5/10 samples (50%)\n{\"final\": {}}\n\n2026-01-01 INFO worker.py:1 -- Started\n")
    assert not_ours(text) == ["something", "2026-01-01 INFO worker.py:1 -- Started"]
    ray_warning = ("(TrainController pid=7) Failed to send resource request for x.\n"
                   "(TrainController pid=7) Traceback (most recent call last):\n"
                   '(TrainController pid=7)   File "/ray/client.py", line 58, in send\n'
                   "(TrainController pid=7)     ray.get(...)\n"
                   "(TrainController pid=7) ray.exceptions.GetTimeoutError: Get timed out\n"
                   "epoch   2/2  train 3.0\n")
    assert not_ours(ray_warning) == ["Failed to send resource request for x.", "Traceback (most recent call last):"]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _assert_quiet(proc: subprocess.CompletedProcess, expect: str) -> None:
    text = proc.stdout + proc.stderr
    assert re.search(expect, text, re.M), text[-4000:]
    for marker in NEVER:
        assert marker not in text, f"{marker!r} printed:\n{text[-4000:]}"
    assert_no_traceback_from_our_code(text)
    noise = not_ours(text)
    assert len(noise) <= LIMIT, f"{len(noise)} lines that are not ours:\n" + "\n".join(noise)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_short_local_training_and_generation_print_our_lines_and_little_else(tmp_path, ray_tmp):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(story(8000, seed=5))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out, samples = tmp_path / "out", tmp_path / "samples"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "TF_CPP_"))}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    try:
        train = _run(["job.train", "--corpus", str(corpus), "--output", str(out), "--config", str(config),
                      "--num-workers", "2"], env)
        _assert_quiet(train, r"epoch +2/2  ")
        generate = _run(["job.generate", "--model", str(out), "--output", str(samples), "--num-samples", "40",
                         "--length", "40"], env)
        _assert_quiet(generate, r"^\{\"samples\": 40, ")
    finally:
        assert not wait_until_gone(str(ray_tmp)), "a process of the runs' local Ray outlived them"


def _import_tensorflow_stderr(verbose: bool) -> str:
    code = "import sys; from job.core import report; report.import_tensorflow(sys.argv[1] == 'verbose')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP_")}
    proc = subprocess.run([sys.executable, "-c", code, "verbose" if verbose else "quiet"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_tensorflow_start_up_notices_only_with_verbose():
    loud = _import_tensorflow_stderr(verbose=True)
    if "absl::InitializeLog" not in loud:
        pytest.skip(f"this TensorFlow prints no pre-init notices on this machine: nothing to silence ({loud!r})")
    assert _import_tensorflow_stderr(verbose=False) == ""


def test_only_pre_init_info_and_warning_lines_are_dropped():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1795979322.832820    5322 cudart_stub.cc:31] Could not find cuda drivers on your machine\n"
            "W0000 00:00:1795979322.832820    5322 cpu_feature_guard.cc:210] This TensorFlow binary is optimized\n"
            "E0000 00:00:1795979322.832820    5322 cuda_dnn.cc:8310] Unable to register cuDNN factory\n"
            "/x/y.py:3: DeprecationWarning: old\n")
    assert report.drop_pre_init_noise(text) == ("E0000 00:00:1795979322.832820    5322 cuda_dnn.cc:8310] Unable to "
                                                 "register cuDNN factory\n/x/y.py:3: DeprecationWarning: old\n")


PROGRESS = re.compile(r"^generated [\d,]+/[\d,]+ samples \(\d+%\)  [\d,]+ chars/s  elapsed \S+  eta \S+$")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flags", [[], pytest.param(["--num-workers", "2"], marks=pytest.mark.e2e)],
                         ids=["default", "local-ray"])
def test_a_generation_ends_with_its_summary_line(tmp_path, ray_tmp, flags):
    """Default flags, 2,000 x 500 (no cluster given: one process does the work): progress lines and the summary,
    nothing else. With --num-workers a local Ray runs the actors; they are ended deliberately, so nothing (no
    actor's crash trace at exit) follows the summary either."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(story(8000, seed=6))
    model = tmp_path / "model"
    settings = {k: v for k, v in TINY.items() if k != "epochs"}
    from job.core.config import PRESETS, TrainConfig
    from job.training.worker import train_func

    train_func(TrainConfig(**{**PRESETS["default"], **settings, "epochs": 1, "corpus": str(corpus),
                              "output": str(model), "in_process": True}).validate().to_dict())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "TF_CPP_"))}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = subprocess.run([sys.executable, "-m", "job.generate", "--model", str(model), "--output",
                               str(tmp_path / "gen"), "--num-samples", "2000", *flags], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400,
                              stdin=subprocess.DEVNULL)
    finally:
        assert not wait_until_gone(str(ray_tmp)), "a process of the job's local Ray outlived it"
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = [RAY_PREFIX.sub("", ANSI.sub("", x)) for x in proc.stdout.splitlines() if x.strip()]
    assert lines[-1].startswith('{"samples": 2000, "chars": 1000000, '), proc.stdout[-4000:]
    if not flags:
        assert all(PROGRESS.match(x) for x in lines[:-1]) and lines[:-1], proc.stdout[-4000:]
    else:
        assert PROGRESS.match(lines[-2]), proc.stdout[-4000:]
