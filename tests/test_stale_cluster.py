"""A local run (no RAY_ADDRESS) must talk only to the Ray it starts, whatever `ray_current_cluster` says.

Ray's temp dir keeps the address of the last `ray start --head` in `<tmp>/ray/ray_current_cluster`, and Ray's
own actors (Ray Train's PlacementGroupCleaner) resolve "the cluster" from it unless RAY_ADDRESS says otherwise.
Pointing at a dead head, every state query of the cleaner timed out and Ray logged warnings all run long plus
a traceback at the end; pointing at another live head, the cleaner would not find our controller there. The
tests plant such a file in a private temp dir (RAY_TMPDIR) and run the training CLI as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e_helpers import wait_until_gone
from textgen import story
from tiny import EXACT

from job.core import storage

REPO = Path(__file__).resolve().parents[1]
TINY = {**EXACT, "epochs": 2}
# What Ray prints when its actors query the wrong cluster (or none).
WRONG_CLUSTER = ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "Timed out while waiting for GCS",
                 "Found multiple active Ray instances")


def _run_local_training(tmp_path: Path, ray_tmp: Path,
                        stale_address: str) -> tuple[subprocess.CompletedProcess, str, str]:
    (ray_tmp / "ray").mkdir(parents=True)
    stale = ray_tmp / "ray" / "ray_current_cluster"
    stale.write_text(stale_address + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(story(6000, seed=3))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-m", "job.train", "--corpus", str(corpus), "--output", str(out),
                           "--config", str(config), "--run-name", "stale"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    assert stale.read_text().strip() == stale_address, "the run must not rewrite Ray's address file"
    return proc, str(out), str(ray_tmp)


def _assert_clean_run(proc: subprocess.CompletedProcess, out: str, ray_tmp: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    noise = [line for line in text.splitlines() if any(marker in line for marker in WRONG_CLUSTER)]
    assert not noise, "\n".join(noise[:20])
    assert '"final"' in proc.stdout
    epochs = storage.read_text(storage.join(out, "metrics.jsonl")).splitlines()
    assert len(epochs) == TINY["epochs"]
    # Cleaned up normally: every process of the cluster the run started (they all name its temp dir) is gone.
    left = wait_until_gone(ray_tmp)
    assert not left, [p.info["cmdline"] for p in left]


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_local_run_ignores_a_stale_address_of_a_dead_head(tmp_path, ray_tmp):
    proc, out, ray_tmp = _run_local_training(tmp_path, ray_tmp, "127.0.0.1:1")  # nothing listens on port 1
    _assert_clean_run(proc, out, ray_tmp)


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_local_run_ignores_the_address_of_another_live_head(tmp_path, ray_tmp, ray_cluster):
    proc, out, ray_tmp = _run_local_training(tmp_path, ray_tmp, ray_cluster.info.gcs_address)
    _assert_clean_run(proc, out, ray_tmp)
