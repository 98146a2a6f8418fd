"""A drain announced to the run (Ray Train's preemption notice) is checkpointed at the next step boundary and no
step is trained past it; the run resumed from that checkpoint ends bit for bit as one never drained.

In-process, with the notice handed in by a stand-in session and "Ray Train restarting the group" played by an
exception out of the wait: the live path (a real `ray drain-node` on a multi-node cluster) is in
tests/test_multinode.py."""

from __future__ import annotations

import json
import re
import time
import types
from pathlib import Path

import numpy as np
import pytest
import textgen
from tiny import EXACT

from job.core.config import PRESETS, TrainConfig
from job.training import session as session_lib
from job.training import worker

RESUMED = re.compile(r"^resumed from checkpoint: epoch (\d+), step (\d+) of the next epoch, global step (\d+)$", re.M)
DRAINED = re.compile(r"^a node of this run is being drained \(deadline in \d+ s\): checkpoint saved at global step "
                     r"(\d+); waiting for Ray Train to restart the run from it$", re.M)


class Restarted(Exception):
    """Ray Train stopping the waiting worker group."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(textgen.book(3000, seed=11))
    return str(path)


def _cfg(corpus: str, out: Path) -> dict:
    # steps_per_call 3: the notice is read as a call starts and acted on as it ends, so the checkpoint falls on the
    # call's last step, after the one at which the drain became known.
    return TrainConfig(**{**PRESETS["default"], **EXACT, "preset": "default", "corpus": corpus, "output": str(out),
                          "epochs": 2, "lr_anneal": 0.0, "steps_per_call": 3, "in_process": True}).validate().to_dict()


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """The run never drained."""
    out = tmp_path_factory.mktemp("straight") / "out"
    worker.train_func(_cfg(corpus, out))
    return out


def _steps_per_epoch(out: Path) -> int:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["global_step"]


def _variables(out: Path) -> dict:
    newest = sorted((out / "checkpoints" / "run").glob("checkpoint_*"))[-1]
    arrays = np.load(newest / "variables.npz")
    return {k: arrays[k] for k in arrays.files}


@pytest.fixture
def drained_at(monkeypatch):
    """`drained_at(step)`: from the compiled call that reaches `step`, the session reports a drain (read as the call
    starts);
    the wait that follows the checkpoint ends the run as Ray Train's teardown would. Returns the steps trained."""
    trained: list[int] = []
    real_steps = worker.Trainer._train_steps

    def counted(self, plan, count):
        trained.append(count)
        return real_steps(self, plan, count)

    monkeypatch.setattr(worker.Trainer, "_train_steps", counted)

    def arm(step: int) -> None:
        trained.clear()

        def notice(self):
            return types.SimpleNamespace(deadline_ms=(time.time() + 30) * 1000) \
                if sum(trained) >= step else None

        def restarted():
            raise Restarted

        real_wait = worker.Trainer._wait_for_restart

        def wait(self):
            monkeypatch.setattr(worker, "check_interrupt", restarted)
            real_wait(self)

        monkeypatch.setattr(session_lib.LocalSession, "preemption_notice", notice)
        monkeypatch.setattr(worker.Trainer, "_wait_for_restart", wait)

    arm.trained = trained
    return arm


@pytest.mark.parametrize("where", ["mid-epoch", "epoch end"])
def test_a_drain_is_checkpointed_at_the_next_step_and_the_resumed_run_loses_nothing(corpus, straight, tmp_path,
                                                                                      monkeypatch, capsys, drained_at,
                                                                                      where):
    per_epoch = _steps_per_epoch(straight)
    expected = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert per_epoch > 12

    # The notice arrives as the call reaching step 7 starts (or the epoch's last call).
    notice_at = 7 if where == "mid-epoch" else per_epoch
    drained_at(notice_at)
    capsys.readouterr()
    with pytest.raises(Restarted):
        worker.train_func(_cfg(corpus, tmp_path / "drained"))
    log = capsys.readouterr().out
    saved = [int(x) for x in DRAINED.findall(log)]
    trained = sum(drained_at.trained)
    # Checkpointed where the call that saw the notice ended, and not one step trained after it.
    assert len(saved) == 1 and saved[0] == trained, log[-2000:]
    assert notice_at <= saved[0] < notice_at + 3
    if where == "epoch end":
        assert saved[0] == per_epoch  # the epoch's own checkpoint, not a second one
    names = sorted(p.name for p in (tmp_path / "drained" / "checkpoints" / "run").glob("checkpoint_*"))
    assert names[-1] == f"checkpoint_{saved[0]:09d}", names

    monkeypatch.undo()  # Ray Train restarts the group: no notice any more
    final = worker.train_func(_cfg(corpus, tmp_path / "drained"))
    log = capsys.readouterr().out
    resumed = [tuple(int(x) for x in m) for m in RESUMED.findall(log)]
    assert [r[2] for r in resumed] == [saved[0]], log[-2000:]
    assert final["global_step"] == 2 * per_epoch
    got = [json.loads(x) for x in (tmp_path / "drained" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["global_step"], m["train_loss"], m["val_loss"]) for m in got] == \
        [(m["global_step"], m["train_loss"], m["val_loss"]) for m in expected]  # bit for bit
    a, b = _variables(straight), _variables(tmp_path / "drained")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
