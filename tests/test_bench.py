"""The benchmark's pure parts: the parameter and traffic formulas behind the README's sizing estimate, and
the scaling table. (The benchmark itself is `make bench`, never a test.)"""

from __future__ import annotations

import pytest

from bench import run, scale_bench
from job.core.config import PRESETS, TrainConfig


@pytest.mark.parametrize("preset", ["default", "seed-small", "seed-large"])
def test_param_count_matches_the_built_model(preset):
    from job.model import model as model_lib

    cfg = TrainConfig(**{**PRESETS[preset], "preset": preset, "output": "x"})
    built = model_lib.build(cfg, 45)
    assert scale_bench.param_count(cfg, 45) == built.count_params()


def test_sizing_follows_ring_all_reduce():
    cfg = TrainConfig(**{**PRESETS["default"], "output": "x"})
    hw = scale_bench.Hardware(name="test", tflops_fp32=10.0, link_gbps=80.0, launch_us=0.0)  # 10 GB/s
    z = scale_bench.sizing(cfg, 45, [1, 2, 4], hw)
    one, two, four = z["rows"]
    assert one["allreduce_mb_per_worker"] == 0 and one["efficiency"] == 1.0
    # Ring all-reduce: each worker sends 2(N-1)/N of the gradient.
    assert two["allreduce_mb_per_worker"] == pytest.approx(z["gradient_mb"])
    assert four["allreduce_mb_per_worker"] == pytest.approx(1.5 * z["gradient_mb"])
    assert four["comm_ms"] == pytest.approx(1.5 * z["gradient_mb"] / 10)  # MB at 10 GB/s, in ms
    assert z["chars_per_worker_step"] == cfg.batch_size * cfg.seq_len
    assert one["chars_per_sec"] < two["chars_per_sec"] < four["chars_per_sec"]
    assert 1.0 > two["efficiency"] > four["efficiency"]
    # With a launch cost per (layer, time step, pass), small models become latency-bound.
    slow = scale_bench.sizing(cfg, 45, [1], scale_bench.Hardware("t", 10.0, 80.0, launch_us=10.0))
    assert slow["latency_bound"] and slow["rows"][0]["compute_ms"] == pytest.approx(50 * 2 * 3 * 10 / 1e3)


def test_scaling_table_renders_measured_rows_and_errors():
    hw = run.SIZING_HARDWARE
    cfg = TrainConfig(**{**PRESETS["default"], "output": "x"})
    sc = {
        "measured": {"preset": "default", "cpus_per_worker": 1, "epochs": 6, "rows": [
            {"workers": 1, "global_batch": 64, "chars_per_sec": 20000.0, "speedup": 1.0, "efficiency": 1.0},
            {"workers": 2, "error": "exit 1: boom"},
        ]},
        "sizing": {"default": scale_bench.sizing(cfg, 45, [1, 8], hw),
                   "gpu_example": {"config": {"units": [1024]}, **scale_bench.sizing(cfg, 45, [1, 8], hw)}},
    }
    text = "\n".join(run.scaling_markdown(sc))
    assert "| 1 | 64 | 20,000 | 1.00x | 100% |" in text
    assert "error: exit 1: boom" in text
    assert "units [1024]" in text and "On paper" in text


def test_corpus_scale_files_table_and_goals(tmp_path):
    from bench import corpus_bench

    text = "Ein Café — naïve ünïcode text. " * 50
    assert corpus_bench.write_corpus(text, 1, tmp_path / "c") == 1
    data = (tmp_path / "c" / "part-0000.txt").read_bytes()
    assert 999_000 < len(data) <= 1_000_000 and data.decode("utf-8")  # whole characters only
    rows = [{"size_mb": 1, "files": 1, "prepare_sec": 0.5, "prepare_rss_mb": 100.0, "first_step_sec": 6.0,
             "worker_rss_mb": 900.0, "chars_per_sec": 30000.0},
            {"size_mb": 1000, "files": 20, "prepare_sec": 50.0, "prepare_rss_mb": 120.0, "first_step_sec": 40.0,
             "worker_rss_mb": 1300.0, "chars_per_sec": 28000.0},
            {"size_mb": 10, "files": 1, "error": "train: exit 1: boom"}]
    a = corpus_bench.assess(rows)
    assert a["prepare_1gb_ok"] and not a["first_step_ok"] and not a["rss_ok"] and a["rss_growth_mb"] == 400
    assert a["rate_ok"] and a["rate_ratio"] == pytest.approx(28 / 30)
    table = corpus_bench.markdown({"rows": rows, "assessment": a})
    assert "| 1,000 MB | 20 | 50.0 s | 120 MB | 40.0 s | 1,300 MB | 28,000 |" in table
    assert "error: train: exit 1: boom" in table and "**missed**" in table


