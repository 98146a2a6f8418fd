"""The loop's decisions (job/training/schedule.py): pure functions of step counts and clocks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from job.training.schedule import ProgressTicker, due, eta_seconds, progress_line, record_evaluation, steps_in_next_call


def test_calls_end_exactly_on_every_interval_and_the_epoch_end():
    assert steps_in_next_call(4, 100, 0, (0, 0)) == 4
    assert steps_in_next_call(4, 3, 0, (0, 0)) == 3  # never past the epoch's end
    assert steps_in_next_call(4, 100, 8, (10, 0)) == 2  # lands on step 10 for the checkpoint
    assert steps_in_next_call(4, 100, 8, (10, 9)) == 1  # and on step 9 for the evaluation
    steps, step, hits = 0, 0, []
    while step < 50:
        n = steps_in_next_call(4, 50 - step, step, (7, 12))
        step += n
        steps += 1
        hits += [step] if due(step, 7) or due(step, 12) else []
    assert hits == [7, 12, 14, 21, 24, 28, 35, 36, 42, 48, 49]


def test_due_never_at_step_zero_or_when_off():
    assert not due(0, 5) and not due(7, 0) and due(10, 5) and not due(11, 5)


def test_eta_is_the_average_pace_capped_by_the_budget():
    p = SimpleNamespace(global_step=100, elapsed_sec=50.0)
    assert eta_seconds(p, 300, float("inf")) == pytest.approx(100.0)
    assert eta_seconds(p, 300, 80.0) == pytest.approx(30.0)
    assert eta_seconds(p, 50, 80.0) == 0.0


def test_ticker_reports_the_mean_loss_and_rate_of_each_interval():
    t = ProgressTicker(30.0, now=0.0)
    assert t.tick(10.0, 4, 8.0, 400) is None
    got = t.tick(31.0, 4, 4.0, 400)
    assert got.steps == 8 and got.loss == pytest.approx(1.5) and got.chars_per_sec == pytest.approx(800 / 31)
    assert t.tick(40.0, 1, 1.0, 10) is None  # a new interval started at 31 s
    assert ProgressTicker(0.0, now=0.0).tick(1e9, 1, 1.0, 1) is None  # 0: no progress lines


def test_progress_line_names_step_epoch_loss_rate_and_eta():
    p = SimpleNamespace(global_step=1200, epoch=2, step_in_epoch=41, elapsed_sec=45.0)
    line = progress_line(p, 100, 100, 2400, ProgressTicker(1, 0).tick(2, 2, 3.0, 1000), float("inf"))
    assert line.startswith("step 1,200  epoch 3/100 (41%)  loss 1.5000  500 chars/s  elapsed 0:45  eta 0:45")


def test_a_finished_epoch_replaces_its_partial_line_wherever_it_stands():
    history = [{"kind": "epoch", "epoch": 1, "partial_epoch": False},
               {"kind": "epoch", "epoch": 2, "partial_epoch": True}]
    record_evaluation(history, {"kind": "eval", "epoch": 2, "global_step": 30})
    record_evaluation(history, {"kind": "epoch", "epoch": 2, "partial_epoch": False})
    assert [(m["kind"], m["epoch"]) for m in history] == [("epoch", 1), ("eval", 2), ("epoch", 2)]
    record_evaluation(history, {"kind": "epoch", "epoch": 3, "partial_epoch": False})
    assert len(history) == 4  # a complete epoch line is never replaced


def test_budget_action_stops_every_worker_after_the_same_step():
    from job.training.schedule import budget_action

    assert budget_action(False, 10.0, 60.0, world=2) is None
    assert budget_action(False, 61.0, 60.0, world=1) == "stop"  # alone: stop now
    assert budget_action(False, 61.0, 60.0, world=2) == "signal"  # tell the others through the next all-reduce
    assert budget_action(True, 10.0, 60.0, world=2) == "stop"  # a worker's flag came back: everyone stops
    assert budget_action(False, 1e9, float("inf"), world=1) is None


def test_step_events_fall_on_their_steps_inside_an_epoch_only():
    from job.training.schedule import step_event

    assert step_event(20, True, eval_every=20, checkpoint_every=10) == "evaluate"  # an evaluation checkpoints too
    assert step_event(30, True, eval_every=20, checkpoint_every=10) == "checkpoint"
    assert step_event(31, True, eval_every=20, checkpoint_every=10) is None
    assert step_event(20, False, eval_every=20, checkpoint_every=10) is None  # the epoch's end evaluates anyway
    assert step_event(20, True, eval_every=0, checkpoint_every=0) is None


def test_learning_rate_is_the_base_or_decayed_rate_annealed_by_the_further_of_steps_and_time():
    from job.core.config import TrainConfig
    from job.training.schedule import learning_rate, run_fraction

    cfg = TrainConfig(learning_rate=0.01, lr_anneal=0.5)
    assert learning_rate(cfg, 0.0, 0.2) == 0.01  # no decay yet: --learning-rate
    assert learning_rate(cfg, 0.004, 0.2) == 0.004  # a plateau decayed it
    assert learning_rate(cfg, 0.004, 0.75) == pytest.approx(0.002)  # halfway through the annealed half
    assert learning_rate(cfg, 0.0, 1.0) == pytest.approx(0.0)
    assert learning_rate(TrainConfig(learning_rate=0.01, lr_anneal=0.0), 0.0, 0.99) == 0.01
    assert run_fraction(30, 100, 10.0, 100.0) == 0.3  # steps further than the clock
    assert run_fraction(30, 100, 60.0, 100.0) == 0.6  # the clock further than the steps
    assert run_fraction(30, 0, 0.0, float("inf")) == 30.0  # no plan: by steps alone, no budget


def test_an_evaluation_of_an_epoch_cut_short_is_partial_and_an_eval_never_is():
    from job.training.schedule import evaluation_metrics

    p = SimpleNamespace(epoch=2, step_in_epoch=5, global_step=25, epoch_loss_sum=10.0, elapsed_sec=3.0,
                        train_chars=1000)
    cut = evaluation_metrics(p, 4, "epoch", 10, 1.5, 200.0, 9.0)
    assert cut["partial_epoch"] and cut["epoch"] == 3 and cut["epoch_float"] == 2.5 and cut["train_loss"] == 2.0
    assert not evaluation_metrics(p, 4, "eval", 10, 1.5, 200.0, 9.0)["partial_epoch"]
    p.step_in_epoch = 10
    assert not evaluation_metrics(p, 4, "epoch", 10, 1.5, 200.0, 9.0)["partial_epoch"]
    assert cut["val_bpc"] == pytest.approx(1.5 / 0.6931471805599453)