def test_generation_job_table_and_goals():
    from bench import gen_job

    job = {"samples": 10000, "length": 500, "temperature": 0.8, "rows": [
        {"label": "default flags", "flags": [], "chars": 5_000_000, "job_seconds": 50.0, "job_chars_per_sec": 100000.0,
         "process_seconds": 62.5, "process_chars_per_sec": 80000.0, "batch_size": 256},
        {"label": "`--no-xla`", "flags": ["--no-xla"], "error": "boom"},
    ]}
    kernel = [{"batch": 256, "chars_per_sec": 110000.0, "temperature": 1.0, "xla": True},
              {"batch": 256, "chars_per_sec": 80000.0, "temperature": 1.0, "xla": False}]
    text = "\n".join(gen_job.markdown(job, kernel))
    assert "| default flags | 256 | 100,000 | 80,000 | 62.5 |" in text
    assert "| `--no-xla` | | failed | | |" in text
    assert "in-process (plain graph), untrained weights, temperature 1 | 256 | 80,000" in text
    assert [t["met"] for t in gen_job.targets(job)] == [True, True]
    job["rows"][0]["job_chars_per_sec"] = 99_999.0
    assert [t["met"] for t in gen_job.targets(job)] == [False, True]


def test_generation_job_default_row_is_the_median_run_with_every_run_shown():
    from bench import gen_job

    def run(job_rate: float, process_rate: float) -> dict:
        return {"label": "default flags", "flags": [], "chars": 5_000_000, "job_seconds": 5e6 / job_rate,
                "job_chars_per_sec": job_rate, "process_seconds": 5e6 / process_rate,
                "process_chars_per_sec": process_rate, "batch_size": 256}

    row = gen_job.median_run([run(90_000.0, 85_000.0), run(101_000.0, 95_000.0), run(99_000.0, 94_000.0)])
    assert row["job_chars_per_sec"] == 99_000.0 and row["process_chars_per_sec"] == 94_000.0
    assert [r["job_chars_per_sec"] for r in row["runs"]] == [90_000.0, 101_000.0, 99_000.0]  # in run order
    text = "\n".join(gen_job.markdown({"samples": 10000, "length": 500, "temperature": 0.8, "rows": [row]}))
    assert ("| default flags; median of 3 runs (90,000 / 85,000, 101,000 / 95,000, 99,000 / 94,000) | 256 | "
            "99,000 | 94,000 |") in text
    # A failed run counts as the slowest; a single run is shown as it is.
    failed = {"label": "default flags", "flags": [], "error": "boom"}
    assert gen_job.median_run([failed, run(101_000.0, 95_000.0), run(99_000.0, 94_000.0)])[
        "job_chars_per_sec"] == 99_000.0
    assert "runs" not in gen_job.median_run([run(99_000.0, 94_000.0)])


def test_training_job_rows_compare_the_cli_with_in_process():
    from bench import train_job

    cli = {"command": "job.train --corpus c --output o --max-minutes 5", "heldout_loss_nats": 1.3571,
           "train_chars": 1_000_000, "chars_per_sec_overall": 3333.3, "process_wall_sec": 318.2}
    ours = {"heldout_loss_nats": 1.3452, "train_chars": 1_100_000, "chars_per_sec_overall": 3666.0}
    text = "\n".join(train_job.markdown(cli, ours))
    assert "| held-out loss, nats/char (exported model) | 1.3452 | 1.3571 |" in text
    assert "| whole process, s | | 318.2 |" in text and "`python -m job.train --corpus c" in text
    failed = "\n".join(train_job.markdown({"error": "job.train exited with 1: boom", "process_wall_sec": 3}, ours))
    assert "failed: job.train exited with 1: boom" in failed
    assert train_job._final('noise\n{"final": {"epoch": 2}}\n') == {"epoch": 2}


def test_generation_job_small_row_and_its_goal():
    from bench import gen_job

    small = {"label": "default flags, a small job: 2,000 x 500", "flags": [], "chars": 1_000_000,
             "job_seconds": 12.0, "job_chars_per_sec": 83_333.0, "process_seconds": 16.0,
             "process_chars_per_sec": 62_500.0, "batch_size": 256}
    job = {"samples": 10000, "length": 500, "temperature": 0.8, "small": small, "rows": [
        {"label": "default flags", "flags": [], "chars": 5_000_000, "job_seconds": 50.0, "job_chars_per_sec": 100000.0,
         "process_seconds": 62.5, "process_chars_per_sec": 80000.0, "batch_size": 256}]}
    assert "| default flags, a small job: 2,000 x 500 | 256 | 83,333 | 62,500 | 16.0 |" in "\n".join(
        gen_job.markdown(job))
    found = gen_job.targets(job)
    assert [t["met"] for t in found] == [True, True, True] and "2,000 samples: whole process >= 60,000" in found[2][
        "target"]
    small["process_chars_per_sec"] = 59_000.0
    assert [t["met"] for t in gen_job.targets(job)] == [True, True, False]


def test_finetune_table_and_goal():
    from bench import finetune_bench

    result = {"corpus2": "invented prose", "parent_seconds": 300, "seconds": 120,
              "parent": {"curve": [[10, 2.0]], "train_chars": 1}, "fine_tuned": {
                  "curve": [[5.0, 2.1], [10.0, 1.9]], "train_chars": 2_000_000, "heldout_nats": 1.9},
              "scratch": {"curve": [[5.0, 2.9], [10.0, 2.5]], "train_chars": 2_100_000, "heldout_nats": 2.5}}
    text = "\n".join(finetune_bench.markdown(result))
    assert "| fine-tuned from the parent | 1.9000 | 2.741 | 2,000,000 | 5: 2.100, 10: 1.900 |" in text
    assert "| from scratch | 2.5000 |" in text
    assert finetune_bench.target(result)["met"] is True
    result["fine_tuned"]["heldout_nats"] = 2.6
    assert finetune_bench.target(result)["met"] is False
    result["scratch"] = {"error": "boom"}
    assert finetune_bench.target(result) is None and "| from scratch | failed |" in "\n".join(
        finetune_bench.markdown(result))


def test_s3_scale_table_and_goals():
    from bench import s3_bench

    row = lambda sec, mb: {"returncode": 0, "wall_sec": sec, "peak_rss_mb": mb, "tail": []}  # noqa: E731
    result = {"size_mb": 1000, "files": 20, "goals": s3_bench.GOALS, "local_to_local": row(30.0, 400.0),
              "one_file": {**row(20.0, 380.0), "prepared_sec": 19.5},
              "s3_to_s3": row(36.0, 600.0), "download": row(12.0, 250.0)}
    result.update(s3_bench.assess(result))
    assert result["rss_over_local_mb"] == 200.0 and result["time_ratio"] == 1.2 and result["s3_ok"] is True
    assert result["per_gb"]["s3_to_s3"]["sec"] == 36.0 and result["download_ok"] is True
    assert "| local -> local, as one file | 20.0 s | 19.5 s | 380 MB | 0.0 s |  | 20.0 s |" in s3_bench.markdown(result)
    table = s3_bench.markdown(result)
    assert "| S3 -> S3 | 36.0 s |  | 600 MB | 0.0 s |  | 36.0 s |" in table and "**yes**" in table
    slow = {**result, "s3_to_s3": row(45.0, 700.0)}
    slow.update(s3_bench.assess(slow))
    assert slow["s3_ok"] is False and "**NO**" in s3_bench.markdown(slow)
    failed = {**result, "s3_to_s3": {**row(1.0, 1.0), "returncode": 2, "tail": ["error: no bucket"]}}
    assert "exit 2: error: no bucket" in s3_bench.markdown(failed)


def test_node_loss_table_reads_the_scenarios():
    from bench import preempt_bench

    result = {"scenarios": [
        {"kind": "announced", "notice_sec": 30, "lost_steps": 0, "interval": 20, "resumed_from": 64, "reached": 64,
         "recovery_sec": 84.7},
        {"kind": "unannounced", "notice_sec": 0, "lost_steps": 12, "interval": 20, "resumed_from": 40, "reached": 52,
         "recovery_sec": None}]}
    rows = preempt_bench.markdown(result).splitlines()
    assert rows[2] == "| announced | 30 s | 0 (interval 20) | 64 / 64 | 85 s |"
    assert rows[3] == "| unannounced | 0 s | 12 (interval 20) | 40 / 52 | - |"
